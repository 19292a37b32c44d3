//! The served kinds: built-ins, and the kind (with its schemas) a CRD registers.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::status::{ApiError, ApiResult};
use super::store::{Shared, now_nanos};
use crate::crd::Schema;

/// A served kind.
#[derive(Debug, Clone)]
pub(super) struct Kind {
    pub(super) group: String,
    pub(super) plural: String,
    pub(super) singular: String,
    pub(super) kind: String,
    pub(super) namespaced: bool,
    /// Served versions, in the CRD's order.
    pub(super) versions: Vec<String>,
    pub(super) status_subresource: bool,
    /// Schemas by version (custom resources only).
    pub(super) schemas: HashMap<String, Schema>,
}

impl Kind {
    pub(super) fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            plural: plural.into(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.into(),
            namespaced,
            versions: vec![version.into()],
            status_subresource: status,
            schemas: HashMap::new(),
        }
    }
    pub(super) fn served(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }
    pub(super) fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }
}

/// The kind a CRD serves, with its schemas, or 422.
pub(super) fn crd_kind(shared: &Shared, crd: &Value) -> ApiResult<Kind> {
    let spec = &crd["spec"];
    let invalid = |m: String| {
        ApiError::new(
            422,
            "Invalid",
            format!("CustomResourceDefinition is invalid: {m}"),
        )
    };
    let group = spec["group"]
        .as_str()
        .filter(|g| !g.is_empty())
        .ok_or_else(|| invalid("spec.group: Required value".into()))?;
    let names = &spec["names"];
    let kind = names["kind"]
        .as_str()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| invalid("spec.names.kind: Required value".into()))?;
    let plural = names["plural"]
        .as_str()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| invalid("spec.names.plural: Required value".into()))?;
    let expected = format!("{plural}.{group}");
    if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
        return Err(invalid(format!(
            "metadata.name: must be spec.names.plural+\".\"+spec.group ({expected})"
        )));
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err(invalid("spec.scope: must be Namespaced or Cluster".into())),
    };
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        return Err(invalid("spec.versions: Required value".into()));
    }
    let file = shared
        .schemas
        .path()
        .join(format!("{expected}-{}.yaml", now_nanos()));
    let text = serde_saphyr::to_string(crd).map_err(|e| invalid(format!("cannot serialise: {e}")))?;
    std::fs::write(&file, text)
        .map_err(|e| ApiError::new(500, "InternalError", format!("writing {}: {e}", file.display())))?;
    let mut schemas = HashMap::new();
    let mut served = Vec::new();
    let mut status_subresource = false;
    for v in &versions {
        let name = v["name"].as_str().unwrap_or_default().to_owned();
        if v["served"] != json!(true) {
            continue;
        }
        if v["schema"]["openAPIV3Schema"].is_null() {
            return Err(invalid(format!(
                "spec.versions[{name}].schema.openAPIV3Schema: Required value"
            )));
        }
        let schema = Schema::load(&file, group, kind, &name).map_err(|e| invalid(e.to_string()))?;
        status_subresource |= !v["subresources"]["status"].is_null();
        schemas.insert(name.clone(), schema);
        served.push(name);
    }
    Ok(Kind {
        group: group.into(),
        plural: plural.into(),
        singular: names["singular"]
            .as_str()
            .unwrap_or(&kind.to_ascii_lowercase())
            .to_owned(),
        kind: kind.into(),
        namespaced,
        versions: served,
        status_subresource,
        schemas,
    })
}

pub(super) fn split_api_version(av: &str) -> (String, String) {
    match av.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), av.to_owned()),
    }
}

/// Kubernetes version priority: GA before beta before alpha, higher numbers first.
pub(super) fn version_priority(v: &str) -> (u8, u32, u32) {
    let rest = v.strip_prefix('v').unwrap_or(v);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let major = digits.parse().unwrap_or(0);
    let tail = &rest[digits.len()..];
    let (stage, minor) = if tail.is_empty() {
        (3, 0)
    } else if let Some(n) = tail.strip_prefix("beta") {
        (2, n.parse().unwrap_or(0))
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n.parse().unwrap_or(0))
    } else {
        (0, 0)
    };
    (stage, major, minor)
}
