//! Kubernetes object metadata, label selectors and the [`Resource`] trait: what a stored
//! resource has (`resources` feature; the agent links none of it).

use std::collections::BTreeMap;

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
/// A typed Kubernetes-style resource Gangplank stores in a registry.
pub trait Resource: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync {
    /// `group/version`, e.g. `networking.istio.io/v1`.
    const API_VERSION: &'static str;
    /// The kind, e.g. `WorkloadEntry`.
    const KIND: &'static str;
    /// The lower-case plural used in API paths and folder names, e.g. `workloadentries`.
    const PLURAL: &'static str;
    /// The object's metadata.
    fn meta(&self) -> &ObjectMeta;
    /// The object's metadata, mutable.
    fn meta_mut(&mut self) -> &mut ObjectMeta;

    /// `namespace/name` of this object.
    fn key(&self) -> super::NamespacedName {
        super::NamespacedName {
            namespace: self.meta().namespace.clone().unwrap_or_default(),
            name: self.meta().name.clone().unwrap_or_default(),
        }
    }
}
/// Whether `selector` selects an object with `labels`, with Kubernetes semantics: an empty
/// selector selects everything; every `matchLabels` pair and every expression must hold.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector.match_labels.iter().flatten();
    let labels_match = pairs.into_iter().all(|(k, v)| labels.get(k) == Some(v));
    labels_match
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Why a label selector is not valid, or `None` when it is.
pub fn selector_problem(selector: &LabelSelector) -> Option<String> {
    for e in selector.match_expressions.iter().flatten() {
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                return Some(format!(
                    "matchExpressions key {:?}: operator {} needs values",
                    e.key, e.operator
                ));
            }
            "Exists" | "DoesNotExist" if n > 0 => {
                return Some(format!(
                    "matchExpressions key {:?}: operator {} takes no values",
                    e.key, e.operator
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Some(format!(
                    "matchExpressions key {:?}: unknown operator {other:?} (use In, NotIn, Exists or DoesNotExist)",
                    e.key
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert!(selects(&LabelSelector::default(), &labels(&[])));
        assert!(selects(&LabelSelector::default(), &labels(&[("app", "x")])));
    }

    #[test]
    fn match_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "ratings")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["db", "api"]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
        };
        assert!(selects(&sel, &labels(&[("app", "ratings"), ("tier", "db")])));
        assert!(!selects(&sel, &labels(&[("app", "ratings"), ("tier", "web")])));
        assert!(!selects(
            &sel,
            &labels(&[("app", "ratings"), ("tier", "db"), ("legacy", "y")])
        ));
        assert!(!selects(&sel, &labels(&[("app", "reviews"), ("tier", "db")])));
    }

    #[test]
    fn bad_operator_is_reported_and_selects_nothing() {
        let sel = LabelSelector {
            match_expressions: Some(vec![expr("a", "Like", &["x"])]),
            ..Default::default()
        };
        assert!(selector_problem(&sel).unwrap().contains("unknown operator"));
        assert!(!selects(&sel, &labels(&[("a", "x")])));
    }
}
