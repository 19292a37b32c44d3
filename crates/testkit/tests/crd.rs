//! The CRD validator against Istio's real WorkloadEntry and WorkloadGroup schemas.

use gangplank_testkit::crd::{Error, Schema, Violation, istio_crds_path, istio_data_dir};
use serde_json::{Value, json};

fn entry_schema() -> Schema {
    Schema::istio("WorkloadEntry").expect("WorkloadEntry schema")
}

fn group_schema() -> Schema {
    Schema::istio("WorkloadGroup").expect("WorkloadGroup schema")
}

fn minimal_entry() -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": "ratings-vm-1", "namespace": "bookinfo"},
        "spec": {"address": "10.0.0.7"}
    })
}

/// The violations of `object`, which must be invalid.
fn violations(schema: &Schema, object: &Value) -> Vec<Violation> {
    match schema.validate(object) {
        Ok(()) => panic!("expected violations for {object:#}"),
        Err(v) => v,
    }
}

/// Asserts exactly one violation, at `path`, whose message contains `needle`.
fn assert_one(schema: &Schema, object: &Value, path: &str, needle: &str) {
    let v = violations(schema, object);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].path, path, "{v:#?}");
    assert!(
        v[0].message.contains(needle),
        "{:?} lacks {needle:?}",
        v[0].message
    );
}

#[test]
fn a_minimal_entry_passes() {
    entry_schema().validate(&minimal_entry()).expect("valid");
}

#[test]
fn a_typical_entry_passes() {
    let entry = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {
            "name": "ratings-jwt-vm-7",
            "namespace": "bookinfo",
            "uid": "0ac1d70c-00ab-477a-945a-1450b54bd739",
            "resourceVersion": "3",
            "generation": 1,
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "labels": {"app": "ratings", "app.kubernetes.io/managed-by": "gangplank"},
            "annotations": {"onboarding.gangplank.dev/identity": "jwt:https://idp.example/vm-7"},
            "ownerReferences": [{
                "apiVersion": "networking.istio.io/v1",
                "kind": "WorkloadGroup",
                "name": "ratings",
                "uid": "5b1e2a55-7d41-4ad7-8a26-9a1c0f0e1b2c",
                "controller": true
            }]
        },
        "spec": {
            "address": "vm-7.example.internal",
            "ports": {"http": 9080, "grpc-api": 9090},
            "labels": {"app": "ratings", "version": "v1"},
            "network": "vm-net",
            "locality": "eu/west/a",
            "weight": 10,
            "serviceAccount": "ratings"
        },
        "status": {
            "conditions": [{
                "type": "Healthy",
                "status": "True",
                "lastProbeTime": "2026-01-02T03:04:05.123Z",
                "observedGeneration": 1
            }],
            "somethingIstioAddsLater": {"x": 1}
        }
    });
    entry_schema().validate(&entry).expect("valid");
}

#[test]
fn every_entry_rule_is_evaluated() {
    assert_eq!(entry_schema().unevaluated_rules(), [] as [String; 0]);
    let g = group_schema();
    assert_eq!(g.unevaluated_rules(), [] as [String; 0]);
    assert_eq!(g.plural(), "workloadgroups");
    assert!(g.namespaced());
}

#[test]
fn wrong_types_are_reported() {
    let mut e = minimal_entry();
    e["spec"]["address"] = json!(10);
    assert_one(
        &entry_schema(),
        &e,
        "spec.address",
        "must be of type string, got integer",
    );

    let mut e = minimal_entry();
    e["spec"]["ports"] = json!({"http": "80"});
    assert_one(&entry_schema(), &e, "spec.ports[http]", "must be of type integer");

    let mut e = minimal_entry();
    e["metadata"]["labels"] = json!(["app"]);
    assert_one(&entry_schema(), &e, "metadata.labels", "must be of type object");

    let mut e = minimal_entry();
    e["status"] = json!({"observedGeneration": true});
    assert_one(
        &entry_schema(),
        &e,
        "status.observedGeneration",
        "integer or a string",
    );
}

