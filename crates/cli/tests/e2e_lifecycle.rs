//! End to end, real agent and endpoint processes: a VM keeps its place through crashes,
//! restarts, endpoint restarts and reboots with its bound key, and every edge of that life
//! (a copied key, a release, a deleted entry, a multi-use token, a failure on the endpoint's
//! side) does what a platform engineer expects.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use gangplank_api::binding::WorkloadBinding;
use gangplank_api::token::JoinToken;
use gangplank_api::{NamespacedName, Resource};
use gangplank_testkit::process::{alive, until};
use support::*;

/// Every file of the registry folder with its content (the lock file aside).
fn registry_files(mesh: &Mesh) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    walk(mesh.registry.root(), &mut files);
    files.retain(|p| !p.ends_with(".lock"));
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let content = std::fs::read(&p).unwrap_or_default();
            (p, content)
        })
        .collect()
}

/// Waits (bounded) until `proc` printed at least `n` lines containing `pattern`.
fn wait_lines(proc: &gangplank_testkit::process::Proc, pattern: &str, n: usize) {
    let seen = until(WAIT, || {
        (proc.output().lines().filter(|l| l.contains(pattern)).count() >= n).then_some(())
    });
    assert!(
        seen.is_some(),
        "fewer than {n} lines with {pattern:?}:\n{}",
        proc.output()
    );
}

async fn token_used(mesh: &Mesh, token: &str) -> u32 {
    let id = token.split('.').next().unwrap();
    mesh.registry
        .get::<JoinToken>(&NamespacedName::new("bookinfo", id))
        .await
        .unwrap()
        .expect("the token exists")
        .status
        .used
}

async fn bindings(mesh: &Mesh) -> Vec<WorkloadBinding> {
    mesh.registry.list::<WorkloadBinding>(None).await.unwrap()
}

/// The pid of the VM's stand-in sidecar, once it is a live process other than `not`.
fn sidecar_pid(vm: &Vm, not: Option<u32>) -> Option<u32> {
    until(WAIT, || {
        let pid: u32 = vm.read("sidecar.pid")?.trim().parse().ok()?;
        (Some(pid) != not && alive(pid)).then_some(pid)
    })
}

async fn mesh_with_token_policy() -> Mesh {
    mesh_with(Options::default()).await
}

/// A mesh whose policy lets join tokens into `bookinfo/ratings`.
async fn mesh_with(options: Options) -> Mesh {
    let mesh = Mesh::start(options).await;
    mesh.registry
        .put(&policy(
            "bookinfo",
            "allow-ratings",
            vec![join_tokens()],
            &[("app", "ratings")],
        ))
        .await
        .unwrap();
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_keeps_its_entry_through_crashes_endpoint_restarts_and_reboots_with_one_token() {
    let mut mesh = mesh_with_token_policy().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "a", Credential::JoinToken(token.clone()));
    let first = wait_onboarded(&mesh, &mut vm).await;
    let name = first.metadata.name.clone().unwrap();
    let mut pid = sidecar_pid(&vm, None).expect("the sidecar runs");
    assert_eq!(token_used(&mesh, &token).await, 1);

    // Five crashes: SIGKILL, then the agent starts again (systemd's Restart=always).
    for round in 1..=5 {
        vm.kill_agent();
        // The process launcher's sidecar dies with its agent.
        assert!(
            until(WAIT, || (!alive(pid)).then_some(())).is_some(),
            "round {round}: the sidecar outlived its SIGKILLed agent"
        );
        vm.restart_agent();
        pid = sidecar_pid(&vm, Some(pid)).unwrap_or_else(|| {
            panic!(
                "round {round}: the sidecar is not back; agent:\n{}\nendpoint:\n{}",
                vm.agent.output(),
                mesh.endpoint.output()
            )
        });
        vm.agent.wait_for("rejoining with this VM's bound key", WAIT);
        let entries = mesh.entries().await;
        assert_eq!(entries.len(), 1, "round {round}: {entries:#?}");
        assert_eq!(
            entries[0].metadata.name.as_deref(),
            Some(name.as_str()),
            "round {round}"
        );
    }

    // The endpoint restarts: the agent's stream comes back, nothing else changes.
    mesh.restart_endpoint();
    mesh.endpoint.wait_for("agent connected", WAIT);
    assert!(alive(pid), "the sidecar runs on through an endpoint restart");

    // A reboot: every process gone (the runtime folder on tmpfs too), the disk kept.
    vm.kill_agent();
    assert!(until(WAIT, || (!alive(pid)).then_some(())).is_some());
    let _ = std::fs::remove_dir_all(vm.path("/var/run"));
    vm.restart_agent();
    pid = sidecar_pid(&vm, Some(pid)).expect("the sidecar is back after the reboot");
    vm.agent.wait_for("rejoining with this VM's bound key", WAIT);

    let entries = mesh.entries().await;
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0].metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(token_used(&mesh, &token).await, 1, "no new token use, ever");
    let bound = bindings(&mesh).await;
    assert_eq!(bound.len(), 1);
    assert_eq!(bound[0].metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(bound[0].spec.credential_kind, "join-token");
    assert!(alive(pid));
}

