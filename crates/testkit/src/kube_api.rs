//! A Kubernetes API server **test double**: plain HTTP on `127.0.0.1:0` that kube-rs talks to
//! unchanged, keeping real semantics for what Gangplank uses.
//!
//! Served:
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`;
//! - built-in kinds: ConfigMap, Secret, ServiceAccount (with the `token` subresource, i.e.
//!   TokenRequest), Service, Namespace, Lease and CustomResourceDefinition; creating a CRD
//!   serves its kind at once (status `Established`), deleting it removes the kind and its
//!   objects;
//! - for every kind: namespaced and cluster-wide get, list and watch, create, update (409 when
//!   `metadata.resourceVersion` is stale), merge patch (`application/merge-patch+json`; a
//!   strategic merge patch is treated as one), server-side apply, delete (with
//!   `preconditions.resourceVersion`), `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists,
//!   `!`), `fieldSelector` on `metadata.name`/`metadata.namespace`, the `status` subresource when
//!   the CRD declares it (writes to the object keep the status, writes to `/status` change only
//!   the status), `generation` bumped on spec changes;
//! - 422 (`Invalid`, one cause per violation) for a custom resource that breaks its CRD's
//!   schema, checked with [`crate::crd::Schema`];
//! - watch: replay from `resourceVersion` (410 `Expired` once compacted), initial `ADDED`
//!   events without one, `BOOKMARK`s when `allowWatchBookmarks` is set (after the replay and
//!   then every [`Server::set_bookmark_interval`]), label-selector transitions reported as
//!   `ADDED`/`DELETED`, `timeoutSeconds` honoured;
//! - garbage collection: deleting an object deletes, at once, every object whose
//!   `ownerReferences` name it by uid and have no other live owner (the API server does this
//!   in the background); deleting a Namespace deletes everything in it.
//!
//! Server-side apply, documented simplification: there are no `managedFields`. The server keeps,
//! per object and field manager, the configuration it last applied; a new apply first removes
//! the fields that the previous configuration of the same manager had and the new one lacks,
//! then merges the new configuration in (maps merge by key, lists are replaced whole). Every
//! apply is treated as forced (no conflicts between managers). A `metadata.resourceVersion` in
//! the applied configuration is a precondition, as in Kubernetes.
//!
//! Namespaces need not exist before objects are created in them. There is no authentication or
//! authorisation. Every successful write request is recorded ([`Server::writes`]) so tests can
//! count API writes; garbage-collection deletes are not requests and are not recorded. Read
//! requests are recorded too ([`Server::reads`]), so tests can show what is served from a cache.
//!
//! TokenRequest (`POST .../serviceaccounts/<sa>/token`) needs the ServiceAccount to exist and
//! returns an ES256 JWT signed by the stand-in ([`Server::token_key`]), with the requested
//! `audiences` and `expirationSeconds` (default 3600, at least 600), `sub`
//! `system:serviceaccount:<ns>:<sa>` and the `kubernetes.io` claim.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::crd::Schema;
use crate::oidc::Key;

/// The issuer (`iss`) of the ServiceAccount tokens the stand-in mints.
pub const TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// How many events the watch history keeps by default before older resource versions expire
/// (410).
const HISTORY: usize = 4096;

/// What can go wrong starting or setting up the stand-in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener or a temporary file could not be set up.
    #[error("kube API stand-in: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An object given to a setup method was refused, as the API would refuse it.
    #[error("kube API stand-in refused {what}: {message}")]
    Refused {
        /// The object.
        what: String,
        /// The API's message.
        message: String,
    },
    /// The token signing key could not be generated.
    #[error("kube API stand-in: generating the ServiceAccount token key: {0}")]
    Key(String),
}

/// One successful write request, as recorded by [`Server::writes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// `create`, `update`, `patch`, `apply` or `delete`.
    pub verb: &'static str,
    /// The resource's plural, e.g. `workloadentries`.
    pub resource: String,
    /// The subresource, e.g. `status` or `token`.
    pub subresource: Option<String>,
    /// The namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

/// One read request (`get`, `list` or `watch`), as recorded by [`Server::reads`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// `get`, `list` or `watch`.
    pub verb: &'static str,
    /// The resource's plural, e.g. `configmaps`.
    pub resource: String,
    /// The namespace, empty for a cluster-wide request.
    pub namespace: String,
    /// The object's name; empty for `list` and `watch`.
    pub name: String,
}