#[test]
fn unknown_fields_are_errors() {
    let mut e = minimal_entry();
    e["spec"]["adress"] = json!("10.0.0.8");
    assert_one(&entry_schema(), &e, "spec.adress", "unknown field \"adress\"");

    let mut e = minimal_entry();
    e["metadata"]["lables"] = json!({});
    assert_one(&entry_schema(), &e, "metadata.lables", "unknown field");

    let mut e = minimal_entry();
    e["extra"] = json!(1);
    assert_one(&entry_schema(), &e, "extra", "unknown field");
}

#[test]
fn too_long_strings_are_refused() {
    let mut e = minimal_entry();
    e["spec"]["address"] = json!("a".repeat(257));
    assert_one(&entry_schema(), &e, "spec.address", "longer than 256 characters");
    e["spec"]["address"] = json!("é".repeat(256));
    entry_schema()
        .validate(&e)
        .expect("256 characters fit, whatever their bytes");
}

#[test]
fn port_names_and_numbers_follow_the_rules() {
    for bad in ["http_x", "-http", "http-", &"p".repeat(63)] {
        let mut e = minimal_entry();
        e["spec"]["ports"] = json!({bad: 80});
        assert_one(&entry_schema(), &e, "spec.ports", "port name must be valid");
    }
    for bad in [0, 65536] {
        let mut e = minimal_entry();
        e["spec"]["ports"] = json!({"http": bad});
        assert_one(
            &entry_schema(),
            &e,
            "spec.ports[http]",
            "port must be between 1-65535",
        );
    }
    let mut e = minimal_entry();
    e["spec"]["ports"] = json!({"http": 4294967296u64});
    let v = violations(&entry_schema(), &e);
    assert!(
        v.iter().any(|v| v.message.contains("at most 4294967295")),
        "{v:#?}"
    );
}

#[test]
fn missing_required_fields_are_reported() {
    let mut e = minimal_entry();
    e.as_object_mut().expect("object").remove("spec");
    assert_one(&entry_schema(), &e, "spec", "required field is missing");

    let mut e = minimal_entry();
    e["metadata"] = json!({"namespace": "bookinfo"});
    assert_one(&entry_schema(), &e, "metadata.name", "required field is missing");

    let mut e = minimal_entry();
    e["spec"] = json!({"ports": {"http": 80}});
    assert_one(&entry_schema(), &e, "spec", "Address is required");
    e["spec"]["network"] = json!("vm-net");
    entry_schema()
        .validate(&e)
        .expect("a network stands in for the address");
}

#[test]
fn metadata_is_checked_like_object_meta() {
    let mut e = minimal_entry();
    e["metadata"]["name"] = json!("Ratings_VM");
    assert_one(&entry_schema(), &e, "metadata.name", "DNS-1123 subdomain");

    let mut e = minimal_entry();
    e["metadata"]["labels"] = json!({"app": "-bad"});
    assert_one(
        &entry_schema(),
        &e,
        "metadata.labels[app]",
        "not a valid label value",
    );

    let mut e = minimal_entry();
    e["metadata"]["annotations"] = json!({"bad key": "x"});
    assert_one(
        &entry_schema(),
        &e,
        "metadata.annotations[bad key]",
        "key \"bad key\"",
    );

    let mut e = minimal_entry();
    e["metadata"]["ownerReferences"] = json!([{"kind": "WorkloadGroup", "name": "g"}]);
    let v = violations(&entry_schema(), &e);
    let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "metadata.ownerReferences[0].apiVersion",
            "metadata.ownerReferences[0].uid"
        ]
    );

    let mut e = minimal_entry();
    e["kind"] = json!("WorkloadGroup");
    assert_one(&entry_schema(), &e, "kind", "must be WorkloadEntry");
}

#[test]
fn unix_socket_addresses_follow_the_rules() {
    let mut e = minimal_entry();
    e["spec"]["address"] = json!("unix:///var/run/app.sock");
    entry_schema().validate(&e).expect("absolute UDS");
    e["spec"]["ports"] = json!({"http": 80});
    assert_one(&entry_schema(), &e, "spec", "UDS may not include ports");

    let mut e = minimal_entry();
    e["spec"]["address"] = json!("unix://relative.sock");
    assert_one(
        &entry_schema(),
        &e,
        "spec.address",
        "absolute path or abstract socket",
    );
    e["spec"]["address"] = json!("unix:///var/run/");
    assert_one(&entry_schema(), &e, "spec.address", "UDS may not be a dir");
}

