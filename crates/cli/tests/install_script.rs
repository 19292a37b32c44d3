//! `gangplank agent install-script`: the script is clean for `shellcheck -s sh` and `sh -n`
//! whatever the flags; bad flags exit 2 naming the flag, with nothing on stdout; and its
//! `--download-only DIR` mode, run with the system's real curl (or wget) against a real
//! endpoint process serving packages from `install.directory`, downloads and verifies the
//! package — and downloads nothing from an endpoint its CA bundle does not trust.
//!
//! The full install (dpkg or rpm, systemd) is tested on a systemd "VM" in CI, not here.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gangplank_testkit::process::Proc;
use sha2::{Digest, Sha256};
use support::{gangplank, run_endpoint, text, write};

/// Names the test endpoints' certificates are issued for (and 127.0.0.1).
const CORP: &str = "onboarding-endpoint.your-company.corp";

/// The fake packages, for whichever architecture this machine is.
const PACKAGES: [&str; 4] = [
    "gangplank-agent_0.1.0-1_amd64.deb",
    "gangplank-agent_0.1.0-1_arm64.deb",
    "gangplank-agent-0.1.0-1.x86_64.rpm",
    "gangplank-agent-0.1.0-1.aarch64.rpm",
];

fn bytes_of(file: &str) -> Vec<u8> {
    let seed = Sha256::digest(file.as_bytes());
    (0..200_000u32)
        .map(|i| seed[(i % 32) as usize] ^ (i / 32) as u8)
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// This machine's package of `format`, as the script picks it (`uname -m`).
fn package_for(format: &str) -> &'static str {
    let arch = match std::env::consts::ARCH {
        "x86_64" => ["amd64", "x86_64"],
        "aarch64" => ["arm64", "aarch64"],
        other => panic!("no package for {other}"),
    };
    PACKAGES
        .into_iter()
        .find(|p| {
            p.ends_with(&format!(
                "{}.{format}",
                if format == "deb" { arch[0] } else { arch[1] }
            ))
        })
        .unwrap()
}

/// A real endpoint with a certificate for `names` (and 127.0.0.1) from its own CA, serving
/// [`PACKAGES`].
struct Serving {
    _endpoint: Proc,
    addr: SocketAddr,
    ca: PathBuf,
}

fn serve(root: &Path, names: &[&str]) -> Serving {
    let ca = gangplank_tls::dev::Ca::generate("install-script e2e").unwrap();
    let leaf = ca.issue(names, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]).unwrap();
    write(&root.join("tls/tls.crt"), &leaf.cert_pem);
    write(&root.join("tls/tls.key"), &leaf.key_pem);
    write(&root.join("tls/ca.pem"), ca.cert_pem());
    write(
        &root.join("mesh/root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nZmFrZQ==\n-----END CERTIFICATE-----\n",
    );
    std::fs::create_dir_all(root.join("registry")).unwrap();
    for file in PACKAGES {
        let path = root.join("packages").join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes_of(file)).unwrap();
    }
    let config = root.join("endpoint.yaml");
    write(
        &config,
        &format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: install-script
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
tls: {{certFile: {r}/tls/tls.crt, keyFile: {r}/tls/tls.key}}
registry: {{directory: {r}/registry}}
stateDir: {r}/state
mesh: {{rootCertFile: {r}/mesh/root-cert.pem}}
identities: {{joinTokens: true}}
install: {{directory: {r}/packages}}
",
            r = root.display()
        ),
    );
    let (endpoint, addr) = run_endpoint("endpoint", &config);
    Serving {
        _endpoint: endpoint,
        addr,
        ca: root.join("tls/ca.pem"),
    }
}

