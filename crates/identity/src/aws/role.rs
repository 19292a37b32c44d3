//! The IAM role of an instance's instance profile, proven through STS `GetCallerIdentity`
//! (as HashiCorp Vault's `aws` auth method, `iam` type, does).
//!
//! The role is not in the signed instance identity document. What proves it is a request
//! only the instance can sign: the agent reads the instance profile's temporary
//! credentials from IMDSv2 and signs (SigV4) an STS `GetCallerIdentity` request with them,
//! binding it to the endpoint's challenge with a signed `x-gangplank-nonce` header. It sends
//! the signed request (headers and body; never the secret key) in its credential; the
//! endpoint checks its shape and nonce and sends it to its *own* configured STS URL. STS
//! answers with the caller's ARN, `arn:<partition>:sts::<account>:assumed-role/<role>/<session>`.
//! EC2 names instance-profile sessions after the instance id, so the endpoint requires the
//! account and the session name to be the verified document's account and instance id:
//! credentials of another machine with the same role do not pass.
//!
//! The STS URL is the endpoint's choice: Discover sends its URL template (`{region}` for
//! the instance's region) and the agent fills in the region of its own document; the
//! endpoint fills in the region of the verified document, so both name the same host, which
//! is signed.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::sigv4::{self, Credentials};
use super::{ConfigError, Facts};
use crate::{Challenge, Error, Result};

/// The header binding a role proof to the endpoint's challenge; it must be signed.
pub const NONCE_HEADER: &str = "x-gangplank-nonce";
/// The only body a role proof may carry.
pub const GET_CALLER_IDENTITY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// The body's content type.
pub const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
/// Where the endpoint sends role proofs unless configured: the instance region's STS.
pub const DEFAULT_STS_URL: &str = "https://sts.{region}.amazonaws.com/";
/// How long the endpoint waits for STS unless configured.
pub const DEFAULT_STS_TIMEOUT: Duration = Duration::from_secs(10);
/// Stands for the instance's region in an STS URL template.
pub const REGION_PLACEHOLDER: &str = "{region}";
/// The headers a proof may carry; the endpoint forwards these (and sets `host` itself).
const FORWARDED: &[&str] = &[
    "authorization",
    "content-type",
    "host",
    "x-amz-date",
    "x-amz-security-token",
    NONCE_HEADER,
];
/// Headers that must be signed.
const MUST_SIGN: &[&str] = &["host", "x-amz-date", NONCE_HEADER];
const MAX_RESPONSE: usize = 64 * 1024;
/// Longest header value forwarded (session tokens are a few kilobytes at most).
const MAX_HEADER: usize = 8 * 1024;

/// A signed STS `GetCallerIdentity` request: what the agent sends as its role proof.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Proof {
    /// The request's headers by lower-case name, `authorization` included.
    pub headers: BTreeMap<String, String>,
    /// The form body.
    pub body: String,
}

impl fmt::Debug for Proof {
    /// Header names only: the session token is a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proof")
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body", &self.body)
            .finish()
    }
}

/// The STS URL for `region` from `template`; `{region}` is replaced. The default template
/// follows the partition's domain (`amazonaws.com.cn` in China).
pub fn sts_url(template: &str, region: &str) -> std::result::Result<Url, String> {
    let template = match (template, super::partition(region)) {
        (DEFAULT_STS_URL, "aws-cn") => "https://sts.{region}.amazonaws.com.cn/",
        (t, _) => t,
    };
    let url = Url::parse(&template.replace(REGION_PLACEHOLDER, region))
        .map_err(|e| format!("{template:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(format!("{template:?} is not an http(s) URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{template:?} has a query or fragment: give the STS base URL"
        ));
    }
    Ok(url)
}

/// `host[:port]` as an HTTP client sends it for `url` (no port when it is the default).
fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// The SigV4 region for STS at `url` called from an instance in `region`: the global
/// endpoint signs for us-east-1, every other (regional, VPC or emulated) for the region.
fn signing_region(url: &Url, region: &str) -> String {
    match url.host_str() {
        Some("sts.amazonaws.com") => "us-east-1".into(),
        _ => region.into(),
    }
}