/// A running stand-in API server. Stops when dropped.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Starts a stand-in with only the built-in kinds.
    pub async fn start() -> Result<Self, Error> {
        let key = Key::generate(Algorithm::ES256, "sa-key-1").map_err(|e| Error::Key(e.to_string()))?;
        let schemas = tempfile::tempdir().map_err(|source| Error::Io {
            context: "creating a folder for CRD schemas".into(),
            source,
        })?;
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(Store::new()),
            events,
            key,
            schemas,
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
        });
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| Error::Io {
                context: "binding 127.0.0.1:0".into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            context: "reading the listener's address".into(),
            source,
        })?;
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            // The server runs until the task is aborted; a failing accept loop ends it.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The server's URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) whose current context points at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
             users:\n- name: stand-in\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    \
             cluster: stand-in\n    user: stand-in\n    namespace: default\ncurrent-context: stand-in\n",
            self.url()
        )
    }

    /// Writes [`Server::kubeconfig`] to `<dir>/kubeconfig` and returns the path.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf, Error> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig()).map_err(|source| Error::Io {
            context: format!("writing {}", path.display()),
            source,
        })?;
        Ok(path)
    }

    /// Installs a CustomResourceDefinition (as `kubectl apply` would; not recorded as a write).
    pub fn install_crd(&self, crd: &Value) -> Result<(), Error> {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        self.seed(crd.clone()).map(drop).map_err(|e| Error::Refused {
            what: format!("CustomResourceDefinition {name}"),
            message: e.message,
        })
    }

    /// Installs Istio's WorkloadEntry and WorkloadGroup CRDs from [`crate::crd::istio_crds_path`],
    /// serving only `versions` (e.g. `["v1beta1"]` for a cluster without `v1`).
    pub fn install_istio_crds(&self, versions: &[&str]) -> Result<(), Error> {
        let path = crate::crd::istio_crds_path();
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        for doc in text.split("\n---") {
            if !(doc.contains("kind: WorkloadEntry") || doc.contains("kind: WorkloadGroup")) {
                continue;
            }
            let mut crd: Value = serde_saphyr::from_str(doc).map_err(|e| Error::Refused {
                what: path.display().to_string(),
                message: e.to_string(),
            })?;
            if crd["kind"] != "CustomResourceDefinition" {
                continue;
            }
            if let Some(vs) = crd["spec"]["versions"].as_array_mut() {
                vs.retain(|v| v["name"].as_str().is_some_and(|n| versions.contains(&n)));
                for v in vs.iter_mut() {
                    v["storage"] = json!(false);
                }
                if let Some(first) = vs.first_mut() {
                    first["storage"] = json!(true);
                }
            }
            self.install_crd(&crd)?;
        }
        Ok(())
    }

    /// Creates or replaces an object directly (test setup; not recorded as a write). The kind
    /// must be served; `apiVersion`, `kind` and `metadata.name` are required.
    pub fn seed(&self, object: Value) -> Result<Value, ApiError> {
        let (group, version) = split_api_version(object["apiVersion"].as_str().unwrap_or_default());
        let kind_name = object["kind"].as_str().unwrap_or_default().to_owned();
        let mut st = self.shared.lock();
        let kind = st
            .kinds
            .values()
            .find(|k| k.group == group && k.kind == kind_name && k.served(&version))
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!("kind {kind_name} in {group}/{version} is not served"))
            })?;
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let target = Target {
            kind,
            version,
            namespace,
            name: Some(name.clone()),
            sub: None,
        };
        let existing = st.get(&target, &name).cloned();
        let mut body = object;
        if let Some(old) = &existing {
            body["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        }
        let out = st.write(&self.shared, &target, body, existing.as_ref(), false)?;
        Ok(out)
    }

    /// An object as stored (served in `version`), without going through HTTP.
    pub fn object(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        st.objects
            .get(&(group.to_owned(), plural.to_owned()))
            .and_then(|m| m.get(&(namespace.to_owned(), name.to_owned())))
            .cloned()
    }

    /// Every successful write request so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.lock().writes.clone()
    }

    /// How many successful write requests touched `resource` (a plural, any subresource).
    pub fn write_count(&self, resource: &str) -> usize {
        self.shared
            .lock()
            .writes
            .iter()
            .filter(|w| w.resource == resource)
            .count()
    }

    /// Every read request so far (answered or not), in order.
    pub fn reads(&self) -> Vec<Read> {
        self.shared.lock().reads.clone()
    }

    /// Forgets the recorded writes.
    pub fn reset_writes(&self) {
        self.shared.lock().writes.clear();
    }

    /// The key that signs ServiceAccount tokens (its JWK verifies them).
    pub fn token_key(&self) -> &Key {
        &self.shared.key
    }

    /// How many events the watch history keeps (default 4096); a watch resuming from an older
    /// resource version gets 410 `Expired`.
    pub fn set_watch_history(&self, events: usize) {
        self.shared.lock().history_len = events.max(1);
    }

    /// How often a watch that allows bookmarks gets one (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = every;
    }
}

/// An API error as the stand-in returns it (a `Status` object).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, ...
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `(field, message)` causes of an `Invalid` error.
    pub causes: Vec<(String, String)>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            causes: Vec::new(),
        }
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "NotFound", message)
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    fn status(&self) -> Value {
        let causes: Vec<Value> = self
            .causes
            .iter()
            .map(
                |(field, message)| json!({"reason": "FieldValueInvalid", "field": field, "message": message}),
            )
            .collect();
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
            "details": {"causes": causes},
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.status())).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

struct Shared {
    state: Mutex<Store>,
    events: broadcast::Sender<Arc<Event>>,
    key: Key,
    schemas: tempfile::TempDir,
    bookmark_interval: Mutex<Duration>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A served kind.
#[derive(Debug, Clone)]
struct Kind {
    group: String,
    plural: String,
    singular: String,
    kind: String,
    namespaced: bool,
    /// Served versions, in the CRD's order.
    versions: Vec<String>,
    status_subresource: bool,
    /// Schemas by version (custom resources only).
    schemas: HashMap<String, Schema>,
}

impl Kind {
    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool, status: bool) -> Self {
        Self {
            group: group.into(),
            plural: plural.into(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.into(),
            namespaced,
            versions: vec![version.into()],
            status_subresource: status,
            schemas: HashMap::new(),
        }
    }
    fn served(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }
    fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
struct Event {
    rv: u64,
    group: String,
    plural: String,
    ty: EventType,
    old: Option<Value>,
    new: Value,
}

type ObjKey = (String, String);

struct Store {
    rv: u64,
    uid: u64,
    kinds: BTreeMap<ObjKey, Kind>,
    objects: BTreeMap<ObjKey, BTreeMap<ObjKey, Value>>,
    /// Last applied configuration per (group, plural, namespace, name, manager, subresource).
    applied: HashMap<(String, String, String, String, String, bool), Value>,
    history: VecDeque<Arc<Event>>,
    /// Lowest resource version a watch can resume from.
    floor: u64,
    /// How many events `history` keeps.
    history_len: usize,
    writes: Vec<Write>,
    reads: Vec<Read>,
}

struct Target {
    kind: Kind,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    fn ns(&self) -> String {
        self.namespace.clone().unwrap_or_default()
    }
    fn what(&self, name: &str) -> String {
        if self.kind.group.is_empty() {
            format!("{} \"{name}\"", self.kind.plural)
        } else {
            format!("{}.{} \"{name}\"", self.kind.plural, self.kind.group)
        }
    }
}

impl Store {
    fn new() -> Self {
        let mut kinds = BTreeMap::new();
        for k in [
            Kind::builtin("", "v1", "configmaps", "ConfigMap", true, false),
            Kind::builtin("", "v1", "secrets", "Secret", true, false),
            Kind::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false),
            Kind::builtin("", "v1", "services", "Service", true, true),
            Kind::builtin("", "v1", "namespaces", "Namespace", false, true),
            Kind::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
            Kind::builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                true,
            ),
        ] {
            kinds.insert((k.group.clone(), k.plural.clone()), k);
        }
        Self {
            rv: 1,
            uid: 0,
            kinds,
            objects: BTreeMap::new(),
            applied: HashMap::new(),
            history: VecDeque::new(),
            floor: 1,
            history_len: HISTORY,
            writes: Vec::new(),
            reads: Vec::new(),
        }
    }

