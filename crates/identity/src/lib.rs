//! Platform identities.
//!
//! Each platform has one module holding both halves, so the pair is read and changed
//! together: how the agent obtains a credential ([`Provider`]) and how the endpoint verifies
//! it ([`Verifier`]). A verifier turns a credential into an [`Identity`]: facts the endpoint
//! has checked, which policy evaluation, WorkloadEntry naming and labels rely on.
//!
//! The endpoint halves are behind the `verify` feature, each in its platform's `verify`
//! submodule: they need OpenSSL (PKCS#7, X.509 chains), JWKS caches and a [`store`]. Without
//! the feature the crate is what the agent links: the providers, [`detect`], and the facts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use async_trait::async_trait;
use gangplank_api::proto;

pub mod aws;
pub mod azure;
pub mod bound;
pub mod detect;
pub mod gcp;
pub mod jwt;
mod metadata;
#[cfg(feature = "verify")]
mod pkcs7;
pub mod store;
mod text;
pub mod token;

/// What an agent proves itself against: the plane it talks to and a fresh nonce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Challenge {
    /// The onboarding plane's id; credentials are bound to it (JWT audience).
    pub plane_id: String,
    /// A single-use nonce from Discover.
    pub nonce: String,
    /// Discover's `aws_sts_url`: the STS URL (`{region}` for the instance's region) an AWS
    /// agent signs its IAM role proof for; empty when the plane verifies no IAM roles.
    /// Verifiers never use it: the endpoint sends role proofs to its own configured STS.
    pub aws_sts_url: String,
}

/// Verified facts about a workload, by platform. Serialised (externally tagged, camelCase)
/// into a VM's binding, so a rejoin is evaluated against what the first join proved.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Facts {
    /// A join token created for a WorkloadGroup.
    JoinToken(token::Facts),
    /// An OIDC JWT from a configured issuer.
    Jwt(jwt::Facts),
    /// An AWS EC2 instance identity document.
    Aws(aws::Facts),
    /// A GCE instance identity token.
    Gcp(gcp::Facts),
    /// An Azure attested document.
    Azure(azure::Facts),
}

/// A verified identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The platform facts.
    pub facts: Facts,
    /// An address the platform vouches for (e.g. an EC2 private IP); `None` when the
    /// platform says nothing about addresses and the agent's reported address is used.
    pub address: Option<IpAddr>,
}

impl Identity {
    /// The credential kind, as in [`gangplank_api::kind`].
    pub fn kind(&self) -> &'static str {
        match &self.facts {
            Facts::JoinToken(_) => gangplank_api::kind::JOIN_TOKEN,
            Facts::Jwt(_) => gangplank_api::kind::JWT,
            Facts::Aws(_) => gangplank_api::kind::AWS_EC2,
            Facts::Gcp(_) => gangplank_api::kind::GCP_GCE,
            Facts::Azure(_) => gangplank_api::kind::AZURE_VM,
        }
    }

    /// The short kind used in WorkloadEntry names (`token`, `jwt`).
    pub fn name_kind(&self) -> &'static str {
        match &self.facts {
            Facts::JoinToken(_) => "token",
            Facts::Jwt(_) => "jwt",
            Facts::Aws(_) => "aws",
            Facts::Gcp(_) => "gcp",
            Facts::Azure(_) => "azure",
        }
    }

    /// The parts of the identity that make the WorkloadEntry name unique.
    pub fn name_parts(&self) -> Vec<String> {
        match &self.facts {
            // Token and VM key: each VM a multi-use token admits has its own entry.
            Facts::JoinToken(f) if !f.key.is_empty() => vec![f.id.clone(), f.key.clone()],
            Facts::JoinToken(f) => vec![f.id.clone()],
            Facts::Jwt(f) => vec![f.issuer.clone(), f.subject.clone()],
            Facts::Aws(f) => f.name_parts(),
            Facts::Gcp(f) => f.name_parts(),
            Facts::Azure(f) => f.name_parts(),
        }
    }

    /// A one-line record for the `identity` annotation and logs (never secret).
    pub fn annotation(&self) -> String {
        match &self.facts {
            Facts::JoinToken(f) => format!("join-token:{}/{}", f.namespace, f.id),
            Facts::Jwt(f) => format!("jwt:{}#{}", f.issuer, f.subject),
            Facts::Aws(f) => f.annotation(),
            Facts::Gcp(f) => f.annotation(),
            Facts::Azure(f) => f.annotation(),
        }
    }

    /// Short, label-safe identity facts to put on the WorkloadEntry's labels.
    pub fn labels(&self) -> BTreeMap<String, String> {
        match &self.facts {
            Facts::Aws(f) => f.labels(),
            Facts::Gcp(f) => f.labels(),
            Facts::Azure(f) => f.labels(),
            Facts::JoinToken(_) | Facts::Jwt(_) => BTreeMap::new(),
        }
    }

    /// Extra annotations recording the verified facts (and, for AWS, the agent's public
    /// key, which later onboardings of the instance must prove possession of). The endpoint
    /// copies them onto the WorkloadEntry.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        match &self.facts {
            Facts::Aws(f) => f.annotations(),
            Facts::Gcp(f) => f.annotations(),
            Facts::Azure(f) => f.annotations(),
            Facts::JoinToken(_) | Facts::Jwt(_) => BTreeMap::new(),
        }
    }
}

