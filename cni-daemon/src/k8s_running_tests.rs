//! Running pods from the API, end to end on the fake API server: pods that no CNI ADD told the
//! daemon about are enrolled when their namespace is (and released when it is not), deleted
//! pods and moved IPs lose their entries, a later CNI ADD of the pod is the same record, and
//! what cannot be enrolled is reported with its reason.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::fake_api::*;
use super::*;
use crate::config::{tables, Config};
use crate::daemon::test_event_ips;
use crate::dataplane::fake::FakeDataplane;
use crate::model::{Ns, Prefix, RouteKey};

impl Node {
    /// Main-table /32 routes of pods: IP → host interface (as ptp leaves them).
    fn host_route(&self, a: &str, dev: &str) {
        let mut k = self.dp.kernel();
        k.add_host_link(dev);
        k.host_routes.insert(ip(a), dev.into());
    }

    fn inbound_route(&self, a: &str) -> bool {
        self.dp.kernel().ns[&Ns::Node]
            .routes
            .contains_key(&RouteKey {
                table: tables::INBOUND,
                dst: Prefix::host(ip(a)),
                metric: 0,
            })
    }

    fn rp_filter(&self, dev: &str) -> Option<String> {
        self.dp.kernel().ns[&Ns::Node]
            .sysctls
            .get(&crate::model::rp_filter_key(dev))
            .cloned()
    }

