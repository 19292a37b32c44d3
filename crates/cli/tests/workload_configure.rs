//! `gangplank workload entry configure` against Istio's golden files, run as the real binary.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use pretty_assertions::assert_eq;
use support::gangplank;

/// One of Istio's golden sets (`vmconfig-ipv4`, `vmconfig-ipv6`,
/// `vmconfig-nil-proxy-metadata`), kept in the repository's `shared/` folder beside the
/// workspace.
fn istio_set(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/istio-data")
        .join(name)
}

fn golden_dir() -> PathBuf {
    istio_set("vmconfig-ipv4")
}

struct Setup {
    _tmp: tempfile::TempDir,
    root_cert: String,
    out: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root_cert = tmp.path().join("root-cert.pem");
    std::fs::write(&root_cert, b"fake-CA-cert").unwrap();
    Setup {
        root_cert: root_cert.display().to_string(),
        out: tmp.path().join("out/config"),
        _tmp: tmp,
    }
}

fn ipv4_args(s: &Setup) -> Vec<String> {
    let dir = golden_dir();
    [
        "workload",
        "entry",
        "configure",
        "-f",
        &dir.join("workloadgroup.yaml").display().to_string(),
        "--mesh-config",
        &dir.join("meshconfig.yaml").display().to_string(),
        "--root-cert",
        &s.root_cert,
        "--internalIP",
        "10.10.10.10",
        "--ingressIP",
        "10.10.10.11",
        "--clusterID",
        "Kubernetes",
        "--revision",
        "rev-1",
        "-o",
        &s.out.display().to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

fn run(args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    gangplank(&refs)
}

#[test]
fn writes_istio_golden_files_byte_for_byte() {
    let s = setup();
    let out = run(&ipv4_args(&s));
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "Configuration generation into directory {} was successful\n",
            s.out.display()
        )
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no --token given"), "{stderr}");

    assert_wrote_set(&s.out, &golden_dir());
}

/// `out` holds exactly the five files istioctl writes, each equal byte for byte to its
/// `<name>.golden` in the set `set` (which has a golden for every one of them, as Istio's
/// `checkOutputFiles` wants), with the token private and the rest world-readable.
fn assert_wrote_set(out: &Path, set: &Path) {
    let mut written: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "cluster.env",
            "hosts",
            "istio-token",
            "mesh.yaml",
            "root-cert.pem"
        ]
    );
    let mut goldens: Vec<String> = std::fs::read_dir(set)
        .unwrap_or_else(|e| panic!("reading {}: {e}", set.display()))
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".golden").map(str::to_string)
        })
        .collect();
    goldens.sort();
    assert_eq!(
        written,
        goldens,
        "written files vs golden files in {}",
        set.display()
    );
    for name in &written {
        let got = std::fs::read(out.join(name)).unwrap();
        let want = std::fs::read(set.join(format!("{name}.golden"))).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{name}"
        );
        assert_eq!(got, want, "{name} bytes");
        let mode = std::fs::metadata(out.join(name)).unwrap().permissions().mode() & 0o777;
        let expected = if name == "istio-token" { 0o600 } else { 0o644 };
        assert_eq!(mode, expected, "mode of {name}");
    }
}

/// Istio's ipv6 set: the ipv4 flags with `--internalIP fd00:10:96::1 --ingressIP fd00:10:96::2`.
#[test]
fn writes_istio_ipv6_golden_files_byte_for_byte() {
    let s = setup();
    let dir = istio_set("vmconfig-ipv6");
    let mut args = ipv4_args(&s);
    for (flag, value) in [
        ("-f", dir.join("workloadgroup.yaml").display().to_string()),
        ("--mesh-config", dir.join("meshconfig.yaml").display().to_string()),
        ("--internalIP", "fd00:10:96::1".to_string()),
        ("--ingressIP", "fd00:10:96::2".to_string()),
    ] {
        args = with(without(args, flag), &[flag, &value]);
    }
    let out = run(&args);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_wrote_set(&s.out, &dir);
}

