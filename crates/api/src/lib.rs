//! Gangplank's shared API.
//!
//! - [`istio`]: the Istio resources Gangplank reads and writes (WorkloadGroup, WorkloadEntry);
//! - [`policy`]: our own `OnboardingPolicy` resource;
//! - [`token`]: our own `JoinToken` resource;
//! - [`binding`]: our own `WorkloadBinding` resource (a VM's bound key);
//! - [`meta`]: what every resource has (names; metadata, label selectors);
//! - [`names`]: deterministic WorkloadEntry names and the annotations Gangplank records;
//! - [`yaml`]: the one YAML parser of config files (line, column and field in every error);
//! - [`proto`]: the gRPC contract between agent and endpoint (`proto/` in the repository);
//! - [`codec`]: its codec (prost's, with undecodable bytes the sender's fault).
//!
//! The resource types (and with them k8s-openapi) come with the `resources` feature: the
//! agent needs only the protocol, names and [`NamespacedName`].

#[cfg(feature = "resources")]
pub mod binding;
pub mod codec;
#[cfg(feature = "resources")]
pub mod crds;
#[cfg(feature = "resources")]
pub mod istio;
pub mod meta;
pub mod names;
#[cfg(feature = "resources")]
pub mod policy;
#[cfg(feature = "resources")]
pub mod token;
pub mod yaml;

/// The agent/endpoint protocol, generated from `proto/gangplank/onboarding/v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("gangplank.onboarding.v1");
}

pub use meta::NamespacedName;
#[cfg(feature = "resources")]
pub use meta::Resource;

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
    /// A rejoin: a signature over the endpoint's nonce by the VM's bound key
    /// ([`crate::binding`]).
    pub const BOUND_KEY: &str = "bound-key";
}

/// How a VM reaches the mesh, as it travels in [`proto::HostFacts::connected_over`] (empty
/// means [`connected_over::VPC`]).
pub mod connected_over {
    /// Over the private network: register the address the platform vouches for.
    pub const VPC: &str = "VPC";
    /// Over the internet: register the public address the agent reports.
    pub const INTERNET: &str = "INTERNET";
}
