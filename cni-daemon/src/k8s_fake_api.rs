//! The watcher's test fixtures: typed objects and a node (the daemon on the fake dataplane, fed
//! by the watcher from the fake API server of [`crate::fake_api`]).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(super) use crate::fake_api::*;

use super::*;
use crate::config::Config;
use crate::daemon::{Daemon, Policy};
use crate::dataplane::fake::FakeDataplane;
use crate::registry::Registry;

pub(super) const NODE: &str = "node-1";

pub(super) fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    serde_json::from_value(ns_json(name, labels)).expect("namespace JSON")
}

pub(super) fn pod(ns: &str, name: &str, host_network: bool, annotations: &[(&str, &str)]) -> Pod {
    serde_json::from_value(pod_json(ns, name, NODE, host_network, annotations)).expect("pod JSON")
}

pub(super) fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub(super) fn keys(v: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// End to end: fake API -> watcher -> Daemon::set_policy -> fake dataplane.

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// A node: the daemon on the fake dataplane, pods added through the CNI path.
pub(super) struct Node {
    pub(super) dp: Arc<FakeDataplane>,
    pub(super) daemon: Arc<Daemon<FakeDataplane>>,
    pub(super) policies: Arc<Mutex<Vec<Policy>>>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    pub(super) async fn new(cfg: Config) -> Node {
        Node::boot(cfg, Arc::new(FakeDataplane::new()), None).await
    }

    /// A daemon on `dp`, with its registry persisted in `state_dir` (restored if there is one).
    pub(super) async fn boot(
        cfg: Config,
        dp: Arc<FakeDataplane>,
        state_dir: Option<&std::path::Path>,
    ) -> Node {
        for l in ["vetha", "vethb", "vethc"] {
            dp.kernel().add_host_link(l);
        }
        let (store, reg) = match state_dir {
            Some(dir) => {
                let (store, reg, _) = crate::store::Store::open(dir).expect("state dir");
                (Some(store), reg)
            }
            None => (None, Registry::default()),
        };
        let daemon = Arc::new(Daemon::new(Arc::new(cfg), dp.clone(), store, reg));
        let r = daemon.resync().await;
        assert!(r.ok(), "{:?}", r.errors);
        Node {
            dp,
            daemon,
            policies: Arc::new(Mutex::new(Vec::new())),
            task: None,
        }
    }

    /// Start the watcher against `api`, recording each policy on its way to `set_policy`.
    pub(super) fn watch(&mut self, api: &FakeApi) {
        let (d, rec, client) = (self.daemon.clone(), self.policies.clone(), api.client());
        self.task = Some(tokio::spawn(async move {
            let apply = move |v: View| {
                lock(&rec).push(v.policy.clone());
                let d = d.clone();
                async move { apply_view(&d, v).await }
            };
            let Err(e) = watch_with(client, WatchConfig::new(NODE), apply).await;
            panic!("watcher stopped: {e}");
        }));
    }

    /// The CNI ADD of a pod.
    pub(super) async fn add(&self, cid: &str, ns: &str, name: &str, addr: &str, hif: &str) -> bool {
        let ev = crate::daemon::test_event(cid, ns, name, addr, hif);
        self.daemon.add(ev).await.expect("CNI ADD").enrolled
    }

    /// Pod IPs in the ipsets of both families: what is redirected.
    pub(super) fn captured(&self) -> BTreeSet<IpAddr> {
        self.owners().into_iter().map(|(a, _)| a).collect()
    }

    /// The ipset entries of both families with their owner.
    pub(super) fn owners(&self) -> Vec<(IpAddr, String)> {
        let k = self.dp.kernel();
        [&k.ipset, &k.ipset6]
            .into_iter()
            .flatten()
            .flat_map(|s| s.iter().map(|(a, o)| (*a, o.clone())))
            .collect()
    }

    pub(super) fn policies(&self) -> Vec<Policy> {
        lock(&self.policies).clone()
    }

    /// Wait (virtual time) until `f` holds; the watcher's backoff is at most 30 s.
    pub(super) async fn until(&self, what: &str, f: impl Fn(&Node) -> bool) {
        for _ in 0..600 {
            if f(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "timed out waiting for: {what}; policies: {:?}",
            self.policies()
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub(super) fn set(v: &[&str]) -> BTreeSet<IpAddr> {
    v.iter().map(|s| ip(s)).collect()
}
