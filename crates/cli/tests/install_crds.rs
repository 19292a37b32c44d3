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
