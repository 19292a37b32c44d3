//! WorkloadEntries and the mesh's material from a Kubernetes cluster (kubeconfig or
//! in-cluster, like kubectl): entries (`networking.istio.io/v1`), a TokenRequest per
//! service account (audience `istio-ca`), the `istio-ca-root-cert` ConfigMap and the mesh
//! config (`istio[-<revision>]` ConfigMap, key `mesh`).

use std::time::Duration;

use gangplank_api::istio::WorkloadEntry;
use gangplank_bootstrap::MeshConfig;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

use crate::plan::Token;

/// The audience istiod accepts.
pub const AUDIENCE: &str = "istio-ca";
/// The ConfigMap (in the istio namespace) holding the mesh root certificate.
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";

/// Why the cluster could not give what was needed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable kubeconfig or in-cluster config.
    #[error(
        "cannot reach the Kubernetes cluster ({0}): check KUBECONFIG / the current context, or pass -f FILE_OR_DIR with --token, --root-cert and --mesh-config"
    )]
    Client(#[source] kube::Error),
    /// An API call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was asked for.
        what: String,
        /// The API error.
        source: kube::Error,
    },
    /// A ConfigMap lacks a key.
    #[error(
        "ConfigMap {namespace}/{name} has no key {key:?}: is Istio installed in {namespace} (pass -i/--istio-namespace otherwise)?"
    )]
    MissingKey {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Key.
        key: &'static str,
    },
    /// The mesh config does not parse.
    #[error("ConfigMap {namespace}/{name}: {source}")]
    Mesh {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The renderer's complaint.
        source: Box<gangplank_bootstrap::Error>,
    },
    /// An object from the API is not a WorkloadEntry.
    #[error("workload entry {name} from the cluster cannot be read: {source}")]
    Entry {
        /// Name.
        name: String,
        /// What is wrong.
        source: serde_json::Error,
    },
    /// The TokenRequest returned no token.
    #[error("the TokenRequest for service account {0} returned no token")]
    EmptyToken(String),
}

/// A connection to the cluster.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    istio_namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("istio_namespace", &self.istio_namespace)
            .finish_non_exhaustive()
    }
}

fn entry_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "WorkloadEntry"),
        "workloadentries",
    )
}

impl Cluster {
    /// Connects with the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or in-cluster config.
    pub async fn connect(istio_namespace: &str) -> Result<Self, Error> {
        let client = kube::Client::try_default().await.map_err(Error::Client)?;
        Ok(Self::from_client(client, istio_namespace))
    }

    /// Wraps an existing client.
    pub fn from_client(client: kube::Client, istio_namespace: &str) -> Self {
        Self {
            client,
            istio_namespace: istio_namespace.to_string(),
        }
    }

    /// The current context's namespace.
    pub fn default_namespace(&self) -> &str {
        self.client.default_namespace()
    }

    /// Every WorkloadEntry in `namespace`.
    pub async fn entries(&self, namespace: &str) -> Result<Vec<WorkloadEntry>, Error> {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &entry_resource());
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|source| Error::Api {
                what: format!("listing workload entries in namespace {namespace}"),
                source,
            })?;
        list.items
            .into_iter()
            .map(|obj| {
                let name = obj.metadata.name.clone().unwrap_or_default();
                let mut value = serde_json::to_value(&obj).map_err(|source| Error::Entry {
                    name: name.clone(),
                    source,
                })?;
                if let Some(m) = value.as_object_mut() {
                    m.entry("kind").or_insert_with(|| "WorkloadEntry".into());
                }
                let mut entry: WorkloadEntry =
                    serde_json::from_value(value).map_err(|source| Error::Entry { name, source })?;
                entry
                    .metadata
                    .namespace
                    .get_or_insert_with(|| namespace.to_string());
                Ok(entry)
            })
            .collect()
    }

    async fn config_map_key(&self, name: &str, key: &'static str) -> Result<String, Error> {
        let ns = &self.istio_namespace;
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let cm = api.get(name).await.map_err(|source| Error::Api {
            what: format!("reading ConfigMap {ns}/{name}"),
            source,
        })?;
        cm.data
            .and_then(|mut d| d.remove(key))
            .ok_or_else(|| Error::MissingKey {
                namespace: ns.clone(),
                name: name.to_string(),
                key,
            })
    }

    /// The mesh root certificate(s) (`istio-ca-root-cert`, key `root-cert.pem`).
    pub async fn root_cert(&self) -> Result<Vec<u8>, Error> {
        Ok(self
            .config_map_key(ROOT_CERT_CONFIGMAP, "root-cert.pem")
            .await?
            .into_bytes())
    }

    /// The mesh config (`istio[-<revision>]`, key `mesh`).
    pub async fn mesh_config(&self, revision: &str) -> Result<MeshConfig, Error> {
        let name = if gangplank_bootstrap::is_revisioned(revision) {
            format!("istio-{revision}")
        } else {
            "istio".to_string()
        };
        let text = self.config_map_key(&name, "mesh").await?;
        MeshConfig::from_yaml(&text).map_err(|source| Error::Mesh {
            namespace: self.istio_namespace.clone(),
            name,
            source: Box::new(source),
        })
    }

    /// A token for `namespace/service_account`, audience `istio-ca`, valid `duration`.
    pub async fn token(
        &self,
        namespace: &str,
        service_account: &str,
        duration: Duration,
    ) -> Result<Token, Error> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![AUDIENCE.to_string()],
                expiration_seconds: Some(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let id = format!("{namespace}/{service_account}");
        let answer = api
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .map_err(|source| Error::Api {
                what: format!("requesting a token for service account {id}"),
                source,
            })?;
        let token = answer
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or(Error::EmptyToken(id))?;
        Ok(Token::new(token.into_bytes()))
    }
}
