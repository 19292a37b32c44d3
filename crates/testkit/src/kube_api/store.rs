//! The object store: resource versions, the event history watches replay, writes with the
//! API server's checks, and deletes with garbage collection.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::kinds::{Kind, crd_kind};
use super::names;
use super::record::{Read, Write};
use super::status::{ApiError, ApiResult, Cause};
use crate::oidc::Key;

/// How many events the watch history keeps by default before older resource versions expire
/// (410).
pub(super) const HISTORY: usize = 4096;

pub(super) struct Shared {
    pub(super) state: Mutex<Store>,
    pub(super) events: broadcast::Sender<Arc<Event>>,
    pub(super) key: Key,
    pub(super) schemas: tempfile::TempDir,
    pub(super) bookmark_interval: Mutex<Duration>,
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
pub(super) struct Event {
    pub(super) rv: u64,
    pub(super) group: String,
    pub(super) plural: String,
    pub(super) ty: EventType,
    pub(super) old: Option<Value>,
    pub(super) new: Value,
}

pub(super) type ObjKey = (String, String);

pub(super) struct Store {
    pub(super) rv: u64,
    pub(super) uid: u64,
    pub(super) kinds: BTreeMap<ObjKey, Kind>,
    pub(super) objects: BTreeMap<ObjKey, BTreeMap<ObjKey, Value>>,
    /// Last applied configuration per (group, plural, namespace, name, manager, subresource).
    pub(super) applied: HashMap<(String, String, String, String, String, bool), Value>,
    pub(super) history: VecDeque<Arc<Event>>,
    /// Lowest resource version a watch can resume from.
    pub(super) floor: u64,
    /// How many events `history` keeps.
    pub(super) history_len: usize,
    pub(super) writes: Vec<Write>,
    pub(super) reads: Vec<Read>,
}

pub(super) struct Target {
    pub(super) kind: Kind,
    pub(super) version: String,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) sub: Option<String>,
}

impl Target {
    pub(super) fn ns(&self) -> String {
        self.namespace.clone().unwrap_or_default()
    }
    pub(super) fn what(&self, name: &str) -> String {
        if self.kind.group.is_empty() {
            format!("{} \"{name}\"", self.kind.plural)
        } else {
            format!("{}.{} \"{name}\"", self.kind.plural, self.kind.group)
        }
    }
}

/// The object as served in the request's version.
pub(super) fn served_as(obj: &Value, t: &Target) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(t.kind.api_version(&t.version));
    o
}

impl Store {
    pub(super) fn new() -> Self {
        let mut kinds = BTreeMap::new();
        for k in [
            Kind::builtin("", "v1", "configmaps", "ConfigMap", true, false),
            Kind::builtin("", "v1", "secrets", "Secret", true, false),
            Kind::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false),
            Kind::builtin("", "v1", "services", "Service", true, true),
            Kind::builtin("", "v1", "namespaces", "Namespace", false, true),
            Kind::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
            Kind::builtin("apps", "v1", "deployments", "Deployment", true, true),
            Kind::builtin(
                "policy",
                "v1",
                "poddisruptionbudgets",
                "PodDisruptionBudget",
                true,
                true,
            ),
            Kind::builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", true, false),
            Kind::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "rolebindings",
                "RoleBinding",
                true,
                false,
            ),
            Kind::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "ClusterRole",
                false,
                false,
            ),
            Kind::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                "ClusterRoleBinding",
                false,
                false,
            ),
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

    pub(super) fn get(&self, t: &Target, name: &str) -> Option<&Value> {
        self.objects
            .get(&(t.kind.group.clone(), t.kind.plural.clone()))
            .and_then(|m| m.get(&(t.ns(), name.to_owned())))
    }

    pub(super) fn emit(
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
    pub(super) fn write(
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
        // A Secret's write-only `stringData` is merged into `data` (base64), winning over it,
        // and never stored or served, as the API server does.
        if kind.group.is_empty()
            && kind.plural == "secrets"
            && let Some(Value::Object(strings)) = obj.remove("stringData")
        {
            use base64::Engine;
            let data = obj.entry("data").or_insert_with(|| json!({}));
            if let Some(data) = data.as_object_mut() {
                for (k, v) in strings {
                    let text = v.as_str().unwrap_or_default();
                    data.insert(k, json!(base64::engine::general_purpose::STANDARD.encode(text)));
                }
            }
        }
        let meta = obj.entry("metadata").or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
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
        let invalid = names::validate(kind, meta);
        if !invalid.is_empty() {
            return Err(ApiError::invalid(&kind.group, &kind.kind, &name, &invalid));
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
        // Only a delete sets deletionTimestamp; no write sets or clears it.
        meta.remove("deletionTimestamp");
        if let Some(ts) = old.and_then(|o| o["metadata"].get("deletionTimestamp")) {
            meta.insert("deletionTimestamp".into(), ts.clone());
        }
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
                let list = violations
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                // The violations are worded by the schema checker, not as field errors.
                let mut e = ApiError::invalid(&kind.group, &kind.kind, &name, &[]);
                e.message = format!("{}: {list}", e.message);
                e.causes = violations
                    .iter()
                    .map(|v| Cause {
                        reason: "FieldValueInvalid",
                        field: v.path.clone(),
                        message: v.message.clone(),
                    })
                    .collect();
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
            .insert((t.ns(), name.clone()), body.clone());
        let ty = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(shared, &kind.group, &kind.plural, ty, old.cloned(), body.clone());
        // The write that removes the last finalizer of an object being deleted deletes it.
        if !body["metadata"]["deletionTimestamp"].is_null() && finalizers(&body).is_empty() {
            self.delete(shared, &kind.group, &kind.plural, &t.ns(), &name);
        }
        Ok(body)
    }

    /// Deletes one object and, in cascade, its dependents.
    pub(super) fn delete(
        &mut self,
        shared: &Shared,
        group: &str,
        plural: &str,
        ns: &str,
        name: &str,
    ) -> Option<Value> {
        let key = (group.to_owned(), plural.to_owned());
        let obj_key = (ns.to_owned(), name.to_owned());
        let current = self.objects.get(&key).and_then(|m| m.get(&obj_key))?.clone();
        // An object with finalizers is only marked (deletionTimestamp, once); the write that
        // removes its last finalizer deletes it, as in Kubernetes.
        if !finalizers(&current).is_empty() {
            if !current["metadata"]["deletionTimestamp"].is_null() {
                return Some(current);
            }
            let mut marked = current.clone();
            self.rv += 1;
            marked["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            marked["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            if let Some(m) = self.objects.get_mut(&key) {
                m.insert(obj_key, marked.clone());
            }
            self.emit(
                shared,
                group,
                plural,
                EventType::Modified,
                Some(current),
                marked.clone(),
            );
            return Some(marked);
        }
        let removed = self.objects.get_mut(&key).and_then(|m| m.remove(&obj_key))?;
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
}

/// `metadata.finalizers`.
fn finalizers(obj: &Value) -> &[Value] {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// `body` with `old`'s resourceVersion, to compare for "nothing changed".
pub(super) fn body_with_rv(body: &Value, old: &Value) -> Value {
    let mut b = body.clone();
    b["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    b
}

pub(super) fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

pub(super) fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub(super) fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
