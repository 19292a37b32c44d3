//! Azure virtual machines: IMDS attested data, signed by Azure, bound to the endpoint's nonce.
//!
//! Agent half ([`Provider`]): `GET /metadata/attested/document?api-version=2020-09-01&nonce=…`
//! with header `Metadata: true`. IMDS accepts a 10-digit nonce, so both halves derive it
//! from the plane id and the endpoint's single-use challenge ([`imds_nonce`]).
//!
//! Endpoint half (`Verifier`, in `verify.rs`, with the `verify` feature): the response is `{"encoding":"pkcs7","signature":"<base64>"}`.
//! The PKCS#7 signature and its certificate chain must verify to Microsoft's roots (built
//! in, see `data/README.md`; overridable), the signer must be `metadata.azure.com` or a
//! sovereign cloud's name, the signed nonce must equal the expected one and `timeStamp`
//! must be current. The identity is the subscription id, vmId and sku.
//!
//! The document carries only the signer's certificate. Its issuing CA (one of Azure's
//! rotating "Microsoft Azure … TLS Issuing CA"s) is taken from `azureVm.intermediates`, else
//! fetched once from the certificate's AIA `caIssuers` URL and cached — only from the hosts in
//! `azureVm.issuerHosts` (default `www.microsoft.com`, where Microsoft publishes them), so a
//! forged certificate cannot make the endpoint fetch arbitrary URLs. A fetched certificate is
//! untrusted like any intermediate: the chain must still end at a configured root.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use gangplank_api::{kind, proto};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Challenge, Error, Result};

#[cfg(feature = "verify")]
mod verify;

#[cfg(feature = "verify")]
pub use verify::{
    ConfigError, DEFAULT_ISSUER_HOSTS, DEFAULT_MAX_AGE, SIGNER_NAMES, Settings, Verifier, VerifierConfig,
};

/// Where IMDS answers on every Azure VM.
pub const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";
/// The IMDS API version requested.
pub const API_VERSION: &str = "2020-09-01";
const IMDS_TIMEOUT: Duration = Duration::from_secs(5);

/// Verified facts of an Azure VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// The subscription id.
    pub subscription_id: String,
    /// The VM's unique id.
    pub vm_id: String,
    /// The image sku.
    #[serde(default)]
    pub sku: String,
}

impl Facts {
    /// The `identity` annotation value: `azure:<subscription>/<vmId>`.
    pub fn annotation(&self) -> String {
        format!("azure:{}/{}", self.subscription_id, self.vm_id)
    }

    /// Parts of the WorkloadEntry name: subscription and vmId.
    pub fn name_parts(&self) -> Vec<String> {
        vec![self.subscription_id.clone(), self.vm_id.clone()]
    }

    /// Label-safe facts.
    pub fn labels(&self) -> BTreeMap<String, String> {
        crate::text::short_labels([
            ("azure-subscription", &self.subscription_id),
            ("azure-vm-id", &self.vm_id),
        ])
    }

    /// Annotations recording the facts.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        serde_json::to_string(self)
            .map(|json| BTreeMap::from([("onboarding.gangplank.dev/azure-vm".to_string(), json)]))
            .unwrap_or_default()
    }
}

/// The nonce an agent asks IMDS to sign: 10 decimal digits derived from the plane id and
/// the endpoint's challenge nonce.
pub fn imds_nonce(challenge: &Challenge) -> String {
    let mut h = Sha256::new();
    h.update(b"gangplank azure-vm nonce v1");
    h.update([0]);
    h.update(challenge.plane_id.as_bytes());
    h.update([0]);
    h.update(challenge.nonce.as_bytes());
    let d = h.finalize();
    let mut n = [0u8; 8];
    n.copy_from_slice(&d[..8]);
    format!("{:010}", u64::from_be_bytes(n) % 10_000_000_000)
}

/// The agent half: asks IMDS for attested data bound to the challenge.
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
    /// Talks to IMDS at `base` (default [`DEFAULT_IMDS_URL`]).
    pub fn new(base: Option<String>) -> Result<Self> {
        Ok(Self {
            metadata: crate::metadata::Metadata::new(base, DEFAULT_IMDS_URL, IMDS_TIMEOUT)?,
        })
    }
}

#[async_trait]
impl crate::Provider for Provider {
    fn kind(&self) -> &'static str {
        kind::AZURE_VM
    }

    async fn credential(&self, challenge: &Challenge) -> Result<proto::Credential> {
        let base = format!("{}/metadata/attested/document", self.metadata.base);
        let nonce = imds_nonce(challenge);
        let url = reqwest::Url::parse_with_params(
            &base,
            &[("api-version", API_VERSION), ("nonce", nonce.as_str())],
        )
        .map_err(|e| Error::Unavailable(format!("Azure IMDS URL {base}: {e}")))?;
        let req = self.metadata.client.get(url.clone()).header("Metadata", "true");
        let body = crate::metadata::read_text(req, url.as_str(), "Azure IMDS").await?;
        Ok(proto::Credential {
            kind: kind::AZURE_VM.into(),
            payload: body.into_bytes(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_ten_digits_and_bound_to_the_challenge() {
        let a = Challenge {
            plane_id: "p".into(),
            nonce: "n1".into(),
            ..Default::default()
        };
        let b = Challenge {
            plane_id: "p".into(),
            nonce: "n2".into(),
            ..Default::default()
        };
        assert_eq!(imds_nonce(&a).len(), 10);
        assert!(imds_nonce(&a).bytes().all(|c| c.is_ascii_digit()));
        assert_ne!(imds_nonce(&a), imds_nonce(&b));
    }
}
