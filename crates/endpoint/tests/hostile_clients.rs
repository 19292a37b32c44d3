//! The endpoint holds against clients that take without giving: connections that finish TLS
//! and say nothing, more connections or handshakes than it is sized for, a sidecar whose
//! health flaps, and a process out of file descriptors. Real servers on 127.0.0.1, real
//! TLS and gRPC clients; limits set small in each test's configuration.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gangplank_api::NamespacedName;
use gangplank_api::istio::{WorkloadEntry, WorkloadGroup};
use gangplank_api::policy::OnboardingPolicy;
use gangplank_api::proto::onboarding_client::OnboardingClient;
use gangplank_api::proto::{self, agent_message};
use gangplank_testkit::process::{Proc, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// A registry with `bookinfo/ratings` and a policy that lets join tokens in; the endpoint's
/// configuration with `extra` appended (top-level keys).
async fn setup(root: &Path, workloads: &str, extra: &str) -> gangplank_registry::dir::Registry {
    std::fs::write(
        root.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nZmFrZQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(
        root.join("endpoint.yaml"),
        format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: plane-hostile
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
replica: endpoint-0
tls: {{dev: true}}
registry: {{directory: {root}/registry}}
stateDir: {root}/state
mesh: {{rootCertFile: {root}/root-cert.pem}}
identities: {{joinTokens: true}}
workloads: {{gracePeriod: 1m, heartbeat: 1s{workloads}}}
{extra}",
            root = root.display()
        ),
    )
    .unwrap();
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
    registry
}

async fn start(root: &Path) -> gangplank_endpoint::Endpoint {
    let config = gangplank_endpoint::Config::load(&root.join("endpoint.yaml")).unwrap();
    gangplank_endpoint::start(gangplank_endpoint::build(config).await.unwrap())
        .await
        .unwrap()
}

fn ca(root: &Path) -> PathBuf {
    root.join("state/dev-tls/ca.crt")
}

/// A TLS handshake with the endpoint at `addr`, trusting its dev CA.
async fn handshake(
    root: &Path,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let options = gangplank_tls::ClientOptions {
        ca_bundle: Some(ca(root)),
        ..Default::default()
    };
    let config = gangplank_tls::client_config(&options).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// An HTTP/2 connection that sent its preface and read the endpoint's first bytes (its
/// SETTINGS), so the endpoint is past the handshake; then it says nothing more.
async fn open_h2(root: &Path, addr: std::net::SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tls = handshake(root, addr).await.expect("TLS handshake");
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
        .await
        .expect("the endpoint answers the preface")
        .unwrap();
    assert!(n > 0, "the endpoint closed an HTTP/2 connection at once");
    tls
}

/// Reads until the endpoint closes (EOF, a reset or a TLS close); `None` if it stays open
/// for `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        while let Ok(n) = stream.read(&mut buf).await
            && n > 0
        {}
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

/// The endpoint's metrics, as scraped from its monitoring port.
async fn metrics(endpoint: &gangplank_endpoint::Endpoint) -> String {
    let mut tcp = TcpStream::connect(endpoint.monitoring_addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of metric line `name` (with its labels), if present.
async fn metric(endpoint: &gangplank_endpoint::Endpoint, name: &str) -> Option<f64> {
    metrics(endpoint).await.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

async fn wait_metric(endpoint: &gangplank_endpoint::Endpoint, name: &str, value: f64) {
    eventually(&format!("{name} = {value}"), WAIT, POLL, || async {
        metric(endpoint, name).await == Some(value)
    })
    .await;
}

const IDLE: &str = "gangplank_endpoint_connections_refused_total{reason=\"idle\"}";
const CONNECTIONS: &str = "gangplank_endpoint_connections";

/// An agent onboarded with a fresh join token: its client (on one connection), entry and session.
async fn onboard(
    root: &Path,
    registry: &gangplank_registry::dir::Registry,
    addr: std::net::SocketAddr,
) -> (
    OnboardingClient<tonic::transport::Channel>,
    NamespacedName,
    String,
) {
    let (token, secret) = gangplank_identity::token::create(
        &NamespacedName::new("bookinfo", "ratings"),
        Duration::from_secs(600),
        1,
        time::OffsetDateTime::now_utc(),
    );
    registry.put(&token).await.unwrap();
    let options = gangplank_tls::ClientOptions {
        ca_bundle: Some(ca(root)),
        ..Default::default()
    };
    let channel = gangplank_tls::channel("127.0.0.1", addr.port(), &options).unwrap();
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
                hostname: "vm-0".into(),
                addresses: vec!["10.0.0.1".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .registration
        .unwrap();
    let key = NamespacedName::new(registration.namespace, registration.name);
    (client, key, registration.session)
}

/// Opens the agent's Session stream; returns the sender of its messages and the endpoint's.
async fn session(
    client: &mut OnboardingClient<tonic::transport::Channel>,
    session: &str,
) -> (
    tokio::sync::mpsc::Sender<proto::AgentMessage>,
    tonic::Streaming<proto::EndpointMessage>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {session}").parse().unwrap());
    let mut stream = client.session(request).await.unwrap().into_inner();
    let welcome = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        welcome.kind,
        Some(proto::endpoint_message::Kind::Welcome(_))
    ));
    (tx, stream)
}

fn heartbeat() -> proto::AgentMessage {
    proto::AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat {})),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_no_call_in_flight_is_closed_after_the_idle_timeout_and_an_agent_stream_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let registry = setup(root, "", "connections: {idleTimeout: 1s}\n").await;
    let endpoint = start(root).await;

    // Finished TLS, then silence: closed after the idle timeout, not before.
    let mut silent = handshake(root, endpoint.addr).await.expect("TLS handshake");
    let after = closed_within(&mut silent, Duration::from_secs(10))
        .await
        .expect("a silent TLS connection is still open 10 s after idleTimeout (1s)");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}, before the idle timeout"
    );
    wait_metric(&endpoint, IDLE, 1.0).await;

    // A call, then nothing (the client keeps its connection): the endpoint closes it once
    // the call has been over for 1 s.
    let options = gangplank_tls::ClientOptions {
        ca_bundle: Some(ca(root)),
        ..Default::default()
    };
    let channel = gangplank_tls::channel("127.0.0.1", endpoint.addr.port(), &options).unwrap();
    let mut caller = OnboardingClient::new(channel);
    caller.discover(proto::DiscoverRequest {}).await.unwrap();
    wait_metric(&endpoint, IDLE, 2.0).await;
    wait_metric(&endpoint, CONNECTIONS, 0.0).await;
    drop(caller);

    // An agent's open Session stream keeps its connection: it outlives three idle timeouts.
    // A fixed window (nothing happening has no event to wait for), heartbeats flowing.
    let (mut client, _key, token) = onboard(root, &registry, endpoint.addr).await;
    let (tx, mut stream) = session(&mut client, &token).await;
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(3) {
        tx.send(heartbeat()).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        assert!(
            ended.is_err(),
            "the endpoint ended an agent's open stream: {ended:?}"
        );
    }
    assert_eq!(
        metric(&endpoint, IDLE).await,
        Some(2.0),
        "an agent's connection was closed as idle"
    );
    assert_eq!(metric(&endpoint, CONNECTIONS).await, Some(1.0));
    drop(tx);
    endpoint.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_caps_wait_or_are_closed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(
        root,
        "",
        "connections: {max: 3, maxHandshakes: 1, handshakeTimeout: 3s, idleTimeout: 1m}\n",
    )
    .await;
    let endpoint = start(root).await;
    let refused =
        |reason: &str| format!("gangplank_endpoint_connections_refused_total{{reason=\"{reason}\"}}");

    // A client that connects and never starts TLS holds the only handshake slot: the next
    // handshake waits for it (it is not turned away) and is served once the silent one is
    // closed at the handshake timeout.
    // The wait and the handshake together get handshakeTimeout from the accept, so the
    // waiting client comes 1 s after the silent one: when the slot frees (the silent one's
    // timeout, 3 s) it has 1 s left for a handshake that takes milliseconds here. Arriving at
    // once would leave it a race against its own deadline.
    let mut silent = TcpStream::connect(endpoint.addr).await.unwrap();
    wait_metric(&endpoint, CONNECTIONS, 1.0).await;
    let held_since = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waited = handshake(root, endpoint.addr).await;
    assert!(
        held_since.elapsed() >= Duration::from_millis(2500),
        "served {:?} after the only handshake slot was taken, before it was freed",
        held_since.elapsed()
    );
    assert!(
        waited.is_ok(),
        "a handshake waiting for a slot was turned away: {waited:?}"
    );
    drop(waited);
    // (Closed already: its slot is what let the waiting handshake through.)
    closed_within(&mut silent, Duration::from_secs(10))
        .await
        .expect("a client that never started TLS is still connected after handshakeTimeout");
    // (At least this one: a connection the test's start-up check opened may have timed out too.)
    let timed_out = refused("handshake_timeout");
    eventually("a handshake timeout is counted", WAIT, POLL, || async {
        metric(&endpoint, &timed_out).await >= Some(1.0)
    })
    .await;
    wait_metric(&endpoint, CONNECTIONS, 0.0).await;

    // A slot freed within the timeout serves the one waiting: a burst is served in turn.
    let silent = TcpStream::connect(endpoint.addr).await.unwrap();
    wait_metric(&endpoint, CONNECTIONS, 1.0).await;
    let waiting = tokio::spawn({
        let root = root.to_owned();
        let addr = endpoint.addr;
        async move { handshake(&root, addr).await }
    });
    // The waiting handshake is accepted (it counts as a connection) before the slot frees.
    wait_metric(&endpoint, CONNECTIONS, 2.0).await;
    drop(silent);
    assert!(
        waiting.await.unwrap().is_ok(),
        "a handshake waiting for a slot was not served once the slot was free"
    );
    assert_eq!(metric(&endpoint, &refused("max_handshakes")).await, None);
    wait_metric(&endpoint, CONNECTIONS, 0.0).await;

    // Three open connections (one at a time, so the handshake slot is free): the fourth is
    // closed as accepted.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open_h2(root, endpoint.addr).await);
    }
    wait_metric(&endpoint, CONNECTIONS, 3.0).await;
    let started = Instant::now();
    assert!(
        handshake(root, endpoint.addr).await.is_err(),
        "a connection past connections.max was served"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused after {:?}",
        started.elapsed()
    );
    wait_metric(&endpoint, &refused("max_connections"), 1.0).await;
    assert_eq!(metric(&endpoint, CONNECTIONS).await, Some(3.0));

    // One closes: a new one is served again.
    held.pop();
    wait_metric(&endpoint, CONNECTIONS, 2.0).await;
    held.push(open_h2(root, endpoint.addr).await);
    wait_metric(&endpoint, CONNECTIONS, 3.0).await;
    assert_eq!(metric(&endpoint, &refused("max_connections")).await, Some(1.0));
    assert_eq!(metric(&endpoint, IDLE).await, None);
    drop(held);
    endpoint.shutdown().await;
}

