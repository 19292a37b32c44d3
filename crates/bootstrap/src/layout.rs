//! Where the boot files go on a VM: the paths Istio's sidecar package (`.deb`/`.rpm`, its
//! `istio` systemd unit and `istio-start.sh`) reads them from (`reference/istio-vm.md` §0).
//!
//! The one list of these paths: the agent's `files` defaults, the SSH push's `systemd`
//! runtime and the quickstart's listing all use it.

use std::path::{Component, Path, PathBuf};

/// `cluster.env`: the sidecar's environment, sourced by `istio-start.sh`.
pub const CLUSTER_ENV: &str = "/var/lib/istio/envoy/cluster.env";
/// `mesh.yaml`, installed as the proxy's mesh config.
pub const MESH: &str = "/etc/istio/config/mesh";
/// `root-cert.pem`: the mesh's root certificate.
pub const ROOT_CERT: &str = "/etc/certs/root-cert.pem";
/// `istio-token`: the service-account token.
pub const TOKEN: &str = "/var/run/secrets/tokens/istio-token";
/// The hosts file the istiod entry goes into.
pub const HOSTS: &str = "/etc/hosts";

/// Every boot file as istioctl names it ([`crate::File::name`]) with its path on the VM.
pub const FILES: [(&str, &str); 5] = [
    ("cluster.env", CLUSTER_ENV),
    ("mesh.yaml", MESH),
    ("root-cert.pem", ROOT_CERT),
    ("istio-token", TOKEN),
    ("hosts", HOSTS),
];

/// `path` (one of the absolute paths above) inside `root`, the VM's file system as seen
/// from here: `/` itself, or a prefix such as a test's temporary directory.
pub fn under(root: &Path, path: &str) -> PathBuf {
    let mut joined = root.to_path_buf();
    joined.extend(
        Path::new(path)
            .components()
            .filter(|c| matches!(c, Component::Normal(_))),
    );
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "render")]
    fn every_path_is_absolute_and_named_as_istioctl_names_the_file() {
        for (name, path) in FILES {
            assert!(path.starts_with('/'), "{path}");
            let file = Path::new(path).file_name().and_then(|f| f.to_str());
            // Only the mesh config is installed under another name.
            if name != "mesh.yaml" {
                assert_eq!(file, Some(name));
            }
        }
        let names: Vec<&str> = crate::Files {
            cluster_env: String::new(),
            mesh_yaml: String::new(),
            root_cert: Vec::new(),
            istio_token: Vec::new(),
            hosts: String::new(),
            warnings: Vec::new(),
        }
        .entries()
        .iter()
        .map(|f| f.name)
        .collect();
        for (name, _) in FILES {
            assert!(names.contains(&name), "{name}");
        }
    }

    #[test]
    fn paths_go_under_a_root() {
        assert_eq!(under(Path::new("/"), TOKEN), PathBuf::from(TOKEN));
        assert_eq!(
            under(Path::new("/tmp/vm"), CLUSTER_ENV),
            PathBuf::from("/tmp/vm/var/lib/istio/envoy/cluster.env")
        );
    }
}
