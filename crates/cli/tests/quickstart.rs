//! `gangplank quickstart` as a new user runs it: onboard, show, Ctrl-C or SIGTERM leaves;
//! one quickstart at a time per folder.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use gangplank_testkit::process::{Proc, alive, until};
use support::gangplank_command;

/// A quickstart that has onboarded, with the pid of its stand-in sidecar.
struct Running {
    qs: Proc,
    state: PathBuf,
    standin: u32,
}

fn start(state: &Path) -> Running {
    let mut cmd = gangplank_command(&["quickstart", "--port", "0", "--dir"]);
    cmd.arg(state);
    let mut qs = Proc::spawn("quickstart", cmd);
    qs.wait_for("Press Ctrl-C to leave the mesh", Duration::from_secs(60));
    let standin = qs.wait_for(
        r"\[stand-in sidecar\] started \(pid (\d+)\)",
        Duration::from_secs(10),
    );
    let standin: u32 = standin.parse().unwrap();
    assert!(alive(standin));
    Running {
        qs,
        state: state.to_path_buf(),
        standin,
    }
}

/// The WorkloadEntry files in the quickstart's registry.
fn entries(state: &Path) -> usize {
    std::fs::read_dir(state.join("registry/bookinfo/workloadentries"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "yaml")
        })
        .count()
}

/// Every file below `dir` with its bytes, but the agent's status file, which the running
/// quickstart's own agent rewrites whenever its state changes (at most once a second).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    support::walk(dir, &mut files);
    files.retain(|p| !p.ends_with("var/lib/gangplank/status.json"));
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_default();
            (p, bytes)
        })
        .collect()
}

/// Sends `signal`; the quickstart leaves the mesh, stops the stand-in sidecar and exits 0.
fn stop(mut running: Running, signal: &str) {
    running.qs.signal(signal);
    let status = running.qs.wait_exit(Duration::from_secs(30));
    let out = running.qs.output();
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("removed"), "{out}");
    assert_eq!(entries(&running.state), 0, "the entry is removed");
    assert!(
        until(Duration::from_secs(5), || (!alive(running.standin)).then_some(())).is_some(),
        "the stand-in sidecar stopped"
    );
}

#[test]
fn quickstart_onboards_shows_the_entry_and_leaves_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(&dir.path().join("qs"));
    let out = running.qs.output();
    assert!(
        out.contains("Onboarded. WorkloadEntry bookinfo/ratings-token-"),
        "{out}"
    );
    assert!(out.contains("STAND-IN"), "says the sidecar is a stand-in: {out}");
    for file in [
        "cluster.env",
        "mesh.yaml",
        "root-cert.pem",
        "istio-token",
        "hosts",
    ] {
        assert!(out.contains(file), "{file} listed: {out}");
    }
    assert!(out.contains("istio-token    0600"), "{out}");
    assert_eq!(entries(&running.state), 1);
    stop(running, "INT");
}

#[test]
fn quickstart_leaves_on_sigterm_like_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(&dir.path().join("qs"));
    assert_eq!(entries(&running.state), 1);
    stop(running, "TERM");
}

/// SIGTERM as soon as the entry is written, when the agent may not yet have the answer to
/// its Onboard call: the quickstart still ends with no entry in its registry.
#[test]
fn a_signal_while_the_agent_onboards_leaves_no_entry() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("qs");
    let mut cmd = gangplank_command(&["quickstart", "--port", "0", "--dir"]);
    cmd.arg(&state);
    let mut qs = Proc::spawn("quickstart", cmd);
    let written = until(Duration::from_secs(60), || {
        std::fs::read_dir(state.join("registry/bookinfo/workloadentries"))
            .ok()
            .and_then(|mut d| d.next())
    });
    assert!(written.is_some(), "no entry written:\n{}", qs.output());
    qs.signal("TERM");
    let status = qs.wait_exit(Duration::from_secs(30));
    let out = qs.output();
    assert!(status.success(), "{status:?}\n{out}");
    assert_eq!(entries(&state), 0, "no entry is left:\n{out}");
}

#[test]
fn a_second_quickstart_on_the_same_dir_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("qs");
    let first = start(&state);
    let before = snapshot(&state);
    assert!(
        before
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("/workloadentries/")),
        "{before:#?}"
    );

    let mut cmd = gangplank_command(&["quickstart", "--port", "0", "--dir"]);
    cmd.arg(&state);
    let mut second = Proc::spawn("second quickstart", cmd);
    let status = second.wait_exit(Duration::from_secs(10));
    let out = second.output();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "another gangplank quickstart is using {} (pid {}); stop it or pick another --dir",
            state.display(),
            first.qs.pid()
        )),
        "{out}"
    );
    assert_eq!(snapshot(&state), before, "the second quickstart changed nothing");
    stop(first, "INT");

    // The lock goes with the quickstart that held it: the folder can be used again.
    let again = start(&state);
    stop(again, "TERM");
}

#[test]
fn quickstart_refuses_to_clear_a_folder_it_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
    let out = gangplank_command(&["quickstart", "--port", "0", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was not made by gangplank quickstart"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
        "keep me"
    );
}
