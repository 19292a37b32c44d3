//! The endpoint half of OIDC JWTs: trusted issuers, their JWKS (fetched, cached, refetched
//! on an unknown `kid` at most once per interval, kept through an outage) and the token
//! checks.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gangplank_api::{NamespacedName, kind, proto};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::RwLock;
use tokio::time::Instant;

use super::Facts;
use crate::{Challenge, Error, Identity, Result};

/// Clock skew tolerated for `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// How long a fetched JWKS is used before it is fetched again.
pub const JWKS_TTL: Duration = Duration::from_secs(5 * 60);
/// The least time between two fetches caused by an unknown `kid` (so forged kids cannot
/// make the endpoint hammer the identity provider).
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Longest JWT accepted.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
const MAX_DOCUMENT_LEN: usize = 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::EdDSA,
];
const ALLOWED_NAMES: &str = "RS256, RS384, RS512, ES256, ES384, PS256 or EdDSA";

/// What is wrong with the endpoint's `jwt.issuers` configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One issuer entry is not valid.
    #[error("jwt issuer {issuer:?}: {message}")]
    Invalid {
        /// The issuer as configured.
        issuer: String,
        /// What is wrong and what to change.
        message: String,
    },
}

/// Where an issuer's signing keys (JWKS) come from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    /// `jwksUri: URL`: fetched from this URL.
    Uri(String),
    /// `discovery: true`: `jwks_uri` from `<issuer>/.well-known/openid-configuration`.
    Discovery,
    /// `jwks: {keys: [...]}`: given inline in the config.
    Inline(Value),
}