/// Signs a `GetCallerIdentity` request for STS at `url` with `credentials`, bound to
/// `nonce`, at `now` (the agent half).
pub fn sign(credentials: &Credentials, url: &Url, region: &str, nonce: &str, now: OffsetDateTime) -> Proof {
    let amz_date = sigv4::amz_date(now);
    let mut headers = vec![
        ("content-type".to_string(), CONTENT_TYPE.to_string()),
        ("host".to_string(), authority(url)),
        ("x-amz-date".to_string(), amz_date.clone()),
        (NONCE_HEADER.to_string(), nonce.to_string()),
    ];
    if let Some(token) = &credentials.session_token {
        headers.push(("x-amz-security-token".to_string(), token.clone()));
    }
    let req = sigv4::Request {
        method: "POST",
        path: url.path(),
        query: "",
        headers: &headers,
        body: GET_CALLER_IDENTITY.as_bytes(),
    };
    let authorization =
        sigv4::authorization(credentials, &amz_date, &signing_region(url, region), "sts", &req);
    let mut headers: BTreeMap<String, String> = headers.into_iter().collect();
    headers.insert("authorization".into(), authorization);
    Proof {
        headers,
        body: GET_CALLER_IDENTITY.into(),
    }
}

/// Temporary credentials as IMDS serves them at `iam/security-credentials/<role>`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ImdsCredentials {
    code: String,
    access_key_id: String,
    secret_access_key: String,
    token: String,
}

impl ImdsCredentials {
    /// The credentials, if IMDS says they are good.
    pub(crate) fn into_credentials(self) -> std::result::Result<Credentials, String> {
        if self.code != "Success" {
            return Err(format!(
                "IMDS reports the instance profile credentials as {:?}",
                self.code
            ));
        }
        Ok(Credentials {
            access_key_id: self.access_key_id,
            secret_access_key: self.secret_access_key,
            session_token: Some(self.token),
        })
    }
}

/// Whether `name` is an IAM role name (1–64 of `[A-Za-z0-9+=,.@_-]`).
pub fn is_role_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

fn reject(why: impl fmt::Display) -> Error {
    Error::rejected(crate::Refused::AwsRoleProof, why.to_string())
}

/// The endpoint half: sends role proofs to the configured STS and reads the role back.
pub struct Sts {
    template: String,
    client: reqwest::Client,
}

impl fmt::Debug for Sts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sts")
            .field("url", &self.template)
            .finish_non_exhaustive()
    }
}

impl Sts {
    /// STS at `template` (`{region}` is the verified instance's region), waiting at most
    /// `timeout` for an answer.
    pub fn new(template: &str, timeout: Duration) -> std::result::Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Sts { message };
        sts_url(template, "us-east-1").map_err(|e| invalid(format!("url {e}")))?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            template: template.to_string(),
            client,
        })
    }

    /// The URL template, as Discover sends it.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Checks `proof` against `challenge` and the verified document `facts`, has STS
    /// authenticate it, and returns the role name. Makes one STS call, changes nothing.
    pub async fn verify(&self, proof: &Proof, challenge: &Challenge, facts: &Facts) -> Result<String> {
        let url = sts_url(&self.template, &facts.region)
            .map_err(|e| Error::Unavailable(format!("awsEc2.sts.url {e}")))?;
        let headers = check_shape(proof, challenge, &url)?;

        let mut req = self.client.post(url.clone()).body(proof.body.clone());
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let resp = req.send().await.map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach STS at {url} to verify the instance's IAM role ({e}): let the endpoint reach it, or set awsEc2.sts.url (e.g. a VPC endpoint)"
            ))
        })?;
        let status = resp.status();
        let body = read_limited(resp)
            .await
            .map_err(|e| Error::Unavailable(format!("reading STS's answer from {url}: {e}")))?;
        if status.is_server_error() {
            return Err(Error::Unavailable(format!(
                "STS at {url} failed (HTTP {status}) verifying the instance's IAM role"
            )));
        }
        if !status.is_success() {
            let code = element(&body, "Code").unwrap_or_default();
            let message = element(&body, "Message").unwrap_or_default();
            return Err(reject(format!(
                "was refused by STS at {url} (HTTP {status}, {}: {}): the instance profile credentials are wrong or expired, the request was altered, or the instance clock is off",
                crate::text::shown(&code),
                crate::text::shown(&message)
            )));
        }
        let result = element(&body, "GetCallerIdentityResult").ok_or_else(|| {
            reject(format!(
                "got an answer from STS at {url} that is not a GetCallerIdentityResponse"
            ))
        })?;
        let arn = element(&result, "Arn").unwrap_or_default();
        let account = element(&result, "Account").unwrap_or_default();
        role_of(&arn, &account, facts)
    }
}

