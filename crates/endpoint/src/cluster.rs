//! Boot inputs from a Kubernetes cluster, as `istioctl x workload entry configure` gets them:
//! the `istio-token` from TokenRequest for the group's service account (audience `istio-ca`),
//! `root-cert.pem` from ConfigMap `istio-ca-root-cert` in the group's namespace and the mesh
//! config from ConfigMap `istio[-<revision>]` (key `mesh`) in Istio's namespace, and (unless
//! configured) istiod's cluster ID from `istio-sidecar-injector[-<revision>]` (key `values`,
//! `global.multiCluster.clusterName`).
//!
//! The ConfigMaps are read through watch-backed caches (a field selector on the name, as
//! istiod watches them), so an onboarding reads nothing from the API: only the TokenRequest is
//! a call. A rotated root certificate or an edited mesh config reaches the next onboarding
//! as soon as the watch delivers it.

use std::time::Duration;

use async_trait::async_trait;
use gangplank_bootstrap::MeshConfig;
use gangplank_registry::kube::ApiCall;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tokio::task::JoinHandle;

use std::sync::Arc;

use crate::keys::SidecarToken;
use crate::mesh::{Error, Source};

/// The audience istiod's CA accepts.
pub const AUDIENCE: &str = "istio-ca";
/// The ConfigMap istiod publishes the root certificate in, in every namespace.
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Its key.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The injector's ConfigMap (`-<revision>` appended for a revision), holding Helm `values`.
pub const INJECTOR_CONFIGMAP: &str = "istio-sidecar-injector";

/// How long a read waits for a ConfigMap cache's first listing.
const CACHE_TIMEOUT: Duration = Duration::from_secs(15);

/// Every call [`Cluster`] makes. With a revision, the mesh ConfigMap is `istio-<revision>`:
/// add that name to the ClusterRole's `configmaps` rule. (Kubernetes authorises a list or
/// watch against `resourceNames` when it selects `metadata.name`, as these caches do.)
pub const API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "",
        resource: "serviceaccounts/token",
        verb: "create",
        names: &[],
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verb: "list",
        names: &[ROOT_CERT_CONFIGMAP, "istio", INJECTOR_CONFIGMAP],
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verb: "watch",
        names: &[ROOT_CERT_CONFIGMAP, "istio", INJECTOR_CONFIGMAP],
    },
];

/// A client from `kubeconfig`, or the in-cluster / default configuration.
pub(crate) async fn client(kubeconfig: Option<&std::path::Path>) -> crate::Result<kube::Client> {
    let fail = |setting: &str, e: &dyn std::fmt::Display| crate::Error::Kubernetes {
        setting: setting.to_owned(),
        message: e.to_string(),
    };
    let config = match kubeconfig {
        Some(path) => {
            let setting = format!(".kubeconfig {}", path.display());
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(&setting, &e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| fail(&setting, &e))?
        }
        None => kube::Config::infer().await.map_err(|e| crate::Error::Kubernetes {
            setting: String::new(),
            message: format!(
                "no in-cluster configuration and no kubeconfig found ({e}): set registry.kubernetes.kubeconfig"
            ),
        })?,
    };
    kube::Client::try_from(config).map_err(|e| crate::Error::Kubernetes {
        setting: String::new(),
        message: format!("building the API client: {e}"),
    })
}

/// A [`Source`] backed by the cluster's API.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    istio_namespace: String,
    mesh_configmap: String,
    /// `istio-ca-root-cert` in every namespace.
    roots: Store<ConfigMap>,
    /// The mesh ConfigMap in Istio's namespace.
    mesh: Store<ConfigMap>,
    injector_configmap: String,
    /// The injector's ConfigMap in Istio's namespace.
    injector: Store<ConfigMap>,
    _tasks: Arc<Tasks>,
}