    fn get(&self, t: &Target, name: &str) -> Option<&Value> {
        self.objects
            .get(&(t.kind.group.clone(), t.kind.plural.clone()))
            .and_then(|m| m.get(&(t.ns(), name.to_owned())))
    }

    fn emit(
        &mut self,
        shared: &Shared,
        group: &str,
        plural: &str,
        ty: EventType,
        old: Option<Value>,
        new: Value,
    ) {
        let ev = Arc::new(Event {
            rv: self.rv,
            group: group.into(),
            plural: plural.into(),
            ty,
            old,
            new,
        });
        self.history.push_back(Arc::clone(&ev));
        while self.history.len() > self.history_len {
            if let Some(e) = self.history.pop_front() {
                self.floor = e.rv;
            }
        }
        // No receivers is fine.
        let _ = shared.events.send(ev);
    }

    /// Stores `body` as the new state of the object (create when `old` is `None`), after the
    /// API server's checks; `status_only` for writes to the `status` subresource.
    fn write(
        &mut self,
        shared: &Shared,
        t: &Target,
        mut body: Value,
        old: Option<&Value>,
        status_only: bool,
    ) -> ApiResult<Value> {
        let kind = &t.kind;
        let Some(obj) = body.as_object_mut() else {
            return Err(ApiError::bad_request("the request body must be a JSON object"));
        };
        let api_version = kind.api_version(&t.version);
        match obj.get("apiVersion").and_then(Value::as_str) {
            Some(v) if v != api_version => {
                return Err(ApiError::bad_request(format!(
                    "apiVersion {v} does not match the request's {api_version}"
                )));
            }
            _ => {}
        }
        match obj.get("kind").and_then(Value::as_str) {
            Some(k) if k != kind.kind => {
                return Err(ApiError::bad_request(format!(
                    "kind {k} does not match the request's {}",
                    kind.kind
                )));
            }
            _ => {}
        }
        obj.insert("apiVersion".into(), json!(api_version));
        obj.insert("kind".into(), json!(kind.kind));
        let meta = obj.entry("metadata").or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            return Err(ApiError::new(
                422,
                "Invalid",
                "metadata.name: Required value: name is required",
            ));
        }
        if let Some(url_name) = &t.name
            && *url_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({url_name})"
            )));
        }
        if kind.namespaced {
            let ns = t.ns();
            if ns.is_empty() {
                return Err(ApiError::bad_request(
                    "a namespace is required for a namespaced resource",
                ));
            }
            match meta.get("namespace").and_then(Value::as_str) {
                Some(n) if n != ns => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the object ({n}) does not match the namespace on the request ({ns})"
                    )));
                }
                _ => {}
            }
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        // Precondition on resourceVersion.
        if let (Some(old), Some(given)) = (old, meta.get("resourceVersion").and_then(Value::as_str))
            && !given.is_empty()
            && Some(given) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}: the object has been modified; please apply your changes to the latest version and try again",
                    t.what(&name)
                ),
            ));
        }
        meta.remove("managedFields");
        meta.remove("deletionTimestamp");
        // System fields.
        match old {
            Some(o) => {
                for f in ["uid", "creationTimestamp"] {
                    meta.insert(f.into(), o["metadata"][f].clone());
                }
            }
            None => {
                self.uid += 1;
                meta.insert(
                    "uid".into(),
                    json!(format!("00000000-0000-4000-8000-{:012x}", self.uid)),
                );
                meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
            }
        }
        if let Some(o) = old {
            if status_only {
                // Only the status changes.
                let status = obj.get("status").cloned();
                let mut merged = o.clone();
                match status {
                    Some(s) => merged["status"] = s,
                    None => {
                        if let Some(m) = merged.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                body = merged;
            } else if kind.status_subresource {
                match o.get("status") {
                    Some(s) => {
                        obj.insert("status".into(), s.clone());
                    }
                    None => {
                        obj.remove("status");
                    }
                }
            }
        } else if kind.status_subresource && kind.group != "apiextensions.k8s.io" {
            obj.remove("status");
        }
        // Generation.
        let spec_of = |v: &Value| {
            let mut v = v.clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("metadata");
                m.remove("status");
            }
            v
        };
        let generation = match old {
            None => 1,
            Some(o) => {
                let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                if spec_of(o) != spec_of(&body) { g + 1 } else { g }
            }
        };
        body["metadata"]["generation"] = json!(generation);
        if let Some(schema) = kind.schemas.get(&t.version) {
            let mut check = body.clone();
            if let Some(m) = check["metadata"].as_object_mut() {
                for f in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                    m.remove(f);
                }
            }
            if let Err(violations) = schema.validate(&check) {
                let causes: Vec<(String, String)> = violations
                    .iter()
                    .map(|v| (v.path.clone(), v.message.clone()))
                    .collect();
                let list = violations
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut e = ApiError::new(
                    422,
                    "Invalid",
                    format!("{} {:?} is invalid: {list}", kind.kind, name),
                );
                e.causes = causes;
                return Err(e);
            }
        }
        // A CRD registers its kind.
        let mut new_kind = None;
        if kind.group == "apiextensions.k8s.io" {
            let k = crd_kind(shared, &body)?;
            body["status"] = json!({
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found"},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
                ],
                "acceptedNames": body["spec"]["names"].clone(),
                "storedVersions": [k.versions.first().cloned().unwrap_or_default()],
            });
            new_kind = Some(k);
        }
        if let Some(o) = old
            && o == &body_with_rv(&body, o)
        {
            // Nothing changed: no new resource version, no event.
            return Ok(o.clone());
        }
        self.rv += 1;
        body["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if let Some(k) = new_kind {
            self.kinds.insert((k.group.clone(), k.plural.clone()), k);
        }
        self.objects
            .entry((kind.group.clone(), kind.plural.clone()))
            .or_default()
            .insert((t.ns(), name), body.clone());
        let ty = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(shared, &kind.group, &kind.plural, ty, old.cloned(), body.clone());
        Ok(body)
    }

    /// Deletes one object and, in cascade, its dependents.
    fn delete(&mut self, shared: &Shared, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let removed = self
            .objects
            .get_mut(&(group.to_owned(), plural.to_owned()))
            .and_then(|m| m.remove(&(ns.to_owned(), name.to_owned())))?;
        self.applied
            .retain(|k, _| !(k.0 == group && k.1 == plural && k.2 == ns && k.3 == name));
        self.rv += 1;
        let mut gone = removed.clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(
            shared,
            group,
            plural,
            EventType::Deleted,
            Some(removed.clone()),
            gone,
        );
        // A deleted CRD stops serving its kind and takes its objects with it.
        if group == "apiextensions.k8s.io" {
            let g = removed["spec"]["group"].as_str().unwrap_or_default().to_owned();
            let p = removed["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let keys: Vec<ObjKey> = self
                .objects
                .get(&(g.clone(), p.clone()))
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for (n, o) in keys {
                self.delete(shared, &g, &p, &n, &o);
            }
            self.kinds.remove(&(g, p));
        }
        // A deleted namespace takes everything in it.
        if group.is_empty() && plural == "namespaces" {
            let doomed: Vec<(String, String, String)> = self
                .objects
                .iter()
                .flat_map(|((g, p), m)| {
                    m.keys()
                        .filter(|(n, _)| n == name)
                        .map(|(_, o)| (g.clone(), p.clone(), o.clone()))
                        .collect::<Vec<_>>()
                })
                .collect();
            for (g, p, o) in doomed {
                self.delete(shared, &g, &p, name, &o);
            }
        }
        // Garbage collection of dependents with no other live owner.
        let uid = removed["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
        if !uid.is_empty() {
            let live: std::collections::HashSet<String> = self
                .objects
                .values()
                .flat_map(|m| m.values())
                .filter_map(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
                .collect();
            let dependents: Vec<(String, String, String, String)> = self
                .objects
                .iter()
                .flat_map(|((g, p), m)| {
                    m.iter()
                        .filter(|(_, o)| {
                            let owners = o["metadata"]["ownerReferences"].as_array();
                            let owners = owners.map(Vec::as_slice).unwrap_or_default();
                            owners.iter().any(|r| r["uid"] == uid.as_str())
                                && !owners
                                    .iter()
                                    .any(|r| r["uid"].as_str().is_some_and(|u| u != uid && live.contains(u)))
                        })
                        .map(|((n, o), _)| (g.clone(), p.clone(), n.clone(), o.clone()))
                        .collect::<Vec<_>>()
                })
                .collect();
            for (g, p, n, o) in dependents {
                self.delete(shared, &g, &p, &n, &o);
            }
        }
        Some(removed)
    }

    fn record(&mut self, verb: &'static str, t: &Target, name: &str) {
        self.writes.push(Write {
            verb,
            resource: t.kind.plural.clone(),
            subresource: t.sub.clone(),
            namespace: t.ns(),
            name: name.to_owned(),
        });
    }
}

/// `body` with `old`'s resourceVersion, to compare for "nothing changed".
fn body_with_rv(body: &Value, old: &Value) -> Value {
    let mut b = body.clone();
    b["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    b
}

/// The kind a CRD serves, with its schemas, or 422.
fn crd_kind(shared: &Shared, crd: &Value) -> ApiResult<Kind> {
    let spec = &crd["spec"];
    let invalid = |m: String| {
        ApiError::new(
            422,
            "Invalid",
            format!("CustomResourceDefinition is invalid: {m}"),
        )
    };
    let group = spec["group"]
        .as_str()
        .filter(|g| !g.is_empty())
        .ok_or_else(|| invalid("spec.group: Required value".into()))?;
    let names = &spec["names"];
    let kind = names["kind"]
        .as_str()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| invalid("spec.names.kind: Required value".into()))?;
    let plural = names["plural"]
        .as_str()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| invalid("spec.names.plural: Required value".into()))?;
    let expected = format!("{plural}.{group}");
    if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
        return Err(invalid(format!(
            "metadata.name: must be spec.names.plural+\".\"+spec.group ({expected})"
        )));
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err(invalid("spec.scope: must be Namespaced or Cluster".into())),
    };
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        return Err(invalid("spec.versions: Required value".into()));
    }
    let file = shared
        .schemas
        .path()
        .join(format!("{expected}-{}.yaml", now_nanos()));
    let text = serde_saphyr::to_string(crd).map_err(|e| invalid(format!("cannot serialise: {e}")))?;
    std::fs::write(&file, text)
        .map_err(|e| ApiError::new(500, "InternalError", format!("writing {}: {e}", file.display())))?;
    let mut schemas = HashMap::new();
    let mut served = Vec::new();
    let mut status_subresource = false;
    for v in &versions {
        let name = v["name"].as_str().unwrap_or_default().to_owned();
        if v["served"] != json!(true) {
            continue;
        }
        if v["schema"]["openAPIV3Schema"].is_null() {
            return Err(invalid(format!(
                "spec.versions[{name}].schema.openAPIV3Schema: Required value"
            )));
        }
        let schema = Schema::load(&file, group, kind, &name).map_err(|e| invalid(e.to_string()))?;
        status_subresource |= !v["subresources"]["status"].is_null();
        schemas.insert(name.clone(), schema);
        served.push(name);
    }
    Ok(Kind {
        group: group.into(),
        plural: plural.into(),
        singular: names["singular"]
            .as_str()
            .unwrap_or(&kind.to_ascii_lowercase())
            .to_owned(),
        kind: kind.into(),
        namespaced,
        versions: served,
        status_subresource,
        schemas,
    })
}