/// One trusted issuer, as written in the endpoint config under `jwt.issuers`.
///
/// ```yaml
/// issuer: https://idp.example.corp
/// discovery: true            # or jwksUri: https://…, or jwks: {keys: [...]}
/// caBundle: /etc/gangplank/idp-ca.pem   # optional: trust only this CA when fetching
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawIssuerConfig", into = "RawIssuerConfig")]
pub struct IssuerConfig {
    /// The issuer, exactly as in the tokens' `iss`.
    pub issuer: String,
    /// Where its keys come from.
    pub jwks: JwksSource,
    /// PEM bundle of CAs to trust (instead of the system roots) when fetching keys.
    pub ca_bundle: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawIssuerConfig {
    issuer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jwks_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    discovery: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jwks: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_bundle: Option<PathBuf>,
}

impl TryFrom<RawIssuerConfig> for IssuerConfig {
    type Error = ConfigError;
    fn try_from(raw: RawIssuerConfig) -> std::result::Result<Self, ConfigError> {
        let jwks = match (raw.jwks_uri, raw.discovery, raw.jwks) {
            (Some(uri), None | Some(false), None) => JwksSource::Uri(uri),
            (None, Some(true), None) => JwksSource::Discovery,
            (None, None | Some(false), Some(keys)) => JwksSource::Inline(keys),
            _ => {
                return Err(ConfigError::Invalid {
                    issuer: raw.issuer,
                    message: "set exactly one of jwksUri: URL, discovery: true or jwks: {keys: [...]}".into(),
                });
            }
        };
        let config = IssuerConfig {
            issuer: raw.issuer,
            jwks,
            ca_bundle: raw.ca_bundle,
        };
        config.validate()?;
        Ok(config)
    }
}

impl From<IssuerConfig> for RawIssuerConfig {
    fn from(c: IssuerConfig) -> Self {
        let (jwks_uri, discovery, jwks) = match c.jwks {
            JwksSource::Uri(u) => (Some(u), None, None),
            JwksSource::Discovery => (None, Some(true), None),
            JwksSource::Inline(v) => (None, None, Some(v)),
        };
        RawIssuerConfig {
            issuer: c.issuer,
            jwks_uri,
            discovery,
            jwks,
            ca_bundle: c.ca_bundle,
        }
    }
}

impl IssuerConfig {
    /// Checks the issuer URL and key source (https, or http on loopback only).
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            issuer: self.issuer.clone(),
            message,
        };
        check_url(&self.issuer).map_err(|m| invalid(format!("issuer {m}")))?;
        match &self.jwks {
            JwksSource::Uri(u) => {
                check_url(u).map_err(|m| invalid(format!("jwksUri {m}")))?;
            }
            JwksSource::Discovery => {}
            JwksSource::Inline(v) => {
                let keys = parse_jwks(v).map_err(invalid)?;
                if keys.is_empty() {
                    return Err(invalid(
                        "inline jwks has no usable signing key (RSA, EC or OKP with use: sig)".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether `url` is https, or http on a loopback host. The error says what to change.
fn check_url(url: &str) -> std::result::Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if is_loopback(&parsed) => Ok(parsed),
        "http" => Err(format!(
            "{url:?} uses http: use https (http is allowed only for localhost, for development)"
        )),
        other => Err(format!("{url:?} has scheme {other:?}: use https")),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The signing keys of a JWKS document; keys of unknown types, symmetric keys and
/// encryption keys are skipped.
fn parse_jwks(doc: &Value) -> std::result::Result<Vec<Jwk>, String> {
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the JWKS has no \"keys\" array")?;
    Ok(keys
        .iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .filter(|k| {
            !matches!(
                k.algorithm,
                AlgorithmParameters::OctetKey(_) | AlgorithmParameters::Other(_)
            ) && k.common.public_key_use != Some(PublicKeyUse::Encryption)
        })
        .collect())
}

/// An issuer's keys as last fetched.
#[derive(Default)]
struct KeyCache {
    keys: Vec<Jwk>,
    fetched_at: Option<Instant>,
    last_kid_refetch: Option<Instant>,
}

struct Issuer {
    config: IssuerConfig,
    client: reqwest::Client,
    cache: RwLock<KeyCache>,
}

/// The endpoint half: verifies JWTs from the configured issuers, for one plane (audience).
pub struct Verifier {
    issuers: Vec<Issuer>,
    audience: String,
    refetch_interval: Duration,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "issuers",
                &self
                    .issuers
                    .iter()
                    .map(|i| i.config.issuer.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("audience", &self.audience)
            .finish()
    }
}

impl Verifier {
    /// A verifier trusting `issuers`, accepting tokens whose `aud` contains `audience`
    /// (the plane id). Fails on an invalid issuer entry or an unreadable `caBundle`.
    pub fn new(issuers: Vec<IssuerConfig>, audience: String) -> std::result::Result<Self, ConfigError> {
        let mut built = Vec::with_capacity(issuers.len());
        for config in issuers {
            config.validate()?;
            if built.iter().any(|i: &Issuer| i.config.issuer == config.issuer) {
                return Err(ConfigError::Invalid {
                    issuer: config.issuer,
                    message: "listed twice in jwt.issuers: keep one entry".into(),
                });
            }
            let client = http_client(&config)?;
            let mut cache = KeyCache::default();
            if let JwksSource::Inline(doc) = &config.jwks {
                cache.keys = parse_jwks(doc).map_err(|message| ConfigError::Invalid {
                    issuer: config.issuer.clone(),
                    message,
                })?;
            }
            built.push(Issuer {
                config,
                client,
                cache: RwLock::new(cache),
            });
        }
        Ok(Self {
            issuers: built,
            audience,
            refetch_interval: REFETCH_INTERVAL,
        })
    }

    /// Changes the least time between fetches caused by unknown key ids.
    pub fn with_refetch_interval(mut self, interval: Duration) -> Self {
        self.refetch_interval = interval;
        self
    }

    /// The audience tokens must carry (the plane id).
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Verifies `token` and returns its facts. Never changes state other than the JWKS cache.
    pub async fn verify_token(&self, token: &str) -> Result<Facts> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(reject(format!(
                "is {} bytes, more than the {MAX_TOKEN_LEN} accepted",
                token.len()
            )));
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, _signature] = parts[..] else {
            return Err(reject(
                "is malformed: expected three base64url parts separated by '.'".into(),
            ));
        };
        let header = decode_part(header, "header")?;
        let alg = algorithm(&header)?;
        let claims = decode_part(payload, "payload")?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| reject("has no iss claim: the issuer must set iss".into()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or_else(|| {
                reject(format!(
                    "issuer {} is not configured on this endpoint: add it to jwt.issuers in the endpoint config",
                    shown(iss)
                ))
            })?;
        let kid = header.get("kid").and_then(Value::as_str);
        let key = issuer.key(kid, alg, self.refetch_interval).await?;

        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&issuer.config.issuer]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        let from = &issuer.config.issuer;
        jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            let why = match e.kind() {
                K::InvalidSignature => format!(
                    "bad signature: it was not signed by key {} of issuer {from}",
                    shown(kid.unwrap_or("(no kid)"))
                ),
                K::ExpiredSignature => format!(
                    "expired at {}: obtain a fresh token from the issuer",
                    time_claim(&claims, "exp")
                ),
                K::ImmatureSignature => format!(
                    "is not valid before {} (nbf): check the VM's clock",
                    time_claim(&claims, "nbf")
                ),
                K::InvalidAudience => format!(
                    "wrong audience {} (expected the plane id {:?}): request the token with audience {:?}",
                    claims.get("aud").map_or("(none)".into(), json_text),
                    self.audience,
                    self.audience
                ),
                K::MissingRequiredClaim(c) => {
                    format!("has no {c} claim: the issuer must set {c}")
                }
                K::InvalidClaimFormat(c) => format!("claim {c} is malformed"),
                K::InvalidIssuer => format!("iss does not match issuer {from}"),
                _ => "is malformed or its key does not fit its algorithm".into(),
            };
            reject(why)
        })?;

        let now = OffsetDateTime::now_utc().unix_timestamp();
        if let Some(iat) = claims.get("iat").and_then(Value::as_i64)
            && iat > now + LEEWAY.as_secs() as i64
        {
            return Err(reject(format!(
                "was issued in the future ({}): check the issuer's clock",
                time_claim(&claims, "iat")
            )));
        }
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(reject("has an empty or non-string sub claim".into())),
        };
        Ok(Facts {
            issuer: issuer.config.issuer.clone(),
            subject,
            claims,
        })
    }
}

