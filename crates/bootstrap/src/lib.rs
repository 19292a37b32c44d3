//! The one renderer of the Istio sidecar's boot files (cluster.env, mesh.yaml, root-cert.pem,
//! istio-token, hosts).
//!
//! [`render`] produces exactly what `istioctl x workload entry configure` writes for the same
//! inputs (byte for byte, checked against Istio's golden files), so a VM configured by
//! Gangplank's pull flow, by `gangplank workload entry configure` or by the SSH push is
//! configured the same way. Where istioctl would write a broken or unsafe file, or crash, we
//! return an [`Error`] instead; those cases are listed on [`render`].

//!
//! The VM side needs only what a VM has: where the files go ([`layout`]), how `cluster.env`
//! reads ([`cluster_env`]) and how the proxy container is run ([`docker`]). The renderer
//! itself, which reads WorkloadGroups, comes with the default `render` feature.

pub mod cluster_env;
pub mod docker;
#[cfg(feature = "render")]
mod gojson;
#[cfg(feature = "render")]
pub mod goyaml;
pub mod layout;
#[cfg(feature = "render")]
mod render;

#[cfg(feature = "render")]
pub use docker::{DockerInputs, render_docker_env};
#[cfg(feature = "render")]
pub use render::*;

/// The namespace istiod runs in unless told otherwise.
pub const DEFAULT_ISTIO_NAMESPACE: &str = "istio-system";
/// The annotation whose YAML (a ProxyConfig) is applied over the mesh's `defaultConfig`.
pub const PROXY_CONFIG_ANNOTATION: &str = "proxy.istio.io/config";
/// istiod's port for XDS and certificate signing, as istioctl hard-codes it.
pub const ISTIOD_PORT: u16 = 15012;
/// Mode of the `istio-token` file. istioctl writes every file `0744`; we keep the token
/// readable by its owner only.
pub const TOKEN_MODE: u32 = 0o600;
/// Mode of every other file (istioctl: `0744`; nothing here is executable).
pub const FILE_MODE: u32 = 0o644;

/// Why the sidecar files could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mesh config text is not YAML.
    #[error(
        "mesh config is not valid YAML ({source}): fix the `mesh` key of the istio[-<revision>] ConfigMap"
    )]
    MeshConfigYaml {
        /// The parser's complaint.
        source: Box<serde_saphyr::Error>,
    },
    /// A field of the mesh config has the wrong type.
    #[error(
        "mesh config field {field} must be {expected}: fix the `mesh` key of the istio[-<revision>] ConfigMap"
    )]
    MeshConfigField {
        /// Dotted path of the field.
        field: String,
        /// What it must be.
        expected: &'static str,
    },
    /// A `proxy.istio.io/config` annotation is not YAML.
    #[error(
        "annotation {PROXY_CONFIG_ANNOTATION} in {place} of workload group {group} is not valid YAML ({source})"
    )]
    AnnotationYaml {
        /// `metadata.annotations` or `spec.metadata.annotations`.
        place: &'static str,
        /// `namespace/name` of the group.
        group: String,
        /// The parser's complaint.
        source: Box<serde_saphyr::Error>,
    },
    /// A `proxy.istio.io/config` annotation has a field of the wrong type.
    #[error(
        "annotation {PROXY_CONFIG_ANNOTATION} in {place} of workload group {group}: {field} must be {expected}"
    )]
    AnnotationField {
        /// `metadata.annotations` or `spec.metadata.annotations`.
        place: &'static str,
        /// `namespace/name` of the group.
        group: String,
        /// Dotted path of the field.
        field: String,
        /// What it must be.
        expected: &'static str,
    },
    /// A WorkloadGroup file is not a valid WorkloadGroup.
    #[error("{what} is not a valid WorkloadGroup ({source}): fix the YAML")]
    GroupYaml {
        /// Where the group came from (a file name).
        what: String,
        /// The parser's complaint.
        source: Box<serde_saphyr::Error>,
    },
    /// A WorkloadGroup file holds another kind of object.
    #[error(
        "{what} holds a {kind}, not a WorkloadGroup: pass a WorkloadGroup (`gangplank workload group create` makes one)"
    )]
    NotAGroup {
        /// Where the group came from (a file name).
        what: String,
        /// The kind found.
        kind: String,
    },
    /// The group has no name or namespace.
    #[error("workload group has no metadata.{field}: set it in the WorkloadGroup")]
    MissingMeta {
        /// `name` or `namespace`.
        field: &'static str,
    },
    /// The group has no `spec.template` (istioctl crashes on such a group from the cluster).
    #[error("workload group {group} has no spec.template: add one (at least spec.template.serviceAccount)")]
    MissingTemplate {
        /// `namespace/name` of the group.
        group: String,
    },
    /// A `proxyMetadata` key cannot be written to `cluster.env`, which the VM's start script
    /// sources with bash.
    #[error(
        "proxyMetadata key {key:?} is not an environment variable name (letters, digits and _, not starting with a digit): rename it in the mesh config or the {PROXY_CONFIG_ANNOTATION} annotation"
    )]
    BadEnvKey {
        /// The offending key.
        key: String,
    },
    /// A `sidecar.env` value spans lines, which a Docker env-file cannot hold.
    #[error(
        "sidecar.env value of {key} contains a line break, which a Docker env-file cannot hold: fix the WorkloadEntry or mesh config field it comes from"
    )]
    EnvFileValue {
        /// The variable.
        key: String,
    },
}
