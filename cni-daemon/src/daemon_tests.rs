//! The daemon on the fake dataplane: the whole request flow and the reconciler, without root.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::config::{tables, Config};
use crate::daemon::{Daemon, RequestError};
use crate::dataplane::fake::FakeDataplane;
use crate::model::{Ns, Prefix, RouteKey, RouteKind};
use crate::reconcile::{self, desired, Ztunnel};
use crate::registry::Registry;

fn cfg() -> Config {
    let mut c = Config::default();
    c.ambient_namespaces.insert("default".into());
    c
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().expect("test IP")
}

use crate::daemon::test_event as ev;

struct World {
    dp: Arc<FakeDataplane>,
    d: Daemon<FakeDataplane>,
}

impl World {
    async fn new(c: Config) -> World {
        let dp = Arc::new(FakeDataplane::new());
        for l in ["vethz", "vethz2", "vetha", "vethb", "vethc"] {
            dp.kernel().add_host_link(l);
        }
        let d = Daemon::new(Arc::new(c), dp.clone(), None, Registry::default());
        let r = d.resync().await;
        assert!(r.ok(), "{:?}", r.errors);
        World { dp, d }
    }

    /// The plan a full reconcile would run now.
    async fn pending(&self) -> Vec<String> {
        let v = self.d.dump().await;
        v["pending"]
            .as_array()
            .map(|a| a.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }

    fn node_route(&self, table: u32, dst: Prefix, metric: u32) -> Option<crate::model::Route> {
        let k = self.dp.kernel();
        k.ns.get(&Ns::Node)
            .and_then(|n| n.routes.get(&RouteKey { table, dst, metric }).cloned())
    }
}

#[tokio::test]
async fn start_builds_base_state_and_second_plan_is_empty() {
    let w = World::new(cfg()).await;
    {
        let k = w.dp.kernel();
        assert!(k.ipset.is_some());
        let node = &k.ns[&Ns::Node];
        assert_eq!(node.rules.len(), 4);
        assert_eq!(node.jumps.len(), 9, "9 jumps: mangle x5, nat x2, filter x2");
        let hold = &node.chains[&("filter".to_string(), "ztunnel-FORWARD".to_string())];
        assert!(
            hold.iter().any(|r| r.contains("REJECT")),
            "inbound held closed: {hold:?}"
        );
        // Fail closed: no ztunnel yet, table 101 holds an unreachable default.
        let r = node
            .routes
            .values()
            .find(|r| r.key.table == tables::OUTBOUND)
            .expect("fallback");
        assert_eq!(r.kind, RouteKind::Unreachable);
    }
    assert!(w.pending().await.is_empty());
    let writes = w.dp.kernel().writes;
    w.d.resync().await;
    assert_eq!(
        w.dp.kernel().writes,
        writes,
        "a no-change resync writes nothing"
    );
}

#[tokio::test]
async fn pod_before_ztunnel_is_held_closed_then_captured() {
    let w = World::new(cfg()).await;
    let out =
        w.d.add(ev("a", "default", "app", "10.244.1.5", "vetha"))
            .await
            .expect("add");
    assert!(out.enrolled);
    assert_eq!(
        w.dp.kernel()
            .ipset
            .as_ref()
            .and_then(|s| s.get(&ip("10.244.1.5")).cloned()),
        Some("uid-a".into())
    );
    // No route into a tunnel that does not exist; the filter rule holds inbound TCP closed.
    assert!(w
        .node_route(tables::INBOUND, Prefix::host(ip("10.244.1.5")), 0)
        .is_none());
    let z =
        w.d.add(ev("z", "istio-system", "ztunnel-1", "10.244.1.2", "vethz"))
            .await
            .expect("zt add");
    assert!(z.ztunnel && !z.enrolled);
    let r = w
        .node_route(tables::INBOUND, Prefix::host(ip("10.244.1.5")), 0)
        .expect("tunnel route");
    assert_eq!(
        (r.via, r.dev.as_deref(), r.src),
        (
            Some(ip("192.168.126.2")),
            Some("istioin"),
            Some(ip("10.244.1.1"))
        )
    );
    let out = w
        .node_route(tables::OUTBOUND, Prefix::DEFAULT, 0)
        .expect("outbound default");
    assert_eq!(out.dev.as_deref(), Some("istioout"));
    {
        let k = w.dp.kernel();
        assert_eq!(k.tunnels.len(), 2);
        let zns = Ns::Pod("/tmp/acni-fake-netns-z".into());
        assert_eq!(k.ns[&zns].rules.len(), 2);
        assert_eq!(
            k.ns[&zns]
                .sysctls
                .get("net/ipv4/conf/pistioin/rp_filter")
                .map(String::as_str),
            Some("2")
        );
        assert_eq!(
            k.ns[&Ns::Node]
                .sysctls
                .get("net/ipv4/conf/vetha/rp_filter")
                .map(String::as_str),
            Some("2")
        );
        assert_eq!(
            k.ns[&Ns::Node]
                .sysctls
                .get("net/ipv4/conf/vethz/rp_filter")
                .map(String::as_str),
            Some("2")
        );
    }
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn drift_is_repaired_exactly() {
    let w = World::new(cfg()).await;
    w.d.add(ev("z", "istio-system", "ztunnel-1", "10.244.1.2", "vethz"))
        .await
        .expect("zt");
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    w.d.add(ev("b", "default", "b", "10.244.1.6", "vethb"))
        .await
        .expect("b");
    assert!(w.pending().await.is_empty());
    {
        let mut k = w.dp.kernel();
        k.ipset.as_mut().expect("set").clear();
        let node = k.ns.get_mut(&Ns::Node).expect("node");
        node.rules.retain(|r| r.priority != tables::RULE_OUTBOUND);
        node.routes.remove(&RouteKey {
            table: tables::INBOUND,
            dst: Prefix::host(ip("10.244.1.5")),
            metric: 0,
        });
        node.chains
            .insert(("mangle".into(), "ztunnel-PREROUTING".into()), vec![]);
    }
    let pending = w.pending().await;
    assert_eq!(pending.len(), 5, "{pending:#?}");
    let r = w.d.resync().await;
    assert!(r.ok());
    assert_eq!(r.applied.len(), 5);
    assert!(w.pending().await.is_empty());
    assert_eq!(w.dp.kernel().ipset.as_ref().map(|s| s.len()), Some(2));
}

#[tokio::test]
async fn deleting_istioin_is_repaired_with_its_routes() {
    let w = World::new(cfg()).await;
    w.d.add(ev("z", "istio-system", "ztunnel-1", "10.244.1.2", "vethz"))
        .await
        .expect("zt");
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    w.dp.kernel().tunnels.remove("istioin");
    {
        let mut k = w.dp.kernel();
        let node = k.ns.get_mut(&Ns::Node).expect("node");
        node.links.remove("istioin");
        node.routes
            .retain(|_, r| r.dev.as_deref() != Some("istioin"));
    }
    w.d.resync().await;
    assert!(w
        .node_route(tables::INBOUND, Prefix::host(ip("10.244.1.5")), 0)
        .is_some());
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn replaced_ztunnel_gets_fresh_tunnels_and_everything_repoints() {
    let w = World::new(cfg()).await;
    w.d.add(ev("z1", "istio-system", "ztunnel-1", "10.244.1.2", "vethz"))
        .await
        .expect("zt1");
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    // The old ztunnel's netns vanishes without a DEL: the kernel drops the veths and their routes.
    w.dp.kernel()
        .kill_ns(std::path::Path::new("/tmp/acni-fake-netns-z1"));
    w.dp.kernel().del_host_link("vethz");
    assert!(w
        .node_route(tables::INBOUND, Prefix::host(ip("10.244.1.5")), 0)
        .is_none());
    w.d.resync().await;
    // Held closed meanwhile.
    assert!(w.node_route(tables::OUTBOUND, Prefix::DEFAULT, 0).is_none());
    assert!(w
        .node_route(tables::OUTBOUND, Prefix::DEFAULT, tables::FALLBACK_METRIC)
        .is_some());
    w.d.add(ev(
        "z2",
        "istio-system",
        "ztunnel-2",
        "10.244.1.3",
        "vethz2",
    ))
    .await
    .expect("zt2");
    assert_eq!(
        w.node_route(tables::INBOUND, Prefix::host(ip("10.244.1.5")), 0)
            .and_then(|r| r.dev),
        Some("istioin".into())
    );
    assert_eq!(
        w.node_route(tables::PROXY_RET, Prefix::DEFAULT, 0)
            .and_then(|r| r.dev),
        Some("vethz2".into())
    );
    assert!(w.pending().await.is_empty());
    // A late DEL of the old ztunnel does not tear down the new one's tunnels.
    w.d.del("z1", "eth0").await.expect("late del");
    assert_eq!(w.dp.kernel().tunnels.len(), 2);
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn ztunnel_del_then_add_in_new_netns() {
    let w = World::new(cfg()).await;
    w.d.add(ev("z1", "istio-system", "ztunnel-1", "10.244.1.2", "vethz"))
        .await
        .expect("zt1");
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    w.d.del("z1", "eth0").await.expect("zt del");
    assert!(
        w.dp.kernel().tunnels.is_empty(),
        "tunnels removed with their ztunnel"
    );
    assert!(w
        .node_route(tables::INBOUND, Prefix::host(ip("10.244.1.5")), 0)
        .is_none());
    assert!(w
        .node_route(tables::OUTBOUND, Prefix::DEFAULT, tables::FALLBACK_METRIC)
        .is_some());
    w.d.add(ev(
        "z2",
        "istio-system",
        "ztunnel-2",
        "10.244.1.3",
        "vethz2",
    ))
    .await
    .expect("zt2");
    assert!(w
        .node_route(tables::INBOUND, Prefix::host(ip("10.244.1.5")), 0)
        .is_some());
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn del_removes_exactly_that_pod() {
    let w = World::new(cfg()).await;
    w.d.add(ev("z", "istio-system", "ztunnel-1", "10.244.1.2", "vethz"))
        .await
        .expect("zt");
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    w.d.add(ev("b", "default", "b", "10.244.1.6", "vethb"))
        .await
        .expect("b");
    assert!(w.d.del("a", "eth0").await.expect("del"));
    {
        let k = w.dp.kernel();
        let set = k.ipset.as_ref().expect("set");
        assert!(!set.contains_key(&ip("10.244.1.5")));
        assert!(set.contains_key(&ip("10.244.1.6")));
        let node = &k.ns[&Ns::Node];
        assert!(!node
            .routes
            .keys()
            .any(|k| k.dst == Prefix::host(ip("10.244.1.5"))));
        assert!(node
            .routes
            .keys()
            .any(|k| k.dst == Prefix::host(ip("10.244.1.6"))));
    }
    assert!(
        !w.d.del("a", "eth0").await.expect("second del"),
        "a second DEL is a no-op"
    );
    assert!(!w.d.del("never", "eth0").await.expect("unknown del"));
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn ip_reuse_late_del_keeps_new_owner() {
    let w = World::new(cfg()).await;
    w.d.add(ev("z", "istio-system", "ztunnel-1", "10.244.1.2", "vethz"))
        .await
        .expect("zt");
    w.d.add(ev("x", "default", "x", "10.244.1.7", "vetha"))
        .await
        .expect("x");
    // X's DEL is late: Y already has its IP.
    w.d.add(ev("y", "default", "y", "10.244.1.7", "vethb"))
        .await
        .expect("y");
    assert_eq!(
        w.dp.kernel()
            .ipset
            .as_ref()
            .and_then(|s| s.get(&ip("10.244.1.7")).cloned()),
        Some("uid-y".into())
    );
    w.d.del("x", "eth0").await.expect("late del");
    assert_eq!(
        w.dp.kernel()
            .ipset
            .as_ref()
            .and_then(|s| s.get(&ip("10.244.1.7")).cloned()),
        Some("uid-y".into())
    );
    assert!(w
        .node_route(tables::INBOUND, Prefix::host(ip("10.244.1.7")), 0)
        .is_some());
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn late_add_of_deleted_pod_is_refused() {
    let w = World::new(cfg()).await;
    w.dp.kernel().dead.insert("/tmp/acni-fake-netns-x".into());
    let e =
        w.d.add(ev("x", "default", "x", "10.244.1.7", "vetha"))
            .await
            .expect_err("netns gone");
    assert!(matches!(e, RequestError::Precondition(_)), "{e}");
    assert!(w.dp.kernel().ipset.as_ref().is_some_and(|s| s.is_empty()));
}

#[tokio::test]
async fn non_ambient_and_hostnetwork_pods_are_not_enrolled() {
    let w = World::new(cfg()).await;
    let o =
        w.d.add(ev("c", "other", "c", "10.244.1.8", "vethc"))
            .await
            .expect("add");
    assert!(!o.enrolled);
    let mut h = ev("h", "default", "h", "10.244.1.9", "");
    h.ips.clear();
    let o = w.d.add(h).await.expect("add");
    assert!(!o.enrolled);
    assert!(w.dp.kernel().ipset.as_ref().is_some_and(|s| s.is_empty()));
}

#[tokio::test]
async fn invalid_names_are_rejected_before_use() {
    let w = World::new(cfg()).await;
    for bad in ["../x", "", "a b", "a;rm -rf"] {
        let mut e = ev("a", "default", "a", "10.244.1.5", "vetha");
        e.container_id = bad.into();
        assert!(
            matches!(w.d.add(e).await, Err(RequestError::Invalid(_))),
            "{bad:?}"
        );
    }
    for (ns, name, uid) in [
        ("de fault", "a", "u"),
        ("default", "a\nb", "u"),
        ("default", "a", "\"quoted\""),
    ] {
        let mut e = ev("a", ns, name, "10.244.1.5", "vetha");
        e.uid = uid.into();
        assert!(
            matches!(w.d.add(e).await, Err(RequestError::Invalid(_))),
            "{ns:?} {name:?} {uid:?}"
        );
    }
    let mut e = ev("a", "default", "a", "10.244.1.5", "vetha");
    e.uid = "x".repeat(300);
    assert!(matches!(w.d.add(e).await, Err(RequestError::Invalid(_))));
    for bad_if in ["veth\"x", "veth#1", "a b", "vethé"] {
        let mut e = ev("a", "default", "a", "10.244.1.5", "vetha");
        e.host_if = bad_if.into();
        assert!(
            matches!(w.d.add(e).await, Err(RequestError::Invalid(_))),
            "{bad_if:?}"
        );
    }
    let mut e = ev("a", "default", "a", "10.244.1.5", "vetha");
    e.host_if = "veth/../../x".into();
    assert!(matches!(w.d.add(e).await, Err(RequestError::Invalid(_))));
    let mut e = ev("a", "default", "a", "10.244.1.5", "vetha");
    e.ips = vec![("10.244.1.500/24".into(), String::new())];
    assert!(matches!(w.d.add(e).await, Err(RequestError::Invalid(_))));
}

#[tokio::test]
async fn gc_and_sweep_remove_stale_pods() {
    let w = World::new(cfg()).await;
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    w.d.add(ev("b", "default", "b", "10.244.1.6", "vethb"))
        .await
        .expect("b");
    w.d.add(ev("c", "default", "c", "10.244.1.8", "vethc"))
        .await
        .expect("c");
    let (n, errs) = w.d.gc("k8s", None).await;
    assert_eq!((n, errs.len()), (0, 0), "no list: nothing removed");
    let (n, errs) =
        w.d.gc(
            "k8s",
            Some(&[("a".into(), "eth0".into()), ("c".into(), "eth0".into())]),
        )
        .await;
    assert_eq!((n, errs.len()), (1, 0));
    assert!(!w
        .dp
        .kernel()
        .ipset
        .as_ref()
        .expect("set")
        .contains_key(&ip("10.244.1.6")));
    w.dp.kernel().dead.insert("/tmp/acni-fake-netns-c".into());
    w.d.resync().await;
    let set = w.dp.kernel().ipset.clone().expect("set");
    assert_eq!(
        set.keys().copied().collect::<Vec<_>>(),
        vec![ip("10.244.1.5")]
    );
    assert_eq!(w.d.status().await.pods, 1);
}

#[tokio::test]
async fn fail_open_has_no_fallback_routes() {
    let mut c = cfg();
    c.fail_open = true;
    let w = World::new(c).await;
    w.d.add(ev("a", "default", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    let k = w.dp.kernel();
    let node = &k.ns[&Ns::Node];
    assert!(node
        .routes
        .values()
        .all(|r| r.kind != RouteKind::Unreachable));
    assert!(
        node.chains
            .values()
            .flatten()
            .all(|r| !r.contains("REJECT")),
        "no hold rules with --fail-open"
    );
}

#[test]
fn desired_is_pure_and_plan_against_itself_is_empty() {
    let c = cfg();
    let mut reg = Registry::default();
    reg.upsert(crate::registry::PodRecord {
        container_id: "a".into(),
        ifname: "eth0".into(),
        netns: "/run/netns/a".into(),
        namespace: "default".into(),
        name: "a".into(),
        uid: "u".into(),
        network: "n".into(),
        ips: vec![ip("10.244.1.5")],
        gateway: Some(ip4("10.244.1.1")),
        gateway6: None,
        host_if: Some("vetha".into()),
        enrolled: true,
        ztunnel: false,
        seq: 0,
    });
    let zt = Ztunnel {
        ns: Ns::Pod("/tmp/acni-fake-netns-z".into()),
        ip: Some(ip4("10.244.1.2")),
        ip6: None,
        host_if: "vethz".into(),
        ifname: "eth0".into(),
        gateway: Some(ip4("10.244.1.1")),
        gateway6: None,
    };
    let a = desired(&c, &reg, Some(&zt));
    assert_eq!(a, desired(&c, &reg, Some(&zt)));
    let have = reconcile::Observed {
        ipset: Some(a.ipset_map()),
        node: crate::model::NsState {
            rules: a.node.rules.clone(),
            routes: a.node_routes_map(),
            iptables: reconcile::plan::iptables_of(&a.node.chains),
            sysctls: a.node_sysctls_map(),
            ..Default::default()
        },
        tunnels: crate::model::TunnelState {
            links: [
                ("istioin".to_string(), true),
                ("istioout".to_string(), true),
            ]
            .into(),
        },
        links_present: vec!["istioin".into(), "istioout".into()],
        zt: a.zt.as_ref().map(|(_, z)| crate::model::NsState {
            rules: z.rules.clone(),
            routes: z.routes.clone(),
            iptables: reconcile::plan::iptables_of(&z.chains),
            sysctls: z.sysctls.clone(),
            ..Default::default()
        }),
        pod_rp_filter: vec![Some(2); a.pods.len()],
        ..Default::default()
    };
    assert!(reconcile::plan(&a, &have).is_empty());
}

#[tokio::test]
async fn policy_changes_enroll_and_release_known_pods() {
    let mut c = cfg();
    c.ambient_namespaces.clear();
    let w = World::new(c).await;
    w.d.add(ev("a", "shop", "a", "10.244.1.5", "vetha"))
        .await
        .expect("a");
    w.d.add(ev("b", "shop", "b", "10.244.1.6", "vethb"))
        .await
        .expect("b");
    assert!(w.dp.kernel().ipset.as_ref().is_some_and(|s| s.is_empty()));
    let mut p = crate::daemon::Policy::default();
    p.namespaces.insert("shop".into());
    p.excluded_pods.insert(("shop".into(), "b".into()));
    assert!(w.d.set_policy(p.clone()).await.ok());
    let set = w.dp.kernel().ipset.clone().expect("set");
    assert_eq!(
        set.keys().copied().collect::<Vec<_>>(),
        vec![ip("10.244.1.5")]
    );
    // A pod added later follows the policy too.
    w.d.add(ev("c", "shop", "c", "10.244.1.8", "vethc"))
        .await
        .expect("c");
    assert!(w
        .dp
        .kernel()
        .ipset
        .as_ref()
        .is_some_and(|s| s.contains_key(&ip("10.244.1.8"))));
    p.namespaces.clear();
    assert!(w.d.set_policy(p).await.ok());
    assert!(w.dp.kernel().ipset.as_ref().is_some_and(|s| s.is_empty()));
    assert!(w.pending().await.is_empty());
}
