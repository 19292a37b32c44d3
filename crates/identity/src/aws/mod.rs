//! AWS EC2: the instance identity document, signed by AWS, plus an agent key.
//!
//! Agent half ([`Provider`], in `provider.rs`): IMDSv2 — a session token via
//! `PUT /latest/api/token`, then the instance identity document and its PKCS#7 RSA-2048
//! signature (`/latest/dynamic/instance-identity/{document,rsa2048}`). It also holds an
//! Ed25519 key pair, generated on first join and kept on the VM, and signs the endpoint's
//! challenge with it.
//!
//! Endpoint half (`Verifier`, in `verify.rs`, with the `verify` feature): verifies the PKCS#7
//! signature with AWS's published certificate for the document's region only
//! (`Certificates`, in `certificates.rs`: built in, see `data/README.md`; overridable),
//! requires the signed content to equal the document, and defends against replay of the
//! (static, long-lived) document:
//! - a first join is accepted only within a window after the document's `pendingTime`;
//! - the first join records the agent's public key on the WorkloadEntry; every later
//!   onboarding of that instance must be signed with that key over the endpoint's nonce;
//! - an instance holds one registration at a time (`gangplank instance release` ends it).
//!
//! The IAM role of the instance profile is not in the signed document; it is proven
//! separately, through STS `GetCallerIdentity` signed with the instance profile's
//! credentials and bound to the challenge (see [`role`]). An instance without an instance
//! profile still onboards, without the `iamRole` fact.
//!
//! This file holds what both halves share: the facts, the credential's wire format and the
//! bytes the agent key signs.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::Challenge;

#[cfg(feature = "verify")]
mod certificates;
mod provider;
pub mod role;
pub mod sigv4;
#[cfg(feature = "verify")]
mod verify;

#[cfg(feature = "verify")]
pub use certificates::Certificates;
pub use provider::{Provider, load_or_create_key};
#[cfg(feature = "verify")]
pub use verify::{DEFAULT_FIRST_JOIN_WINDOW, Settings, StsSettings, Verifier, release};

/// Where IMDS answers on every EC2 instance.
pub const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";
/// Annotation holding the agent's public key (base64 SubjectPublicKeyInfo DER).
pub const AGENT_PUBLIC_KEY_ANNOTATION: &str = "onboarding.gangplank.dev/agent-public-key";
/// Annotation holding the verified document's facts (JSON).
pub const FACTS_ANNOTATION: &str = "onboarding.gangplank.dev/aws-instance";
const PROOF_CONTEXT: &[u8] = b"gangplank aws-ec2 onboarding proof v1";

/// Verified facts of an EC2 instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// The partition ([`partition`]: `aws`, `aws-cn`, `aws-us-gov`, …), from the region
    /// (derived when empty).
    #[serde(default)]
    pub partition: String,
    /// The 12-digit account id.
    pub account: String,
    /// The region, e.g. `us-east-1`.
    pub region: String,
    /// The availability zone, e.g. `us-east-1a`.
    pub zone: String,
    /// The instance id, e.g. `i-0abc…`.
    pub instance_id: String,
    /// The AMI id.
    #[serde(default)]
    pub image_id: String,
    /// The instance type, e.g. `t3.micro`.
    #[serde(default)]
    pub instance_type: String,
    /// The primary private IP (`0.0.0.0` when unknown, e.g. in `policy explain`).
    #[serde(default = "unspecified")]
    pub private_ip: IpAddr,
    /// When the instance last entered `pending` (RFC 3339).
    #[serde(default)]
    pub pending_time: String,
    /// The agent's public key (base64 SubjectPublicKeyInfo DER); empty in `policy explain`.
    #[serde(default, skip_serializing)]
    pub agent_public_key: String,
    /// The instance profile's IAM role name, verified through STS; `None` when the instance
    /// has no instance profile or the endpoint verifies no roles. The role's path is not
    /// known (it is not in the assumed-role ARN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_role: Option<String>,
}

fn unspecified() -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
}

impl Facts {
    /// Facts as written by a person (`policy explain`): camelCase fields, `partition`
    /// derived from `region` when absent.
    pub fn from_value(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let mut facts: Facts = serde_json::from_value(value.clone())
            .map_err(|e| format!("aws facts need account, region, zone and instanceId ({e})"))?;
        if facts.partition.is_empty() {
            facts.partition = partition(&facts.region).to_string();
        }
        Ok(facts)
    }

    /// The `identity` annotation value, unique per instance: `aws:<account>/<region>/<instance>`.
    pub fn annotation(&self) -> String {
        format!("aws:{}/{}/{}", self.account, self.region, self.instance_id)
    }

    /// Parts of the WorkloadEntry name: account, zone, instance id.
    pub fn name_parts(&self) -> Vec<String> {
        vec![self.account.clone(), self.zone.clone(), self.instance_id.clone()]
    }

    /// Label-safe facts.
    pub fn labels(&self) -> BTreeMap<String, String> {
        crate::text::short_labels([
            ("aws-account", &self.account),
            ("aws-region", &self.region),
            ("aws-zone", &self.zone),
            ("aws-instance-id", &self.instance_id),
            ("aws-iam-role", self.iam_role.as_ref().unwrap_or(&String::new())),
        ])
    }

    /// Annotations recording the facts and the agent's key.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Ok(json) = serde_json::to_string(self) {
            out.insert(FACTS_ANNOTATION.to_string(), json);
        }
        if !self.agent_public_key.is_empty() {
            out.insert(
                AGENT_PUBLIC_KEY_ANNOTATION.to_string(),
                self.agent_public_key.clone(),
            );
        }
        out
    }
}

/// The partition a region belongs to.
pub fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else if region.starts_with("us-iso") {
        "aws-iso"
    } else if region.starts_with("eusc-") {
        "aws-eusc"
    } else {
        "aws"
    }
}

/// What is wrong with the endpoint's AWS configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configured certificate is unusable.
    #[error("awsEc2.certificates.{region}: {message}")]
    Certificate {
        /// The region it was configured for.
        region: String,
        /// What is wrong and what to change.
        message: String,
    },
    /// The STS settings are unusable.
    #[error("awsEc2.sts: {message}")]
    Sts {
        /// What is wrong and what to change.
        message: String,
    },
}

/// The credential payload: the document exactly as IMDS served it, its signature and,
/// when the instance has an instance profile and the endpoint asked for it, the IAM role
/// proof.
#[derive(Serialize, Deserialize)]
struct Payload {
    document: String,
    rsa2048: String,
    #[serde(default, rename = "iamRole", skip_serializing_if = "Option::is_none")]
    iam_role: Option<role::Proof>,
}

/// The bytes an agent signs: a fixed context, the plane id and the nonce.
pub fn proof_message(challenge: &Challenge) -> Vec<u8> {
    let mut m = PROOF_CONTEXT.to_vec();
    for part in [&challenge.plane_id, &challenge.nonce] {
        m.push(0);
        m.extend_from_slice(part.as_bytes());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_regions() {
        assert_eq!(partition("us-east-1"), "aws");
        assert_eq!(partition("cn-north-1"), "aws-cn");
        assert_eq!(partition("us-gov-west-1"), "aws-us-gov");
        assert_eq!(partition("eusc-de-east-1"), "aws-eusc");
    }
}
