//! One kube-rs [`watcher`](kube::runtime::watcher()) per watched kind, applying its events to a
//! [`Sink`].
//!
//! Each watcher lists its kind (paged), then watches from the list's `resourceVersion`, with
//! bookmarks. Its events map onto the sink like this:
//!
//! - `Init` starts a buffer, `InitApply` fills it, and `InitDone` hands the whole buffer to
//!   [`Sink::replace`]: the kind is replaced atomically. A re-list (after a `410 Gone`, or a
//!   continue token that expired) goes through the same steps, so objects deleted while the
//!   watch was down disappear, and readers never see a half-listed kind;
//! - `Apply` is a [`Sink::upsert`], `Delete` a [`Sink::remove`].
//!
//! Errors never stop a watcher: each is logged with its reason and a hint (the first at once,
//! then at most one line per [`ERROR_LOG_INTERVAL`] per kind, with the count of those held
//! back), and the watcher retries with kube-rs' default backoff (0.8 s doubling to 30 s,
//! jittered).
//!
//! A kind that comes from a CRD ([`Watched::crd`]) may not be installed: a `404` on its list
//! replaces it with nothing ("treating as none"), so the component works with the rest of the
//! cluster, and the watcher keeps retrying in the background; once the CRD is installed, its
//! objects arrive. A `404` on a built-in kind is only an error: its kind gets no list (the API
//! server is not what we expect).

use std::fmt::Debug;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// At most one error line per kind in this interval (after the first).
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Where one watcher's events go. Called from the watcher's task, one event at a time.
pub trait Sink<K>: Send + 'static {
    /// A complete list of the kind (the initial list, a re-list, or nothing when its CRD is
    /// not installed): replaces every object of the kind, and the kind counts as listed.
    fn replace(&mut self, objects: Vec<K>);
    /// An object was created or changed.
    fn upsert(&mut self, object: K);
    /// An object was deleted (nothing happens if it was not there).
    fn remove(&mut self, object: &K);
}

/// What a watcher watches, for its logs and its handling of `404`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watched {
    /// The kind's name as in YAML (`Pod`, `AuthorizationPolicy`).
    pub kind: &'static str,
    /// The CRD the kind comes from (`authorizationpolicies.security.istio.io`), `None` for
    /// built-in kinds.
    pub crd: Option<&'static str>,
}

/// Watcher settings for the pods scheduled on `node` only (`fieldSelector=spec.nodeName=<node>`),
/// as a node agent watches them.
pub fn pods_on_node(node: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("spec.nodeName={node}"))
}

/// Running watchers; dropping it stops them.
#[derive(Debug, Default)]
pub struct Watchers {
    tasks: JoinSet<()>,
}

impl Watchers {
    /// No watchers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a watcher of `api` with `config`, applying its events to `sink`, forever. Must be
    /// called inside a tokio runtime.
    pub fn watch<K, S>(&mut self, api: Api<K>, config: watcher::Config, watched: Watched, sink: S)
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
        S: Sink<K>,
    {
        self.tasks.spawn(follow(api, config, watched, sink));
    }

    /// Runs until every watcher has stopped, which they never do on their own (they retry
    /// every error); for a `main` that has nothing else to wait on.
    pub async fn join(mut self) {
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!("a Kubernetes watcher panicked: {e}");
            }
        }
    }
}

/// Applies one watcher's events to `sink`, forever.
pub async fn follow<K, S>(api: Api<K>, config: watcher::Config, watched: Watched, mut sink: S)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    S: Sink<K>,
{
    let kind_name = watched.kind;
    let mut errors = ErrorLog::default();
    // `Some` from `Init` to `InitDone`: the objects of a (re-)list being collected.
    let mut listing: Option<Vec<K>> = None;
    let mut synced_once = false;
    // Whether the kind currently stands listed-as-empty because its CRD is missing.
    let mut absent = false;
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(item) = stream.next().await {
        match item {
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(object)) => listing.get_or_insert_default().push(object),
            Ok(Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                let count = objects.len();
                sink.replace(objects);
                if synced_once {
                    info!(kind = kind_name, objects = count, "re-listed");
                } else {
                    info!(kind = kind_name, objects = count, "initial list done");
                }
                if absent {
                    info!(
                        kind = kind_name,
                        crd = watched.crd,
                        "the CRD is installed now"
                    );
                }
                synced_once = true;
                absent = false;
                errors.recovered(kind_name);
            }
            Ok(Event::Apply(object)) => {
                debug!(kind = kind_name, name = ?object.meta().name, "applied");
                sink.upsert(object);
            }
            Ok(Event::Delete(object)) => {
                debug!(kind = kind_name, name = ?object.meta().name, "deleted");
                sink.remove(&object);
            }
            // A list that fails restarts with `Init` (which drops the partial buffer); an
            // error inside a streaming initial watch does not end it, so the buffer stays.
            Err(e) => {
                if let Some(crd) = watched.crd
                    && is_not_found(&e)
                {
                    if !absent {
                        warn!(
                            kind = kind_name,
                            crd,
                            "{kind_name} CRD not installed; treating as none (retrying in the \
                             background: install {crd} and its objects will be read)"
                        );
                        sink.replace(Vec::new());
                        absent = true;
                    }
                    continue;
                }
                errors.log(kind_name, &e);
            }
        }
    }
}

/// Is this the API server saying the resource type does not exist (`404` on list or watch)?
fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

/// What an operator should check for a watcher error.
fn hint(e: &watcher::Error) -> &'static str {
    if let watcher::Error::InitialListFailed(kube::Error::SerdeError(_))
    | watcher::Error::WatchFailed(kube::Error::SerdeError(_)) = e
    {
        return "an object of this kind does not parse as zmesh reads it (a field it does not \
                know, from a newer CRD version?); until it is fixed or deleted, this kind is not \
                updated";
    }
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => 0,
    };
    match code {
        401 => "check this component's service account token",
        403 => "check that this component's ClusterRole allows list and watch on this resource",
        404 => "is this resource served by the API server?",
        410 => "the watch fell behind the API server's history; re-listing",
        _ => "retrying with backoff; check that the API server is reachable",
    }
}

/// Rate-limited error logging for one watcher.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn log(&mut self, kind: &str, e: &watcher::Error) {
        // An expired watch is routine (the API server keeps a few minutes of history).
        if let watcher::Error::WatchError(s) = e
            && s.code == 410
        {
            info!(kind, reason = %s.message, "watch expired (410 Gone); re-listing");
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ERROR_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        warn!(
            kind,
            error = %e,
            hint = hint(e),
            similar_errors_not_logged = self.suppressed,
            "watching Kubernetes failed"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }

    fn recovered(&mut self, kind: &str) {
        if self.last.take().is_some() {
            info!(kind, "watching Kubernetes works again");
        }
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_pods_are_selected_by_field() {
        assert_eq!(
            pods_on_node("n1").field_selector.as_deref(),
            Some("spec.nodeName=n1")
        );
    }

    #[test]
    fn not_found_is_list_or_watch_start_404() {
        let status = |code| {
            Box::new(kube::core::Status {
                code,
                ..Default::default()
            })
        };
        let list404 = watcher::Error::InitialListFailed(kube::Error::Api(status(404)));
        assert!(is_not_found(&list404));
        let list403 = watcher::Error::InitialListFailed(kube::Error::Api(status(403)));
        assert!(!is_not_found(&list403));
        assert!(hint(&list403).contains("ClusterRole"));
        let gone = watcher::Error::WatchError(status(410));
        assert!(!is_not_found(&gone));
    }
}
