//! `gangplank install crds` prints every CRD `deploy/crds/` ships, the operator's included.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use support::gangplank_command;

fn names(text: &str) -> BTreeSet<String> {
    text.split("\n---")
        .map(|d| d.trim_start_matches("---"))
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| {
            let v: Value = serde_saphyr::from_str(d).expect("a YAML document");
            assert_eq!(v["kind"], "CustomResourceDefinition");
            v["metadata"]["name"].as_str().expect("name").to_owned()
        })
        .collect()
}

#[test]
fn install_crds_prints_what_deploy_crds_ships() {
    let out = gangplank_command(&["install", "crds"])
        .output()
        .expect("gangplank install crds");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = names(&String::from_utf8(out.stdout).expect("UTF-8"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
    let mut shipped = BTreeSet::new();
    for e in std::fs::read_dir(&dir).expect("deploy/crds") {
        let p = e.expect("entry").path();
        shipped.extend(names(&std::fs::read_to_string(&p).expect("read")));
    }
    assert!(
        printed.contains("onboardingplanes.onboarding.gangplank.dev"),
        "{printed:?}"
    );
    assert_eq!(printed, shipped);
}

#[test]
fn install_operator_prints_deploy_operator_yaml() {
    let out = gangplank_command(&["install", "operator"])
        .output()
        .expect("gangplank install operator");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/operator.yaml"))
            .expect("deploy/operator.yaml");
    assert_eq!(String::from_utf8(out.stdout).expect("UTF-8"), shipped);

    // The image, namespace and replicas are the user's.
    let out = gangplank_command(&[
        "install",
        "operator",
        "--image",
        "registry.example/gangplank-operator:9.9.9",
        "-n",
        "mesh-ops",
        "--replicas",
        "3",
    ])
    .output()
    .expect("gangplank install operator");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let docs: Vec<Value> = text
        .split("\n---")
        .filter_map(|d| serde_saphyr::from_str::<Value>(d).ok())
        .collect();
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    assert_eq!(deployment["metadata"]["namespace"], "mesh-ops");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/gangplank-operator:9.9.9"
    );
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .expect("a binding");
    assert_eq!(binding["subjects"][0]["namespace"], "mesh-ops");
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == "mesh-ops")
    );

    // A namespace Kubernetes refuses is refused here, with what to change, and nothing printed.
    let out = gangplank_command(&["install", "operator", "-n", "Mesh_Ops"])
        .output()
        .expect("gangplank install operator");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lowercase letters, digits and '-'"), "{err}");
}
