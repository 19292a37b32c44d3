//! `gangplank sidecar-bootstrap` end to end: the real binary against real OpenSSH `sshd`s on
//! loopback (testkit::sshd), with entries from `-f` files and from the Kubernetes API
//! stand-in (testkit::kube_api, a test double of the API server).

mod support;

use std::path::Path;
use std::process::Output;

use gangplank_testkit::kube_api;
use gangplank_testkit::sshd::{Fleet, Vm};
use serde_json::{Value, json};
use support::{gangplank, gangplank_command, text};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.sig";
const ROOT_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

fn config_dir(vm: &Vm) -> String {
    vm.root.join("etc/istio-proxy").display().to_string()
}

fn entry(vm: &Vm, name: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {
            "name": name,
            "namespace": "bookinfo",
            "labels": {"fleet": "test"},
            "annotations": {
                "sidecar-bootstrap.istio.io/ssh-host": vm.addr.to_string(),
                "sidecar-bootstrap.istio.io/ssh-port": vm.port.to_string(),
                "sidecar-bootstrap.istio.io/ssh-user": "root",
                "sidecar-bootstrap.istio.io/proxy-config-dir": config_dir(vm),
                "sidecar-bootstrap.istio.io/proxy-image-hub": "docker.io/tetrate",
            },
        },
        "spec": {
            "address": "10.128.0.2",
            "labels": {"app": "ratings", "version": "v3"},
            "serviceAccount": "bookinfo-ratings",
        },
    })
}

/// Writes entries (one JSON document per file) plus token and root cert into `dir`.
fn write_inputs(dir: &Path, entries: &[Value]) {
    let wl = dir.join("entries");
    std::fs::create_dir_all(&wl).expect("mkdir");
    for e in entries {
        let name = e["metadata"]["name"].as_str().expect("name");
        std::fs::write(wl.join(format!("{name}.json")), e.to_string()).expect("write entry");
    }
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).expect("token");
    std::fs::write(dir.join("root-cert.pem"), ROOT_CERT).expect("cert");
    std::fs::write(dir.join("mesh.yaml"), "trustDomain: cluster.local\n").expect("mesh");
}

fn push_from_files(fleet: &Fleet, dir: &Path, extra: &[&str]) -> Output {
    gangplank_command(&[])
        .arg("sidecar-bootstrap")
        .arg("-f")
        .arg(dir.join("entries"))
        .arg("--token")
        .arg(dir.join("token"))
        .arg("--root-cert")
        .arg(dir.join("root-cert.pem"))
        .arg("--mesh-config")
        .arg(dir.join("mesh.yaml"))
        .arg("--ssh-config")
        .arg(fleet.ssh_config())
        .args(["--start-istio-proxy", "--proxy-tag", "1.27.1", "--timeout", "20s"])
        .args(extra)
        .output()
        .expect("run gangplank")
}

