//! The OnboardingPlane CRD: generated from the Rust types, shipped in `deploy/crds/`, and
//! refusing bad values at apply time (checked by the stand-in's schema validator, which
//! enforces the structural OpenAPI subset the API server does).

use std::path::Path;

use gangplank_operator::plane::{Invalid, PlaneSpec, validate_name};
use serde_json::{Value, json};

#[test]
fn deploy_crds_holds_the_generated_crd() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds/onboardingplane.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/crds/onboardingplane.yaml");
    let body: String = text
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        body,
        gangplank_operator::crd_yaml().expect("yaml"),
        "deploy/crds/onboardingplane.yaml is stale: regenerate it with gangplank-operator crd"
    );
}

fn schema() -> gangplank_testkit::crd::Schema {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crd.yaml");
    std::fs::write(&path, gangplank_operator::crd_yaml().expect("yaml")).expect("write");
    gangplank_testkit::crd::Schema::load(&path, "onboarding.gangplank.dev", "OnboardingPlane", "v1alpha1")
        .expect("a structural schema")
}

fn plane(spec: Value) -> Value {
    json!({"apiVersion": "onboarding.gangplank.dev/v1alpha1", "kind": "OnboardingPlane",
           "metadata": {"name": "mesh", "namespace": "gangplank-system"}, "spec": spec})
}

#[test]
fn the_schema_refuses_bad_values_and_accepts_a_full_spec() {
    let schema = schema();
    let full = json!({
        "hosts": ["onboarding.example.com"], "replicas": 3, "image": "e:1", "planeId": "mesh-1",
        "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "256Mi"}},
        "identities": {"joinTokens": true, "jwt": {"issuers": [{"issuer": "https://idp", "discovery": true}]}},
        "sidecarToken": {"lifetime": "1h30m"},
        "workloads": {"gracePeriod": "5m", "propagationDelay": "10s", "healthChecks": false},
        "mesh": {"istioNamespace": "istio-system", "revision": "1-24"},
        "tls": {"secretName": "mesh-tls"},
    });
    schema
        .validate(&plane(full.clone()))
        .expect("a full spec is valid");
    serde_json::from_value::<PlaneSpec>(full).expect("and decodes");
    let base = json!({"hosts": ["a.example"], "tls": {"secretName": "t"}});
    for (patch, path) in [
        (json!({"hosts": []}), "spec.hosts"),
        (json!({"hosts": [""]}), "spec.hosts[0]"),
        (json!({"replicas": 0}), "spec.replicas"),
        (
            json!({"sidecarToken": {"lifetime": "1 hour"}}),
            "spec.sidecarToken.lifetime",
        ),
        (
            json!({"workloads": {"gracePeriod": "-5m"}}),
            "spec.workloads.gracePeriod",
        ),
        (json!({"tls": {"secretName": ""}}), "spec.tls.secretName"),
        (json!({"hosts": ["Not_A_Host"]}), "spec.hosts[0]"),
        (
            json!({"tls": {"issued": {"validity": "soon"}}}),
            "spec.tls.issued.validity",
        ),
        (
            json!({"tls": {"certManager": {"issuerRef": {"name": "ca", "kind": "Vault"}}}}),
            "spec.tls.certManager.issuerRef.kind",
        ),
        (
            json!({"identities": {"gcpGce": {"jwksUrl": "http://plain"}}}),
            "spec.identities.gcpGce.jwksUrl",
        ),
    ] {
        let mut spec = base.clone();
        for (k, v) in patch.as_object().expect("object") {
            spec[k] = v.clone();
        }
        let violations = schema.validate(&plane(spec)).expect_err(path);
        assert!(
            violations.iter().any(|v| v.path.starts_with(path)),
            "{path}: {violations:?}"
        );
    }
    // No tls: the operator issues the certificate.
    schema
        .validate(&plane(json!({"hosts": ["a.example"]})))
        .expect("tls is optional");
}

#[test]
fn every_identity_kind_and_certificate_source_is_in_the_schema() {
    let schema = schema();
    for tls in [
        json!({"secretName": "mesh-tls"}),
        json!({"certManager": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}}),
        json!({"issued": {"validity": "720h", "renewBefore": "240h"}}),
        json!({}),
    ] {
        let full = json!({
            "hosts": ["onboarding.example.com"],
            "identities": {
                "joinTokens": true,
                "awsEc2": {"firstJoinWindow": "10m", "sts": {"enabled": true, "url": "https://sts.{region}.amazonaws.com/", "timeout": "5s"}},
                "gcpGce": {"jwksUrl": "https://www.googleapis.com/oauth2/v3/certs", "maxAge": "30m"},
                "azureVm": {"signerNames": ["metadata.azure.com"], "maxAge": "5m", "issuerHosts": []},
            },
            "tls": tls,
        });
        schema.validate(&plane(full.clone())).expect("valid");
        serde_json::from_value::<PlaneSpec>(full)
            .expect("decodes")
            .validate()
            .expect("and is valid");
    }
}

