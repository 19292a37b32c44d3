//! The reconciler: each `OnboardingPlane` into its children (server-side apply, field manager
//! [`MANAGER`], forced), and its status from what the cluster has.
//!
//! Namespaced children carry a controller owner reference to the plane, so the garbage
//! collector deletes them with it and `owns()` maps their events back to it. The ClusterRole
//! and ClusterRoleBinding cannot be owned by a namespaced object (the collector ignores such
//! references), so they carry the plane's name and namespace as labels, are watched through
//! those, and are deleted by the plane's finalizer [`FINALIZER`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, Event};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::metrics::Metrics;
use crate::plane::{Condition, OnboardingPlane, PlaneStatus};
use crate::render::{self, Children, MANAGED_BY, Names, PLANE_NAME, PLANE_NAMESPACE, PORT};

/// The field manager of every write.
pub const MANAGER: &str = "gangplank-operator";
/// The plane's finalizer: removes its cluster-scoped children.
pub const FINALIZER: &str = "onboarding.gangplank.dev/cleanup";

/// Why a reconcile failed (it is retried with exponential backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The API's error.
        #[source]
        source: kube::Error,
    },
    /// The children could not be rendered (a bug in `deploy/`).
    #[error(transparent)]
    Render(#[from] render::Error),
    /// The serving certificate could not be made.
    #[error("serving certificate: {0}")]
    Certificate(String),
    /// The finalizer could not be added, run or removed.
    #[error("finalizer {FINALIZER}: {0}")]
    Finalizer(String),
}

pub(crate) fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    metrics: Arc<Metrics>,
    /// Consecutive failures per plane, for the backoff.
    failures: Mutex<HashMap<ObjectRef<OnboardingPlane>, u32>>,
}

impl Context {
    /// A context on `client`, counting into `metrics`.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
        })
    }
}

/// How long after `failures` consecutive failures to retry: 1s, doubling, at most 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64.checked_shl(failures.saturating_sub(1)).unwrap_or(u64::MAX);
    Duration::from_secs(secs.min(300))
}

