//! The proxies this ztunnel runs, by key: filled by startup (dedicated mode) and the ZDS
//! handler (`inpod`, shared mode), read by the admin endpoints and the drain. Its own module
//! so that `admin` and `inpod` need not import `app`, which wires them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::proxy::Proxy;

/// The proxies this ztunnel runs: one in dedicated mode, one per enrolled pod in shared mode.
/// Keyed by pod uid (the workload's `<namespace>/<name>` in dedicated mode).
#[derive(Default)]
pub struct Proxies(Mutex<BTreeMap<String, Arc<Proxy>>>);

impl Proxies {
    /// Adds `proxy` under `key`; returns the proxy it replaces, if any.
    pub fn insert(&self, key: String, proxy: Arc<Proxy>) -> Option<Arc<Proxy>> {
        self.0.lock().expect("proxies lock").insert(key, proxy)
    }

    /// Takes the proxy of `key` out, if there is one.
    pub fn remove(&self, key: &str) -> Option<Arc<Proxy>> {
        self.0.lock().expect("proxies lock").remove(key)
    }

    /// The proxy of `key`, if there is one.
    pub fn get(&self, key: &str) -> Option<Arc<Proxy>> {
        self.0.lock().expect("proxies lock").get(key).cloned()
    }

    /// Every proxy with its key, in key order, as of now.
    pub fn snapshot(&self) -> Vec<(String, Arc<Proxy>)> {
        let map = self.0.lock().expect("proxies lock");
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
