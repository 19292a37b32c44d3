//! Gangplank's shared API.
//!
//! - [`istio`]: the Istio resources Gangplank reads and writes (WorkloadGroup, WorkloadEntry);
//! - [`policy`]: our own `OnboardingPolicy` resource;
//! - [`meta`]: what every resource has (metadata, label selectors);
//! - [`names`]: deterministic WorkloadEntry names and the annotations Gangplank records;
//! - [`proto`]: the gRPC contract between agent and endpoint (`proto/` in the repository).

pub mod istio;
pub mod meta;
pub mod names;
pub mod policy;
pub mod token;

/// The agent/endpoint protocol, generated from `proto/gangplank/onboarding/v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("gangplank.onboarding.v1");
}

pub use meta::{NamespacedName, Resource};

/// The agent's and endpoint's version, recorded on every WorkloadEntry.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Credential kinds as they travel in [`proto::Credential::kind`].
pub mod kind {
    /// A join token created with `gangplank token create`.
    pub const JOIN_TOKEN: &str = "join-token";
    /// An OIDC JWT issued by a configured issuer.
    pub const JWT: &str = "jwt";
    /// An AWS EC2 instance identity document with its RSA-2048 PKCS#7 signature.
    pub const AWS_EC2: &str = "aws-ec2";
    /// A GCE metadata server identity token.
    pub const GCP_GCE: &str = "gcp-gce";
    /// An Azure IMDS attested document.
    pub const AZURE_VM: &str = "azure-vm";
}
