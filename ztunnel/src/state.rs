//! The state the proxies read, and its single way in: every new config snapshot (from the
//! local-config watch or the xDS client) goes through [`Publisher::publish`], which swaps it in
//! and wakes whoever waits for changes (the policy re-check of open connections,
//! `proxy::policy::recheck_on_change`).
//!
//! The config sources (`xds`, `local_config`) and the proxies (`proxy`) both depend on this
//! module; it depends on neither.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use zmesh_core::state::State;

/// The data path's config and a wake-up for the policy re-check: every new `State` goes
/// through [`Publisher::publish`].
#[derive(Clone)]
pub struct Publisher {
    state: Arc<ArcSwap<State>>,
    changed: Arc<Notify>,
    /// Bumped (after the store) whenever a published state's policies differ from the last.
    policy_generation: Arc<AtomicU64>,
}

impl Publisher {
    /// Publishes into `state`, the snapshot the proxies load on each connection.
    pub fn new(state: Arc<ArcSwap<State>>) -> Publisher {
        Publisher {
            state,
            changed: Arc::new(Notify::new()),
            policy_generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Swaps in `st`. `policies_changed` says whether its policies differ from the current
    /// state's; `None` lets this compare them (a local-config reload; xDS knows).
    pub fn publish(&self, st: State, policies_changed: Option<bool>) {
        let changed = policies_changed.unwrap_or_else(|| {
            !self
                .state
                .load()
                .policies()
                .policies()
                .eq(st.policies().policies())
        });
        self.state.store(Arc::new(st));
        if changed {
            self.policy_generation.fetch_add(1, Ordering::SeqCst);
        }
        self.changed.notify_one();
    }

    /// Completes after the next [`Publisher::publish`] (at once if one happened since the
    /// last wait returned). One waiter: the policy re-check.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// How many published states changed the policies. Bumped after the store: a bump seen
    /// here comes with its state in [`Publisher::current`].
    pub fn policy_generation(&self) -> u64 {
        self.policy_generation.load(Ordering::SeqCst)
    }

    /// The state in force.
    pub fn current(&self) -> Arc<State> {
        self.state.load_full()
    }
}
