//! Byte-for-byte parity with the golden files of `istioctl x workload entry configure`.

use std::path::{Path, PathBuf};

use gangplank_bootstrap::{Files, Inputs, InstanceIp, MeshConfig, group_from_yaml, render};
use pretty_assertions::assert_eq;

/// Istio's ipv4 test data, kept in the repository's `shared/` folder (beside the workspace).
fn ipv4_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/istio-data/vmconfig-ipv4")
}

fn data_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(case)
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The inputs Istio's `TestWorkloadEntryConfigure` gives istioctl (`--clusterID Kubernetes
/// --revision rev-1`, root cert `fake-CA-cert`, empty token).
fn revisioned_inputs(group: PathBuf, mesh: PathBuf, internal: &str, ingress: &str) -> Inputs {
    let group_path = group.display().to_string();
    let mut inputs = Inputs::new(group_from_yaml(&read(group), &group_path).unwrap());
    inputs.mesh_config = MeshConfig::from_yaml(&read(mesh)).unwrap();
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

#[test]
fn ipv4_matches_istio_goldens() {
    let dir = ipv4_dir();
    let inputs = revisioned_inputs(
        dir.join("workloadgroup.yaml"),
        dir.join("meshconfig.yaml"),
        "10.10.10.10",
        "10.10.10.11",
    );
    let files = render(&inputs).unwrap();
    for name in [
        "cluster.env",
        "mesh.yaml",
        "hosts",
        "root-cert.pem",
        "istio-token",
    ] {
        let golden = std::fs::read(dir.join(format!("{name}.golden"))).unwrap();
        assert_bytes(&files, name, &golden);
    }
    assert!(files.warnings.is_empty(), "{:?}", files.warnings);
}

#[test]
fn ipv6_matches_istio_goldens() {
    let dir = data_dir("vmconfig-ipv6");
    let inputs = revisioned_inputs(
        dir.join("workloadgroup.yaml"),
        ipv4_dir().join("meshconfig.yaml"),
        "fd00:10:96::1",
        "fd00:10:96::2",
    );
    let files = render(&inputs).unwrap();
    assert_bytes(
        &files,
        "cluster.env",
        read(dir.join("cluster.env.golden")).as_bytes(),
    );
    assert_bytes(&files, "hosts", b"fd00:10:96::2 istiod-rev-1.istio-system.svc\n");
    assert_bytes(&files, "hosts", read(dir.join("hosts.golden")).as_bytes());
    assert_bytes(
        &files,
        "mesh.yaml",
        read(ipv4_dir().join("mesh.yaml.golden")).as_bytes(),
    );
}

#[test]
fn nil_proxy_metadata_matches_istio_goldens() {
    let dir = data_dir("vmconfig-nil-proxy-metadata");
    let mut inputs = Inputs::new(group_from_yaml(&read(dir.join("workloadgroup.yaml")), "wg").unwrap());
    inputs.mesh_config = MeshConfig::from_yaml(&read(dir.join("meshconfig.yaml"))).unwrap();
    inputs.root_cert = b"fake-CA-cert".to_vec();
    inputs.cluster_id = "Kubernetes".into();
    inputs.instance_ip = Some(InstanceIp::Internal("10.10.10.10".parse().unwrap()));
    let files = render(&inputs).unwrap();
    assert_bytes(&files, "mesh.yaml", read(dir.join("mesh.yaml.golden")).as_bytes());
    assert_bytes(
        &files,
        "cluster.env",
        read(dir.join("cluster.env.golden")).as_bytes(),
    );
    // istioctl writes an empty hosts file when it has no gateway address.
    assert_bytes(&files, "hosts", b"");
}