fn split_api_version(av: &str) -> (String, String) {
    match av.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), av.to_owned()),
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Kubernetes version priority: GA before beta before alpha, higher numbers first.
fn version_priority(v: &str) -> (u8, u32, u32) {
    let rest = v.strip_prefix('v').unwrap_or(v);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let major = digits.parse().unwrap_or(0);
    let tail = &rest[digits.len()..];
    let (stage, minor) = if tail.is_empty() {
        (3, 0)
    } else if let Some(n) = tail.strip_prefix("beta") {
        (2, n.parse().unwrap_or(0))
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n.parse().unwrap_or(0))
    } else {
        (0, 0)
    };
    (stage, major, minor)
}

// ---------------------------------------------------------------------------------------------
// HTTP

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, axum::Json(v.clone())).into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match route(&shared, &method, &uri, &query, &headers, &body) {
        Ok(Routed::Json(code, v)) => json_response(code, &v),
        Ok(Routed::Watch(t)) => watch(shared, t, query),
        Err(e) => e.into_response(),
    }
}

enum Routed {
    Json(StatusCode, Value),
    Watch(Target),
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Routed> {
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let ok = |v: Value| Ok(Routed::Json(StatusCode::OK, v));
    let (group, version, rest): (String, String, &[&str]) = match segs.as_slice() {
        ["version"] => {
            return ok(
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-gangplank-standin", "platform": "linux/amd64"}),
            );
        }
        ["api"] => {
            return ok(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}));
        }
        ["apis"] => return ok(group_list(&shared.lock())),
        ["apis", g] => {
            let list = group_list(&shared.lock());
            let found = list["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == *g)
                .cloned();
            return match found {
                Some(mut v) => {
                    v["kind"] = json!("APIGroup");
                    v["apiVersion"] = json!("v1");
                    ok(v)
                }
                None => Err(ApiError::not_found(format!(
                    "the server could not find the requested resource (group {g})"
                ))),
            };
        }
        ["api", v, rest @ ..] => (String::new(), (*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => ((*g).to_owned(), (*v).to_owned(), rest),
        _ => {
            return Err(ApiError::not_found(format!(
                "the server could not find the requested resource {}",
                uri.path()
            )));
        }
    };
    let st = shared.lock();
    if rest.is_empty() {
        return resource_list(&st, &group, &version).map(|v| Routed::Json(StatusCode::OK, v));
    }
    let find = |plural: &str| {
        st.kinds
            .get(&(group.clone(), plural.to_owned()))
            .filter(|k| k.served(&version))
            .cloned()
    };
    let namespaced_kind = match rest {
        ["namespaces", _, plural, ..] => find(plural).filter(|k| k.namespaced),
        _ => None,
    };
    let target = match (namespaced_kind, rest) {
        (Some(kind), ["namespaces", ns, _, tail @ ..]) if tail.len() <= 2 => Target {
            kind,
            version: version.clone(),
            namespace: Some((*ns).to_owned()),
            name: tail.first().map(|s| (*s).to_owned()),
            sub: tail.get(1).map(|s| (*s).to_owned()),
        },
        (_, [plural, tail @ ..]) if tail.len() <= 2 => {
            let kind = find(plural).ok_or_else(|| {
                ApiError::not_found(format!(
                    "the server could not find the requested resource {}",
                    uri.path()
                ))
            })?;
            if kind.namespaced && !tail.is_empty() {
                return Err(ApiError::not_found(format!(
                    "{} is namespaced: use /namespaces/<ns>/{plural}",
                    kind.kind
                )));
            }
            Target {
                kind,
                version: version.clone(),
                namespace: None,
                name: tail.first().map(|s| (*s).to_owned()),
                sub: tail.get(1).map(|s| (*s).to_owned()),
            }
        }
        _ => {
            return Err(ApiError::not_found(format!(
                "the server could not find the requested resource {}",
                uri.path()
            )));
        }
    };
    drop(st);
    match (&target.sub, target.kind.plural.as_str()) {
        (None, _) => {}
        (Some(s), _) if s == "status" && target.kind.status_subresource => {}
        (Some(s), "serviceaccounts") if s == "token" => {}
        (Some(s), _) => {
            return Err(ApiError::not_found(format!(
                "{} has no subresource {s}",
                target.kind.kind
            )));
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if method == Method::GET {
        let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        shared.lock().reads.push(Read {
            verb: match (&target.name, watching) {
                (Some(_), _) => "get",
                (None, true) => "watch",
                (None, false) => "list",
            },
            resource: target.kind.plural.clone(),
            namespace: target.ns(),
            name: target.name.clone().unwrap_or_default(),
        });
    }
    match (method.clone(), target.name.clone()) {
        (Method::GET, None) => {
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                return Ok(Routed::Watch(target));
            }
            list(shared, &target, query).map(|v| Routed::Json(StatusCode::OK, v))
        }
        (Method::GET, Some(name)) => {
            let st = shared.lock();
            let obj = st
                .get(&target, &name)
                .ok_or_else(|| ApiError::not_found(format!("{} not found", target.what(&name))))?;
            ok(served_as(obj, &target))
        }
        (Method::POST, None) => {
            let obj = parse_body(body)?;
            let mut st = shared.lock();
            let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            if st.get(&target, &name).is_some() {
                return Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} already exists", target.what(&name)),
                ));
            }
            let created = st.write(shared, &target, obj, None, false)?;
            st.record("create", &target, &name);
            Ok(Routed::Json(StatusCode::CREATED, served_as(&created, &target)))
        }
        (Method::POST, Some(name)) if target.sub.as_deref() == Some("token") => {
            let req = parse_body(body)?;
            let mut st = shared.lock();
            let sa = st
                .get(&target, &name)
                .cloned()
                .ok_or_else(|| ApiError::not_found(format!("serviceaccounts \"{name}\" not found")))?;
            let out = token_request(shared, &target, &sa, req)?;
            st.record("create", &target, &name);
            Ok(Routed::Json(StatusCode::CREATED, out))
        }
        (Method::PUT, Some(name)) => {
            let obj = parse_body(body)?;
            let mut st = shared.lock();
            let old = st
                .get(&target, &name)
                .cloned()
                .ok_or_else(|| ApiError::not_found(format!("{} not found", target.what(&name))))?;
            let status_only = target.sub.is_some();
            let out = st.write(shared, &target, obj, Some(&old), status_only)?;
            st.record("update", &target, &name);
            ok(served_as(&out, &target))
        }
        (Method::PATCH, Some(name)) => {
            let mut st = shared.lock();
            let old = st.get(&target, &name).cloned();
            let status_only = target.sub.is_some();
            let (verb, out) = match content_type.as_str() {
                "application/apply-patch+yaml" => {
                    let manager = query
                        .get("fieldManager")
                        .filter(|m| !m.is_empty())
                        .cloned()
                        .ok_or_else(|| ApiError::bad_request("fieldManager is required for apply patch"))?;
                    let cfg = parse_yaml_body(body)?;
                    if old.is_none() && status_only {
                        return Err(ApiError::not_found(format!("{} not found", target.what(&name))));
                    }
                    let out = apply(&mut st, shared, &target, &name, old.as_ref(), cfg, &manager)?;
                    ("apply", out)
                }
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    let old =
                        old.ok_or_else(|| ApiError::not_found(format!("{} not found", target.what(&name))))?;
                    let patch = parse_body(body)?;
                    let mut new = old.clone();
                    merge_patch(&mut new, &patch);
                    if patch["metadata"]["resourceVersion"].is_null() {
                        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                    }
                    new["apiVersion"] = json!(target.kind.api_version(&target.version));
                    ("patch", st.write(shared, &target, new, Some(&old), status_only)?)
                }
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the stand-in does not support patch type {other}"),
                    ));
                }
            };
            st.record(verb, &target, &name);
            ok(served_as(&out, &target))
        }
        (Method::DELETE, Some(name)) => {
            let mut st = shared.lock();
            let old = st
                .get(&target, &name)
                .cloned()
                .ok_or_else(|| ApiError::not_found(format!("{} not found", target.what(&name))))?;
            if !body.is_empty() {
                let opts = parse_body(body)?;
                if let Some(rv) = opts["preconditions"]["resourceVersion"].as_str()
                    && Some(rv) != old["metadata"]["resourceVersion"].as_str()
                {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {}: the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record",
                            target.what(&name)
                        ),
                    ));
                }
            }
            st.delete(
                shared,
                &target.kind.group,
                &target.kind.plural,
                &target.ns(),
                &name,
            );
            st.record("delete", &target, &name);
            ok(served_as(&old, &target))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not allowed on {}", uri.path()),
        )),
    }
}

