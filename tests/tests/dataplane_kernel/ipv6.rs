//! IPv6 against the real kernel: the `inet6` ipset through our netlink codec, `ip -6` rules and
//! routes (with what the kernel adds: metric 1024, no scopes, `unreachable … dev lo`), ip6tables
//! chains in both backends (rendered by the reconciler, read back in `ip6tables-save`'s normal
//! form), and tunnel links carrying their ULA addresses.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambient_cni_daemon::config::{tables, Config, IpFamilies};
use ambient_cni_daemon::dataplane::netlink::IptablesBackend;
use ambient_cni_daemon::dataplane::{Dataplane, Firewall};
use ambient_cni_daemon::model::{
    Family, Ns, Prefix, Route, RouteKey, RouteKind, Scope, TunnelMode,
};
use ambient_cni_daemon::reconcile::desired::{
    node_chains, node_rules, zt_chains, zt_rules, Ztunnel,
};

use super::{dataplane, ns_path, require_root, sh, tunnels, udp_reaches, TestNs};

fn ip6(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn pfx6(s: &str) -> Prefix {
    let (a, l) = s.split_once('/').expect("a/len");
    Prefix::new(ip6(a), l.parse().expect("len"))
}

fn route6(table: u32, dst: &str, metric: u32, kind: RouteKind) -> Route {
    Route {
        key: RouteKey {
            table,
            dst: pfx6(dst),
            metric,
        },
        kind,
        dev: None,
        via: None,
        src: None,
        scope: Scope::Universe,
        onlink: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_ipset_is_inet6_with_comments_next_to_the_ipv4_one() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let dp = dataplane(&node, IptablesBackend::Auto);
    assert_eq!(dp.podset_list(Family::V6).await.expect("list"), None);
    dp.podset_create(Family::V6).await.expect("create v6");
    dp.podset_create(Family::V6).await.expect("again");
    dp.podset_create(Family::V4).await.expect("create v4");
    let (a, b) = (ip6("fd00:10:244:1::5"), ip6("fd00:10:244:1::6"));
    dp.podset_add(a, "uid-old").await.expect("add");
    dp.podset_add(a, "uid-a").await.expect("update comment");
    dp.podset_add(b, "uid-b").await.expect("add");
    let v4: IpAddr = "10.244.1.5".parse().expect("v4");
    dp.podset_add(v4, "uid-4")
        .await
        .expect("v4 goes to the v4 set");
    let want = BTreeMap::from([(a, "uid-a".to_string()), (b, "uid-b".to_string())]);
    assert_eq!(dp.podset_list(Family::V6).await.expect("list"), Some(want));
    assert_eq!(
        dp.podset_list(Family::V4).await.expect("list"),
        Some(BTreeMap::from([(v4, "uid-4".to_string())]))
    );
    let listing = sh(&node, "ipset list ztunnel-pods-ips6");
    eprintln!("{listing}");
    assert!(listing.contains("Type: hash:ip"), "{listing}");
    assert!(listing.contains("family inet6"), "{listing}");
    assert!(
        listing.contains("fd00:10:244:1::5 comment \"uid-a\""),
        "{listing}"
    );
    // A bulk add (pipelined, mixed families, as a repair after a flush sends it).
    let many: Vec<(IpAddr, String)> = (0..300u16)
        .map(|i| (ip6(&format!("fd00:10:244:2::{i:x}")), format!("u{i}")))
        .chain((0..3u8).map(|i| (format!("10.244.2.{i}").parse().expect("v4"), "w".into())))
        .collect();
    let res = dp.podset_add_many(&many).await;
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    assert_eq!(
        dp.podset_list(Family::V6)
            .await
            .expect("list")
            .map(|m| m.len()),
        Some(302)
    );
    dp.podset_del(a).await.expect("del");
    dp.podset_del(a).await.expect("del again");
    dp.podset_destroy(Family::V6).await.expect("destroy");
    assert_eq!(dp.podset_list(Family::V6).await.expect("list"), None);
    assert!(dp.podset_list(Family::V4).await.expect("list").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_rules_are_their_own_list() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let ns = Ns::Node;
    let prios = [100, 101, 102, 103, 20000, 20003];
    let want: Vec<_> = node_rules(Family::V6)
        .into_iter()
        .chain(zt_rules(Family::V6))
        .collect();
    for r in &want {
        dp.rule_add(&ns, r).await.expect("add");
        dp.rule_add(&ns, r).await.expect("add twice");
    }
    let shown = sh(&node, "ip -6 rule show");
    eprintln!("{shown}");
    assert!(
        shown.contains("100:\tfrom all fwmark 0x200/0x200 goto 32766 proto 212"),
        "{shown}"
    );
    assert!(
        shown.contains("20000:\tfrom all fwmark 0x400/0xfff lookup 100 proto 212"),
        "{shown}"
    );
    assert!(
        !sh(&node, "ip -4 rule show").contains("proto 212"),
        "no IPv4 rule"
    );
    let mut got = dp
        .rules_list(&ns, &[Family::V6], &prios)
        .await
        .expect("list");
    got.sort();
    let mut sorted = want.clone();
    sorted.sort();
    assert_eq!(got, sorted);
    assert!(dp
        .rules_list(&ns, &[Family::V4], &prios)
        .await
        .expect("list v4")
        .is_empty());
    for r in &want {
        dp.rule_del(&ns, r).await.expect("del");
        dp.rule_del(&ns, r).await.expect("del twice");
    }
    assert!(!sh(&node, "ip -6 rule show").contains("proto 212"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_routes_read_back_as_written() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let ns = Ns::Node;
    sh(
        &node,
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 && \
         ip link add istioin type veth peer name pistioin && \
         ip link add zv0 type veth peer name zv1 && \
         ip addr add fd69:7374:696f:7e::1/126 dev istioin nodad && \
         ip addr add fd00:10:244:1::1/128 dev zv0 nodad && \
         for l in istioin pistioin zv0 zv1; do ip link set $l up; done",
    );
    let mut pod = route6(100, "fd00:10:244:1::5/128", 0, RouteKind::Unicast);
    pod.dev = Some("istioin".into());
    pod.via = Some(ip6("fd69:7374:696f:7e::2"));
    pod.src = Some(ip6("fd00:10:244:1::1"));
    let mut zip = route6(100, "fd00:10:244:1::9/128", 0, RouteKind::Unicast);
    zip.dev = Some("zv0".into());
    let mut out = route6(101, "::/0", 0, RouteKind::Unicast);
    out.dev = Some("istioin".into());
    out.via = Some(ip6("fd69:7374:696f:7e::2"));
    let fallback = route6(101, "::/0", tables::FALLBACK_METRIC, RouteKind::Unreachable);
    let mut ret = route6(102, "::/0", 0, RouteKind::Unicast);
    ret.dev = Some("zv0".into());
    ret.via = Some(ip6("fd00:10:244:1::9"));
    ret.onlink = true;
    let mut local = route6(100, "::/0", 0, RouteKind::Local);
    local.dev = Some("lo".into());
    let all = [&pod, &zip, &out, &fallback, &ret];
    for r in all {
        dp.route_replace(&ns, r)
            .await
            .unwrap_or_else(|e| panic!("{r}: {e}"));
        dp.route_replace(&ns, r)
            .await
            .unwrap_or_else(|e| panic!("again {r}: {e}"));
    }
    eprintln!("{}", sh(&node, "ip -6 route show table all proto 212"));
    let mut got = dp
        .routes_list(&ns, &[Family::V6], &[100, 101, 102])
        .await
        .expect("list");
    got.sort();
    let mut want: Vec<Route> = all.iter().map(|r| (*r).clone()).collect();
    want.sort();
    assert_eq!(got, want, "read back exactly as written (metric 1024 = 0)");
    assert!(dp
        .routes_list(&ns, &[Family::V4], &[100, 101, 102])
        .await
        .expect("v4")
        .is_empty());
    // The tunnel default goes, its unreachable fallback (metric-0 delete says 1024) stays.
    dp.route_del(&ns, &out).await.expect("del");
    dp.route_del(&ns, &out).await.expect("del twice");
    let left = dp
        .routes_list(&ns, &[Family::V6], &[101])
        .await
        .expect("list");
    assert_eq!(left, vec![fallback.clone()]);
    // The local default of a ztunnel netns.
    let zt = t.add("zt");
    let zns = Ns::Pod(ns_path(&zt));
    dp.route_replace(&zns, &local).await.expect("local ::/0");
    assert_eq!(
        dp.routes_list(&zns, &[Family::V6], &[100])
            .await
            .expect("list"),
        vec![local.clone()]
    );
    assert!(sh(&zt, "ip -6 route show table 100").contains("local default dev lo proto 212"));
    // Pods' routes in a batch, then the main-table lookup of one of them.
    let batch: Vec<Route> = (1..=100u16)
        .map(|i| Route {
            key: RouteKey {
                table: 100,
                dst: Prefix::host(ip6(&format!("fd00:10:244:3::{i:x}"))),
                metric: 0,
            },
            ..pod.clone()
        })
        .collect();
    let res = dp.route_replace_many(&ns, &batch).await;
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    assert_eq!(
        dp.routes_list(&ns, &[Family::V6], &[100])
            .await
            .expect("list")
            .len(),
        102
    );
    sh(&node, "ip -6 route add fd00:10:244:1::7/128 dev zv0");
    assert_eq!(
        dp.route_dev_lookup(ip6("fd00:10:244:1::7"))
            .await
            .expect("lookup"),
        Some("zv0".into())
    );
}

fn ztunnel6(zt_ns: &str) -> Ztunnel {
    Ztunnel {
        ns: Ns::Pod(ns_path(zt_ns)),
        ip: Some("10.244.1.9".parse().expect("v4")),
        ip6: Some("fd00:10:244:1::9".parse().expect("v6")),
        host_if: "zv0".into(),
        ifname: "eth0".into(),
        gateway: Some("10.244.1.1".parse().expect("v4")),
        gateway6: Some("fd00:10:244:1::1".parse().expect("v6")),
    }
}

/// The reconciler's own ip6tables chains, applied and read back: the text it renders must be
/// `ip6tables-save`'s normal form, or every resync would rewrite them.
async fn ip6tables_case(backend: IptablesBackend) {
    let mut t = TestNs::new();
    let node = t.add("node");
    let zt = t.add("zt");
    sh(&node, "ip link add zv0 type veth peer name zv1");
    let dp = dataplane(&node, backend);
    dp.podset_create(Family::V6).await.expect("set");
    let cfg = Config {
        ip_families: IpFamilies::DUAL,
        ..Config::default()
    };
    let z = ztunnel6(&zt);
    let zip = z.ip_of(Family::V6).expect("v6");
    let chains = node_chains(
        &cfg,
        Family::V6,
        Some(("zv0", zip)),
        Some(ip6("fd00:10:244:1::1")),
    );
    for (ns, chains) in [
        (Ns::Node, chains.clone()),
        (z.ns.clone(), zt_chains(&cfg, Family::V6, &z, zip)),
    ] {
        dp.chains_apply(&ns, Family::V6, &chains)
            .await
            .expect("apply");
        let st = dp
            .chains_read(&ns, Family::V6, &chains)
            .await
            .expect("read");
        for c in &chains {
            assert_eq!(
                st.chains.get(&(c.table.clone(), c.name.clone())),
                Some(&c.rules),
                "{backend} {ns} {}/{}: not in ip6tables-save normal form",
                c.table,
                c.name
            );
            assert_eq!(
                st.jumps
                    .get(&(c.table.clone(), c.hook.clone(), c.name.clone())),
                Some(&vec![1])
            );
        }
        // IPv4 tables untouched.
        assert!(dp
            .chains_read(&ns, Family::V4, &chains)
            .await
            .expect("read v4")
            .chains
            .is_empty());
    }
    let save = sh(&zt, &format!("ip6tables-{backend}-save -t mangle"));
    eprintln!("{save}");
    assert!(save.contains("--on-ip ::1"), "{save}");
    let save = sh(&node, &format!("ip6tables-{backend}-save"));
    assert!(save.contains("--match-set ztunnel-pods-ips6 src"), "{save}");
    dp.chains_remove(&Ns::Node, Family::V6, &chains)
        .await
        .expect("remove");
    assert!(!sh(&node, &format!("ip6tables-{backend}-save")).contains("ztunnel-"));
    dp.podset_destroy(Family::V6).await.expect("set free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip6tables_legacy_chains_in_normal_form() {
    if !require_root() {
        return;
    }
    ip6tables_case(IptablesBackend::Legacy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip6tables_nft_chains_in_normal_form() {
    if !require_root() {
        return;
    }
    ip6tables_case(IptablesBackend::Nft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_carry_their_ipv6_addresses_usable_at_once() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let zt = t.add("zt");
    // A namespace whose default disables IPv6 on new links: the tunnels must still get theirs.
    sh(&zt, "sysctl -qw net.ipv6.conf.default.disable_ipv6=1");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let mut want = tunnels(&zt, TunnelMode::Veth);
    let cfg = Config::default();
    want.links[0].node_addr6 = Some(cfg.inbound6.0);
    want.links[0].peer_addr6 = Some(cfg.inbound6.1);
    want.links[1].node_addr6 = Some(cfg.outbound6.0);
    want.links[1].peer_addr6 = Some(cfg.outbound6.1);
    for l in ["istioin", "istioout"] {
        dp.tunnel_create(&want, l).await.expect("create");
    }
    let st = dp.tunnels_read(&want).await.expect("read");
    assert_eq!(
        st.links,
        BTreeMap::from([("istioin".into(), true), ("istioout".into(), true)])
    );
    let a = sh(&node, "ip -6 addr show dev istioin");
    eprintln!("{a}");
    let ours = a
        .lines()
        .find(|l| l.contains("fd69:7374:696f:7e::1/126"))
        .unwrap_or_else(|| panic!("no tunnel address\n{a}"));
    assert!(!ours.contains("tentative"), "nodad: usable at once\n{a}");
    let p = sh(&zt, "ip -6 addr show dev pistioout");
    assert!(p.contains("fd69:7374:696f:7f::2/126"), "{p}");
    // Both ends are reachable over the tunnels right after creation (no DAD wait).
    assert!(
        udp_reaches(&node, &zt, ip6("fd69:7374:696f:7e::2")),
        "node -> pistioin over IPv6"
    );
    assert!(
        udp_reaches(&zt, &node, ip6("fd69:7374:696f:7f::1")),
        "pistioout -> istioout over IPv6"
    );
    // Someone removes the peer's IPv6 address: no longer wired.
    sh(&zt, "ip addr del fd69:7374:696f:7e::2/126 dev pistioin");
    let st = dp.tunnels_read(&want).await.expect("read");
    assert_eq!(st.links.get("istioin"), Some(&false));
    // Without IPv6 addresses wanted, the same links are wired (IPv4 only).
    let v4only = tunnels(&zt, TunnelMode::Veth);
    assert_eq!(
        dp.tunnels_read(&v4only)
            .await
            .expect("read")
            .links
            .get("istioout"),
        Some(&true)
    );
}