/// CEL rules refuse at apply time on API servers that evaluate them (1.25 and later); the
/// operator's own validation refuses the same, with the same message, on older ones.
#[test]
fn the_crd_carries_cel_rules_the_operator_also_enforces() {
    let crd = serde_json::to_value(gangplank_operator::crd()).expect("crd");
    let tls =
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tls"];
    let rules = tls["x-kubernetes-validations"]
        .as_array()
        .expect("rules on spec.tls");
    assert_eq!(rules.len(), 1, "{rules:?}");
    let message = rules[0]["message"].as_str().expect("message");
    let err = spec(json!({"tls": {"secretName": "t", "issued": {}}}))
        .validate()
        .expect_err("two sources");
    assert_eq!(err, Invalid::TlsSources);
    assert_eq!(err.to_string(), message);
}

#[test]
fn deploy_operator_yaml_is_the_generated_manifest() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/operator.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/operator.yaml");
    assert_eq!(
        text,
        gangplank_operator::manifest::yaml(&Default::default()).expect("yaml"),
        "deploy/operator.yaml is stale: regenerate it with `gangplank install operator > deploy/operator.yaml`"
    );
}

fn spec(patch: Value) -> PlaneSpec {
    let mut s =
        json!({"hosts": ["a.example"], "identities": {"joinTokens": true}, "tls": {"secretName": "t"}});
    for (k, v) in patch.as_object().expect("object") {
        s[k] = v.clone();
    }
    serde_json::from_value(s).expect("spec")
}

#[test]
fn validation_says_what_to_change() {
    let valid = spec(json!({})).validate().expect("valid");
    assert_eq!(
        valid.image,
        format!("gangplank-endpoint:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(valid.spec.replicas, 2);
    for (patch, want) in [
        (
            json!({"hosts": ["Not_A_Host"]}),
            Invalid::Host("Not_A_Host".into()),
        ),
        (json!({"replicas": 0}), Invalid::Replicas(0)),
        (
            json!({"sidecarToken": {"lifetime": "5m"}}),
            Invalid::TokenLifetime("5m".into()),
        ),
        (json!({"workloads": {"gracePeriod": "10s"}}), Invalid::GracePeriod),
        (json!({"identities": {}}), Invalid::NoIdentities),
        (
            json!({"identities": {"jwt": {"issuers": [{"issuer": "https://idp"}]}}}),
            Invalid::IssuerKeys(0),
        ),
        (
            json!({"tls": {"secretName": "t", "certManager": {"issuerRef": {"name": "ca"}}}}),
            Invalid::TlsSources,
        ),
        (
            json!({"tls": {"issued": {"validity": "1h", "renewBefore": "2h"}}}),
            Invalid::Renewal {
                validity: "1h".into(),
                renew_before: "2h".into(),
            },
        ),
        (
            json!({"tls": {"issued": {"validity": "30m", "renewBefore": "10m"}}}),
            Invalid::Renewal {
                validity: "30m".into(),
                renew_before: "10m".into(),
            },
        ),
        (
            json!({"tls": {"certManager": {"issuerRef": {"name": "ca", "kind": "Vault"}}}}),
            Invalid::IssuerKind("Vault".into()),
        ),
        (
            json!({"identities": {"azureVm": {"maxAge": "ten minutes"}}}),
            Invalid::Duration {
                field: "spec.identities.azureVm.maxAge",
                value: "ten minutes".into(),
            },
        ),
        (
            json!({"workloads": {"propagationDelay": "soon"}}),
            Invalid::Duration {
                field: "spec.workloads.propagationDelay",
                value: "soon".into(),
            },
        ),
    ] {
        assert_eq!(spec(patch.clone()).validate(), Err(want), "{patch}");
    }
    let msg = spec(json!({"sidecarToken": {"lifetime": "5m"}}))
        .validate()
        .expect_err("short")
        .to_string();
    assert!(msg.contains("set at least 10m"), "{msg}");
}

#[test]
fn plane_names_must_make_valid_child_names() {
    validate_name("mesh-1").expect("valid");
    validate_name(&"a".repeat(54)).expect("54 characters");
    for bad in ["1mesh", "mesh.a", &"a".repeat(55), "mesh-"] {
        let err = validate_name(bad).expect_err(bad);
        assert!(err.to_string().contains("at most 54"), "{err}");
    }
}
