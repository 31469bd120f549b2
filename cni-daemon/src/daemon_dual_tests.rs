//! IPv6 and dual-stack pods on the fake dataplane: every IPv4 object has its IPv6 mirror, a DEL
//! removes both families, drift of either is repaired, and what cannot be captured is refused
//! before anything changes.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{tables, Config, IpFamilies};
use crate::daemon::{Daemon, PodEvent, RequestError};
use crate::dataplane::fake::FakeDataplane;
use crate::model::{Family, Ns, Prefix, RouteKey, RouteKind, Rule};
use crate::registry::Registry;

const V6_GW: &str = "fd00:10:244:1::1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn cfg(families: IpFamilies) -> Config {
    let mut c = Config::default();
    c.ambient_namespaces.insert("default".into());
    c.ip_families = families;
    c
}

/// A CNI ADD with these addresses (`None`: no address of that family), ptp-style gateways.
fn ev(cid: &str, ns: &str, name: &str, v4: Option<&str>, v6: Option<&str>, hif: &str) -> PodEvent {
    let addrs: Vec<&str> = v4.into_iter().chain(v6).collect();
    crate::daemon::test_event_ips(cid, ns, name, &addrs, hif)
}

struct World {
    dp: Arc<FakeDataplane>,
    d: Daemon<FakeDataplane>,
}

impl World {
    async fn new(c: Config) -> World {
        let dp = Arc::new(FakeDataplane::new());
        for l in ["vethz", "vetha", "vethb", "vethc"] {
            dp.kernel().add_host_link(l);
        }
        let d = Daemon::new(Arc::new(c), dp.clone(), None, Registry::default());
        let r = d.resync().await;
        assert!(r.ok(), "{:?}", r.errors);
        World { dp, d }
    }

