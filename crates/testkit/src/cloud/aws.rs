//! An EC2 instance metadata service (IMDSv2) emulator.
//!
//! Wire format as on EC2: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
//! (1–21600, else 400) returns a session token; `GET`s need `X-aws-ec2-metadata-token`
//! (401 without, or when expired); `/latest/dynamic/instance-identity/document` is the
//! pretty-printed JSON document and `/latest/dynamic/instance-identity/rsa2048` its PKCS#7
//! signature, base64 without PEM armour, content attached, no certificates inside — signed
//! with a per-region test key ([`SigningKeys`]) whose certificate the verifier is configured
//! to trust. `/latest/meta-data/iam/info` gives the instance profile, and
//! `/latest/meta-data/iam/security-credentials/[<role>]` its role and temporary
//! credentials, which the STS emulator ([`Sts`]) knows through the shared [`Iam`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use openssl::pkcs7::{Pkcs7, Pkcs7Flags};
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::X509;
use tokio::task::JoinHandle;

mod sts;
pub use sts::{Iam, Session, Sts};

/// A region's test signing key and self-signed certificate (like AWS's real ones).
#[derive(Clone)]
struct RegionKey {
    cert: X509,
    key: PKey<Private>,
}

/// Per-region test signing keys, standing in for AWS's regional RSA-2048 keys.
#[derive(Clone)]
pub struct SigningKeys {
    by_region: BTreeMap<String, RegionKey>,
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_region.keys()).finish()
    }
}

impl SigningKeys {
    /// Fresh keys for `regions`.
    pub fn generate(regions: &[&str]) -> anyhow::Result<Self> {
        let mut by_region = BTreeMap::new();
        for region in regions {
            let key = super::rsa_key()?;
            let cert = super::certificate(
                &[
                    ("C", "US"),
                    ("ST", "Washington State"),
                    ("L", "Seattle"),
                    ("O", "Gangplank test stand-in for Amazon Web Services"),
                    ("CN", region),
                ],
                &key,
                None,
                false,
                None,
            )?;
            by_region.insert(region.to_string(), RegionKey { cert, key });
        }
        Ok(Self { by_region })
    }

    /// The certificate of `region` (PEM): what the verifier is configured to trust.
    pub fn certificate_pem(&self, region: &str) -> anyhow::Result<String> {
        let k = self.get(region)?;
        Ok(String::from_utf8(k.cert.to_pem()?)?)
    }

    /// Signs `content` as AWS does for `/rsa2048`: PKCS#7 signed-data, SHA-256, content
    /// attached, no certificates; base64 in 64-column lines.
    pub fn sign(&self, region: &str, content: &[u8]) -> anyhow::Result<String> {
        let k = self.get(region)?;
        let extra = Stack::<X509>::new()?;
        let p7 = Pkcs7::sign(
            &k.cert,
            &k.key,
            &extra,
            content,
            Pkcs7Flags::BINARY | Pkcs7Flags::NOCERTS | Pkcs7Flags::NOSMIMECAP,
        )?;
        let b64 = STANDARD.encode(p7.to_der()?);
        Ok(b64
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("\n"))
    }

    fn get(&self, region: &str) -> anyhow::Result<&RegionKey> {
        self.by_region
            .get(region)
            .ok_or_else(|| anyhow::anyhow!("no test signing key for region {region}"))
    }
}

/// The instance an emulator describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// 12-digit account id.
    pub account_id: String,
    /// Region.
    pub region: String,
    /// Availability zone.
    pub availability_zone: String,
    /// Instance id.
    pub instance_id: String,
    /// Private IP.
    pub private_ip: String,
    /// `pendingTime`, RFC 3339 (`2026-01-01T00:00:00Z`).
    pub pending_time: String,
    /// The instance profile ARN in `iam/info`, if any.
    pub instance_profile_arn: Option<String>,
    /// The instance profile's role name in `iam/security-credentials/`, if any.
    pub iam_role: Option<String>,
}

impl Instance {
    /// An instance in us-east-1a of account 123456789012 that entered `pending` just now.
    pub fn example() -> Self {
        Self {
            account_id: "123456789012".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            instance_id: "i-0abc1234def567890".into(),
            private_ip: "10.0.1.7".into(),
            pending_time: rfc3339(super::now()),
            instance_profile_arn: Some("arn:aws:iam::123456789012:instance-profile/ratings".into()),
            iam_role: Some("ratings".into()),
        }
    }

    /// The same instance without an instance profile (no role, no credentials).
    pub fn without_instance_profile(mut self) -> Self {
        self.instance_profile_arn = None;
        self.iam_role = None;
        self
    }

    /// The same instance with `pendingTime` `seconds_ago` seconds in the past.
    pub fn pending_since(mut self, seconds_ago: i64) -> Self {
        self.pending_time = rfc3339(super::now() - seconds_ago);
        self
    }

