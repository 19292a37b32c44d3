//! `JoinToken`: a short-lived, counted credential an admin creates for one WorkloadGroup.
//!
//! Only the SHA-256 of the secret is stored. The token the admin hands out is
//! `<id>.<secret>`; the id names the stored object (in the group's namespace).

use serde::{Deserialize, Serialize};

use crate::istio::resource;
use crate::meta::{ObjectMeta, Resource};

/// A stored join token (its secret is never stored, only its hash).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinToken {
    /// `onboarding.gangplank.dev/v1alpha1`.
    #[serde(default)]
    pub api_version: String,
    /// `JoinToken`.
    #[serde(default)]
    pub kind: String,
    /// `metadata.name` is the token id; the namespace is the group's.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What the token allows.
    pub spec: JoinTokenSpec,
    /// How much of it is used.
    #[serde(default)]
    pub status: JoinTokenStatus,
}
resource!(
    JoinToken,
    "onboarding.gangplank.dev/v1alpha1",
    "JoinToken",
    "jointokens"
);

/// `JoinToken.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinTokenSpec {
    /// The WorkloadGroup (in the token's namespace) the token is for.
    pub workload_group: String,
    /// Lower-case hex SHA-256 of the secret part.
    pub secret_sha256: String,
    /// RFC 3339 expiry.
    pub expires_at: String,
    /// How many onboardings the token allows.
    pub uses: u32,
}

/// `JoinToken.status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinTokenStatus {
    /// Onboardings done with the token.
    #[serde(default)]
    pub used: u32,
}
