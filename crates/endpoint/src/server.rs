//! Runs the endpoint: gRPC and the sidecar-token issuer's OIDC documents over TLS on one
//! port, health and metrics in plain HTTP on another, and the sweep.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use gangplank_api::proto::onboarding_server::OnboardingServer;
use gangplank_identity::Verifier;
use gangplank_registry::Registry;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::plane::Plane;
use crate::service::Service;

/// Largest request the gRPC service decodes.
const MAX_MESSAGE: usize = 256 * 1024;

/// A running endpoint.
pub struct Endpoint {
    /// The TLS (gRPC + HTTPS) address it listens on.
    pub addr: SocketAddr,
    /// The health and metrics address.
    pub monitoring_addr: SocketAddr,
    /// The plane (for tests and embedding).
    pub plane: Arc<Plane>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Endpoint {
    /// Stops accepting, closes connections (agents see their streams end) and waits.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

fn read_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{what}: cannot read {}", path.display()))
}

/// The serving certificate: files (reloaded when they change), or a dev CA + certificate
/// kept in the state dir (generated once, so agents keep trusting it across restarts).
fn tls(config: &Config) -> anyhow::Result<(rustls::ServerConfig, Option<tokio::task::JoinHandle<()>>)> {
    let tls = &config.file.tls;
    let (cert, key) = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = config.file.state_dir.join("dev-tls");
            let (cert, key, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
            if !cert.exists() || !key.exists() || !ca.exists() {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                let dev_ca = gangplank_tls::dev::Ca::generate("gangplank dev CA")?;
                let mut names: Vec<&str> = vec!["localhost"];
                names.extend(tls.dev_names.iter().map(String::as_str));
                let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
                let issued = dev_ca.issue(&names, &ips)?;
                crate::keys::write_secret(&key, issued.key_pem.as_bytes())?;
                std::fs::write(&cert, &issued.cert_pem)?;
                std::fs::write(&ca, dev_ca.cert_pem())?;
                tracing::warn!(ca = %ca.display(), "serving a generated DEV certificate; agents must trust this CA. Never in production");
            }
            (cert, key)
        }
    };
    let reloading = gangplank_tls::ReloadingServer::load(&cert, &key)?;
    let watcher = reloading.watch(Duration::from_secs(10));
    Ok((reloading.server_config()?, Some(watcher)))
}

/// Builds the plane from the configuration.
pub fn plane(config: Config) -> anyhow::Result<Plane> {
    let file = &config.file;
    if file.registry.kubernetes.is_some() {
        anyhow::bail!(
            "registry.kubernetes: build the plane with gangplank_endpoint::cluster::plane (it connects to the API)"
        );
    }
    let keys = Arc::new(Keys::load(&file.state_dir, &config.token_issuer)?);
    let registry: Arc<dyn Registry> = Arc::new(
        gangplank_registry::dir::Registry::open(&file.registry.directory)
            .with_context(|| format!("registry.directory {}", file.registry.directory.display()))?,
    );
    let verifiers = verifiers(file, &registry)?;
    let mesh_config = match &file.mesh.mesh_config_file {
        Some(path) => {
            let text = String::from_utf8(read_file(path, "mesh.meshConfigFile")?)
                .with_context(|| format!("mesh.meshConfigFile {} is not UTF-8", path.display()))?;
            gangplank_bootstrap::MeshConfig::from_yaml(&text)
                .with_context(|| format!("mesh.meshConfigFile {}", path.display()))?
        }
        None => gangplank_bootstrap::MeshConfig::default(),
    };
    let root_cert = match &file.mesh.root_cert_file {
        Some(path) => read_file(path, "mesh.rootCertFile")?,
        None => anyhow::bail!(
            "mesh.rootCertFile is required: the mesh's root certificate, e.g. from \
             `kubectl get configmap istio-ca-root-cert -n <namespace> -o jsonpath='{{.data.root-cert\\.pem}}'`"
        ),
    };
    let mesh = Arc::new(crate::mesh::Local {
        keys: keys.clone(),
        root_cert,
        mesh_config,
    });
    Ok(Plane {
        config,
        keys,
        registry,
        verifiers,
        mesh,
        live: Mutex::new(Default::default()),
        metrics: Metrics::default(),
    })
}