fn reject(why: String) -> Error {
    Error::rejected(crate::Refused::Jwt, why)
}

/// A short, printable form of an untrusted value for an error message.
fn shown(s: &str) -> String {
    const MAX: usize = 120;
    let mut out: String = s.chars().take(MAX).collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    format!("{out:?}")
}

/// An untrusted JSON value as short text (strings quoted once).
fn json_text(v: &Value) -> String {
    let text = v.to_string();
    let mut out: String = text.chars().take(120).collect();
    if text.chars().count() > 120 {
        out.push('…');
    }
    out
}

fn time_claim(claims: &Value, name: &str) -> String {
    claims
        .get(name)
        .and_then(Value::as_i64)
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "(unknown)".into())
}

fn decode_part(part: &str, what: &str) -> Result<Value> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| reject(format!("is malformed: its {what} is not base64url")))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|_| reject(format!("is malformed: its {what} is not JSON")))?;
    if !value.is_object() {
        return Err(reject(format!("is malformed: its {what} is not a JSON object")));
    }
    Ok(value)
}

fn algorithm(header: &Value) -> Result<Algorithm> {
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| reject("is malformed: its header has no alg".into()))?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(reject(
            "is unsigned (alg none): only signed tokens are accepted".into(),
        ));
    }
    if alg.to_ascii_uppercase().starts_with("HS") {
        return Err(reject(format!(
            "uses the symmetric algorithm {}, which is never accepted: the issuer must sign with {ALLOWED_NAMES}",
            shown(alg)
        )));
    }
    alg.parse::<Algorithm>()
        .ok()
        .filter(|a| ALLOWED.contains(a))
        .ok_or_else(|| {
            reject(format!(
                "uses algorithm {}, which is not accepted: use {ALLOWED_NAMES}",
                shown(alg)
            ))
        })
}

