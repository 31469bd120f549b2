//! Enrollment without a CNI ADD on the fake dataplane: by hand (`enroll_running`,
//! `release_running`), the host-interface rule, and how such records meet CNI ADDs (one record
//! per pod, IP reuse). The watcher's side is in `k8s_running_tests.rs`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::*;
use crate::config::{tables, Config};
use crate::daemon::{test_event, Daemon, RequestError};
use crate::dataplane::fake::FakeDataplane;
use crate::model::{Ns, Prefix, RouteKey, RouteKind, Scope};
use crate::registry::Registry;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn pod(ns: &str, name: &str, ips: &[&str]) -> RunningPod {
    RunningPod {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        ips: ips
            .iter()
            .map(|s| s.parse::<IpAddr>().expect("test IP"))
            .collect(),
        host_network: false,
    }
}

struct World {
    dp: Arc<FakeDataplane>,
    d: Daemon<FakeDataplane>,
}

impl World {
    /// `default` is ambient; a ztunnel (10.244.1.9 on vethz) is up; pods' host routes: .5 on
    /// vetha, .6 on vethb.
    async fn new() -> World {
        let mut c = Config::default();
        c.ambient_namespaces.insert("default".into());
        let dp = Arc::new(FakeDataplane::new());
        {
            let mut k = dp.kernel();
            for l in ["vethz", "vetha", "vethb", "vethc"] {
                k.add_host_link(l);
            }
            k.host_routes.insert(ip("10.244.1.5"), "vetha".into());
            k.host_routes.insert(ip("10.244.1.6"), "vethb".into());
        }
        let d = Daemon::new(Arc::new(c), dp.clone(), None, Registry::default());
        assert!(d.resync().await.ok());
        let zt = test_event("zt", "istio-system", "ztunnel-1", "10.244.1.9", "vethz");
        assert!(d.add(zt).await.expect("ztunnel ADD").ztunnel);
        World { dp, d }
    }

    /// ipset members with their owner.
    fn ipset(&self) -> Vec<(IpAddr, String)> {
        self.dp
            .kernel()
            .ipset
            .as_ref()
            .map(|s| s.iter().map(|(a, o)| (*a, o.clone())).collect())
            .unwrap_or_default()
    }

    fn inbound_route(&self, a: &str) -> Option<crate::model::Route> {
        let k = self.dp.kernel();
        k.ns[&Ns::Node]
            .routes
            .get(&RouteKey {
                table: tables::INBOUND,
                dst: Prefix::host(ip(a)),
                metric: 0,
            })
            .cloned()
    }

    fn rp_filter(&self, dev: &str) -> Option<String> {
        self.dp.kernel().ns[&Ns::Node]
            .sysctls
            .get(&crate::model::rp_filter_key(dev))
            .cloned()
    }

    async fn records(&self) -> Vec<serde_json::Value> {
        self.d.dump().await["pods"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p["ztunnel"] == false)
            .collect()
    }
}

#[test]
fn the_host_interface_comes_only_from_a_direct_route() {
    let a = ip("10.244.1.5");
    let route = |len: u8, via: Option<&str>, dev: Option<&str>| crate::model::Route {
        key: RouteKey {
            table: 254,
            dst: Prefix {
                addr: if len == 0 {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    ip("10.244.1.0")
                },
                len,
            },
            metric: 0,
        },
        kind: RouteKind::Unicast,
        dev: dev.map(String::from),
        via: via.map(ip),
        src: None,
        scope: Scope::Link,
        onlink: false,
    };
    // ptp / kindnet / Calico: a /32 to the pod's veth; bridge: the subnet on the bridge.
    assert_eq!(
        host_if_of(a, Some(&route(32, None, Some("veth1")))),
        Ok("veth1".into())
    );
    assert_eq!(
        host_if_of(a, Some(&route(24, None, Some("cni0")))),
        Ok("cni0".into())
    );
    let no_route = host_if_of(a, None).expect_err("no route");
    assert!(no_route.contains("no route to 10.244.1.5"), "{no_route}");
    let default =
        host_if_of(a, Some(&route(0, Some("10.0.0.1"), Some("eth0")))).expect_err("default");
    assert!(default.contains("only the default route"), "{default}");
    let gw = host_if_of(a, Some(&route(24, Some("10.0.0.7"), Some("eth0")))).expect_err("gateway");
    assert!(gw.contains("through gateway 10.0.0.7"), "{gw}");
    assert!(host_if_of(a, Some(&route(32, None, None))).is_err());
    assert!(host_if_of(a, Some(&route(32, None, Some("bad name")))).is_err());
}

