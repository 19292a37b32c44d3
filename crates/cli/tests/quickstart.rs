//! `gangplank quickstart` as a new user runs it: onboard, show, Ctrl-C leaves.

mod support;

use std::time::Duration;

use gangplank_testkit::process::{Proc, alive, until};
use support::gangplank_command;

#[test]
fn quickstart_onboards_shows_the_entry_and_leaves_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("qs");
    let mut cmd = gangplank_command(&["quickstart", "--port", "0", "--dir"]);
    cmd.arg(&state);
    let mut qs = Proc::spawn("quickstart", cmd);
    qs.wait_for("Press Ctrl-C to leave the mesh", Duration::from_secs(60));
    let out = qs.output();
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
    let entries = state.join("registry/bookinfo/workloadentries");
    assert_eq!(
        std::fs::read_dir(&entries)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "yaml"))
            .count(),
        1
    );
    let standin = qs.wait_for(
        r"\[stand-in sidecar\] started \(pid (\d+)\)",
        Duration::from_secs(10),
    );
    let standin: u32 = standin.parse().unwrap();
    assert!(alive(standin));

    qs.signal("INT");
    let status = qs.wait_exit(Duration::from_secs(30));
    let out = qs.output();
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("removed"), "{out}");
    let remaining = std::fs::read_dir(&entries)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "yaml")
        })
        .count();
    assert_eq!(remaining, 0, "the entry is removed");
    assert!(
        until(Duration::from_secs(5), || (!alive(standin)).then_some(())).is_some(),
        "the stand-in sidecar stopped"
    );
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
