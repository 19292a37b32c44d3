//! A stand-in OIDC issuer for tests: OIDC discovery and JWKS over HTTPS on `127.0.0.1:0`,
//! with a certificate from a dev CA, and test signing keys.
//!
//! The endpoint's real JWT verifier runs against it unchanged; only the trust root (the dev
//! CA, given to the verifier as `caBundle`) differs from production.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let issuer = gangplank_testkit::oidc::Issuer::start().await?;
//! let jwt = issuer.sign(&issuer.claims("vm-7", "plane-1"));
//! # Ok(()) }
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A test signing key with its public JWK.
#[derive(Clone)]
pub struct Key {
    kid: String,
    alg: Algorithm,
    private: EncodingKey,
    public: Jwk,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A fresh key for `alg` (ES256, ES384, RS256/384/512 or PS256) named `kid`.
    pub fn generate(alg: Algorithm, kid: &str) -> anyhow::Result<Self> {
        let rcgen_alg = match alg {
            Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Algorithm::ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => {
                &rcgen::PKCS_RSA_SHA256
            }
            other => anyhow::bail!("test keys for {other:?} are not supported"),
        };
        let pair = rcgen::KeyPair::generate_for(rcgen_alg).context("generating a test key")?;
        let pem = pair.serialize_pem();
        let private = match alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem.as_bytes()),
            _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
        }
        .context("loading the test key")?;
        let mut public = Jwk::from_encoding_key(&private, alg).context("deriving the JWK")?;
        public.common.key_id = Some(kid.to_string());
        public.common.public_key_use = Some(PublicKeyUse::Signature);
        public.common.key_algorithm = Some(KeyAlgorithm::from(alg));
        Ok(Self {
            kid: kid.to_string(),
            alg,
            private,
            public,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK.
    pub fn jwk(&self) -> &Jwk {
        &self.public
    }

    /// A JWT over `claims`, signed with this key, header `kid` set to `kid`.
    pub fn sign_as(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_string);
        // Signing a JSON value with a key we generated cannot fail.
        jsonwebtoken::encode(&header, claims, &self.private).unwrap_or_else(|e| {
            panic!("signing a test token with {:?}: {e}", self.alg);
        })
    }

    /// A JWT over `claims`, signed with this key under its own kid.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(Some(&self.kid), claims)
    }
}

#[derive(Default)]
struct Counters {
    discovery: AtomicUsize,
    jwks: AtomicUsize,
}

struct Shared {
    issuer: String,
    published: Mutex<Vec<Key>>,
    counters: Counters,
}

/// A running stand-in issuer. Stops when dropped.
pub struct Issuer {
    shared: Arc<Shared>,
    signing: Mutex<Key>,
    ca_pem: String,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.shared.issuer)
            .finish_non_exhaustive()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    /// Starts an issuer with an ES256 key (`kid` `key-1`).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Key::generate(Algorithm::ES256, "key-1")?).await
    }

    /// Starts an issuer that signs and publishes `key`.
    pub async fn start_with(key: Key) -> anyhow::Result<Self> {
        let ca = gangplank_tls::dev::Ca::generate("gangplank test oidc CA")?;
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let issued = ca.issue(&["localhost"], &[localhost])?;
        let tls = gangplank_tls::server_config_from_pem(&issued.cert_pem, &issued.key_pem)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind((localhost, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            issuer: format!("https://{addr}"),
            published: Mutex::new(vec![key.clone()]),
            counters: Counters::default(),
        });
        let router = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let router = router.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ =
                        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                });
            }
        });
        Ok(Self {
            shared,
            signing: Mutex::new(key),
            ca_pem: ca.cert_pem().to_string(),
            addr,
            task,
        })
    }

    /// The issuer URL (`iss`), `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.shared.issuer
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The JWKS URL.
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.shared.issuer)
    }

    /// The dev CA certificate that signed the server certificate (the verifier's `caBundle`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes the CA certificate to `dir/oidc-ca.pem` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("oidc-ca.pem");
        std::fs::write(&path, &self.ca_pem).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The JWKS currently published (for inline `jwks:` configs).
    pub fn jwks(&self) -> Value {
        jwks_value(&self.shared)
    }

    /// The current signing key.
    pub fn key(&self) -> Key {
        lock(&self.signing).clone()
    }

    /// Typical claims: `iss`, `sub`, `aud`, `iat` now and `exp` in ten minutes.
    pub fn claims(&self, sub: &str, aud: &str) -> Value {
        let now = now();
        json!({"iss": self.url(), "sub": sub, "aud": aud, "iat": now, "exp": now + 600})
    }

    /// A JWT over `claims` signed with the current key.
    pub fn sign(&self, claims: &Value) -> String {
        self.key().sign(claims)
    }

    /// A JWT over `claims` signed by a key the issuer never published, under the current
    /// key's `kid` (a forgery).
    pub fn sign_with_foreign_key(&self, claims: &Value) -> anyhow::Result<String> {
        let current = self.key();
        let foreign = Key::generate(current.alg, current.kid())?;
        Ok(foreign.sign(claims))
    }

    /// An unsigned JWT (`alg: none`).
    pub fn unsigned(&self, claims: &Value) -> String {
        let header = json!({"alg": "none", "typ": "JWT", "kid": self.key().kid()});
        format!("{}.{}.", b64(&header), b64(claims))
    }

    /// A JWT signed with HS256 using the published public key (the JWK's JSON text, as a
    /// confused verifier would use it) as the HMAC secret.
    pub fn sign_hs256_with_public_key(&self, claims: &Value) -> String {
        let key = self.key();
        let secret = serde_json::to_vec(key.jwk()).unwrap_or_default();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid().to_string());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&secret))
            .unwrap_or_else(|e| panic!("signing an HS256 test token: {e}"))
    }

    /// Rotates to a new key `kid` (same algorithm), published beside the old ones.
    pub fn rotate(&self, kid: &str) -> anyhow::Result<Key> {
        let alg = self.key().alg;
        let key = Key::generate(alg, kid)?;
        lock(&self.shared.published).push(key.clone());
        *lock(&self.signing) = key.clone();
        Ok(key)
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_requests(&self) -> usize {
        self.shared.counters.jwks.load(Ordering::SeqCst)
    }

    /// How many times the discovery document was fetched.
    pub fn discovery_requests(&self) -> usize {
        self.shared.counters.discovery.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn jwks_value(shared: &Shared) -> Value {
    let keys = lock(&shared.published).iter().map(|k| k.public.clone()).collect();
    serde_json::to_value(JwkSet { keys }).unwrap_or_default()
}

async fn discovery(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.counters.discovery.fetch_add(1, Ordering::SeqCst);
    Json(json!({
        "issuer": shared.issuer,
        "jwks_uri": format!("{}/jwks", shared.issuer),
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "subject_types_supported": ["public"],
        "response_types_supported": ["id_token"],
    }))
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.counters.jwks.fetch_add(1, Ordering::SeqCst);
    Json(jwks_value(&shared))
}
