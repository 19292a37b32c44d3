//! Where the sidecar's boot inputs come from: the `istio-token`, the mesh's root certificate,
//! the mesh config and istiod's cluster ID.
//!
//! [`Source`] is the seam. [`Local`] serves a directory-mode mesh: it mints the token itself
//! (the endpoint's key, trusted by istiod through the JWKS the endpoint publishes) and reads
//! the root certificate and mesh config from files. A Kubernetes source uses TokenRequest and
//! the `istio-ca-root-cert` / `istio[-<rev>]` ConfigMaps instead.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use gangplank_bootstrap::MeshConfig;

use crate::keys::{Keys, SidecarToken};

/// Why a boot input could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint could not sign a sidecar token.
    #[error("minting the sidecar token: {0}")]
    Mint(#[source] crate::keys::Error),
    /// A ConfigMap cache did not complete its first listing in time.
    #[error(
        "listing ConfigMap {namespace}/{name} did not finish within {timeout:?}: check that the \
         API server is reachable and the endpoint's RBAC allows list and watch on it"
    )]
    CacheTimeout {
        /// The namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// A ConfigMap cache ended.
    #[error("the cache of ConfigMap {0} stopped")]
    CacheStopped(String),
    /// A ConfigMap Istio publishes is missing.
    #[error(
        "ConfigMap {namespace}/{name} does not exist: is Istio installed (and, for \
         istio-ca-root-cert, is istiod running so it publishes it in every namespace)?"
    )]
    Missing {
        /// The namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
    },
    /// A ConfigMap lacks the key Istio writes.
    #[error("ConfigMap {namespace}/{name} has no key {key:?}")]
    MissingKey {
        /// The namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// The key.
        key: String,
    },
    /// A ConfigMap's value does not parse.
    #[error("ConfigMap {namespace}/{name} key {key}{message}")]
    Malformed {
        /// The namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// The key.
        key: String,
        /// What is wrong and what to change (follows the key: `: …` or ` is …`).
        message: String,
    },
    /// TokenRequest failed.
    #[error(
        "requesting a token for ServiceAccount {namespace}/{service_account} (TokenRequest, \
         audience {}): {source}: check that the service account exists and the endpoint's \
         RBAC allows create on serviceaccounts/token",
        crate::cluster::AUDIENCE
    )]
    TokenRequest {
        /// The namespace.
        namespace: String,
        /// The service account.
        service_account: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// TokenRequest answered without a token.
    #[error("the TokenRequest for {namespace}/{service_account} came back without a token")]
    EmptyToken {
        /// The namespace.
        namespace: String,
        /// The service account.
        service_account: String,
    },
    /// istiod's cluster ID could not be read from the injector's values.
    #[error("failed to automatically determine the cluster ID ({0}): set mesh.clusterId")]
    ClusterId(#[source] Box<Error>),
}

/// Where boot inputs come from.
#[async_trait]
pub trait Source: Send + Sync {
    /// A short-lived `istio-token` for `namespace/service_account` (audience `istio-ca`).
    async fn token(
        &self,
        namespace: &str,
        service_account: &str,
        lifetime: Duration,
    ) -> Result<SidecarToken, Error>;
    /// The mesh's root certificate as workloads in `namespace` see it.
    async fn root_cert(&self, namespace: &str) -> Result<Vec<u8>, Error>;
    /// The mesh config (`mesh` key of the `istio[-<rev>]` ConfigMap).
    async fn mesh_config(&self) -> Result<MeshConfig, Error>;
    /// istiod's cluster ID, when the configuration does not set it.
    async fn cluster_id(&self) -> Result<String, Error>;
}

/// A directory-mode mesh: self-minted tokens, root certificate and mesh config from files.
pub struct Local {
    /// The endpoint's keys (token signing).
    pub keys: Arc<Keys>,
    /// The root certificate.
    pub root_cert: Vec<u8>,
    /// The mesh config.
    pub mesh_config: MeshConfig,
}

impl Local {
    /// A directory-mode source from `mesh.meshConfigFile` (optional) and
    /// `mesh.rootCertFile` (required).
    pub fn from_files(keys: Arc<Keys>, mesh: &crate::config::Mesh) -> crate::Result<Self> {
        let mesh_config = match &mesh.mesh_config_file {
            Some(path) => {
                let text = read(path, "mesh.meshConfigFile")?;
                let text = String::from_utf8(text).map_err(|_| crate::Error::Invalid {
                    setting: "mesh.meshConfigFile",
                    message: format!("{} is not UTF-8", path.display()),
                })?;
                MeshConfig::from_yaml(&text).map_err(|e| crate::Error::Invalid {
                    setting: "mesh.meshConfigFile",
                    message: format!("{}: {e}", path.display()),
                })?
            }
            None => MeshConfig::default(),
        };
        let root_cert = match &mesh.root_cert_file {
            Some(path) => read(path, "mesh.rootCertFile")?,
            None => {
                return Err(crate::Error::Invalid {
                    setting: "mesh.rootCertFile",
                    message: "is required: the mesh's root certificate, e.g. from \
                              `kubectl get configmap istio-ca-root-cert -n <namespace> -o jsonpath='{.data.root-cert\\.pem}'`"
                        .into(),
                });
            }
        };
        Ok(Self {
            keys,
            root_cert,
            mesh_config,
        })
    }
}

fn read(path: &Path, setting: &'static str) -> crate::Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| crate::Error::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

#[async_trait]
impl Source for Local {
    async fn token(
        &self,
        namespace: &str,
        service_account: &str,
        lifetime: Duration,
    ) -> Result<SidecarToken, Error> {
        self.keys
            .sidecar_token(namespace, service_account, lifetime)
            .map_err(Error::Mint)
    }

    async fn root_cert(&self, _namespace: &str) -> Result<Vec<u8>, Error> {
        Ok(self.root_cert.clone())
    }

    async fn mesh_config(&self) -> Result<MeshConfig, Error> {
        Ok(self.mesh_config.clone())
    }

    async fn cluster_id(&self) -> Result<String, Error> {
        Ok(crate::config::defaults::cluster_id())
    }
}
