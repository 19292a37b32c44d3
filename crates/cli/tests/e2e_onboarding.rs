//! End to end: `gangplank-agent` and `gangplank-endpoint` as separate processes on loopback.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use gangplank_api::Resource;
use gangplank_api::istio::WorkloadEntry;
use gangplank_api::names::annotation;
use gangplank_api::token::JoinToken;
use gangplank_testkit::process::{alive, until};
use support::*;

/// `KEY='value'` lines of a cluster.env, unquoted (the values we render are simple).
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').replace("'\"'\"'", "'")))
        .collect()
}

#[tokio::test]
async fn seed_config_onboards_writes_boot_files_and_sigterm_leaves() {
    let mesh = Mesh::start(Options::default()).await;
    mesh.registry
        .put(&policy(
            "bookinfo",
            "allow-ratings",
            vec![join_tokens()],
            &[("app", "ratings")],
        ))
        .await
        .unwrap();
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let id = token.split('.').next().unwrap().to_string();
    let mut vm = Vm::start(&mesh, "a", Credential::JoinToken(token));
    let entry = wait_onboarded(&mesh, &mut vm).await;

    // The WorkloadEntry: deterministic name, labels, address, owner, annotations.
    // Named from the token and the VM's bound key (the agent saved it as its registration).
    let name = entry.metadata.name.clone().unwrap_or_default();
    let fingerprint = name
        .strip_prefix(&format!("ratings-token-{id}-"))
        .unwrap_or_else(|| panic!("{name} is not ratings-token-{id}-<key fingerprint>"));
    assert!(
        fingerprint.len() == 10 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}"
    );
    assert_eq!(vm.registered_entry().as_deref(), Some(name.as_str()));
    assert_eq!(entry.metadata.namespace.as_deref(), Some("bookinfo"));
    let labels = &entry.spec.labels;
    assert_eq!(labels.get("app").map(String::as_str), Some("ratings"));
    assert_eq!(labels.get("version").map(String::as_str), Some("v1"));
    assert_eq!(
        labels.get("app.kubernetes.io/managed-by").map(String::as_str),
        Some("gangplank")
    );
    assert_eq!(
        entry.metadata.labels.as_ref(),
        Some(labels),
        "object labels select the entry like its spec labels"
    );
    let address: std::net::IpAddr = entry.spec.address.parse().expect("an IP address");
    assert_eq!(entry.spec.service_account, "ratings-sa");
    assert_eq!(entry.spec.ports.get("http"), Some(&9080));
    let owner = &entry.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("WorkloadGroup", "ratings", Some(true))
    );
    let ann = entry.metadata.annotations.clone().unwrap();
    assert_eq!(ann[annotation::IDENTITY], format!("join-token:bookinfo/{id}"));
    assert_eq!(ann[annotation::AGENT_VERSION], gangplank_api::VERSION);
    assert_eq!(ann[annotation::ENDPOINT_REPLICA], "endpoint-0");
    assert!(ann.contains_key(annotation::CONNECTED_AT));

    // Valid against Istio's own schema, as written on disk.
    let file = mesh.registry.path_of::<WorkloadEntry>(&entry.key()).unwrap();
    let value: serde_json::Value = serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let schema = gangplank_testkit::crd::Schema::istio("WorkloadEntry").unwrap();
    schema
        .validate(&value)
        .unwrap_or_else(|v| panic!("{file:?} is not a valid WorkloadEntry: {v:?}"));

    // The boot files, where Istio's sidecar package reads them, with safe modes.
    let cluster_env = vm.read("var/lib/istio/envoy/cluster.env").unwrap();
    let env = env_file(&cluster_env);
    let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(get("ISTIO_SVC_IP"), Some(address.to_string()));
    assert_eq!(get("ISTIO_NAMESPACE").as_deref(), Some("bookinfo"));
    assert_eq!(get("SERVICE_ACCOUNT").as_deref(), Some("ratings-sa"));
    assert_eq!(get("ISTIO_META_WORKLOAD_ENTRY"), entry.metadata.name.clone());
    assert_eq!(
        get("FROM_MESH").as_deref(),
        Some("yes"),
        "mesh config proxyMetadata flows through"
    );
    let mesh_yaml = vm.read("etc/istio/config/mesh").unwrap();
    assert!(mesh_yaml.starts_with("defaultConfig:\n"), "{mesh_yaml}");
    assert!(
        vm.read("etc/certs/root-cert.pem")
            .unwrap()
            .contains("ZmFrZS1tZXNoLXJvb3Q=")
    );
    assert!(
        vm.read("etc/hosts")
            .unwrap()
            .contains("10.10.10.11 istiod.istio-system.svc")
    );
    let token_path = vm.path("var/run/secrets/tokens/istio-token");
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let claims = claims_of(&std::fs::read_to_string(&token_path).unwrap());
    assert_eq!(claims["sub"], "system:serviceaccount:bookinfo:ratings-sa");
    assert_eq!(claims["aud"][0], "istio-ca");

    // The stand-in sidecar was started with every variable of cluster.env.
    let sidecar_env = env_file(&vm.read("sidecar.env").unwrap());
    for (k, v) in &env {
        assert!(
            sidecar_env.contains(&(k.clone(), v.clone())),
            "sidecar lacks {k}={v}"
        );
    }
    let sidecar_pid: u32 = vm.read("sidecar.pid").unwrap().trim().parse().unwrap();
    assert!(alive(sidecar_pid));

    // The token's one use is spent.
    let stored: JoinToken = mesh
        .registry
        .get(&gangplank_api::NamespacedName::new("bookinfo", &id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status.used, 1);

    // SIGTERM: the agent leaves (entry removed at once), waits the propagation delay, then
    // stops the sidecar.
    vm.agent.signal("TERM");
    let status = vm.agent.wait_exit(WAIT);
    assert!(status.success(), "agent exit {status:?}:\n{}", vm.agent.output());
    assert!(mesh.entries().await.is_empty(), "the entry is removed on leave");
    assert!(mesh.entry_files().is_empty());
    assert!(
        until(Duration::from_secs(5), || (!alive(sidecar_pid)).then_some(())).is_some(),
        "sidecar stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leaves_the_entry_until_the_grace_period_then_it_is_removed() {
    let mut mesh = Mesh::start(Options {
        grace: "3s",
        ..Options::default()
    })
    .await;
    mesh.registry
        .put(&policy("bookinfo", "allow", vec![join_tokens()], &[]))
        .await
        .unwrap();
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "k", Credential::JoinToken(token));
    let entry = wait_onboarded(&mesh, &mut vm).await;
    // The agent's stream is open: what SIGKILL cuts.
    mesh.endpoint.wait_for("agent connected", WAIT);

    vm.agent.signal("KILL");
    vm.agent.wait_exit(WAIT);
    // The endpoint notices the lost stream and records it, but keeps the entry for now.
    let disconnected = until(WAIT, || {
        let e = futures_block(mesh.registry.get::<WorkloadEntry>(&entry.key()))
            .ok()
            .flatten()?;
        e.metadata
            .annotations
            .as_ref()?
            .get(annotation::DISCONNECTED_AT)
            .cloned()
    });
    assert!(
        disconnected.is_some(),
        "disconnect recorded:\n{}",
        mesh.endpoint.output()
    );
    let gone = until(WAIT, || mesh.entry_files().is_empty().then_some(()));
    assert!(
        gone.is_some(),
        "entry removed after the grace period:\n{}",
        mesh.endpoint.output()
    );
    // The sweep says why (its log line may trail the deletion a little).
    mesh.endpoint.wait_for("gone longer than the grace period", WAIT);
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_token_is_renewed_before_expiry_without_restarting_the_sidecar() {
    let mesh = Mesh::start(Options {
        token_lifetime: "10s",
        ..Options::default()
    })
    .await;
    mesh.registry
        .put(&policy("bookinfo", "allow", vec![join_tokens()], &[]))
        .await
        .unwrap();
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "r", Credential::JoinToken(token));
    wait_onboarded(&mesh, &mut vm).await;
    let first = vm.read("var/run/secrets/tokens/istio-token").unwrap();
    let first_exp = claims_of(&first)["exp"].as_i64().unwrap();
    let sidecar_pid = vm.read("sidecar.pid").unwrap();

    let renewed = until(Duration::from_secs(20), || {
        vm.read("var/run/secrets/tokens/istio-token")
            .filter(|t| !t.is_empty() && *t != first)
    })
    .unwrap_or_else(|| panic!("token not renewed:\n{}", vm.agent.output()));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(now < first_exp, "renewed before the first token expired");
    assert!(claims_of(&renewed)["exp"].as_i64().unwrap() > first_exp);
    let mode = std::fs::metadata(vm.path("var/run/secrets/tokens/istio-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        vm.read("sidecar.pid").unwrap(),
        sidecar_pid,
        "the sidecar kept running"
    );
    assert!(alive(sidecar_pid.trim().parse().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_the_same_vm_twice_gives_one_entry_and_survives_an_endpoint_restart() {
    let issuer = gangplank_testkit::oidc::Issuer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = issuer.write_ca(dir.path()).unwrap();
    let mut mesh = Mesh::start(Options {
        jwt: Some((issuer.url().to_string(), issuer.jwks_uri(), ca)),
        ..Options::default()
    })
    .await;
    mesh.registry
        .put(&policy(
            "bookinfo",
            "allow-vm7",
            vec![jwt_subjects(issuer.url(), &["vm-7"])],
            &[],
        ))
        .await
        .unwrap();
    let jwt = issuer.sign(&issuer.claims("vm-7", PLANE_ID));

    let mut vm = Vm::start(&mesh, "j1", Credential::JwtFile(jwt.clone()));
    let first = wait_onboarded(&mesh, &mut vm).await;
    vm.agent.signal("KILL");
    vm.agent.wait_exit(WAIT);

    // The same VM (same verified identity) onboards again: same entry, updated.
    let mut again = Vm::start(&mesh, "j2", Credential::JwtFile(jwt));
    let second = wait_onboarded(&mesh, &mut again).await;
    assert_eq!(first.metadata.name, second.metadata.name);
    assert_ne!(
        first.metadata.annotations.as_ref().unwrap()[annotation::SESSION],
        second.metadata.annotations.as_ref().unwrap()[annotation::SESSION],
    );

    // The endpoint restarts; the agent reconnects its stream and the entry stays.
    mesh.restart_endpoint();
    let reconnected = until(WAIT, || {
        let out = mesh.endpoint.output();
        out.contains("agent connected").then_some(())
    });
    assert!(
        reconnected.is_some(),
        "agent reconnected:\n{}\n{}",
        again.agent.output(),
        mesh.endpoint.output()
    );
    let entries = mesh.entries().await;
    assert_eq!(entries.len(), 1);
    assert!(again.agent.running());
}

#[test]
fn malformed_configs_exit_non_zero_naming_the_field_before_contacting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("bad yaml", "onboardingEndpoint: [\n", "onboarding.yaml"),
        (
            "unknown field",
            "apiVersion: config.agent.onboarding.tetrate.io/v1alpha1\nkind: OnboardingConfiguration\nonboardingEndpoint:\n  host: 127.0.0.1\n  hots: x\nworkloadGroup:\n  namespace: a\n  name: b\n",
            "hots",
        ),
        (
            "missing workloadGroup",
            "apiVersion: config.agent.onboarding.tetrate.io/v1alpha1\nkind: OnboardingConfiguration\nonboardingEndpoint:\n  host: 127.0.0.1\n",
            "workloadGroup",
        ),
        (
            "bad port",
            "apiVersion: config.agent.onboarding.tetrate.io/v1alpha1\nkind: OnboardingConfiguration\nonboardingEndpoint:\n  host: 127.0.0.1\n  port: 70000\nworkloadGroup:\n  namespace: a\n  name: b\n",
            "port",
        ),
    ];
    for (what, text, field) in cases {
        let path = dir.path().join("onboarding.yaml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(gangplank_testkit::process::bin("gangplank-agent"))
            .arg("--onboarding-config")
            .arg(&path)
            .arg("--agent-config")
            .arg(dir.path().join("absent-agent.yaml"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: must fail");
        assert!(
            stderr.contains(field) && stderr.contains("onboarding.yaml"),
            "{what}: {stderr}"
        );
        assert!(
            !stderr.contains("onboarding") || !stderr.contains("Discover"),
            "{what}: contacted the endpoint: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_token_verifies_against_the_published_jwks_and_metrics_count_onboardings() {
    let mut mesh = Mesh::start(Options::default()).await;
    mesh.registry
        .put(&policy("bookinfo", "allow", vec![join_tokens()], &[]))
        .await
        .unwrap();
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let mut vm = Vm::start(&mesh, "m", Credential::JoinToken(token));
    wait_onboarded(&mesh, &mut vm).await;
    let istio_token = vm.read("var/run/secrets/tokens/istio-token").unwrap();

    // What istiod does with a JWT_RULE for this issuer: discovery, then JWKS, over HTTPS.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&mesh.ca_bundle).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", mesh.addr.port());
    let discovery: serde_json::Value = http
        .get(format!("{base}/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwks_uri = discovery["jwks_uri"]
        .as_str()
        .unwrap()
        .replace("https://localhost:15443", &base);
    let jwks: jsonwebtoken::jwk::JwkSet = http.get(jwks_uri).send().await.unwrap().json().await.unwrap();
    let header = jsonwebtoken::decode_header(&istio_token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("the token's key is published");
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["istio-ca"]);
    validation.set_issuer(&[discovery["issuer"].as_str().unwrap()]);
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let claims = jsonwebtoken::decode::<serde_json::Value>(&istio_token, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "system:serviceaccount:bookinfo:ratings-sa");

    // Health and metrics on the separate plain-HTTP monitoring port.
    let monitoring = mesh.endpoint.wait_for(r"monitoring_addr=(\S+)", WAIT);
    let plain = reqwest::Client::new();
    let health = plain
        .get(format!("http://{monitoring}/healthz"))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
    let metrics = plain
        .get(format!("http://{monitoring}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("gangplank_endpoint_onboardings_total{result=\"allowed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gangplank_endpoint_sessions 1"), "{metrics}");
}