    /// The document exactly as IMDS prints it.
    pub fn document(&self) -> String {
        format!(
            "{{\n  \"accountId\" : \"{}\",\n  \"architecture\" : \"x86_64\",\n  \"availabilityZone\" : \"{}\",\n  \"billingProducts\" : null,\n  \"devpayProductCodes\" : null,\n  \"marketplaceProductCodes\" : null,\n  \"imageId\" : \"ami-0123456789abcdef0\",\n  \"instanceId\" : \"{}\",\n  \"instanceType\" : \"t3.micro\",\n  \"kernelId\" : null,\n  \"pendingTime\" : \"{}\",\n  \"privateIp\" : \"{}\",\n  \"ramdiskId\" : null,\n  \"region\" : \"{}\",\n  \"version\" : \"2017-09-30\"\n}}",
            self.account_id,
            self.availability_zone,
            self.instance_id,
            self.pending_time,
            self.private_ip,
            self.region
        )
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

struct Shared {
    instance: Mutex<Instance>,
    keys: SigningKeys,
    tokens: Mutex<HashMap<String, Instant>>,
    next_token: Mutex<u64>,
    iam: Iam,
    /// `(account, session name)` of the role credentials handed out, when not the instance's.
    credentials_of: Mutex<Option<(String, String)>>,
}

/// A running IMDSv2 emulator. Stops when dropped.
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Imds {
    /// Serves `instance`, signing with `keys` (which must hold the instance's region).
    pub async fn start(instance: Instance, keys: SigningKeys) -> anyhow::Result<Self> {
        keys.get(&instance.region)?;
        let shared = Arc::new(Shared {
            instance: Mutex::new(instance),
            keys,
            tokens: Mutex::new(HashMap::new()),
            next_token: Mutex::new(0),
            iam: Iam::default(),
            credentials_of: Mutex::new(None),
        });
        let router = axum::Router::new()
            .route("/latest/api/token", put(token))
            .route("/latest/dynamic/instance-identity/document", get(document))
            .route("/latest/dynamic/instance-identity/rsa2048", get(rsa2048))
            .route("/latest/meta-data/iam/info", get(iam_info))
            .route("/latest/meta-data/iam/security-credentials/", get(roles))
            .route(
                "/latest/meta-data/iam/security-credentials/{role}",
                get(role_credentials),
            )
            .with_state(shared.clone());
        let (addr, task) = super::serve(router).await?;
        Ok(Self { shared, addr, task })
    }

    /// The base URL (`http://127.0.0.1:PORT`), the agent's `imdsUrl`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The instance served.
    pub fn instance(&self) -> Instance {
        lock(&self.shared.instance).clone()
    }

    /// Replaces the instance served (e.g. a re-imaged VM).
    pub fn set_instance(&self, instance: Instance) {
        *lock(&self.shared.instance) = instance;
    }

    /// The signing keys.
    pub fn keys(&self) -> &SigningKeys {
        &self.shared.keys
    }

    /// The sessions behind the role credentials this IMDS hands out: give it to [`Sts`].
    pub fn iam(&self) -> Iam {
        self.shared.iam.clone()
    }

    /// Hands out role credentials as another instance (`instance_id`) of `account` would
    /// get them: a machine that copied them, or a forged IMDS.
    pub fn hand_out_credentials_of(&self, account: &str, instance_id: &str) {
        *lock(&self.shared.credentials_of) = Some((account.to_string(), instance_id.to_string()));
    }
}

fn rejection_session(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let token = headers
        .get("X-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok());
    match token.and_then(|t| lock(&shared.tokens).get(t).copied()) {
        Some(expiry) if expiry > Instant::now() => None,
        _ => Some(StatusCode::UNAUTHORIZED.into_response()),
    }
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let ttl = headers
        .get("X-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|t| (1..=21600).contains(t));
    let Some(ttl) = ttl else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let token = {
        let mut n = lock(&shared.next_token);
        *n += 1;
        STANDARD.encode(format!("imds-session-{}-{}", *n, super::now()))
    };
    lock(&shared.tokens).insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
    ([("X-aws-ec2-metadata-token-ttl-seconds", ttl.to_string())], token).into_response()
}

async fn document(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = rejection_session(&shared, &headers) {
        return r;
    }
    lock(&shared.instance).document().into_response()
}

async fn rsa2048(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = rejection_session(&shared, &headers) {
        return r;
    }
    let instance = lock(&shared.instance).clone();
    match shared.keys.sign(&instance.region, instance.document().as_bytes()) {
        Ok(sig) => sig.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn iam_info(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = rejection_session(&shared, &headers) {
        return r;
    }
    let instance = lock(&shared.instance).clone();
    match instance.instance_profile_arn {
        Some(arn) => serde_json::json!({
            "Code": "Success",
            "LastUpdated": rfc3339(super::now()),
            "InstanceProfileArn": arn,
            "InstanceProfileId": "AIPAEXAMPLEPROFILEID",
        })
        .to_string()
        .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn roles(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = rejection_session(&shared, &headers) {
        return r;
    }
    match lock(&shared.instance).iam_role.clone() {
        Some(role) => role.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn role_credentials(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(role): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = rejection_session(&shared, &headers) {
        return r;
    }
    let instance = lock(&shared.instance).clone();
    if instance.iam_role.as_deref() != Some(role.as_str()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let (account, session_name) = lock(&shared.credentials_of)
        .clone()
        .unwrap_or((instance.account_id.clone(), instance.instance_id.clone()));
    // Like EC2: the instance profile's role, assumed with the instance id as session name.
    let arn = format!("arn:aws:sts::{account}:assumed-role/{role}/{session_name}");
    let session = match shared.iam.issue(&arn, &account, Duration::from_secs(6 * 3600)) {
        Ok(s) => s,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    serde_json::json!({
        "Code": "Success",
        "LastUpdated": rfc3339(super::now()),
        "Type": "AWS-HMAC",
        "AccessKeyId": session.access_key_id,
        "SecretAccessKey": session.secret_access_key,
        "Token": session.token,
        "Expiration": rfc3339(super::now() + 6 * 3600),
    })
    .to_string()
    .into_response()
}
