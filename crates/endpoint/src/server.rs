//! Runs the endpoint: gRPC, the sidecar-token issuer's OIDC documents and the agent's
//! packages (`/install/`) over TLS on one port, health and metrics in plain HTTP on another,
//! and the sweep.
//!
//! Shutdown drains, as ztunnel's does: [`Endpoint::shutdown`] stops accepting, tells every
//! tracked task ([`Plane::tasks`]: agent streams, the sweep, membership, connections) to
//! finish, and waits for them, so nothing writes to the registry after it returns. On
//! Kubernetes the replica then deletes its own Lease (membership released the sweeper Lease
//! as it stopped), once its agent streams have recorded their disconnects.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use gangplank_api::proto::onboarding_server::OnboardingServer;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the endpoint pings an idle HTTP/2 connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

use crate::config::{Config, Serving};
use crate::error::{Error, Result};
use crate::plane::Plane;
use crate::service::Service;

/// The TLS connection a request came on, put in every request's extensions: a session is
/// bound to the connection it was issued on (a copied session token is useless elsewhere
/// without the VM's bound key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection(u64);

impl Connection {
    /// A new connection's id: random, so ids never repeat across replicas or restarts.
    fn new() -> Self {
        Self(rand::random())
    }

    /// The id as the session token records it.
    pub fn id(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Largest request the gRPC service decodes.
const MAX_MESSAGE: usize = 256 * 1024;
/// How long a shutdown waits for agent streams, in-flight calls and the sweep to finish
/// before it cancels what remains.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A running endpoint.
pub struct Endpoint {
    /// The TLS (gRPC + HTTPS) address it listens on.
    pub addr: SocketAddr,
    /// The health and metrics address.
    pub monitoring_addr: SocketAddr,
    /// The plane (for tests and embedding).
    pub plane: Arc<Plane>,
    /// Cancelled once the drain deadline passes: connections still open are dropped.
    abort: CancellationToken,
    /// The listeners and the certificate watcher (not registry writers).
    servers: TaskTracker,
    /// This replica's membership, on Kubernetes.
    membership: Option<crate::membership::Membership>,
}

impl Endpoint {
    /// Stops accepting, ends every agent stream (each records its disconnect), lets in-flight
    /// calls and a sweep pass under way finish, and waits for all of it (at most
    /// [`DRAIN_DEADLINE`], then what remains is cancelled), then deletes this replica's
    /// Lease. Once it returns, nothing the endpoint started writes to the registry.
    pub async fn shutdown(self) {
        let plane = &self.plane;
        plane.stopping.cancel();
        plane.tasks.close();
        self.servers.close();
        let drained = async {
            plane.tasks.wait().await;
            self.servers.wait().await;
        };
        if tokio::time::timeout(DRAIN_DEADLINE, drained).await.is_err() {
            tracing::warn!(
                deadline = ?DRAIN_DEADLINE,
                "shutdown: tasks still running after the drain deadline; cancelling them"
            );
            self.abort.cancel();
            plane.tasks.wait().await;
            self.servers.wait().await;
        }
        if let Some(membership) = &self.membership {
            membership.leave_on_shutdown().await;
        }
    }
}

/// The serving certificate: files (reloaded when they change), or a dev CA + certificate
/// kept in the state dir (generated once, so agents keep trusting it across restarts).
fn tls(config: &Config, servers: &TaskTracker, stopping: &CancellationToken) -> Result<rustls::ServerConfig> {
    let (cert, key) = match &config.serving {
        Serving::Files { cert, key } => (cert.clone(), key.clone()),
        Serving::Dev { names } => dev_certificate(&config.file.state_dir, names)?,
    };
    let reloading = gangplank_tls::ReloadingServer::load(&cert, &key)?;
    let server_config = reloading.server_config()?;
    let watcher = reloading.watch(Duration::from_secs(10));
    let stopping = stopping.clone();
    servers.spawn(async move {
        stopping.cancelled().await;
        drop(watcher);
    });
    Ok(server_config)
}

/// The dev certificate's files in `state_dir/dev-tls`, generated when absent.
fn dev_certificate(
    state_dir: &std::path::Path,
    names: &[String],
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = state_dir.join("dev-tls");
    let (cert, key, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    if cert.exists() && key.exists() && ca.exists() {
        return Ok((cert, key));
    }
    let write = |path: &std::path::Path, source| Error::Write {
        setting: "stateDir",
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| write(&dir, e))?;
    let public = |path: &std::path::Path, pem: &str| {
        gangplank_fs::write(path, pem.as_bytes(), 0o644).map_err(|e| write(path, e.source))
    };
    let dev_ca = gangplank_tls::dev::Ca::generate("gangplank dev CA")?;
    let mut all: Vec<&str> = vec!["localhost"];
    all.extend(names.iter().map(String::as_str));
    let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    let issued = dev_ca.issue(&all, &ips)?;
    crate::keys::write_secret(&key, issued.key_pem.as_bytes())?;
    public(&cert, &issued.cert_pem)?;
    public(&ca, dev_ca.cert_pem())?;
    tracing::warn!(ca = %ca.display(), "serving a generated DEV certificate; agents must trust this CA. Never in production");
    Ok((cert, key))
}

/// Starts the endpoint with a built plane ([`crate::plane::build`]); returns once it
/// listens. Starts the sweep and, on Kubernetes, this replica's membership.
pub async fn start(plane: Plane) -> Result<Endpoint> {
    let servers = TaskTracker::new();
    let abort = CancellationToken::new();
    let tls_config = tls(&plane.config, &servers, &plane.stopping)?;
    let listen = plane.config.file.listen;
    let monitoring_listen = plane.config.file.monitoring_listen;
    let plane = Arc::new(plane);

    let service = OnboardingServer::new(Service::new(plane.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(4 * 1024 * 1024);
    let (p1, p2, p3) = (plane.clone(), plane.clone(), plane.clone());
    let router = tonic::service::Routes::new(service)
        .into_axum_router()
        .route(
            "/.well-known/openid-configuration",
            get(move || async move { axum::Json(p1.keys.openid_configuration()) }),
        )
        .route(
            "/openid/v1/jwks",
            get(move || async move { axum::Json(p2.keys.jwks()) }),
        )
        // Public, like the OIDC documents: a VM fetches the agent before it has a credential.
        .merge(crate::install::routes(p3));

    check_descriptor_limit(plane.config.file.connections.max);
    let (listener, addr) = bind("listen", listen).await?;
    if plane.config.token_issuer_defaulted {
        plane
            .keys
            .set_issuer(crate::config::default_issuer(&plane.config.file, addr.port()));
    }
    let (monitoring, monitoring_addr) = bind("monitoringListen", monitoring_listen).await?;

    servers.spawn(serve_tls(
        listener,
        tls_config,
        router,
        plane.clone(),
        abort.clone(),
    ));
    servers.spawn(serve_monitoring(monitoring, plane.clone()));
    plane.tasks.spawn(crate::sweep::run(plane.clone()));
    let membership = crate::membership::start(&plane);
    tracing::info!(%addr, %monitoring_addr, plane = %plane.config.file.plane_id, replica = %plane.config.replica, "endpoint listening");
    Ok(Endpoint {
        addr,
        monitoring_addr,
        plane,
        abort,
        servers,
        membership,
    })
}

/// Descriptors the endpoint needs besides its connections (runtime, listeners, files, the
/// registry's watches).
const DESCRIPTOR_HEADROOM: u64 = 256;

/// Warns when the process cannot hold `connections.max` connections: past its descriptor
/// limit new connections fail in the kernel (and the endpoint backs off) instead of being
/// refused cleanly at the cap.
fn check_descriptor_limit(max: usize) {
    use nix::sys::resource::{Resource, getrlimit};
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < max as u64 + DESCRIPTOR_HEADROOM
    {
        tracing::warn!(
            descriptor_limit = soft,
            "connections.max ({max}) plus {DESCRIPTOR_HEADROOM} for the endpoint's own files is more than the \
             process's descriptor limit: raise it (LimitNOFILE=, ulimit -n, the container runtime's nofile) or lower connections.max"
        );
    }
}

/// Binds `setting`'s address; returns the listener and the address actually bound.
async fn bind(setting: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let fail = |source| Error::Bind {
        setting,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((listener, bound))
}

/// The accept loop's first wait after a failure that is not the peer's doing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The accept loop's longest wait: descriptors freed are used within a second.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A flood (accept failures, refused connections) logs at most one line this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long an idle connection told to close may take to say goodbye (HTTP/2 GOAWAY).
const CLOSE_GRACE: Duration = Duration::from_secs(5);

async fn serve_tls(
    listener: TcpListener,
    config: rustls::ServerConfig,
    router: axum::Router,
    plane: Arc<Plane>,
    abort: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let limits = &plane.config.file.connections;
    let connections = Arc::new(Semaphore::new(limits.max));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let mut backoff = AcceptBackoff::default();
    let mut over_connections = LogEvery::default();
    let over_handshakes = Arc::new(std::sync::Mutex::new(LogEvery::default()));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.succeeded(Instant::now());
                    a
                }
                Err(err) if is_peer_error(&err) => {
                    tracing::debug!(%err, "a connection failed before it was accepted");
                    continue;
                }
                // Out of descriptors or memory: the pending connection stays queued, so
                // accepting again at once would fail again at once (a hot loop, a log flood).
                Err(err) => {
                    let wait = backoff.failed(&err, Instant::now());
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = plane.stopping.cancelled() => break,
                    }
                }
            },
            () = plane.stopping.cancelled() => break,
        };
        // Refused by closing at once, so the kernel's backlog keeps moving and the
        // descriptor is free again; the agent retries with backoff (or another replica).
        let Ok(connection) = connections.clone().try_acquire_owned() else {
            drop(tcp);
            refuse(&plane, &mut over_connections, "max_connections", peer, limits.max);
            continue;
        };
        let accepted = Accepted {
            tcp,
            peer,
            held: Held::new(plane.clone(), connection),
            handshakes: handshakes.clone(),
            over_handshakes: over_handshakes.clone(),
        };
        // Connections carry Onboard and Leave calls, which write: tracked, so a shutdown
        // waits for the calls in flight.
        plane.tasks.spawn(serve_connection(
            plane.clone(),
            accepted,
            acceptor.clone(),
            router.clone(),
            abort.clone(),
        ));
    }
    drop(listener);
}

/// A connection accepted within the limits.
struct Accepted {
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    /// Its place under `connections.max`, for as long as it lives.
    held: Held,
    /// The places under `connections.maxHandshakes`: it waits for one, then holds it until
    /// TLS is done.
    handshakes: Arc<Semaphore>,
    over_handshakes: Arc<std::sync::Mutex<LogEvery>>,
}

/// TLS, then HTTP/2 (or HTTP/1.1 for the OIDC documents and packages: curl, wget) until the
/// peer closes, it is idle for `connections.idleTimeout`, or the endpoint stops.
async fn serve_connection(
    plane: Arc<Plane>,
    accepted: Accepted,
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
    abort: CancellationToken,
) {
    let Accepted {
        tcp,
        peer,
        held: _held,
        handshakes,
        over_handshakes,
    } = accepted;
    let limits = &plane.config.file.connections;
    // The handshake cap bounds the TLS work done at once. A connection over it waits its
    // turn, within `handshakeTimeout` counted from its accept, instead of being turned away:
    // a thousand agents reconnecting at once (an endpoint restart, a failover) are all served,
    // a slowloris holding the slots only delays them.
    let accepted_at = tokio::time::Instant::now();
    let deadline = accepted_at + limits.handshake_timeout;
    // Neither the wait nor the handshake holds up a shutdown: a connection not yet served
    // when the endpoint stops is dropped.
    let handshake = tokio::select! {
        permit = tokio::time::timeout_at(deadline, handshakes.acquire_owned()) => match permit {
            Ok(Ok(permit)) => permit,
            _ => {
                let mut log = over_handshakes.lock().unwrap_or_else(|p| p.into_inner());
                refuse(&plane, &mut log, "max_handshakes", peer, limits.max_handshakes);
                return;
            }
        },
        () = plane.stopping.cancelled() => return,
    };
    let accepted = tokio::select! {
        tls = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => tls,
        () = plane.stopping.cancelled() => return,
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            plane.metrics.refused("handshake_timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    drop(handshake);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A peer that stops answering HTTP/2 PINGs (a VM powered off, frozen, or cut off)
    // loses its connection, so its stream ends and its entry is marked disconnected
    // (and its bound key may rejoin) instead of looking connected forever.
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let activity = Activity::default();
    let conn = builder.serve_connection_with_upgrades(
        TokioIo::new(tls),
        TowerToHyperService::new(activity.track(router, Connection::new())),
    );
    let mut conn = std::pin::pin!(conn);
    let idle = tokio::select! {
        result = conn.as_mut() => {
            closed(peer, result);
            return;
        }
        () = activity.idle(limits.idle_timeout) => true,
        () = plane.stopping.cancelled() => false,
        () = abort.cancelled() => return,
    };
    if idle {
        plane.metrics.refused("idle");
        tracing::debug!(%peer, timeout = ?limits.idle_timeout, "closing a connection idle for connections.idleTimeout");
    }
    // HTTP/2 GOAWAY: calls in flight complete (agent streams end as their session tasks see
    // `stopping`); an idle connection has none and closes at once.
    conn.as_mut().graceful_shutdown();
    let grace = async {
        match idle {
            true => tokio::time::sleep(CLOSE_GRACE).await,
            false => std::future::pending().await,
        }
    };
    tokio::select! {
        result = conn => closed(peer, result),
        () = grace => {}
        () = abort.cancelled() => {}
    }
}

/// Logs how a connection ended, unless it ended as asked.
fn closed(peer: SocketAddr, result: std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(err) = result {
        // A connection told to close before it said which HTTP version it speaks (a silent
        // client closed as idle) ends "interrupted": as asked.
        let interrupted = err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::Interrupted);
        if !interrupted {
            tracing::debug!(%peer, %err, "connection closed with an error");
        }
    }
}

/// Closes a connection accepted past `reason`'s limit, and counts it.
fn refuse(plane: &Plane, log: &mut LogEvery, reason: &'static str, peer: SocketAddr, limit: usize) {
    plane.metrics.refused(reason);
    if let Some(suppressed) = log.ready(Instant::now()) {
        let setting = match reason {
            "max_connections" => "connections.max",
            _ => "connections.maxHandshakes",
        };
        let when = match reason {
            "max_connections" => "at once",
            _ => "after waiting connections.handshakeTimeout for a handshake slot",
        };
        tracing::warn!(%peer, limit, suppressed, "closed a connection {when}: {setting} reached; agents retry (raise it, or add replicas)");
    }
}

/// Whether a failed accept is one connection's problem (the peer reset it, the network
/// dropped it): the next accept is unaffected. `accept(2)` lists these for TCP.
fn is_peer_error(err: &std::io::Error) -> bool {
    use nix::errno::Errno as E;
    err.raw_os_error().map(E::from_raw).is_some_and(|e| {
        matches!(
            e,
            E::ECONNABORTED
                | E::ECONNRESET
                | E::EINTR
                | E::EAGAIN
                | E::EPERM
                | E::EPROTO
                | E::ENOPROTOOPT
                | E::ENETDOWN
                | E::ENETUNREACH
                | E::EHOSTDOWN
                | E::EHOSTUNREACH
                | E::ENONET
                | E::EOPNOTSUPP
                | E::ETIMEDOUT
        )
    })
}

/// At most one log line per [`LOG_EVERY`], counting the ones left out.
#[derive(Debug, Default)]
struct LogEvery {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogEvery {
    /// Whether to log now; if so, how many lines were left out since the last.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now < last + LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The accept loop's wait after failures that are not a peer's doing (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM): doubling from [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`], reset
/// when an accept succeeds. Logs one line when failures start, at most one per
/// [`LOG_EVERY`] while they go on, and one when accepting works again.
#[derive(Debug, Default)]
struct AcceptBackoff {
    failing: Option<Failing>,
}

#[derive(Debug)]
struct Failing {
    since: Instant,
    failures: u64,
    wait: Duration,
    log: LogEvery,
}

impl AcceptBackoff {
    /// After a failed accept at `now`: how long to wait before the next.
    fn failed(&mut self, err: &std::io::Error, now: Instant) -> Duration {
        let failing = self.failing.get_or_insert_with(|| Failing {
            since: now,
            failures: 0,
            wait: ACCEPT_BACKOFF_MIN / 2,
            log: LogEvery::default(),
        });
        failing.failures += 1;
        failing.wait = (failing.wait * 2).min(ACCEPT_BACKOFF_MAX);
        if let Some(suppressed) = failing.log.ready(now) {
            if failing.failures == 1 {
                tracing::warn!(%err, "accepting connections fails; backing off until it works again \
                    (out of descriptors: raise the endpoint's limit, LimitNOFILE or the container's nofile ulimit, above connections.max)");
            } else {
                tracing::warn!(%err, failures = failing.failures, suppressed, since = ?(now - failing.since),
                    "accepting connections still fails; backing off");
            }
        }
        failing.wait
    }

    /// After an accept succeeded at `now`.
    fn succeeded(&mut self, now: Instant) {
        if let Some(failing) = self.failing.take() {
            tracing::info!(failures = failing.failures, after = ?(now - failing.since), "accepting connections works again");
        }
    }
}

/// A connection counted against `connections.max` (and in the `connections` gauge) while it
/// lives.
struct Held {
    plane: Arc<Plane>,
    _permit: OwnedSemaphorePermit,
}

impl Held {
    fn new(plane: Arc<Plane>, permit: OwnedSemaphorePermit) -> Self {
        plane.metrics.connections.inc();
        Self {
            plane,
            _permit: permit,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.plane.metrics.connections.dec();
    }
}

/// The calls in flight on one connection, so one that has none for `connections.idleTimeout`
/// is closed (hyper has no HTTP/2 idle timeout). A call is in flight from its request until
/// its response body is sent or dropped: an agent's Session stream keeps its connection busy.
#[derive(Debug, Default)]
struct Activity(Arc<watch::Sender<usize>>);

impl Activity {
    /// `router`, counting each call as in flight on `connection` (which every request
    /// carries in its extensions).
    fn track(&self, router: axum::Router, connection: Connection) -> Tracked {
        Tracked {
            router,
            calls: self.0.clone(),
            connection,
        }
    }

    /// Resolves once no call has been in flight for `timeout`.
    async fn idle(&self, timeout: Duration) {
        let mut calls = self.0.subscribe();
        loop {
            // Every start and end of a call is a change: the clock restarts at the last one.
            let busy = *calls.borrow_and_update() > 0;
            let changed = if busy {
                calls.changed().await
            } else {
                match tokio::time::timeout(timeout, calls.changed()).await {
                    Ok(changed) => changed,
                    Err(_) => return,
                }
            };
            // The sender lives as long as `self`: never closed while this is polled.
            if changed.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The router of one connection, counting its calls (see [`Activity`]).
#[derive(Clone)]
struct Tracked {
    router: axum::Router,
    calls: Arc<watch::Sender<usize>>,
    connection: Connection,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tower::Service<http::Request<hyper::body::Incoming>> for Tracked {
    type Response = http::Response<axum::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<std::result::Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<hyper::body::Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.connection);
        let call = InFlight::new(self.calls.clone());
        let router = self.router.clone();
        Box::pin(async move {
            let response = tower::ServiceExt::oneshot(router, request).await?;
            Ok(response.map(|inner| axum::body::Body::new(TrackedBody { inner, _call: call })))
        })
    }
}

/// One call in flight until dropped.
#[derive(Debug)]
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn new(calls: Arc<watch::Sender<usize>>) -> Self {
        calls.send_modify(|n| *n += 1);
        Self(calls)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A response body that keeps its call in flight until it is sent or dropped.
struct TrackedBody {
    inner: axum::body::Body,
    _call: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn serve_monitoring(listener: TcpListener, plane: Arc<Plane>) {
    let mut registry = prometheus_client::registry::Registry::default();
    plane.metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let metrics = plane.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                metrics.metrics.refresh();
                async move {
                    let mut out = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        out,
                    )
                }
            }),
        );
    let stopping = plane.stopping.clone();
    let shutdown = async move { stopping.cancelled().await };
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(%err, "monitoring server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_second_and_starts_over_once_accepting_works() {
        let t0 = Instant::now();
        let emfile = std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        let mut backoff = AcceptBackoff::default();
        let waits: Vec<_> = (0..9)
            .map(|i| backoff.failed(&emfile, t0 + Duration::from_millis(i)))
            .collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            waits,
            [
                ms(10),
                ms(20),
                ms(40),
                ms(80),
                ms(160),
                ms(320),
                ms(640),
                ms(1000),
                ms(1000)
            ]
        );
        backoff.succeeded(t0 + Duration::from_secs(1));
        assert_eq!(backoff.failed(&emfile, t0 + Duration::from_secs(2)), ms(10));
    }

    #[test]
    fn a_peer_resetting_its_connection_is_not_a_reason_to_back_off() {
        use nix::errno::Errno as E;
        let err = |e: E| std::io::Error::from_raw_os_error(e as i32);
        for peer in [E::ECONNABORTED, E::ECONNRESET, E::EPROTO, E::EINTR] {
            assert!(is_peer_error(&err(peer)), "{peer}");
        }
        for resources in [E::EMFILE, E::ENFILE, E::ENOBUFS, E::ENOMEM] {
            assert!(!is_peer_error(&err(resources)), "{resources}");
        }
    }

    #[test]
    fn a_flood_logs_once_per_interval_with_the_count_left_out() {
        let t0 = Instant::now();
        let mut log = LogEvery::default();
        assert_eq!(log.ready(t0), Some(0));
        for i in 1..=3 {
            assert_eq!(log.ready(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(log.ready(t0 + LOG_EVERY), Some(3));
        assert_eq!(log.ready(t0 + LOG_EVERY + Duration::from_secs(1)), None);
    }
}