/// `gangplank agent install-script ARGS`, which must succeed; returns the script.
fn script(args: &[&str]) -> String {
    let mut all = vec!["agent", "install-script"];
    all.extend_from_slice(args);
    let out = gangplank(&all);
    assert!(out.status.success(), "{all:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Runs `sh SCRIPT ARGS` with `env`; the script is written to `dir`.
fn run_script(dir: &Path, script: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let path = dir.join("install.sh");
    std::fs::write(&path, script).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg(&path).args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[test]
fn the_script_is_clean_for_shellcheck_and_sh_n_with_every_kind_of_flag() {
    let check = Command::new("shellcheck").arg("--version").output();
    assert!(
        check.is_ok_and(|o| o.status.success()),
        "install shellcheck (apt-get install shellcheck)"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = gangplank_tls::dev::Ca::generate("shellcheck").unwrap();
    let bundle = dir.path().join("ca.pem");
    std::fs::write(&bundle, ca.cert_pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "abcdefghij.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n").unwrap();
    let bundle = bundle.to_str().unwrap();
    let token = token.to_str().unwrap();
    let base = ["--workload-group", "bookinfo/ratings", "--ca-bundle", bundle];
    for extra in [
        &["--endpoint", "onboarding.example.corp"][..],
        &["--endpoint", "10.0.0.5:8443", "--sni", CORP, "--format", "rpm"],
        &[
            "--endpoint",
            "[fd00::5]:15443",
            "--join-token-file",
            token,
            "--format",
            "deb",
        ],
        &["--endpoint", "fd00::5", "--identity", "aws-ec2"],
        &["--endpoint", "onboarding.example.corp", "--identity", "auto"],
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let script = script(&args);
        for (tool, tool_args) in [("shellcheck", &["-s", "sh", "-"][..]), ("sh", &["-n"][..])] {
            let mut child = Command::new(tool)
                .args(tool_args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{tool} {tool_args:?} with {extra:?}:\n{}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
    }
}

#[test]
fn bad_flags_exit_2_naming_the_flag_and_print_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = gangplank_tls::dev::Ca::generate("flags").unwrap();
    write(&root.join("ca.pem"), ca.cert_pem());
    write(
        &root.join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    write(
        &root.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let secret = "abcdefghij.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    write(&root.join("bad-token"), &format!("{secret}x\n"));
    let path = |p: &str| root.join(p).display().to_string();
    let good = [
        "--endpoint",
        "onboarding.example.corp",
        "--workload-group",
        "bookinfo/ratings",
        "--ca-bundle",
    ];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--endpoint".into(), "https://onboarding.example.corp".into()],
            "--endpoint \"https://onboarding.example.corp\": give HOST[:PORT] only",
        ),
        (
            vec!["--endpoint".into(), "onboarding.example.corp:99999".into()],
            "--endpoint \"onboarding.example.corp:99999\": \"99999\" is not a port",
        ),
        (
            vec!["--endpoint".into(), "bad_host".into()],
            "--endpoint \"bad_host\": the host is not a DNS name or IP address",
        ),
        (
            vec!["--workload-group".into(), "Bookinfo/ratings".into()],
            "--workload-group Bookinfo/ratings: the namespace is not a namespace name",
        ),
        (
            vec!["--workload-group".into(), "ratings".into()],
            "--workload-group <NS/NAME>",
        ),
        (vec!["--ca-bundle".into(), path("missing.pem")], "--ca-bundle "),
        (
            vec!["--ca-bundle".into(), path("key.pem")],
            "no PEM certificate found: give the PEM file of the CA",
        ),
        (
            vec!["--ca-bundle".into(), path("garbage.pem")],
            "is not a usable CA certificate",
        ),
        (
            vec!["--sni".into(), "not a name".into()],
            "--sni \"not a name\": is not a DNS name",
        ),
        (
            vec!["--join-token-file".into(), path("bad-token")],
            "does not hold a join token",
        ),
        (
            vec!["--join-token-file".into(), path("missing-token")],
            "--join-token-file ",
        ),
        (
            vec![
                "--join-token-file".into(),
                path("bad-token"),
                "--identity".into(),
                "auto".into(),
            ],
            "cannot be used with",
        ),
        (
            vec!["--identity".into(), "aws".into()],
            "invalid value 'aws' for '--identity <PLATFORM>'",
        ),
        (
            vec!["--format".into(), "apk".into()],
            "invalid value 'apk' for '--format <FORMAT>'",
        ),
    ];
    for command in ["install-script", "user-data"] {
        for (change, says) in &cases {
            // The good flags, with `change` replacing or adding one.
            let mut args: Vec<String> = vec!["agent".into(), command.into()];
            let mut flags: Vec<String> = good.iter().map(|s| s.to_string()).collect();
            flags.push(path("ca.pem"));
            if let Some(at) = flags.iter().position(|f| f == &change[0]) {
                flags.drain(at..at + 2);
            }
            flags.extend(change.iter().cloned());
            args.extend(flags);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = gangplank(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(out.stdout.is_empty(), "{args:?} printed: {}", text(&out.stdout));
            assert!(stderr.contains(says), "{args:?}: {stderr}");
            assert!(
                !stderr.contains(secret),
                "{args:?}: the token was shown: {stderr}"
            );
        }
    }
}

#[test]
fn download_only_fetches_and_verifies_the_package_from_a_real_endpoint_with_curl() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let endpoint = serve(&root.join("endpoint"), &["localhost", CORP]);
    let secret = "abcdefghij.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    write(&root.join("token"), secret);
    let (vm, tmp, gangplank_root) = (root.join("vm"), root.join("tmp"), root.join("vm-root"));
    for d in [&vm, &tmp, &gangplank_root] {
        std::fs::create_dir_all(d).unwrap();
    }
    for format in ["deb", "rpm"] {
        let address = format!("localhost:{}", endpoint.addr.port());
        let script = script(&[
            "--endpoint",
            &address,
            "--workload-group",
            "bookinfo/ratings",
            "--ca-bundle",
            endpoint.ca.to_str().unwrap(),
            "--join-token-file",
            root.join("token").to_str().unwrap(),
            "--format",
            format,
        ]);
        let into = root.join(format!("downloaded-{format}"));
        let out = run_script(
            &vm,
            &script,
            &["--download-only", into.to_str().unwrap()],
            &[("TMPDIR", &tmp), ("GANGPLANK_ROOT", &gangplank_root)],
        );
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{format}: {stderr}");
        let file = package_for(format);
        let got = std::fs::read(into.join(file)).unwrap_or_else(|e| panic!("{file}: {e}; {stderr}"));
        assert!(
            got == bytes_of(file),
            "{file}: the downloaded bytes differ from the package's"
        );
        assert_eq!(
            std::fs::read_to_string(into.join("SHA256SUMS")).unwrap(),
            format!("{}  {file}\n", sha256(&got))
        );
        let mut listed: Vec<_> = std::fs::read_dir(&into)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        listed.sort();
        assert_eq!(listed, ["SHA256SUMS", file]);
        assert!(
            stderr.contains(&format!("{file}: OK")),
            "sha256sum -c ran: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
        assert!(!stderr.contains(secret), "the token was shown: {stderr}");
        // Nothing else was written: no configuration, no work folder left behind.
        assert!(is_empty_dir(&gangplank_root), "wrote below GANGPLANK_ROOT");
        assert!(is_empty_dir(&tmp), "left its work folder");
        assert!(is_empty_dir(&vm.join("etc")));
    }
}

/// A folder of symlinks to every tool the script's `--download-only` mode may use, but curl.
fn path_without_curl(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let system = std::env::var_os("PATH").unwrap();
    for tool in [
        "sh",
        "uname",
        "mktemp",
        "rm",
        "wc",
        "cat",
        "sha256sum",
        "mkdir",
        "mv",
        "wget",
        "id",
        "dirname",
    ] {
        let found = std::env::split_paths(&system)
            .map(|d| d.join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} is not installed"));
        std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
    }
    bin
}

#[test]
fn download_only_uses_wget_when_there_is_no_curl() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let endpoint = serve(&root.join("endpoint"), &["localhost"]);
    let script = script(&[
        "--endpoint",
        &format!("localhost:{}", endpoint.addr.port()),
        "--workload-group",
        "bookinfo/ratings",
        "--ca-bundle",
        endpoint.ca.to_str().unwrap(),
        "--format",
        "deb",
    ]);
    let bin = path_without_curl(root);
    let into = root.join("downloaded");
    let out = run_script(
        root,
        &script,
        &["--download-only", into.to_str().unwrap()],
        &[("PATH", &bin)],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let file = package_for("deb");
    assert!(std::fs::read(into.join(file)).unwrap() == bytes_of(file));

    // And wget refuses an endpoint its CA bundle does not trust, too.
    let other = gangplank_tls::dev::Ca::generate("not the endpoint's").unwrap();
    write(&root.join("other-ca.pem"), other.cert_pem());
    let script = script_for(&endpoint, &root.join("other-ca.pem"), &[]);
    let into = root.join("refused");
    let out = run_script(
        root,
        &script,
        &["--download-only", into.to_str().unwrap()],
        &[("PATH", &bin)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!into.exists());
}

fn script_for(endpoint: &Serving, ca: &Path, extra: &[&str]) -> String {
    let address = format!("localhost:{}", endpoint.addr.port());
    let mut args = vec![
        "--endpoint",
        &address,
        "--workload-group",
        "bookinfo/ratings",
        "--ca-bundle",
        ca.to_str().unwrap(),
        "--format",
        "rpm",
    ];
    args.extend_from_slice(extra);
    script(&args)
}

#[test]
fn an_endpoint_the_ca_bundle_does_not_trust_is_refused_and_nothing_is_downloaded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let endpoint = serve(&root.join("endpoint"), &["localhost"]);
    let other = gangplank_tls::dev::Ca::generate("not the endpoint's").unwrap();
    write(&root.join("other-ca.pem"), other.cert_pem());
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    let script = script_for(&endpoint, &root.join("other-ca.pem"), &[]);
    let into = root.join("downloaded");
    let out = run_script(
        root,
        &script,
        &["--download-only", into.to_str().unwrap()],
        &[("TMPDIR", &tmp)],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "gangplank install: error: cannot fetch https://localhost:{}/install/rpm/",
            endpoint.addr.port()
        )),
        "{stderr}"
    );
    // curl's own reason, above ours.
    assert!(
        stderr.contains("SSL certificate problem") || stderr.contains("certificate"),
        "{stderr}"
    );
    assert!(!into.exists(), "created the download folder");
    assert!(is_empty_dir(&tmp), "left its work folder");

    // The same script with the endpoint's CA works: the refusal was the CA's doing.
    let script = script_for(&endpoint, &endpoint.ca, &[]);
    let out = run_script(
        root,
        &script,
        &["--download-only", into.to_str().unwrap()],
        &[("TMPDIR", &tmp)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn with_sni_the_certificate_is_checked_under_that_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Not issued for localhost, the address the script connects to.
    let endpoint = serve(&root.join("endpoint"), &[CORP]);

    let into = root.join("without-sni");
    let out = run_script(
        root,
        &script_for(&endpoint, &endpoint.ca, &[]),
        &["--download-only", into.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!into.exists());

    let into = root.join("with-sni");
    let out = run_script(
        root,
        &script_for(&endpoint, &endpoint.ca, &["--sni", CORP]),
        &["--download-only", into.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let file = package_for("rpm");
    assert!(std::fs::read(into.join(file)).unwrap() == bytes_of(file));
}
