//! JSON merge patch and server-side apply.

use serde_json::{Map, Value, json};

use super::status::{ApiError, ApiResult};
use super::store::{Shared, Store, Target};

/// RFC 7386 JSON merge patch.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
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
pub(super) fn prune(base: &mut Map<String, Value>, prev: &Map<String, Value>, cfg: &Map<String, Value>) {
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
pub(super) fn apply(
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