fn parse_body(body: &Bytes) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))
}

fn parse_yaml_body(body: &Bytes) -> ApiResult<Value> {
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the apply body is not UTF-8"))?;
    serde_saphyr::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("the apply body is not YAML: {e}")))
}

/// The object as served in the request's version.
fn served_as(obj: &Value, t: &Target) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(t.kind.api_version(&t.version));
    o
}

fn group_list(st: &Store) -> Value {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in st.kinds.values().filter(|k| !k.group.is_empty()) {
        let vs = groups.entry(k.group.clone()).or_default();
        for v in &k.versions {
            if !vs.contains(v) {
                vs.push(v.clone());
            }
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, mut vs)| {
            vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
            let versions: Vec<Value> = vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions.first().cloned().unwrap_or(Value::Null)})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(st: &Store, group: &str, version: &str) -> ApiResult<Value> {
    let kinds: Vec<&Kind> = st
        .kinds
        .values()
        .filter(|k| k.group == group && k.served(version))
        .collect();
    if kinds.is_empty() {
        return Err(ApiError::not_found(format!(
            "the server could not find the requested resource ({group}/{version})"
        )));
    }
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let mut resources = Vec::new();
    for k in kinds {
        resources.push(json!({"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind, "verbs": verbs}));
        if k.status_subresource {
            resources.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}));
        }
        if k.plural == "serviceaccounts" {
            resources.push(json!({"name": "serviceaccounts/token", "singularName": "", "namespaced": true, "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}));
        }
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Ok(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Clone)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

fn parse_label_selector(s: &str) -> ApiResult<Vec<Req>> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    terms.push(cur);
    let mut out = Vec::new();
    for t in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let set = |rest: &str| -> ApiResult<Vec<String>> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("unable to parse requirement {t:?}: expected (values)"))
                })?;
            Ok(inner
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect())
        };
        if let Some(k) = t.strip_prefix('!') {
            out.push(Req::NotExists(k.trim().to_owned()));
        } else if let Some((k, rest)) = t.split_once(" notin ") {
            out.push(Req::NotIn(k.trim().to_owned(), set(rest)?));
        } else if let Some((k, rest)) = t.split_once(" in ") {
            out.push(Req::In(k.trim().to_owned(), set(rest)?));
        } else if let Some((k, v)) = t.split_once("!=") {
            out.push(Req::NotEq(k.trim().to_owned(), v.trim().to_owned()));
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            out.push(Req::Eq(k.trim().to_owned(), v.trim().to_owned()));
        } else {
            out.push(Req::Exists(t.to_owned()));
        }
    }
    Ok(out)
}

