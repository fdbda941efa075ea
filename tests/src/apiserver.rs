//! A Kubernetes API-server double: plain HTTP/1.1 on 127.0.0.1, speaking the API as the
//! "Kubernetes API Concepts" page describes it, so the real kube-rs client (and its watcher)
//! can be tested against it. Tests change objects through a Rust API ([`ApiServer::apply`],
//! [`ApiServer::delete`]) and disturb the server through test controls
//! ([`ApiServer::compact`], [`ApiServer::cut_watches`]).
//!
//! What it does, as the real one does:
//! - resource types (built-in kinds, and CRDs once [`ApiServer::install_crd`]ed) served under
//!   `/api/v1/...` and `/apis/<group>/<version>/...`, as all-namespaces, namespaced and
//!   single-object paths; an unknown type is `404` with a `Status` (a CRD not installed);
//! - one global `resourceVersion`, bumped by every change, each change kept in a history;
//! - LIST: `{kind: <Kind>List, apiVersion, metadata: {resourceVersion, continue}, items}`,
//!   items in key order, built-in items without `kind`/`apiVersion` (CRD items keep them);
//!   `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!`), `fieldSelector`
//!   (`metadata.name`, `metadata.namespace`, and for pods `spec.nodeName`, `status.phase`,
//!   `spec.serviceAccountName`, `status.podIP`; others are `400`), `limit` + `continue`
//!   pagination on a consistent snapshot (a continue token older than the history is `410`),
//!   `resourceVersion` + `resourceVersionMatch=Exact`;
//! - WATCH (`watch=true`): chunked JSON lines `{"type", "object"}`; from `resourceVersion=N`
//!   every change after N and then live ones; without one (or `0`) synthetic `ADDED`s of the
//!   current objects first; a change that makes an object enter or leave a selector is
//!   `ADDED` / `DELETED` for that watch; `BOOKMARK`s every [`Options::bookmark_interval`]
//!   with `allowWatchBookmarks=true`; `sendInitialEvents=true` ends the synthetic events with
//!   a bookmark annotated `k8s.io/initial-events-end`; `timeoutSeconds` ends the watch; a
//!   watch from a compacted `resourceVersion` gets one `ERROR` event (`410 Expired`) and ends;
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`, answered from the tokens the test
//!   registered ([`ApiServer::add_token`]), with audiences intersected as the real
//!   authenticator does.
//!
//! - writes of one object over HTTP (`write.rs`): `PATCH` as server-side apply or JSON merge
//!   patch, `DELETE`; `GET /version` ([`ApiServer::set_version`]); a stored
//!   CustomResourceDefinition serves its kind.
//!
//! - authentication by bearer token and RBAC for service accounts, with the install's rules
//!   (`rbac.rs`; requests without a token are the tests' admin);
//! - the pod port-forward subresource over WebSocket (`portforward.rs`).
//!
//! - `POST` creates of one object, with a cluster IP for a new Service (`write.rs`); deleting
//!   an object deletes its dependents (`ownerReferences`), as the garbage collector does.
//!
//! Not done: `PUT`, collection deletes (`405`), discovery, protobuf, field ownership.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

mod parse;
mod portforward;
pub mod rbac;
mod store;
mod tokens;
mod watch;
mod write;

pub use rbac::Rbac;
pub use tokens::TokenInfo;
use watch::watch;

use parse::{
    FieldReq, LabelReq, decode_continue, encode_continue, now_rfc3339, parse_fields, parse_labels,
    parse_query,
};

type Body = BoxBody<Bytes, Infallible>;

/// Settings of the double.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_interval: Duration::from_millis(500),
        }
    }
}

/// A resource type the double serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// API group (`""` for core).
    pub group: String,
    /// Version (`v1`).
    pub version: String,
    /// Kind (`Pod`).
    pub kind: String,
    /// Plural, as in URLs (`pods`).
    pub plural: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Built in (list items lose `kind`/`apiVersion`, as the real server encodes them).
    pub builtin: bool,
}

impl ResourceType {
    fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        ResourceType {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            builtin: true,
        }
    }

    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Why [`ApiServer::apply`] refused an object.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// No `kind`/`apiVersion`, or a type the server does not serve.
    #[error("no resource type {api_version:?} {kind:?} is served (install its CRD first)")]
    UnknownType {
        /// `apiVersion` of the object.
        api_version: String,
        /// `kind` of the object.
        kind: String,
    },
    /// No `metadata.name`.
    #[error("the object has no metadata.name")]
    NoName,
}

/// The running double; stops when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for c in self.shared.lock().conns.values() {
            c.abort();
        }
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// (type index, namespace or "", name)
type Key = (usize, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    uids: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Changes at or before this version are forgotten.
    compacted: u64,
    watches: Vec<Watch>,
    conns: HashMap<u64, AbortHandle>,
    tokens: HashMap<String, TokenInfo>,
    requests: Vec<String>,
    /// Every request is answered `503` (the API server restarting).
    unavailable: bool,
    /// `/version`'s major and minor (default 1.34).
    version: Option<(String, String)>,
    /// Who may do what, for service-account tokens (`rbac.rs`).
    rbac: Rbac,
    /// The refusals (`rbac.rs`).
    denied: Vec<String>,
    /// The last cluster IP handed out (`write.rs`).
    next_ip: u32,
    /// Pods whose port-forwards go into a network namespace (`portforward.rs`).
    pod_netns: HashMap<(String, String), std::path::PathBuf>,
}

struct Change {
    rv: u64,
    key: Key,
    /// The object after the change (for a delete: the last state, with the delete's version).
    object: Value,
    /// The object before (none for a create).
    previous: Option<Value>,
    deleted: bool,
}

struct Watch {
    conn: u64,
    ty: usize,
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl ApiServer {
    /// Starts the double on an ephemeral loopback port, serving the built-in types.
    pub async fn start() -> ApiServer {
        Self::start_with(Options::default()).await
    }

    /// Starts the double with `options`.
    pub async fn start_with(options: Options) -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the API-server double");
        let addr = listener.local_addr().expect("local address");
        let state = State {
            types: vec![
                ResourceType::new("", "v1", "Namespace", "namespaces", false),
                ResourceType::new("", "v1", "Node", "nodes", false),
                ResourceType::new("", "v1", "Pod", "pods", true),
                ResourceType::new("", "v1", "Service", "services", true),
                ResourceType::new("", "v1", "ServiceAccount", "serviceaccounts", true),
                ResourceType::new("", "v1", "ConfigMap", "configmaps", true),
                ResourceType::new(
                    "discovery.k8s.io",
                    "v1",
                    "EndpointSlice",
                    "endpointslices",
                    true,
                ),
                ResourceType::new("apps", "v1", "Deployment", "deployments", true),
                ResourceType::new("apps", "v1", "DaemonSet", "daemonsets", true),
                ResourceType::new(
                    "policy",
                    "v1",
                    "PodDisruptionBudget",
                    "poddisruptionbudgets",
                    true,
                ),
                ResourceType::new(
                    "rbac.authorization.k8s.io",
                    "v1",
                    "ClusterRole",
                    "clusterroles",
                    false,
                ),
                ResourceType::new(
                    "rbac.authorization.k8s.io",
                    "v1",
                    "ClusterRoleBinding",
                    "clusterrolebindings",
                    false,
                ),
                ResourceType::new(
                    "apiextensions.k8s.io",
                    "v1",
                    "CustomResourceDefinition",
                    "customresourcedefinitions",
                    false,
                ),
            ],
            rbac: Rbac::install(),
            ..State::default()
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        let bookmarks = tokio::spawn(bookmark_loop(shared.clone(), options.bookmark_interval));
        ApiServer {
            addr,
            shared,
            tasks: vec![accept, bookmarks],
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("a valid URL");
        let mut config = kube::Config::new(url);
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("a kube client for the double")
    }

    /// Serves a CRD's type from now on.
    pub fn install_crd(&self, group: &str, version: &str, kind: &str, plural: &str) {
        let mut ty = ResourceType::new(group, version, kind, plural, true);
        ty.builtin = false;
        let mut st = self.shared.lock();
        if !st.types.contains(&ty) {
            st.types.push(ty);
        }
    }

    /// `security.istio.io/v1` AuthorizationPolicy and RequestAuthentication.
    pub fn install_istio_crds(&self) {
        self.install_crd(
            "security.istio.io",
            "v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
        );
        self.install_crd(
            "security.istio.io",
            "v1",
            "RequestAuthentication",
            "requestauthentications",
        );
    }

    /// `gateway.networking.k8s.io/v1` Gateway, HTTPRoute and GRPCRoute, and `v1beta1`
    /// ReferenceGrant.
    pub fn install_gateway_api_crds(&self) {
        let g = "gateway.networking.k8s.io";
        self.install_crd(g, "v1", "Gateway", "gateways");
        self.install_crd(g, "v1", "HTTPRoute", "httproutes");
        self.install_crd(g, "v1", "GRPCRoute", "grpcroutes");
        self.install_crd(g, "v1beta1", "ReferenceGrant", "referencegrants");
    }

    /// Creates or replaces an object (by `apiVersion`, `kind`, namespace and name) and returns
    /// its new `resourceVersion`. The server sets `resourceVersion`, `uid` (kept on update),
    /// `generation` and `creationTimestamp`; a namespaced object without a namespace goes to
    /// `default`. Applying an identical object changes nothing.
    pub fn apply(&self, object: Value) -> Result<u64, ApplyError> {
        self.shared.lock().apply(object)
    }

    /// Deletes an object, and the objects it owns (`ownerReferences`, as the garbage collector
    /// would); its deletion's `resourceVersion`, or `None` when there was none.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<u64> {
        self.shared
            .lock()
            .delete(api_version, kind, namespace, name)
    }

    /// The object as stored.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        let ty = st.type_of(api_version, kind)?;
        let ns = if st.types[ty].namespaced {
            namespace
        } else {
            ""
        };
        st.objects
            .get(&(ty, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The current global `resourceVersion`.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets the history up to and including `rv`: a watch or a continue token from an
    /// older version gets `410 Gone` from now on.
    pub fn compact(&self, rv: u64) {
        let mut st = self.shared.lock();
        st.compacted = st.compacted.max(rv);
        let c = st.compacted;
        st.history.retain(|ch| ch.rv > c);
    }

    /// Forgets the whole history ([`ApiServer::compact`] at the current version).
    pub fn compact_all(&self) {
        let rv = self.resource_version();
        self.compact(rv);
    }

    /// Cuts the connections of every open watch (no clean end of the chunked body), as a
    /// network failure or an API server restart would; returns how many watches were open.
    pub fn cut_watches(&self) -> usize {
        let mut st = self.shared.lock();
        st.watches.retain(|w| !w.tx.is_closed());
        let n = st.watches.len();
        let conns: Vec<u64> = st.watches.drain(..).map(|w| w.conn).collect();
        for c in conns {
            if let Some(h) = st.conns.remove(&c) {
                h.abort();
            }
        }
        n
    }

    /// While set, every request is answered `503 ServiceUnavailable`, as by an API server
    /// that is restarting (combine with [`ApiServer::cut_watches`] to take watchers down).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.lock().unavailable = unavailable;
    }

    /// How many watches of the type with this plural are open.
    pub fn open_watches(&self, plural: &str) -> usize {
        let st = self.shared.lock();
        st.watches
            .iter()
            .filter(|w| !w.tx.is_closed() && st.types[w.ty].plural == plural)
            .count()
    }

    /// Every request so far, as `METHOD path?query`, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many LIST requests (GET of a collection without `watch`) reached `path` (e.g.
    /// `/api/v1/pods`).
    pub fn lists_of(&self, path: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| {
                let target = r.strip_prefix("GET ").unwrap_or("");
                let (p, q) = target.split_once('?').unwrap_or((target, ""));
                p == path && !parse_query(q).contains_key("watch")
            })
            .count()
    }

    /// Sends a bookmark on every open watch that allows them, now.
    pub fn bookmark_now(&self) {
        self.shared.lock().bookmark();
    }

    /// What `GET /version` reports (e.g. `("1", "33")`; default 1.34).
    pub fn set_version(&self, major: &str, minor: &str) {
        self.shared.lock().version = Some((major.to_owned(), minor.to_owned()));
    }

    /// Makes `token` known to `TokenReview`.
    pub fn add_token(&self, token: &str, info: TokenInfo) {
        self.shared.lock().tokens.insert(token.to_owned(), info);
    }

    /// Makes `token` unknown again (revoked, or its pod deleted).
    pub fn remove_token(&self, token: &str) {
        self.shared.lock().tokens.remove(token);
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        let conn_shared = shared.clone();
        // Registered under the lock before the task can finish and deregister itself.
        let mut st = shared.lock();
        let task = tokio::spawn(async move {
            let svc_shared = conn_shared.clone();
            let svc = hyper::service::service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, id, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
            conn_shared.lock().conns.remove(&id);
        });
        st.conns.insert(id, task.abort_handle());
    }
}

async fn bookmark_loop(shared: Arc<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        shared.lock().bookmark();
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

/// A `Status` failure body with its HTTP code.
fn status(code: StatusCode, reason: &str, message: &str, details: Value) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason,
        "details": details, "code": code.as_u16(),
    });
    full(code, &body)
}

fn not_found() -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        json!({}),
    )
}

async fn handle(shared: Arc<Shared>, conn: u64, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parse_query(parts.uri.query().unwrap_or(""));
    shared.lock().requests.push(format!(
        "{} {}{}",
        parts.method,
        path,
        parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    ));
    if shared.lock().unavailable {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the API server is not available (test control)",
            json!({}),
        );
    }
    if let Some(denied) = rbac::check(&mut shared.lock(), &parts, &query) {
        return denied;
    }
    if let Some(target) = portforward::target(&path) {
        return portforward::serve(&shared, target, Request::from_parts(parts, body)).await;
    }
    if path == "/version" && parts.method == Method::GET {
        return write::version(&shared.lock());
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return not_found(),
    };
    if (group, version, rest) == ("authentication.k8s.io", "v1", &["tokenreviews"][..]) {
        if parts.method != Method::POST {
            return method_not_allowed();
        }
        let Ok(body) = body.collect().await else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "unreadable body",
                json!({}),
            );
        };
        return tokens::token_review(&shared.lock().tokens, &body.to_bytes());
    }
    // The status subresource: a merge patch that may change `status` only, as the real API
    // server applies it (spec, labels... in the patch are ignored; generation unchanged).
    if let ["namespaces", ns, plural, name, "status"] = rest {
        if parts.method != Method::PATCH {
            return method_not_allowed();
        }
        let content_type = parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if content_type != "application/merge-patch+json" {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!(
                    "the double applies application/merge-patch+json only, not {content_type:?}"
                ),
                json!({}),
            );
        }
        let Ok(body) = body.collect().await else {
            return bad_request("unreadable body");
        };
        let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return bad_request("the body is not JSON");
        };
        return shared
            .lock()
            .patch_status(group, version, plural, ns, name, &patch);
    }
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return not_found(),
    };
    // (A block, not drop(): the guard must not live across the body's await below.)
    let ty = {
        let st = shared.lock();
        let Some(ty) = st
            .types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
        else {
            return not_found();
        };
        if namespace.is_some() && !st.types[ty].namespaced {
            return not_found();
        }
        ty
    };
    if let Some(name) = name
        && (parts.method == Method::PATCH || parts.method == Method::DELETE)
    {
        let ns = namespace.unwrap_or("");
        if parts.method == Method::DELETE {
            return shared.lock().delete_one(ty, ns, name);
        }
        let Ok(body) = body.collect().await else {
            return bad_request("unreadable body");
        };
        let body = body.to_bytes();
        return shared
            .lock()
            .patch(ty, ns, name, &parts.headers, &query, &body);
    }
    if name.is_none() && parts.method == Method::POST {
        let Some(ns) = namespace.or((!shared.lock().types[ty].namespaced).then_some("")) else {
            return method_not_allowed();
        };
        let Ok(body) = body.collect().await else {
            return bad_request("unreadable body");
        };
        return shared.lock().create(ty, ns, &body.to_bytes());
    }
    if parts.method != Method::GET {
        return method_not_allowed();
    }
    match name {
        Some(name) => shared.lock().get_one(ty, namespace.unwrap_or(""), name),
        None if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(&shared, conn, ty, namespace, &query)
        }
        None => shared.lock().list(ty, namespace, &query),
    }
}

fn method_not_allowed() -> Response<Body> {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "the double does not serve this method here (see tests/src/apiserver.rs)",
        json!({}),
    )
}

fn bad_request(message: &str) -> Response<Body> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, json!({}))
}

fn expired(message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": "Expired", "code": 410,
    })
}
