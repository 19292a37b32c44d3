//! On the VM: `gangplank-agent status` reads the status file the running agent keeps, and
//! `gangplank-agent doctor` checks configuration, DNS, TCP, TLS, clock, credential and the
//! endpoint's policy decision (the Check call) against a real endpoint process. Check spends
//! nothing and writes nothing: a join token keeps its uses and the registry is unchanged.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use gangplank_api::NamespacedName;
use gangplank_api::proto::{self, onboarding_client::OnboardingClient};
use gangplank_api::token::JoinToken;
use gangplank_identity::Challenge;
use gangplank_identity::bound::Key;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

/// A mesh whose policy `tokens-to-ratings` lets join tokens into `bookinfo/ratings`.
async fn mesh_allowing_tokens() -> Mesh {
    let mesh = Mesh::start(Options::default()).await;
    mesh.registry
        .put(&policy(
            "bookinfo",
            "tokens-to-ratings",
            vec![join_tokens()],
            &[("app", "ratings")],
        ))
        .await
        .unwrap();
    mesh
}

/// How many uses of join token `token` are spent.
async fn used(mesh: &Mesh, token: &str) -> u32 {
    let id = token.split('.').next().unwrap();
    let stored: JoinToken = mesh
        .registry
        .get(&NamespacedName::new("bookinfo", id))
        .await
        .unwrap()
        .expect("the token is stored");
    stored.status.used
}

