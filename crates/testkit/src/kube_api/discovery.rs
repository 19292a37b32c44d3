//! Discovery: the API group and resource lists.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::kinds::{Kind, version_priority};
use super::status::{ApiError, ApiResult};
use super::store::Store;

pub(super) fn group_list(st: &Store) -> Value {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in st.kinds.values().filter(|k| !k.group.is_empty()) {
        let vs = groups.entry(k.group.clone()).or_default();
        for v in &k.versions {
            if !vs.contains(v) {
                vs.push(v.clone());
            }
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, mut vs)| {
            vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
            let versions: Vec<Value> = vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions.first().cloned().unwrap_or(Value::Null)})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub(super) fn resource_list(st: &Store, group: &str, version: &str) -> ApiResult<Value> {
    let kinds: Vec<&Kind> = st
        .kinds
        .values()
        .filter(|k| k.group == group && k.served(version))
        .collect();
    if kinds.is_empty() {
        return Err(ApiError::not_found(format!(
            "the server could not find the requested resource ({group}/{version})"
        )));
    }
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let mut resources = Vec::new();
    for k in kinds {
        resources.push(json!({"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind, "verbs": verbs}));
        if k.status_subresource {
            resources.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}));
        }
        if k.plural == "serviceaccounts" {
            resources.push(json!({"name": "serviceaccounts/token", "singularName": "", "namespaced": true, "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}));
        }
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Ok(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}