/// The packaged unit's agent (`run --on-stop=stay`): a stop (systemctl restart, a reboot,
/// an upgrade) keeps the WorkloadEntry untouched and the next agent rejoins into it with
/// the bound key; `gangplank-agent leave` (the package's removal) deregisters with that key,
/// spends no token use, and a second `leave` has nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_stop_stay_keeps_the_entry_through_stops_and_leave_deregisters_with_the_bound_key() {
    let mut mesh = mesh_with_token_policy().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "a", Credential::JoinToken(token.clone()));
    let first = wait_onboarded(&mesh, &mut vm).await;
    let name = first.metadata.name.clone().unwrap();
    vm.kill_agent();
    vm.set_run_args(&["run", "--on-stop=stay"]);
    vm.restart_agent();
    vm.agent.wait_for("rejoining with this VM's bound key", WAIT);
    wait_lines(&mesh.endpoint, "agent connected", 2);
    let kept = mesh.entries().await;
    assert_eq!(kept.len(), 1, "{kept:#?}");
    let kept = kept.into_iter().next().unwrap();
    assert!(kept.metadata.uid.is_some(), "{kept:#?}");

    for round in 1..=2 {
        vm.agent.signal("TERM");
        let status = vm.agent.wait_exit(WAIT);
        assert!(
            status.success(),
            "round {round}: {status:?}\n{}",
            vm.agent.output()
        );
        assert!(
            vm.agent.output().contains("this VM stays registered"),
            "round {round}:\n{}",
            vm.agent.output()
        );
        assert!(
            !mesh.endpoint.output().contains("agent left"),
            "round {round}: a stop with on-stop=stay must not deregister:\n{}",
            mesh.endpoint.output()
        );
        // The same object (its uid), with the same spec: only the endpoint's note that the
        // VM disconnected may change.
        let now = mesh.entries().await;
        assert_eq!(now.len(), 1, "round {round}: {now:#?}");
        assert_eq!(
            now[0].metadata.uid, kept.metadata.uid,
            "round {round}: the entry is kept"
        );
        assert_eq!(now[0].spec, kept.spec, "round {round}");
        vm.restart_agent();
        vm.agent.wait_for("rejoining with this VM's bound key", WAIT);
        vm.agent.wait_for("onboarded", WAIT);
        let entries = mesh.entries().await;
        assert_eq!(entries.len(), 1, "round {round}: {entries:#?}");
        assert_eq!(entries[0].metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(
            entries[0].metadata.uid, kept.metadata.uid,
            "round {round}: rejoined into it"
        );
    }
    vm.agent.signal("TERM");
    assert!(vm.agent.wait_exit(WAIT).success());

    let left = vm.agent_cli(&["leave"]);
    assert!(left.status.success(), "{}", text(&left.stderr));
    assert!(
        text(&left.stderr).contains("deregistered"),
        "{}",
        text(&left.stderr)
    );
    mesh.endpoint.wait_for("agent left; entry removed", WAIT);
    assert!(mesh.entries().await.is_empty(), "leave removes the entry");
    assert_eq!(token_used(&mesh, &token).await, 1, "leave spends no token use");
    assert_eq!(vm.registered_entry(), None, "leave forgets the registration");

    let before = registry_files(&mesh);
    let again = vm.agent_cli(&["leave"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("nothing to leave"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(registry_files(&mesh), before, "a second leave writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_key_cannot_join_while_the_original_is_connected_and_a_released_vm_cannot_rejoin() {
    let mesh = mesh_with_token_policy().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut original = Vm::start(&mesh, "a", Credential::JoinToken(token.clone()));
    let entry = wait_onboarded(&mesh, &mut original).await;
    let name = entry.metadata.name.clone().unwrap();
    let pid = sidecar_pid(&original, None).expect("the sidecar runs");
    wait_lines(&mesh.endpoint, "agent connected", 1);

    // Another host with a copy of the VM's state dir (key and registration).
    let mut copy = Vm::start(&mesh, "b", Credential::JoinToken(token.clone()));
    copy.agent.wait_for("join token not accepted", WAIT);
    copy.kill_agent();
    let before = registry_files(&mesh);
    std::fs::create_dir_all(copy.state_dir()).unwrap();
    for file in ["instance-key.pem", "registration.json"] {
        std::fs::copy(original.state_dir().join(file), copy.state_dir().join(file)).unwrap();
    }
    copy.restart_agent();
    copy.agent.wait_for("held by a connected agent", WAIT);
    copy.kill_agent();
    assert!(
        copy.read("sidecar.env").is_none(),
        "the copy never starts a sidecar"
    );
    assert_eq!(registry_files(&mesh), before, "a refused copy writes nothing");
    assert!(alive(pid), "the original is undisturbed");

    // Released: the binding goes first, then the entry; the connected agent is told at
    // once, cannot rejoin (no binding, and its token is spent) and stops its sidecar.
    let root = mesh.registry.root().display().to_string();
    let out = gangplank(&[
        "instance",
        "release",
        &format!("bookinfo/{name}"),
        "--registry",
        &root,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deleted WorkloadBinding"),
        "{}",
        text(&out.stdout)
    );
    original.agent.wait_for("was deleted|no longer exists", WAIT);
    original
        .agent
        .wait_for("stopping the sidecar: its WorkloadEntry was deleted", WAIT);
    assert!(
        until(WAIT, || (!alive(pid)).then_some(())).is_some(),
        "the released VM's sidecar keeps running"
    );
    original.agent.wait_for("join token not accepted", WAIT);
    assert!(
        mesh.entries().await.is_empty(),
        "a released VM does not come back"
    );
    assert!(bindings(&mesh).await.is_empty());
    assert_eq!(token_used(&mesh, &token).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_deleted_under_a_connected_agent_comes_back_while_policy_allows_else_the_sidecar_stops() {
    let mesh = mesh_with_token_policy().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "a", Credential::JoinToken(token));
    let entry = wait_onboarded(&mesh, &mut vm).await;
    let key = entry.key();
    let pid = sidecar_pid(&vm, None).expect("the sidecar runs");
    wait_lines(&mesh.endpoint, "agent connected", 1);

    // An admin deletes the entry: the agent is told on its stream and rejoins at once.
    assert!(
        mesh.registry
            .delete::<gangplank_api::istio::WorkloadEntry>(&key)
            .await
            .unwrap()
    );
    vm.agent.wait_for("was deleted|no longer exists", WAIT);
    vm.agent.wait_for("rejoining with this VM's bound key", WAIT);
    let back = until(WAIT, || {
        let files = mesh.entry_files();
        (!files.is_empty()).then_some(files)
    });
    assert!(
        back.is_some(),
        "the entry never came back:\n{}",
        vm.agent.output()
    );
    assert_eq!(mesh.entries().await[0].key(), key);
    assert!(alive(pid), "the sidecar ran on");

    // The policy goes, then the entry: the rejoin is refused and the sidecar stops.
    assert!(
        mesh.registry
            .delete::<gangplank_api::policy::OnboardingPolicy>(&NamespacedName::new(
                "bookinfo",
                "allow-ratings"
            ))
            .await
            .unwrap()
    );
    wait_lines(&mesh.endpoint, "agent connected", 2);
    assert!(
        mesh.registry
            .delete::<gangplank_api::istio::WorkloadEntry>(&key)
            .await
            .unwrap()
    );
    vm.agent.wait_for(
        "stopping the sidecar: its WorkloadEntry was deleted and onboarding again failed",
        WAIT,
    );
    assert!(
        until(WAIT, || (!alive(pid)).then_some(())).is_some(),
        "the sidecar keeps running"
    );
    assert!(mesh.entries().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_use_token_gives_each_vm_its_own_entry_up_to_its_uses() {
    let mesh = mesh_with_token_policy().await;
    let token = mesh.join_token("ratings", 2, Duration::from_secs(3600)).await;
    let mut a = Vm::start(&mesh, "a", Credential::JoinToken(token.clone()));
    sidecar_pid(&a, None).unwrap_or_else(|| panic!("a never onboarded:\n{}", a.agent.output()));
    let mut b = Vm::start(&mesh, "b", Credential::JoinToken(token.clone()));
    sidecar_pid(&b, None).unwrap_or_else(|| panic!("b never onboarded:\n{}", b.agent.output()));
    let mut names: Vec<String> = mesh
        .entries()
        .await
        .into_iter()
        .filter_map(|e| e.metadata.name)
        .collect();
    names.sort();
    let mut registered = vec![a.registered_entry().unwrap(), b.registered_entry().unwrap()];
    registered.sort();
    assert_eq!(names, registered, "one entry per VM, each its own");
    assert_ne!(names[0], names[1]);
    assert_eq!(token_used(&mesh, &token).await, 2);

    // Both stay connected: neither stole the other's session.
    wait_lines(&mesh.endpoint, "agent connected", 2);
    assert!(a.agent.running() && b.agent.running());

    let mut c = Vm::start(&mesh, "c", Credential::JoinToken(token.clone()));
    c.agent.wait_for("join token not accepted", WAIT);
    assert_eq!(mesh.entries().await.len(), 2, "a third VM gets no entry");
    assert_eq!(token_used(&mesh, &token).await, 2);

    // Each leaves on its own.
    for vm in [&mut a, &mut b] {
        vm.agent.signal("TERM");
        assert!(vm.agent.wait_exit(WAIT).success(), "{}", vm.agent.output());
    }
    assert!(mesh.entries().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_on_the_endpoints_side_leaves_the_token_use_unspent() {
    let mesh = mesh_with_token_policy().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    // The registry cannot hold entries: where their folder goes is a file (even root
    // cannot write under it).
    let blocked = mesh.registry.root().join("bookinfo/workloadentries");
    std::fs::write(&blocked, b"").unwrap();
    let mut vm = Vm::start(&mesh, "a", Credential::JoinToken(token.clone()));
    wait_lines(&vm.agent, "Unavailable", 2);
    let registry_path = mesh.registry.root().display().to_string();
    assert!(
        !vm.agent.output().contains(&registry_path),
        "the endpoint's paths reached the agent:\n{}",
        vm.agent.output()
    );
    wait_lines(&mesh.endpoint, &registry_path, 1);
    assert_eq!(
        token_used(&mesh, &token).await,
        0,
        "a failed onboarding spent the token"
    );
    assert!(bindings(&mesh).await.is_empty());

    // The registry is fixed: the same token onboards.
    std::fs::remove_file(&blocked).unwrap();
    wait_onboarded(&mesh, &mut vm).await;
    assert_eq!(token_used(&mesh, &token).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_gone_longer_than_the_grace_period_and_the_binding_retention_needs_a_new_credential() {
    let mesh = mesh_with(Options {
        grace: "2s",
        heartbeat: "500ms",
        binding_retention: "2s",
        ..Options::default()
    })
    .await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "a", Credential::JoinToken(token.clone()));
    wait_onboarded(&mesh, &mut vm).await;
    vm.kill_agent();

    // The entry goes after the grace period; the binding is stamped, then goes too.
    let stamped = until(WAIT, || {
        let files = mesh.entry_files();
        files.is_empty().then_some(())
    });
    assert!(stamped.is_some(), "the entry outlived the grace period");
    gangplank_testkit::process::eventually(
        "the binding goes after the retention",
        WAIT,
        Duration::from_millis(50),
        || async { bindings(&mesh).await.is_empty() },
    )
    .await;
    wait_lines(&mesh.endpoint, "removed the binding of a VM gone longer", 1);

    // Back after that: the key is no longer bound and the spent token is refused.
    vm.restart_agent();
    vm.agent.wait_for("bound key not accepted", WAIT);
    vm.agent.wait_for("join token not accepted", WAIT);
    assert!(mesh.entries().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_is_stamped_when_its_entry_goes_and_unstamped_when_the_vm_rejoins() {
    let mesh = mesh_with(Options {
        grace: "2s",
        heartbeat: "500ms",
        ..Options::default()
    })
    .await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "a", Credential::JoinToken(token.clone()));
    let entry = wait_onboarded(&mesh, &mut vm).await;
    vm.kill_agent();
    gangplank_testkit::process::eventually(
        "the binding is stamped when its entry goes",
        WAIT,
        Duration::from_millis(50),
        || async {
            bindings(&mesh)
                .await
                .first()
                .is_some_and(|b| !b.status.entry_gone_since.is_empty())
        },
    )
    .await;
    assert!(mesh.entries().await.is_empty());

    // A day's retention: the VM rejoins with its key, the same entry, the stamp cleared.
    vm.restart_agent();
    vm.agent.wait_for("rejoining with this VM's bound key", WAIT);
    sidecar_pid(&vm, None).expect("the sidecar is back");
    let entries = mesh.entries().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].metadata.name, entry.metadata.name);
    let b = bindings(&mesh).await;
    assert_eq!(b.len(), 1);
    assert!(b[0].status.entry_gone_since.is_empty(), "{:?}", b[0].status);
    assert_eq!(token_used(&mesh, &token).await, 1);
}

/// A VM that stops answering (frozen: SIGSTOP) loses its stream at the heartbeat deadline
/// (three heartbeats by default: 3 s here), well before HTTP/2 keepalive would end its
/// connection (a ping after 20 s, 10 s to answer), so its entry is marked disconnected (and a
/// rejoin with its key would be taken) instead of looking connected; thawed, it reconnects
/// with its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_vm_is_marked_disconnected_at_the_heartbeat_deadline_and_reconnects_when_it_thaws() {
    let mut mesh = mesh_with_token_policy().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "a", Credential::JoinToken(token));
    wait_onboarded(&mesh, &mut vm).await;
    mesh.endpoint.wait_for("agent connected", WAIT);
    vm.agent.signal("STOP");
    let frozen = std::time::Instant::now();
    mesh.endpoint
        .wait_for("agent disconnected", Duration::from_secs(60));
    let after = frozen.elapsed();
    assert!(
        after < Duration::from_secs(9),
        "a frozen agent was noticed after {after:?}: the heartbeat deadline is 3 s (keepalive alone takes at least 10 s: a ping up to 20 s after the last, 10 s to answer)"
    );
    let entry = &mesh.entries().await[0];
    let annotations = entry.metadata.annotations.clone().unwrap_or_default();
    assert!(annotations.contains_key(gangplank_api::names::annotation::DISCONNECTED_AT));
    vm.agent.signal("CONT");
    wait_lines(&mesh.endpoint, "agent connected", 2);
}
