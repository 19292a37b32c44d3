//! `OnboardingPolicy`: which verified identities may join which WorkloadGroups.
//!
//! Namespaced; a policy only ever authorises onboarding into WorkloadGroups of its own
//! namespace. Deny by default: no rule, no entry.

use serde::{Deserialize, Serialize};

use crate::istio::resource;
use crate::meta::{LabelSelector, ObjectMeta, Resource};

/// The API group of Gangplank's own resources.
pub const GROUP: &str = "onboarding.gangplank.dev";

/// A namespaced list of allow rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnboardingPolicy {
    /// `onboarding.gangplank.dev/v1alpha1`.
    #[serde(default)]
    pub api_version: String,
    /// `OnboardingPolicy`.
    #[serde(default)]
    pub kind: String,
    /// Object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The rules.
    #[serde(default)]
    pub spec: OnboardingPolicySpec,
}
resource!(
    OnboardingPolicy,
    "onboarding.gangplank.dev/v1alpha1",
    "OnboardingPolicy",
    "onboardingpolicies"
);

/// `OnboardingPolicy.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnboardingPolicySpec {
    /// Each rule allows the workloads it matches to join the groups it selects.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

/// One allow rule: any of `workloads` may join any group selected by `onboardTo`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowRule {
    /// Identity matchers; a workload matching any of them is covered by the rule.
    #[serde(default)]
    pub workloads: Vec<WorkloadMatcher>,
    /// Target groups; an empty selector selects every group in the policy's namespace.
    #[serde(default)]
    pub onboard_to: Vec<OnboardTo>,
}

/// Which WorkloadGroups (of the policy's namespace) a rule lets workloads join.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnboardTo {
    /// Selects groups by their labels; absent or empty selects all.
    #[serde(default)]
    pub workload_group_selector: LabelSelector,
}

/// A matcher for one kind of verified identity. Exactly one field is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadMatcher {
    /// Matches OIDC JWTs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtMatcher>,
    /// Matches join tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<JoinTokenMatcher>,
    /// Matches AWS EC2 instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsMatcher>,
    /// Matches Google Compute Engine instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp: Option<GcpMatcher>,
    /// Matches Azure virtual machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureMatcher>,
}

/// Matches a verified AWS EC2 instance. Every non-empty list must contain the instance's
/// value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsMatcher {
    /// Account ids (12 digits). Required.
    #[serde(default)]
    pub accounts: Vec<String>,
    /// Partitions (`aws`, `aws-cn`, `aws-us-gov`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<String>,
    /// Regions, e.g. `us-east-1`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Availability zones, e.g. `us-east-1a`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// Instance ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_ids: Vec<String>,
    /// IAM role names of the instance profile (without path), as verified through STS; an
    /// instance without a verified role never matches a non-empty list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iam_roles: Vec<String>,
}

/// Matches a verified GCE instance. Every non-empty list must contain the instance's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GcpMatcher {
    /// Project ids. Required.
    #[serde(default)]
    pub projects: Vec<String>,
    /// Zones, e.g. `us-central1-a`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// Service account emails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Instance names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_names: Vec<String>,
}

/// Matches a verified Azure VM. Every non-empty list must contain the VM's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AzureMatcher {
    /// Subscription ids. Required.
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// VM ids (`vmId`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vm_ids: Vec<String>,
}

/// Matches a verified JWT.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtMatcher {
    /// The issuer (`iss`), exactly. Required.
    pub issuer: String,
    /// Allowed subjects (`sub`); empty allows any subject of the issuer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// Every listed claim must be present with one of the listed values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimMatcher>,
}

/// One claim condition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimMatcher {
    /// The claim's name; a dotted path (`google.compute_engine.project_id`) reaches into objects.
    pub name: String,
    /// Accepted values (a string claim equals one; a list claim contains one).
    pub values: Vec<String>,
}

/// Matches a join token created for the requested WorkloadGroup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinTokenMatcher {
    /// Token ids allowed (as printed by `gangplank token create`); empty allows any join
    /// token issued for the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
}
