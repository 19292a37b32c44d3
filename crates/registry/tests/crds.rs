//! Gangplank's CRDs: their schemas match the Rust types, and `deploy/crds/` holds them.

use std::collections::BTreeSet;
use std::path::Path;

use gangplank_api::Resource;
use gangplank_api::meta::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use gangplank_api::policy::{
    AllowRule, AwsMatcher, AzureMatcher, ClaimMatcher, GcpMatcher, JoinTokenMatcher, JwtMatcher, OnboardTo,
    OnboardingPolicy, OnboardingPolicySpec, WorkloadMatcher,
};
use gangplank_api::token::{JoinToken, JoinTokenSpec, JoinTokenStatus};
use gangplank_registry::crds;
use gangplank_testkit::crd::Schema;
use serde_json::{Value, json};

/// Loads the schema of `kind` from the rendered CRDs (through the API server's validator).
fn schema(kind: &str) -> Schema {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crds.yaml");
    std::fs::write(&path, crds::yaml().unwrap()).unwrap();
    let s = Schema::load(&path, "onboarding.gangplank.dev", kind, "v1alpha1").unwrap();
    // The file may go: the schema is compiled.
    drop(dir);
    s
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("bookinfo".into()),
        ..Default::default()
    }
}

/// An OnboardingPolicy with every field set.
fn full_policy() -> OnboardingPolicy {
    OnboardingPolicy {
        api_version: OnboardingPolicy::API_VERSION.into(),
        kind: OnboardingPolicy::KIND.into(),
        metadata: meta("vms"),
        spec: OnboardingPolicySpec {
            allow: vec![AllowRule {
                workloads: vec![
                    WorkloadMatcher {
                        jwt: Some(JwtMatcher {
                            issuer: "https://idp.example".into(),
                            subjects: vec!["vm-7".into()],
                            claims: vec![ClaimMatcher {
                                name: "google.compute_engine.project_id".into(),
                                values: vec!["prod".into()],
                            }],
                        }),
                        ..Default::default()
                    },
                    WorkloadMatcher {
                        join_token: Some(JoinTokenMatcher {
                            ids: vec!["abc123".into()],
                        }),
                        ..Default::default()
                    },
                    WorkloadMatcher {
                        aws: Some(AwsMatcher {
                            accounts: vec!["123456789012".into()],
                            partitions: vec!["aws".into()],
                            regions: vec!["us-east-1".into()],
                            zones: vec!["us-east-1a".into()],
                            instance_ids: vec!["i-0abc".into()],
                            iam_roles: vec!["ratings".into()],
                        }),
                        ..Default::default()
                    },
                    WorkloadMatcher {
                        gcp: Some(GcpMatcher {
                            projects: vec!["prod".into()],
                            zones: vec!["us-central1-a".into()],
                            service_accounts: vec!["vm@prod.iam.gserviceaccount.com".into()],
                            instance_names: vec!["vm-7".into()],
                        }),
                        ..Default::default()
                    },
                    WorkloadMatcher {
                        azure: Some(AzureMatcher {
                            subscriptions: vec!["sub-1".into()],
                            vm_ids: vec!["vm-id-1".into()],
                        }),
                        ..Default::default()
                    },
                ],
                onboard_to: vec![OnboardTo {
                    workload_group_selector: LabelSelector {
                        match_labels: Some([("app".to_owned(), "ratings".to_owned())].into()),
                        match_expressions: Some(vec![LabelSelectorRequirement {
                            key: "tier".into(),
                            operator: "In".into(),
                            values: Some(vec!["db".into()]),
                        }]),
                    },
                }],
            }],
        },
    }
}

fn full_token() -> JoinToken {
    JoinToken {
        api_version: JoinToken::API_VERSION.into(),
        kind: JoinToken::KIND.into(),
        metadata: meta("abc123"),
        spec: JoinTokenSpec {
            workload_group: "ratings".into(),
            secret_sha256: "a".repeat(64),
            expires_at: "2026-01-01T00:00:00Z".into(),
            uses: 3,
        },
        status: JoinTokenStatus { used: 1 },
    }
}

/// Every property path of a schema (`spec.allow[].workloads[].jwt.issuer`), `metadata` aside.
fn schema_paths(schema: &Value, at: &str, out: &mut BTreeSet<String>) {
    if let Some(props) = schema["properties"].as_object() {
        for (k, v) in props {
            if at.is_empty() && matches!(k.as_str(), "metadata" | "apiVersion" | "kind") {
                continue;
            }
            let p = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            out.insert(p.clone());
            schema_paths(v, &p, out);
        }
    }
    if schema["items"].is_object() {
        schema_paths(&schema["items"], &format!("{at}[]"), out);
    }
}

