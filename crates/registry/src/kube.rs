//! The Kubernetes registry: Gangplank's resources in the cluster's API server, through kube-rs.
//!
//! - WorkloadEntries are written with server-side apply under the field manager
//!   [`FIELD_MANAGER`] (forced: Gangplank owns the entries it registers), their status through
//!   the `status` subresource (also applied), annotations with a JSON merge patch;
//! - WorkloadGroups, OnboardingPolicies and JoinTokens are read from watch-backed caches
//!   (kube-rs reflectors over all namespaces), so an onboarding makes no API call to read them;
//!   a change in the cluster reaches the cache within a watch event, without a restart. A join
//!   token missing from the cache (just created) is looked up once in the API;
//! - Istio's `networking.istio.io/v1` is used when the cluster serves it, `v1beta1` otherwise
//!   (Istio before 1.22); entries and their owner references are written in that version;
//! - a join token is used with a `resourceVersion`-conditional update of its `status`
//!   subresource: a concurrent use makes the update fail with 409, and the use is retried on
//!   the fresh object, so a token is never used more often than allowed, across replicas.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use gangplank_api::binding::WorkloadBinding;
use gangplank_api::istio::{WorkloadEntry, WorkloadGroup};
use gangplank_api::names::label;
use gangplank_api::policy::OnboardingPolicy;
use gangplank_api::token::JoinToken;
use gangplank_api::{NamespacedName, Resource};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::task::JoinHandle;

use crate::{AnnotationPatch, Error, Result};

/// The field manager of every write Gangplank makes.
pub const FIELD_MANAGER: &str = "gangplank";
/// Istio versions tried, best first.
const ISTIO_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// How often a join-token use is retried after a concurrent use.
const CONSUME_ATTEMPTS: usize = 8;

/// One kind of call to the Kubernetes API, for checking RBAC against what the code does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiCall {
    /// The API group (`""` for core).
    pub group: &'static str,
    /// The resource, with its subresource (`workloadentries/status`).
    pub resource: &'static str,
    /// The RBAC verb.
    pub verb: &'static str,
    /// The object names the call is limited to (empty: any name).
    pub names: &'static [&'static str],
}

const fn call(group: &'static str, resource: &'static str, verb: &'static str) -> ApiCall {
    ApiCall {
        group,
        resource,
        verb,
        names: &[],
    }
}

/// Every call [`Registry`] makes (server-side apply may create, so it needs `create` too).
pub const API_CALLS: &[ApiCall] = &[
    call("networking.istio.io", "workloadgroups", "list"),
    call("networking.istio.io", "workloadgroups", "watch"),
    call("onboarding.gangplank.dev", "onboardingpolicies", "list"),
    call("onboarding.gangplank.dev", "onboardingpolicies", "watch"),
    call("onboarding.gangplank.dev", "jointokens", "list"),
    call("onboarding.gangplank.dev", "jointokens", "watch"),
    call("onboarding.gangplank.dev", "jointokens", "get"),
    call("onboarding.gangplank.dev", "jointokens/status", "update"),
    call("networking.istio.io", "workloadentries", "get"),
    call("networking.istio.io", "workloadentries", "list"),
    call("networking.istio.io", "workloadentries", "watch"),
    call("networking.istio.io", "workloadentries", "create"),
    call("networking.istio.io", "workloadentries", "patch"),
    call("networking.istio.io", "workloadentries", "delete"),
    call("networking.istio.io", "workloadentries/status", "patch"),
    call("onboarding.gangplank.dev", "workloadbindings", "get"),
    call("onboarding.gangplank.dev", "workloadbindings", "list"),
    call("onboarding.gangplank.dev", "workloadbindings", "watch"),
    call("onboarding.gangplank.dev", "workloadbindings", "create"),
    call("onboarding.gangplank.dev", "workloadbindings", "patch"),
    call("onboarding.gangplank.dev", "workloadbindings", "delete"),
];

/// Calls only the admin CLI makes through [`Registry`] (`gangplank token create`), not the
/// endpoint.
pub const ADMIN_CALLS: &[ApiCall] = &[call("onboarding.gangplank.dev", "jointokens", "create")];

