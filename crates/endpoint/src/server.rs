//! Runs the endpoint: gRPC and the sidecar-token issuer's OIDC documents over TLS on one
//! port, health and metrics in plain HTTP on another, and the sweep.
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

/// The router for one connection: every request carries the [`Connection`].
#[derive(Clone)]
struct OnConnection {
    router: axum::Router,
    connection: Connection,
}

impl<B> tower::Service<http::Request<B>> for OnConnection
where
    axum::Router: tower::Service<http::Request<B>>,
{
    type Response = <axum::Router as tower::Service<http::Request<B>>>::Response;
    type Error = <axum::Router as tower::Service<http::Request<B>>>::Error;
    type Future = <axum::Router as tower::Service<http::Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<B>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.connection);
        self.router.call(request)
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
    let (p1, p2) = (plane.clone(), plane.clone());
    let router = tonic::service::Routes::new(service)
        .into_axum_router()
        .route(
            "/.well-known/openid-configuration",
            get(move || async move { axum::Json(p1.keys.openid_configuration()) }),
        )
        .route(
            "/openid/v1/jwks",
            get(move || async move { axum::Json(p2.keys.jwks()) }),
        );

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

async fn serve_tls(
    listener: TcpListener,
    config: rustls::ServerConfig,
    router: axum::Router,
    plane: Arc<Plane>,
    abort: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    continue;
                }
            },
            _ = plane.stopping.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let abort = abort.clone();
        // Connections carry Onboard and Leave calls, which write: tracked, so a shutdown
        // waits for the calls in flight.
        plane.tasks.spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, %err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // A peer that stops answering HTTP/2 PINGs (a VM powered off, frozen, or cut off)
            // loses its connection, so its stream ends and its entry is marked disconnected
            // (and its bound key may rejoin) instead of looking connected forever.
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT);
            let service = OnConnection {
                router,
                connection: Connection::new(),
            };
            let conn =
                builder.serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(service));
            tokio::select! {
                result = watcher.watch(conn.into_owned()) => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, %err, "connection closed with an error");
                    }
                }
                _ = abort.cancelled() => {}
            }
        });
    }
    // Every connection is told to finish (HTTP/2 GOAWAY): in-flight calls complete, agent
    // streams end as their session tasks see `stopping`.
    drop(listener);
    graceful.shutdown().await;
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