/// The headers to forward (all but `host`), once the proof has the shape it must have.
fn check_shape(proof: &Proof, challenge: &Challenge, url: &Url) -> Result<Vec<(String, String)>> {
    if proof.body != GET_CALLER_IDENTITY {
        return Err(reject(format!(
            "is not an STS GetCallerIdentity request: its body must be exactly {GET_CALLER_IDENTITY:?}"
        )));
    }
    if let Some(name) = proof.headers.keys().find(|n| !FORWARDED.contains(&n.as_str())) {
        return Err(reject(format!(
            "carries header {}, which is not forwarded to STS (allowed: {})",
            crate::text::shown(name),
            FORWARDED.join(", ")
        )));
    }
    if let Some((name, _)) = proof
        .headers
        .iter()
        .find(|(_, v)| v.len() > MAX_HEADER || !v.bytes().all(|b| (0x20..0x7f).contains(&b)))
    {
        return Err(reject(format!(
            "has a {name} header that is not a printable ASCII value of at most {MAX_HEADER} bytes"
        )));
    }
    let header = |name: &str| {
        proof
            .headers
            .get(name)
            .ok_or_else(|| reject(format!("has no {name} header")))
    };
    let authorization = sigv4::Authorization::parse(header("authorization")?).map_err(reject)?;
    for name in MUST_SIGN {
        if !authorization.signed_headers.iter().any(|s| s == name) {
            return Err(reject(format!("does not sign the {name} header")));
        }
    }
    if let Some(name) = authorization
        .signed_headers
        .iter()
        .find(|n| !proof.headers.contains_key(n.as_str()))
    {
        return Err(reject(format!(
            "signs header {} but does not carry it",
            crate::text::shown(name)
        )));
    }
    if *header(NONCE_HEADER)? != challenge.nonce {
        return Err(reject(
            "is bound to another challenge (its x-gangplank-nonce is not this onboarding's nonce): a replayed proof is refused",
        ));
    }
    let expected = authority(url);
    if *header("host")? != expected {
        return Err(reject(format!(
            "is signed for STS host {}, but this endpoint verifies with STS at {expected}: the agent signs for the URL Discover gives it",
            crate::text::shown(header("host")?)
        )));
    }
    Ok(proof
        .headers
        .iter()
        .filter(|(n, _)| n.as_str() != "host")
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect())
}

/// The role name in STS's answer, once it is this instance's instance-profile session.
fn role_of(arn: &str, account: &str, facts: &Facts) -> Result<String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ["arn", partition, "sts", "", arn_account, resource] = parts.as_slice() else {
        return Err(reject(format!(
            "got a caller ARN from STS that is not an STS ARN: {}",
            crate::text::shown(arn)
        )));
    };
    if account != facts.account || *arn_account != facts.account || *partition != facts.partition {
        return Err(reject(format!(
            "is signed by credentials of account {} ({partition}), not of the instance's account {} ({}): credentials from another account are refused",
            crate::text::shown(account),
            facts.account,
            facts.partition
        )));
    }
    let pieces: Vec<&str> = resource.split('/').collect();
    let ["assumed-role", role, session] = pieces.as_slice() else {
        return Err(reject(format!(
            "is signed by {}, which is not an assumed role: only an instance profile's role credentials prove a role",
            crate::text::shown(arn)
        )));
    };
    if *session != facts.instance_id {
        return Err(reject(format!(
            "is signed by credentials of role session {} but the document is instance {}: EC2 names instance-profile sessions after the instance, so these credentials belong to another machine",
            crate::text::shown(session),
            facts.instance_id
        )));
    }
    if !is_role_name(role) {
        return Err(reject(format!(
            "names role {}, which is not an IAM role name",
            crate::text::shown(role)
        )));
    }
    Ok(role.to_string())
}

