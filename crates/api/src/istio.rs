//! The Istio resources Gangplank reads and writes, as in `networking.istio.io`
//! (`v1`, `v1beta1` and `v1alpha3` are the same messages).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{ObjectMeta, Resource};

/// The API group of Istio's networking resources.
pub const GROUP: &str = "networking.istio.io";

macro_rules! resource {
    ($ty:ident, $version:literal, $kind:literal, $plural:literal) => {
        impl Resource for $ty {
            const API_VERSION: &'static str = $version;
            const KIND: &'static str = $kind;
            const PLURAL: &'static str = $plural;
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use resource;

/// A group of VM workloads that share a template: Istio's `WorkloadGroup`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadGroup {
    /// `networking.istio.io/v1` (older versions are accepted on read).
    #[serde(default)]
    pub api_version: String,
    /// `WorkloadGroup`.
    #[serde(default)]
    pub kind: String,
    /// Object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The group's specification.
    #[serde(default)]
    pub spec: WorkloadGroupSpec,
}
resource!(
    WorkloadGroup,
    "networking.istio.io/v1",
    "WorkloadGroup",
    "workloadgroups"
);

/// `WorkloadGroup.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadGroupSpec {
    /// Labels and annotations copied onto every WorkloadEntry of the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<GroupMetadata>,
    /// The template of every WorkloadEntry of the group (address and labels left empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<WorkloadEntrySpec>,
    /// The readiness probe the sidecar runs against the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<serde_json::Value>,
}

/// `WorkloadGroup.spec.metadata`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupMetadata {
    /// Labels for every entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations for every entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A workload outside Kubernetes: Istio's `WorkloadEntry`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    /// `networking.istio.io/v1`.
    #[serde(default)]
    pub api_version: String,
    /// `WorkloadEntry`.
    #[serde(default)]
    pub kind: String,
    /// Object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The entry's specification.
    #[serde(default)]
    pub spec: WorkloadEntrySpec,
    /// Istio status (conditions such as `Healthy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}
resource!(
    WorkloadEntry,
    "networking.istio.io/v1",
    "WorkloadEntry",
    "workloadentries"
);

impl WorkloadEntry {
    /// A new entry with apiVersion and kind filled in.
    pub fn new(metadata: ObjectMeta, spec: WorkloadEntrySpec) -> Self {
        Self {
            api_version: Self::API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata,
            spec,
            status: None,
        }
    }
}

/// `WorkloadEntry.spec` (also a WorkloadGroup's template).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// An IP, an FQDN or a `unix://` path.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Service port name to the port this workload listens on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    /// The workload's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The network the workload is in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// `region/zone/subzone`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// Load-balancing weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The service account the workload runs as (same namespace).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

impl WorkloadGroup {
    /// The service account of the group's workloads (`default` when the template names none,
    /// as in Istio).
    pub fn service_account(&self) -> &str {
        match self.spec.template.as_ref().map(|t| t.service_account.as_str()) {
            Some(sa) if !sa.is_empty() => sa,
            _ => "default",
        }
    }

    /// The labels an entry of this group gets from the group: the template's labels overlaid by
    /// `spec.metadata.labels`, as istiod does for auto-registered entries.
    pub fn entry_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self
            .spec
            .template
            .as_ref()
            .map(|t| t.labels.clone())
            .unwrap_or_default();
        if let Some(m) = &self.spec.metadata {
            labels.extend(m.labels.clone());
        }
        labels
    }
}