#[test]
fn dry_run_prints_every_step_in_order_and_touches_no_host() {
    let fleet = Fleet::start(2).expect("fleet");
    let dir = tempfile::tempdir().expect("tempdir");
    write_inputs(
        dir.path(),
        &[
            entry(&fleet.vms[0], "ratings-a"),
            entry(&fleet.vms[1], "ratings-b"),
        ],
    );

    let out = push_from_files(&fleet, dir.path(), &["--all", "--dry-run"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let vm = &fleet.vms[0];
    let d = config_dir(vm);
    let expected_order = [
        "# workload entry bookinfo/ratings-a".to_string(),
        format!("[SSH client] going to connect to root@{}", vm.endpoint()),
        format!("[SSH client] going to execute a command remotely: mkdir -p {d}"),
        format!(
            "[SSH client] going to copy into a remote file: {d}/sidecar.env (mode 0644)\nJWT_POLICY=third-party-jwt\n"
        ),
        format!("[SSH client] going to copy into a remote file: {d}/istio-ca.pem (mode 0644)\n{ROOT_CERT}"),
        format!("[SSH client] going to copy into a remote file: {d}/istio-token (mode 0600)\n<redacted"),
        "[SSH client] going to execute a command remotely: docker rm --force istio-proxy".to_string(),
        format!(
            "[SSH client] going to execute a command remotely: docker run -d --name istio-proxy --restart unless-stopped --network host -v {d}/istio-ca.pem:/var/run/secrets/istio/root-cert.pem"
        ),
        "[SSH client] going to close connection".to_string(),
        "# workload entry bookinfo/ratings-b".to_string(),
        format!(
            "[SSH client] going to connect to root@{}",
            fleet.vms[1].endpoint()
        ),
    ];
    let mut at = 0;
    for want in &expected_order {
        let found = stdout[at..]
            .find(want.as_str())
            .unwrap_or_else(|| panic!("missing (in order) {want:?} in:\n{stdout}"));
        at += found + want.len();
    }
    assert!(!stdout.contains(TOKEN), "token redacted:\n{stdout}");
    for vm in &fleet.vms {
        assert_eq!(
            vm.connections(),
            0,
            "dry run opened no SSH connection:\n{}",
            vm.log()
        );
        assert!(!vm.root.join("etc/istio-proxy").exists());
        assert!(vm.commands().is_empty());
    }

    let out = push_from_files(
        &fleet,
        dir.path(),
        &["ratings-a.bookinfo", "--dry-run", "--show-secrets"],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains(&format!("{d}/istio-token (mode 0600)\n{TOKEN}\n")),
        "{stdout}"
    );
    assert!(!stdout.contains("ratings-b"), "only the named entry: {stdout}");
    assert_eq!(fleet.vms[0].connections(), 0);
}

#[test]
fn pushes_to_every_host_and_reports_json() {
    let fleet = Fleet::start(3).expect("fleet");
    let dir = tempfile::tempdir().expect("tempdir");
    let entries: Vec<Value> = fleet
        .vms
        .iter()
        .enumerate()
        .map(|(i, vm)| entry(vm, &format!("vm-{i}")))
        .collect();
    write_inputs(dir.path(), &entries);

    let out = push_from_files(
        &fleet,
        dir.path(),
        &["-l", "fleet=test", "-o", "json", "--concurrency", "2"],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["succeeded"], 3);
    assert_eq!(report["failed"], 0);
    let hosts = report["hosts"].as_array().expect("hosts");
    assert_eq!(hosts[0]["entry"], "bookinfo/vm-0");
    assert_eq!(hosts[0]["host"], format!("root@{}", fleet.vms[0].endpoint()));
    assert_eq!(hosts[0]["ok"], true);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "bookinfo/vm-1: [SSH client] copying into a remote file: {}/istio-token",
            config_dir(&fleet.vms[1])
        )),
        "present-tense steps on stderr with -o json:\n{stderr}"
    );
    assert!(!stderr.contains(TOKEN));
    for vm in &fleet.vms {
        let token = vm.root.join("etc/istio-proxy/istio-token");
        assert_eq!(
            std::fs::read_to_string(&token).expect("token"),
            TOKEN,
            "trailing newline trimmed"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let cmds = vm.commands();
        assert_eq!(cmds.len(), 2, "{cmds:?}");
        assert_eq!(cmds[1].last().map(String::as_str), Some("sidecar"));
        assert!(cmds[1].contains(&"docker.io/tetrate/proxyv2:1.27.1".to_string()));
    }
}