async fn read_limited(mut resp: reqwest::Response) -> std::result::Result<String, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_RESPONSE {
            return Err(format!("larger than {MAX_RESPONSE} bytes"));
        }
    }
    String::from_utf8(body).map_err(|_| "not UTF-8".into())
}

/// The text of the first `<name>` element of `xml` (STS's answers are small, flat and
/// namespace-default), with the five predefined entities decoded.
fn element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(
        xml[start..end]
            .trim()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            partition: "aws".into(),
            account: "123456789012".into(),
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            instance_id: "i-0abc".into(),
            image_id: String::new(),
            instance_type: String::new(),
            private_ip: "10.0.0.1".parse().expect("ip"),
            pending_time: String::new(),
            agent_public_key: String::new(),
            iam_role: None,
        }
    }

    #[test]
    fn the_role_is_read_from_this_instances_assumed_role_session() {
        let f = facts();
        assert_eq!(
            role_of(
                "arn:aws:sts::123456789012:assumed-role/ratings/i-0abc",
                "123456789012",
                &f
            )
            .expect("role"),
            "ratings"
        );
        let cases = [
            (
                "arn:aws:sts::123456789012:assumed-role/ratings/i-0other",
                "another machine",
            ),
            (
                "arn:aws:sts::999999999999:assumed-role/ratings/i-0abc",
                "another account",
            ),
            ("arn:aws:iam::123456789012:user/alice", "not an STS ARN"),
            (
                "arn:aws:sts::123456789012:federated-user/alice",
                "not an assumed role",
            ),
            (
                "arn:aws-cn:sts::123456789012:assumed-role/ratings/i-0abc",
                "another account",
            ),
        ];
        for (arn, want) in cases {
            let err = role_of(arn, "123456789012", &f).expect_err(arn);
            assert!(err.to_string().contains(want), "{arn}: {err}");
        }
    }

    #[test]
    fn urls_fill_the_region_and_the_global_endpoint_signs_for_us_east_1() {
        let url = sts_url(DEFAULT_STS_URL, "eu-west-1").expect("url");
        assert_eq!(url.as_str(), "https://sts.eu-west-1.amazonaws.com/");
        let china = sts_url(DEFAULT_STS_URL, "cn-north-1").expect("url");
        assert_eq!(china.as_str(), "https://sts.cn-north-1.amazonaws.com.cn/");
        assert_eq!(signing_region(&url, "eu-west-1"), "eu-west-1");
        let global = sts_url("https://sts.amazonaws.com", "eu-west-1").expect("url");
        assert_eq!(signing_region(&global, "eu-west-1"), "us-east-1");
        assert_eq!(
            authority(&sts_url("http://127.0.0.1:8080/", "x").expect("url")),
            "127.0.0.1:8080"
        );
        assert!(sts_url("ftp://sts.example/", "x").is_err());
        assert!(sts_url("https://sts.example/?Action=AssumeRole", "x").is_err());
    }

    #[test]
    fn sts_xml_elements_are_read() {
        let xml = "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <Error>\n    <Type>Sender</Type>\n    <Code>SignatureDoesNotMatch</Code>\n    <Message>a &amp; b</Message>\n  </Error>\n</ErrorResponse>";
        assert_eq!(element(xml, "Code").as_deref(), Some("SignatureDoesNotMatch"));
        assert_eq!(element(xml, "Message").as_deref(), Some("a & b"));
        assert_eq!(element(xml, "Arn"), None);
    }

    #[test]
    fn proof_debug_shows_no_token() {
        let creds = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "SECRET".into(),
            session_token: Some("SESSION-TOKEN".into()),
        };
        let url = sts_url(DEFAULT_STS_URL, "us-east-1").expect("url");
        let proof = sign(&creds, &url, "us-east-1", "n1", OffsetDateTime::now_utc());
        assert_eq!(proof.headers["x-amz-security-token"], "SESSION-TOKEN");
        let shown = format!("{proof:?}");
        assert!(
            !shown.contains("SESSION-TOKEN") && !shown.contains("SECRET"),
            "{shown}"
        );
        let auth = sigv4::Authorization::parse(&proof.headers["authorization"]).expect("auth");
        assert_eq!(
            auth.signed_headers,
            [
                "content-type",
                "host",
                "x-amz-date",
                "x-amz-security-token",
                "x-gangplank-nonce"
            ]
        );
    }
}
