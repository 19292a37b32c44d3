//! Byte-for-byte parity with the golden files of `istioctl x workload entry configure`.
//!
//! Istio's three golden sets (`vmconfig-ipv4`, `vmconfig-ipv6`,
//! `vmconfig-nil-proxy-metadata`) live in the repository's `shared/` folder beside the
//! workspace; the project keeps no copies. Like Istio's `checkOutputFiles`, every set is
//! checked file by file: each `<name>.golden` must equal the rendered `<name>`, and every
//! rendered file must have a golden.

use std::path::{Path, PathBuf};

use gangplank_bootstrap::{Files, Inputs, InstanceIp, MeshConfig, group_from_yaml, render};
use pretty_assertions::assert_eq;

/// One of Istio's golden sets, by folder name.
fn istio_set(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/istio-data")
        .join(name)
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The golden outputs of a set: `(file name, bytes)` for every `<name>.golden`, sorted.
fn goldens(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.strip_suffix(".golden")?.to_string();
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            Some((name, bytes))
        })
        .collect();
    out.sort();
    out
}

/// The inputs Istio's `TestWorkloadEntryConfigure` gives istioctl (`--clusterID Kubernetes
/// --revision rev-1`, root cert `fake-CA-cert`, empty token).
fn revisioned_inputs(dir: &Path, internal: &str, ingress: &str) -> Inputs {
    let group = dir.join("workloadgroup.yaml");
    let group_path = group.display().to_string();
    let mut inputs = Inputs::new(group_from_yaml(&read(group), &group_path).unwrap());
    inputs.mesh_config = MeshConfig::from_yaml(&read(dir.join("meshconfig.yaml"))).unwrap();
    inputs.root_cert = b"fake-CA-cert".to_vec();
    inputs.cluster_id = "Kubernetes".into();
    inputs.revision = "rev-1".into();
    inputs.instance_ip = Some(InstanceIp::Internal(internal.parse().unwrap()));
    inputs.ingress_ip = Some(ingress.parse().unwrap());
    inputs
}

fn assert_bytes(files: &Files, name: &str, golden: &[u8]) {
    let entry = files
        .entries()
        .into_iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no file {name}"));
    assert_eq!(
        String::from_utf8_lossy(&entry.content),
        String::from_utf8_lossy(golden),
        "{name} differs from the golden file"
    );
    assert_eq!(
        entry.content, golden,
        "{name} differs from the golden file (bytes)"
    );
}

/// Every golden output of the set equals what `render` wrote, and nothing is rendered that
/// the set has no golden for.
fn assert_matches_set(files: &Files, dir: &Path) {
    let goldens = goldens(dir);
    let mut rendered: Vec<&str> = files.entries().iter().map(|f| f.name).collect();
    rendered.sort();
    let golden_names: Vec<&str> = goldens.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        rendered,
        golden_names,
        "rendered files vs golden files in {}",
        dir.display()
    );
    for (name, golden) in &goldens {
        assert_bytes(files, name, golden);
    }
}

#[test]
fn ipv4_matches_istio_goldens() {
    let dir = istio_set("vmconfig-ipv4");
    let inputs = revisioned_inputs(&dir, "10.10.10.10", "10.10.10.11");
    let files = render(&inputs).unwrap();
    assert_matches_set(&files, &dir);
    assert!(files.warnings.is_empty(), "{:?}", files.warnings);
}

#[test]
fn ipv6_matches_istio_goldens() {
    let dir = istio_set("vmconfig-ipv6");
    let inputs = revisioned_inputs(&dir, "fd00:10:96::1", "fd00:10:96::2");
    let files = render(&inputs).unwrap();
    assert_bytes(&files, "hosts", b"fd00:10:96::2 istiod-rev-1.istio-system.svc\n");
    assert_matches_set(&files, &dir);
}

#[test]
fn nil_proxy_metadata_matches_istio_goldens() {
    let dir = istio_set("vmconfig-nil-proxy-metadata");
    let mut inputs = Inputs::new(group_from_yaml(&read(dir.join("workloadgroup.yaml")), "wg").unwrap());
    // Istio's `TestWorkloadEntryConfigureNilProxyMetadata` gives this mesh config inline
    // (its folder has no meshconfig.yaml), with no revision and no ingress IP.
    inputs.mesh_config = MeshConfig::from_yaml("defaultConfig: {}").unwrap();
    inputs.root_cert = b"fake-CA-cert".to_vec();
    inputs.cluster_id = "Kubernetes".into();
    inputs.instance_ip = Some(InstanceIp::Internal("10.10.10.10".parse().unwrap()));
    let files = render(&inputs).unwrap();
    assert_matches_set(&files, &dir);
    // istioctl writes an empty hosts file when it has no gateway address.
    assert_bytes(&files, "hosts", b"");
}
