//! Every binary's commands with a stdout whose reader is gone (`gangplank ... | head -1`):
//! they end quietly with exit code 141 instead of panicking ("failed printing to stdout");
//! the quickstart carries on and still leaves the mesh on Ctrl-C.

mod support;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use gangplank_testkit::process::{bin, until};
use support::{gangplank_command, text, write};

/// How a shell sees a tool killed by SIGPIPE.
const CLOSED: i32 = 141;

/// Runs `cmd` with stdout a pipe whose read end is closed before it starts, so every write
/// fails with EPIPE, whatever the timing; returns its status and stderr.
fn run_closed(mut cmd: Command) -> (ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    cmd.stdin(Stdio::null()).stdout(writer).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    // Dropping `cmd` closes our copy of the write end.
    drop(cmd);
    let exited = until(Duration::from_secs(30), || child.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait");
    assert!(exited.is_some(), "did not exit within 30s: {}", text(&out.stderr));
    (out.status, text(&out.stderr))
}

#[track_caller]
fn assert_quiet(what: &str, (status, stderr): (ExitStatus, String)) {
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    assert!(!stderr.contains("error"), "{what} complained:\n{stderr}");
    assert_eq!(status.code(), Some(CLOSED), "{what}: {status:?}\n{stderr}");
}

#[test]
fn gangplank_commands_end_quietly() {
    assert_quiet(
        "install crds",
        run_closed(gangplank_command(&["install", "crds"])),
    );
    assert_quiet(
        "workload group create",
        run_closed(gangplank_command(&[
            "workload", "group", "create", "--name", "ratings", "-n", "bookinfo",
        ])),
    );
    // Help is clap's, which already ignores a closed stdout.
    let (status, stderr) = run_closed(gangplank_command(&["--help"]));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn token_create_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    gangplank_registry::dir::Registry::open(&registry)
        .unwrap()
        .put(&support::group("bookinfo", "ratings", &[("app", "ratings")]))
        .await
        .unwrap();
    let mut cmd = gangplank_command(&[
        "token",
        "create",
        "--workload-group",
        "bookinfo/ratings",
        "--registry",
    ]);
    cmd.arg(&registry);
    assert_quiet("token create", run_closed(cmd));
}

#[test]
fn sidecar_bootstrap_dry_run_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let entry = serde_json::json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {
            "name": "ratings-a",
            "namespace": "bookinfo",
            "annotations": {"sidecar-bootstrap.istio.io/ssh-user": "root"},
        },
        "spec": {"address": "127.0.0.1", "serviceAccount": "ratings"},
    });
    write(&d.join("entries/ratings-a.json"), &entry.to_string());
    write(&d.join("token"), "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0.sig\n");
    write(
        &d.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n",
    );
    write(&d.join("mesh.yaml"), "trustDomain: cluster.local\n");
    let mut cmd = gangplank_command(&["sidecar-bootstrap", "--all", "--dry-run", "-f"]);
    cmd.arg(d.join("entries"))
        .arg("--token")
        .arg(d.join("token"))
        .arg("--root-cert")
        .arg(d.join("root-cert.pem"))
        .arg("--mesh-config")
        .arg(d.join("mesh.yaml"))
        .args(["--start-istio-proxy", "--proxy-tag", "1.27.1"]);
    assert_quiet("sidecar-bootstrap --dry-run", run_closed(cmd));
}

#[test]
fn agent_config_commands_end_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent.yaml");
    write(&agent, "");
    let onboarding = dir.path().join("onboarding.yaml");
    write(
        &onboarding,
        "apiVersion: onboarding.gangplank.dev/v1alpha1\nkind: OnboardingConfiguration\nonboardingEndpoint: {host: 127.0.0.1}\nworkloadGroup: {namespace: bookinfo, name: ratings}\n",
    );
    for action in ["print", "check"] {
        let mut cmd = Command::new(bin("gangplank-agent"));
        cmd.arg("--onboarding-config")
            .arg(&onboarding)
            .arg("--agent-config")
            .arg(&agent)
            .args(["config", action]);
        assert_quiet(&format!("gangplank-agent config {action}"), run_closed(cmd));
    }
}

#[test]
fn endpoint_config_print_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("registry")).unwrap();
    write(
        &d.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    );
    let config = d.join("endpoint.yaml");
    write(
        &config,
        &format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: closed-stdout
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
tls: {{dev: true}}
registry: {{directory: {d}/registry}}
stateDir: {d}/state
mesh: {{rootCertFile: {d}/root-cert.pem}}
identities: {{joinTokens: true}}
",
            d = d.display()
        ),
    );
    let mut cmd = Command::new(bin("gangplank-endpoint"));
    cmd.arg("--config").arg(&config).arg("config-print");
    assert_quiet("gangplank-endpoint config-print", run_closed(cmd));
}

/// The WorkloadEntry files of the quickstart in `state`.
fn entries(state: &Path) -> usize {
    std::fs::read_dir(state.join("registry/bookinfo/workloadentries"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn quickstart_carries_on_without_stdout_and_leaves_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("qs");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut cmd = gangplank_command(&["quickstart", "--port", "0", "--dir"]);
    cmd.arg(&state)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    drop(cmd);
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let stderr = stderr.clone();
        let pipe = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok) {
                let mut all = stderr.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        })
    };
    // Its stdout is gone, so wait for what it does: an entry, and the sidecar it started.
    let onboarded = until(Duration::from_secs(60), || {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Some(false);
        }
        let started = stderr.lock().unwrap().contains("[stand-in sidecar] started");
        (started && entries(&state) == 1).then_some(true)
    });
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        let _ = Command::new("kill").args([sig, &pid]).status();
    };
    if onboarded != Some(true) {
        signal("-KILL");
    } else {
        signal("-INT");
    }
    let exited = until(Duration::from_secs(30), || child.try_wait().ok().flatten());
    if exited.is_none() {
        signal("-KILL");
    }
    let status = child.wait().expect("wait");
    reader.join().expect("stderr reader");
    let stderr = stderr.lock().unwrap().clone();
    assert_eq!(
        onboarded,
        Some(true),
        "the quickstart onboarded without stdout:\n{stderr}"
    );
    assert!(exited.is_some(), "it left on Ctrl-C:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("still running: press Ctrl-C"),
        "says it once:\n{stderr}"
    );
    assert_eq!(entries(&state), 0, "the entry is removed");
}
