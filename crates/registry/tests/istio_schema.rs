//! What the directory registry writes is valid for Istio: each file, read back as YAML,
//! passes the `networking.istio.io/v1` CRD schema istiod's objects must pass.

use std::collections::BTreeMap;

use gangplank_api::istio::{
    GroupMetadata, WorkloadEntry, WorkloadEntrySpec, WorkloadGroup, WorkloadGroupSpec,
};
use gangplank_api::meta::{ObjectMeta, OwnerReference};
use gangplank_api::names::{annotation, entry_name, label};
use gangplank_api::{NamespacedName, Resource};
use gangplank_registry::{AnnotationPatch, Registry as _, dir};
use gangplank_testkit::crd::{Schema, Violation};
use serde_json::{Value, json};

fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn group() -> WorkloadGroup {
    WorkloadGroup {
        metadata: ObjectMeta {
            name: Some("ratings".into()),
            namespace: Some("bookinfo".into()),
            ..Default::default()
        },
        spec: WorkloadGroupSpec {
            metadata: Some(GroupMetadata {
                labels: strings(&[("app", "ratings"), ("version", "v1")]),
                annotations: strings(&[("proxy.istio.io/config", "proxyMetadata:\n  A: b\n")]),
            }),
            template: Some(WorkloadEntrySpec {
                ports: BTreeMap::from([("http".to_string(), 9080)]),
                service_account: "ratings".into(),
                network: "vm-net".into(),
                ..Default::default()
            }),
            probe: Some(json!({"httpGet": {"port": 9080, "path": "/health"}, "periodSeconds": 5})),
        },
        ..Default::default()
    }
}

/// An entry as the endpoint registers it for a verified identity.
fn typical_entry(group: &WorkloadGroup, name: &str, address: &str) -> WorkloadEntry {
    let mut labels = group.entry_labels();
    labels.insert(label::MANAGED_BY.into(), label::MANAGED_BY_VALUE.into());
    labels.insert(label::WORKLOAD_GROUP.into(), "ratings".into());
    labels.insert(label::CREDENTIAL_KIND.into(), "jwt".into());
    let annotations = strings(&[
        (annotation::IDENTITY, "jwt:https://idp.example/vm-7"),
        (annotation::CREDENTIAL_KIND, "jwt"),
        (annotation::AGENT_VERSION, gangplank_api::VERSION),
        (annotation::HOSTNAME, "vm-7.internal"),
        (annotation::CONNECTED_AT, "2026-01-02T03:04:05Z"),
        (annotation::ENDPOINT_REPLICA, "gangplank-endpoint-0"),
    ]);
    let template = group.spec.template.clone().unwrap_or_default();
    WorkloadEntry::new(
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("bookinfo".into()),
            labels: Some(labels.clone()),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: WorkloadGroup::API_VERSION.into(),
                kind: WorkloadGroup::KIND.into(),
                name: "ratings".into(),
                uid: group.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        WorkloadEntrySpec {
            address: address.into(),
            labels,
            weight: Some(1),
            locality: "eu-west1/eu-west1-b".into(),
            ..template
        },
    )
}

/// The file behind `key`, parsed as plain YAML (not through our types).
fn file_of<T: Resource>(reg: &dir::Registry, key: &NamespacedName) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(reg.path_of::<T>(key)?)?;
    Ok(serde_saphyr::from_str(&text)?)
}

fn check(schema: &Schema, file: &Value) -> Result<(), String> {
    schema.validate(file).map_err(|v| {
        let lines: Vec<String> = v.iter().map(Violation::to_string).collect();
        format!("{}\nin\n{file:#}", lines.join("\n"))
    })
}

#[tokio::test]
async fn registered_entries_are_valid_workload_entries() -> anyhow::Result<()> {
    let entries = Schema::istio("WorkloadEntry")?;
    let groups = Schema::istio("WorkloadGroup")?;
    let tmp = tempfile::tempdir()?;
    let reg = dir::Registry::open(tmp.path())?;

    let g = reg.put(&group()).await?;
    let file = file_of::<WorkloadGroup>(&reg, &g.key())?;
    check(&groups, &file).map_err(anyhow::Error::msg)?;

    let long = entry_name("ratings", "jwt", &["https://idp.example", &"VM".repeat(200)]);
    for (name, address) in [
        ("ratings-jwt-vm-7", "10.0.0.7"),
        ("ratings-jwt-vm-8", "vm-8.example.internal"),
        ("ratings-jwt-vm-9", "2001:db8::9"),
        (long.as_str(), "10.0.0.10"),
    ] {
        let stored = reg.apply_entry(&typical_entry(&g, name, address)).await?;
        let key = stored.key();
        // The full life of an entry: connected, healthy, disconnected.
        reg.set_entry_status(
            &key,
            &json!({"conditions": [{
                "type": "Healthy",
                "status": "True",
                "lastProbeTime": "2026-01-02T03:04:05.123456Z",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
                "reason": "HealthCheck",
                "message": "probe succeeded"
            }]}),
        )
        .await?;
        reg.annotate_entry(
            &key,
            &AnnotationPatch {
                set: strings(&[(annotation::DISCONNECTED_AT, "2026-01-02T04:00:00Z")]),
                remove: vec![annotation::ENDPOINT_REPLICA.into()],
            },
        )
        .await?;

        let file = file_of::<WorkloadEntry>(&reg, &key)?;
        check(&entries, &file).map_err(anyhow::Error::msg)?;
        assert_eq!(
            file["metadata"]["ownerReferences"][0]["uid"],
            json!(g.metadata.uid)
        );
        assert_eq!(file["status"]["conditions"][0]["type"], "Healthy");
        assert_eq!(file["spec"]["ports"]["http"], 9080);
    }
    Ok(())
}

#[tokio::test]
async fn the_schema_check_catches_what_istio_would_refuse() -> anyhow::Result<()> {
    let entries = Schema::istio("WorkloadEntry")?;
    let tmp = tempfile::tempdir()?;
    let reg = dir::Registry::open(tmp.path())?;
    let g = reg.put(&group()).await?;

    // The registry stores what it is given; the schema is what would catch a bad entry.
    let mut bad = typical_entry(&g, "ratings-bad", "unix:///var/run/app.sock");
    bad.spec.ports = BTreeMap::from([("http_1".to_string(), 70000)]);
    let stored = reg.apply_entry(&bad).await?;
    let file = file_of::<WorkloadEntry>(&reg, &stored.key())?;
    let violations = entries.validate(&file).expect_err("invalid entry passed");
    let text: Vec<String> = violations.iter().map(Violation::to_string).collect();
    assert_eq!(
        text,
        [
            "spec.ports[http_1]: port must be between 1-65535",
            "spec.ports: port name must be valid",
            "spec: UDS may not include ports",
        ]
    );
    Ok(())
}
