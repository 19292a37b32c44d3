//! An AWS STS emulator answering `GetCallerIdentity`, authenticating requests as STS does.
//!
//! `POST /` with a SigV4 `Authorization` header: the emulator recomputes the signature over
//! the request it received (method, path, query, the signed headers as received, body)
//! with the secret of the named access key, which it shares with the IMDS emulator through
//! [`Iam`]; checks `x-amz-date` is within 15 minutes, the credential scope (date, its
//! region, `sts`) and the session token. It answers with STS's XML: a
//! `GetCallerIdentityResponse`, or an `ErrorResponse` (`SignatureDoesNotMatch`,
//! `InvalidClientTokenId`, `ExpiredToken`, `IncompleteSignature`, …) with its HTTP status.
//! Its SigV4 code is its own, independent of the one under test, and checked against AWS's
//! published test vector.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_lc_rs::{digest, hmac};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use tokio::task::JoinHandle;

/// How far `x-amz-date` may be from now, as on AWS.
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// A set of temporary credentials and whom they authenticate.
#[derive(Clone)]
pub struct Session {
    /// `ASIA…`.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// The session token.
    pub token: String,
    /// The caller ARN, e.g. `arn:aws:sts::123456789012:assumed-role/ratings/i-0abc…`.
    pub arn: String,
    /// The account.
    pub account: String,
    /// When the credentials expire.
    pub expires: SystemTime,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("access_key_id", &self.access_key_id)
            .field("arn", &self.arn)
            .finish_non_exhaustive()
    }
}

/// The credentials issued so far, shared by the IMDS and STS emulators.
#[derive(Clone, Default)]
pub struct Iam {
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

impl fmt::Debug for Iam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iam").finish_non_exhaustive()
    }
}

fn random(len: usize, alphabet: &[u8]) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; len];
    openssl::rand::rand_bytes(&mut bytes)?;
    Ok(bytes
        .iter()
        .map(|b| alphabet[usize::from(*b) % alphabet.len()] as char)
        .collect())
}

impl Iam {
    /// Issues (or returns the still-valid) credentials for the session `arn` of `account`.
    pub fn issue(&self, arn: &str, account: &str, ttl: Duration) -> anyhow::Result<Session> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        if let Some(s) = sessions.values().find(|s| s.arn == arn && s.expires > now) {
            return Ok(s.clone());
        }
        const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        const ANY: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let session = Session {
            access_key_id: format!("ASIA{}", random(16, UPPER)?),
            secret_access_key: random(40, ANY)?,
            token: random(300, ANY)?,
            arn: arn.to_string(),
            account: account.to_string(),
            expires: now + ttl,
        };
        sessions.insert(session.access_key_id.clone(), session.clone());
        Ok(session)
    }

    /// Ends every session now (their credentials become expired).
    pub fn expire_all(&self) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let past = SystemTime::now() - Duration::from_secs(1);
        for s in sessions.values_mut() {
            s.expires = past;
        }
    }

    /// Every session issued so far.
    pub fn sessions(&self) -> Vec<Session> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn get(&self, access_key_id: &str) -> Option<Session> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(access_key_id)
            .cloned()
    }
}

struct Shared {
    iam: Iam,
    region: String,
    requests: AtomicUsize,
}

/// A running STS emulator. Stops when dropped.
pub struct Sts {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl fmt::Debug for Sts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sts")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Sts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sts {
    /// STS for `region`, authenticating the credentials `iam` issued.
    pub async fn start(iam: Iam, region: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            iam,
            region: region.to_string(),
            requests: AtomicUsize::new(0),
        });
        let router = axum::Router::new()
            .route("/", any(handle))
            .with_state(shared.clone());
        let (addr, task) = crate::cloud::serve(router).await?;
        Ok(Self { shared, addr, task })
    }

    /// The base URL (`http://127.0.0.1:PORT/`), the endpoint's `awsEc2.sts.url`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// How many requests reached it.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

