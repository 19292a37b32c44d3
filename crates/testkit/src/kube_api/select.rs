//! Label and field selectors, and list.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::status::{ApiError, ApiResult};
use super::store::{Shared, Target, served_as};

#[derive(Debug, Clone)]
pub(super) enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

pub(super) fn parse_label_selector(s: &str) -> ApiResult<Vec<Req>> {
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

pub(super) fn label_matches(reqs: &[Req], obj: &Value) -> bool {
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

/// A field selector; `plural` is the resource's (Secrets also select by `type`, as the API
/// server's field label conversion allows).
pub(super) fn parse_field_selector(s: &str, plural: &str) -> ApiResult<Vec<(String, bool, String)>> {
    let mut out = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, neg, v) = if let Some((k, v)) = t.split_once("!=") {
            (k, true, v)
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            (k, false, v)
        } else {
            return Err(ApiError::bad_request(format!("invalid field selector {t:?}")));
        };
        let secret_type = plural == "secrets" && k.trim() == "type";
        if !matches!(k.trim(), "metadata.name" | "metadata.namespace") && !secret_type {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {k} (the stand-in supports metadata.name and metadata.namespace, and type for secrets)"
            )));
        }
        out.push((k.trim().to_owned(), neg, v.trim().to_owned()));
    }
    Ok(out)
}

pub(super) fn field_matches(reqs: &[(String, bool, String)], obj: &Value) -> bool {
    reqs.iter().all(|(k, neg, v)| {
        let actual = match k.strip_prefix("metadata.") {
            Some(field) => obj["metadata"][field].as_str().unwrap_or_default(),
            None => obj[k.as_str()].as_str().unwrap_or_default(),
        };
        (actual == v) != *neg
    })
}

pub(super) struct Filter {
    pub(super) group: String,
    pub(super) plural: String,
    pub(super) namespace: Option<String>,
    pub(super) labels: Vec<Req>,
    pub(super) fields: Vec<(String, bool, String)>,
}

impl Filter {
    pub(super) fn new(t: &Target, query: &HashMap<String, String>) -> ApiResult<Self> {
        Ok(Self {
            group: t.kind.group.clone(),
            plural: t.kind.plural.clone(),
            namespace: t.namespace.clone(),
            labels: parse_label_selector(query.get("labelSelector").map_or("", String::as_str))?,
            fields: parse_field_selector(
                query.get("fieldSelector").map_or("", String::as_str),
                &t.kind.plural,
            )?,
        })
    }
    pub(super) fn matches(&self, obj: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && label_matches(&self.labels, obj)
            && field_matches(&self.fields, obj)
    }
}

pub(super) fn list(shared: &Shared, t: &Target, query: &HashMap<String, String>) -> ApiResult<Value> {
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