/// Starts the endpoint with a built plane; returns once it listens.
pub async fn start(plane: Plane) -> anyhow::Result<Endpoint> {
    let (tls_config, watcher) = tls(&plane.config)?;
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

    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen: cannot bind {listen}"))?;
    let addr = listener.local_addr()?;
    if plane.config.token_issuer_defaulted {
        plane
            .keys
            .set_issuer(crate::config::default_issuer(&plane.config.file, addr.port()));
    }
    let monitoring = TcpListener::bind(monitoring_listen)
        .await
        .with_context(|| format!("monitoringListen: cannot bind {monitoring_listen}"))?;
    let monitoring_addr = monitoring.local_addr()?;
    let (stop, stopped) = watch::channel(false);

    let mut tasks = vec![tokio::spawn(serve_tls(
        listener,
        tls_config,
        router,
        stopped.clone(),
    ))];
    tasks.push(tokio::spawn(serve_monitoring(
        monitoring,
        plane.clone(),
        stopped.clone(),
    )));
    let sweeper = tokio::spawn(crate::sweep::run(plane.clone()));
    let mut on_stop = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let _ = on_stop.wait_for(|s| *s).await;
        sweeper.abort();
        if let Some(w) = watcher {
            w.abort();
        }
    }));
    tracing::info!(%addr, %monitoring_addr, plane = %plane.config.file.plane_id, replica = %plane.config.replica, "endpoint listening");
    Ok(Endpoint {
        addr,
        monitoring_addr,
        plane,
        stop,
        tasks,
    })
}

async fn serve_tls(
    listener: TcpListener,
    config: rustls::ServerConfig,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
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
            _ = stop.wait_for(|s| *s) => break,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
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
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn =
                builder.serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(router));
            if let Err(err) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, %err, "connection closed with an error");
            }
        });
    }
    // Streams are long-lived; give in-flight calls a moment, then drop what remains.
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

async fn serve_monitoring(listener: TcpListener, plane: Arc<Plane>, mut stop: watch::Receiver<bool>) {
    let mut registry = prometheus_client::registry::Registry::default();
    plane.metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
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
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(%err, "monitoring server failed");
    }
}

/// The credential verifiers `identities` enables, by kind: join tokens, OIDC JWTs and the
/// cloud platforms (`awsEc2`, `gcpGce`, `azureVm`). Used by every kind of plane.
pub fn verifiers(
    file: &crate::config::File,
    registry: &Arc<dyn Registry>,
) -> anyhow::Result<BTreeMap<&'static str, Arc<dyn Verifier>>> {
    let ids = &file.identities;
    let store = Arc::new(gangplank_registry::IdentityStore::new(registry.clone()));
    let mut verifiers: BTreeMap<&'static str, Arc<dyn Verifier>> = BTreeMap::new();
    if ids.join_tokens {
        let v = gangplank_identity::token::Verifier::new(store.clone());
        verifiers.insert(gangplank_api::kind::JOIN_TOKEN, Arc::new(v));
    }
    if !ids.jwt.issuers.is_empty() {
        let v = gangplank_identity::jwt::Verifier::new(ids.jwt.issuers.clone(), file.plane_id.clone())
            .context("identities.jwt")?;
        verifiers.insert(gangplank_api::kind::JWT, Arc::new(v));
    }
    if let Some(aws) = &ids.aws_ec2 {
        let v = aws.verifier(store.clone()).context("identities.awsEc2")?;
        verifiers.insert(gangplank_api::kind::AWS_EC2, Arc::new(v));
    }
    if let Some(gcp) = &ids.gcp_gce {
        let v = gcp.verifier(file.plane_id.clone()).context("identities.gcpGce")?;
        verifiers.insert(gangplank_api::kind::GCP_GCE, Arc::new(v));
    }
    if let Some(azure) = &ids.azure_vm {
        let v = azure.verifier().context("identities.azureVm")?;
        verifiers.insert(gangplank_api::kind::AZURE_VM, Arc::new(v));
    }
    Ok(verifiers)
}