fn label_matches(reqs: &[Req], obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        Req::Eq(k, v) => get(k) == Some(v),
        Req::NotEq(k, v) => get(k) != Some(v),
        Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        Req::Exists(k) => get(k).is_some(),
        Req::NotExists(k) => get(k).is_none(),
    })
}

fn parse_field_selector(s: &str) -> ApiResult<Vec<(String, bool, String)>> {
    let mut out = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, neg, v) = if let Some((k, v)) = t.split_once("!=") {
            (k, true, v)
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            (k, false, v)
        } else {
            return Err(ApiError::bad_request(format!("invalid field selector {t:?}")));
        };
        if !matches!(k.trim(), "metadata.name" | "metadata.namespace") {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {k} (the stand-in supports metadata.name and metadata.namespace)"
            )));
        }
        out.push((k.trim().to_owned(), neg, v.trim().to_owned()));
    }
    Ok(out)
}

fn field_matches(reqs: &[(String, bool, String)], obj: &Value) -> bool {
    reqs.iter().all(|(k, neg, v)| {
        let field = k.strip_prefix("metadata.").unwrap_or(k);
        let actual = obj["metadata"][field].as_str().unwrap_or_default();
        (actual == v) != *neg
    })
}

struct Filter {
    group: String,
    plural: String,
    namespace: Option<String>,
    labels: Vec<Req>,
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    fn new(t: &Target, query: &HashMap<String, String>) -> ApiResult<Self> {
        Ok(Self {
            group: t.kind.group.clone(),
            plural: t.kind.plural.clone(),
            namespace: t.namespace.clone(),
            labels: parse_label_selector(query.get("labelSelector").map_or("", String::as_str))?,
            fields: parse_field_selector(query.get("fieldSelector").map_or("", String::as_str))?,
        })
    }
    fn matches(&self, obj: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && label_matches(&self.labels, obj)
            && field_matches(&self.fields, obj)
    }
}