    async fn pending(&self) -> Vec<String> {
        let v = self.d.dump().await;
        v["pending"]
            .as_array()
            .map(|a| a.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }

    fn route(&self, ns: &Ns, table: u32, dst: Prefix, metric: u32) -> Option<crate::model::Route> {
        let k = self.dp.kernel();
        k.ns.get(ns)
            .and_then(|n| n.routes.get(&RouteKey { table, dst, metric }).cloned())
    }

    fn in_set(&self, a: &str) -> Option<String> {
        let a = ip(a);
        let mut k = self.dp.kernel();
        k.ipset_of(Family::of(a))
            .as_ref()
            .and_then(|s| s.get(&a).cloned())
    }

    fn rules(&self, ns: &Ns, f: Family) -> Vec<Rule> {
        let k = self.dp.kernel();
        k.ns.get(ns)
            .map(|n| n.rules.iter().filter(|r| r.family == f).copied().collect())
            .unwrap_or_default()
    }

    /// A dual-stack ztunnel (10.244.1.2, fd00:10:244:1::2 on vethz).
    async fn ztunnel(&self) {
        let z = self
            .d
            .add(ev(
                "z",
                "istio-system",
                "ztunnel-1",
                Some("10.244.1.2"),
                Some("fd00:10:244:1::2"),
                "vethz",
            ))
            .await
            .expect("ztunnel add");
        assert!(z.ztunnel);
    }
}

#[tokio::test]
async fn dual_stack_pod_gets_every_object_in_both_families() {
    let w = World::new(cfg(IpFamilies::DUAL)).await;
    w.ztunnel().await;
    let out =
        w.d.add(ev(
            "a",
            "default",
            "app",
            Some("10.244.1.5"),
            Some("fd00:10:244:1::5"),
            "vetha",
        ))
        .await
        .expect("add");
    assert!(out.enrolled);
    // Both sets hold the pod, owner as comment.
    assert_eq!(w.in_set("10.244.1.5").as_deref(), Some("uid-a"));
    assert_eq!(w.in_set("fd00:10:244:1::5").as_deref(), Some("uid-a"));
    // The table-100 route of each family, into istioin via the tunnel's own family's peer.
    let r6 = w
        .route(
            &Ns::Node,
            tables::INBOUND,
            Prefix::host(ip("fd00:10:244:1::5")),
            0,
        )
        .expect("v6 tunnel route");
    assert_eq!(
        (r6.via, r6.dev.as_deref(), r6.src),
        (
            Some(ip("fd69:7374:696f:7e::2")),
            Some("istioin"),
            Some(ip(V6_GW))
        )
    );
    assert!(w
        .route(
            &Ns::Node,
            tables::INBOUND,
            Prefix::host(ip("10.244.1.5")),
            0
        )
        .is_some());
    // Rules 100-103 in both families; tables 101/102 of both.
    assert_eq!(w.rules(&Ns::Node, Family::V4).len(), 4);
    assert_eq!(w.rules(&Ns::Node, Family::V6).len(), 4);
    let out6 = w
        .route(
            &Ns::Node,
            tables::OUTBOUND,
            Prefix::default_of(Family::V6),
            0,
        )
        .expect("v6 outbound default");
    assert_eq!(out6.via, Some(ip("fd69:7374:696f:7f::2")));
    let ret6 = w
        .route(
            &Ns::Node,
            tables::PROXY_RET,
            Prefix::default_of(Family::V6),
            0,
        )
        .expect("v6 return default");
    assert_eq!(
        (ret6.via, ret6.onlink),
        (Some(ip("fd00:10:244:1::2")), true)
    );
    // ip6tables: the same chains with the v6 set and the ztunnel's v6 address.
    {
        let k = w.dp.kernel();
        let node = &k.ns[&Ns::Node];
        assert_eq!(node.jumps6.len(), 9);
        let pre6 = &node.chains6[&("mangle".to_string(), "ztunnel-PREROUTING".to_string())];
        assert!(pre6.iter().any(|r| r
            == "-p tcp -m set --match-set ztunnel-pods-ips6 src -j MARK --set-xmark 0x100/0x100"));
        assert!(pre6
            .iter()
            .any(|r| r == "! -s fd00:10:244:1::2/128 -i vethz -j MARK --set-xmark 0x210/0x210"));
        let out = &node.chains6[&("mangle".to_string(), "ztunnel-OUTPUT".to_string())];
        assert!(out[0].starts_with(&format!("-s {V6_GW}/128 -p tcp -m owner")));
        // The ztunnel netns: TPROXY on ::1, rules 20000/20003 and a local default, IPv6.
        let zns = Ns::Pod("/tmp/acni-fake-netns-z".into());
        let z = &k.ns[&zns];
        let tp = &z.chains6[&("mangle".to_string(), "ztunnel-PREROUTING".to_string())];
        assert!(tp
            .iter()
            .any(|r| r.contains("--on-port 15001 --on-ip ::1 --tproxy-mark 0x400/0xfff")));
        assert!(tp
            .iter()
            .any(|r| r.starts_with("! -d fd00:10:244:1::2/128 -i eth0")));
        assert_eq!(z.rules.iter().filter(|r| r.family == Family::V6).count(), 2);
        let local6 = z
            .routes
            .get(&RouteKey {
                table: tables::ZT_LOCAL,
                dst: Prefix::default_of(Family::V6),
                metric: 0,
            })
            .expect("v6 local route");
        assert_eq!(local6.kind, RouteKind::Local);
        // The tunnels carry their IPv6 addresses.
        assert_eq!(k.tunnel_addr6.len(), 2);
    }
    assert!(w.pending().await.is_empty(), "{:?}", w.pending().await);
    // DEL removes both families.
    assert!(w.d.del("a", "eth0").await.expect("del"));
    assert_eq!(w.in_set("10.244.1.5"), None);
    assert_eq!(w.in_set("fd00:10:244:1::5"), None);
    assert!(w
        .route(
            &Ns::Node,
            tables::INBOUND,
            Prefix::host(ip("fd00:10:244:1::5")),
            0
        )
        .is_none());
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn ipv6_only_pod_before_and_after_its_ztunnel() {
    let w = World::new(cfg(IpFamilies::DUAL)).await;
    // No ztunnel: accepted and held closed (unreachable default in the v6 table 101, hold rule).
    let a =
        w.d.add(ev(
            "a",
            "default",
            "app",
            None,
            Some("fd00:10:244:1::5"),
            "vetha",
        ))
        .await
        .expect("add");
    assert!(a.enrolled);
    assert_eq!(w.in_set("fd00:10:244:1::5").as_deref(), Some("uid-a"));
    let fallback = w
        .route(
            &Ns::Node,
            tables::OUTBOUND,
            Prefix::default_of(Family::V6),
            tables::FALLBACK_METRIC,
        )
        .expect("v6 fallback");
    assert_eq!(fallback.kind, RouteKind::Unreachable);
    assert!(w
        .route(
            &Ns::Node,
            tables::INBOUND,
            Prefix::host(ip("fd00:10:244:1::5")),
            0
        )
        .is_none());
    {
        let k = w.dp.kernel();
        let hold = &k.ns[&Ns::Node].chains6[&("filter".to_string(), "ztunnel-FORWARD".to_string())];
        assert!(hold
            .iter()
            .any(|r| r.contains("ztunnel-pods-ips6 dst") && r.contains("REJECT")));
    }
    w.ztunnel().await;
    assert!(w
        .route(
            &Ns::Node,
            tables::INBOUND,
            Prefix::host(ip("fd00:10:244:1::5")),
            0
        )
        .is_some());
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn an_ipv6_pod_is_refused_when_the_ztunnel_has_no_ipv6_address() {
    let w = World::new(cfg(IpFamilies::DUAL)).await;
    w.d.add(ev(
        "z",
        "istio-system",
        "ztunnel-1",
        Some("10.244.1.2"),
        None,
        "vethz",
    ))
    .await
    .expect("ztunnel add");
    let writes = w.dp.kernel().writes;
    let e =
        w.d.add(ev(
            "a",
            "default",
            "app",
            Some("10.244.1.5"),
            Some("fd00:10:244:1::5"),
            "vetha",
        ))
        .await
        .expect_err("refused");
    let RequestError::Precondition(msg) = e else {
        panic!("not a refusal: {e:?}");
    };
    assert!(msg.contains("IPv6") && msg.contains("ztunnel"), "{msg}");
    // Never half-applied: not even the IPv4 address went in, and nothing was recorded.
    assert_eq!(w.dp.kernel().writes, writes);
    assert_eq!(w.in_set("10.244.1.5"), None);
    assert_eq!(w.d.status().await.pods, 1);
    // A plain IPv4 pod is fine, and so is an IPv6 pod outside ambient namespaces.
    w.d.add(ev("b", "default", "b", Some("10.244.1.6"), None, "vethb"))
        .await
        .expect("v4 pod");
    let c =
        w.d.add(ev(
            "c",
            "other",
            "c",
            None,
            Some("fd00:10:244:1::7"),
            "vethc",
        ))
        .await
        .expect("not enrolled");
    assert!(!c.enrolled);
}

#[tokio::test]
async fn an_ipv6_pod_is_refused_when_ipv6_is_off() {
    let w = World::new(cfg(IpFamilies::default())).await;
    {
        let k = w.dp.kernel();
        assert!(k.ipset6.is_none(), "no IPv6 objects when IPv6 is off");
        assert!(k.ns[&Ns::Node].chains6.is_empty());
    }
    let e =
        w.d.add(ev(
            "a",
            "default",
            "app",
            None,
            Some("fd00:10:244:1::5"),
            "vetha",
        ))
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("--ip-families v4"), "{e}");
}

#[tokio::test]
async fn drift_of_ipv6_objects_is_repaired_and_a_reused_ipv6_address_keeps_its_new_owner() {
    let w = World::new(cfg(IpFamilies::DUAL)).await;
    w.ztunnel().await;
    let v6 = "fd00:10:244:1::5";
    w.d.add(ev(
        "a",
        "default",
        "a",
        Some("10.244.1.5"),
        Some(v6),
        "vetha",
    ))
    .await
    .expect("a");
    // Someone flushes the v6 set and deletes a v6 rule and the pod's v6 route.
    {
        let mut k = w.dp.kernel();
        k.ipset6.as_mut().expect("set6").clear();
        let node = k.ns.get_mut(&Ns::Node).expect("node");
        node.rules
            .retain(|r| !(r.family == Family::V6 && r.priority == tables::RULE_OUTBOUND));
        node.routes.remove(&RouteKey {
            table: tables::INBOUND,
            dst: Prefix::host(ip(v6)),
            metric: 0,
        });
    }
    let pending = w.pending().await;
    assert_eq!(pending.len(), 3, "{pending:?}");
    assert!(w.d.resync().await.ok());
    assert_eq!(w.in_set(v6).as_deref(), Some("uid-a"));
    assert_eq!(w.rules(&Ns::Node, Family::V6).len(), 4);
    assert!(w.pending().await.is_empty());
    // Pod b gets the same IPv6 address before a's DEL: a's late DEL leaves b's entry and route.
    w.d.add(ev(
        "b",
        "default",
        "b",
        Some("10.244.1.6"),
        Some(v6),
        "vethb",
    ))
    .await
    .expect("b");
    assert_eq!(w.in_set(v6).as_deref(), Some("uid-b"));
    w.d.del("a", "eth0").await.expect("late del");
    assert_eq!(w.in_set(v6).as_deref(), Some("uid-b"));
    assert_eq!(w.in_set("10.244.1.5"), None);
    assert!(w
        .route(&Ns::Node, tables::INBOUND, Prefix::host(ip(v6)), 0)
        .is_some());
    assert!(w.pending().await.is_empty());
}

#[tokio::test]
async fn a_dual_stack_plan_is_empty_against_its_own_result_and_v4_only_nodes_are_unchanged() {
    // An IPv4-only configuration builds exactly what it did before dual stack: no v6 object.
    let w4 = World::new(cfg(IpFamilies::default())).await;
    w4.d.add(ev(
        "z",
        "istio-system",
        "ztunnel-1",
        Some("10.244.1.2"),
        Some("fd00:10:244:1::2"),
        "vethz",
    ))
    .await
    .expect("zt");
    {
        let k = w4.dp.kernel();
        assert!(k.tunnel_addr6.is_empty());
        for n in k.ns.values() {
            assert!(n.rules.iter().all(|r| r.family == Family::V4));
            assert!(n.routes.keys().all(|k| k.dst.family() == Family::V4));
            assert!(n.chains6.is_empty());
        }
    }
    assert!(w4.pending().await.is_empty());
    // The same ztunnel on a dual-stack node: the tunnels are re-made with their IPv6 addresses.
    let w = World::new(cfg(IpFamilies::DUAL)).await;
    w.ztunnel().await;
    let writes = w.dp.kernel().writes;
    assert!(w.d.resync().await.ok());
    assert_eq!(
        w.dp.kernel().writes,
        writes,
        "a no-change resync writes nothing"
    );
}

/// A node that ran dual stack and restarts with `--ip-families v4` keeps nothing of IPv6: its
/// set, ip6tables chains, `ip -6` rules and routes go on start, in the node and in the ztunnel
/// netns; the IPv4 objects stay as they were.
#[tokio::test]
async fn a_family_switched_off_leaves_nothing_of_its_objects_after_the_restart() {
    if !crate::config::ipv6_available() {
        eprintln!("this kernel has no IPv6: no object of it can exist");
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    let boot = |families: IpFamilies, dp: &Arc<FakeDataplane>| {
        let (store, reg, _) = crate::store::Store::open(state.path()).expect("state dir");
        Daemon::new(Arc::new(cfg(families)), dp.clone(), Some(store), reg)
    };
    let w = World::new(cfg(IpFamilies::DUAL)).await;
    let d = boot(IpFamilies::DUAL, &w.dp);
    assert!(d.resync().await.ok());
    let (z, a) = (
        ev(
            "z",
            "istio-system",
            "ztunnel-1",
            Some("10.244.1.2"),
            Some("fd00:10:244:1::2"),
            "vethz",
        ),
        ev(
            "a",
            "default",
            "a",
            Some("10.244.1.5"),
            Some("fd00:10:244:1::5"),
            "vetha",
        ),
    );
    assert!(d.add(z).await.expect("zt").ztunnel);
    assert!(d.add(a).await.expect("a").enrolled);
    let v6_objects = |k: &crate::dataplane::fake::FakeKernel| -> usize {
        k.ns.values()
            .map(|n| {
                n.rules.iter().filter(|r| r.family == Family::V6).count()
                    + n.routes
                        .keys()
                        .filter(|k| k.dst.family() == Family::V6)
                        .count()
                    + n.chains6.len()
            })
            .sum::<usize>()
            + k.ipset6.as_ref().map_or(0, |s| s.len() + 1)
    };
    let before = v6_objects(&w.dp.kernel());
    assert!(before > 0, "the dual-stack run made IPv6 objects");
    let v4_of = |k: &crate::dataplane::fake::FakeKernel| -> Vec<Vec<Rule>> {
        k.ns.values()
            .map(|n| {
                n.rules
                    .iter()
                    .filter(|r| r.family == Family::V4)
                    .copied()
                    .collect()
            })
            .collect()
    };
    let v4_rules = v4_of(&w.dp.kernel());
    drop(d);

    let d = boot(IpFamilies::default(), &w.dp);
    assert!(d.resync().await.ok());
    let k = w.dp.kernel();
    println!("IPv6 objects: {before} before, {} after", v6_objects(&k));
    assert_eq!(v6_objects(&k), 0, "IPv6 objects left: {:#?}", k.ns);
    assert_eq!(
        k.ipset
            .as_ref()
            .and_then(|s| s.get(&ip("10.244.1.5")).cloned()),
        Some("uid-a".to_string()),
        "the IPv4 capture stays"
    );
    assert_eq!(v4_of(&k), v4_rules, "IPv4 rules untouched");
}
