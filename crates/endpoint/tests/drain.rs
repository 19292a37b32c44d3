//! A drained shutdown: `Endpoint::shutdown` returns only once every task that writes to the
//! registry (agent streams recording their disconnect, the sweep, in-flight calls) is done,
//! so nothing is written after it returns, even with agent sessions open.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gangplank_api::NamespacedName;
use gangplank_api::istio::{WorkloadEntry, WorkloadGroup};
use gangplank_api::names::annotation;
use gangplank_api::policy::OnboardingPolicy;
use gangplank_api::proto::onboarding_client::OnboardingClient;
use gangplank_api::proto::{self, agent_message};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

const SESSIONS: usize = 3;

fn config(root: &Path) -> String {
    format!(
        "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: plane-drain
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
replica: endpoint-0
tls: {{dev: true}}
registry: {{directory: {root}/registry}}
stateDir: {root}/state
mesh: {{rootCertFile: {root}/root-cert.pem}}
identities: {{joinTokens: true}}
workloads: {{gracePeriod: 2s, heartbeat: 1s}}
",
        root = root.display()
    )
}

/// Every file under the registry with its bytes (temp files of a write in flight included).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_written_after_shutdown_returns_with_sessions_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nZmFrZQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(root.join("endpoint.yaml"), config(root)).unwrap();
    let registry = gangplank_registry::dir::Registry::open(root.join("registry")).unwrap();
    let group: WorkloadGroup = serde_saphyr::from_str(
        "apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: ratings, namespace: bookinfo, labels: {app: ratings}}
spec:
  metadata: {labels: {app: ratings}}
  template: {serviceAccount: ratings}
",
    )
    .unwrap();
    registry.put(&group).await.unwrap();
    let policy: OnboardingPolicy = serde_saphyr::from_str(
        "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: OnboardingPolicy
metadata: {name: tokens, namespace: bookinfo}
spec:
  allow:
  - workloads: [{joinToken: {}}]
    onboardTo: [{workloadGroupSelector: {matchLabels: {app: ratings}}}]
",
    )
    .unwrap();
    registry.put(&policy).await.unwrap();
    let group_key = NamespacedName::new("bookinfo", "ratings");
    let mut secrets = Vec::new();
    for _ in 0..SESSIONS {
        let (token, secret) = gangplank_identity::token::create(
            &group_key,
            Duration::from_secs(600),
            1,
            time::OffsetDateTime::now_utc(),
        );
        registry.put(&token).await.unwrap();
        secrets.push(secret);
    }

    let config = gangplank_endpoint::Config::load(&root.join("endpoint.yaml")).unwrap();
    let endpoint = gangplank_endpoint::start(gangplank_endpoint::build(config).await.unwrap())
        .await
        .unwrap();
    let options = gangplank_tls::ClientOptions {
        ca_bundle: Some(root.join("state/dev-tls/ca.crt")),
        ..Default::default()
    };

    // SESSIONS agents onboard, each with its own token (so its own entry), and hold their
    // streams open.
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    let mut entries = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let channel = gangplank_tls::channel("127.0.0.1", endpoint.addr.port(), &options).unwrap();
        let mut client = OnboardingClient::new(channel);
        let nonce = client
            .discover(proto::DiscoverRequest {})
            .await
            .unwrap()
            .into_inner()
            .nonce;
        let registration = client
            .onboard(proto::OnboardRequest {
                workload_group: Some(proto::WorkloadGroupRef {
                    namespace: "bookinfo".into(),
                    name: "ratings".into(),
                }),
                credential: Some(proto::Credential {
                    kind: gangplank_api::kind::JOIN_TOKEN.into(),
                    payload: secret.expose().as_bytes().to_vec(),
                    ..Default::default()
                }),
                nonce,
                host: Some(proto::HostFacts {
                    hostname: format!("vm-{i}"),
                    addresses: vec![format!("10.0.0.{}", i + 1)],
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .registration
            .unwrap();
        entries.push(NamespacedName::new(registration.namespace, registration.name));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(proto::AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat {})),
        })
        .await
        .unwrap();
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", registration.session).parse().unwrap(),
        );
        let mut stream = client.session(request).await.unwrap().into_inner();
        let welcome = stream.next().await.unwrap().unwrap();
        assert!(matches!(
            welcome.kind,
            Some(proto::endpoint_message::Kind::Welcome(_))
        ));
        streams.push(stream);
        senders.push(tx);
    }
    for key in &entries {
        let live: WorkloadEntry = registry.get(key).await.unwrap().unwrap();
        let annotations = live.metadata.annotations.unwrap_or_default();
        assert!(annotations.contains_key(annotation::CONNECTED_AT), "{key}");
        assert!(!annotations.contains_key(annotation::DISCONNECTED_AT), "{key}");
    }

    let plane = endpoint.plane.clone();
    endpoint.shutdown().await;
    // No task that could write is left: every stream, connection, the sweep are done.
    assert!(
        plane.tasks.is_closed() && plane.tasks.is_empty(),
        "{} tasks still running",
        plane.tasks.len()
    );

    // Every agent stream recorded its disconnect before shutdown returned.
    for key in &entries {
        let after: WorkloadEntry = registry.get(key).await.unwrap().unwrap();
        let annotations = after.metadata.annotations.unwrap_or_default();
        assert!(
            annotations.contains_key(annotation::DISCONNECTED_AT),
            "{key}: the disconnect was not recorded before shutdown returned: {annotations:?}"
        );
    }
    // And the endpoint ended the streams.
    for stream in &mut streams {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
        assert!(end.is_ok(), "an agent stream is still open after shutdown");
    }

    // Nothing is written afterwards, not even by something the tracker does not know of: a
    // deliberate fixed window of two sweep intervals (1 s here) with the registry
    // byte-identical (an absence has no event to wait for).
    let settled = snapshot(&root.join("registry"));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            snapshot(&root.join("registry")),
            settled,
            "the registry changed after shutdown returned"
        );
    }
    drop(senders);
}
