//! TLS for Gangplank, on rustls with the aws-lc-rs provider (the only provider in the build).
//!
//! - [`client_config`] / [`channel`]: how the agent reaches the endpoint — verified against a
//!   CA bundle or the system roots; insecure only when the config says so in plain words.
//! - [`server_config_from_pem`] / [`ReloadingServer`]: the endpoint's certificate, reloaded
//!   when its files change (cert-manager rotates them in place).
//! - [`dev`]: a throwaway CA for the quickstart, `--dev-tls` and tests.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

pub mod dev;

/// What can go wrong setting up TLS. Messages name the file and what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// PEM content held no usable certificate or key.
    #[error("{what}: {message}")]
    Pem {
        /// The file or input.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}: set a DNS name or an IP address")]
    ServerName(String),
    /// The endpoint address could not be turned into a URI.
    #[error("invalid endpoint address {0}")]
    Address(String),
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parses every certificate in PEM text; `what` names the source for errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            what: what.into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            what: what.into(),
            message: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) in PEM text.
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem {
        what: what.into(),
        message: match e {
            pem::Error::NoItemsFound => "no PEM private key found".into(),
            other => other.to_string(),
        },
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// How the agent verifies the endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// PEM bundle of CAs to trust; `None` trusts the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Name to verify the certificate against (and send as SNI) instead of the host.
    pub sni: Option<String>,
    /// Accept any certificate. Only when the configuration says so in plain words.
    pub insecure_skip_verify: bool,
}

/// A rustls client config for reaching the endpoint over HTTP/2.
pub fn client_config(options: &ClientOptions) -> Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut config = if options.insecure_skip_verify {
        tracing::warn!("TLS verification of the onboarding endpoint is DISABLED (insecureSkipVerify)");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match &options.ca_bundle {
            Some(path) => {
                for cert in certs_from_pem(&read(path)?, &path.display().to_string())? {
                    roots.add(cert)?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // One unparsable system certificate must not disable the others.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(Error::Pem {
                        what: "system trust store".into(),
                        message: "no CA certificates found: install ca-certificates or set transportSecurity.tls.caBundle".into(),
                    });
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The name the endpoint's certificate is verified against and sent as SNI: `options.sni`,
/// else `host` (an IP address is verified as one).
pub fn server_name(host: &str, options: &ClientOptions) -> Result<ServerName<'static>> {
    let name = options
        .sni
        .clone()
        .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
    ServerName::try_from(name.clone()).map_err(|_| Error::ServerName(name))
}

/// A lazily connecting gRPC channel to `https://host:port`, over our own rustls client (so a
/// CA bundle, an SNI override and an explicit insecure mode all work the same way).
pub fn channel(host: &str, port: u16, options: &ClientOptions) -> Result<tonic::transport::Channel> {
    let config = Arc::new(client_config(options)?);
    let server_name = server_name(host, options)?;
    let authority = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let uri = format!("https://{authority}:{port}");
    let endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|_| Error::Address(uri))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let target = format!("{authority}:{port}");
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Why a TLS handshake with the endpoint failed, in the terms a person fixes it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The certificate chain does not lead to a trusted CA (or is not signed properly).
    Untrusted(String),
    /// The certificate is not valid for the name checked.
    NameMismatch(String),
    /// The certificate expired (or is not valid yet) by this host's clock.
    Expired(String),
    /// Anything else: an alert from the server, a protocol error, the connection closed.
    Other(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Untrusted(m) | Refusal::NameMismatch(m) | Refusal::Expired(m) | Refusal::Other(m) => {
                f.write_str(m)
            }
        }
    }
}

/// What a successful handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// `TLSv1_3`, `TLSv1_2`.
    pub protocol: String,
    /// The application protocol (`h2` for the endpoint), if one was agreed.
    pub alpn: Option<String>,
}

/// Performs a TLS handshake over `tcp` with the agent's client configuration for `host`
/// (the same [`client_config`] and [`server_name`] as [`channel`]), and says why it failed.
pub async fn handshake(
    tcp: tokio::net::TcpStream,
    host: &str,
    options: &ClientOptions,
) -> Result<std::result::Result<Handshake, Refusal>> {
    let config = Arc::new(client_config(options)?);
    let name = server_name(host, options)?;
    let shown = name.to_str().into_owned();
    Ok(
        match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
            Ok(tls) => {
                let (_, conn) = tls.get_ref();
                Ok(Handshake {
                    protocol: conn
                        .protocol_version()
                        .map(|v| format!("{v:?}"))
                        .unwrap_or_default(),
                    alpn: conn
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned()),
                })
            }
            Err(e) => Err(refusal(&e, &shown)),
        },
    )
}

