//! Google Compute Engine: the metadata server's identity token for the instance.
//!
//! Agent half ([`Provider`]): `GET /computeMetadata/v1/instance/service-accounts/default/identity`
//! with `audience=<plane id>` and `format=full`, header `Metadata-Flavor: Google`.
//!
//! Endpoint half (`Verifier`, in `verify.rs`, with the `verify` feature): an RS256 JWT from
//! `https://accounts.google.com`, checked against Google's JWKS (`GOOGLE_JWKS_URL`, cached,
//! refetched on an unknown `kid`, overridable for air-gapped use) with the OIDC verifier in
//! [`crate::jwt`]; `aud` must be the plane id, `exp` unexpired and `iat` recent. The identity comes from the
//! `google.compute_engine` claims (present only with `format=full`) and `email`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use gangplank_api::{kind, proto};
use serde::{Deserialize, Serialize};

use crate::{Challenge, Error, Result};

#[cfg(feature = "verify")]
mod verify;

#[cfg(feature = "verify")]
pub use verify::{DEFAULT_MAX_AGE, GOOGLE_ISSUER, GOOGLE_JWKS_URL, Settings, Verifier, VerifierConfig};

/// The metadata server on every GCE instance.
pub const DEFAULT_METADATA_URL: &str = "http://metadata.google.internal";
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Verified facts of a GCE instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// `google.compute_engine.project_id`.
    pub project_id: String,
    /// `google.compute_engine.project_number`.
    #[serde(default)]
    pub project_number: String,
    /// `google.compute_engine.zone`, e.g. `us-central1-a`.
    pub zone: String,
    /// `google.compute_engine.instance_id`.
    #[serde(default)]
    pub instance_id: String,
    /// `google.compute_engine.instance_name`.
    pub instance_name: String,
    /// `email`: the instance's service account.
    #[serde(default)]
    pub service_account: String,
}

impl Facts {
    /// The `identity` annotation value: `gcp:<project>/<zone>/<instance id>`.
    pub fn annotation(&self) -> String {
        format!("gcp:{}/{}/{}", self.project_id, self.zone, self.instance_id)
    }

    /// Parts of the WorkloadEntry name: project, zone, instance name.
    pub fn name_parts(&self) -> Vec<String> {
        vec![
            self.project_id.clone(),
            self.zone.clone(),
            self.instance_name.clone(),
        ]
    }

    /// Label-safe facts.
    pub fn labels(&self) -> BTreeMap<String, String> {
        crate::text::short_labels([
            ("gcp-project", &self.project_id),
            ("gcp-zone", &self.zone),
            ("gcp-instance-name", &self.instance_name),
            ("gcp-instance-id", &self.instance_id),
        ])
    }

    /// Annotations recording the facts.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        serde_json::to_string(self)
            .map(|json| BTreeMap::from([("onboarding.gangplank.dev/gcp-instance".to_string(), json)]))
            .unwrap_or_default()
    }
}

/// The agent half: asks the metadata server for an identity token for the plane.
pub struct Provider {
    metadata: crate::metadata::Metadata,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("base", &self.metadata.base)
            .finish()
    }
}

impl Provider {
    /// Talks to the metadata server at `base` (default [`DEFAULT_METADATA_URL`]).
    pub fn new(base: Option<String>) -> Result<Self> {
        Ok(Self {
            metadata: crate::metadata::Metadata::new(base, DEFAULT_METADATA_URL, METADATA_TIMEOUT)?,
        })
    }
}

#[async_trait]
impl crate::Provider for Provider {
    fn kind(&self) -> &'static str {
        kind::GCP_GCE
    }

    async fn credential(&self, challenge: &Challenge) -> Result<proto::Credential> {
        let base = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/identity",
            self.metadata.base
        );
        let url = reqwest::Url::parse_with_params(
            &base,
            &[("audience", challenge.plane_id.as_str()), ("format", "full")],
        )
        .map_err(|e| Error::Unavailable(format!("GCE metadata URL {base}: {e}")))?;
        let req = self
            .metadata
            .client
            .get(url.clone())
            .header("Metadata-Flavor", "Google");
        let url = url.to_string();
        let token = crate::metadata::read_text(req, &url, "GCE metadata server").await?;
        Ok(proto::Credential {
            kind: kind::GCP_GCE.into(),
            payload: token.trim().as_bytes().to_vec(),
            ..Default::default()
        })
    }
}