/// Every field path of a JSON value, `metadata` aside; map keys under `matchLabels` excluded.
fn value_paths(v: &Value, at: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if at.ends_with("matchLabels") {
                return;
            }
            for (k, v) in m {
                if at.is_empty() && matches!(k.as_str(), "metadata" | "apiVersion" | "kind") {
                    continue;
                }
                let p = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                out.insert(p.clone());
                value_paths(v, &p, out);
            }
        }
        Value::Array(items) => {
            for i in items {
                value_paths(i, &format!("{at}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn full_objects_pass_their_schemas_and_cover_every_property() {
    let policy = serde_json::to_value(full_policy()).unwrap();
    schema("OnboardingPolicy").validate(&policy).unwrap();
    let token = serde_json::to_value(full_token()).unwrap();
    schema("JoinToken").validate(&token).unwrap();

    for (schema_value, object) in [
        (crds::onboarding_policy_schema(), &policy),
        (crds::join_token_schema(), &token),
    ] {
        let mut declared = BTreeSet::new();
        schema_paths(&schema_value, "", &mut declared);
        let mut used = BTreeSet::new();
        value_paths(object, "", &mut used);
        assert_eq!(declared, used, "schema properties and the type's fields differ");
    }
}

#[test]
fn schemas_refuse_what_the_types_refuse() {
    let policy_schema = schema("OnboardingPolicy");
    // A JWT matcher needs an issuer (a required field of the Rust type).
    let mut p = serde_json::to_value(full_policy()).unwrap();
    p["spec"]["allow"][0]["workloads"][0]["jwt"] = json!({"subjects": ["x"]});
    assert!(serde_json::from_value::<OnboardingPolicy>(p.clone()).is_err());
    assert!(policy_schema.validate(&p).is_err());
    // Unknown fields are refused by both.
    let mut p = serde_json::to_value(full_policy()).unwrap();
    p["spec"]["deny"] = json!([]);
    assert!(serde_json::from_value::<OnboardingPolicy>(p.clone()).is_err());
    assert!(policy_schema.validate(&p).is_err());

    let token_schema = schema("JoinToken");
    for (field, bad) in [
        ("uses", json!(0)),
        ("secretSha256", json!("not-hex")),
        ("expiresAt", json!("tomorrow")),
    ] {
        let mut t = serde_json::to_value(full_token()).unwrap();
        t["spec"][field] = bad;
        assert!(token_schema.validate(&t).is_err(), "{field}");
    }
    let mut t = serde_json::to_value(full_token()).unwrap();
    t["spec"].as_object_mut().unwrap().remove("workloadGroup");
    assert!(token_schema.validate(&t).is_err());
}

#[test]
fn crds_are_structural_with_printer_columns() {
    for crd in crds::all().unwrap() {
        let version = &crd.spec.versions[0];
        assert!(version.served && version.storage);
        assert_eq!(crd.spec.scope, "Namespaced");
        let columns = version
            .additional_printer_columns
            .as_ref()
            .expect("printer columns");
        assert!(columns.iter().any(|c| c.name == "Age"));
        let schema = serde_json::to_value(
            version
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        assert_structural(&schema, "");
    }
    let token = crds::join_token().unwrap();
    assert!(
        token.spec.versions[0]
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
}

/// Structural: every node has a type (or preserves unknown fields).
fn assert_structural(s: &Value, at: &str) {
    assert!(
        s["type"].is_string() || s["x-kubernetes-preserve-unknown-fields"] == true,
        "{at} has no type"
    );
    if let Some(props) = s["properties"].as_object() {
        for (k, v) in props {
            assert_structural(v, &format!("{at}.{k}"));
        }
    }
    if s["items"].is_object() {
        assert_structural(&s["items"], &format!("{at}[]"));
    }
    if s["additionalProperties"].is_object() {
        assert_structural(&s["additionalProperties"], &format!("{at}{{}}"));
    }
}

#[test]
fn deploy_folder_ships_the_generated_crds() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds/gangplank.yaml");
    let generated = crds::yaml().unwrap();
    if std::env::var_os("GANGPLANK_UPDATE_DEPLOY").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == generated,
        "{} is not what `gangplank install crds` prints: regenerate it with \
         GANGPLANK_UPDATE_DEPLOY=1 cargo test -p gangplank-registry --test crds",
        path.display()
    );
}