/// How to connect.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long [`Registry::connect`] waits for the caches' first listing.
    pub cache_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cache_timeout: Duration::from_secs(30),
        }
    }
}

/// A [`crate::Registry`] backed by the Kubernetes API. Cheap to clone; clones share the
/// caches, which stop when the last clone is dropped.
#[derive(Clone)]
pub struct Registry {
    client: kube::Client,
    entries: ApiResource,
    groups: Store<DynamicObject>,
    policies: Store<DynamicObject>,
    tokens: Store<DynamicObject>,
    /// The managed WorkloadEntries (label `app.kubernetes.io/managed-by=gangplank`).
    managed: Store<DynamicObject>,
    /// Every WorkloadBinding, for the sweep (a rejoin reads its binding fresh).
    bound: Store<DynamicObject>,
    removals: tokio::sync::broadcast::Sender<NamespacedName>,
    group_ar: ApiResource,
    token_ar: ApiResource,
    binding_ar: ApiResource,
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("istio", &self.entries.api_version)
            .finish_non_exhaustive()
    }
}

/// The cache tasks; aborted on drop.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The ApiResource of Gangplank's own kind `T`.
fn ours<T: Resource>() -> ApiResource {
    let (group, version) = T::API_VERSION.split_once('/').unwrap_or(("", T::API_VERSION));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, T::KIND), T::PLURAL)
}

/// The ApiResource of Istio's kind `T` in `version`.
fn istio<T: Resource>(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(gangplank_api::istio::GROUP, version, T::KIND),
        T::PLURAL,
    )
}

impl Registry {
    /// Connects with default [`Options`].
    pub async fn connect(client: kube::Client) -> Result<Self> {
        Self::connect_with(client, Options::default()).await
    }

    /// Finds the Istio version the cluster serves, starts the caches and waits for their
    /// first listing.
    pub async fn connect_with(client: kube::Client, options: Options) -> Result<Self> {
        let version = istio_version(&client).await?;
        let group_ar = istio::<WorkloadGroup>(&version);
        let policy_ar = ours::<OnboardingPolicy>();
        let token_ar = ours::<JoinToken>();
        let mut tasks = Vec::new();
        let groups = cache(&client, &group_ar, &mut tasks);
        let policies = cache(&client, &policy_ar, &mut tasks);
        let tokens = cache(&client, &token_ar, &mut tasks);
        let entries = istio::<WorkloadEntry>(&version);
        let removals = tokio::sync::broadcast::channel(1024).0;
        let (managed, task) = managed_entries(&client, &entries, removals.clone());
        tasks.push(task);
        let binding_ar = ours::<WorkloadBinding>();
        let bound = cache(&client, &binding_ar, &mut tasks);
        let tasks = Arc::new(Tasks(tasks));
        let ready = async {
            for (store, what) in [
                (&groups, "WorkloadGroups"),
                (&policies, "OnboardingPolicies"),
                (&tokens, "JoinTokens"),
                (&managed, "WorkloadEntries"),
                (&bound, "WorkloadBindings"),
            ] {
                store
                    .wait_until_ready()
                    .await
                    .map_err(|_| Error::Backend(format!("the {what} cache stopped before it was ready")))?;
            }
            Ok::<(), Error>(())
        };
        tokio::time::timeout(options.cache_timeout, ready)
            .await
            .map_err(|_| {
                Error::Backend(format!(
                    "listing WorkloadGroups, OnboardingPolicies, JoinTokens, WorkloadEntries and WorkloadBindings did not finish within \
                     {:?}: check that Gangplank's CRDs are installed (gangplank install crds | kubectl \
                     apply -f -) and that the endpoint's RBAC allows list and watch on them",
                    options.cache_timeout
                ))
            })??;
        Ok(Self {
            client,
            entries,
            groups,
            policies,
            tokens,
            managed,
            bound,
            removals,
            group_ar,
            token_ar,
            binding_ar,
            _tasks: tasks,
        })
    }

    /// The Istio `apiVersion` in use, e.g. `networking.istio.io/v1`.
    pub fn istio_api_version(&self) -> &str {
        &self.entries.api_version
    }