/// An STS error answer.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code,
            message: message.into(),
        }
    }

    fn incomplete(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "IncompleteSignature",
            message: message.into(),
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <Error>\n    <Type>Sender</Type>\n    <Code>{code}</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>4f2a1c3e-0000-4000-8000-000000000000</RequestId>\n</ErrorResponse>\n",
        escape(message)
    );
    (status, [("content-type", "text/xml")], body).into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    match authenticate(&shared, &method, &uri, &headers, &body) {
        Ok(session) => answer(&session, &body),
        Err(r) => error(r.status, r.code, &r.message),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn authenticate(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Session, Refusal> {
    let Some(authorization) = header(headers, "authorization") else {
        return Err(Refusal::forbidden(
            "MissingAuthenticationToken",
            "Request is missing Authentication Token",
        ));
    };
    let parsed = parse_authorization(authorization).ok_or_else(|| {
        Refusal::incomplete(
            "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters.",
        )
    })?;
    let amz_date = header(headers, "x-amz-date").ok_or_else(|| {
        Refusal::incomplete(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
        )
    })?;
    let signed_at =
        parse_amz_date(amz_date).ok_or_else(|| Refusal::incomplete("X-Amz-Date is not a date"))?;
    let now = SystemTime::now();
    let skew = now
        .duration_since(signed_at)
        .or_else(|_| signed_at.duration_since(now))
        .unwrap_or_default();
    if skew > MAX_SKEW {
        return Err(Refusal::forbidden(
            "SignatureDoesNotMatch",
            format!("Signature expired: {amz_date} is now earlier or later than the allowed 15 minutes."),
        ));
    }
    let [key_id, date, region, service, terminator] = parsed.credential.as_slice() else {
        return Err(Refusal::incomplete(
            "Credential is not <key>/<date>/<region>/<service>/aws4_request",
        ));
    };
    if *terminator != "aws4_request" || *service != "sts" || date != &amz_date.get(..8).unwrap_or_default() {
        return Err(Refusal::forbidden(
            "SignatureDoesNotMatch",
            "Credential should be scoped to a valid date, service and terminator.",
        ));
    }
    if *region != shared.region {
        return Err(Refusal::forbidden(
            "SignatureDoesNotMatch",
            format!("Credential should be scoped to a valid region, not '{region}'."),
        ));
    }
    let Some(session) = shared.iam.get(key_id) else {
        return Err(Refusal::forbidden(
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        ));
    };
    if header(headers, "x-amz-security-token") != Some(session.token.as_str()) {
        return Err(Refusal::forbidden(
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        ));
    }
    if session.expires <= now {
        return Err(Refusal::forbidden(
            "ExpiredToken",
            "The security token included in the request is expired",
        ));
    }
    // The canonical request, rebuilt from what arrived.
    let mut canonical_headers = String::new();
    for name in &parsed.signed_headers {
        let values: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(Refusal::forbidden(
                "SignatureDoesNotMatch",
                format!("The request signs header '{name}' but does not carry it."),
            ));
        }
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let canonical = format!(
        "{method}\n{}\n{}\n{canonical_headers}\n{}\n{}",
        uri.path(),
        uri.query().unwrap_or_default(),
        parsed.signed_headers.join(";"),
        hex(digest::digest(&digest::SHA256, body).as_ref())
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
    );
    let expected = signature(&session.secret_access_key, date, region, service, &to_sign);
    if expected != parsed.signature {
        return Err(Refusal::forbidden(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
        ));
    }
    Ok(session)
}

fn answer(session: &Session, body: &[u8]) -> Response {
    let form = String::from_utf8_lossy(body);
    let mut params: Vec<&str> = form.split('&').collect();
    params.sort_unstable();
    if params != ["Action=GetCallerIdentity", "Version=2011-06-15"] {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            "Could not find operation for this request (the emulator answers GetCallerIdentity only)",
        );
    }
    let session_name = session.arn.rsplit('/').next().unwrap_or_default();
    let xml = format!(
        "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <GetCallerIdentityResult>\n    <Arn>{}</Arn>\n    <UserId>AROAEXAMPLEROLEID0000:{}</UserId>\n    <Account>{}</Account>\n  </GetCallerIdentityResult>\n  <ResponseMetadata>\n    <RequestId>01234567-89ab-4def-8123-456789abcdef</RequestId>\n  </ResponseMetadata>\n</GetCallerIdentityResponse>\n",
        escape(&session.arn),
        escape(session_name),
        escape(&session.account)
    );
    (StatusCode::OK, [("content-type", "text/xml")], xml).into_response()
}

struct Parsed<'a> {
    credential: Vec<&'a str>,
    signed_headers: Vec<String>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<Parsed<'_>> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        fields.insert(k, v);
    }
    Some(Parsed {
        credential: fields.get("Credential")?.split('/').collect(),
        signed_headers: fields
            .get("SignedHeaders")?
            .split(';')
            .map(str::to_string)
            .collect(),
        signature: fields.get("Signature")?,
    })
}

fn parse_amz_date(value: &str) -> Option<SystemTime> {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let t = time::PrimitiveDateTime::parse(value, &fmt).ok()?.assume_utc();
    let secs = u64::try_from(t.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
        .as_ref()
        .to_vec()
}

fn signature(secret: &str, date: &str, region: &str, service: &str, to_sign: &str) -> String {
    let k = hmac_sha256(format!("AWS4{secret}").as_bytes(), date);
    let k = hmac_sha256(&k, region);
    let k = hmac_sha256(&k, service);
    let k = hmac_sha256(&k, "aws4_request");
    hex(&hmac_sha256(&k, to_sign))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's SigV4 test suite, get-vanilla: string to sign from get-vanilla.sts, signature
    /// from get-vanilla.authz.
    #[test]
    fn signatures_match_the_aws_test_suite() {
        let to_sign = "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63";
        assert_eq!(
            signature(
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                "20150830",
                "us-east-1",
                "service",
                to_sign
            ),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }
}
