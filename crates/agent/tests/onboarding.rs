//! The onboarding loop against a small in-process `Onboarding` server reached over an
//! in-memory duplex pipe (so tokio's paused clock never races real I/O): files written, sidecar started, token renewed at 70% of
//! its lifetime, config changes restart the sidecar, Leave on shutdown before the sidecar
//! stops, re-onboarding when the endpoint forgets the session.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use gangplank_agent::health::Health;
use gangplank_agent::launcher::{self, Launcher};
use gangplank_agent::{Agent, Config, Status, config, files};
use gangplank_api::proto::{self, onboarding_server};
use gangplank_identity::{Challenge, Provider};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status as RpcStatus, Streaming};

const SESSION: &str = "sess-1";

#[derive(Debug, Clone, PartialEq)]
enum Event {
    OnboardDenied,
    OnboardInFlight,
    Onboarded(Instant),
    SessionRejected,
    SessionOpened,
    Heartbeat,
    Health(bool),
    Renew(Instant),
    Leave(Instant),
}

#[derive(Default)]
struct Plan {
    deny_onboards: usize,
    reject_sessions: usize,
    leave_fails: bool,
    /// How long each Onboard takes before it answers (the entry is made at its start).
    onboard_delay: Duration,
}

struct Shared {
    plan: Mutex<Plan>,
    events: watch::Sender<Vec<Event>>,
    push: Mutex<Option<mpsc::Sender<Result<proto::EndpointMessage, RpcStatus>>>>,
    tokens: Mutex<u32>,
}

#[derive(Clone)]
struct Fake(Arc<Shared>);

impl Fake {
    fn new(plan: Plan) -> Self {
        Fake(Arc::new(Shared {
            plan: Mutex::new(plan),
            events: watch::channel(Vec::new()).0,
            push: Mutex::new(None),
            tokens: Mutex::new(0),
        }))
    }

    fn record(&self, e: Event) {
        self.0.events.send_modify(|v| v.push(e));
    }

    fn events(&self) -> Vec<Event> {
        self.0.events.borrow().clone()
    }

    async fn wait_for(&self, what: &str, f: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let mut rx = self.0.events.subscribe();
        match tokio::time::timeout(Duration::from_secs(3600), rx.wait_for(|v| f(v))).await {
            Ok(Ok(v)) => v.clone(),
            _ => panic!("timed out waiting for {what}: {:?}", self.events()),
        }
    }

    fn next_token(&self) -> proto::BootFile {
        let mut n = self.0.tokens.lock().expect("lock");
        *n += 1;
        proto::BootFile {
            name: "istio-token".into(),
            content: format!("token-{n}").into_bytes(),
            mode: 0o600,
        }
    }

