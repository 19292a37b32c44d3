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

use std::sync::{Arc, Mutex};

use anyhow::Context;
use gangplank_registry::Registry;

use crate::config::Config;
use crate::keys::{Keys, SidecarToken};
use crate::mesh::{Error, Source};
use crate::metrics::Metrics;
use crate::plane::Plane;

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

/// Builds the plane: with `registry.kubernetes`, connects to the API (registry caches, boot
/// inputs from the cluster); otherwise as [`crate::server::plane`].
pub async fn plane(config: Config) -> anyhow::Result<Plane> {
    let Some(k8s) = config.file.registry.kubernetes.clone() else {
        return crate::server::plane(config);
    };
    let client = client(k8s.kubeconfig.as_deref()).await?;
    let registry = gangplank_registry::kube::Registry::connect_with(
        client.clone(),
        gangplank_registry::kube::Options {
            cache_timeout: k8s.cache_timeout,
        },
    )
    .await
    .context("registry.kubernetes")?;
    let registry: Arc<dyn Registry> = Arc::new(registry);
    let file = &config.file;
    let keys = Arc::new(Keys::load(&file.state_dir, &config.token_issuer)?);
    let verifiers = crate::server::verifiers(file, &registry)?;
    let mesh = Arc::new(Cluster::start(
        client,
        &file.mesh.istio_namespace,
        &file.mesh.revision,
    ));
    Ok(Plane {
        config,
        keys,
        registry,
        verifiers,
        mesh,
        live: Mutex::new(Default::default()),
        metrics: Metrics::default(),
    })
}

/// Starts this replica's membership (replica Lease, sweeper election, marking entries of
/// vanished replicas) when the plane uses `registry.kubernetes`; `None` otherwise. Keep the
/// task for as long as the endpoint runs.
pub async fn membership(plane: &Plane) -> anyhow::Result<Option<crate::membership::Task>> {
    let Some(k8s) = plane.config.file.registry.kubernetes.clone() else {
        return Ok(None);
    };
    let client = client(k8s.kubeconfig.as_deref()).await?;
    let namespace = k8s.namespace.clone().unwrap_or_else(own_namespace);
    let m = crate::membership::Membership::new(
        client,
        crate::membership::Options {
            namespace,
            replica: plane.config.replica.clone(),
            lease_duration: k8s.lease_duration,
        },
    );
    Ok(Some(m.spawn(plane.registry.clone())))
}

/// The pod's namespace: `POD_NAMESPACE`, else the service account's, else `gangplank-system`.
fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .or_else(|| std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "gangplank-system".to_owned())
}

/// A client from `kubeconfig`, or the in-cluster / default configuration.
async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("registry.kubernetes.kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("registry.kubernetes.kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "registry.kubernetes: no in-cluster configuration and no kubeconfig found: set \
             registry.kubernetes.kubeconfig",
        )?,
    };
    kube::Client::try_from(config).context("registry.kubernetes: building the API client")
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
            .map_err(|_| {
                Error(format!(
                    "listing ConfigMap {namespace}/{name} did not finish within {CACHE_TIMEOUT:?}: \
                     check that the API server is reachable and the endpoint's RBAC allows list \
                     and watch on it"
                ))
            })?
            .map_err(|_| Error(format!("the cache of ConfigMap {name} stopped")))?;
        let cm = store
            .get(&ObjectRef::new(name).within(namespace))
            .ok_or_else(|| {
                Error(format!(
                    "ConfigMap {namespace}/{name} does not exist: is Istio installed (and, for \
                     istio-ca-root-cert, is istiod running so it publishes it in every namespace)?"
                ))
            })?;
        cm.data
            .as_ref()
            .and_then(|d| d.get(key))
            .cloned()
            .ok_or_else(|| Error(format!("ConfigMap {namespace}/{name} has no key {key:?}")))
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
            .map_err(|e| {
                Error(format!(
                    "requesting a token for ServiceAccount {namespace}/{service_account} \
                     (TokenRequest, audience {AUDIENCE}): {e}: check that the service account \
                     exists and the endpoint's RBAC allows create on serviceaccounts/token"
                ))
            })?;
        let status = got.status.ok_or_else(|| {
            Error(format!(
                "the TokenRequest for {namespace}/{service_account} came back without a token"
            ))
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
        MeshConfig::from_yaml(&text)
            .map_err(|e| Error(format!("ConfigMap {}/{name} key mesh: {e}", self.istio_namespace)))
    }

    async fn cluster_id(&self) -> Result<String, Error> {
        let (ns, name) = (&self.istio_namespace, &self.injector_configmap);
        let values = Self::configmap_key(&self.injector, ns, name, "values")
            .await
            .map_err(|e| {
                Error(format!(
                    "failed to automatically determine the cluster ID ({e}): set mesh.clusterId"
                ))
            })?;
        let values: serde_json::Value = serde_json::from_str(&values).map_err(|e| {
            Error(format!(
                "ConfigMap {ns}/{name} key values is not JSON ({e}): set mesh.clusterId"
            ))
        })?;
        // As istioctl: an absent name leaves the cluster ID empty (istiod then accepts any).
        Ok(values
            .pointer("/global/multiCluster/clusterName")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned())
    }
}