fn list(shared: &Shared, t: &Target, query: &HashMap<String, String>) -> ApiResult<Value> {
    let filter = Filter::new(t, query)?;
    let st = shared.lock();
    let items: Vec<Value> = st
        .objects
        .get(&(t.kind.group.clone(), t.kind.plural.clone()))
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|o| filter.matches(o))
        .map(|o| served_as(o, t))
        .collect();
    Ok(json!({
        "kind": format!("{}List", t.kind.kind),
        "apiVersion": t.kind.api_version(&t.version),
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    }))
}

// ---------------------------------------------------------------------------------------------
// Watch

fn watch(shared: Arc<Shared>, t: Target, query: HashMap<String, String>) -> Response {
    let filter = match Filter::new(&t, &query) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let from: Option<u64> = query
        .get("resourceVersion")
        .filter(|s| !s.is_empty() && *s != "0")
        .and_then(|s| s.parse().ok());
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (backlog, mut live, current, expired) = {
        let st = shared.lock();
        let live = shared.events.subscribe();
        match from {
            Some(rv) if rv < st.floor => (Vec::new(), live, st.rv, true),
            Some(rv) => {
                let mut out = Vec::new();
                for e in st.history.iter().filter(|e| e.rv > rv) {
                    if let Some(line) = event_line(&filter, &t, e) {
                        out.push(line);
                    }
                }
                (out, live, st.rv, false)
            }
            None => {
                let out = st
                    .objects
                    .get(&(t.kind.group.clone(), t.kind.plural.clone()))
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|o| filter.matches(o))
                    .map(|o| json!({"type": "ADDED", "object": served_as(o, &t)}))
                    .collect();
                (out, live, st.rv, false)
            }
        }
    };
    let interval = *shared
        .bookmark_interval
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                let mut line = v.to_string().into_bytes();
                line.push(b'\n');
                tx.send(Bytes::from(line)).await.is_ok()
            }
        };
        if expired {
            let status = ApiError::new(410, "Expired", "too old resource version").status();
            let _ = send(json!({"type": "ERROR", "object": status})).await;
            return;
        }
        for line in backlog {
            if !send(line).await {
                return;
            }
        }
        let mut last = current;
        let bookmark = |rv: u64| json!({"type": "BOOKMARK", "object": {"kind": t.kind.kind, "apiVersion": t.kind.api_version(&t.version), "metadata": {"resourceVersion": rv.to_string()}}});
        if bookmarks && !send(bookmark(last)).await {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    Ok(e) => {
                        if e.rv <= last {
                            continue;
                        }
                        last = e.rv;
                        if let Some(line) = event_line(&filter, &t, &e)
                            && !send(line).await
                        {
                            return;
                        }
                    }
                    // Lagged or closed: end the watch; the client resumes from its last version.
                    Err(_) => return,
                },
                () = tokio::time::sleep(interval), if bookmarks => {
                    if !send(bookmark(last)).await {
                        return;
                    }
                }
                () = &mut deadline => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream = futures_stream(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| ApiError::new(500, "InternalError", e.to_string()).into_response())
}