    async fn push(&self, m: proto::endpoint_message::Kind) {
        let tx = self
            .0
            .push
            .lock()
            .expect("lock")
            .clone()
            .expect("a session is open");
        tx.send(Ok(proto::EndpointMessage { kind: Some(m) }))
            .await
            .expect("push");
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn authorized<T>(r: &Request<T>) -> Result<(), RpcStatus> {
    let auth = r.metadata().get("authorization").and_then(|v| v.to_str().ok());
    if auth == Some(&format!("Bearer {SESSION}")) {
        Ok(())
    } else {
        Err(RpcStatus::unauthenticated("unknown session"))
    }
}

fn boot(name: &str, content: &str, mode: u32) -> proto::BootFile {
    proto::BootFile {
        name: name.into(),
        content: content.as_bytes().to_vec(),
        mode,
    }
}

#[tonic::async_trait]
impl onboarding_server::Onboarding for Fake {
    async fn discover(
        &self,
        _: Request<proto::DiscoverRequest>,
    ) -> Result<Response<proto::DiscoverResponse>, RpcStatus> {
        Ok(Response::new(proto::DiscoverResponse {
            plane_id: "plane-1".into(),
            credential_kinds: vec!["join-token".into()],
            nonce: "nonce-1".into(),
            nonce_ttl_seconds: 60,
            aws_sts_url: String::new(),
        }))
    }

    async fn onboard(
        &self,
        request: Request<proto::OnboardRequest>,
    ) -> Result<Response<proto::OnboardResponse>, RpcStatus> {
        let r = request.into_inner();
        let credential = r.credential.unwrap_or_default();
        // A first join carries the agent's key and its proof; every later onboarding of the
        // same agent is a rejoin with that key, naming the entry it was given.
        assert_eq!(credential.public_key.len(), 44, "an Ed25519 SubjectPublicKeyInfo");
        assert_eq!(credential.proof.len(), 64, "an Ed25519 signature");
        match credential.kind.as_str() {
            "join-token" => assert_eq!(
                credential.payload,
                b"plane-1/nonce-1".to_vec(),
                "credential bound to the challenge"
            ),
            "bound-key" => assert_eq!(
                credential.payload,
                br#"{"binding":"ratings-token-t1"}"#.to_vec(),
                "a rejoin names the entry the first join got"
            ),
            other => panic!("unexpected credential kind {other}"),
        }
        assert_eq!(r.nonce, "nonce-1");
        let group = r.workload_group.unwrap_or_default();
        assert_eq!(
            (group.namespace.as_str(), group.name.as_str()),
            ("bookinfo", "ratings")
        );
        let host = r.host.unwrap_or_default();
        assert_eq!(host.agent_version, gangplank_api::VERSION);
        assert_eq!(host.connected_over, "VPC");
        assert_eq!(host.labels.get("version").map(String::as_str), Some("v2"));
        assert!(!host.addresses.is_empty(), "host addresses reported");

        {
            let mut plan = self.0.plan.lock().expect("lock");
            if plan.deny_onboards > 0 {
                plan.deny_onboards -= 1;
                drop(plan);
                self.record(Event::OnboardDenied);
                return Err(RpcStatus::permission_denied(
                    "no OnboardingPolicy in namespace bookinfo allows join token \"t1\"",
                ));
            }
        }
        let delay = self.0.plan.lock().expect("lock").onboard_delay;
        if !delay.is_zero() {
            self.record(Event::OnboardInFlight);
            tokio::time::sleep(delay).await;
        }
        let now = unix_now();
        self.record(Event::Onboarded(Instant::now()));
        Ok(Response::new(proto::OnboardResponse {
            registration: Some(proto::Registration {
                namespace: "bookinfo".into(),
                name: "ratings-token-t1".into(),
                address: host.addresses[0].clone(),
                labels: Default::default(),
                session: SESSION.into(),
                identity: "join-token:bookinfo/t1".into(),
            }),
            files: vec![
                boot("cluster.env", "ISTIO_NAMESPACE='bookinfo'\n", 0o644),
                boot("mesh.yaml", "defaultConfig: {}\n", 0o644),
                boot("root-cert.pem", "-----BEGIN CERTIFICATE-----\n", 0o644),
                self.next_token(),
                boot("hosts", "10.1.1.1 istiod.istio-system.svc\n", 0o644),
            ],
            token_issued_at: now,
            token_expires_at: now + 100,
        }))
    }

    async fn check(
        &self,
        _: Request<proto::OnboardRequest>,
    ) -> Result<Response<proto::CheckResponse>, RpcStatus> {
        Err(RpcStatus::unimplemented("the agent never calls Check"))
    }

    type SessionStream = ReceiverStream<Result<proto::EndpointMessage, RpcStatus>>;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, RpcStatus> {
        authorized(&request)?;
        {
            let mut plan = self.0.plan.lock().expect("lock");
            if plan.reject_sessions > 0 {
                plan.reject_sessions -= 1;
                drop(plan);
                self.record(Event::SessionRejected);
                return Err(RpcStatus::unauthenticated("session expired"));
            }
        }
        self.record(Event::SessionOpened);
        let (tx, rx) = mpsc::channel(16);
        tx.send(Ok(proto::EndpointMessage {
            kind: Some(proto::endpoint_message::Kind::Welcome(proto::Welcome {
                replica: "replica-0".into(),
                heartbeat_seconds: 5,
            })),
        }))
        .await
        .map_err(|_| RpcStatus::internal("closed"))?;
        *self.0.push.lock().expect("lock") = Some(tx.clone());
        let mut inbound = request.into_inner();
        let fake = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.kind {
                    Some(proto::agent_message::Kind::Heartbeat(_)) => fake.record(Event::Heartbeat),
                    Some(proto::agent_message::Kind::Health(h)) => fake.record(Event::Health(h.healthy)),
                    Some(proto::agent_message::Kind::RenewToken(_)) => {
                        fake.record(Event::Renew(Instant::now()));
                        let now = unix_now();
                        let renewed = proto::TokenRenewed {
                            token: Some(fake.next_token()),
                            issued_at: now,
                            expires_at: now + 100,
                        };
                        let m = proto::EndpointMessage {
                            kind: Some(proto::endpoint_message::Kind::TokenRenewed(renewed)),
                        };
                        if tx.send(Ok(m)).await.is_err() {
                            break;
                        }
                    }
                    None => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn leave(
        &self,
        request: Request<proto::LeaveRequest>,
    ) -> Result<Response<proto::LeaveResponse>, RpcStatus> {
        authorized(&request)?;
        self.record(Event::Leave(Instant::now()));
        if self.0.plan.lock().expect("lock").leave_fails {
            return Err(RpcStatus::unavailable("registry unavailable"));
        }
        Ok(Response::new(proto::LeaveResponse {
            propagation_delay_seconds: 3,
        }))
    }
}

/// A credential that proves it saw the challenge.
struct Bound;

#[async_trait]
impl Provider for Bound {
    fn kind(&self) -> &'static str {
        "join-token"
    }
    async fn credential(&self, c: &Challenge) -> gangplank_identity::Result<proto::Credential> {
        Ok(proto::Credential {
            kind: "join-token".into(),
            payload: format!("{}/{}", c.plane_id, c.nonce).into_bytes(),
            ..Default::default()
        })
    }
}

/// A launcher that records what it was asked, and when.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(&'static str, Instant)>>>);

impl Recorder {
    fn calls(&self) -> Vec<&'static str> {
        self.0.lock().expect("lock").iter().map(|(c, _)| *c).collect()
    }
    fn at(&self, call: &str) -> Option<Instant> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .find(|(c, _)| *c == call)
            .map(|(_, t)| *t)
    }
    fn push(&self, c: &'static str) {
        self.0.lock().expect("lock").push((c, Instant::now()));
    }
}

#[async_trait]
impl Launcher for Recorder {
    async fn start(&mut self) -> launcher::Result<()> {
        self.push("start");
        Ok(())
    }
    async fn restart(&mut self) -> launcher::Result<()> {
        self.push("restart");
        Ok(())
    }
    async fn stop(&mut self) -> launcher::Result<()> {
        self.push("stop");
        Ok(())
    }
    fn health(&self) -> Health {
        match self.0.lock().expect("lock").last() {
            Some(("stop", _)) | None => Health::Stopped,
            _ => Health::Running,
        }
    }
}

struct Setup {
    fake: Fake,
    launcher: Recorder,
    files: config::Files,
    status: watch::Receiver<Status>,
    stop: oneshot::Sender<()>,
    run: tokio::task::JoinHandle<gangplank_agent::run::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(plan: Plan) -> Setup {
    let fake = Fake::new(plan);
    let (conns, incoming) = mpsc::unbounded_channel::<tokio::io::DuplexStream>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(onboarding_server::OnboardingServer::new(fake.clone()))
            .serve_with_incoming(UnboundedReceiverStream::new(incoming).map(Ok::<_, std::io::Error>)),
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let onboarding = config::Onboarding::parse(
        Path::new("onboarding.yaml"),
        &format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: OnboardingConfiguration
onboardingEndpoint:
  host: 127.0.0.1
  port: {}
workloadGroup:
  namespace: bookinfo
  name: ratings
workload:
  labels:
    version: v2
",
            15443
        ),
    )
    .expect("onboarding config");
    let agent = config::Agent::parse(
        Path::new("agent.yaml"),
        &format!(
            // The recording launcher is the whole sidecar: no readiness endpoint to probe.
            "sidecar:\n  readinessUrl: \"\"\nfiles:\n  root: {}\nsettings:\n  retry: {{initial: 1s, max: 4s}}\n",
            dir.path().display()
        ),
    )
    .expect("agent config");
    let config = Config { onboarding, agent };
    let files = config.agent.files.clone();