/// Istio's nil-proxy-metadata set: mesh config `defaultConfig: {}` (given inline by Istio's
/// test, so its folder has no meshconfig.yaml), `--internalIP 10.10.10.10 --clusterID
/// Kubernetes`, no revision, no ingress IP.
#[test]
fn writes_istio_nil_proxy_metadata_golden_files_byte_for_byte() {
    let s = setup();
    let dir = istio_set("vmconfig-nil-proxy-metadata");
    let mesh = s.out.parent().unwrap().parent().unwrap().join("meshconfig.yaml");
    std::fs::write(&mesh, "defaultConfig: {}").unwrap();
    let args: Vec<String> = [
        "workload",
        "entry",
        "configure",
        "-f",
        &dir.join("workloadgroup.yaml").display().to_string(),
        "--mesh-config",
        &mesh.display().to_string(),
        "--root-cert",
        &s.root_cert,
        "--internalIP",
        "10.10.10.10",
        "--clusterID",
        "Kubernetes",
        "-o",
        &s.out.display().to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let out = run(&args);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_wrote_set(&s.out, &dir);
}

#[test]
fn token_file_is_written_without_its_trailing_newline() {
    let s = setup();
    let token = s.out.parent().unwrap().join("token.jwt");
    std::fs::create_dir_all(token.parent().unwrap()).unwrap();
    std::fs::write(&token, "header.payload.signature\n").unwrap();
    let mut args = ipv4_args(&s);
    args.extend([
        "--token".to_string(),
        token.display().to_string(),
        "--capture-dns=false".into(),
    ]);
    let out = run(&args);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(s.out.join("istio-token")).unwrap(),
        b"header.payload.signature"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("header.payload"),
        "the token must not be printed: {stderr}"
    );
    let env = std::fs::read_to_string(s.out.join("cluster.env")).unwrap();
    assert!(!env.contains("ISTIO_META_DNS_CAPTURE='true'"), "{env}");
    assert!(
        env.contains("ISTIO_META_DNS_CAPTURE='false'"),
        "mesh config value survives: {env}"
    );
}

fn assert_refused(args: &[String], s: &Setup, message: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {args:?}");
    assert!(stderr.contains(message), "expected {message:?} in: {stderr}");
    assert!(!s.out.exists(), "nothing may be written on error ({args:?})");
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn without(args: Vec<String>, flag: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == flag {
            it.next();
        } else {
            out.push(a);
        }
    }
    out
}

#[test]
fn bad_flag_combinations_exit_non_zero_and_write_nothing() {
    let s = setup();
    let base = ipv4_args(&s);
    assert_refused(
        &with(base.clone(), &["--externalIP", "10.1.1.1"]),
        &s,
        "cannot be used with",
    );
    assert_refused(&with(base.clone(), &["--name", "foo"]), &s, "cannot be used with");
    assert_refused(
        &with(
            without(base.clone(), "--ingressIP"),
            &["--ingressIP", "not-an-ip"],
        ),
        &s,
        "invalid",
    );
    assert_refused(&with(base.clone(), &["-n", "other"]), &s, "-n says \"other\"");
    assert_refused(
        &without(base.clone(), "--root-cert"),
        &s,
        "--root-cert FILE is required",
    );
    assert_refused(&without(base.clone(), "--clusterID"), &s, "--clusterID");
    assert_refused(
        &without(base.clone(), "-f"),
        &s,
        "expecting a WorkloadGroup artifact file",
    );
    assert_refused(
        &with(without(base.clone(), "-f"), &["--name", "foo", "-n", "bar"]),
        &s,
        "needs the Kubernetes registry",
    );
    assert_refused(&without(base.clone(), "-o"), &s, "--output");

    let bad_mesh = s.out.parent().unwrap().parent().unwrap().join("bad-mesh.yaml");
    std::fs::write(
        &bad_mesh,
        "defaultConfig:\n  proxyMetadata:\n    \"BAD KEY\": x\n",
    )
    .unwrap();
    let args = with(
        without(base, "--mesh-config"),
        &["--mesh-config", &bad_mesh.display().to_string()],
    );
    assert_refused(&args, &s, "not an environment variable name");
}

#[test]
fn help_says_where_inputs_come_from() {
    let out = gangplank(&["workload", "entry", "configure", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--mesh-config",
        "--root-cert",
        "--token",
        "istio-ca-root-cert",
        "--capture-dns",
        "--clusterID",
    ] {
        assert!(help.contains(needle), "help lacks {needle}: {help}");
    }
}
