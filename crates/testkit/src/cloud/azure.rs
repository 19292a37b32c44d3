//! An Azure IMDS emulator: attested data signed by a `metadata.azure.com` test chain.
//!
//! Wire format as on Azure: requests need `Metadata: true` (400 without) and an
//! `api-version`; `GET /metadata/attested/document?api-version=2020-09-01&nonce=<10 digits>`
//! returns `{"encoding":"pkcs7","signature":"<base64 DER>"}` whose signed content is the JSON
//! with `nonce`, `vmId`, `subscriptionId`, `sku`, `plan`, `licenseType` and
//! `timeStamp{createdOn,expiresOn}` (`MM/DD/YY HH:MM:SS -0000`, six hours apart). The
//! PKCS#7 embeds only the signing certificate, like Azure's, whose AIA extension names where
//! its issuing CA is published: this emulator also plays Microsoft's PKI site and serves it
//! at `/pkiops/certs/test-issuing-ca.crt` (DER). The test root is what the verifier trusts;
//! the intermediate is configured or fetched.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use openssl::pkcs7::{Pkcs7, Pkcs7Flags};
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::X509;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// A test chain: root → intermediate → signer (`CN=metadata.azure.com` by default).
pub struct Chain {
    root: X509,
    intermediate: X509,
    signer: X509,
    signer_key: PKey<Private>,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain").finish_non_exhaustive()
    }
}

impl Chain {
    /// A fresh chain whose signer is named `signer_name` (e.g. `metadata.azure.com`).
    pub fn generate(signer_name: &str) -> anyhow::Result<Self> {
        Self::generate_with_issuer_url(signer_name, None)
    }

    /// Like [`Chain::generate`], the signer naming `issuer_url` (AIA `caIssuers`) as where
    /// the intermediate is published.
    pub fn generate_with_issuer_url(signer_name: &str, issuer_url: Option<&str>) -> anyhow::Result<Self> {
        let root_key = super::rsa_key()?;
        let root = super::certificate(
            &[
                ("O", "Gangplank test"),
                ("CN", "Test stand-in for Microsoft root"),
            ],
            &root_key,
            None,
            true,
            None,
        )?;
        let int_key = super::rsa_key()?;
        let intermediate = super::certificate(
            &[
                ("O", "Gangplank test"),
                ("CN", "Test stand-in for Azure issuing CA"),
            ],
            &int_key,
            Some((&root, &root_key)),
            true,
            None,
        )?;
        let signer_key = super::rsa_key()?;
        let signer = super::certificate_with_issuer_url(
            &[("CN", signer_name)],
            &signer_key,
            Some((&intermediate, &int_key)),
            false,
            Some(signer_name),
            issuer_url,
        )?;
        Ok(Self {
            root,
            intermediate,
            signer,
            signer_key,
        })
    }

    /// The root certificate (PEM): the verifier's `roots`.
    pub fn root_pem(&self) -> Vec<u8> {
        self.root.to_pem().unwrap_or_default()
    }

    /// The intermediate certificate (PEM): the verifier's `intermediates`.
    pub fn intermediate_pem(&self) -> Vec<u8> {
        self.intermediate.to_pem().unwrap_or_default()
    }

    /// The intermediate certificate (DER), as an AIA URL serves it.
    pub fn intermediate_der(&self) -> Vec<u8> {
        self.intermediate.to_der().unwrap_or_default()
    }

    /// IMDS's response for signed `content`.
    pub fn response(&self, content: &Value) -> anyhow::Result<String> {
        let extra = Stack::<X509>::new()?;
        let p7 = Pkcs7::sign(
            &self.signer,
            &self.signer_key,
            &extra,
            content.to_string().as_bytes(),
            Pkcs7Flags::BINARY | Pkcs7Flags::NOSMIMECAP,
        )?;
        Ok(json!({"encoding": "pkcs7", "signature": STANDARD.encode(p7.to_der()?)}).to_string())
    }
}

/// The VM the emulator describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// Subscription id.
    pub subscription_id: String,
    /// VM id.
    pub vm_id: String,
    /// Image sku.
    pub sku: String,
}

impl Vm {
    /// An example VM.
    pub fn example() -> Self {
        Self {
            subscription_id: "8d10da13-8125-4ba9-a717-bf7490507b3d".into(),
            vm_id: "02aab8a4-74ef-476e-8182-f6d2ba4166a6".into(),
            sku: "22_04-lts-gen2".into(),
        }
    }
}