impl fmt::Display for Identity {
    /// How a person reads the identity in an error: `jwt subject "vm-7" (issuer https://idp.example)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.facts {
            Facts::JoinToken(t) => write!(
                f,
                "join token {:?} (for WorkloadGroup {}/{})",
                t.id, t.namespace, t.workload_group
            ),
            Facts::Jwt(j) => write!(f, "jwt subject {:?} (issuer {})", j.subject, j.issuer),
            Facts::Aws(a) => {
                write!(
                    f,
                    "aws instance {} (account {}, region {}, zone {}",
                    a.instance_id, a.account, a.region, a.zone
                )?;
                match &a.iam_role {
                    Some(role) => write!(f, ", iam role {role})"),
                    None => f.write_str(")"),
                }
            }
            Facts::Gcp(g) => write!(
                f,
                "gcp instance {} (project {}, zone {}, service account {})",
                g.instance_name,
                g.project_id,
                g.zone,
                if g.service_account.is_empty() {
                    "none"
                } else {
                    &g.service_account
                }
            ),
            Facts::Azure(z) => write!(
                f,
                "azure vm {} (subscription {}, sku {})",
                z.vm_id,
                z.subscription_id,
                if z.sku.is_empty() { "none" } else { &z.sku }
            ),
        }
    }
}

/// Why a credential could not be obtained or was refused. Messages say what to change;
/// they never contain the credential itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The credential is malformed, forged, expired or otherwise not acceptable.
    #[error("{credential} {reason}")]
    Rejected {
        /// What was refused.
        credential: Refused,
        /// Why, and what to change (never the credential itself).
        reason: String,
    },
    /// The credential's kind is not configured on this endpoint.
    #[error("credential kind {0:?} is not accepted by this endpoint")]
    UnsupportedKind(String),
    /// The agent could not obtain a credential (file missing, command failed, metadata down).
    #[error("{0}")]
    Unavailable(String),
    /// A store the verifier needs (join tokens, registrations) failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// What a refusal is about: a credential kind, or a part of one. Its `Display` starts the
/// message (`jwt has no iss claim: …`), so a verifier that wraps another (GCE tokens are
/// JWTs) can re-word a refusal from its parts instead of editing the other's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A join token.
    JoinToken,
    /// An OIDC JWT.
    Jwt,
    /// A GCE instance identity token.
    GcpToken,
    /// An AWS instance identity document.
    AwsDocument,
    /// The agent key proof that binds an AWS credential to its VM.
    AwsKeyProof,
    /// An AWS IAM role proof (a signed STS GetCallerIdentity).
    AwsRoleProof,
    /// An Azure attested document.
    AzureDocument,
    /// A VM's bound key (a rejoin), or the agent key a first join carries.
    BoundKey,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refused::JoinToken => "join token",
            Refused::Jwt => "jwt",
            Refused::GcpToken => "gcp identity token",
            Refused::AwsDocument => "aws instance identity document",
            Refused::AwsKeyProof => "aws credential",
            Refused::AwsRoleProof => "aws iam role proof",
            Refused::AzureDocument => "azure attested document",
            Refused::BoundKey => "bound key",
        })
    }
}

impl Refused {
    /// What an unauthenticated caller is told: one message per class, never which check
    /// failed (the endpoint logs that), so a refusal is no oracle for token ids or bindings.
    pub fn public_message(self) -> &'static str {
        match self {
            Refused::JoinToken => {
                "join token not accepted: unknown, wrong, expired or spent — create a new one with `gangplank token create`"
            }
            Refused::Jwt => {
                "jwt not accepted: its issuer, signature, audience, expiry or claims are not what this endpoint trusts — check identity.jwt on the VM and identities.jwt on the endpoint"
            }
            Refused::GcpToken => {
                "gcp identity token not accepted: its signature, audience or expiry is not what this endpoint trusts — check the endpoint's identities.gcpGce and this VM's clock"
            }
            Refused::AwsDocument | Refused::AwsKeyProof | Refused::AwsRoleProof => {
                "aws instance credential not accepted: its signature, age, instance key or role proof is not what this endpoint trusts — an instance already registered elsewhere or re-imaged needs `gangplank instance release`"
            }
            Refused::AzureDocument => {
                "azure attested document not accepted: its signature, nonce or VM is not what this endpoint trusts — check the endpoint's identities.azureVm"
            }
            Refused::BoundKey => {
                "bound key not accepted: this VM's binding is unknown, released, expired or held by another key — the agent falls back to its first-join credential"
            }
        }
    }
}

impl Error {
    /// A refusal of `credential` because of `reason`.
    pub fn rejected(credential: Refused, reason: impl Into<String>) -> Self {
        Error::Rejected {
            credential,
            reason: reason.into(),
        }
    }
}

/// A verifier's or provider's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The agent half: obtains this platform's credential.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The credential kind it produces.
    fn kind(&self) -> &'static str;
    /// A credential bound to `challenge`.
    async fn credential(&self, challenge: &Challenge) -> Result<proto::Credential>;
}

/// The endpoint half: verifies this platform's credential.
#[async_trait]
pub trait Verifier: Send + Sync {
    /// The credential kind it verifies.
    fn kind(&self) -> &'static str;
    /// Checks `credential` (signature, audience, expiry, replay) for an onboarding into
    /// `group`, and returns the verified identity. Must not change any state.
    async fn verify(
        &self,
        credential: &proto::Credential,
        challenge: &Challenge,
        group: &gangplank_api::NamespacedName,
    ) -> Result<Identity>;
    /// Called once policy allowed the identity, just before the WorkloadEntry is written:
    /// consumes whatever is single-use (a join token's use). Fails, changing nothing, if
    /// that is no longer possible.
    async fn commit(&self, identity: &Identity, credential: &proto::Credential) -> Result<()> {
        let _ = (identity, credential);
        Ok(())
    }
}