/// Runs the controller until `shutdown` completes (then waits for running reconciles).
/// `namespace`: watch planes there only; `None`: everywhere.
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let children = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let by_labels = |meta: &kube::api::ObjectMeta| {
        let labels = meta.labels.as_ref()?;
        Some(ObjectRef::new(labels.get(PLANE_NAME)?).within(labels.get(PLANE_NAMESPACE)?))
    };
    let c = &client;
    let controller = Controller::new(api::<OnboardingPlane>(c, namespace), watcher::Config::default());
    let planes = controller.store();
    // A plane's TLS Secret is the user's (not owned): its creation or change wakes the planes
    // that name it, so TLSSecretMissing clears at once.
    let named_by = move |secret: Secret| {
        let (ns, name) = (secret.namespace(), secret.name_any());
        planes
            .state()
            .into_iter()
            .filter(|p| p.namespace() == ns && crate::tls::served_from(p) == name)
            .map(|p| ObjectRef::from_obj(&*p))
            .collect::<Vec<_>>()
    };
    controller
        // Only TLS Secrets can be a plane's: the others are never listed into the operator.
        .watches(
            api::<Secret>(c, namespace),
            watcher::Config::default().fields("type=kubernetes.io/tls"),
            named_by,
        )
        .owns(api::<Deployment>(c, namespace), children.clone())
        .owns(api::<ConfigMap>(c, namespace), children.clone())
        .owns(api::<Service>(c, namespace), children.clone())
        .owns(api::<ServiceAccount>(c, namespace), children.clone())
        .owns(api::<Role>(c, namespace), children.clone())
        .owns(api::<RoleBinding>(c, namespace), children.clone())
        .owns(api::<PodDisruptionBudget>(c, namespace), children.clone())
        .owns(api::<Secret>(c, namespace), children.clone())
        .watches(
            Api::<ClusterRole>::all(client.clone()),
            children.clone(),
            move |o| by_labels(&o.metadata),
        )
        .watches(
            Api::<ClusterRoleBinding>::all(client.clone()),
            children,
            move |o| by_labels(&o.metadata),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, Context::new(client.clone(), metrics))
        .for_each(|res| async move {
            match res {
                Ok((plane, _)) => tracing::debug!(plane = %plane, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// Reconciles one plane: its finalizer first, then its children and status, or (deleted) the
/// cluster-scoped children.
pub async fn reconcile(plane: Arc<OnboardingPlane>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_plane(&plane, &ctx).await;
    if let Err(err) = &result
        && plane.metadata.deletion_timestamp.is_none()
    {
        report_failure(&plane, &ctx, err).await;
    }
    ctx.metrics
        .reconciled(result.is_ok(), started.elapsed().as_secs_f64());
    result
}

async fn reconcile_plane(plane: &Arc<OnboardingPlane>, ctx: &Arc<Context>) -> Result<Action, Error> {
    let ns = plane.namespace().unwrap_or_default();
    let api: Api<OnboardingPlane> = Api::namespaced(ctx.client.clone(), &ns);
    let action = finalizer::finalizer(&api, FINALIZER, plane.clone(), |event| async {
        match event {
            Event::Apply(p) => apply(&p, ctx).await,
            Event::Cleanup(p) => cleanup(&p, ctx).await,
        }
    })
    .await;
    let action = match action {
        Ok(a) => a,
        // A second reconcile of a plane whose cleanup already ran and which is gone now.
        Err(finalizer::Error::RemoveFinalizer(e)) if is_not_found(&e) => Action::await_change(),
        Err(finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e)) => return Err(e),
        Err(e) => return Err(Error::Finalizer(e.to_string())),
    };
    ctx.failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&ObjectRef::from_obj(&**plane));
    Ok(action)
}

/// Shows a failed reconcile on the plane (`Degraded=True`, `ReconcileError`): the operator's
/// log is not where a platform engineer looks first. Best effort: the failure is retried.
async fn report_failure(plane: &OnboardingPlane, ctx: &Context, err: &Error) {
    let mut status = plane.status.clone().unwrap_or_default();
    let message = format!("{err}: retrying with backoff; the operator's log has each attempt");
    status.conditions.retain(|c| c.type_ != "Degraded");
    status
        .conditions
        .push(condition("Degraded", true, "ReconcileError", &message));
    if let Err(e) = write_status(plane, ctx, status).await {
        tracing::debug!(error = %e, "could not record the failure on the plane");
    }
}

/// Retries with exponential backoff per plane.
pub fn error_policy(plane: Arc<OnboardingPlane>, err: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
    let n = failures.entry(ObjectRef::from_obj(&*plane)).or_default();
    *n = n.saturating_add(1);
    let wait = backoff(*n);
    tracing::warn!(plane = %plane.name_any(), namespace = ?plane.namespace(), error = %err,
        retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

async fn ssa<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(obj))
        .await
        .map_err(kube_err(format!(
            "applying {} {name}",
            K::kind(&K::DynamicType::default())
        )))
}

pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn apply(plane: &OnboardingPlane, ctx: &Context) -> Result<Action, Error> {
    let ns = plane.namespace().unwrap_or_default();
    let name = plane.name_any();
    let generation = plane.metadata.generation;
    let valid = match crate::plane::validate_name(&name).and_then(|()| plane.spec.validate()) {
        Ok(v) => v,
        Err(invalid) => {
            // Nothing is created or changed: what runs keeps running on the last good spec.
            tracing::warn!(plane = %name, namespace = %ns, problem = %invalid, "invalid spec");
            let status = PlaneStatus {
                observed_generation: generation,
                conditions: vec![
                    condition("Ready", false, "InvalidSpec", &invalid.to_string()),
                    condition("Progressing", false, "InvalidSpec", "waiting for a valid spec"),
                    condition("Degraded", true, "InvalidSpec", &invalid.to_string()),
                ],
                ..plane.status.clone().unwrap_or_default()
            };
            write_status(plane, ctx, status).await?;
            return Ok(Action::await_change());
        }
    };
    let keys_uid = ensure_keys(plane, ctx).await?;
    let serving = crate::tls::ensure(plane, &valid, &ctx.client).await?;
    let children = render::children(plane, &valid, &keys_uid, &serving)?;
    let c = &ctx.client;
    let Children {
        service_account,
        role,
        role_binding,
        cluster_role,
        cluster_role_binding,
        config_map,
        deployment,
        service,
        pdb,
    } = children;
    ssa(&Api::namespaced(c.clone(), &ns), &service_account).await?;
    ssa(&Api::namespaced(c.clone(), &ns), &role).await?;
    ssa(&Api::namespaced(c.clone(), &ns), &role_binding).await?;
    ssa(&Api::all(c.clone()), &cluster_role).await?;
    ssa(&Api::all(c.clone()), &cluster_role_binding).await?;
    ssa(&Api::namespaced(c.clone(), &ns), &config_map).await?;
    ssa(&Api::namespaced(c.clone(), &ns), &service).await?;
    ssa(&Api::namespaced(c.clone(), &ns), &pdb).await?;
    let deployment = ssa(&Api::namespaced(c.clone(), &ns), &deployment).await?;

    let want = valid.spec.replicas;
    let ds = deployment.status.clone().unwrap_or_default();
    let ready = ds.ready_replicas.unwrap_or(0);
    let updated = ds.updated_replicas.unwrap_or(0);
    let seen = ds.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
    // As `kubectl rollout status`: every replica updated and available, no old one left.
    let done = seen
        && ready >= want
        && updated >= want
        && ds.replicas.unwrap_or(0) == want
        && ds.available_replicas.unwrap_or(0) >= want
        && ds.unavailable_replicas.unwrap_or(0) == 0;
    let names = Names::of(&ns, &name);
    let mut conditions = Vec::new();
    if done {
        conditions.push(condition(
            "Ready",
            true,
            "Available",
            &format!("{ready}/{want} endpoint replicas ready"),
        ));
        conditions.push(condition(
            "Progressing",
            false,
            "Complete",
            "the Deployment is rolled out",
        ));
    } else {
        let why = match &serving.problem {
            Some((_, problem)) => problem.clone(),
            None => format!(
                "{ready}/{want} endpoint replicas ready, {updated} updated: Deployment {ns}/{} is rolling out",
                names.endpoint
            ),
        };
        conditions.push(condition("Ready", false, "PodsNotReady", &why));
        conditions.push(condition("Progressing", true, "RollingOut", &why));
    }
    match &serving.problem {
        Some((reason, message)) => conditions.push(condition("Degraded", true, reason, message)),
        None => conditions.push(condition(
            "Degraded",
            false,
            "Reconciled",
            "every child object is applied",
        )),
    }
    let status = PlaneStatus {
        observed_generation: generation,
        conditions,
        address: Some(format!("{}.{ns}.svc:{PORT}", names.endpoint)),
        ready_replicas: ready,
        tls_secret_name: Some(serving.secret_name.clone()),
        ca_config_map: serving.ca_config_map.clone(),
    };
    write_status(plane, ctx, status).await?;
    // Children's events trigger reconciles; this only bounds how stale the status can get
    // (and notices a TLS Secret created later).
    let every = if serving.problem.is_some() || !done {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(300)
    };
    Ok(Action::requeue(
        serving
            .recheck
            .map_or(every, |r| r.clamp(Duration::from_secs(1), every)),
    ))
}

/// Creates the keys Secret when it does not exist; never rewrites one (the keys must survive).
/// Returns its uid.
async fn ensure_keys(plane: &OnboardingPlane, ctx: &Context) -> Result<String, Error> {
    let ns = plane.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = Names::of(&ns, &plane.name_any()).keys;
    let read = || async {
        api.get_opt(&name)
            .await
            .map_err(kube_err(format!("reading Secret {ns}/{name}")))
    };
    if let Some(s) = read().await? {
        return Ok(s.metadata.uid.unwrap_or_default());
    }
    match api
        .create(
            &PostParams {
                field_manager: Some(MANAGER.into()),
                ..Default::default()
            },
            &render::keys_secret(plane)?,
        )
        .await
    {
        Ok(s) => Ok(s.metadata.uid.unwrap_or_default()),
        // Created meanwhile (another reconcile): use that one.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Ok(read().await?.and_then(|s| s.metadata.uid).unwrap_or_default())
        }
        Err(e) => Err(kube_err(format!("creating Secret {ns}/{name}"))(e)),
    }
}

/// Deletes `name` through `api`; gone already is fine.
async fn delete<K>(api: Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    match api.delete(name, &DeleteParams::background()).await {
        Err(e) if !is_not_found(&e) => Err(kube_err(format!(
            "deleting {} {name}",
            K::kind(&K::DynamicType::default())
        ))(e)),
        _ => Ok(()),
    }
}

/// A deleted plane's children: the cluster-scoped ones (no owner reference can reach them),
/// and the namespaced ones too, so that a cluster without a garbage collector (a bare API
/// server) is left as clean as one with it.
async fn cleanup(plane: &OnboardingPlane, ctx: &Context) -> Result<Action, Error> {
    let ns = plane.namespace().unwrap_or_default();
    let name = plane.name_any();
    let names = Names::of(&ns, &name);
    let c = &ctx.client;
    delete(Api::<ClusterRoleBinding>::all(c.clone()), &names.cluster).await?;
    delete(Api::<ClusterRole>::all(c.clone()), &names.cluster).await?;
    let (tls_secret, ca) = crate::tls::names(&name);
    delete(Api::<Deployment>::namespaced(c.clone(), &ns), &names.endpoint).await?;
    delete(Api::<Service>::namespaced(c.clone(), &ns), &names.endpoint).await?;
    delete(
        Api::<PodDisruptionBudget>::namespaced(c.clone(), &ns),
        &names.endpoint,
    )
    .await?;
    delete(Api::<RoleBinding>::namespaced(c.clone(), &ns), &names.leases).await?;
    delete(Api::<Role>::namespaced(c.clone(), &ns), &names.leases).await?;
    delete(Api::<ServiceAccount>::namespaced(c.clone(), &ns), &names.endpoint).await?;
    for cm in [&names.endpoint, &ca] {
        delete(Api::<ConfigMap>::namespaced(c.clone(), &ns), cm).await?;
    }
    // The user's own Secret (spec.tls.secretName) is not the plane's: it stays.
    for secret in [&names.keys, &ca, &tls_secret] {
        if plane.spec.tls.secret_name.as_deref() != Some(secret.as_str()) {
            delete(Api::<Secret>::namespaced(c.clone(), &ns), secret).await?;
        }
    }
    if plane.spec.tls.cert_manager.is_some() {
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(c.clone(), &ns, &crate::tls::certificate_resource());
        match api.delete(&names.endpoint, &DeleteParams::background()).await {
            // Gone, or cert-manager's CRD is not installed.
            Err(e) if !is_not_found(&e) => {
                return Err(kube_err(format!("deleting Certificate {ns}/{}", names.endpoint))(
                    e,
                ));
            }
            _ => {}
        }
    }
    tracing::info!(plane = %name, namespace = %ns, "plane deleted: its children removed");
    Ok(Action::await_change())
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        observed_generation: None,
    }
}