#[tokio::test]
async fn enroll_by_hand_programs_the_pod_and_release_undoes_it() {
    let w = World::new().await;
    // An IPv6 address on an IPv4-only node: refused whole, nothing recorded.
    let err =
        w.d.enroll_running(pod("default", "app", &["10.244.1.5", "fd00::5"]))
            .await
            .expect_err("IPv6 is off");
    assert!(err.to_string().contains("IPv6 is off"), "{err}");
    assert!(w.ipset().is_empty() && w.records().await.is_empty());
    let out =
        w.d.enroll_running(pod("default", "app", &["10.244.1.5"]))
            .await
            .expect("enrolled");
    assert!(out.enrolled, "{}", out.detail);
    assert!(out.detail.contains("vetha"), "{}", out.detail);
    assert_eq!(w.ipset(), vec![(ip("10.244.1.5"), "uid-app".to_string())]);
    let r = w.inbound_route("10.244.1.5").expect("table-100 route");
    assert_eq!(r.dev.as_deref(), Some("istioin"));
    assert_eq!(w.rp_filter("vetha").as_deref(), Some("2"));
    let recs = w.records().await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["container_id"], "manual:uid-app");
    assert_eq!(recs[0]["netns"], "");
    // Again: nothing changes.
    let writes = w.dp.kernel().writes;
    w.d.enroll_running(pod("default", "app", &["10.244.1.5"]))
        .await
        .expect("again");
    assert_eq!(w.dp.kernel().writes, writes);
    // The periodic pass neither sweeps it (no netns) nor finds drift.
    assert!(w.d.resync().await.applied.is_empty());
    assert_eq!(w.records().await.len(), 1);

    let out = w.d.release_running("uid-app").await.expect("released");
    assert!(!out.enrolled);
    assert!(w.ipset().is_empty());
    assert!(w.inbound_route("10.244.1.5").is_none());
    assert!(w.records().await.is_empty());
    let again = w.d.release_running("uid-app").await.expect("nothing to do");
    assert!(again.detail.contains("nothing to do"), "{}", again.detail);
}

