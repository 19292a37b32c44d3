//! The agent half of AWS EC2: the IMDSv2 client, the instance profile's role proof and the
//! instance key that signs the endpoint's challenge.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use gangplank_api::{kind, proto};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{DEFAULT_IMDS_URL, Payload, proof_message, role};
use crate::{Challenge, Error, Result};

/// Seconds an IMDSv2 session token is requested for.
const IMDS_TOKEN_TTL: u32 = 60;
const IMDS_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent half: IMDSv2 client and the instance key.
pub struct Provider {
    metadata: crate::metadata::Metadata,
    key_path: PathBuf,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("base", &self.metadata.base)
            .field("key_path", &self.key_path)
            .finish()
    }
}

impl Provider {
    /// Talks to IMDS at `base` (default [`DEFAULT_IMDS_URL`]) and keeps the instance key at
    /// `key_path` (created on first use, mode 0600).
    pub fn new(base: Option<String>, key_path: impl Into<PathBuf>) -> Result<Self> {
        let key_path = key_path.into();
        if key_path.as_os_str().is_empty() {
            return Err(Error::Unavailable(
                "awsEc2.keyFile is empty: set it to where the agent keeps its instance key".into(),
            ));
        }
        Ok(Self {
            metadata: crate::metadata::Metadata::new(base, DEFAULT_IMDS_URL, IMDS_TIMEOUT)?,
            key_path,
        })
    }

    async fn imds(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> Result<String> {
        let url = format!("{}{path}", self.metadata.base);
        let mut req = self.metadata.client.request(method, &url);
        req = match token {
            Some(t) => req.header("X-aws-ec2-metadata-token", t),
            None => req.header("X-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL.to_string()),
        };
        crate::metadata::read_text(req, &url, "EC2 instance metadata (IMDSv2)").await
    }

    /// The document and its signature as IMDS serves them and, when `challenge` asks for
    /// one and the instance has an instance profile, the IAM role proof.
    async fn payload(&self, challenge: &Challenge) -> Result<Payload> {
        let token = self.imds(reqwest::Method::PUT, "/latest/api/token", None).await?;
        let document = self
            .imds(
                reqwest::Method::GET,
                "/latest/dynamic/instance-identity/document",
                Some(&token),
            )
            .await?;
        let rsa2048 = self
            .imds(
                reqwest::Method::GET,
                "/latest/dynamic/instance-identity/rsa2048",
                Some(&token),
            )
            .await?;
        // A broken instance profile costs the role fact, not the onboarding: policies that
        // list iamRoles refuse the instance, the others still admit it.
        let iam_role = if challenge.aws_sts_url.is_empty() {
            None
        } else {
            self.role_proof(&token, &document, challenge)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!("sending no IAM role proof: {e}");
                    None
                })
        };
        Ok(Payload {
            document,
            rsa2048,
            iam_role,
        })
    }

    /// A `GetCallerIdentity` request for the endpoint's STS URL, signed with the instance
    /// profile's credentials; `None` without an instance profile.
    async fn role_proof(
        &self,
        token: &str,
        document: &str,
        challenge: &Challenge,
    ) -> Result<Option<role::Proof>> {
        const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
        let fail = |why: String| Error::Unavailable(format!("instance profile credentials: {why}"));
        let url = format!("{}{CREDENTIALS}", self.metadata.base);
        let req = self
            .metadata
            .client
            .get(&url)
            .header("X-aws-ec2-metadata-token", token);
        let Some(roles) =
            crate::metadata::read_text_or_none(req, &url, "EC2 instance metadata (IMDSv2)").await?
        else {
            return Ok(None);
        };
        let Some(role) = roles.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Ok(None);
        };
        if !role::is_role_name(role) {
            return Err(fail(format!(
                "IMDS names role {}, which is not an IAM role name",
                crate::text::shown(role)
            )));
        }
        let json = self
            .imds(reqwest::Method::GET, &format!("{CREDENTIALS}{role}"), Some(token))
            .await?;
        let credentials = serde_json::from_str::<role::ImdsCredentials>(&json)
            .map_err(|e| fail(format!("IMDS answered with unexpected JSON ({e})")))?
            .into_credentials()
            .map_err(fail)?;
        #[derive(Deserialize)]
        struct Region {
            region: String,
        }
        let region = serde_json::from_str::<Region>(document)
            .map_err(|e| fail(format!("the instance identity document has no region ({e})")))?
            .region;
        let url = role::sts_url(&challenge.aws_sts_url, &region)
            .map_err(|e| fail(format!("the endpoint's STS URL {e}")))?;
        Ok(Some(role::sign(
            &credentials,
            &url,
            &region,
            &challenge.nonce,
            OffsetDateTime::now_utc(),
        )))
    }
}

/// Loads the instance key from `path`, creating it (Ed25519, PKCS#8 v1 PEM, mode 0600) if
/// absent: the VM's bound key ([`crate::bound`]), which also proves an AWS first join.
pub fn load_or_create_key(path: &Path) -> Result<Ed25519KeyPair> {
    crate::bound::load_or_create_pair(path)
}

#[async_trait]
impl crate::Provider for Provider {
    fn kind(&self) -> &'static str {
        kind::AWS_EC2
    }

    async fn credential(&self, challenge: &Challenge) -> Result<proto::Credential> {
        let payload = self.payload(challenge).await?;
        let key = load_or_create_key(&self.key_path)?;
        let proof = key.sign(&proof_message(challenge)).as_ref().to_vec();
        // SubjectPublicKeyInfo DER, as the endpoint reads it.
        let public_key = key
            .public_key()
            .as_der()
            .map_err(|e| Error::Unavailable(format!("encoding the instance public key: {e}")))?
            .as_ref()
            .to_vec();
        Ok(proto::Credential {
            kind: kind::AWS_EC2.into(),
            payload: serde_json::to_vec(&payload).map_err(|e| Error::Unavailable(e.to_string()))?,
            proof,
            public_key,
        })
    }
}
