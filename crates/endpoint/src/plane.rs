//! The onboarding plane: everything an Onboard needs, shared by every request.
//!
//! Stateless by design: what must survive a restart lives in the registry (entries, tokens)
//! or the state dir (keys). The only in-memory state is which agents hold a stream to this
//! replica right now, and the tasks that may still write to the registry (so a shutdown
//! drains them).
//!
//! [`build`] is the one place the configured registry source is turned into a registry and
//! a source of boot inputs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use gangplank_api::istio::{WorkloadEntry, WorkloadEntrySpec, WorkloadGroup};
use gangplank_api::meta::{ObjectMeta, OwnerReference, Resource};
use gangplank_api::names::{annotation, entry_name, label};
use gangplank_api::{NamespacedName, proto};
use gangplank_bootstrap as bootstrap;
use gangplank_identity::{Identity, Verifier};
use gangplank_registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::config::{Config, Source};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::metrics::Metrics;

/// One agent stream held by this replica.
#[derive(Debug, Clone)]
pub struct Live {
    /// Which stream (a reconnect replaces it).
    pub generation: u64,
}

/// The plane.
pub struct Plane {
    /// Validated configuration.
    pub config: Config,
    /// Signing keys (sessions, nonces).
    pub keys: Arc<Keys>,
    /// Where resources live.
    pub registry: Arc<dyn Registry>,
    /// Credential verifiers by kind.
    pub verifiers: BTreeMap<&'static str, Arc<dyn Verifier>>,
    /// Where the sidecar's token, root certificate and mesh config come from.
    pub mesh: Arc<dyn crate::mesh::Source>,
    /// Streams held by this replica.
    pub live: Mutex<HashMap<NamespacedName, Live>>,
    /// Metrics.
    pub metrics: Metrics,
    /// The Kubernetes API client, when the registry is the cluster (replica membership uses it).
    pub kube: Option<kube::Client>,
    /// Every task that may write to the registry (agent streams, the sweep, membership), so
    /// a shutdown waits for them.
    pub tasks: TaskTracker,
    /// Cancelled when the endpoint shuts down: tracked tasks finish what they are doing and end.
    pub stopping: CancellationToken,
    /// The agent's packages served at `/install/` (`install.directory`), if any.
    pub install: Option<crate::install::Packages>,
}

/// Builds the plane from the configuration: opens the registry the configuration names
/// (a directory, or the Kubernetes API with watch-backed caches), and the matching source
/// of boot inputs (self-minted tokens and files, or TokenRequest and Istio's ConfigMaps).
pub async fn build(config: Config) -> Result<Plane> {
    let file = &config.file;
    // First: a folder the endpoint cannot serve is refused before anything is opened or created.
    let install = match &file.install {
        Some(install) => Some(crate::install::Packages::load(&install.directory)?),
        None => None,
    };
    // Loaded (and on first start created) only once the registry is known to be there.
    let load_keys = || Keys::load(&file.state_dir, &config.token_issuer).map(Arc::new);
    type Parts = (
        Arc<Keys>,
        Arc<dyn Registry>,
        Arc<dyn crate::mesh::Source>,
        Option<kube::Client>,
    );
    let (keys, registry, mesh, kube): Parts = match &config.registry {
        Source::Directory(dir) => {
            // Never create it: a mistyped path would serve an empty registry.
            if !dir.is_dir() {
                return Err(Error::Invalid {
                    setting: "registry.directory",
                    message: format!(
                        "{} does not exist or is not a folder: create it (istiod reads it as fs://), or fix the path",
                        dir.display()
                    ),
                });
            }
            let registry =
                gangplank_registry::dir::Registry::open(dir).map_err(|source| Error::Registry {
                    setting: "registry.directory",
                    source,
                })?;
            let keys = load_keys()?;
            let mesh = crate::mesh::Local::from_files(keys.clone(), &file.mesh)?;
            (keys, Arc::new(registry), Arc::new(mesh), None)
        }
        Source::Kubernetes(k8s) => {
            let client = crate::cluster::client(k8s.kubeconfig.as_deref()).await?;
            let registry = gangplank_registry::kube::Registry::connect_with(
                client.clone(),
                gangplank_registry::kube::Options {
                    cache_timeout: k8s.cache_timeout,
                },
            )
            .await
            .map_err(|source| Error::Registry {
                setting: "registry.kubernetes",
                source,
            })?;
            let mesh = crate::cluster::Cluster::start(
                client.clone(),
                &file.mesh.istio_namespace,
                &file.mesh.revision,
            );
            (load_keys()?, Arc::new(registry), Arc::new(mesh), Some(client))
        }
    };
    let verifiers = verifiers(file, &registry)?;
    Ok(Plane {
        config,
        keys,
        registry,
        verifiers,
        mesh,
        live: Mutex::new(Default::default()),
        metrics: Metrics::default(),
        kube,
        tasks: TaskTracker::new(),
        stopping: CancellationToken::new(),
        install,
    })
}