#[test]
fn each_failure_stays_with_its_host() {
    let mut fleet = Fleet::start(5).expect("fleet");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut missing = entry(&fleet.vms[3], "no-address");
    missing["metadata"]["annotations"]
        .as_object_mut()
        .expect("annotations")
        .remove("sidecar-bootstrap.istio.io/ssh-host");
    missing["spec"].as_object_mut().expect("spec").remove("address");
    write_inputs(
        dir.path(),
        &[
            entry(&fleet.vms[0], "a-good"),
            entry(&fleet.vms[1], "b-unreachable"),
            entry(&fleet.vms[2], "c-bad-key"),
            missing,
            entry(&fleet.vms[4], "e-forged-host-key"),
        ],
    );
    fleet.vms[1].stop();
    fleet.refuse_client_key(2).expect("refuse");
    fleet.forge_host_key(4).expect("forge");

    let out = push_from_files(&fleet, dir.path(), &["--all", "-n", "bookinfo"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", text(&out.stderr));
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.contains(&format!("bookinfo/{name} ")))
            .unwrap_or_else(|| panic!("no summary row for {name}:\n{stdout}"))
            .to_string()
    };
    assert!(row("a-good").contains(" ok "), "{stdout}");
    let r = row("b-unreachable");
    assert!(r.contains("FAILED") && r.contains("unreachable"), "{r}");
    let r = row("c-bad-key");
    assert!(r.contains("FAILED") && r.contains("key was refused"), "{r}");
    let r = row("no-address");
    assert!(
        r.contains("FAILED") && r.contains("sidecar-bootstrap.istio.io/ssh-host"),
        "missing annotation named: {r}"
    );
    let r = row("e-forged-host-key");
    assert!(r.contains("FAILED") && r.contains("host key"), "{r}");
    assert!(stdout.contains("5 host(s): 1 succeeded, 4 failed"), "{stdout}");

    assert!(fleet.vms[0].root.join("etc/istio-proxy/istio-token").exists());
    assert_eq!(fleet.vms[0].commands().len(), 2);
    for i in [2, 3, 4] {
        assert!(
            !fleet.vms[i].root.join("etc/istio-proxy").exists(),
            "vm{i} untouched"
        );
        assert!(fleet.vms[i].commands().is_empty());
        assert_eq!(fleet.vms[i].logins(), 0);
    }
    assert_eq!(
        fleet.vms[3].connections(),
        0,
        "the entry without an address was never contacted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_token_and_certificate_from_the_cluster() {
    let fleet = Fleet::start(1).expect("fleet");
    let vm = &fleet.vms[0];
    let api = kube_api::Server::start().await.expect("kube stand-in");
    api.install_istio_crds(&["v1"]).expect("crds");
    api.seed(entry(vm, "ratings-vm")).expect("entry");
    let mut other = entry(vm, "elsewhere");
    other["metadata"]["namespace"] = json!("other");
    api.seed(other).expect("entry in another namespace");
    api.seed(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "bookinfo-ratings", "namespace": "bookinfo"}}))
        .expect("sa");
    api.seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio-ca-root-cert", "namespace": "istio-system"},
        "data": {"root-cert.pem": ROOT_CERT}}))
        .expect("root cert");
    api.seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": "trustDomain: cluster.local\ndefaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n"}}))
        .expect("mesh");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.write_kubeconfig(dir.path()).expect("kubeconfig");

    let ssh_config = fleet.ssh_config();
    let out = tokio::task::spawn_blocking(move || {
        gangplank_command(&[])
            .env("KUBECONFIG", kubeconfig)
            .args(["sidecar-bootstrap", "--all", "-n", "bookinfo", "--duration", "1h"])
            .arg("--ssh-config")
            .arg(ssh_config)
            .output()
            .expect("run gangplank")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("1 host(s): 1 succeeded, 0 failed"),
        "only bookinfo's entry: {stdout}"
    );

    let d = vm.root.join("etc/istio-proxy");
    let token = std::fs::read_to_string(d.join("istio-token")).expect("token");
    // The pushed token is the one the API server minted: audience istio-ca, 1h.
    let payload = token.split('.').nth(1).expect("jwt payload");
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64"),
    )
    .expect("claims");
    assert_eq!(claims["aud"], json!(["istio-ca"]));
    assert_eq!(claims["sub"], "system:serviceaccount:bookinfo:bookinfo-ratings");
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        3600
    );
    assert_eq!(
        std::fs::read_to_string(d.join("istio-ca.pem")).expect("ca"),
        ROOT_CERT
    );
    let env = std::fs::read_to_string(d.join("sidecar.env")).expect("env");
    assert!(env.contains("\nCA_ADDR=istiod.istio-system.svc:15012\n"), "{env}");
    assert!(env.ends_with("\nISTIO_META_MESH_ID=cluster.local"), "{env}");
    assert!(vm.commands().is_empty(), "no --start-istio-proxy, no commands");
}