/// Formats unix seconds as IMDS does: `MM/DD/YY HH:MM:SS -0000`.
pub fn timestamp(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| {
            format!(
                "{:02}/{:02}/{:02} {:02}:{:02}:{:02} -0000",
                u8::from(t.month()),
                t.day(),
                t.year() % 100,
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_default()
}

impl Vm {
    /// The attested content for `nonce`, created `age` seconds ago.
    pub fn attested(&self, nonce: &str, age: i64) -> Value {
        let created = super::now() - age;
        json!({
            "licenseType": "",
            "nonce": nonce,
            "plan": {"name": "", "product": "", "publisher": ""},
            "sku": self.sku,
            "subscriptionId": self.subscription_id,
            "timeStamp": {"createdOn": timestamp(created), "expiresOn": timestamp(created + 6 * 3600)},
            "vmId": self.vm_id,
        })
    }
}

struct Shared {
    vm: Vm,
    chain: Chain,
    age: Mutex<i64>,
    /// What the issuer URL serves (the chain's intermediate unless replaced).
    issuer_der: Mutex<Vec<u8>>,
    issuer_fetches: std::sync::atomic::AtomicUsize,
}

/// Where the emulator publishes the intermediate.
pub const ISSUER_PATH: &str = "/pkiops/certs/test-issuing-ca.crt";

/// A running Azure IMDS emulator. Stops when dropped.
pub struct Imds {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl fmt::Debug for Imds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Imds")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Imds {
    /// Serves `vm`, signing with a fresh `metadata.azure.com` test chain.
    pub async fn start(vm: Vm) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let chain = Chain::generate_with_issuer_url(
            "metadata.azure.com",
            Some(&format!("http://{addr}{ISSUER_PATH}")),
        )?;
        let shared = Arc::new(Shared {
            vm,
            issuer_der: Mutex::new(chain.intermediate_der()),
            chain,
            age: Mutex::new(0),
            issuer_fetches: Default::default(),
        });
        let router = axum::Router::new()
            .route("/metadata/attested/document", get(attested))
            .route("/metadata/instance/compute/vmId", get(vm_id))
            .route(ISSUER_PATH, get(issuer))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { shared, addr, task })
    }

    /// `host:port` of the issuer URL (for the verifier's `issuerHosts`).
    pub fn issuer_host(&self) -> String {
        self.addr.to_string()
    }

    /// How many times the issuer URL was fetched.
    pub fn issuer_fetches(&self) -> usize {
        self.shared
            .issuer_fetches
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Serves `der` at the issuer URL from now on (e.g. another chain's intermediate).
    pub fn serve_issuer(&self, der: Vec<u8>) {
        *self.shared.issuer_der.lock().unwrap_or_else(|p| p.into_inner()) = der;
    }

    /// The base URL (`http://127.0.0.1:PORT`), the agent's `imdsUrl`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The signing chain.
    pub fn chain(&self) -> &Chain {
        &self.shared.chain
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.shared.vm
    }

    /// Makes documents served from now on `seconds` old (to test freshness).
    pub fn set_document_age(&self, seconds: i64) {
        *self.shared.age.lock().unwrap_or_else(|p| p.into_inner()) = seconds;
    }
}

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"error": message}))).into_response()
}

fn rejection_checked(headers: &HeaderMap, q: &HashMap<String, String>) -> Option<Response> {
    if headers.get("Metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return Some(bad_request("Bad request. Required metadata header not specified"));
    }
    if q.get("api-version").is_none_or(|v| v.is_empty()) {
        return Some(bad_request(
            "Bad request. api-version was not specified in the request",
        ));
    }
    None
}

async fn attested(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = rejection_checked(&headers, &q) {
        return r;
    }
    let nonce = match q.get("nonce") {
        Some(n) if n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit()) => n.clone(),
        Some(_) => return bad_request("Bad request. The nonce must be at most 10 digits"),
        None => timestamp(super::now()),
    };
    let age = *shared.age.lock().unwrap_or_else(|p| p.into_inner());
    match shared.chain.response(&shared.vm.attested(&nonce, age)) {
        Ok(body) => ([("content-type", "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn issuer(State(shared): State<Arc<Shared>>) -> Response {
    shared
        .issuer_fetches
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let der = shared
        .issuer_der
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    ([("content-type", "application/pkix-cert")], der).into_response()
}

async fn vm_id(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = rejection_checked(&headers, &q) {
        return r;
    }
    shared.vm.vm_id.clone().into_response()
}