    /// Non-ztunnel records: (container ID, UID).
    async fn records(&self) -> BTreeSet<(String, String)> {
        self.daemon.dump().await["pods"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|p| p["ztunnel"] == false)
            .map(|p| {
                (
                    p["container_id"].as_str().unwrap_or("").to_string(),
                    p["uid"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// A node with a ztunnel up (10.244.1.9 on vethz), so enrolled pods get table-100 routes.
    async fn with_ztunnel() -> Node {
        Node::with_ztunnel_of(Config::default(), &["10.244.1.9"]).await
    }

    /// A dual-stack node (`--ip-families v4,v6`) with a dual-stack ztunnel on vethz.
    async fn dual_stack() -> Node {
        let c = Config {
            ip_families: crate::config::IpFamilies { v4: true, v6: true },
            ..Default::default()
        };
        Node::with_ztunnel_of(c, &["10.244.1.9", "fd00:10:244:1::9"]).await
    }

    async fn with_ztunnel_of(cfg: Config, zt_ips: &[&str]) -> Node {
        let n = Node::new(cfg).await;
        n.dp.kernel().add_host_link("vethz");
        let zt = test_event_ips("zt", "istio-system", "ztunnel-1", zt_ips, "vethz");
        assert!(n.daemon.add(zt).await.expect("ztunnel ADD").ztunnel);
        n
    }
}

fn running(ns: &str, name: &str, ips: &[&str]) -> serde_json::Value {
    running_pod_json(ns, name, NODE, false, &[], ips)
}

fn pairs(v: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn running_pods_are_enrolled_when_their_namespace_is_and_released_when_not() {
    let api = FakeApi::default();
    api.put_ns("shop", &[]);
    // Pods that ran before the plugin was in the chain: no CNI ADD will ever come for them.
    api.put_pod_json("shop", "a", running("shop", "a", &["10.244.1.5"]));
    api.put_pod_json("shop", "b", running("shop", "b", &["10.244.1.6"]));
    api.put_pod_json(
        "shop",
        "far",
        running_pod_json("shop", "far", "node-2", false, &[], &["10.244.2.5"]),
    );
    let mut n = Node::with_ztunnel().await;
    n.host_route("10.244.1.5", "vetha");
    n.host_route("10.244.1.6", "vethb");
    n.watch(&api);
    n.until("in sync", |n| n.policies().len() == 1).await;
    assert!(n.captured().is_empty(), "shop is not ambient yet");
    assert!(n.records().await.is_empty());

    let t0 = tokio::time::Instant::now();
    api.put_ns("shop", &[AMBIENT]);
    n.until("running pods enrolled", |n| {
        n.captured() == set(&["10.244.1.5", "10.244.1.6"])
    })
    .await;
    println!("enrolled {:?} after the label (virtual time)", t0.elapsed());
    assert_eq!(
        n.owners(),
        vec![
            (ip("10.244.1.5"), "uid-a".to_string()),
            (ip("10.244.1.6"), "uid-b".to_string())
        ],
        "owner = pod UID"
    );
    assert!(n.inbound_route("10.244.1.5") && n.inbound_route("10.244.1.6"));
    assert_eq!(n.rp_filter("vetha").as_deref(), Some("2"));
    assert_eq!(n.rp_filter("vethb").as_deref(), Some("2"));
    assert_eq!(
        n.records().await,
        pairs(&[("api:uid-a", "uid-a"), ("api:uid-b", "uid-b")])
    );
    // A resync changes nothing: the records are not swept (no netns) and the kernel matches.
    assert!(n.daemon.resync().await.applied.is_empty());

    api.put_ns("shop", &[]);
    n.until("released", |n| n.captured().is_empty()).await;
    assert!(!n.inbound_route("10.244.1.5"));
    assert!(n.records().await.is_empty(), "nothing left behind");
}

#[tokio::test(start_paused = true)]
async fn deleted_pods_and_moved_ips_lose_their_entries() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_pod_json("shop", "a", running("shop", "a", &["10.244.1.5"]));
    let mut n = Node::with_ztunnel().await;
    n.host_route("10.244.1.5", "vetha");
    n.watch(&api);
    n.until("a enrolled", |n| n.captured() == set(&["10.244.1.5"]))
        .await;

    // Deleted: its entries go.
    api.del_pod("shop", "a");
    n.until("a released", |n| n.captured().is_empty()).await;
    assert!(!n.inbound_route("10.244.1.5"));
    assert!(n.records().await.is_empty());

    // Its IP goes to another running pod (another UID): that one owns it now.
    api.put_pod_json("shop", "a2", running("shop", "a2", &["10.244.1.5"]));
    n.until("a2 enrolled", |n| {
        n.owners() == vec![(ip("10.244.1.5"), "uid-a2".to_string())]
    })
    .await;

    // The IP moves again, this time to a pod of a namespace that is not ambient, whose CNI ADD
    // arrives before the API tells us a2 is gone: the runtime's word wins, a2's entries go.
    assert!(!n.add("x1", "plain", "x", "10.244.1.5", "vetha").await);
    assert!(n.captured().is_empty(), "{:?}", n.owners());
    // The API's stale view of a2 (still listed) does not take the IP back.
    api.put_pod_json(
        "shop",
        "a2",
        running_pod_json(
            "shop",
            "a2",
            NODE,
            false,
            &[("touched", "yes")],
            &["10.244.1.5"],
        ),
    );
    api.put_pod_json("shop", "other", running("shop", "other", &[]));
    n.until("a2 reported", |n| {
        n.dp.kernel().writes > 0 && n.daemon.trace("held by the sandbox", 10).len() == 1
    })
    .await;
    assert!(n.captured().is_empty());
    assert_eq!(n.records().await, pairs(&[("x1", "uid-x1")]));
}

#[tokio::test(start_paused = true)]
async fn a_cni_add_of_a_pod_known_from_the_api_is_the_same_record() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_pod_json("shop", "a", running("shop", "a", &["10.244.1.5"]));
    let mut n = Node::with_ztunnel().await;
    n.host_route("10.244.1.5", "vetha");
    n.watch(&api);
    n.until("a enrolled", |n| n.captured() == set(&["10.244.1.5"]))
        .await;
    // test_event gives UID uid-<cid>: the pod's sandbox "a" is pod uid-a.
    assert!(n.add("a", "shop", "a", "10.244.1.5", "vetha").await);
    assert_eq!(n.records().await, pairs(&[("a", "uid-a")]), "one record");
    // More API updates of the pod do not make a second record.
    api.put_pod_json(
        "shop",
        "a",
        running_pod_json("shop", "a", NODE, false, &[("v", "2")], &["10.244.1.5"]),
    );
    api.put_ns("bank", &[AMBIENT]);
    n.until("bank in", |n| {
        n.policies()
            .last()
            .is_some_and(|p| p.namespaces.contains("bank"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(n.records().await, pairs(&[("a", "uid-a")]));
    assert_eq!(n.owners(), vec![(ip("10.244.1.5"), "uid-a".to_string())]);
    // Its DEL releases it, as for any CNI pod.
    assert!(n.daemon.del("a", "eth0").await.expect("DEL"));
    assert!(n.captured().is_empty());
}

#[tokio::test(start_paused = true)]
async fn pods_that_cannot_be_enrolled_are_reported_with_the_reason() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_ns("plain", &[]);
    api.put_pod_json("shop", "ok", running("shop", "ok", &["10.244.1.5"]));
    api.put_pod_json("shop", "noip", running("shop", "noip", &[]));
    api.put_pod_json("shop", "v6", running("shop", "v6", &["fd00::7"]));
    api.put_pod_json(
        "shop",
        "host",
        running_pod_json("shop", "host", NODE, true, &[], &["198.51.100.1"]),
    );
    api.put_pod_json(
        "shop",
        "optout",
        running_pod_json("shop", "optout", NODE, false, &[DISABLED], &["10.244.1.8"]),
    );
    // No route of its own: only a route through a gateway covers it. Never guessed from.
    api.put_pod_json(
        "shop",
        "nohost",
        running("shop", "nohost", &["10.244.1.10"]),
    );
    // Not in an enrolled namespace: not reported.
    api.put_pod_json("plain", "p", running("plain", "p", &["10.244.1.11"]));
    let mut pending = running("shop", "pending", &["10.244.1.12"]);
    pending["status"]["phase"] = serde_json::json!("Pending");
    api.put_pod_json("shop", "pending", pending);
    let mut n = Node::with_ztunnel().await;
    n.host_route("10.244.1.5", "vetha");
    n.host_route("10.244.1.8", "vethb");
    n.host_route("10.244.1.12", "vethc");
    n.dp.kernel().main_routes.push(crate::model::Route {
        key: RouteKey {
            table: 254,
            dst: Prefix {
                addr: ip("10.244.0.0"),
                len: 16,
            },
            metric: 0,
        },
        kind: crate::model::RouteKind::Unicast,
        dev: Some("eth0".into()),
        via: Some(ip("192.0.2.1")),
        src: None,
        scope: crate::model::Scope::Universe,
        onlink: false,
    });
    n.watch(&api);
    n.until("ok enrolled", |n| n.captured() == set(&["10.244.1.5"]))
        .await;
    assert_eq!(n.daemon.status().await.not_enrolled, 5);
    let skips: Vec<String> = n
        .daemon
        .trace("", 100)
        .into_iter()
        .filter(|e| e.kind == "skip")
        .map(|e| e.message)
        .collect();
    let reason = |pod: &str| {
        skips
            .iter()
            .find(|m| m.starts_with(&format!("shop/{pod} ")))
            .cloned()
            .unwrap_or_else(|| panic!("no report for {pod}: {skips:?}"))
    };
    assert!(reason("noip").contains("no IP"));
    assert!(reason("v6").contains("IPv6"));
    assert!(reason("host").contains("hostNetwork"));
    assert!(reason("optout").contains("opted out"));
    assert!(reason("nohost").contains("through gateway 192.0.2.1"));
    assert_eq!(skips.len(), 5, "{skips:?}");

    // The pod gets its own route (its veth came up): the next change enrolls it.
    n.host_route("10.244.1.10", "vethd");
    api.put_pod_json(
        "shop",
        "nohost",
        running_pod_json(
            "shop",
            "nohost",
            NODE,
            false,
            &[("r", "1")],
            &["10.244.1.10"],
        ),
    );
    api.put_pod_json("shop", "noip", running("shop", "noip", &["10.244.1.13"]));
    n.host_route("10.244.1.13", "vethe");
    n.until("both enrolled", |n| {
        n.captured() == set(&["10.244.1.5", "10.244.1.10", "10.244.1.13"])
    })
    .await;
    assert_eq!(n.daemon.status().await.not_enrolled, 3);
}

/// IPv6 and dual-stack running pods: every address of `status.podIPs` is enrolled (ipset of its
/// family, table-100 route), the host interface found in the main table of each family; a pod
/// whose families are reached on different interfaces is refused, never guessed.
#[tokio::test(start_paused = true)]
async fn ipv6_and_dual_stack_running_pods_are_enrolled_in_every_family() {
    let api = FakeApi::default();
    api.put_ns("shop", &[]);
    let dual = ["10.244.1.6", "fd00:10:244:1::6"];
    api.put_pod_json("shop", "dual", running("shop", "dual", &dual));
    api.put_pod_json("shop", "v6", running("shop", "v6", &["fd00:10:244:1::7"]));
    api.put_pod_json(
        "shop",
        "split",
        running("shop", "split", &["10.244.1.8", "fd00:10:244:1::8"]),
    );
    let mut n = Node::dual_stack().await;
    n.host_route("10.244.1.6", "vethb");
    n.host_route("fd00:10:244:1::6", "vethb");
    n.host_route("fd00:10:244:1::7", "vethc");
    n.host_route("10.244.1.8", "vethd");
    n.host_route("fd00:10:244:1::8", "vethe");
    n.watch(&api);
    n.until("in sync", |n| n.policies().len() == 1).await;
    assert!(n.captured().is_empty());

    api.put_ns("shop", &[AMBIENT]);
    n.until("dual and IPv6-only pods enrolled", |n| {
        n.captured() == set(&["10.244.1.6", "fd00:10:244:1::6", "fd00:10:244:1::7"])
    })
    .await;
    let owners = n.owners();
    for (a, uid) in [
        ("10.244.1.6", "uid-dual"),
        ("fd00:10:244:1::6", "uid-dual"),
        ("fd00:10:244:1::7", "uid-v6"),
    ] {
        assert!(
            owners.contains(&(ip(a), uid.to_string())),
            "{a}: {owners:?}"
        );
        assert!(n.inbound_route(a), "table-100 route of {a}");
    }
    assert_eq!(n.rp_filter("vethb").as_deref(), Some("2"));
    let skip = n
        .daemon
        .trace("shop/split", 10)
        .into_iter()
        .find(|e| e.kind == "skip")
        .map(|e| e.message)
        .unwrap_or_default();
    assert!(
        skip.contains("vethd") && skip.contains("vethe") && skip.contains("one host interface"),
        "{skip}"
    );
    // A resync changes nothing: the IPv6 objects of these records are the ones it wants.
    assert!(n.daemon.resync().await.applied.is_empty());

    // Removing an IPv6 address (the pod is now IPv4 only) removes its entries alone.
    api.put_pod_json("shop", "dual", running("shop", "dual", &dual[..1]));
    n.until("IPv6 address released", |n| {
        n.captured() == set(&["10.244.1.6", "fd00:10:244:1::7"])
    })
    .await;
    assert!(!n.inbound_route("fd00:10:244:1::6"));
    api.del_pod("shop", "v6");
    api.put_ns("shop", &[]);
    n.until("released", |n| n.captured().is_empty()).await;
    assert!(n.records().await.is_empty());
}

/// A running pod whose host interface is missing (the primary CNI has not written its route
/// yet) is tried again on the periodic resync, without waiting for an API change.
#[tokio::test(start_paused = true)]
async fn a_pod_whose_host_interface_is_missing_is_retried_on_the_resync() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_pod_json("shop", "late", running("shop", "late", &["10.244.1.5"]));
    let mut n = Node::with_ztunnel().await;
    n.watch(&api);
    n.until("listed", |n| n.policies().len() == 1).await;
    // The watcher's apply runs after set_policy: wait for the report.
    for _ in 0..100 {
        if n.daemon.status().await.not_enrolled == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(n.daemon.status().await.not_enrolled, 1);
    assert!(n.daemon.resync().await.ok());
    assert!(
        n.captured().is_empty(),
        "still no route: still not enrolled"
    );

    n.host_route("10.244.1.5", "vetha");
    n.daemon.resync().await;
    assert_eq!(n.captured(), set(&["10.244.1.5"]), "enrolled by the resync");
    assert_eq!(n.daemon.status().await.not_enrolled, 0);
    assert_eq!(n.rp_filter("vetha").as_deref(), Some("2"));
    assert_eq!(api.requests("/api/v1/pods", false).len(), 1, "no relist");
}

/// Across a daemon restart the pods enrolled from the API stay enrolled (persisted) until the
/// lists are in, and the first sync changes nothing when the API agrees.
#[tokio::test(start_paused = true)]
async fn restart_keeps_api_enrolled_pods_without_a_gap() {
    let state = tempfile::tempdir().expect("state dir");
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_pod_json("shop", "a", running("shop", "a", &["10.244.1.5"]));
    let dp = Arc::new(FakeDataplane::new());
    {
        let mut n = Node::boot(Config::default(), dp.clone(), Some(state.path())).await;
        n.host_route("10.244.1.5", "vetha");
        n.watch(&api);
        n.until("a enrolled", |n| n.captured() == set(&["10.244.1.5"]))
            .await;
    }
    let mut n = Node::boot(Config::default(), dp, Some(state.path())).await;
    assert_eq!(
        n.captured(),
        set(&["10.244.1.5"]),
        "restored before any list"
    );
    let writes = n.dp.kernel().writes;
    n.watch(&api);
    n.until("in sync", |n| !n.policies().is_empty()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(n.captured(), set(&["10.244.1.5"]));
    assert_eq!(n.dp.kernel().writes, writes, "no release and re-enroll");
    // Deleted while the daemon was away: the first list after the restart releases it.
    drop(n);
}

#[test]
fn pod_facts_read_phase_uid_and_both_families() {
    let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(running_pod_json(
        "shop",
        "a",
        NODE,
        false,
        &[],
        &["10.244.1.5", "fd00::5", "not-an-ip", "10.244.1.5"],
    ))
    .expect("pod");
    let (_, f) = PodFacts::of(&p).expect("facts");
    assert!(f.running);
    assert_eq!(f.uid, "uid-a");
    assert_eq!(
        f.ips,
        vec![
            "10.244.1.5".parse::<std::net::IpAddr>().expect("ip"),
            "fd00::5".parse().expect("ip")
        ]
    );
    // Only status.podIP (older API servers): taken.
    let mut v = running_pod_json("shop", "b", NODE, false, &[], &[]);
    v["status"]["podIP"] = serde_json::json!("10.244.1.6");
    let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v).expect("pod");
    assert_eq!(PodFacts::of(&p).expect("facts").1.ips.len(), 1);
    let pods: Pods = [PodFacts::of(&p).expect("facts")].into_iter().collect();
    let r = running_from(&pods);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].uid.as_str(), r[0].name.as_str()), ("uid-b", "b"));
}
