//! Gangplank's own CustomResourceDefinitions: `OnboardingPolicy`, `JoinToken` and `WorkloadBinding`
//! (`onboarding.gangplank.dev/v1alpha1`), with structural schemas and printer columns.
//!
//! The schemas mirror the Rust types in `crate::{policy, token}` field for field (the
//! names are the types' serde names; required fields are those without a serde default); the
//! crate's tests check both directions: a fully populated object of each type validates
//! against its schema, and every property of the schema is a field the type serialises.
//! `gangplank install crds` prints [`yaml`]; `deploy/crds/` holds the same text.

use crate::Resource;
use crate::binding::WorkloadBinding;
use crate::policy::OnboardingPolicy;
use crate::token::JoinToken;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

/// What can go wrong rendering the CRDs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A built-in CRD could not be encoded (a bug in this module).
    #[error("encoding the {kind} CustomResourceDefinition: {message}")]
    Encode {
        /// The kind.
        kind: &'static str,
        /// What failed.
        message: String,
    },
}

fn string() -> Value {
    json!({"type": "string"})
}

fn strings() -> Value {
    json!({"type": "array", "items": {"type": "string"}})
}

/// `metav1.LabelSelector`.
fn label_selector() -> Value {
    json!({
        "type": "object",
        "description": "Selects WorkloadGroups of the policy's namespace by label; empty selects all.",
        "properties": {
            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
            "matchExpressions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": string(),
                        "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                        "values": strings(),
                    },
                },
            },
        },
    })
}

/// `WorkloadMatcher`.
fn workload_matcher() -> Value {
    let claim = json!({
        "type": "object",
        "required": ["name", "values"],
        "properties": {"name": {"type": "string", "minLength": 1}, "values": strings()},
    });
    let jwt = json!({
        "type": "object",
        "required": ["issuer"],
        "properties": {
            "issuer": {"type": "string", "minLength": 1},
            "subjects": strings(),
            "claims": {"type": "array", "items": claim},
        },
    });
    let cloud = |required: &str, optional: &[&str]| {
        let mut props = serde_json::Map::new();
        props.insert(
            required.to_owned(),
            json!({"type": "array", "minItems": 1, "items": {"type": "string"}}),
        );
        for o in optional {
            props.insert((*o).to_owned(), strings());
        }
        json!({"type": "object", "required": [required], "properties": props})
    };
    json!({
        "type": "object",
        "description": "Exactly one of jwt, joinToken, aws, gcp and azure.",
        "maxProperties": 1,
        "minProperties": 1,
        "properties": {
            "jwt": jwt,
            "joinToken": {"type": "object", "properties": {"ids": strings()}},
            "aws": cloud("accounts", &["partitions", "regions", "zones", "instanceIds", "iamRoles"]),
            "gcp": cloud("projects", &["zones", "serviceAccounts", "instanceNames"]),
            "azure": cloud("subscriptions", &["vmIds"]),
        },
    })
}

/// `AllowRule`.
fn allow_rule() -> Value {
    let onboard_to = json!({
        "type": "object",
        "properties": {"workloadGroupSelector": label_selector()},
    });
    json!({
        "type": "object",
        "properties": {
            "workloads": {"type": "array", "items": workload_matcher()},
            "onboardTo": {"type": "array", "items": onboard_to},
        },
    })
}

/// The `openAPIV3Schema` of OnboardingPolicy.
pub fn onboarding_policy_schema() -> Value {
    let spec = json!({
        "type": "object",
        "properties": {
            "allow": {
                "type": "array",
                "description": "Each rule allows the workloads it matches to join the groups it selects.",
                "items": allow_rule(),
            },
        },
    });
    json!({
        "type": "object",
        "description": "Which verified identities may join which WorkloadGroups of this namespace. Deny by default.",
        "properties": {
            "apiVersion": string(),
            "kind": string(),
            "metadata": {"type": "object"},
            "spec": spec,
        },
    })
}

/// The `openAPIV3Schema` of JoinToken.
pub fn join_token_schema() -> Value {
    json!({
        "type": "object",
        "description": "A short-lived, counted credential for one WorkloadGroup; only the SHA-256 of its secret is stored.",
        "required": ["spec"],
        "properties": {
            "apiVersion": string(),
            "kind": string(),
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["workloadGroup", "secretSha256", "expiresAt", "uses"],
                "properties": {
                    "workloadGroup": {"type": "string", "minLength": 1},
                    "secretSha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "expiresAt": {"type": "string", "format": "date-time"},
                    "uses": {"type": "integer", "format": "int32", "minimum": 1},
                },
            },
            "status": {
                "type": "object",
                "properties": {
                    "used": {"type": "integer", "format": "int32", "minimum": 0},
                },
            },
        },
    })
}