fn resource_version(entry: &WorkloadEntry) -> u64 {
    entry
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("a stored entry has a resourceVersion")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_sidecar_costs_one_health_write_per_interval_and_its_last_report_is_recorded() {
    const FLAPS: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let registry = setup(root, ", healthWriteInterval: 1s", "").await;
    let endpoint = start(root).await;
    let (mut client, key, token) = onboard(root, &registry, endpoint.addr).await;
    let (tx, _stream) = session(&mut client, &token).await;
    let entry = || async { registry.get::<WorkloadEntry>(&key).await.unwrap().unwrap() };
    let before = resource_version(&entry().await);

    // Healthy, unhealthy, healthy, …: the last report is unhealthy.
    let started = Instant::now();
    for i in 0..FLAPS {
        let healthy = i % 2 == 0;
        let message = proto::AgentMessage {
            kind: Some(agent_message::Kind::Health(proto::Health {
                healthy,
                message: format!("flap {i}"),
            })),
        };
        tx.send(message).await.unwrap();
    }
    let last = format!("flap {}", FLAPS - 1);
    eventually("the last report recorded", WAIT, POLL, || async {
        let e = entry().await;
        let condition = &e.status.unwrap_or_default()["conditions"][0];
        condition["type"] == "Healthy"
            && condition["status"] == "False"
            && condition["message"] == last.as_str()
    })
    .await;
    let elapsed = started.elapsed();
    let writes = resource_version(&entry().await) - before;
    // The first change at once, then at most one per second (healthWriteInterval).
    let bound = 2 + elapsed.as_secs();
    assert!(
        (2..=bound).contains(&writes),
        "{FLAPS} health reports in {elapsed:?} caused {writes} writes of the entry (expected 2..={bound})"
    );
    // Counted once the write returned, a moment after the file is there.
    wait_metric(&endpoint, "gangplank_endpoint_health_writes_total", writes as f64).await;
    drop(tx);
    endpoint.shutdown().await;
}

/// The endpoint's log lines that speak of accepting connections.
fn accept_lines(endpoint: &Proc) -> usize {
    endpoint.output().lines().filter(|l| l.contains("accept")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_logs_a_few_lines_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root, "", "").await;
    // 64 descriptors: the endpoint's own (runtime, files, logs) take a few dozen. With
    // util-linux's prlimit, else the shell's ulimit.
    let has_prlimit = Command::new("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = if has_prlimit {
        let mut cmd = Command::new("prlimit");
        cmd.arg("--nofile=64:64").arg("--");
        cmd
    } else {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("ulimit -n 64 && exec \"$0\" \"$@\"");
        cmd
    };
    cmd.arg(env!("CARGO_BIN_EXE_gangplank-endpoint"))
        .arg("--config")
        .arg(root.join("endpoint.yaml"))
        .env("RUST_LOG", "info");
    let mut endpoint = Proc::spawn("endpoint", cmd);
    let addr: std::net::SocketAddr = endpoint
        .wait_for(r"endpoint listening addr=(\S+)", WAIT)
        .parse()
        .unwrap();

    // More connections than descriptors: the kernel queues them, the endpoint's accept
    // fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    endpoint.wait_for(r"accept(ing connections)? fail", WAIT);
    // Held for 3 s: a hot loop would log thousands of lines by now.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(endpoint.running(), "the endpoint died: {}", endpoint.output());
    }
    let lines = accept_lines(&endpoint);
    assert!(
        (1..20).contains(&lines),
        "{lines} log lines about accepting in 3 s of EMFILE:\n{}",
        endpoint.output().lines().take(40).collect::<Vec<_>>().join("\n")
    );

    // Descriptors free again: the endpoint serves.
    drop(held);
    let options = gangplank_tls::ClientOptions {
        ca_bundle: Some(ca(root)),
        ..Default::default()
    };
    let channel = gangplank_tls::channel("127.0.0.1", addr.port(), &options).unwrap();
    let mut client = OnboardingClient::new(channel);
    let discovered = tokio::time::timeout(WAIT, client.discover(proto::DiscoverRequest {}))
        .await
        .expect("Discover answered once descriptors were free")
        .expect("Discover succeeds");
    assert_eq!(discovered.into_inner().plane_id, "plane-hostile");
    endpoint.wait_for("accepting connections works again", WAIT);
    assert!(accept_lines(&endpoint) < 20);
}