#[test]
fn several_violations_are_all_reported() {
    let e = json!({
        "metadata": {"name": "x"},
        "spec": {"address": 1, "weight": -1, "bogus": true}
    });
    let v = violations(&entry_schema(), &e);
    let text: Vec<String> = v.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "spec.address: must be of type string, got integer",
            "spec.weight: must be at least 0, got -1",
            "spec.bogus: unknown field \"bogus\"",
        ]
    );
}

#[test]
fn istioctl_workload_group_passes() {
    let path = istio_data_dir().join("vmconfig-ipv4/workloadgroup.yaml");
    let text = std::fs::read_to_string(&path).expect("read workloadgroup.yaml");
    let group: Value = serde_saphyr::from_str(&text).expect("parse");
    group_schema().validate(&group).expect("valid");
}

#[test]
fn workload_group_probe_is_a_oneof() {
    let group = |probe: Value| {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadGroup",
            "metadata": {"name": "ratings", "namespace": "bookinfo"},
            "spec": {"template": {"serviceAccount": "ratings"}, "probe": probe}
        })
    };
    let schema = group_schema();
    schema
        .validate(&group(json!({"httpGet": {"port": 8080, "scheme": "HTTPS"}})))
        .expect("one method");
    schema
        .validate(&group(json!({"periodSeconds": 5})))
        .expect("no method passes the schema (istiod's webhook refuses it)");
    assert_one(
        &schema,
        &group(json!({"httpGet": {"port": 8080}, "tcpSocket": {"port": 8080}})),
        "spec.probe",
        "at most one of",
    );
    assert_one(
        &schema,
        &group(json!({"httpGet": {"port": 8080, "scheme": "FTP"}})),
        "spec.probe.httpGet.scheme",
        "",
    );
    assert_one(
        &schema,
        &group(json!({"httpGet": {"path": "/"}})),
        "spec.probe.httpGet.port",
        "required field is missing",
    );
    assert_one(
        &schema,
        &group(json!({"periodSeconds": 3_000_000_000u64})),
        "spec.probe.periodSeconds",
        "int32",
    );
    let mut no_template = group(json!({"tcpSocket": {"port": 22}}));
    no_template["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("template");
    assert_one(
        &schema,
        &no_template,
        "spec.template",
        "required field is missing",
    );
}

#[test]
fn unknown_crds_are_named_in_the_error() {
    let err = Schema::load(istio_crds_path(), "networking.istio.io", "WorkloadEntry", "v9")
        .expect_err("no such version");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("WorkloadEntry.networking.istio.io version v9"),
        "{err}"
    );
    let err = Schema::load("/nonexistent/crds.yaml", "g", "K", "v1").expect_err("no file");
    assert!(err.to_string().contains("/nonexistent/crds.yaml"), "{err}");
}

#[test]
fn a_crd_object_gives_the_same_schema() {
    let text = std::fs::read_to_string(istio_crds_path()).expect("read CRDs");
    let start = text
        .find("name: workloadentries.networking.istio.io")
        .expect("WorkloadEntry CRD");
    let doc_start = text[..start].rfind("---\n").map_or(0, |i| i + 4);
    let doc_end = text[start..].find("\n---").map_or(text.len(), |i| start + i);
    let crd: Value = serde_saphyr::from_str(&text[doc_start..doc_end]).expect("parse CRD");
    let schema = Schema::from_crd(&crd, "v1").expect("schema");
    assert_eq!(
        (schema.group(), schema.kind(), schema.version()),
        ("networking.istio.io", "WorkloadEntry", "v1")
    );
    schema.validate(&minimal_entry()).expect("valid");
    let mut e = minimal_entry();
    e["spec"]["adress"] = json!("x");
    assert_one(&schema, &e, "spec.adress", "unknown field");
    assert!(matches!(
        Schema::from_crd(&crd, "v2"),
        Err(Error::NotFound { .. })
    ));
}
