//! Boot inputs from a Kubernetes cluster, as `istioctl x workload entry configure` gets them:
//! the `istio-token` from TokenRequest for the group's service account (audience `istio-ca`),
//! `root-cert.pem` from ConfigMap `istio-ca-root-cert` in the group's namespace and the mesh
//! config from ConfigMap `istio[-<revision>]` (key `mesh`) in Istio's namespace.

use std::time::Duration;

use async_trait::async_trait;
use gangplank_bootstrap::MeshConfig;
use gangplank_registry::kube::ApiCall;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, PostParams};

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

/// Every call [`Cluster`] makes. With a revision, the mesh ConfigMap is `istio-<revision>`:
/// add that name to the ClusterRole's `configmaps` rule.
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
        verb: "get",
        names: &[ROOT_CERT_CONFIGMAP, "istio"],
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
    let mesh = Arc::new(Cluster::new(
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
    revision: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("istio_namespace", &self.istio_namespace)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A source reading Istio's ConfigMaps from `istio_namespace` for `revision` (`""` or
    /// `default` for the default revision).
    pub fn new(client: kube::Client, istio_namespace: &str, revision: &str) -> Self {
        Self {
            client,
            istio_namespace: istio_namespace.to_owned(),
            revision: revision.to_owned(),
        }
    }

    /// The mesh ConfigMap's name: `istio`, or `istio-<revision>`.
    pub fn mesh_configmap(&self) -> String {
        match self.revision.as_str() {
            "" | "default" => "istio".to_owned(),
            rev => format!("istio-{rev}"),
        }
    }

    async fn configmap_key(&self, namespace: &str, name: &str, key: &str) -> Result<String, Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let cm = api.get_opt(name).await.map_err(|e| {
            Error(format!(
                "reading ConfigMap {namespace}/{name}: {e}: check that the API server is reachable and \
                 the endpoint's RBAC allows get on it"
            ))
        })?;
        let cm = cm.ok_or_else(|| {
            Error(format!(
                "ConfigMap {namespace}/{name} does not exist: is Istio installed (and, for \
                 istio-ca-root-cert, is istiod running so it publishes it in every namespace)?"
            ))
        })?;
        cm.data
            .and_then(|mut d| d.remove(key))
            .ok_or_else(|| Error(format!("ConfigMap {namespace}/{name} has no key {key:?}")))
    }
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
        self.configmap_key(namespace, ROOT_CERT_CONFIGMAP, ROOT_CERT_KEY)
            .await
            .map(String::into_bytes)
    }

    async fn mesh_config(&self) -> Result<MeshConfig, Error> {
        let name = self.mesh_configmap();
        let text = self.configmap_key(&self.istio_namespace, &name, "mesh").await?;
        MeshConfig::from_yaml(&text)
            .map_err(|e| Error(format!("ConfigMap {}/{name} key mesh: {e}", self.istio_namespace)))
    }
}