fn futures_stream(rx: mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// The watch event for `e` as seen through `filter`, if any.
fn event_line(filter: &Filter, t: &Target, e: &Event) -> Option<Value> {
    if e.group != filter.group || e.plural != filter.plural {
        return None;
    }
    let was = e.old.as_ref().is_some_and(|o| filter.matches(o));
    let is = filter.matches(&e.new);
    let ty = match (e.ty, was, is) {
        (EventType::Deleted, true, _) => "DELETED",
        (EventType::Deleted, false, _) => return None,
        (EventType::Added, _, true) => "ADDED",
        (EventType::Modified, true, true) => "MODIFIED",
        (EventType::Modified, false, true) => "ADDED",
        (EventType::Modified, true, false) => "DELETED",
        _ => return None,
    };
    Some(json!({"type": ty, "object": served_as(&e.new, t)}))
}

// ---------------------------------------------------------------------------------------------
// Patches

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Removes from `base` what `prev` set and `cfg` no longer sets.
fn prune(base: &mut Map<String, Value>, prev: &Map<String, Value>, cfg: &Map<String, Value>) {
    for (k, pv) in prev {
        match cfg.get(k) {
            None => {
                base.remove(k);
            }
            Some(cv) => {
                if let (Some(pm), Some(cm), Some(Value::Object(bm))) =
                    (pv.as_object(), cv.as_object(), base.get_mut(k))
                {
                    prune(bm, pm, cm);
                }
            }
        }
    }
}

/// Server-side apply, without managedFields (see the module docs).
fn apply(
    st: &mut Store,
    shared: &Shared,
    t: &Target,
    name: &str,
    old: Option<&Value>,
    cfg: Value,
    manager: &str,
) -> ApiResult<Value> {
    let status_only = t.sub.is_some();
    let Value::Object(cfg) = cfg else {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object",
        ));
    };
    let precondition = cfg
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    // The fields the manager owns: everything it sent except identity and system fields.
    let mut owned = cfg.clone();
    for f in ["apiVersion", "kind"] {
        owned.remove(f);
    }
    if let Some(Value::Object(m)) = owned.get_mut("metadata") {
        for f in [
            "name",
            "namespace",
            "resourceVersion",
            "uid",
            "generation",
            "creationTimestamp",
            "managedFields",
        ] {
            m.remove(f);
        }
    }
    if status_only {
        owned.retain(|k, _| k == "status");
    } else if t.kind.status_subresource {
        owned.remove("status");
    }
    let key = (
        t.kind.group.clone(),
        t.kind.plural.clone(),
        t.ns(),
        name.to_owned(),
        manager.to_owned(),
        status_only,
    );
    let mut base = match old {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    };
    if let Some(prev) = st.applied.get(&key).and_then(Value::as_object) {
        prune(&mut base, prev, &owned);
    }
    let mut merged = Value::Object(base);
    merge_patch(&mut merged, &Value::Object(owned.clone()));
    merged["apiVersion"] = json!(t.kind.api_version(&t.version));
    merged["kind"] = json!(t.kind.kind);
    merged["metadata"]["name"] = json!(name);
    merged["metadata"]["resourceVersion"] = match (&precondition, old) {
        (Some(rv), _) => json!(rv),
        (None, Some(o)) => o["metadata"]["resourceVersion"].clone(),
        (None, None) => Value::Null,
    };
    if merged["metadata"]["resourceVersion"].is_null()
        && let Some(m) = merged["metadata"].as_object_mut()
    {
        m.remove("resourceVersion");
    }
    let out = st.write(shared, t, merged, old, status_only)?;
    st.applied.insert(key, Value::Object(owned));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// TokenRequest

fn token_request(shared: &Shared, t: &Target, sa: &Value, req: Value) -> ApiResult<Value> {
    let spec = &req["spec"];
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => vec![TOKEN_ISSUER.to_owned()],
    };
    let seconds = spec["expirationSeconds"].as_i64().unwrap_or(3600);
    if seconds < 600 {
        let mut e = ApiError::new(
            422,
            "Invalid",
            "TokenRequest.authentication.k8s.io is invalid: spec.expirationSeconds: may not specify a duration less than 10 minutes",
        );
        e.causes.push((
            "spec.expirationSeconds".into(),
            "may not specify a duration less than 10 minutes".into(),
        ));
        return Err(e);
    }
    let ns = t.ns();
    let name = sa["metadata"]["name"].as_str().unwrap_or_default();
    let uid = sa["metadata"]["uid"].as_str().unwrap_or_default();
    let now = time::OffsetDateTime::now_utc();
    let exp = now + time::Duration::seconds(seconds);
    let claims = json!({
        "iss": TOKEN_ISSUER,
        "sub": format!("system:serviceaccount:{ns}:{name}"),
        "aud": audiences,
        "iat": now.unix_timestamp(),
        "nbf": now.unix_timestamp(),
        "exp": exp.unix_timestamp(),
        "jti": format!("{:032x}", now_nanos()),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": name, "uid": uid}},
    });
    let token = shared.key.sign(&claims);
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": null},
        "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": null},
        "status": {"token": token, "expirationTimestamp": rfc3339(exp)},
    }))
}