#[tokio::test]
async fn enroll_by_hand_refuses_what_it_cannot_do_safely() {
    let w = World::new().await;
    let refused = |r: Result<EnrollOutcome, RequestError>| match r {
        Err(RequestError::Precondition(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let m = refused(w.d.enroll_running(pod("plain", "p", &["10.244.1.5"])).await);
    assert!(m.contains("namespace plain is not ambient"), "{m}");
    let m = refused(
        w.d.enroll_running(pod("default", "q", &["10.244.1.7"]))
            .await,
    );
    assert!(m.contains("host interface not found"), "{m}");
    // A gateway route covering the pod is not its host interface: never guessed from.
    w.dp.kernel().main_routes.push(crate::model::Route {
        key: RouteKey {
            table: 254,
            dst: Prefix::DEFAULT,
            metric: 0,
        },
        kind: RouteKind::Unicast,
        dev: Some("eth0".into()),
        via: Some(ip("192.0.2.1")),
        src: None,
        scope: Scope::Universe,
        onlink: false,
    });
    let m = refused(
        w.d.enroll_running(pod("default", "q", &["10.244.1.7"]))
            .await,
    );
    assert!(m.contains("only the default route"), "{m}");
    let m = refused(w.d.enroll_running(pod("default", "v6", &["fd00::7"])).await);
    assert!(m.contains("IPv6"), "{m}");
    let m = refused(
        w.d.enroll_running(pod("istio-system", "ztunnel-2", &["10.244.1.5"]))
            .await,
    );
    assert!(m.contains("not ambient") || m.contains("ztunnel"), "{m}");
    for bad in [
        pod("default", "", &["10.244.1.5"]),
        RunningPod {
            uid: String::new(),
            ..pod("default", "x", &["10.244.1.5"])
        },
        RunningPod {
            uid: "a;b".into(),
            ..pod("default", "x", &["10.244.1.5"])
        },
        pod("default", "x", &[]),
    ] {
        assert!(
            matches!(
                w.d.enroll_running(bad.clone()).await,
                Err(RequestError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
    // An IP that a CNI record of another pod holds is not taken.
    w.d.add(test_event("c1", "default", "b", "10.244.1.6", "vethb"))
        .await
        .expect("ADD");
    let m = refused(
        w.d.enroll_running(pod("default", "app", &["10.244.1.6"]))
            .await,
    );
    assert!(m.contains("held by the sandbox of default/b"), "{m}");
    // A pod known from its CNI ADD: enroll leaves it alone, release refuses.
    let known = RunningPod {
        uid: "uid-c1".into(),
        ..pod("default", "b", &["10.244.1.6"])
    };
    let out = w.d.enroll_running(known).await.expect("known");
    assert!(
        out.enrolled && out.detail.contains("CNI ADD"),
        "{}",
        out.detail
    );
    let m = refused(w.d.release_running("uid-c1").await);
    assert!(m.contains("its DEL releases it"), "{m}");
    assert_eq!(w.ipset(), vec![(ip("10.244.1.6"), "uid-c1".to_string())]);
    assert_eq!(
        w.records().await.len(),
        1,
        "nothing recorded by the refusals"
    );
}

#[tokio::test]
async fn a_cni_add_of_the_same_pod_takes_the_record_over() {
    let w = World::new().await;
    w.d.enroll_running(pod("default", "app", &["10.244.1.5"]))
        .await
        .expect("enrolled");
    // The pod's sandbox is re-created (or its ADD simply arrives late): same UID.
    let mut ev = test_event("sandbox1", "default", "app", "10.244.1.5", "vetha");
    ev.uid = "uid-app".into();
    assert!(w.d.add(ev).await.expect("ADD").enrolled);
    let recs = w.records().await;
    assert_eq!(recs.len(), 1, "one record per pod: {recs:?}");
    assert_eq!(recs[0]["container_id"], "sandbox1");
    assert_eq!(w.ipset(), vec![(ip("10.244.1.5"), "uid-app".to_string())]);
    // Its DEL now releases it.
    assert!(w.d.del("sandbox1", "eth0").await.expect("DEL"));
    assert!(w.ipset().is_empty());
}

#[tokio::test]
async fn a_cni_add_of_another_pod_with_the_ip_releases_the_stale_record() {
    let w = World::new().await;
    w.d.enroll_running(pod("default", "old", &["10.244.1.5"]))
        .await
        .expect("enrolled");
    // The old pod is gone (nobody told us); its IP goes to a new pod of a namespace that is not
    // ambient. The new pod must not be captured through the old pod's record.
    let ev = test_event("new1", "plain", "new", "10.244.1.5", "vetha");
    assert!(!w.d.add(ev).await.expect("ADD").enrolled);
    assert!(w.ipset().is_empty(), "{:?}", w.ipset());
    assert!(w.inbound_route("10.244.1.5").is_none());
    let recs = w.records().await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["container_id"], "new1");
    let trace = w.d.trace("uid-old", 10);
    assert!(trace.iter().any(|e| e.kind == "release"), "{trace:?}");
}