    let channel = tonic::transport::Endpoint::from_static("http://fake-endpoint")
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let sent = conns.send(server);
            async move {
                sent.map_err(|_| std::io::Error::other("fake endpoint gone"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
            }
        }));
    let launcher = Recorder::default();
    let agent = Agent::with_channel(&config, channel)
        .with_provider(Arc::new(Bound))
        .with_launcher(Box::new(launcher.clone()))
        .with_writer(files::Writer::without_owner(files.clone()));
    let status = agent.status();
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));
    Setup {
        fake,
        launcher,
        files,
        status,
        stop,
        run,
        _dir: dir,
    }
}

async fn wait_connected(status: &mut watch::Receiver<Status>) -> Status {
    let s = tokio::time::timeout(
        Duration::from_secs(600),
        status.wait_for(|s| matches!(s, Status::Registered { connected: true, .. })),
    )
    .await
    .unwrap_or_else(|_| panic!("agent connects"))
    .expect("agent alive");
    s.clone()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    // The clock is paused: the polls advance virtual time, they do not wait.
    let (timeout, every) = (Duration::from_secs(600), Duration::from_millis(100));
    gangplank_testkit::process::eventually(what, timeout, every, || std::future::ready(f())).await;
}

#[tokio::test(start_paused = true)]
async fn onboards_writes_files_renews_at_70_percent_and_leaves_before_stopping() {
    let mut s = start(Plan {
        deny_onboards: 1,
        ..Plan::default()
    })
    .await;

    // A refusal is retried: the policy may appear later.
    let status = wait_connected(&mut s.status).await;
    let Status::Registered { entry, .. } = status else {
        unreachable!()
    };
    assert_eq!(entry.to_string(), "bookinfo/ratings-token-t1");
    let events = s.fake.events();
    assert_eq!(events[0], Event::OnboardDenied);
    assert!(matches!(events[1], Event::Onboarded(_)), "{events:?}");

    // Boot files, with their modes; the hosts entry lives in the agent's block.
    let f = &s.files;
    assert_eq!(
        std::fs::read_to_string(&f.cluster_env).expect("cluster.env"),
        "ISTIO_NAMESPACE='bookinfo'\n"
    );
    assert_eq!(
        std::fs::read_to_string(&f.mesh).expect("mesh"),
        "defaultConfig: {}\n"
    );
    assert_eq!(std::fs::read_to_string(&f.token).expect("token"), "token-1");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&f.token), 0o600);
    assert_eq!(mode(&f.cluster_env), 0o644);
    let hosts = std::fs::read_to_string(&f.hosts).expect("hosts");
    assert!(
        hosts.contains("# BEGIN gangplank\n")
            && hosts.contains("10.1.1.1 istiod.istio-system.svc\n# END gangplank\n"),
        "{hosts}"
    );

    // New files: the sidecar is (re)started once.
    assert_eq!(s.launcher.calls(), vec!["restart"]);

    // Renewal at 70% of the 100 s lifetime.
    let events = s
        .fake
        .wait_for("a token renewal", |e| {
            e.iter().any(|e| matches!(e, Event::Renew(_)))
        })
        .await;
    let onboarded = events
        .iter()
        .find_map(|e| {
            if let Event::Onboarded(t) = e {
                Some(*t)
            } else {
                None
            }
        })
        .expect("onboarded");
    let renewed = events
        .iter()
        .find_map(|e| if let Event::Renew(t) = e { Some(*t) } else { None })
        .expect("renewed");
    let after = renewed - onboarded;
    assert!(
        after >= Duration::from_secs(69) && after <= Duration::from_secs(71),
        "renewed after {after:?}"
    );
    // Heartbeats every 5 s (the endpoint's Welcome), health reported once.
    let heartbeats = events.iter().filter(|e| **e == Event::Heartbeat).count();
    assert!(
        (12..=15).contains(&heartbeats),
        "{heartbeats} heartbeats in ~70 s"
    );
    assert_eq!(
        events.iter().filter(|e| matches!(e, Event::Health(true))).count(),
        1,
        "{events:?}"
    );

    // The renewed token is written in place; the sidecar keeps running.
    let token = f.token.clone();
    eventually("the renewed token", || {
        std::fs::read_to_string(&token).ok().as_deref() == Some("token-2")
    })
    .await;
    assert_eq!(mode(&f.token), 0o600);
    assert_eq!(s.launcher.calls(), vec!["restart"]);

    // New configuration: written, and the sidecar restarts.
    s.fake
        .push(proto::endpoint_message::Kind::ConfigChanged(
            proto::ConfigChanged {
                files: vec![boot(
                    "cluster.env",
                    "ISTIO_NAMESPACE='bookinfo'\nISTIO_META_NETWORK='n2'\n",
                    0o644,
                )],
            },
        ))
        .await;
    let launcher = s.launcher.clone();
    eventually("a restart after ConfigChanged", || launcher.calls().len() == 2).await;
    assert_eq!(s.launcher.calls(), vec!["restart", "restart"]);
    assert!(
        std::fs::read_to_string(&f.cluster_env)
            .expect("cluster.env")
            .contains("n2")
    );

    // Shutdown: Leave, wait the propagation delay, then stop the sidecar.
    s.stop.send(()).expect("agent running");
    tokio::time::timeout(Duration::from_secs(60), s.run)
        .await
        .expect("agent exits")
        .expect("agent task")
        .expect("clean shutdown");
    let events = s.fake.events();
    let left = events
        .iter()
        .find_map(|e| if let Event::Leave(t) = e { Some(*t) } else { None })
        .expect("Leave was called");
    let stopped = s.launcher.at("stop").expect("sidecar stopped");
    assert!(
        stopped - left >= Duration::from_secs(3),
        "stopped {:?} after Leave",
        stopped - left
    );
    assert_eq!(s.launcher.calls(), vec!["restart", "restart", "stop"]);
}

