//! The daemon's registry changes only once the journal holds the change (issue 17): a failed
//! write or fdatasync leaves registry and kernel as they were, and the plugin gets the error.

use std::net::IpAddr;
use std::sync::Arc;

use super::{test_event as ev, Daemon, RequestError};
use crate::config::Config;
use crate::dataplane::fake::FakeDataplane;
use crate::store::{Fault, Store};

struct World {
    dp: Arc<FakeDataplane>,
    d: Daemon<FakeDataplane>,
    dir: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, reg, _) = Store::open(dir.path()).expect("store");
        let mut c = Config::default();
        c.ambient_namespaces.insert("default".into());
        let dp = Arc::new(FakeDataplane::new());
        for l in ["vethz", "vetha", "vethb"] {
            dp.kernel().add_host_link(l);
        }
        let d = Daemon::new(Arc::new(c), dp.clone(), Some(store), reg);
        let r = d.resync().await;
        assert!(r.ok(), "{:?}", r.errors);
        World { dp, d, dir }
    }

    async fn inject(&self, fault: Fault) {
        let mut inner = self.d.inner.lock().await;
        inner.store.as_mut().expect("store").inject(fault, false);
    }

    /// The registry as (container ID, IPs), sorted.
    async fn records(&self) -> Vec<(String, Vec<IpAddr>)> {
        let inner = self.d.inner.lock().await;
        let mut v: Vec<_> = inner
            .reg
            .records()
            .map(|r| (r.container_id.clone(), r.ips.clone()))
            .collect();
        v.sort();
        v
    }

    fn in_ipset(&self, addr: &str) -> Option<String> {
        let ip: IpAddr = addr.parse().expect("ip");
        self.dp
            .kernel()
            .ipset
            .as_ref()
            .and_then(|s| s.get(&ip).cloned())
    }

    /// What a restart would load.
    fn reopened(&self) -> Vec<String> {
        let (st, reg, _) = Store::open(self.dir.path()).expect("reopen");
        assert!(st.damage().is_empty(), "{:?}", st.damage());
        let mut v: Vec<String> = reg.records().map(|r| r.container_id.clone()).collect();
        v.sort();
        v
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test]
async fn a_failed_journal_write_leaves_registry_and_kernel_unchanged_on_add() {
    let w = World::new().await;
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    for fault in [Fault::ShortWrite(30), Fault::Sync] {
        w.inject(fault).await;
        let err =
            w.d.add(ev("b", "default", "b", "10.244.1.6", "vethb"))
                .await
                .expect_err("injected");
        assert!(matches!(err, RequestError::State(_)), "{fault:?}: {err}");
        assert!(err.to_string().contains("registry.journal"), "{err}");
        assert_eq!(w.records().await, [("a".into(), vec![ip("10.244.1.5")])]);
        assert_eq!(
            w.in_ipset("10.244.1.6"),
            None,
            "{fault:?}: kernel untouched"
        );
        assert_eq!(w.d.status().await.pods, 1);
    }
    // The retry succeeds and lands whole in the journal.
    w.d.add(ev("b", "default", "b", "10.244.1.6", "vethb"))
        .await
        .expect("b");
    assert_eq!(w.in_ipset("10.244.1.6"), Some("uid-b".into()));
    assert_eq!(w.reopened(), ["a", "b"]);
}

#[tokio::test]
async fn a_failed_journal_write_keeps_the_old_record_of_a_replaced_pod() {
    let w = World::new().await;
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    // The same pod (UID) with a new sandbox and IP.
    let mut again = ev("a2", "default", "a", "10.244.1.7", "vetha");
    again.uid = "uid-a".into();
    w.inject(Fault::ShortWrite(5)).await;
    w.d.add(again.clone()).await.expect_err("injected");
    assert_eq!(w.records().await, [("a".into(), vec![ip("10.244.1.5")])]);
    assert_eq!(w.in_ipset("10.244.1.5"), Some("uid-a".into()));
    assert_eq!(w.in_ipset("10.244.1.7"), None);
    w.d.add(again).await.expect("retry");
    assert_eq!(w.records().await, [("a2".into(), vec![ip("10.244.1.7")])]);
    assert_eq!(w.reopened(), ["a2"]);
}

#[tokio::test]
async fn a_failed_journal_write_keeps_the_record_and_kernel_state_on_del_and_gc() {
    let w = World::new().await;
    for (c, a, h) in [("a", "10.244.1.5", "vetha"), ("b", "10.244.1.6", "vethb")] {
        w.d.add(ev(c, "default", c, a, h)).await.expect("add");
    }
    w.inject(Fault::Sync).await;
    let err = w.d.del("a", "eth0").await.expect_err("injected");
    assert!(matches!(err, RequestError::State(_)), "{err}");
    assert_eq!(w.records().await.len(), 2);
    assert_eq!(w.in_ipset("10.244.1.5"), Some("uid-a".into()));
    // GC that would remove b: not durable, so b stays, in memory and in the kernel.
    w.inject(Fault::ShortWrite(1)).await;
    let (removed, errors) = w.d.gc("k8s", Some(&[("a".into(), "eth0".into())])).await;
    assert_eq!(removed, 0, "nothing was removed");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(w.records().await.len(), 2);
    assert_eq!(w.in_ipset("10.244.1.6"), Some("uid-b".into()));
    assert!(w.d.del("a", "eth0").await.expect("del retry"));
    assert_eq!(w.in_ipset("10.244.1.5"), None);
    assert_eq!(w.reopened(), ["b"]);
}