fn refusal(err: &io::Error, name: &str) -> Refusal {
    use rustls::CertificateError as C;
    let Some(rustls::Error::InvalidCertificate(cert)) =
        err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return Refusal::Other(err.to_string());
    };
    match cert {
        C::UnknownIssuer | C::BadSignature => Refusal::Untrusted(format!(
            "the endpoint's certificate chain does not lead to a trusted CA ({cert:?})"
        )),
        C::NotValidForName => {
            Refusal::NameMismatch(format!("the endpoint's certificate is not valid for {name:?}"))
        }
        C::NotValidForNameContext { presented, .. } => Refusal::NameMismatch(format!(
            "the endpoint's certificate is not valid for {name:?} (it names {})",
            presented.join(", ")
        )),
        C::Expired | C::ExpiredContext { .. } => {
            Refusal::Expired(format!("the endpoint's certificate has expired ({cert:?})"))
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            Refusal::Expired(format!("the endpoint's certificate is not valid yet ({cert:?})"))
        }
        other => Refusal::Other(format!("the endpoint's certificate is refused: {other:?}")),
    }
}

/// Accepts any server certificate but still checks handshake signatures. Used only with
/// `insecureSkipVerify: true`.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<Arc<CertifiedKey>> {
    let certs = certs_from_pem(cert_pem, what)?;
    let key = key_from_pem(key_pem, what)?;
    Ok(Arc::new(CertifiedKey::from_der(certs, key, &provider())?))
}

fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A server config for a fixed certificate and key (PEM), speaking HTTP/2 and HTTP/1.1.
pub fn server_config_from_pem(cert_pem: &str, key_pem: &str) -> Result<ServerConfig> {
    let key = certified_key(cert_pem.as_bytes(), key_pem.as_bytes(), "server certificate")?;
    server_config(Arc::new(Fixed(key)))
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A server certificate read from files and reloaded when they change. A reload that fails
/// (half-written files, a key that doesn't match) keeps serving the last good certificate.
#[derive(Debug, Clone)]
pub struct ReloadingServer {
    inner: Arc<Reloading>,
}

#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<SystemTime> {
    let c = std::fs::metadata(cert).and_then(|m| m.modified()).ok()?;
    let k = std::fs::metadata(key).and_then(|m| m.modified()).ok()?;
    Some(c.max(k))
}

impl ReloadingServer {
    /// Loads `cert` and `key` (PEM files); fails if they are unusable now.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let loaded = certified_key(&read(cert)?, &read(key)?, &cert.display().to_string())?;
        let current = RwLock::new((loaded, stamp(cert, key)));
        Ok(Self {
            inner: Arc::new(Reloading {
                cert: cert.into(),
                key: key.into(),
                current,
            }),
        })
    }

    /// The rustls server config that always presents the current certificate.
    pub fn server_config(&self) -> Result<ServerConfig> {
        server_config(self.inner.clone())
    }

    /// Re-reads the files if they changed since the last load. Returns whether a new
    /// certificate is now served.
    pub fn reload_if_changed(&self) -> bool {
        let inner = &self.inner;
        let now = stamp(&inner.cert, &inner.key);
        let last = inner.current.read().map(|c| c.1).unwrap_or(None);
        if now.is_none() || now == last {
            return false;
        }
        let loaded = read(&inner.cert)
            .and_then(|c| read(&inner.key).map(|k| (c, k)))
            .and_then(|(c, k)| certified_key(&c, &k, &inner.cert.display().to_string()));
        match loaded {
            Ok(key) => {
                if let Ok(mut current) = inner.current.write() {
                    *current = (key, now);
                }
                tracing::info!(cert = %inner.cert.display(), "reloaded the TLS certificate");
                true
            }
            Err(err) => {
                tracing::warn!(%err, "TLS certificate changed but cannot be loaded; keeping the previous one");
                false
            }
        }
    }

    /// Checks the files every `every` for as long as the returned [`Watch`] is kept: dropping
    /// it stops the checks.
    pub fn watch(&self, every: Duration) -> Watch {
        let this = self.clone();
        Watch(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                this.reload_if_changed();
            }
        }))
    }
}

/// A running certificate watch ([`ReloadingServer::watch`]); stops when dropped.
#[derive(Debug)]
pub struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}
