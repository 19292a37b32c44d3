//! No orphans: a `gangplank-agent` process killed with SIGKILL takes its sidecar (the
//! `process` launcher's child) with it, and the agent started after it stops a sidecar that
//! survived anyway before starting its own.

mod support;

use std::time::Duration;

use gangplank_testkit::process::{alive, until};
use support::*;

/// Kills the listed processes when the test ends, passed or not, so a sidecar that ignores
/// SIGTERM never outlives a failed test.
struct Reap(Vec<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

async fn mesh_with_tokens() -> (Mesh, String) {
    let mesh = Mesh::start(Options::default()).await;
    mesh.registry
        .put(&policy("bookinfo", "allow", vec![join_tokens()], &[]))
        .await
        .unwrap();
    let token = mesh.join_token("ratings", 5, Duration::from_secs(3600)).await;
    (mesh, token)
}

/// The pid the VM's sidecar wrote, once it is not `previous`.
fn sidecar_pid(vm: &Vm, previous: Option<u32>) -> u32 {
    until(WAIT, || {
        vm.read("sidecar.pid")
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|p| Some(*p) != previous)
    })
    .unwrap_or_else(|| panic!("no (new) sidecar started; agent output:\n{}", vm.agent.output()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_agent_takes_its_sidecar_with_it() {
    let (mesh, token) = mesh_with_tokens().await;
    let mut vm = Vm::start(&mesh, "k", Credential::JoinToken(token));
    let sidecar = sidecar_pid(&vm, None);
    let _reap = Reap(vec![sidecar]);
    assert!(alive(sidecar));

    vm.agent.signal("KILL");
    vm.agent.wait_exit(WAIT);
    assert!(
        until(Duration::from_secs(10), || (!alive(sidecar)).then_some(())).is_some(),
        "the sidecar (pid {sidecar}) outlived its SIGKILLed agent; agent output:\n{}",
        vm.agent.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_stops_the_sidecar_its_killed_predecessor_left() {
    let (mesh, token) = mesh_with_tokens().await;
    // A sidecar deaf to SIGTERM survives its agent's death; the next agent must stop it.
    let deaf = "trap '' TERM; echo $$ > sidecar.pid.tmp && mv sidecar.pid.tmp sidecar.pid; exec sleep 3600";
    let mut vm = Vm::start_sidecar(&mesh, "r", Credential::JoinToken(token), deaf);
    let first = sidecar_pid(&vm, None);
    let mut reap = Reap(vec![first]);
    // The agent records the pid just after the spawn returns; the sidecar may write its own
    // first. Kill the agent only once the record is there (what this test is about).
    let recorded = until(WAIT, || {
        vm.read("/var/run/gangplank/sidecar.pid")
            .filter(|t| t.split_whitespace().next() == Some(first.to_string().as_str()))
    });
    assert!(recorded.is_some(), "the agent never recorded its sidecar's pid");

    vm.agent.signal("KILL");
    vm.agent.wait_exit(WAIT);
    assert!(
        alive(first),
        "the deaf sidecar is left running, as a real one could be"
    );

    let killed = vm.restart_agent();
    let second = sidecar_pid(&vm, Some(first));
    reap.0.push(second);
    assert!(
        !alive(first),
        "the leftover sidecar (pid {first}) was stopped before pid {second} started; agent output:\n{}",
        vm.agent.output()
    );
    let out = vm.agent.output();
    assert!(
        out.contains("a sidecar started by an earlier agent is still running; stopping it"),
        "the agent says so:\n{out}"
    );
    assert!(out.contains(&format!("pid={first}")), "{out}");
    assert!(alive(second));
    drop(killed);

    // A clean stop still works with the deaf sidecar: SIGKILL after stopTimeout.
    vm.agent.signal("TERM");
    let status = vm.agent.wait_exit(WAIT);
    assert!(status.success(), "{status:?}\n{}", vm.agent.output());
    assert!(
        until(Duration::from_secs(10), || (!alive(second)).then_some(())).is_some(),
        "the sidecar stopped with its agent"
    );
}