/// An `identities.<kind>` error from a verifier's settings.
fn invalid<E: std::fmt::Display>(kind: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Identity {
        kind,
        message: e.to_string(),
    }
}

/// The credential verifiers `identities` enables, by kind: join tokens, OIDC JWTs and the
/// cloud platforms (`awsEc2`, `gcpGce`, `azureVm`).
fn verifiers(
    file: &crate::config::File,
    registry: &Arc<dyn Registry>,
) -> Result<BTreeMap<&'static str, Arc<dyn Verifier>>> {
    let ids = &file.identities;
    let store = Arc::new(gangplank_registry::IdentityStore::new(registry.clone()));
    let mut verifiers: BTreeMap<&'static str, Arc<dyn Verifier>> = BTreeMap::new();
    // Always on: a VM that joined with any credential rejoins with its bound key.
    verifiers.insert(
        gangplank_api::kind::BOUND_KEY,
        Arc::new(gangplank_identity::bound::Verifier::new(store.clone())),
    );
    if ids.join_tokens {
        let v = gangplank_identity::token::Verifier::new(store.clone());
        verifiers.insert(gangplank_api::kind::JOIN_TOKEN, Arc::new(v));
    }
    if !ids.jwt.issuers.is_empty() {
        let v = gangplank_identity::jwt::Verifier::new(ids.jwt.issuers.clone(), file.plane_id.clone())
            .map_err(invalid("jwt"))?;
        verifiers.insert(gangplank_api::kind::JWT, Arc::new(v));
    }
    if let Some(aws) = &ids.aws_ec2 {
        let v = aws.verifier(store.clone()).map_err(invalid("awsEc2"))?;
        verifiers.insert(gangplank_api::kind::AWS_EC2, Arc::new(v));
    }
    if let Some(gcp) = &ids.gcp_gce {
        let v = gcp.verifier(file.plane_id.clone()).map_err(invalid("gcpGce"))?;
        verifiers.insert(gangplank_api::kind::GCP_GCE, Arc::new(v));
    }
    if let Some(azure) = &ids.azure_vm {
        let v = azure.verifier().map_err(invalid("azureVm"))?;
        verifiers.insert(gangplank_api::kind::AZURE_VM, Arc::new(v));
    }
    Ok(verifiers)
}

/// RFC 3339 for now.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Maps a registry failure to the gRPC status an agent can act on.
pub fn registry_status(err: gangplank_registry::Error) -> Status {
    use gangplank_registry::Error as E;
    match err {
        E::NotFound { .. } => Status::not_found(err.to_string()),
        E::Conflict { .. } => Status::aborted(format!("{err}; retry")),
        E::TokenUnusable { .. } => crate::service::refused(gangplank_identity::Refused::JoinToken, &err),
        // Which object or file is broken, and where, is for the endpoint's log only.
        E::Invalid { .. } => {
            let reference = crate::service::reference_id();
            tracing::error!(%reference, %err, "registry object is malformed");
            Status::failed_precondition(format!(
                "the endpoint's registry holds a malformed object (reference {reference}; the endpoint's log names it): the endpoint's operator must fix it; the agent retries"
            ))
        }
        E::Io { .. } | E::Backend(_) => {
            let reference = crate::service::reference_id();
            tracing::error!(%reference, %err, "registry failure");
            Status::unavailable(format!(
                "the endpoint cannot reach its registry (reference {reference}; the endpoint's log says why): nothing to change on this VM; the endpoint's operator must restore it"
            ))
        }
    }
}

impl Plane {
    /// The credential kinds this plane accepts.
    pub fn kinds(&self) -> Vec<String> {
        self.verifiers.keys().map(|k| k.to_string()).collect()
    }

    /// The address to register: the verified one, else the one the agent reports for how it
    /// connects (first address; the agent orders them by preference).
    pub fn address(identity: &Identity, host: &proto::HostFacts) -> Result<IpAddr, Status> {
        // A VM connecting over the internet is registered at the public address it reports;
        // otherwise the address the platform vouches for wins.
        if let Some(ip) = identity
            .address
            .filter(|_| host.connected_over != gangplank_api::connected_over::INTERNET)
        {
            return Ok(ip);
        }
        host.addresses
            .iter()
            .find_map(|a| a.parse::<IpAddr>().ok())
            .ok_or_else(|| {
                Status::invalid_argument("host.addresses: the agent reported no IP address for this VM")
            })
    }

