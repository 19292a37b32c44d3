//! WorkloadEntries and the mesh's material from a Kubernetes cluster (kubeconfig or
//! in-cluster, like kubectl): entries (`networking.istio.io/v1`), a TokenRequest per
//! service account (audience `istio-ca`), the `istio-ca-root-cert` ConfigMap and the mesh
//! config (`istio[-<revision>]` ConfigMap, key `mesh`).

use std::time::Duration;

use gangplank_api::istio::WorkloadEntry;
use gangplank_bootstrap::MeshConfig;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

use crate::plan::Token;
use crate::target::annotation;

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
    /// The mesh-expansion ConfigMap's `PROXY_CONFIG` is not a ProxyConfig mapping.
    #[error(
        "ConfigMap {namespace}/{name} (named by the annotation {} on namespace {namespace}): key PROXY_CONFIG {problem}: fix it, or remove the annotation",
        annotation::MESH_EXPANSION_CONFIGMAP
    )]
    Expansion {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What is wrong.
        problem: String,
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

    /// The mesh-expansion ProxyConfig (Tetrate's): the `PROXY_CONFIG` key of the ConfigMap
    /// that the Istio namespace's [`annotation::MESH_EXPANSION_CONFIGMAP`] names, if any.
    pub async fn expansion_proxy_config(&self) -> Result<Option<(String, String)>, Error> {
        let ns = &self.istio_namespace;
        let api: Api<Namespace> = Api::all(self.client.clone());
        // No namespace object (a partial install) means no annotation.
        let Some(namespace) = api.get_opt(ns).await.map_err(|source| Error::Api {
            what: format!(
                "reading namespace {ns} (for its annotation {}; the user needs `get` on namespaces)",
                annotation::MESH_EXPANSION_CONFIGMAP
            ),
            source,
        })?
        else {
            return Ok(None);
        };
        let Some(name) = namespace
            .metadata
            .annotations
            .and_then(|mut a| a.remove(annotation::MESH_EXPANSION_CONFIGMAP))
            .filter(|n| !n.trim().is_empty())
        else {
            return Ok(None);
        };
        let name = name.trim().to_string();
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let cm = api.get(&name).await.map_err(|source| Error::Api {
            what: format!(
                "reading ConfigMap {ns}/{name}, named by the annotation {} on namespace {ns}",
                annotation::MESH_EXPANSION_CONFIGMAP
            ),
            source,
        })?;
        Ok(cm
            .data
            .and_then(|mut d| d.remove("PROXY_CONFIG"))
            .filter(|v| !v.trim().is_empty())
            .map(|v| (name, v)))
    }

    /// The mesh config with the mesh-expansion ProxyConfig (if the Istio namespace names
    /// one) applied over its `defaultConfig`: each field replaces the mesh's, `proxyMetadata`
    /// entries are merged, as `proxy.istio.io/config` is applied after it.
    pub async fn expanded_mesh_config(&self, mesh: MeshConfig) -> Result<MeshConfig, Error> {
        let Some((name, text)) = self.expansion_proxy_config().await? else {
            return Ok(mesh);
        };
        let bad = |problem: String| Error::Expansion {
            namespace: self.istio_namespace.clone(),
            name: name.clone(),
            problem,
        };
        expand(&mesh, &text).map_err(bad)
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

/// `mesh` with the ProxyConfig YAML `overlay` applied over its `defaultConfig` (each field
/// replaces the mesh's; `proxyMetadata` entries are merged).
pub fn expand(mesh: &MeshConfig, overlay: &str) -> Result<MeshConfig, String> {
    use serde_json::Value;
    let overlay: Value = serde_saphyr::from_str(overlay).map_err(|e| format!("is not valid YAML ({e})"))?;
    let overlay = match overlay {
        Value::Null => return Ok(mesh.clone()),
        Value::Object(m) => m,
        _ => return Err("is not a mapping of ProxyConfig fields".into()),
    };
    let mut raw = mesh.as_map().clone();
    let default_config = raw
        .entry("defaultConfig")
        .or_insert_with(|| Value::Object(Default::default()));
    if default_config.is_null() {
        *default_config = Value::Object(Default::default());
    }
    let Some(config) = default_config.as_object_mut() else {
        return Err("cannot apply: the mesh's defaultConfig is not a mapping".into());
    };
    for (key, value) in overlay {
        match (key.as_str(), value, config.get_mut("proxyMetadata")) {
            (_, Value::Null, _) => {}
            ("proxyMetadata", Value::Object(extra), Some(Value::Object(current))) => {
                current.extend(extra);
            }
            (_, value, _) => {
                config.insert(key, value);
            }
        }
    }
    MeshConfig::from_value(Value::Object(raw)).map_err(|e| format!("cannot apply: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_replaces_fields_and_merges_proxy_metadata() {
        let mesh = MeshConfig::from_yaml(
            "trustDomain: cluster.local\ndefaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  concurrency: 2\n  proxyMetadata: {A: a, B: b}\n",
        )
        .expect("mesh");
        let expanded = expand(
            &mesh,
            "discoveryAddress: gw.example.com:15012\nproxyMetadata: {B: x, C: c}\n",
        )
        .expect("expand");
        let config = expanded.default_config().expect("defaultConfig");
        assert_eq!(config["discoveryAddress"], "gw.example.com:15012");
        assert_eq!(config["concurrency"], 2);
        assert_eq!(
            config["proxyMetadata"],
            serde_json::json!({"A": "a", "B": "x", "C": "c"})
        );
        assert_eq!(expanded.trust_domain(), "cluster.local");
        assert!(expand(&mesh, "[1, 2]").is_err());
        assert_eq!(
            expand(&MeshConfig::default(), "concurrency: 1")
                .expect("empty mesh")
                .default_config()
                .expect("dc")["concurrency"],
            1
        );
    }
}