    /// The client the registry uses.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    fn entries_in(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.entries)
    }

    fn bindings_in(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.binding_ar)
    }

    fn tokens_in(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.token_ar)
    }

    /// A join token from the cache, else from the API.
    async fn token_fresh_or_cached(&self, key: &NamespacedName, fresh: bool) -> Result<Option<JoinToken>> {
        if !fresh && let Some(obj) = self.tokens.get(&obj_ref(&self.token_ar, key)) {
            return decode(&obj, JoinToken::KIND, key).map(Some);
        }
        get_fresh(self.tokens_in(&key.namespace), key).await
    }
}

/// Finds the served Istio networking version.
async fn istio_version(client: &kube::Client) -> Result<String> {
    for v in ISTIO_VERSIONS {
        let gv = format!("{}/{v}", gangplank_api::istio::GROUP);
        match client.list_api_group_resources(&gv).await {
            Ok(list) if list.resources.iter().any(|r| r.name == WorkloadEntry::PLURAL) => {
                return Ok(v.to_owned());
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(Error::Backend(format!(
                    "discovering {gv} on the Kubernetes API: {e}: check the kubeconfig and that the API server is reachable"
                )));
            }
        }
    }
    Err(Error::Backend(
        "the cluster serves neither networking.istio.io/v1 nor v1beta1 WorkloadEntries: install Istio's CRDs first"
            .into(),
    ))
}

/// Starts a reflector over every namespace for `ar`.
fn cache(client: &kube::Client, ar: &ApiResource, tasks: &mut Vec<JoinHandle<()>>) -> Store<DynamicObject> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    let (store, task) = reflect(
        api,
        watcher::Config::default().any_semantic(),
        ar.clone(),
        ar.kind.clone(),
    );
    tasks.push(task);
    store
}

/// Starts a cache of the managed WorkloadEntries in every namespace that also tells
/// `removals` of every entry that goes: deleted while watched, or missing from a relisting
/// after a watch gap.
fn managed_entries(
    client: &kube::Client,
    ar: &ApiResource,
    removals: tokio::sync::broadcast::Sender<NamespacedName>,
) -> (Store<DynamicObject>, JoinHandle<()>) {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    let selector = format!("{}={}", label::MANAGED_BY, label::MANAGED_BY_VALUE);
    let config = watcher::Config::default().labels(&selector).any_semantic();
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut known = std::collections::HashSet::new();
        let mut relisted: Option<std::collections::HashSet<NamespacedName>> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(o)) => {
                    known.insert(key_of(&o));
                }
                Ok(watcher::Event::Delete(o)) => {
                    let key = key_of(&o);
                    known.remove(&key);
                    let _ = removals.send(key);
                }
                Ok(watcher::Event::Init) => relisted = Some(Default::default()),
                Ok(watcher::Event::InitApply(o)) => {
                    if let Some(r) = relisted.as_mut() {
                        r.insert(key_of(&o));
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(now) = relisted.take() {
                        for gone in known.difference(&now) {
                            let _ = removals.send(gone.clone());
                        }
                        known = now;
                    }
                }
                Err(e) => {
                    tracing::warn!(watching = "WorkloadEntries", error = %e, "watching the Kubernetes API failed; retrying");
                }
            }
        }
    });
    (reader, task)
}

/// Starts a task keeping a cache of what `api` and `config` select (`dyntype`: `()` for
/// k8s-openapi types, the [`ApiResource`] for dynamic ones), retrying with backoff and
/// logging failures as `what`. The store is ready after the first listing; abort the task
/// to stop.
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    what: String,
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!(watching = %what, error = %e, "watching the Kubernetes API failed; retrying");
            }
        }
    });
    (reader, task)
}

fn obj_ref(ar: &ApiResource, key: &NamespacedName) -> ObjectRef<DynamicObject> {
    ObjectRef::new_with(&key.name, ar.clone()).within(&key.namespace)
}

/// Reads object `key` of kind `T` from `api` (fresh, not cached), or `None`.
async fn get_fresh<T: Resource>(api: Api<DynamicObject>, key: &NamespacedName) -> Result<Option<T>> {
    let got = api
        .get_opt(&key.name)
        .await
        .map_err(|e| api_error(e, T::KIND, key, "reading"))?;
    got.map(|o| decode(&o, T::KIND, key)).transpose()
}

