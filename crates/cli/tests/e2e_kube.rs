//! End to end on Kubernetes: a `gangplank-endpoint` process with `registry.kubernetes` against
//! the Kubernetes API stand-in, and a real `gangplank-agent`.

mod support;

use std::time::Duration;

use gangplank_api::NamespacedName;
use gangplank_api::names::annotation;
use gangplank_testkit::kube_api::{Server, TOKEN_ISSUER};
use gangplank_testkit::process::{Proc, until};
use serde_json::{Value, json};
use support::*;

const ROOT_CERT: &str = "-----BEGIN CERTIFICATE-----\nY2x1c3Rlci1yb290\n-----END CERTIFICATE-----\n";

fn seed_as<T: serde::Serialize>(server: &Server, api_version: &str, kind: &str, obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    server.seed(v).unwrap()
}

/// Istio's injector ConfigMap, naming the cluster `cluster-west`.
fn injector_values() -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio-sidecar-injector", "namespace": "istio-system"},
        "data": {"values": "{\"global\":{\"multiCluster\":{\"clusterName\":\"cluster-west\"}}}"}})
}

/// The entry's only condition, which must be `Healthy`.
fn healthy_condition(entry: &Value) -> Value {
    let conditions = entry["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(conditions.len(), 1, "{conditions:?}");
    assert_eq!(conditions[0]["type"], "Healthy");
    conditions[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboards_against_the_kubernetes_api_one_write_per_event_none_per_heartbeat() {
    let server = Server::start().await.unwrap();
    server.install_istio_crds(&["v1", "v1beta1"]).unwrap();
    for crd in gangplank_registry::crds::all().unwrap() {
        server.install_crd(&serde_json::to_value(crd).unwrap()).unwrap();
    }
    let group = seed_as(
        &server,
        "networking.istio.io/v1",
        "WorkloadGroup",
        &group("bookinfo", "ratings", &[("app", "ratings"), ("version", "v1")]),
    );
    seed_as(
        &server,
        "onboarding.gangplank.dev/v1alpha1",
        "OnboardingPolicy",
        &policy(
            "bookinfo",
            "allow-ratings",
            vec![join_tokens()],
            &[("app", "ratings")],
        ),
    );
    server
        .seed(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ratings-sa", "namespace": "bookinfo"}}))
        .unwrap();
    server
        .seed(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio-ca-root-cert", "namespace": "bookinfo"}, "data": {"root-cert.pem": ROOT_CERT}}))
        .unwrap();
    server
        .seed(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": "trustDomain: cluster.local\ndefaultConfig:\n  proxyMetadata:\n    FROM_CLUSTER: \"yes\"\n"}}))
        .unwrap();
    server.seed(injector_values()).unwrap();
    let (token, secret) = gangplank_identity::token::create(
        &NamespacedName::new("bookinfo", "ratings"),
        Duration::from_secs(3600),
        1,
        time::OffsetDateTime::now_utc(),
    );
    seed_as(&server, "onboarding.gangplank.dev/v1alpha1", "JoinToken", &token);

    // The endpoint, with the Kubernetes registry.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca_bundle = write_dev_tls(root, &["localhost"]);
    // Heartbeats every 200ms, so the steady-state window below sees about ten of them.
    let (endpoint, addr) = spawn_endpoint(root, &server, "endpoint-0", "127.0.0.1:0", ("5m", "200ms"));

    // The agent; its sidecar's readiness endpoint says "not ready" (503) at first, as Envoy's
    // does until istiod has configured it.
    let readiness = gangplank_testkit::probe::Probe::start(503).await.unwrap();
    let vm = Vm::start_probed(
        root,
        "a",
        addr,
        &ca_bundle,
        Credential::JoinToken(secret.expose().to_owned()),
        Some(&readiness.url()),
    );
    let (agent, fs) = (vm.agent, vm.root.join("fs"));
    let started = until(WAIT, || std::fs::read_to_string(fs.join("sidecar.env")).ok());
    assert!(
        started.is_some(),
        "the sidecar never started; agent:\n{}\nendpoint:\n{}",
        agent.output(),
        endpoint.output()
    );

    // The entry: applied once by Onboard (server-side apply; it already records the replica
    // and connected-at, so opening the stream writes nothing), then the first health report
    // (the status subresource): one write per onboarding, one per health change, and it is
    // valid for Istio's schema (the stand-in refuses anything else).
    let writes = until(WAIT, || {
        let w: Vec<_> = server
            .writes()
            .into_iter()
            .filter(|w| w.resource == "workloadentries")
            .collect();
        (w.len() >= 2).then_some(w)
    })
    .unwrap_or_else(|| panic!("writes: {:?}", server.writes()));
    let kinds: Vec<_> = writes
        .iter()
        .map(|w| (w.verb, w.subresource.as_deref()))
        .collect();
    assert_eq!(kinds, [("apply", None), ("apply", Some("status"))], "{writes:?}");
    let name = &writes[0].name;
    let entry = server
        .object("networking.istio.io", "workloadentries", "bookinfo", name)
        .unwrap();
    assert_eq!(
        entry["metadata"]["ownerReferences"][0]["uid"],
        group["metadata"]["uid"]
    );
    assert_eq!(
        entry["metadata"]["annotations"][annotation::ENDPOINT_REPLICA],
        "endpoint-0"
    );
    assert_eq!(entry["metadata"]["labels"]["app"], "ratings");

    // Health, the way istiod records it for a health-checked entry: the entry is marked
    // health-checked (istiod sends it traffic only while Healthy is True), and the agent's
    // first report (running, not ready) set the condition False, with the reason.
    assert_eq!(
        entry["metadata"]["annotations"][annotation::HEALTH_CHECKS_ENABLED],
        "true"
    );
    let healthy = healthy_condition(&entry);
    assert_eq!(healthy["status"], "False");
    assert_eq!(
        healthy["message"],
        format!("sidecar not ready: GET {} answered 503", readiness.url())
    );

    // The sidecar becomes ready: one more status write, True, without a message.
    readiness.set_status(200);
    let entry = until(WAIT, || {
        let e = server.object("networking.istio.io", "workloadentries", "bookinfo", name)?;
        (healthy_condition(&e)["status"] == "True").then_some(e)
    })
    .unwrap_or_else(|| panic!("never Healthy; agent:\n{}", agent.output()));
    let healthy = healthy_condition(&entry);
    assert!(healthy.get("message").is_none(), "{healthy}");
    for t in ["lastProbeTime", "lastTransitionTime"] {
        let at = healthy[t].as_str().unwrap_or_else(|| panic!("{t}: {healthy}"));
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{t} {at:?}: {e}"));
    }
    let status_writes = server
        .writes()
        .iter()
        .filter(|w| w.resource == "workloadentries" && w.subresource.as_deref() == Some("status"))
        .count();
    assert_eq!(status_writes, 2, "{:?}", server.writes());

    // Boot inputs from the cluster: a TokenRequest token for the group's service account,
    // the root certificate and the mesh config from the ConfigMaps.
    let token = std::fs::read_to_string(fs.join("var/run/secrets/tokens/istio-token")).unwrap();
    let claims = claims_of(token.trim());
    assert_eq!(claims["iss"], TOKEN_ISSUER);
    assert_eq!(claims["sub"], "system:serviceaccount:bookinfo:ratings-sa");
    assert_eq!(claims["aud"], json!(["istio-ca"]));
    assert_eq!(
        std::fs::read_to_string(fs.join("etc/certs/root-cert.pem")).unwrap(),
        ROOT_CERT
    );
    let mesh = std::fs::read_to_string(fs.join("etc/istio/config/mesh")).unwrap();
    assert!(mesh.contains("FROM_CLUSTER"), "{mesh}");
    // The cluster ID, unset in the endpoint's config, is istiod's, as istioctl finds it.
    let cluster_env = std::fs::read_to_string(fs.join("var/lib/istio/envoy/cluster.env")).unwrap();
    assert!(
        cluster_env
            .lines()
            .any(|l| l == "ISTIO_META_CLUSTER_ID='cluster-west'"),
        "{cluster_env}"
    );
    // Read through the endpoint's watches, not fetched per onboarding.
    let reads = server.reads();
    let configmap_gets: Vec<_> = reads
        .iter()
        .filter(|r| r.resource == "configmaps" && r.verb == "get")
        .collect();
    assert!(configmap_gets.is_empty(), "{configmap_gets:?}");
    assert!(
        reads
            .iter()
            .any(|r| r.resource == "configmaps" && r.verb == "watch"),
        "{reads:?}"
    );

    // Steady state: heartbeats (every 200ms) write nothing to WorkloadEntries.
    server.reset_writes();
    // Across processes there is no shared clock to pause: ten heartbeat intervals pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let entry_writes: Vec<_> = server
        .writes()
        .into_iter()
        .filter(|w| w.resource == "workloadentries")
        .collect();
    assert!(entry_writes.is_empty(), "heartbeats wrote {entry_writes:?}");
    drop(agent);
}

/// Starts `gangplank-endpoint` as `replica` with the Kubernetes registry of `server`, on
/// `listen`, with `(grace period, heartbeat)`; returns the process and its address.
fn spawn_endpoint(
    root: &std::path::Path,
    server: &Server,
    replica: &str,
    listen: &str,
    (grace, heartbeat): (&str, &str),
) -> (Proc, std::net::SocketAddr) {
    let kubeconfig = server.write_kubeconfig(root).unwrap();
    let config = root.join(format!("endpoint-{replica}.yaml"));
    write(
        &config,
        &format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: {PLANE_ID}
listen: {listen}
monitoringListen: 127.0.0.1:0
replica: {replica}
tls:
  certFile: {root}/tls/tls.crt
  keyFile: {root}/tls/tls.key
registry:
  kubernetes:
    kubeconfig: {kubeconfig}
    namespace: gangplank-system
    leaseDuration: 3s
stateDir: {root}/state
mesh:
  istiodIp: 10.10.10.11
identities:
  joinTokens: true
workloads:
  gracePeriod: {grace}
  heartbeat: {heartbeat}
  propagationDelay: 1s
",
            root = root.display(),
            kubeconfig = kubeconfig.display(),
        ),
    );
    run_endpoint(&format!("endpoint-{replica}"), &config)
}

/// Starts `gangplank-agent` for VM `name` with join token `secret` against `addr`.
fn spawn_agent(
    root: &std::path::Path,
    name: &str,
    addr: std::net::SocketAddr,
    secret: &str,
) -> (Proc, std::path::PathBuf) {
    let vm = Vm::start_at(
        root,
        name,
        addr,
        &root.join("tls/ca.pem"),
        Credential::JoinToken(secret.to_owned()),
    );
    (vm.agent, vm.root.join("fs"))
}

fn annotations_of(server: &Server, name: &str) -> Option<Value> {
    server
        .object("networking.istio.io", "workloadentries", "bookinfo", name)
        .map(|e| e["metadata"]["annotations"].clone())
}

/// Two replicas serve side by side behind a Service. Replica A dies with its agents' streams;
/// the agent that comes back reconnects through the Service to B and keeps its entry; the
/// one that does not is removed after the grace period, by the sweeper B became. B's own
/// agent is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_a_service_failover_keeps_returning_agents_and_removes_vanished_ones() {
    let server = Server::start().await.unwrap();
    server.install_istio_crds(&["v1"]).unwrap();
    for crd in gangplank_registry::crds::all().unwrap() {
        server.install_crd(&serde_json::to_value(crd).unwrap()).unwrap();
    }
    seed_as(
        &server,
        "networking.istio.io/v1",
        "WorkloadGroup",
        &group("bookinfo", "ratings", &[("app", "ratings")]),
    );
    seed_as(
        &server,
        "onboarding.gangplank.dev/v1alpha1",
        "OnboardingPolicy",
        &policy(
            "bookinfo",
            "allow-ratings",
            vec![join_tokens()],
            &[("app", "ratings")],
        ),
    );
    for (kind, name, ns, data) in [
        ("ServiceAccount", "ratings-sa", "bookinfo", None),
        (
            "ConfigMap",
            "istio-ca-root-cert",
            "bookinfo",
            Some(json!({"root-cert.pem": ROOT_CERT})),
        ),
        (
            "ConfigMap",
            "istio",
            "istio-system",
            Some(json!({"mesh": "trustDomain: cluster.local\n"})),
        ),
    ] {
        let mut o = json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": ns}});
        if let Some(d) = data {
            o["data"] = d;
        }
        server.seed(o).unwrap();
    }
    server.seed(injector_values()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_dev_tls(root, &["localhost"]);
    let mut secrets = Vec::new();
    for _ in 0..3 {
        let (token, secret) = gangplank_identity::token::create(
            &NamespacedName::new("bookinfo", "ratings"),
            Duration::from_secs(3600),
            1,
            time::OffsetDateTime::now_utc(),
        );
        seed_as(&server, "onboarding.gangplank.dev/v1alpha1", "JoinToken", &token);
        let id = token.metadata.name.clone().unwrap();
        secrets.push((format!("ratings-token-{id}"), secret.expose().to_owned()));
    }

    // Two replicas (sharing the signing keys, as the Deployment's Secret gives them), one
    // Service in front. The test plays the EndpointSlice controller: while the first two VMs
    // join only A is ready, then only B, then both.
    let (mut a, a_addr) = spawn_endpoint(root, &server, "endpoint-a", "127.0.0.1:0", ("6s", "500ms"));
    let (b, b_addr) = spawn_endpoint(root, &server, "endpoint-b", "127.0.0.1:0", ("6s", "500ms"));
    let service = gangplank_testkit::service::Service::start(&[a_addr])
        .await
        .unwrap();
    let (stays, stays_fs) = spawn_agent(root, "stays", service.addr(), &secrets[0].1);
    let (mut goes, goes_fs) = spawn_agent(root, "goes", service.addr(), &secrets[1].1);
    let onboarded =
        |fs: &std::path::Path| until(WAIT, || std::fs::read_to_string(fs.join("sidecar.env")).ok()).is_some();
    for fs in [&stays_fs, &goes_fs] {
        assert!(onboarded(fs), "not onboarded; A:\n{}", a.output());
    }
    service.set_backends(&[b_addr]);
    let (other, other_fs) = spawn_agent(root, "other", service.addr(), &secrets[2].1);
    assert!(onboarded(&other_fs), "not onboarded; B:\n{}", b.output());
    // Each entry is named from its token and its VM's bound key; the agent saved the name.
    let registered = |fs: &std::path::Path| -> String {
        let text = std::fs::read(fs.join("var/lib/gangplank/registration.json")).expect("registration saved");
        let v: serde_json::Value = serde_json::from_slice(&text).expect("registration json");
        v["entry"].as_str().expect("entry").to_owned()
    };
    let names: Vec<String> = [&stays_fs, &goes_fs, &other_fs].map(|fs| registered(fs)).into();
    for (name, (prefix, _)) in names.iter().zip(&secrets) {
        assert!(
            name.starts_with(&format!("{prefix}-")),
            "{name} is not {prefix}-<key fingerprint>"
        );
    }
    let (stays_entry, goes_entry, other_entry) = (&names[0], &names[1], &names[2]);
    service.set_backends(&[a_addr, b_addr]);
    let served_by =
        |entry: &str| annotations_of(&server, entry).map(|a| a[annotation::ENDPOINT_REPLICA].clone());
    for (e, replica) in [
        (stays_entry, "endpoint-a"),
        (goes_entry, "endpoint-a"),
        (other_entry, "endpoint-b"),
    ] {
        assert_eq!(served_by(e), Some(json!(replica)), "{e}");
    }
    // Both replicas hold their own Lease.
    for replica in ["endpoint-a", "endpoint-b"] {
        let name = format!("gangplank-replica-{replica}");
        assert!(
            until(WAIT, || server.object(
                "coordination.k8s.io",
                "leases",
                "gangplank-system",
                &name
            ))
            .is_some(),
            "no Lease {name}"
        );
    }

    // Every sidecar has reported its health (the first report is a write of its own).
    for e in [stays_entry, goes_entry, other_entry] {
        let healthy = until(WAIT, || {
            let entry = server.object("networking.istio.io", "workloadentries", "bookinfo", e)?;
            (entry["status"]["conditions"][0]["status"] == "True").then_some(())
        });
        assert!(healthy.is_some(), "{e} never reported healthy");
    }

    // A dies without a word, and so does one of its VMs; A leaves the Service's endpoints.
    server.reset_writes();
    a.signal("KILL");
    a.wait_exit(WAIT);
    goes.signal("KILL");
    goes.wait_exit(WAIT);
    service.set_backends(&[b_addr]);

    // The surviving agent reconnects through the Service to B.
    let moved = until(WAIT, || {
        let a = annotations_of(&server, stays_entry)?;
        (a[annotation::ENDPOINT_REPLICA] == "endpoint-b" && a.get(annotation::DISCONNECTED_AT).is_none())
            .then_some(())
    });
    assert!(
        moved.is_some(),
        "the agent did not move to B: {:?}\n{}",
        annotations_of(&server, stays_entry),
        b.output()
    );

    // The vanished VM's entry is marked by the sweeper and removed after the grace period.
    let removed = until(Duration::from_secs(40), || {
        annotations_of(&server, goes_entry).is_none().then_some(())
    });
    assert!(
        removed.is_some(),
        "the vanished VM's entry stayed: {:?}\n{}",
        annotations_of(&server, goes_entry),
        b.output()
    );
    let lease = server
        .object(
            "coordination.k8s.io",
            "leases",
            "gangplank-system",
            "gangplank-endpoint-sweeper",
        )
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "endpoint-b");

    // Across the failover: the returning agent's entry was never deleted and its health,
    // unchanged, was not written again; B's own agent was never touched.
    let writes = server.writes();
    let deleted: Vec<_> = writes
        .iter()
        .filter(|w| w.resource == "workloadentries" && w.verb == "delete")
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(deleted, [goes_entry.as_str()], "{writes:?}");
    assert!(
        !writes
            .iter()
            .any(|w| w.name == *stays_entry && w.subresource.is_some()),
        "{writes:?}"
    );
    assert!(!writes.iter().any(|w| w.name == *other_entry), "{writes:?}");
    assert_eq!(served_by(stays_entry), Some(json!("endpoint-b")));
    assert_eq!(served_by(other_entry), Some(json!("endpoint-b")));
    drop((stays, other));
}
