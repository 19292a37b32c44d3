//! The endpoint half of GCE: Google's identity token, checked by the OIDC verifier against
//! Google's keys, then read for the instance's facts.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gangplank_api::{NamespacedName, kind, proto};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Facts;
use crate::jwt::{IssuerConfig, JwksSource};
use crate::{Challenge, Error, Identity, Result};

/// The issuer of GCE identity tokens.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";
/// Google's published signing keys for those tokens.
pub const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
/// How old (by `iat`) a token may be, unless configured.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60 * 60);

/// The endpoint's GCP settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifierConfig {
    /// Where Google's keys are fetched (override for air-gapped mirrors).
    pub jwks_url: String,
    /// PEM CAs to trust when fetching the keys (instead of the system roots).
    pub ca_bundle: Option<PathBuf>,
    /// How old a token may be.
    pub max_age: Duration,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            jwks_url: GOOGLE_JWKS_URL.into(),
            ca_bundle: None,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

/// The endpoint's `identities.gcpGce` settings (all optional).
///
/// ```yaml
/// gcpGce: {jwksUrl: https://mirror.example/google-certs, caBundle: /etc/ca.pem, maxAge: 1h}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// Override of [`GOOGLE_JWKS_URL`] (air-gapped mirrors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// PEM CAs to trust when fetching the keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<PathBuf>,
    /// How old a token may be (default 1h).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
}

impl Settings {
    /// The verifier these settings describe, for tokens whose audience is `plane_id`.
    pub fn verifier(&self, plane_id: String) -> std::result::Result<Verifier, crate::jwt::ConfigError> {
        Verifier::new(
            VerifierConfig {
                jwks_url: self.jwks_url.clone().unwrap_or_else(|| GOOGLE_JWKS_URL.into()),
                ca_bundle: self.ca_bundle.clone(),
                max_age: self.max_age.unwrap_or(DEFAULT_MAX_AGE),
            },
            plane_id,
        )
    }
}

/// The endpoint half.
pub struct Verifier {
    jwt: crate::jwt::Verifier,
    max_age: Duration,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("jwt", &self.jwt)
            .field("max_age", &self.max_age)
            .finish()
    }
}

fn reject(why: impl fmt::Display) -> Error {
    Error::rejected(crate::Refused::GcpToken, why.to_string())
}

impl Verifier {
    /// A verifier for tokens whose audience is `plane_id`.
    pub fn new(
        config: VerifierConfig,
        plane_id: String,
    ) -> std::result::Result<Self, crate::jwt::ConfigError> {
        let issuer = IssuerConfig {
            issuer: GOOGLE_ISSUER.into(),
            jwks: JwksSource::Uri(config.jwks_url),
            ca_bundle: config.ca_bundle,
        };
        Ok(Self {
            jwt: crate::jwt::Verifier::new(vec![issuer], plane_id)?,
            max_age: config.max_age,
        })
    }

    /// Changes the least time between JWKS fetches caused by unknown key ids.
    pub fn with_refetch_interval(mut self, interval: Duration) -> Self {
        self.jwt = self.jwt.with_refetch_interval(interval);
        self
    }

    /// Verifies a token and returns the instance's facts.
    pub async fn verify_token(&self, token: &str) -> Result<Facts> {
        let token = token.trim();
        let header = token
            .split('.')
            .next()
            .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
            .and_then(|h| serde_json::from_slice::<Value>(&h).ok())
            .ok_or_else(|| reject("is malformed: expected a JWT"))?;
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err(reject(
                "is not signed with RS256, as Google signs every identity token",
            ));
        }
        let facts = self.jwt.verify_token(token).await.map_err(|e| match e {
            Error::Rejected { reason, .. } => reject(format!("refused: {reason}")),
            other => other,
        })?;
        let claims = &facts.claims;
        let iat = claims
            .get("iat")
            .and_then(Value::as_i64)
            .ok_or_else(|| reject("has no iat claim"))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if now - iat > self.max_age.as_secs() as i64 {
            return Err(reject(format!(
                "was issued {}s ago, more than the {}s accepted: fetch a fresh token from the metadata server",
                now - iat,
                self.max_age.as_secs()
            )));
        }
        let gce = claims
            .get("google")
            .and_then(|g| g.get("compute_engine"))
            .ok_or_else(|| {
                reject("has no google.compute_engine claims: request it with format=full from a GCE instance")
            })?;
        let text = |name: &str| -> Result<String> {
            match gce.get(name) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(Value::Number(n)) => Ok(n.to_string()),
                _ => Err(reject(format!("has no google.compute_engine.{name} claim"))),
            }
        };
        Ok(Facts {
            project_id: text("project_id")?,
            project_number: text("project_number").unwrap_or_default(),
            zone: text("zone")?,
            instance_id: text("instance_id")?,
            instance_name: text("instance_name")?,
            service_account: claims
                .get("email")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        })
    }
}

#[async_trait]
impl crate::Verifier for Verifier {
    fn kind(&self) -> &'static str {
        kind::GCP_GCE
    }

    async fn verify(
        &self,
        credential: &proto::Credential,
        _challenge: &Challenge,
        _group: &NamespacedName,
    ) -> Result<Identity> {
        if credential.kind != kind::GCP_GCE {
            return Err(Error::UnsupportedKind(credential.kind.clone()));
        }
        let token = std::str::from_utf8(&credential.payload).map_err(|_| reject("is not UTF-8"))?;
        let facts = self.verify_token(token).await?;
        Ok(Identity {
            facts: crate::Facts::Gcp(facts),
            address: None,
        })
    }
}