#[tokio::test(start_paused = true)]
async fn forgotten_session_reonboards_and_failed_leave_still_stops_the_sidecar() {
    let mut s = start(Plan {
        reject_sessions: 1,
        leave_fails: true,
        ..Plan::default()
    })
    .await;
    wait_connected(&mut s.status).await;
    let events = s.fake.events();
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Onboarded(_) => Some("onboard"),
            Event::SessionRejected => Some("rejected"),
            Event::SessionOpened => Some("session"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec!["onboard", "rejected", "onboard", "session"]);
    // The second onboarding brought only a new token: no second restart.
    assert_eq!(s.launcher.calls(), vec!["restart"]);

    s.stop.send(()).expect("agent running");
    let result = tokio::time::timeout(Duration::from_secs(60), s.run)
        .await
        .expect("agent exits")
        .expect("agent task");
    let e = result.expect_err("Leave failed");
    assert!(matches!(e, gangplank_agent::run::Error::Leave { .. }), "{e}");
    assert!(e.to_string().contains("registry unavailable"), "{e}");
    assert_eq!(s.launcher.calls(), vec!["restart", "stop"]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_before_registration_leaves_nothing_behind() {
    let s = start(Plan {
        deny_onboards: usize::MAX,
        ..Plan::default()
    })
    .await;
    s.fake.wait_for("three refusals", |e| e.len() >= 3).await;
    s.stop.send(()).expect("agent running");
    tokio::time::timeout(Duration::from_secs(60), s.run)
        .await
        .expect("agent exits")
        .expect("agent task")
        .expect("nothing to leave");
    assert!(s.fake.events().iter().all(|e| *e == Event::OnboardDenied));
    assert!(s.launcher.calls().is_empty());
    assert!(!s.files.token.exists());
}

/// A shutdown while the Onboard call is in flight waits for it, then leaves: the entry the
/// endpoint made is removed, not left to the sweep with the credential spent.
#[tokio::test(start_paused = true)]
async fn shutdown_during_an_onboarding_in_flight_finishes_it_then_leaves() {
    let s = start(Plan {
        onboard_delay: Duration::from_secs(2),
        ..Plan::default()
    })
    .await;
    s.fake
        .wait_for("an onboarding in flight", |e| e.contains(&Event::OnboardInFlight))
        .await;
    s.stop.send(()).expect("agent running");
    tokio::time::timeout(Duration::from_secs(60), s.run)
        .await
        .expect("agent exits")
        .expect("agent task")
        .expect("left cleanly");
    let events = s.fake.events();
    assert!(matches!(events.last(), Some(Event::Leave(_))), "{events:?}");
    assert!(
        events.iter().any(|e| matches!(e, Event::Onboarded(_))),
        "{events:?}"
    );
}
