//! HTTP: one handler that routes every path and verb to the store.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::apply::{apply, merge_patch};
use super::discovery::{group_list, resource_list};
use super::names::generate;
use super::record::Read;
use super::select::list;
use super::status::{ApiError, ApiResult};
use super::store::{Shared, Target, served_as};
use super::token::token_request;
use super::watch::watch;

pub(super) fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, axum::Json(v.clone())).into_response()
}

pub(super) async fn handle(
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

pub(super) enum Routed {
    Json(StatusCode, Value),
    Watch(Target),
}

pub(super) fn route(
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
            let mut obj = parse_body(body)?;
            let mut st = shared.lock();
            let mut name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let prefix = obj["metadata"]["generateName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if name.is_empty()
                && !prefix.is_empty()
                && let Some(meta) = obj["metadata"].as_object_mut()
            {
                // A few tries past names taken, as the API server retries a generated name.
                for _ in 0..8 {
                    name = generate(&prefix);
                    if st.get(&target, &name).is_none() {
                        break;
                    }
                }
                meta.insert("name".into(), json!(name));
            }
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
                "application/json-patch+json" => {
                    let old =
                        old.ok_or_else(|| ApiError::not_found(format!("{} not found", target.what(&name))))?;
                    let patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
                        ApiError::bad_request(format!("the request body is not a JSON patch: {e}"))
                    })?;
                    let mut new = old.clone();
                    // As the API server's json-patch: `test` of a missing path against null passes.
                    let patch = json_patch::Patch(
                        patch
                            .0
                            .into_iter()
                            .filter(|op| match op {
                                json_patch::PatchOperation::Test(t) => {
                                    !(t.value.is_null() && old.pointer(t.path.as_str()).is_none())
                                }
                                _ => true,
                            })
                            .collect(),
                    );
                    // A failed `test` (or a path that does not exist) refuses the whole patch.
                    json_patch::patch(&mut new, &patch).map_err(|e| {
                        ApiError::new(
                            422,
                            "Invalid",
                            format!("the server rejected our request due to an error in our request: {e}"),
                        )
                    })?;
                    if new["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"] {
                        // Not a precondition unless the patch changed it.
                        new["metadata"]["resourceVersion"] = Value::Null;
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
            let out = st
                .delete(
                    shared,
                    &target.kind.group,
                    &target.kind.plural,
                    &target.ns(),
                    &name,
                )
                .unwrap_or(old);
            st.record("delete", &target, &name);
            ok(served_as(&out, &target))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not allowed on {}", uri.path()),
        )),
    }
}

pub(super) fn parse_body(body: &Bytes) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))
}

pub(super) fn parse_yaml_body(body: &Bytes) -> ApiResult<Value> {
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the apply body is not UTF-8"))?;
    serde_saphyr::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("the apply body is not YAML: {e}")))
}