/// The cache tasks, stopped with the last clone of their [`Cluster`].
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("istio_namespace", &self.istio_namespace)
            .field("mesh_configmap", &self.mesh_configmap)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A source reading Istio's ConfigMaps from `istio_namespace` for `revision` (`""` or
    /// `default` for the default revision). Starts watching them at once; reads wait for the
    /// first listing.
    pub fn start(client: kube::Client, istio_namespace: &str, revision: &str) -> Self {
        let (mesh_configmap, injector_configmap) = match revision {
            "" | "default" => ("istio".to_owned(), INJECTOR_CONFIGMAP.to_owned()),
            rev => (format!("istio-{rev}"), format!("{INJECTOR_CONFIGMAP}-{rev}")),
        };
        let mut tasks = Vec::new();
        let roots = cache(Api::all(client.clone()), ROOT_CERT_CONFIGMAP, &mut tasks);
        let mesh = cache(
            Api::namespaced(client.clone(), istio_namespace),
            &mesh_configmap,
            &mut tasks,
        );
        let injector = cache(
            Api::namespaced(client.clone(), istio_namespace),
            &injector_configmap,
            &mut tasks,
        );
        Self {
            client,
            istio_namespace: istio_namespace.to_owned(),
            mesh_configmap,
            roots,
            mesh,
            injector_configmap,
            injector,
            _tasks: Arc::new(Tasks(tasks)),
        }
    }

    /// The mesh ConfigMap's name: `istio`, or `istio-<revision>`.
    pub fn mesh_configmap(&self) -> String {
        self.mesh_configmap.clone()
    }

    async fn configmap_key(
        store: &Store<ConfigMap>,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<String, Error> {
        tokio::time::timeout(CACHE_TIMEOUT, store.wait_until_ready())
            .await
            .map_err(|_| Error::CacheTimeout {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                timeout: CACHE_TIMEOUT,
            })?
            .map_err(|_| Error::CacheStopped(name.to_owned()))?;
        let cm = store
            .get(&ObjectRef::new(name).within(namespace))
            .ok_or_else(|| Error::Missing {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        cm.data
            .as_ref()
            .and_then(|d| d.get(key))
            .cloned()
            .ok_or_else(|| Error::MissingKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key: key.to_owned(),
            })
    }
}

/// Starts a reflector over the ConfigMaps named `name` that `api` sees.
fn cache(api: Api<ConfigMap>, name: &str, tasks: &mut Vec<JoinHandle<()>>) -> Store<ConfigMap> {
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .any_semantic();
    let (store, task) = gangplank_registry::kube::reflect(api, config, (), format!("ConfigMap {name}"));
    tasks.push(task);
    store
}

#[async_trait]
impl Source for Cluster {
    async fn token(
        &self,
        namespace: &str,
        service_account: &str,
        lifetime: Duration,
    ) -> Result<SidecarToken, Error> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![AUDIENCE.to_owned()],
                expiration_seconds: Some(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let issued_at = time::OffsetDateTime::now_utc().unix_timestamp();
        let got = api
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .map_err(|source| Error::TokenRequest {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                source,
            })?;
        let status = got.status.ok_or_else(|| Error::EmptyToken {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })?;
        Ok(SidecarToken {
            jwt: status.token,
            issued_at,
            expires_at: status.expiration_timestamp.0.as_second(),
        })
    }

    async fn root_cert(&self, namespace: &str) -> Result<Vec<u8>, Error> {
        Self::configmap_key(&self.roots, namespace, ROOT_CERT_CONFIGMAP, ROOT_CERT_KEY)
            .await
            .map(String::into_bytes)
    }

    async fn mesh_config(&self) -> Result<MeshConfig, Error> {
        let name = &self.mesh_configmap;
        let text = Self::configmap_key(&self.mesh, &self.istio_namespace, name, "mesh").await?;
        MeshConfig::from_yaml(&text).map_err(|e| Error::Malformed {
            namespace: self.istio_namespace.clone(),
            name: name.clone(),
            key: "mesh".into(),
            message: format!(": {e}"),
        })
    }

    async fn cluster_id(&self) -> Result<String, Error> {
        let (ns, name) = (&self.istio_namespace, &self.injector_configmap);
        let values = Self::configmap_key(&self.injector, ns, name, "values")
            .await
            .map_err(|e| Error::ClusterId(Box::new(e)))?;
        let values: serde_json::Value = serde_json::from_str(&values).map_err(|e| Error::Malformed {
            namespace: ns.clone(),
            name: name.clone(),
            key: "values".into(),
            message: format!(" is not JSON ({e}): set mesh.clusterId"),
        })?;
        // As istioctl: an absent name leaves the cluster ID empty (istiod then accepts any).
        Ok(values
            .pointer("/global/multiCluster/clusterName")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned())
    }
}