/// Writes `status` unless the plane has it already; a condition keeps its transition time
/// while its status stays, so a steady plane's status is not rewritten (and does not wake the
/// controller again).
async fn write_status(plane: &OnboardingPlane, ctx: &Context, mut status: PlaneStatus) -> Result<(), Error> {
    let old = plane.status.clone().unwrap_or_default();
    for c in &mut status.conditions {
        c.observed_generation = status.observed_generation;
        if let Some(o) = old
            .conditions
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
    if old == status {
        return Ok(());
    }
    let ns = plane.namespace().unwrap_or_default();
    let name = plane.name_any();
    let api: Api<OnboardingPlane> = Api::namespaced(ctx.client.clone(), &ns);
    // Every field, absent ones as null, so a merge patch clears what no longer applies.
    let mut body = serde_json::to_value(&status).unwrap_or_default();
    for field in ["observedGeneration", "address", "tlsSecretName", "caConfigMap"] {
        body.as_object_mut()
            .map(|o| o.entry(field).or_insert(serde_json::Value::Null));
    }
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": body})),
    )
    .await
    .map_err(kube_err(format!(
        "writing the status of OnboardingPlane {ns}/{name}"
    )))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_up_to_five_minutes() {
        let waits: Vec<u64> = [1, 2, 3, 4, 9, 10, 64, u32::MAX]
            .map(|n| backoff(n).as_secs())
            .to_vec();
        assert_eq!(waits, [1, 2, 4, 8, 256, 300, 300, 300]);
    }
}