/// Runs `doctor -o json`; returns its exit code and report.
fn doctor_json(run: impl Fn(&[&str]) -> Output) -> (i32, serde_json::Value) {
    let out = run(&["doctor", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor -o json is not JSON ({e}):\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    (out.status.code().expect("an exit code"), report)
}

/// The check `name` of a doctor report.
fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {report:#}"))
}

/// Each check's name and result, in order.
fn results(report: &serde_json::Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn expect_results(report: &serde_json::Value, expected: &[(&str, &str)]) {
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect();
    assert_eq!(results(report), expected, "{report:#}");
}

/// Every file below `dir` (none when it does not exist).
fn files_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// The status file of `vm`, once it exists and parses.
fn status_file(vm: &Vm) -> Option<serde_json::Value> {
    let bytes = std::fs::read(vm.state_dir().join("status.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_file_follows_a_running_agent_and_status_exits_3_once_it_stopped() {
    let mesh = mesh_allowing_tokens().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "vm-1", Credential::JoinToken(token.clone()));
    let entry = wait_onboarded(&mesh, &mut vm).await;
    let entry_name = format!("bookinfo/{}", entry.metadata.name.clone().unwrap());

    let connected = gangplank_testkit::process::until(WAIT, || {
        status_file(&vm).filter(|s| s["phase"] == "connected" && s["entry"] == entry_name.as_str())
    })
    .unwrap_or_else(|| {
        panic!(
            "the status file never said connected with {entry_name}: {:?}\nagent:\n{}",
            status_file(&vm),
            vm.agent.output()
        )
    });
    assert_eq!(connected["apiVersion"], "onboarding.gangplank.dev/v1alpha1");
    assert_eq!(connected["kind"], "AgentStatus");
    assert_eq!(connected["pid"], vm.agent.pid());
    assert_eq!(connected["endpoint"], format!("127.0.0.1:{}", mesh.addr.port()));
    assert_eq!(connected["workloadGroup"], "bookinfo/ratings");
    assert_eq!(connected["session"]["generation"], 1);
    assert_eq!(connected["session"]["replica"], "endpoint-0");
    assert_eq!(connected["sidecar"]["launcher"], "process");
    // The sidecar token's expiry is the JWT's own `exp`.
    let istio_token = vm
        .read("/var/run/secrets/tokens/istio-token")
        .expect("istio-token");
    let exp = claims_of(istio_token.trim())["exp"].as_u64().expect("exp");
    let expires = humantime::parse_rfc3339(connected["sidecarToken"]["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(
        expires.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        exp
    );
    // No secret: neither the join token (nor its secret half) nor the sidecar token.
    let raw = std::fs::read_to_string(vm.state_dir().join("status.json")).unwrap();
    let (_, secret) = token.split_once('.').unwrap();
    assert!(
        !raw.contains(secret),
        "the join token's secret is in the status file:\n{raw}"
    );
    assert!(
        !raw.contains(istio_token.trim()),
        "the sidecar token is in the status file:\n{raw}"
    );
    for part in istio_token.trim().split('.') {
        assert!(
            !raw.contains(part),
            "a part of the sidecar token is in the status file:\n{raw}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(vm.state_dir().join("status.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);

    // While it runs: exit 0, a describe-like block, and the file plus `running` as JSON.
    let out = vm.agent_cli(&["status"]);
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}{}", text(&out.stderr));
    for expected in [
        "Phase:          connected",
        entry_name.as_str(),
        "Session:        connected since",
        "Sidecar Token:  expires",
        "process launcher, running",
    ] {
        assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
    }
    let out = vm.agent_cli(&["status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["running"], true);
    assert_eq!(json["entry"], entry_name.as_str());

    // A clean stop: the final state is written, and status says it is not running.
    vm.agent.signal("TERM");
    assert!(vm.agent.wait_exit(WAIT).success(), "{}", vm.agent.output());
    let last = status_file(&vm).expect("the status file stays");
    assert_eq!(last["phase"], "stopped", "{last:#}");
    assert!(last.get("session").is_none(), "{last:#}");
    let out = vm.agent_cli(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).starts_with(&format!(
            "gangplank-agent is not running (last status from {}",
            last["updatedAt"].as_str().unwrap()
        )),
        "{}",
        text(&out.stdout)
    );
    let out = vm.agent_cli(&["status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["running"], false);
    assert_eq!(json["phase"], "stopped");

    // A crash leaves "connected" in the file: the dead pid is what says it is not running.
    vm.restart_agent();
    let pid = vm.agent.pid();
    gangplank_testkit::process::until(WAIT, || {
        status_file(&vm).filter(|s| s["phase"] == "connected" && s["pid"] == pid)
    })
    .unwrap_or_else(|| panic!("the restarted agent never connected:\n{}", vm.agent.output()));
    assert_eq!(vm.agent_cli(&["status"]).status.code(), Some(0));
    vm.kill_agent();
    assert_eq!(status_file(&vm).expect("file")["phase"], "connected");
    let out = vm.agent_cli(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("is not running"),
        "{}",
        text(&out.stdout)
    );

    // No status file at all.
    std::fs::remove_file(vm.state_dir().join("status.json")).unwrap();
    let out = vm.agent_cli(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stdout).contains("gangplank-agent is not running (no status file at"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_against_a_real_endpoint_and_spends_nothing() {
    let mesh = mesh_allowing_tokens().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let config = Vm::configure(&mesh, "vm-1", Credential::JoinToken(token.clone()));
    let before = mesh.snapshot();

    let out = config.agent_cli(&["doctor"]);
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}\n{}", text(&out.stderr));
    for name in ["config", "tcp", "tls", "clock", "credential", "policy"] {
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(&format!(" {name} "))),
            "{name} ok in:\n{shown}"
        );
    }
    assert!(shown.contains("every check passed"), "{shown}");

    let (code, report) = doctor_json(|a| config.agent_cli(a));
    assert_eq!(code, 0);
    assert_eq!(report["ok"], true);
    expect_results(
        &report,
        &[
            ("config", "ok"),
            ("dns", "skipped"), // 127.0.0.1: nothing to resolve
            ("tcp", "ok"),
            ("tls", "ok"),
            ("clock", "ok"),
            ("credential", "ok"),
            ("policy", "ok"),
        ],
    );
    assert!(
        check(&report, "tls")["message"]
            .as_str()
            .unwrap()
            .contains("ca.pem")
    );
    let decision = &check(&report, "policy")["decision"];
    assert_eq!(decision["allowed"], true);
    assert_eq!(decision["policy"], "tokens-to-ratings");
    assert_eq!(decision["rule"], 1);
    assert_eq!(decision["credential"], "join-token");
    let id = token.split('.').next().unwrap();
    assert!(
        decision["entry"]
            .as_str()
            .unwrap()
            .starts_with(&format!("bookinfo/ratings-token-{}-", id.to_lowercase())),
        "{decision:#}"
    );
    let server_time = humantime::parse_rfc3339(decision["serverTime"].as_str().unwrap()).unwrap();
    let apart = std::time::SystemTime::now()
        .duration_since(server_time)
        .unwrap_or_else(|e| e.duration());
    assert!(apart < Duration::from_secs(60), "{apart:?}");
    assert!(!text(&out.stdout).contains(token.split_once('.').unwrap().1));

    // Nothing spent, nothing written: not at the endpoint, not on the VM.
    assert_eq!(used(&mesh, &token).await, 0);
    assert_eq!(mesh.snapshot(), before, "doctor changed the registry");
    assert_eq!(
        files_below(&config.path("/var/lib/gangplank")),
        Vec::<std::path::PathBuf>::new()
    );

    // The token doctor checked still onboards the VM.
    let mut vm = config.start();
    let entry = wait_onboarded(&mesh, &mut vm).await;
    assert_eq!(used(&mesh, &token).await, 1);
    let entry_name = format!("bookinfo/{}", entry.metadata.name.clone().unwrap());

    // Once registered, the agent rejoins with its bound key, and doctor checks that (the
    // token is spent now): it predicts the very entry, and still writes nothing.
    vm.agent.signal("TERM");
    assert!(vm.agent.wait_exit(WAIT).success(), "{}", vm.agent.output());
    let before = mesh.snapshot();
    let (code, report) = doctor_json(|a| vm.agent_cli(a));
    assert_eq!(code, 0, "{report:#}");
    let credential = check(&report, "credential")["message"].as_str().unwrap();
    assert!(
        credential.contains("bound key") && credential.contains(&entry_name[9..]),
        "{credential}"
    );
    let decision = &check(&report, "policy")["decision"];
    assert_eq!(decision["credential"], "bound-key");
    assert_eq!(decision["entry"], entry_name.as_str(), "{decision:#}");
    assert_eq!(
        mesh.snapshot(),
        before,
        "doctor's rejoin check changed the registry"
    );

    // The binding released: the bound key is refused, and doctor, like the agent, falls
    // back to the first-join credential (a new token now), spending none of it.
    assert!(
        mesh.registry
            .delete::<gangplank_api::binding::WorkloadBinding>(&NamespacedName::new(
                "bookinfo",
                &entry_name[9..]
            ))
            .await
            .unwrap()
    );
    let fresh = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    write(&vm.root.join("etc/join-token"), &fresh);
    let before = mesh.snapshot();
    let (code, report) = doctor_json(|a| vm.agent_cli(a));
    assert_eq!(code, 0, "{report:#}");
    let policy = check(&report, "policy");
    assert_eq!(policy["decision"]["credential"], "join-token", "{policy:#}");
    assert!(
        policy["message"]
            .as_str()
            .unwrap()
            .contains("the bound key was refused, and the agent falls back to this first-join credential (the endpoint said: bound key not accepted"),
        "{policy:#}"
    );
    // This time the VM has its key: the name is the one the agent would get, the new
    // token's id with the key's fingerprint.
    let fingerprint = entry_name.rsplit('-').next().unwrap();
    let fresh_id = fresh.split('.').next().unwrap().to_lowercase();
    assert_eq!(
        policy["decision"]["entry"],
        format!("bookinfo/ratings-token-{fresh_id}-{fingerprint}"),
        "{policy:#}"
    );
    assert_eq!(used(&mesh, &fresh).await, 0);
    assert_eq!(mesh.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_the_ca_bundle_when_the_endpoint_is_not_trusted_and_skips_the_rest() {
    let mesh = mesh_allowing_tokens().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let config = Vm::configure(&mesh, "vm-1", Credential::JoinToken(token.clone()));
    let other = gangplank_tls::dev::Ca::generate("other").unwrap();
    let wrong_ca = mesh.root().join("other-ca.pem");
    write(&wrong_ca, other.cert_pem());
    let onboarding = std::fs::read_to_string(&config.onboarding).unwrap();
    let ca = mesh.ca_bundle.display().to_string();
    assert!(onboarding.contains(&ca));
    write(
        &config.onboarding,
        &onboarding.replace(&ca, &wrong_ca.display().to_string()),
    );
    let before = mesh.snapshot();

    let (code, report) = doctor_json(|a| config.agent_cli(a));
    assert_eq!(code, 1);
    assert_eq!(report["ok"], false);
    expect_results(
        &report,
        &[
            ("config", "ok"),
            ("dns", "skipped"),
            ("tcp", "ok"),
            ("tls", "fail"),
            ("clock", "skipped"),
            ("credential", "skipped"),
            ("policy", "skipped"),
        ],
    );
    let tls = check(&report, "tls");
    let message = tls["message"].as_str().unwrap();
    assert!(
        message.contains("trusted CA") && message.contains("other-ca.pem"),
        "{message}"
    );
    assert!(
        tls["hint"]
            .as_str()
            .unwrap()
            .contains("onboardingEndpoint.transportSecurity.tls.caBundle"),
        "{tls:#}"
    );
    assert!(
        check(&report, "policy")["message"]
            .as_str()
            .unwrap()
            .contains("the tls check failed")
    );
    let out = config.agent_cli(&["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("fix: set onboardingEndpoint.transportSecurity.tls.caBundle"));

    // A name the certificate does not hold: the SNI hint.
    write(
        &config.onboarding,
        &std::fs::read_to_string(&config.onboarding)
            .unwrap()
            .replace(&wrong_ca.display().to_string(), &ca)
            .replace("      caBundle:", "      sni: elsewhere.example\n      caBundle:"),
    );
    let (code, report) = doctor_json(|a| config.agent_cli(a));
    assert_eq!(code, 1);
    let tls = check(&report, "tls");
    assert_eq!(tls["result"], "fail", "{report:#}");
    assert!(
        tls["message"].as_str().unwrap().contains("elsewhere.example"),
        "{tls:#}"
    );
    assert!(tls["hint"].as_str().unwrap().contains("tls.sni"), "{tls:#}");
    assert_eq!(check(&report, "policy")["result"], "skipped");

    assert_eq!(mesh.snapshot(), before);
    assert_eq!(used(&mesh, &token).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_tcp_on_a_closed_port_and_dns_on_a_name_that_does_not_resolve() {
    let mesh = mesh_allowing_tokens().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let config = Vm::configure(&mesh, "vm-1", Credential::JoinToken(token));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let onboarding = std::fs::read_to_string(&config.onboarding).unwrap();
    let endpoint_port = format!("port: {}", mesh.addr.port());
    write(
        &config.onboarding,
        &onboarding.replace(&endpoint_port, &format!("port: {port}")),
    );

    let (code, report) = doctor_json(|a| config.agent_cli(a));
    assert_eq!(code, 1);
    expect_results(
        &report,
        &[
            ("config", "ok"),
            ("dns", "skipped"),
            ("tcp", "fail"),
            ("tls", "skipped"),
            ("clock", "skipped"),
            ("credential", "skipped"),
            ("policy", "skipped"),
        ],
    );
    let tcp = check(&report, "tcp");
    assert!(
        tcp["message"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{port}")),
        "{tcp:#}"
    );
    assert!(
        tcp["hint"].as_str().unwrap().contains("onboardingEndpoint.port"),
        "{tcp:#}"
    );

    // `.invalid` never resolves (RFC 6761).
    write(
        &config.onboarding,
        &onboarding.replace("host: 127.0.0.1", "host: gangplank-doctor.invalid"),
    );
    let (code, report) = doctor_json(|a| config.agent_cli(a));
    assert_eq!(code, 1);
    let dns = check(&report, "dns");
    assert_eq!(dns["result"], "fail", "{report:#}");
    assert!(
        dns["hint"].as_str().unwrap().contains("onboardingEndpoint.host"),
        "{dns:#}"
    );
    assert_eq!(check(&report, "tcp")["result"], "skipped");

    // A configuration that does not load: the first check fails, naming the field.
    write(
        &config.onboarding,
        &onboarding.replace("workloadGroup:", "workloadGrup:"),
    );
    let (code, report) = doctor_json(|a| config.agent_cli(a));
    assert_eq!(code, 1);
    let first = check(&report, "config");
    assert_eq!(first["result"], "fail");
    assert!(
        first["message"].as_str().unwrap().contains("workloadGrup"),
        "{first:#}"
    );
    assert_eq!(check(&report, "dns")["result"], "skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_explains_a_denying_policy_and_spends_nothing() {
    let mesh = Mesh::start(Options::default()).await;
    // Only a JWT subject may join: not this VM's join token.
    mesh.registry
        .put(&policy(
            "bookinfo",
            "only-vm-9",
            vec![jwt_subjects("https://idp.example", &["vm-9"])],
            &[("app", "ratings")],
        ))
        .await
        .unwrap();
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let config = Vm::configure(&mesh, "vm-1", Credential::JoinToken(token.clone()));
    let before = mesh.snapshot();

    let (code, report) = doctor_json(|a| config.agent_cli(a));
    assert_eq!(code, 1);
    expect_results(
        &report,
        &[
            ("config", "ok"),
            ("dns", "skipped"),
            ("tcp", "ok"),
            ("tls", "ok"),
            ("clock", "ok"),
            ("credential", "ok"),
            ("policy", "fail"),
        ],
    );
    let policy = check(&report, "policy");
    let message = policy["message"].as_str().unwrap();
    let id = token.split('.').next().unwrap();
    assert!(
        message.contains("no OnboardingPolicy in namespace bookinfo allows join token")
            && message.contains(id)
            && message.contains("only-vm-9 rule 1"),
        "{message}"
    );
    assert!(
        policy["hint"]
            .as_str()
            .unwrap()
            .contains("OnboardingPolicy in namespace bookinfo")
    );
    assert_eq!(policy["decision"]["allowed"], false);
    assert!(policy["decision"].get("entry").is_none(), "{policy:#}");

    assert_eq!(used(&mesh, &token).await, 0);
    assert_eq!(mesh.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_gets_onboards_refusal_for_an_expired_or_unknown_token_and_names_a_missing_one() {
    let mesh = mesh_allowing_tokens().await;
    let expired = mesh.join_token("ratings", 1, Duration::ZERO).await;
    let good = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let unknown = format!("zzzzzzzzzz.{}", good.split_once('.').unwrap().1);
    let before = mesh.snapshot();
    let mut client = mesh.client().await;

    for (name, token) in [("expired", &expired), ("unknown", &unknown)] {
        let config = Vm::configure(&mesh, name, Credential::JoinToken(token.clone()));
        let (code, report) = doctor_json(|a| config.agent_cli(a));
        assert_eq!(code, 1, "{name}");
        assert_eq!(check(&report, "credential")["result"], "ok", "{name}: {report:#}");
        let policy = check(&report, "policy");
        assert_eq!(policy["result"], "fail", "{name}: {report:#}");
        let message = policy["message"].as_str().unwrap();
        // Exactly what Onboard tells an unauthenticated caller, nothing more.
        let refused = onboard_refusal(&mut client, token).await;
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert!(message.contains("Unauthenticated"), "{name}: {message}");
        assert_eq!(
            without_reference(message.split_once("Unauthenticated: ").unwrap().1),
            without_reference(refused.message()),
            "{name}"
        );
        assert!(
            !message.contains("expired at") && !message.contains("not found"),
            "{message}"
        );
        assert!(
            policy["hint"].as_str().unwrap().contains("join-token"),
            "{policy:#}"
        );
    }

    // A token file that is not there: the credential check fails and names it.
    let config = Vm::configure(&mesh, "no-token", Credential::JoinToken(good.clone()));
    let token_file = config.root.join("etc/join-token");
    std::fs::remove_file(&token_file).unwrap();
    let (code, report) = doctor_json(|a| config.agent_cli(a));
    assert_eq!(code, 1);
    let credential = check(&report, "credential");
    assert_eq!(credential["result"], "fail", "{report:#}");
    assert!(
        credential["hint"]
            .as_str()
            .unwrap()
            .contains(&token_file.display().to_string())
    );
    assert_eq!(check(&report, "policy")["result"], "skipped");

    assert_eq!(used(&mesh, &good).await, 0);
    assert_eq!(used(&mesh, &expired).await, 0);
    assert_eq!(mesh.snapshot(), before);
}

/// A refusal's message without its `(reference …)`, which differs per call.
fn without_reference(message: &str) -> String {
    match message.split_once("(reference ") {
        Some((head, tail)) => format!("{head}{}", tail.split_once(')').map(|t| t.1).unwrap_or("")),
        None => message.to_string(),
    }
}

async fn challenge(client: &mut OnboardingClient<Channel>) -> Challenge {
    let d = client
        .discover(proto::DiscoverRequest {})
        .await
        .unwrap()
        .into_inner();
    Challenge {
        plane_id: d.plane_id,
        nonce: d.nonce,
        ..Default::default()
    }
}

/// An OnboardRequest for `bookinfo/ratings` with join token `token`, signed by `key` over
/// a fresh nonce.
async fn token_request(
    client: &mut OnboardingClient<Channel>,
    token: &str,
    key: &Key,
) -> proto::OnboardRequest {
    let c = challenge(client).await;
    let mut credential = proto::Credential {
        kind: "join-token".into(),
        payload: token.as_bytes().to_vec(),
        ..Default::default()
    };
    key.attach(&mut credential, &c);
    onboard_request("ratings", credential, c.nonce)
}

/// Onboard's refusal of join token `token` (which must be refused).
async fn onboard_refusal(client: &mut OnboardingClient<Channel>, token: &str) -> tonic::Status {
    let request = token_request(client, token, &Key::generate().unwrap()).await;
    client.onboard(request).await.expect_err("refused")
}

/// A Check of join token `token` signed by `key`.
async fn check_token(
    client: &mut OnboardingClient<Channel>,
    token: &str,
    key: &Key,
) -> Result<proto::CheckResponse, tonic::Status> {
    let request = token_request(client, token, key).await;
    client.check(request).await.map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_answers_what_onboard_would_decide_and_spends_and_writes_nothing() {
    let mesh = mesh_allowing_tokens().await;
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut client = mesh.client().await;
    let key = Key::generate().unwrap();
    let before = mesh.snapshot();

    // A single-use token checked three times: allowed each time, never spent.
    let mut predicted = None;
    for _ in 0..3 {
        let answer = check_token(&mut client, &token, &key).await.expect("allowed");
        assert!(answer.allowed, "{answer:?}");
        assert_eq!(answer.policy, "tokens-to-ratings");
        assert_eq!(answer.rule, 1);
        assert_eq!(answer.entry_namespace, "bookinfo");
        assert!(
            answer
                .explanation
                .contains("allowed by OnboardingPolicy tokens-to-ratings rule 1")
        );
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((answer.server_time_unix_ms - now_ms).abs() < 60_000, "{answer:?}");
        predicted = Some(answer.entry_name);
    }
    assert_eq!(used(&mesh, &token).await, 0);
    assert_eq!(mesh.snapshot(), before, "Check wrote to the registry");
    assert!(mesh.entries().await.is_empty());

    // A nonce is good for one call, Check's as Onboard's.
    let c = challenge(&mut client).await;
    let mut credential = proto::Credential {
        kind: "join-token".into(),
        payload: token.as_bytes().to_vec(),
        ..Default::default()
    };
    key.attach(&mut credential, &c);
    client
        .check(onboard_request("ratings", credential.clone(), c.nonce.clone()))
        .await
        .expect("allowed");
    let again = client
        .check(onboard_request("ratings", credential, c.nonce))
        .await
        .expect_err("a used nonce");
    assert_eq!(again.code(), Code::FailedPrecondition);

    // The unspent token onboards, under the name Check predicted for this key.
    let onboarded = first_join(&mut client, &token, &key).await;
    let registration = onboarded.registration.unwrap();
    assert_eq!(Some(registration.name.clone()), predicted);
    assert_eq!(used(&mesh, &token).await, 1);

    // Spent now: Check refuses it as Onboard does.
    let after_join = mesh.snapshot();
    let checked = check_token(&mut client, &token, &key).await.expect_err("spent");
    let onboard = onboard_refusal(&mut client, &token).await;
    assert_eq!(checked.code(), Code::Unauthenticated);
    assert_eq!(
        without_reference(checked.message()),
        without_reference(onboard.message())
    );
    assert_eq!(mesh.snapshot(), after_join);

    // The bound key: allowed, the same entry, and the connected agent is not disturbed.
    let c = challenge(&mut client).await;
    let group = NamespacedName::new("bookinfo", "ratings");
    let credential = key.rejoin(&c, &group, &registration.name).unwrap();
    let answer = client
        .check(onboard_request("ratings", credential, c.nonce))
        .await
        .expect("the bound key is checked")
        .into_inner();
    assert!(answer.allowed);
    assert_eq!(answer.entry_name, registration.name);
    assert_eq!(mesh.snapshot(), after_join);

    // Someone else's key cannot ask about this VM's binding.
    let thief = Key::generate().unwrap();
    let c = challenge(&mut client).await;
    let credential = thief.rejoin(&c, &group, &registration.name).unwrap();
    let refused = client
        .check(onboard_request("ratings", credential, c.nonce))
        .await
        .expect_err("another key");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().starts_with("bound key not accepted"),
        "{}",
        refused.message()
    );
    assert_eq!(mesh.snapshot(), after_join);

    // A denying policy: an answer, not an error, with Onboard's explanation.
    mesh.registry
        .delete::<gangplank_api::policy::OnboardingPolicy>(&NamespacedName::new(
            "bookinfo",
            "tokens-to-ratings",
        ))
        .await
        .unwrap();
    let other = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let before = mesh.snapshot();
    let answer = check_token(&mut client, &other, &Key::generate().unwrap())
        .await
        .expect("an answer");
    assert!(!answer.allowed);
    assert!(
        answer
            .explanation
            .contains("there is no OnboardingPolicy in namespace bookinfo"),
        "{answer:?}"
    );
    assert_eq!(answer.entry_name, "");
    assert_eq!(mesh.snapshot(), before);
    assert_eq!(used(&mesh, &other).await, 0);
}
