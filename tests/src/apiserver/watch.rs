//! WATCH in the API-server double: the initial events, the history replay, and the change
//! fan-out to open watches.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Body, Change, Shared, Watch, bad_request, expired};

pub(super) fn watch(
    shared: &Arc<Shared>,
    conn: u64,
    ty: usize,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let mut st = shared.lock();
    let (labels, fields) = match st.selectors(ty, query) {
        Ok(s) => s,
        Err(e) => return bad_request(&e),
    };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let deadline = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let (tx, rx) = mpsc::unbounded_channel();
    let w = Watch {
        conn,
        ty,
        namespace: namespace.map(str::to_owned),
        labels,
        fields,
        bookmarks,
        tx,
    };
    let from = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0");
    match from {
        Some(v) => {
            let Ok(from) = v.parse::<u64>() else {
                return bad_request(&format!("invalid resource version {v:?}"));
            };
            if from < st.compacted {
                let line = json!({"type": "ERROR", "object": expired(&format!(
                    "too old resource version: {from} ({})", st.compacted + 1))});
                let _ = w.tx.send(Bytes::from(format!("{line}\n")));
            } else {
                for ch in st.history.iter().filter(|c| c.rv > from) {
                    w.send_change(ch);
                }
                st.watches.push(w);
            }
        }
        None => {
            let current: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| k.0 == ty)
                .map(|(_, o)| o.clone())
                .collect();
            for o in current.iter().filter(|o| w.matches(o)) {
                w.send("ADDED", o);
            }
            if initial_events && bookmarks {
                let mut mark = st.bookmark_object(ty);
                mark["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                w.send("BOOKMARK", &mark);
            }
            st.watches.push(w);
        }
    }
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        let next = match deadline {
            Some(d) => tokio::time::timeout_at(d, rx.recv()).await.ok().flatten(),
            None => rx.recv().await,
        };
        next.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("a valid response")
}

impl Watch {
    pub(super) fn matches(&self, o: &Value) -> bool {
        let ns = o["metadata"]["namespace"].as_str().unwrap_or("");
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.labels.iter().all(|r| r.matches(o))
            && self.fields.iter().all(|r| r.matches(o))
    }

    pub(super) fn send(&self, kind: &str, object: &Value) {
        let line = json!({"type": kind, "object": object});
        let _ = self.tx.send(Bytes::from(format!("{line}\n")));
    }

    pub(super) fn send_change(&self, ch: &Change) {
        if ch.key.0 != self.ty {
            return;
        }
        let now = !ch.deleted && self.matches(&ch.object);
        let before = ch.previous.as_ref().is_some_and(|p| self.matches(p));
        match (before, now) {
            (false, true) => self.send("ADDED", &ch.object),
            (true, true) => self.send("MODIFIED", &ch.object),
            (true, false) if ch.deleted => self.send("DELETED", &ch.object),
            (true, false) => {
                // Left the selection: DELETED with its last matching state, at this version.
                let mut last = ch.previous.clone().unwrap_or_default();
                last["metadata"]["resourceVersion"] = json!(ch.rv.to_string());
                self.send("DELETED", &last);
            }
            (false, false) => {}
        }
    }
}