/// Deletes object `key` of kind `T` from `api`; `Ok(false)` if it was already gone.
async fn delete_from<T: Resource>(api: Api<DynamicObject>, key: &NamespacedName) -> Result<bool> {
    match api.delete(&key.name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(api_error(e, T::KIND, key, "deleting")),
    }
}

/// Converts a stored object into Gangplank's type.
fn decode<T: Resource>(obj: &DynamicObject, kind: &'static str, key: &NamespacedName) -> Result<T> {
    let v = serde_json::to_value(obj).map_err(|e| Error::Backend(format!("encoding {kind} {key}: {e}")))?;
    serde_json::from_value(v).map_err(|e| Error::Invalid {
        path: format!("{kind} {key}"),
        message: format!("{e}: fix the object in the cluster"),
    })
}

/// The key of a cached object.
fn key_of(obj: &DynamicObject) -> NamespacedName {
    NamespacedName::new(
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Maps a kube error for `kind key` while `doing`.
fn api_error(e: kube::Error, kind: &'static str, key: &NamespacedName, doing: &str) -> Error {
    match e {
        kube::Error::Api(s) if s.code == 404 => Error::NotFound {
            kind,
            key: key.clone(),
        },
        kube::Error::Api(s) if s.code == 409 => Error::Conflict {
            kind,
            key: key.clone(),
            detail: s.message.clone(),
        },
        kube::Error::Api(s) if s.code == 422 => Error::Invalid {
            path: format!("{kind} {key}"),
            message: format!("the API server refused it: {}", s.message),
        },
        other => Error::Backend(format!(
            "{doing} {kind} {key} on the Kubernetes API: {other}: check that the API server is \
             reachable and the endpoint's RBAC allows it"
        )),
    }
}

/// `obj` as Gangplank applies it: its kind and version, no server-set fields, owner
/// references to Istio objects in `istio_version` (the one the cluster serves).
fn applied<T: Resource>(obj: &T, api_version: &str, istio_version: &str) -> Result<Value> {
    let key = obj.key();
    let mut v =
        serde_json::to_value(obj).map_err(|e| Error::Backend(format!("encoding {} {key}: {e}", T::KIND)))?;
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(T::KIND);
    if let Some(m) = v["metadata"].as_object_mut() {
        for f in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            m.remove(f);
        }
        if let Some(owners) = m.get_mut("ownerReferences").and_then(Value::as_array_mut) {
            let prefix = format!("{}/", gangplank_api::istio::GROUP);
            for o in owners {
                if o["apiVersion"].as_str().is_some_and(|a| a.starts_with(&prefix)) {
                    o["apiVersion"] = json!(istio_version);
                }
            }
        }
    }
    Ok(v)
}

/// The entry as it is applied: served version, no server-set fields, no status (a
/// subresource).
fn applied_entry(entry: &WorkloadEntry, api_version: &str) -> Result<Value> {
    let mut v = applied(entry, api_version, api_version)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    Ok(v)
}

#[async_trait]
impl crate::Registry for Registry {
    async fn workload_group(&self, key: &NamespacedName) -> Result<Option<WorkloadGroup>> {
        self.groups
            .get(&obj_ref(&self.group_ar, key))
            .map(|o| decode(&o, WorkloadGroup::KIND, key))
            .transpose()
    }

    async fn policies(&self, namespace: &str) -> Result<Vec<OnboardingPolicy>> {
        let mut out: Vec<OnboardingPolicy> = self
            .policies
            .state()
            .iter()
            .filter(|o| o.metadata.namespace.as_deref() == Some(namespace))
            .map(|o| decode(o, OnboardingPolicy::KIND, &key_of(o)))
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(out)
    }

    async fn entry(&self, key: &NamespacedName) -> Result<Option<WorkloadEntry>> {
        get_fresh(self.entries_in(&key.namespace), key).await
    }

    /// From the watch-backed cache: no API call.
    async fn managed_entries(&self) -> Result<Vec<WorkloadEntry>> {
        let mut out: Vec<WorkloadEntry> = self
            .managed
            .state()
            .iter()
            .map(|o| decode(o, WorkloadEntry::KIND, &key_of(o)))
            .collect::<Result<_>>()?;
        out.sort_by_key(Resource::key);
        Ok(out)
    }

    async fn apply_entry(&self, entry: &WorkloadEntry) -> Result<WorkloadEntry> {
        let key = entry.key();
        let body = applied_entry(entry, &self.entries.api_version)?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let stored = self
            .entries_in(&key.namespace)
            .patch(&key.name, &params, &Patch::Apply(&body))
            .await
            .map_err(|e| api_error(e, WorkloadEntry::KIND, &key, "applying"))?;
        decode(&stored, WorkloadEntry::KIND, &key)
    }

    async fn annotate_entry(&self, key: &NamespacedName, patch: &AnnotationPatch) -> Result<()> {
        let mut annotations = serde_json::Map::new();
        for k in &patch.remove {
            annotations.insert(k.clone(), Value::Null);
        }
        for (k, v) in &patch.set {
            annotations.insert(k.clone(), json!(v));
        }
        let body = json!({"metadata": {"annotations": annotations}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        self.entries_in(&key.namespace)
            .patch(&key.name, &params, &Patch::Merge(&body))
            .await
            .map_err(|e| api_error(e, WorkloadEntry::KIND, key, "annotating"))?;
        Ok(())
    }

    async fn set_entry_status(&self, key: &NamespacedName, status: &Value) -> Result<()> {
        let body = json!({
            "apiVersion": self.entries.api_version,
            "kind": WorkloadEntry::KIND,
            "metadata": {"name": key.name, "namespace": key.namespace},
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.entries_in(&key.namespace)
            .patch_status(&key.name, &params, &Patch::Apply(&body))
            .await
            .map_err(|e| api_error(e, WorkloadEntry::KIND, key, "setting the status of"))?;
        Ok(())
    }

    async fn delete_entry(&self, key: &NamespacedName) -> Result<bool> {
        delete_from::<WorkloadEntry>(self.entries_in(&key.namespace), key).await
    }

    async fn create_join_token(&self, token: &JoinToken) -> Result<()> {
        let key = token.key();
        let mut body = serde_json::to_value(token)
            .map_err(|e| Error::Backend(format!("encoding JoinToken {key}: {e}")))?;
        body["apiVersion"] = json!(JoinToken::API_VERSION);
        body["kind"] = json!(JoinToken::KIND);
        let obj: DynamicObject = serde_json::from_value(body)
            .map_err(|e| Error::Backend(format!("encoding JoinToken {key}: {e}")))?;
        match self
            .tokens_in(&key.namespace)
            .create(&PostParams::default(), &obj)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict {
                kind: JoinToken::KIND,
                key,
                detail: "a join token with this id already exists: create it under a new id".into(),
            }),
            Err(e) => Err(api_error(e, JoinToken::KIND, &key, "creating")),
        }
    }

    async fn join_token(&self, key: &NamespacedName) -> Result<Option<JoinToken>> {
        self.token_fresh_or_cached(key, false).await
    }

    async fn consume_join_token(
        &self,
        key: &NamespacedName,
        secret_sha256: &str,
        now: OffsetDateTime,
    ) -> Result<JoinToken> {
        let unusable = |reason: String| Error::TokenUnusable {
            namespace: key.namespace.clone(),
            id: key.name.clone(),
            reason,
        };
        let given = secret_sha256.to_ascii_lowercase();
        for attempt in 0..CONSUME_ATTEMPTS {
            let Some(old) = self.token_fresh_or_cached(key, attempt > 0).await? else {
                return Err(unusable(
                    "does not exist: check the token id, or create a new one with gangplank token create"
                        .into(),
                ));
            };
            check_token(&old, key, &given, now).map_err(|r| match r {
                Check::Unusable(reason) => unusable(reason),
                Check::Invalid(e) => e,
            })?;
            let mut new = old.clone();
            new.status.used += 1;
            let mut body = serde_json::to_value(&new)
                .map_err(|e| Error::Backend(format!("encoding JoinToken {key}: {e}")))?;
            body["apiVersion"] = json!(JoinToken::API_VERSION);
            body["kind"] = json!(JoinToken::KIND);
            let obj: DynamicObject = serde_json::from_value(body)
                .map_err(|e| Error::Backend(format!("encoding JoinToken {key}: {e}")))?;
            match self
                .tokens_in(&key.namespace)
                .replace_status(&key.name, &PostParams::default(), &obj)
                .await
            {
                Ok(stored) => return decode(&stored, JoinToken::KIND, key),
                // Someone else used it (or changed it) meanwhile: try again on the fresh object.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(unusable(
                        "was deleted: create a new one with gangplank token create".into(),
                    ));
                }
                Err(e) => return Err(api_error(e, JoinToken::KIND, key, "using")),
            }
        }
        Err(Error::Conflict {
            kind: JoinToken::KIND,
            key: key.clone(),
            detail: format!("{CONSUME_ATTEMPTS} concurrent uses in a row: retry the onboarding"),
        })
    }

    async fn binding(&self, key: &NamespacedName) -> Result<Option<WorkloadBinding>> {
        get_fresh(self.bindings_in(&key.namespace), key).await
    }

    /// From the watch-backed cache: no API call.
    async fn bindings(&self) -> Result<Vec<WorkloadBinding>> {
        let mut out: Vec<WorkloadBinding> = self
            .bound
            .state()
            .iter()
            .map(|o| decode(o, WorkloadBinding::KIND, &key_of(o)))
            .collect::<Result<_>>()?;
        out.sort_by_key(Resource::key);
        Ok(out)
    }

    async fn apply_binding(&self, binding: &WorkloadBinding) -> Result<WorkloadBinding> {
        let key = binding.key();
        let body = applied(binding, WorkloadBinding::API_VERSION, &self.entries.api_version)?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let stored = self
            .bindings_in(&key.namespace)
            .patch(&key.name, &params, &Patch::Apply(&body))
            .await
            .map_err(|e| api_error(e, WorkloadBinding::KIND, &key, "applying"))?;
        decode(&stored, WorkloadBinding::KIND, &key)
    }

    async fn delete_binding(&self, key: &NamespacedName) -> Result<bool> {
        delete_from::<WorkloadBinding>(self.bindings_in(&key.namespace), key).await
    }

    fn entry_removals(&self) -> tokio::sync::broadcast::Receiver<NamespacedName> {
        self.removals.subscribe()
    }
}

