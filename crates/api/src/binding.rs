//! `WorkloadBinding`: a VM's bound key, which lets it rejoin without a new credential.
//!
//! At a VM's first onboarding the agent creates a key pair (the private key never leaves the
//! VM) and the endpoint stores its public key here, with the identity the first-join
//! credential proved. Every later onboarding of that VM proves possession of the key over the
//! endpoint's fresh nonce and is evaluated against policy with the stored identity. The
//! binding has the name and namespace of the VM's WorkloadEntry and outlives it: the entry
//! goes after the grace period when the VM is gone, the binding only when it is released
//! (`gangplank instance release`) or has had no entry for `workloads.bindingRetention`.

use serde::{Deserialize, Serialize};

use crate::istio::resource;
use crate::meta::{ObjectMeta, Resource};

/// A stored binding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadBinding {
    /// `onboarding.gangplank.dev/v1alpha1`.
    #[serde(default)]
    pub api_version: String,
    /// `WorkloadBinding`.
    #[serde(default)]
    pub kind: String,
    /// The WorkloadEntry's namespace and name.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What is bound.
    pub spec: WorkloadBindingSpec,
    /// What the endpoint observed.
    #[serde(default)]
    pub status: WorkloadBindingStatus,
}
resource!(
    WorkloadBinding,
    "onboarding.gangplank.dev/v1alpha1",
    "WorkloadBinding",
    "workloadbindings"
);

/// `WorkloadBinding.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadBindingSpec {
    /// The WorkloadGroup (in the binding's namespace) the VM joined.
    pub workload_group: String,
    /// The VM's public key: base64 of its SubjectPublicKeyInfo DER (Ed25519).
    pub public_key: String,
    /// The kind of the credential that authorised the binding (`join-token`, `jwt`, …).
    pub credential_kind: String,
    /// The verified identity, as in the entry's `identity` annotation.
    pub identity: String,
    /// The verified facts policy is evaluated against at every rejoin.
    pub facts: serde_json::Value,
    /// The address the platform vouched for at the first join, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// RFC 3339: when the first-join credential was presented.
    pub bound_at: String,
}

/// `WorkloadBinding.status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadBindingStatus {
    /// RFC 3339: the last onboarding with the bound key (or the first join).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_joined_at: String,
    /// RFC 3339: since when the binding has had no WorkloadEntry (set by the sweep; cleared
    /// by a rejoin). The binding is removed `workloads.bindingRetention` after it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub entry_gone_since: String,
}