    /// The WorkloadEntry for `identity` joining `group`.
    pub fn entry(
        &self,
        group: &WorkloadGroup,
        identity: &Identity,
        host: &proto::HostFacts,
        session_id: &str,
    ) -> Result<WorkloadEntry, Status> {
        let key = group.key();
        let parts = identity.name_parts();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let name = entry_name(&key.name, identity.name_kind(), &parts);
        let address = Self::address(identity, host)?;

        let group_labels = group.entry_labels();
        let mut labels = group_labels.clone();
        for (k, v) in &host.labels {
            match group_labels.get(k) {
                Some(existing) if existing != v => {
                    return Err(Status::invalid_argument(format!(
                        "workload.labels.{k}: {v:?} would override the WorkloadGroup {key}'s label {k}={existing:?}; agents may add labels but never override the group's"
                    )));
                }
                _ => {
                    labels.insert(k.clone(), v.clone());
                }
            }
        }
        labels.extend(identity.labels());
        labels.insert(label::MANAGED_BY.into(), label::MANAGED_BY_VALUE.into());
        labels.insert(label::WORKLOAD_GROUP.into(), key.name.clone());
        labels.insert(label::CREDENTIAL_KIND.into(), identity.kind().into());

        let mut annotations: BTreeMap<String, String> = group
            .spec
            .metadata
            .as_ref()
            .map(|m| m.annotations.clone())
            .unwrap_or_default();
        let now = now_rfc3339();
        // Verified facts (and, for AWS, the agent key later onboardings must prove).
        annotations.extend(identity.annotations());
        annotations.insert(annotation::IDENTITY.into(), identity.annotation());
        annotations.insert(annotation::CREDENTIAL_KIND.into(), identity.kind().into());
        annotations.insert(annotation::AGENT_VERSION.into(), host.agent_version.clone());
        if !host.hostname.is_empty() {
            annotations.insert(annotation::HOSTNAME.into(), host.hostname.clone());
        }
        annotations.insert(annotation::CONNECTED_AT.into(), now);
        annotations.insert(annotation::ENDPOINT_REPLICA.into(), self.config.replica.clone());
        annotations.insert(annotation::SESSION.into(), session_id.into());
        if self.config.health_checks() {
            annotations.insert(annotation::HEALTH_CHECKS_ENABLED.into(), "true".into());
        }

        let template = group.spec.template.clone().unwrap_or_default();
        let spec = WorkloadEntrySpec {
            address: address.to_string(),
            labels: labels.clone(),
            ports: template.ports,
            network: template.network,
            locality: template.locality,
            weight: template.weight,
            service_account: group.service_account().to_string(),
        };
        let owner = OwnerReference {
            api_version: WorkloadGroup::API_VERSION.into(),
            kind: WorkloadGroup::KIND.into(),
            name: key.name.clone(),
            uid: group.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: None,
        };
        let metadata = ObjectMeta {
            name: Some(name),
            namespace: Some(key.namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        };
        let entry = WorkloadEntry::new(metadata, spec);
        crate::facts::check_entry(&entry)?;
        Ok(entry)
    }

    /// Renders the sidecar's boot files for `entry` of `group`, with a fresh token.
    pub async fn boot_files(
        &self,
        group: &WorkloadGroup,
        entry: &WorkloadEntry,
    ) -> Result<(Vec<proto::BootFile>, crate::keys::SidecarToken), Status> {
        let key = group.key();
        let unavailable =
            |e: crate::mesh::Error| Status::unavailable(format!("boot inputs for WorkloadGroup {key}: {e}"));
        let token = self
            .mesh
            .token(
                &key.namespace,
                group.service_account(),
                self.config.file.sidecar_token.lifetime,
            )
            .await
            .map_err(unavailable)?;
        let root_cert = self.mesh.root_cert(&key.namespace).await.map_err(unavailable)?;
        let mesh_config = self.mesh.mesh_config().await.map_err(unavailable)?;
        let cluster_id = match &self.config.file.mesh.cluster_id {
            Some(id) => id.clone(),
            None => self.mesh.cluster_id().await.map_err(unavailable)?,
        };
        let group_labels = group.entry_labels();
        let extra_labels = entry
            .spec
            .labels
            .iter()
            .filter(|(k, _)| !group_labels.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let address: IpAddr = entry
            .spec
            .address
            .parse()
            .map_err(|_| Status::internal("registered address is not an IP"))?;
        let mesh = &self.config.file.mesh;
        let inputs = bootstrap::Inputs {
            group: group.clone(),
            mesh_config,
            root_cert,
            token: token.jwt.clone().into_bytes(),
            cluster_id,
            revision: mesh.revision.clone(),
            istio_namespace: mesh.istio_namespace.clone(),
            ingress_ip: mesh.istiod_ip,
            instance_ip: Some(bootstrap::InstanceIp::Internal(address)),
            capture_dns: true,
            autoregister: false,
            workload_entry: entry.metadata.name.clone(),
            extra_labels,
        };
        let files = bootstrap::render(&inputs).map_err(|e| {
            Status::failed_precondition(format!("rendering boot files for WorkloadGroup {key}: {e}"))
        })?;
        let files = files
            .entries()
            .into_iter()
            .map(|f| proto::BootFile {
                name: f.name.to_string(),
                content: f.content,
                mode: f.mode,
            })
            .collect();
        Ok((files, token))
    }
}
