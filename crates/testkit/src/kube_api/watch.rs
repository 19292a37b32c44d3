//! Watch: replay from a resource version, bookmarks and live events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::select::Filter;
use super::status::ApiError;
use super::store::{Event, EventType, Shared, Target, served_as};

pub(super) fn watch(shared: Arc<Shared>, t: Target, query: HashMap<String, String>) -> Response {
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

pub(super) fn futures_stream(
    rx: mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// The watch event for `e` as seen through `filter`, if any.
pub(super) fn event_line(filter: &Filter, t: &Target, e: &Event) -> Option<Value> {
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