enum Check {
    Unusable(String),
    Invalid(Error),
}

/// Whether `token` may be used now with a secret hashing to `given`; the secret is compared
/// first and in constant time, so nothing about the token leaks to a caller without it.
fn check_token(
    token: &JoinToken,
    key: &NamespacedName,
    given: &str,
    now: OffsetDateTime,
) -> Result<(), Check> {
    let stored = token.spec.secret_sha256.to_ascii_lowercase();
    if stored.len() != 64 || !stored.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Check::Invalid(Error::Invalid {
            path: format!("JoinToken {key}"),
            message:
                "spec.secretSha256 must be 64 hex digits: recreate the token with gangplank token create"
                    .into(),
        }));
    }
    if !bool::from(stored.as_bytes().ct_eq(given.as_bytes())) {
        return Err(Check::Unusable(
            "does not match: check that the whole token <id>.<secret> was copied".into(),
        ));
    }
    let expires_at = OffsetDateTime::parse(&token.spec.expires_at, &Rfc3339).map_err(|e| {
        Check::Invalid(Error::Invalid {
            path: format!("JoinToken {key}"),
            message: format!(
                "spec.expiresAt {:?} is not an RFC 3339 time ({e}): recreate the token with gangplank token create",
                token.spec.expires_at
            ),
        })
    })?;
    if now >= expires_at {
        return Err(Check::Unusable(format!(
            "expired at {}: create a new one with gangplank token create",
            token.spec.expires_at
        )));
    }
    if token.status.used >= token.spec.uses {
        return Err(Check::Unusable(format!(
            "has no uses left (used {} of {}): create a new one with gangplank token create",
            token.status.used, token.spec.uses
        )));
    }
    Ok(())
}