#[test]
fn dry_run_of_the_systemd_runtime_shows_modes_owner_and_the_hosts_block() {
    let fleet = Fleet::start(1).expect("fleet");
    let dir = tempfile::tempdir().expect("tempdir");
    write_inputs(dir.path(), &[entry(&fleet.vms[0], "ratings-a")]);
    let out = push_from_files(
        &fleet,
        dir.path(),
        &[
            "--all",
            "--dry-run",
            "--proxy-runtime",
            "systemd",
            "--ingress-ip",
            "203.0.113.10",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for (path, mode) in [
        ("/var/lib/istio/envoy/cluster.env", "0644"),
        ("/etc/istio/config/mesh", "0644"),
        ("/etc/certs/root-cert.pem", "0644"),
        ("/var/run/secrets/tokens/istio-token", "0600"),
    ] {
        let line = format!(
            "[SSH client] going to copy into a remote file: {path} (mode {mode}, owner istio-proxy if that user exists)\n"
        );
        assert!(stdout.contains(&line), "missing {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains(
            "block of a remote file: /etc/hosts\n# BEGIN gangplank sidecar-bootstrap\n203.0.113.10 istiod.istio-system.svc\n# END gangplank sidecar-bootstrap\n"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains(TOKEN), "token still redacted:\n{stdout}");
    assert_eq!(fleet.vms[0].connections(), 0);

    // The docker runtime has no hosts file to write: said, not ignored.
    let out = push_from_files(
        &fleet,
        dir.path(),
        &["--all", "--dry-run", "--ingress-ip", "203.0.113.10"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--proxy-runtime systemd"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_lists_every_annotation_with_its_default_and_examples() {
    let out = gangplank_command(&[])
        .args(["sidecar-bootstrap", "--help"])
        .output()
        .expect("run gangplank");
    let help = text(&out.stdout);
    assert!(out.status.success(), "{help}");
    for a in gangplank_push::target::annotation::ALL {
        assert!(help.contains(a.name), "annotation {} missing:\n{help}", a.name);
        assert!(
            help.contains(&format!("default: {}", a.default)),
            "default of {} missing:\n{help}",
            a.name
        );
    }
    for want in [
        "Examples:",
        "gangplank sidecar-bootstrap --all -n bookinfo",
        "--connect-timeout <DURATION>",
        "[default: 10s]",
        "[default: 1m]",
        "--concurrency <N>",
        "[default: 64]",
        "mode",
        "Exit status",
    ] {
        assert!(help.contains(want), "{want:?} missing:\n{help}");
    }

    let out = gangplank_command(&[])
        .args(["sidecar-bootstrap", "-h"])
        .output()
        .expect("run gangplank");
    let short = text(&out.stdout);
    assert!(out.status.success());
    assert!(!short.contains("Annotations"), "-h stays short:\n{short}");

    // What the help says of exit statuses.
    let out = gangplank(&["sidecar-bootstrap", "--all", "--concurrency", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = gangplank(&["sidecar-bootstrap", "--all", "--connect-timeout", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = gangplank(&["sidecar-bootstrap", "-f", "/nonexistent/entries", "--all"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(short.lines().count() * 2 < help.lines().count(), "{short}");
}

#[test]
fn a_hung_host_fails_at_the_default_connect_timeout_not_the_step_timeout() {
    let fleet = Fleet::start(1).expect("fleet");
    let silent = gangplank_testkit::sshd::HungHost::start(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut hung = entry(&fleet.vms[0], "b-hung");
    hung["metadata"]["annotations"]["sidecar-bootstrap.istio.io/ssh-host"] = json!("127.0.0.1");
    hung["metadata"]["annotations"]["sidecar-bootstrap.istio.io/ssh-port"] = json!(silent.port.to_string());
    write_inputs(dir.path(), &[entry(&fleet.vms[0], "a-good"), hung]);

    let started = std::time::Instant::now();
    // Defaults: --timeout 60s, --connect-timeout 10s.
    let out = gangplank_command(&[])
        .arg("sidecar-bootstrap")
        .arg("-f")
        .arg(dir.path().join("entries"))
        .arg("--token")
        .arg(dir.path().join("token"))
        .arg("--root-cert")
        .arg(dir.path().join("root-cert.pem"))
        .arg("--ssh-config")
        .arg(fleet.ssh_config())
        .args(["--all", "-o", "json"])
        .output()
        .expect("run gangplank");
    let elapsed = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["succeeded"], 1, "{report}");
    let hosts = report["hosts"].as_array().expect("hosts");
    assert_eq!(hosts[1]["entry"], "bookinfo/b-hung");
    let err = hosts[1]["error"].as_str().expect("error");
    assert!(err.contains("no SSH session within 10s"), "{err}");
    let ms = hosts[1]["durationMs"].as_u64().expect("duration");
    assert!(
        (9_000..16_000).contains(&ms),
        "failed after {ms} ms; the connect timeout is 10 s"
    );
    assert!(elapsed < std::time::Duration::from_secs(30), "{elapsed:?}");
    assert!(fleet.vms[0].root.join("etc/istio-proxy/istio-token").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_expansion_configmap_of_the_istio_namespace_applies_to_every_vm() {
    let fleet = Fleet::start(1).expect("fleet");
    let vm = &fleet.vms[0];
    let api = kube_api::Server::start().await.expect("kube stand-in");
    api.install_istio_crds(&["v1"]).expect("crds");
    api.seed(entry(vm, "ratings-vm")).expect("entry");
    api.seed(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "bookinfo-ratings", "namespace": "bookinfo"}}))
        .expect("sa");
    api.seed(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "istio-system",
            "annotations": {"sidecar-bootstrap.istio.io/mesh-expansion-configmap": "vm-proxies"}}}))
        .expect("namespace");
    api.seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "vm-proxies", "namespace": "istio-system"},
        "data": {"PROXY_CONFIG": "discoveryAddress: istiod.mesh.example.com:15012\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"}}))
        .expect("expansion");
    api.seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio-ca-root-cert", "namespace": "istio-system"},
        "data": {"root-cert.pem": ROOT_CERT}}))
        .expect("root cert");
    api.seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": "trustDomain: cluster.local\ndefaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n"}}))
        .expect("mesh");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.write_kubeconfig(dir.path()).expect("kubeconfig");
    let ssh_config = fleet.ssh_config();
    let out = tokio::task::spawn_blocking(move || {
        gangplank_command(&[])
            .env("KUBECONFIG", kubeconfig)
            .args(["sidecar-bootstrap", "--all", "-n", "bookinfo"])
            .arg("--ssh-config")
            .arg(ssh_config)
            .output()
            .expect("run gangplank")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let env = std::fs::read_to_string(vm.root.join("etc/istio-proxy/sidecar.env")).expect("env");
    assert!(env.contains("\nCA_ADDR=istiod.mesh.example.com:15012\n"), "{env}");
    assert!(env.lines().any(|l| l == "ISTIO_META_DNS_CAPTURE=true"), "{env}");
    assert!(
        env.contains("\"discoveryAddress\":\"istiod.mesh.example.com:15012\""),
        "{env}"
    );
}
