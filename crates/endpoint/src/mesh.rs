//! Where the sidecar's boot inputs come from: the `istio-token`, the mesh's root certificate,
//! the mesh config and istiod's cluster ID.
//!
//! [`Source`] is the seam. [`Local`] serves a directory-mode mesh: it mints the token itself
//! (the endpoint's key, trusted by istiod through the JWKS the endpoint publishes) and reads
//! the root certificate and mesh config from files. A Kubernetes source uses TokenRequest and
//! the `istio-ca-root-cert` / `istio[-<rev>]` ConfigMaps instead.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use gangplank_bootstrap::MeshConfig;

use crate::keys::{Keys, SidecarToken};

/// Why a boot input could not be had.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

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
            .map_err(|e| Error(format!("minting the sidecar token: {e}")))
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