/// The `openAPIV3Schema` of WorkloadBinding.
pub fn workload_binding_schema() -> Value {
    json!({
        "type": "object",
        "description": "A VM's bound key: lets the VM rejoin its WorkloadGroup by signing the endpoint's nonce, without a new credential.",
        "required": ["spec"],
        "properties": {
            "apiVersion": string(),
            "kind": string(),
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["workloadGroup", "publicKey", "credentialKind", "identity", "facts", "boundAt"],
                "properties": {
                    "workloadGroup": {"type": "string", "minLength": 1},
                    "publicKey": {"type": "string", "minLength": 1},
                    "credentialKind": {"type": "string", "minLength": 1},
                    "identity": string(),
                    "facts": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "address": string(),
                    "boundAt": {"type": "string", "format": "date-time"},
                },
            },
            "status": {
                "type": "object",
                "properties": {
                    "lastJoinedAt": {"type": "string", "format": "date-time"},
                    "entryGoneSince": {"type": "string", "format": "date-time"},
                },
            },
        },
    })
}

fn crd<T: Resource>(
    singular: &str,
    short: &str,
    schema: Value,
    columns: Value,
    status: bool,
) -> Result<CustomResourceDefinition, Error> {
    let (group, version) = T::API_VERSION.split_once('/').unwrap_or(("", T::API_VERSION));
    let mut v = json!({
        "name": version,
        "served": true,
        "storage": true,
        "schema": {"openAPIV3Schema": schema},
        "additionalPrinterColumns": columns,
    });
    if status {
        v["subresources"] = json!({"status": {}});
    }
    let value = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{group}", T::PLURAL),
            "labels": {"app.kubernetes.io/name": "gangplank", "app.kubernetes.io/part-of": "gangplank"},
        },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": T::KIND,
                "listKind": format!("{}List", T::KIND),
                "plural": T::PLURAL,
                "singular": singular,
                "shortNames": [short],
                "categories": ["gangplank"],
            },
            "versions": [v],
        },
    });
    serde_json::from_value(value).map_err(|e| Error::Encode {
        kind: T::KIND,
        message: e.to_string(),
    })
}

/// The OnboardingPolicy CRD.
pub fn onboarding_policy() -> Result<CustomResourceDefinition, Error> {
    crd::<OnboardingPolicy>(
        "onboardingpolicy",
        "obp",
        onboarding_policy_schema(),
        json!([
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ]),
        false,
    )
}

/// The JoinToken CRD (`status` is a subresource: only the endpoint counts uses).
pub fn join_token() -> Result<CustomResourceDefinition, Error> {
    crd::<JoinToken>(
        "jointoken",
        "jt",
        join_token_schema(),
        json!([
            {"name": "Group", "type": "string", "jsonPath": ".spec.workloadGroup"},
            {"name": "Uses", "type": "integer", "jsonPath": ".spec.uses"},
            {"name": "Used", "type": "integer", "jsonPath": ".status.used"},
            {"name": "Expires", "type": "string", "jsonPath": ".spec.expiresAt"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ]),
        true,
    )
}

/// The WorkloadBinding CRD (no status subresource: only the endpoint writes bindings).
pub fn workload_binding() -> Result<CustomResourceDefinition, Error> {
    crd::<WorkloadBinding>(
        "workloadbinding",
        "wb",
        workload_binding_schema(),
        json!([
            {"name": "Group", "type": "string", "jsonPath": ".spec.workloadGroup"},
            {"name": "Identity", "type": "string", "jsonPath": ".spec.identity"},
            {"name": "Joined", "type": "date", "jsonPath": ".status.lastJoinedAt"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ]),
        false,
    )
}

/// Every CRD Gangplank owns.
pub fn all() -> Result<Vec<CustomResourceDefinition>, Error> {
    Ok(vec![onboarding_policy()?, join_token()?, workload_binding()?])
}

/// Every CRD as a multi-document YAML stream, as `kubectl apply -f -` takes it.
pub fn yaml() -> Result<String, Error> {
    let mut out = String::new();
    for crd in all()? {
        let text = serde_saphyr::to_string(&crd).map_err(|e| Error::Encode {
            kind: "CustomResourceDefinition",
            message: e.to_string(),
        })?;
        out.push_str("---\n");
        out.push_str(&text);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}