/// Whether `jwk` may verify a token signed with `alg`.
fn fits(jwk: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::AlgorithmFamily as F;
    let family = match jwk.algorithm {
        AlgorithmParameters::RSA(_) => F::Rsa,
        AlgorithmParameters::EllipticCurve(_) => F::Ec,
        AlgorithmParameters::OctetKeyPair(_) => F::Ed,
        _ => return false,
    };
    let declared = jwk
        .common
        .key_algorithm
        .map(|k| Algorithm::try_from(k).ok() == Some(alg));
    family == alg.family() && declared.unwrap_or(true)
}

fn http_client(config: &IssuerConfig) -> std::result::Result<reqwest::Client, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        issuer: config.issuer.clone(),
        message,
    };
    let mut builder = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::limited(3));
    if let Some(path) = &config.ca_bundle {
        let pem = std::fs::read(path)
            .map_err(|e| invalid(format!("cannot read caBundle {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| invalid(format!("caBundle {} is not a PEM bundle: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(invalid(format!(
                "caBundle {} holds no certificate",
                path.display()
            )));
        }
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| invalid(format!("cannot build an HTTPS client: {e}")))
}

impl Issuer {
    /// The key for `kid` and `alg`, fetching or refreshing the JWKS as needed.
    async fn key(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        refetch_interval: Duration,
    ) -> Result<DecodingKey> {
        let inline = matches!(self.config.jwks, JwksSource::Inline(_));
        if !inline {
            self.refresh_if_stale().await?;
        }
        if let Some(found) = self.pick(kid, alg).await? {
            return Ok(found);
        }
        let Some(kid) = kid else {
            return Err(self.no_key(None, alg));
        };
        if inline || !self.refetch_for_unknown_kid(refetch_interval).await? {
            return Err(self.no_key(Some(kid), alg));
        }
        self.pick(Some(kid), alg)
            .await?
            .ok_or_else(|| self.no_key(Some(kid), alg))
    }

    fn no_key(&self, kid: Option<&str>, alg: Algorithm) -> Error {
        let issuer = &self.config.issuer;
        match kid {
            Some(kid) => reject(format!(
                "bad signature: key id {} is not in the JWKS of issuer {issuer} (or does not fit {alg:?})",
                shown(kid)
            )),
            None => reject(format!(
                "has no kid and issuer {issuer} does not have exactly one {alg:?} key: the issuer must set kid"
            )),
        }
    }

    async fn pick(&self, kid: Option<&str>, alg: Algorithm) -> Result<Option<DecodingKey>> {
        let cache = self.cache.read().await;
        let candidates: Vec<&Jwk> = match kid {
            Some(kid) => cache
                .keys
                .iter()
                .filter(|k| k.common.key_id.as_deref() == Some(kid))
                .collect(),
            None => cache.keys.iter().filter(|k| fits(k, alg)).collect(),
        };
        let [jwk] = candidates[..] else {
            return Ok(None);
        };
        if !fits(jwk, alg) {
            return Err(reject(format!(
                "algorithm {alg:?} does not fit key {} of issuer {}",
                shown(kid.unwrap_or("(no kid)")),
                self.config.issuer
            )));
        }
        DecodingKey::from_jwk(jwk).map(Some).map_err(|_| {
            Error::Unavailable(format!(
                "key {} in the JWKS of issuer {} is malformed: fix the issuer's JWKS",
                shown(kid.unwrap_or("(no kid)")),
                self.config.issuer
            ))
        })
    }

    async fn refresh_if_stale(&self) -> Result<()> {
        let fresh = |c: &KeyCache| c.fetched_at.is_some_and(|t| t.elapsed() < JWKS_TTL);
        if fresh(&*self.cache.read().await) {
            return Ok(());
        }
        let mut cache = self.cache.write().await;
        if fresh(&cache) {
            return Ok(());
        }
        match self.fetch().await {
            Ok(keys) => {
                cache.keys = keys;
                cache.fetched_at = Some(Instant::now());
                Ok(())
            }
            Err(message) if !cache.keys.is_empty() => {
                // Keep the last good keys: an IdP outage must not lock out every VM.
                tracing::warn!(issuer = %self.config.issuer, %message, "JWKS refresh failed; using the keys fetched before");
                Ok(())
            }
            Err(message) => Err(Error::Unavailable(message)),
        }
    }

    /// Refetches after an unknown kid, at most once per `interval`; `Ok(false)` if skipped.
    async fn refetch_for_unknown_kid(&self, interval: Duration) -> Result<bool> {
        let mut cache = self.cache.write().await;
        if cache.last_kid_refetch.is_some_and(|t| t.elapsed() < interval) {
            return Ok(false);
        }
        cache.last_kid_refetch = Some(Instant::now());
        let keys = self.fetch().await.map_err(Error::Unavailable)?;
        cache.keys = keys;
        cache.fetched_at = Some(Instant::now());
        Ok(true)
    }

    /// Fetches the JWKS; the error says what to fix.
    async fn fetch(&self) -> std::result::Result<Vec<Jwk>, String> {
        let issuer = &self.config.issuer;
        let uri = match &self.config.jwks {
            JwksSource::Inline(doc) => return parse_jwks(doc),
            JwksSource::Uri(uri) => uri.clone(),
            JwksSource::Discovery => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc = self.get_json(&url).await?;
                if doc.get("issuer").and_then(Value::as_str) != Some(issuer.as_str()) {
                    return Err(format!(
                        "OIDC discovery document {url} names a different issuer than {issuer}: fix issuer in jwt.issuers"
                    ));
                }
                let uri = doc
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("OIDC discovery document {url} has no jwks_uri"))?;
                check_url(uri).map_err(|m| format!("jwks_uri in {url}: {m}"))?;
                uri.to_string()
            }
        };
        let doc = self.get_json(&uri).await?;
        let keys = parse_jwks(&doc).map_err(|m| format!("JWKS {uri}: {m}"))?;
        if keys.is_empty() {
            return Err(format!("JWKS {uri} of issuer {issuer} has no usable signing key"));
        }
        Ok(keys)
    }

    async fn get_json(&self, url: &str) -> std::result::Result<Value, String> {
        let fail = |what: String| format!("cannot fetch {url} for jwt issuer {}: {what}", self.config.issuer);
        let mut resp = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(error_chain(&e)))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOCUMENT_LEN {
                return Err(fail(format!("larger than {MAX_DOCUMENT_LEN} bytes")));
            }
        }
        serde_json::from_slice(&body).map_err(|e| fail(format!("not JSON: {e}")))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[async_trait]
impl crate::Verifier for Verifier {
    fn kind(&self) -> &'static str {
        kind::JWT
    }

    async fn verify(
        &self,
        credential: &proto::Credential,
        _challenge: &Challenge,
        _group: &NamespacedName,
    ) -> Result<Identity> {
        if credential.kind != kind::JWT {
            return Err(Error::UnsupportedKind(credential.kind.clone()));
        }
        let token =
            std::str::from_utf8(&credential.payload).map_err(|_| reject("is malformed: not UTF-8".into()))?;
        let facts = self.verify_token(token).await?;
        Ok(Identity {
            facts: crate::Facts::Jwt(facts),
            address: None,
        })
    }
}
