//! Root-only tests of `RealDataplane` against the real kernel.
//!
//! Every test builds its own network namespaces (`acni-dp-<pid>-<n>-<role>`) with `ip netns add`,
//! points the dataplane's "node" at one of them and lets a second one play the ztunnel pod. The
//! machine's root namespace is never touched; the namespaces are deleted by a guard even when a
//! test fails. Without root the tests skip, unless `CI` is set, where they fail.
//!
//! Run: `cargo test -p ambient-cni-tests --test dataplane_kernel -- --nocapture`

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use ambient_cni_daemon::dataplane::netlink::{IptablesBackend, RealConfig, RealDataplane};
use ambient_cni_daemon::dataplane::{Dataplane, DpError, Firewall};
use ambient_cni_daemon::model::{
    rp_filter_key, Chain, Family, Ns, Prefix, Route, RouteKey, RouteKind, Rule, RuleAction, Scope,
    TunnelLink, TunnelMode, Tunnels,
};

// ---------------------------------------------------------------------------------------------
// Harness

/// True when we may run; skips (false) without root, but panics under CI.
fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but these kernel tests need root");
    }
    eprintln!("skipping: needs root to create network namespaces");
    false
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Namespaces of one test; deleted on drop (errors logged, never a panic).
struct TestNs {
    prefix: String,
    names: Vec<String>,
}

impl TestNs {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        TestNs {
            prefix: format!("acni-dp-{}-{n}", std::process::id()),
            names: Vec::new(),
        }
    }

    /// Creates `<prefix>-<role>` with `lo` up; returns its name.
    fn add(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        run("ip", &["netns", "add", &name]);
        self.names.push(name.clone());
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    fn del(&mut self, name: &str) {
        run("ip", &["netns", "del", name]);
        self.names.retain(|n| n != name);
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        for n in self.names.drain(..) {
            match Command::new("ip").args(["netns", "del", &n]).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cleanup: ip netns del {n}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("cleanup: ip netns del {n}: {e}"),
            }
        }
    }
}

fn ns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{name}"))
}

/// Runs a command, panics with its stderr when it fails, returns stdout.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip netns exec <ns> sh -c <script>`.
fn sh(ns: &str, script: &str) -> String {
    run("ip", &["netns", "exec", ns, "sh", "-c", script])
}

/// Sends one UDP datagram from namespace `from` to `to_ip` (an address in namespace `to`) and
/// reports whether it arrived. Each end runs on its own short-lived thread inside its namespace.
fn udp_reaches(from: &str, to: &str, to_ip: impl Into<IpAddr>) -> bool {
    let to_ip: IpAddr = to_ip.into();
    fn enter(ns: &str) {
        let f = std::fs::File::open(ns_path(ns)).expect("open netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let to = to.to_string();
    let rx = std::thread::spawn(move || {
        enter(&to);
        let sock = std::net::UdpSocket::bind((to_ip, 40999)).expect("bind");
        sock.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .expect("timeout");
        let _ = ready_tx.send(());
        let mut buf = [0u8; 16];
        matches!(sock.recv(&mut buf), Ok(5) if &buf[..5] == b"hello")
    });
    let from = from.to_string();
    let tx = std::thread::spawn(move || {
        let _ = ready_rx.recv();
        enter(&from);
        let any: IpAddr = if to_ip.is_ipv6() {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let sock = std::net::UdpSocket::bind((any, 0)).expect("bind");
        // A first datagram can be lost while the neighbour entry resolves; send a few.
        for _ in 0..3 {
            let _ = sock.send_to(b"hello", (to_ip, 40999));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let _ = tx.join();
    rx.join().unwrap_or(false)
}

fn dataplane(node: &str, backend: IptablesBackend) -> RealDataplane {
    RealDataplane::new(RealConfig {
        node_netns: Some(ns_path(node)),
        iptables_backend: backend,
        ..RealConfig::default()
    })
    .expect("RealDataplane::new")
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

/// An IPv4 address as the family-tagged model holds it.
fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn pfx(s: &str) -> Prefix {
    let (a, l) = s.split_once('/').expect("a/len");
    Prefix {
        addr: ip(a),
        len: l.parse().expect("len"),
    }
}

// ---------------------------------------------------------------------------------------------
// ipset

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipset_lifecycle_is_idempotent_and_keeps_comments() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let dp = dataplane(&node, IptablesBackend::Auto);

    assert_eq!(
        dp.podset_list(Family::V4).await.expect("list"),
        None,
        "no set yet"
    );
    dp.podset_create(Family::V4).await.expect("create");
    dp.podset_create(Family::V4)
        .await
        .expect("create again is a no-op");
    assert_eq!(
        dp.podset_list(Family::V4).await.expect("list"),
        Some(BTreeMap::new())
    );

    let (a, b) = (ip("10.244.1.5"), ip("10.244.1.6"));
    dp.podset_add(a, "uid-old").await.expect("add");
    dp.podset_add(a, "uid-new")
        .await
        .expect("add again updates the comment");
    dp.podset_add(b, "uid-b").await.expect("add");
    let want = BTreeMap::from([(a, "uid-new".to_string()), (b, "uid-b".to_string())]);
    assert_eq!(dp.podset_list(Family::V4).await.expect("list"), Some(want));

    let listing = sh(&node, "ipset list ztunnel-pods-ips");
    assert!(listing.contains("Type: hash:ip"), "{listing}");
    assert!(
        listing.contains("comment"),
        "created with the comment extension: {listing}"
    );
    assert!(
        listing.contains("10.244.1.5 comment \"uid-new\""),
        "{listing}"
    );
    eprintln!("ipset as the ipset tool sees it:\n{listing}");

    dp.podset_del(a).await.expect("del");
    dp.podset_del(a)
        .await
        .expect("del of a missing entry is fine");
    assert_eq!(
        dp.podset_list(Family::V4).await.expect("list"),
        Some(BTreeMap::from([(b, "uid-b".to_string())]))
    );

    dp.podset_destroy(Family::V4).await.expect("destroy");
    dp.podset_destroy(Family::V4)
        .await
        .expect("destroy of a missing set is fine");
    assert_eq!(dp.podset_list(Family::V4).await.expect("list"), None);
    // Deleting from a missing set: the entry is not there either (ENOENT on remove = done).
    dp.podset_del(a).await.expect("del from a missing set");
    dp.podset_add(a, "uid")
        .await
        .expect_err("adding to a missing set is an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipset_in_use_cannot_be_destroyed_and_says_why() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let dp = dataplane(&node, IptablesBackend::Legacy);
    dp.podset_create(Family::V4).await.expect("create");
    sh(
        &node,
        "iptables-legacy -t mangle -A PREROUTING -m set --match-set ztunnel-pods-ips src -j RETURN",
    );
    let err = dp
        .podset_destroy(Family::V4)
        .await
        .expect_err("referenced set");
    assert!(err.to_string().contains("in use"), "{err}");
    sh(&node, "iptables-legacy -t mangle -F PREROUTING");
    dp.podset_destroy(Family::V4)
        .await
        .expect("destroy once unreferenced");
}

// ---------------------------------------------------------------------------------------------
// rules

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_add_twice_list_ours_and_delete_by_full_selector() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let ztunnel = t.add("zt");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let ns = Ns::Node;

    let skip = Rule {
        family: Family::V4,
        priority: 100,
        fwmark: Some((0x200, 0x200)),
        action: RuleAction::Goto(32766),
    };
    let out = Rule {
        family: Family::V4,
        priority: 101,
        fwmark: Some((0x100, 0x100)),
        action: RuleAction::Lookup(101),
    };
    let ret = Rule {
        family: Family::V4,
        priority: 102,
        fwmark: Some((0x40, 0x40)),
        action: RuleAction::Lookup(102),
    };
    let inb = Rule {
        family: Family::V4,
        priority: 103,
        fwmark: None,
        action: RuleAction::Lookup(100),
    };
    for r in [&skip, &out, &ret, &inb] {
        dp.rule_add(&ns, r).await.expect("add");
        dp.rule_add(&ns, r).await.expect("add twice");
    }
    let shown = sh(&node, "ip rule show");
    eprintln!("{shown}");
    for p in ["100:", "101:", "102:", "103:"] {
        assert_eq!(
            shown.lines().filter(|l| l.starts_with(p)).count(),
            1,
            "one rule at {p}\n{shown}"
        );
    }
    assert!(
        !shown.contains(" none"),
        "every rule has an action\n{shown}"
    );
    assert!(
        shown.contains("100:\tfrom all fwmark 0x200/0x200 goto 32766"),
        "{shown}"
    );
    assert!(
        shown.contains("101:\tfrom all fwmark 0x100/0x100 lookup 101"),
        "{shown}"
    );

    // Foreign rules: one at our priority with a selector we do not model, one elsewhere.
    sh(
        &node,
        "ip rule add priority 101 iif eth0 lookup 300; ip rule add priority 5000 lookup 200",
    );
    let listed: BTreeSet<Rule> = dp
        .rules_list(&ns, &[Family::V4], &[100, 101, 102, 103])
        .await
        .expect("list")
        .into_iter()
        .collect();
    assert_eq!(listed, BTreeSet::from([skip, out, ret, inb]));

    // Lookups through our rules work (a rule added without an action would answer EINVAL).
    sh(&node, "ip link add dv0 type veth peer name dv1 && ip link set dv0 up && ip route add default dev dv0 table 101");
    let got = sh(&node, "ip route get 10.1.2.3 mark 0x100");
    assert!(got.contains("dev dv0 table 101"), "{got}");
    let got = sh(&node, "ip route get 10.1.2.3 mark 0x300 2>&1 || true");
    assert!(
        !got.contains("table 101"),
        "0x200 skips to main first: {got}"
    );

    dp.rule_del(&ns, &out).await.expect("del");
    dp.rule_del(&ns, &out).await.expect("del twice");
    let shown = sh(&node, "ip rule show");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("101:") && l.contains("iif eth0") && l.contains("lookup 300")),
        "foreign rule stays\n{shown}"
    );
    assert!(!shown.contains("fwmark 0x100/0x100"), "{shown}");
    let listed: BTreeSet<Rule> = dp
        .rules_list(&ns, &[Family::V4], &[101])
        .await
        .expect("list")
        .into_iter()
        .collect();
    assert!(listed.is_empty());

    // Same operations in a pod namespace.
    let zt = Ns::Pod(ns_path(&ztunnel));
    let tproxy = Rule {
        family: Family::V4,
        priority: 20000,
        fwmark: Some((0x400, 0xfff)),
        action: RuleAction::Lookup(100),
    };
    dp.rule_add(&zt, &tproxy).await.expect("add in pod ns");
    dp.rule_add(&zt, &tproxy)
        .await
        .expect("add twice in pod ns");
    assert_eq!(
        dp.rules_list(&zt, &[Family::V4], &[20000])
            .await
            .expect("list"),
        vec![tproxy]
    );
    assert!(sh(&ztunnel, "ip rule show").contains("20000:\tfrom all fwmark 0x400/0xfff lookup 100"));
    assert!(
        dp.rules_list(&ns, &[Family::V4], &[20000])
            .await
            .expect("list")
            .is_empty(),
        "not in the node ns"
    );
}

// ---------------------------------------------------------------------------------------------
// routes

fn route(table: u32, dst: &str, metric: u32, kind: RouteKind) -> Route {
    Route {
        key: RouteKey {
            table,
            dst: pfx(dst),
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
async fn routes_replace_list_delete_only_ours() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let ns = Ns::Node;
    sh(
        &node,
        "ip link add dv0 type veth peer name dv1 && ip addr add 10.9.0.1/24 dev dv0 && \
         ip link set dv0 up && ip link set dv1 up",
    );

    let mut pod = route(100, "10.244.1.5/32", 0, RouteKind::Unicast);
    pod.dev = Some("dv0".into());
    pod.via = Some(ip("10.9.0.2"));
    pod.src = Some(ip("10.9.0.1"));
    let mut zip = route(100, "10.244.1.9/32", 0, RouteKind::Unicast);
    zip.dev = Some("dv0".into());
    zip.scope = Scope::Link;
    let mut ret = route(102, "0.0.0.0/0", 0, RouteKind::Unicast);
    ret.dev = Some("dv0".into());
    ret.via = Some(ip("10.244.1.9"));
    ret.onlink = true;
    let mut local = route(1000, "0.0.0.0/0", 0, RouteKind::Local);
    local.dev = Some("lo".into());
    local.scope = Scope::Host;
    let mut out = route(101, "0.0.0.0/0", 0, RouteKind::Unicast);
    out.dev = Some("dv0".into());
    out.via = Some(ip("10.9.0.2"));
    let fallback = route(101, "0.0.0.0/0", 4000, RouteKind::Unreachable);

    let all = [&pod, &zip, &ret, &local, &out, &fallback];
    for r in all {
        dp.route_replace(&ns, r)
            .await
            .unwrap_or_else(|e| panic!("replace {r}: {e}"));
        dp.route_replace(&ns, r)
            .await
            .unwrap_or_else(|e| panic!("replace twice {r}: {e}"));
    }
    eprintln!("{}", sh(&node, "ip route show table all proto 212"));

    // Foreign routes in our tables: never listed, deleted or replaced.
    sh(&node, "ip route add 10.244.7.7/32 dev dv0 table 100 && ip route add 10.244.1.200/32 dev dv0 table 100");
    let tables = [100, 101, 102, 1000];
    let listed: BTreeSet<Route> = dp
        .routes_list(&ns, &[Family::V4], &tables)
        .await
        .expect("list")
        .into_iter()
        .collect();
    let want: BTreeSet<Route> = all.iter().map(|r| (*r).clone()).collect();
    assert_eq!(listed, want);

    let mut clash = route(100, "10.244.1.200/32", 0, RouteKind::Unicast);
    clash.dev = Some("dv0".into());
    let err = dp
        .route_replace(&ns, &clash)
        .await
        .expect_err("a foreign route has that key");
    assert!(err.to_string().contains("not ours"), "{err}");
    dp.route_del(&ns, &clash)
        .await
        .expect("deleting a key we do not have is fine");
    dp.route_del(&ns, &route(100, "10.244.7.7/32", 0, RouteKind::Unicast))
        .await
        .expect("del");
    let t100 = sh(&node, "ip route show table 100");
    assert!(
        t100.contains("10.244.7.7 dev dv0"),
        "foreign route survives\n{t100}"
    );
    assert!(
        t100.contains("10.244.1.200 dev dv0"),
        "foreign route survives\n{t100}"
    );

    // Replace changes a route in place.
    let mut moved = pod.clone();
    moved.via = Some(ip("10.9.0.3"));
    dp.route_replace(&ns, &moved).await.expect("replace");
    let t100 = sh(&node, "ip route show table 100 proto 212");
    assert_eq!(
        t100.lines()
            .filter(|l| l.starts_with("10.244.1.5 "))
            .count(),
        1,
        "{t100}"
    );
    assert!(t100.contains("10.244.1.5 via 10.9.0.3 dev dv0"), "{t100}");

    // Deleting metric 0 must not take the metric-4000 fallback with it (the kernel's delete
    // treats metric 0 as a wildcard).
    dp.route_del(&ns, &out).await.expect("del");
    dp.route_del(&ns, &out).await.expect("del twice");
    let listed: BTreeSet<Route> = dp
        .routes_list(&ns, &[Family::V4], &[101])
        .await
        .expect("list")
        .into_iter()
        .collect();
    assert_eq!(listed, BTreeSet::from([fallback.clone()]));
    dp.route_del(&ns, &fallback).await.expect("del fallback");
    assert!(dp
        .routes_list(&ns, &[Family::V4], &[101])
        .await
        .expect("list")
        .is_empty());
    dp.route_del(&ns, &route(4242, "0.0.0.0/0", 0, RouteKind::Unicast))
        .await
        .expect("delete in a table that does not exist");

    let mut nodev = pod.clone();
    nodev.dev = Some("nosuchdev0".into());
    assert!(matches!(
        dp.route_replace(&ns, &nodev).await,
        Err(DpError::NoSuchLink(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_dev_lookup_uses_the_main_table() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let dp = dataplane(&node, IptablesBackend::Auto);
    sh(
        &node,
        "ip link add pv0 type veth peer name pv1 && ip link set pv0 up && \
         ip link add tv0 type veth peer name tv1 && ip link set tv0 up && \
         ip route add 10.244.1.5/32 dev pv0 scope link && \
         ip route add 10.244.1.5/32 dev tv0 table 100 && ip rule add priority 103 lookup 100",
    );
    assert_eq!(
        dp.route_dev_lookup(ip("10.244.1.5")).await.expect("lookup"),
        Some("pv0".to_string())
    );
    assert_eq!(
        dp.route_dev_lookup(ip("10.99.0.1")).await.expect("lookup"),
        None,
        "no default route"
    );
    sh(
        &node,
        "ip addr add 10.8.0.1/24 dev tv0 && ip route add default via 10.8.0.2",
    );
    assert_eq!(
        dp.route_dev_lookup(ip("10.99.0.1")).await.expect("lookup"),
        Some("tv0".to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// tunnels

fn tunnels(ztunnel: &str, mode: TunnelMode) -> Tunnels {
    Tunnels {
        mode,
        ztunnel_ns: Ns::Pod(ns_path(ztunnel)),
        ztunnel_ip: ip4("10.244.1.9"),
        node_ip: ip4("10.244.1.1"),
        mtu: 1400,
        links: vec![
            TunnelLink {
                node_name: "istioin".into(),
                node_addr: pfx("192.168.126.1/30"),
                peer_name: "pistioin".into(),
                peer_addr: pfx("192.168.126.2/30"),
                node_addr6: None,
                peer_addr6: None,
                vni: 1000,
            },
            TunnelLink {
                node_name: "istioout".into(),
                node_addr: pfx("192.168.127.1/30"),
                peer_name: "pistioout".into(),
                peer_addr: pfx("192.168.127.2/30"),
                node_addr6: None,
                peer_addr6: None,
                vni: 1001,
            },
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veth_tunnels_create_read_recreate_delete() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let zt = t.add("zt");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let want = tunnels(&zt, TunnelMode::Veth);
    let names = vec!["istioin".to_string(), "istioout".to_string()];

    assert!(dp.tunnels_read(&want).await.expect("read").links.is_empty());
    assert!(dp
        .tunnel_links_present(&names)
        .await
        .expect("present")
        .is_empty());

    dp.tunnel_create(&want, "istioin")
        .await
        .expect("create istioin");
    dp.tunnel_create(&want, "istioout")
        .await
        .expect("create istioout");
    let st = dp.tunnels_read(&want).await.expect("read");
    assert_eq!(
        st.links,
        BTreeMap::from([("istioin".into(), true), ("istioout".into(), true)])
    );
    assert_eq!(
        dp.tunnel_links_present(&names).await.expect("present"),
        names
    );
    let node_links = sh(&node, "ip -o link show");
    assert!(
        !node_links.contains("acnt"),
        "no temporary peer left behind\n{node_links}"
    );
    let zt_links = sh(&zt, "ip -o addr show");
    assert!(
        zt_links.contains("pistioin") && zt_links.contains("192.168.126.2/30"),
        "{zt_links}"
    );
    assert!(sh(&zt, "ip -o link show pistioout").contains("mtu 1400"));
    // It carries traffic.
    assert!(
        udp_reaches(&node, &zt, ip4("192.168.126.2")),
        "node -> pistioin"
    );
    assert!(
        udp_reaches(&zt, &node, ip4("192.168.127.1")),
        "ztunnel -> istioout"
    );

    // Re-create over an existing pair: one pair, still wired.
    dp.tunnel_create(&want, "istioin").await.expect("re-create");
    assert_eq!(
        sh(&node, "ip -o link show")
            .lines()
            .filter(|l| l.contains(" istioin@"))
            .count(),
        1
    );
    assert_eq!(
        dp.tunnels_read(&want)
            .await
            .expect("read")
            .links
            .get("istioin"),
        Some(&true)
    );

    // Drift: the peer goes down, then a stale peer name without partner.
    sh(&zt, "ip link set pistioin down");
    assert_eq!(
        dp.tunnels_read(&want)
            .await
            .expect("read")
            .links
            .get("istioin"),
        Some(&false)
    );
    dp.tunnel_create(&want, "istioin").await.expect("repair");
    assert_eq!(
        dp.tunnels_read(&want)
            .await
            .expect("read")
            .links
            .get("istioin"),
        Some(&true)
    );

    // The ztunnel netns goes away: not wired (not an error) ...
    t.del(&zt);
    let st = dp
        .tunnels_read(&want)
        .await
        .expect("read without the ztunnel netns");
    assert!(st.links.values().all(|ok| !ok), "{st:?}");
    dp.tunnel_create(&want, "istioin")
        .await
        .expect_err("no ztunnel netns to create into");
    // ... and a new ztunnel at the same path gets fresh tunnels.
    let zt2 = t.add("zt");
    assert_eq!(zt2, zt);
    let st = dp.tunnels_read(&want).await.expect("read");
    assert!(
        st.links.values().all(|ok| !ok),
        "new netns has no peers yet: {st:?}"
    );
    dp.tunnel_create(&want, "istioin")
        .await
        .expect("create in the new netns");
    dp.tunnel_create(&want, "istioout")
        .await
        .expect("create in the new netns");
    let st = dp.tunnels_read(&want).await.expect("read");
    assert_eq!(
        st.links,
        BTreeMap::from([("istioin".into(), true), ("istioout".into(), true)])
    );

    dp.link_del("istioin").await.expect("link_del");
    dp.link_del("istioin").await.expect("link_del twice");
    assert_eq!(
        dp.tunnel_links_present(&names).await.expect("present"),
        vec!["istioout".to_string()]
    );
    assert!(
        !sh(&zt2, "ip -o link show").contains("pistioin"),
        "peer went with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geneve_tunnels_fail_clearly_without_the_module() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let zt = t.add("zt");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let want = tunnels(&zt, TunnelMode::Geneve);
    match dp.tunnel_create(&want, "istioin").await {
        Ok(()) => {
            eprintln!("this kernel has geneve");
            assert_eq!(
                dp.tunnels_read(&want)
                    .await
                    .expect("read")
                    .links
                    .get("istioin"),
                Some(&true)
            );
        }
        Err(e) => {
            let msg = e.to_string();
            eprintln!("geneve create: {msg}");
            assert!(msg.contains("geneve"), "{msg}");
            assert!(dp
                .tunnel_links_present(&["istioin".into()])
                .await
                .expect("present")
                .is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// iptables

/// (table, chain, hook, [(input rule, iptables-save form)]) for the node, from kernel-state.md
/// §1.2 with ZV = zv0, ZIP = 10.244.1.9, HIP = 10.244.1.1, GP = 6081. Inputs are copied as the
/// seed prints them (including its double spaces).
fn node_seed() -> Seed {
    vec![
        (
            "mangle",
            "ztunnel-PREROUTING",
            "PREROUTING",
            vec![
                ("-i istioin  -j MARK --set-xmark 0x200/0x200", "-i istioin -j MARK --set-xmark 0x200/0x200"),
                ("-i istioin  -j RETURN", "-i istioin -j RETURN"),
                ("-i istioout -j MARK --set-xmark 0x200/0x200", "-i istioout -j MARK --set-xmark 0x200/0x200"),
                ("-i istioout -j RETURN", "-i istioout -j RETURN"),
                ("-p udp -m udp --dport 6081 -j RETURN", "-p udp -m udp --dport 6081 -j RETURN"),
                (
                    "-m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200",
                    "-m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200",
                ),
                ("-m mark --mark 0x200/0x200 -j RETURN", "-m mark --mark 0x200/0x200 -j RETURN"),
                (
                    "! -i zv0 -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40",
                    "! -i zv0 -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40",
                ),
                ("-m mark --mark 0x40/0x40 -j RETURN", "-m mark --mark 0x40/0x40 -j RETURN"),
                (
                    "! -s 10.244.1.9/32 -i zv0 -j MARK --set-xmark 0x210/0x210",
                    "! -s 10.244.1.9/32 -i zv0 -j MARK --set-xmark 0x210/0x210",
                ),
                ("-m mark --mark 0x200/0x200 -j RETURN", "-m mark --mark 0x200/0x200 -j RETURN"),
                ("-i zv0 -j MARK --set-xmark 0x220/0x220", "-i zv0 -j MARK --set-xmark 0x220/0x220"),
                ("-p udp -j MARK --set-xmark 0x220/0x220", "-p udp -j MARK --set-xmark 0x220/0x220"),
                ("-m mark --mark 0x200/0x200 -j RETURN", "-m mark --mark 0x200/0x200 -j RETURN"),
                (
                    "-p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100",
                    "-p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100",
                ),
                // Short forms people write; the save form differs.
                ("-i zv0 -j MARK --set-mark 0x220/0x220", "-i zv0 -j MARK --set-xmark 0x220/0x220"),
                ("-p tcp --dport 15008 -j RETURN", "-p tcp -m tcp --dport 15008 -j RETURN"),
                ("-m mark --mark 512/512 -j RETURN", "-m mark --mark 0x200/0x200 -j RETURN"),
            ],
        ),
        (
            "mangle",
            "ztunnel-POSTROUTING",
            "POSTROUTING",
            vec![],
        ),
        (
            "mangle",
            "ztunnel-FORWARD",
            "FORWARD",
            vec![
                (
                    "-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
                    "-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
                ),
                (
                    "-m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210",
                    "-m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210",
                ),
            ],
        ),
        (
            "mangle",
            "ztunnel-INPUT",
            "INPUT",
            vec![
                (
                    "-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
                    "-m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
                ),
                (
                    "-m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210",
                    "-m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210",
                ),
            ],
        ),
        (
            "mangle",
            "ztunnel-OUTPUT",
            "OUTPUT",
            vec![
                (
                    "-s 10.244.1.1/32 -p tcp -m owner --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0xffffffff",
                    "-s 10.244.1.1/32 -p tcp -m owner --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0xffffffff",
                ),
                ("-s 10.244.1.1/32 -j MARK --set-xmark 0x220/0xffffffff", "-s 10.244.1.1/32 -j MARK --set-xmark 0x220/0xffffffff"),
                ("-s 10.244.1.1 -j MARK --set-mark 0x220", "-s 10.244.1.1/32 -j MARK --set-xmark 0x220/0xffffffff"),
            ],
        ),
        (
            "nat",
            "ztunnel-PREROUTING",
            "PREROUTING",
            vec![
                ("-m mark --mark 0x100/0x100 -j ACCEPT", "-m mark --mark 0x100/0x100 -j ACCEPT"),
                (
                    "-p udp -m set --match-set ztunnel-pods-ips src -m udp --dport 53 -j DNAT --to-destination 10.244.1.9:15053",
                    "-p udp -m set --match-set ztunnel-pods-ips src -m udp --dport 53 -j DNAT --to-destination 10.244.1.9:15053",
                ),
            ],
        ),
        (
            "nat",
            "ztunnel-POSTROUTING",
            "POSTROUTING",
            vec![("-m mark --mark 0x100/0x100 -j ACCEPT", "-m mark --mark 0x100/0x100 -j ACCEPT")],
        ),
        (
            "filter",
            "ztunnel-FORWARD",
            "FORWARD",
            vec![("-m mark --mark 0x100/0x100 -j ACCEPT", "-m mark --mark 0x100/0x100 -j ACCEPT")],
        ),
    ]
}

/// kernel-state.md §2 (ztunnel netns, mangle PREROUTING), here in our own chain hooked there.
fn ztunnel_seed() -> Seed {
    vec![(
        "mangle",
        "ztunnel-PREROUTING",
        "PREROUTING",
        vec![
            (
                "-p tcp -i pistioin -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
                "-i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
            ),
            (
                "-p tcp -i pistioout -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
                "-i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
            ),
            (
                "-p tcp -i pistioin -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
                "-i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff",
            ),
            (
                "-p tcp -i eth0 ! -d 10.244.1.9 -j MARK --set-xmark 0x4d3/0xfff",
                "! -d 10.244.1.9/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff",
            ),
        ],
    )]
}

/// (table, chain, hook, [(input rule, iptables-save form)]).
type Rules = Vec<(&'static str, &'static str)>;
type Seed = Vec<(&'static str, &'static str, &'static str, Rules)>;

fn chains_from(seed: &Seed, save_form: bool) -> Vec<Chain> {
    seed.iter()
        .map(|(table, name, hook, rules)| Chain {
            table: table.to_string(),
            name: name.to_string(),
            hook: hook.to_string(),
            rules: rules
                .iter()
                .map(|(i, s)| if save_form { s } else { i }.to_string())
                .collect(),
        })
        .collect()
}

/// `<variant>-save` of all tables without the timestamped comment lines.
fn save_all(ns: &str, backend: IptablesBackend) -> String {
    sh(ns, &format!("iptables-{backend}-save"))
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Applies the seed as written and checks that it reads back in the listed save form; then
/// applies the save forms and checks the reads are identical (what the reconciler compares).
async fn check_normal_forms(dp: &RealDataplane, ns: &Ns, seed: &Seed, label: &str) {
    let inputs = chains_from(seed, false);
    let saves = chains_from(seed, true);
    dp.chains_apply(ns, Family::V4, &inputs)
        .await
        .expect("apply seed as written");
    let st = dp.chains_read(ns, Family::V4, &inputs).await.expect("read");
    let mut differs = Vec::new();
    for ((table, name, _, rules), c) in seed.iter().zip(&saves) {
        let got = st
            .chains
            .get(&(table.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            got, c.rules,
            "{label} {table}/{name}: read-back differs from the expected save form"
        );
        for (input, save) in rules {
            if input != save {
                differs.push(format!("  [{table} {name}] {input:?}\n      -> {save:?}"));
            }
        }
    }
    eprintln!(
        "{label}: rules whose iptables-save form differs from the input:\n{}",
        differs.join("\n")
    );
    dp.chains_apply(ns, Family::V4, &saves)
        .await
        .expect("apply save forms");
    let again = dp.chains_read(ns, Family::V4, &saves).await.expect("read");
    assert_eq!(again, st, "{label}: save forms read back as themselves");
}

async fn iptables_case(backend: IptablesBackend) {
    let mut t = TestNs::new();
    let node = t.add("node");
    let zt = t.add("zt");
    sh(&node, "ip link add zv0 type veth peer name zv1");
    let dp = dataplane(&node, backend);
    assert_eq!(dp.backend(), backend.as_str());
    dp.podset_create(Family::V4)
        .await
        .expect("the set the rules reference");
    let ns = Ns::Node;
    let seed = node_seed();
    let chains = chains_from(&seed, true);

    check_normal_forms(&dp, &ns, &seed, &format!("node/{backend}")).await;
    let ztns = Ns::Pod(ns_path(&zt));
    check_normal_forms(&dp, &ztns, &ztunnel_seed(), &format!("ztunnel/{backend}")).await;

    // Apply twice: identical kernel state, every jump once and first.
    dp.chains_apply(&ns, Family::V4, &chains)
        .await
        .expect("apply");
    let first = save_all(&node, backend);
    dp.chains_apply(&ns, Family::V4, &chains)
        .await
        .expect("apply again");
    assert_eq!(
        save_all(&node, backend),
        first,
        "second apply changed nothing"
    );
    let st = dp
        .chains_read(&ns, Family::V4, &chains)
        .await
        .expect("read");
    assert_eq!(st.chains.len(), chains.len());
    for c in &chains {
        assert_eq!(
            st.chains.get(&(c.table.clone(), c.name.clone())),
            Some(&c.rules),
            "{}/{}",
            c.table,
            c.name
        );
        assert_eq!(
            st.jumps
                .get(&(c.table.clone(), c.hook.clone(), c.name.clone())),
            Some(&vec![1]),
            "{} {} -> {}",
            c.table,
            c.hook,
            c.name
        );
    }

    // Someone inserts ahead of us and appends a duplicate jump.
    let ipt = format!("iptables-{backend}");
    sh(
        &node,
        &format!(
            "{ipt} -t mangle -I PREROUTING 1 -p icmp -j ACCEPT && {ipt} -t mangle -A PREROUTING -j ztunnel-PREROUTING \
             && {ipt} -t nat -A POSTROUTING -o zv0 -j ztunnel-POSTROUTING"
        ),
    );
    let st = dp
        .chains_read(&ns, Family::V4, &chains)
        .await
        .expect("read");
    let key = |t: &str, h: &str, c: &str| (t.to_string(), h.to_string(), c.to_string());
    assert_eq!(
        st.jumps
            .get(&key("mangle", "PREROUTING", "ztunnel-PREROUTING")),
        Some(&vec![2, 3])
    );
    assert_eq!(
        st.jumps
            .get(&key("nat", "POSTROUTING", "ztunnel-POSTROUTING")),
        Some(&vec![1, 2])
    );
    dp.chains_apply(&ns, Family::V4, &chains)
        .await
        .expect("repair");
    let st = dp
        .chains_read(&ns, Family::V4, &chains)
        .await
        .expect("read");
    assert_eq!(
        st.jumps
            .get(&key("mangle", "PREROUTING", "ztunnel-PREROUTING")),
        Some(&vec![1])
    );
    assert_eq!(
        st.jumps
            .get(&key("nat", "POSTROUTING", "ztunnel-POSTROUTING")),
        Some(&vec![1])
    );
    let mangle = sh(&node, &format!("iptables-{backend}-save -t mangle"));
    assert!(
        mangle.contains("-A PREROUTING -j ztunnel-PREROUTING\n-A PREROUTING -p icmp -j ACCEPT"),
        "{mangle}"
    );

    // Someone flushes one of our chains: read shows it, apply restores it.
    sh(&node, &format!("{ipt} -t mangle -F ztunnel-FORWARD"));
    let st = dp
        .chains_read(&ns, Family::V4, &chains)
        .await
        .expect("read");
    assert_eq!(
        st.chains
            .get(&("mangle".to_string(), "ztunnel-FORWARD".to_string())),
        Some(&vec![])
    );
    dp.chains_apply(&ns, Family::V4, &chains)
        .await
        .expect("repair");
    assert_eq!(
        save_all(&node, backend)
            .lines()
            .filter(|l| l.starts_with("-A ztunnel-FORWARD"))
            .count(),
        3
    );

    // Remove leaves nothing of ours, keeps the foreign rule, and is idempotent.
    dp.chains_remove(&ns, Family::V4, &chains)
        .await
        .expect("remove");
    dp.chains_remove(&ns, Family::V4, &chains)
        .await
        .expect("remove twice");
    let after = save_all(&node, backend);
    assert!(!after.contains("ztunnel-"), "{after}");
    assert!(after.contains("-A PREROUTING -p icmp -j ACCEPT"), "{after}");
    let st = dp
        .chains_read(&ns, Family::V4, &chains)
        .await
        .expect("read");
    assert!(st.chains.is_empty() && st.jumps.is_empty(), "{st:?}");
    dp.chains_remove(&ztns, Family::V4, &chains_from(&ztunnel_seed(), true))
        .await
        .expect("remove in ztunnel ns");
    assert!(!save_all(&zt, backend).contains("ztunnel-"));
    dp.podset_destroy(Family::V4)
        .await
        .expect("set is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_legacy_apply_read_remove() {
    if !require_root() {
        return;
    }
    iptables_case(IptablesBackend::Legacy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_nft_apply_read_remove() {
    if !require_root() {
        return;
    }
    iptables_case(IptablesBackend::Nft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_backend_detection() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let fresh = t.add("fresh");
    assert_eq!(
        dataplane(&fresh, IptablesBackend::Auto).backend(),
        "nft",
        "nothing anywhere: nft"
    );

    let busy = t.add("busy");
    sh(
        &busy,
        "for p in 1 2 3; do iptables-legacy -A INPUT -p tcp --dport 1$p -j ACCEPT; done",
    );
    assert_eq!(
        dataplane(&busy, IptablesBackend::Auto).backend(),
        "legacy",
        "more rules in legacy"
    );

    let hinted = t.add("hinted");
    sh(
        &hinted,
        "for p in 1 2 3; do iptables-legacy -A INPUT -p tcp --dport 1$p -j ACCEPT; done; \
         iptables-nft -t mangle -N KUBE-IPTABLES-HINT",
    );
    assert_eq!(
        dataplane(&hinted, IptablesBackend::Auto).backend(),
        "nft",
        "kubelet's hint wins"
    );

    assert_eq!(
        dataplane(&fresh, IptablesBackend::Legacy).backend(),
        "legacy"
    );
}

// ---------------------------------------------------------------------------------------------
// sysctls, netns

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysctls_are_per_namespace() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let zt = t.add("zt");
    sh(&node, "ip link add sv0 type veth peer name sv1");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let key = rp_filter_key("sv0");

    assert!(dp
        .sysctl_read(&Ns::Node, &key)
        .await
        .expect("read")
        .is_some());
    dp.sysctl_write(&Ns::Node, &key, "2").await.expect("write");
    assert_eq!(
        dp.sysctl_read(&Ns::Node, &key).await.expect("read"),
        Some("2".to_string())
    );
    assert_eq!(
        sh(&node, "cat /proc/sys/net/ipv4/conf/sv0/rp_filter").trim(),
        "2"
    );
    assert!(
        !std::path::Path::new("/proc/sys/net/ipv4/conf/sv0").exists(),
        "not in the root netns"
    );

    let ztns = Ns::Pod(ns_path(&zt));
    assert_eq!(
        dp.sysctl_read(&ztns, &key).await.expect("read"),
        None,
        "sv0 is not in the ztunnel netns"
    );
    assert!(matches!(
        dp.sysctl_write(&ztns, &key, "2").await,
        Err(DpError::Sysctl { .. })
    ));
    dp.sysctl_write(&ztns, &rp_filter_key("lo"), "2")
        .await
        .expect("write in pod ns");
    assert_eq!(
        sh(&zt, "cat /proc/sys/net/ipv4/conf/lo/rp_filter").trim(),
        "2"
    );
    dp.sysctl_read(&Ns::Node, "../../etc/passwd")
        .await
        .expect_err("stays under /proc/sys");
}

/// The batch operations a bulk repair uses give the same kernel state and the same per-item
/// answers as the one-by-one ones: pipelined ipset adds, pipelined route adds that fall back to
/// the careful path for existing, foreign and link-less routes, and sysctls read in one go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_match_one_by_one() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let dp = dataplane(&node, IptablesBackend::Auto);
    let ns = Ns::Node;
    sh(
        &node,
        "ip link add bv0 type veth peer name bv1 && ip addr add 10.9.0.1/24 dev bv0 && \
         ip link set bv0 up && ip link set bv1 up",
    );

    // 1,000 entries: several sends of the pipelined path; one existing entry changes owner.
    dp.podset_create(Family::V4).await.expect("create");
    dp.podset_add(ip("10.50.0.1"), "old-owner")
        .await
        .expect("add");
    let entries: Vec<(IpAddr, String)> = (0..1000u32)
        .map(|i| (Ipv4Addr::from(0x0a32_0001 + i).into(), format!("uid-{i}")))
        .collect();
    let res = dp.podset_add_many(&entries).await;
    assert_eq!(res.len(), entries.len());
    assert!(
        res.iter().all(Result::is_ok),
        "{:?}",
        res.iter().find(|r| r.is_err())
    );
    let set = dp
        .podset_list(Family::V4)
        .await
        .expect("list")
        .expect("exists");
    assert_eq!(set.len(), 1000);
    assert_eq!(set.get(&ip("10.50.0.1")).map(String::as_str), Some("uid-0"));
    assert_eq!(
        set.get(&ip("10.50.3.232")).map(String::as_str),
        Some("uid-999")
    );

    // Routes: new ones, one of ours that exists with other attributes, a foreign one holding a
    // key, and one over a link that does not exist.
    let pod = |i: u32| {
        let mut r = route(
            100,
            &format!("{}/32", Ipv4Addr::from(0x0a33_0001 + i)),
            0,
            RouteKind::Unicast,
        );
        r.dev = Some("bv0".into());
        r.via = Some(ip("10.9.0.2"));
        r.src = Some(ip("10.9.0.1"));
        r
    };
    let mut routes: Vec<Route> = (0..300).map(pod).collect();
    let mut ours_before = pod(0);
    ours_before.via = Some(ip("10.9.0.3"));
    dp.route_replace(&ns, &ours_before)
        .await
        .expect("pre-existing route of ours");
    sh(&node, "ip route add 10.51.0.2/32 dev bv0 table 100");
    let mut nodev = pod(1000);
    nodev.dev = Some("nosuchdev0".into());
    routes.push(nodev);
    let res = dp.route_replace_many(&ns, &routes).await;
    assert_eq!(res.len(), routes.len());
    for (r, got) in routes.iter().zip(&res) {
        let dst = r.key.dst.addr;
        if dst == ip("10.51.0.2") {
            assert!(
                got.as_ref()
                    .is_err_and(|e| e.to_string().contains("not ours")),
                "{got:?}"
            );
        } else if r.dev.as_deref() == Some("nosuchdev0") {
            assert!(matches!(got, Err(DpError::NoSuchLink(_))), "{got:?}");
        } else {
            assert!(got.is_ok(), "{r}: {got:?}");
        }
    }
    let listed: BTreeSet<Route> = dp
        .routes_list(&ns, &[Family::V4], &[100])
        .await
        .expect("list")
        .into_iter()
        .collect();
    let want: BTreeSet<Route> = routes
        .iter()
        .filter(|r| r.key.dst.addr != ip("10.51.0.2") && r.dev.as_deref() == Some("bv0"))
        .cloned()
        .collect();
    assert_eq!(listed, want, "the replaced route carries the new next hop");

    // Sysctls: one call, the same answers as one read each (a missing interface reads None).
    let keys = vec![
        rp_filter_key("bv0"),
        rp_filter_key("nosuchdev0"),
        rp_filter_key("lo"),
        "net/ipv4/ip_forward".to_string(),
    ];
    dp.sysctl_write(&ns, &keys[0], "2").await.expect("write");
    let many = dp.sysctl_read_many(&ns, &keys).await.expect("read many");
    let mut one = Vec::new();
    for k in &keys {
        one.push(dp.sysctl_read(&ns, k).await.expect("read"));
    }
    assert_eq!(many, one);
    assert_eq!(many[0].as_deref(), Some("2"));
    assert_eq!(many[1], None);

    // Many rp_filter keys: read from one netconf dump, names mapped to indexes (and cached).
    // Still the same answers after links go, come back under the same name with a new index,
    // and change value.
    let mut script = String::new();
    for i in 0..40 {
        script.push_str(&format!("link add rv{i} type veth peer name rp{i}\n"));
    }
    let batch = std::env::temp_dir().join(format!("acni-dp-{}-links", std::process::id()));
    std::fs::write(&batch, script).expect("batch file");
    sh(&node, &format!("ip -batch {}", batch.display()));
    let _ = std::fs::remove_file(&batch);
    let mut keys: Vec<String> = (0..40).map(|i| rp_filter_key(&format!("rv{i}"))).collect();
    keys.push(rp_filter_key("nosuchdev0"));
    keys.push(rp_filter_key("lo"));
    for k in keys.iter().step_by(3).take(10) {
        dp.sysctl_write(&ns, k, "2").await.expect("write");
    }
    let check = |label: &'static str| {
        let (dp, keys) = (&dp, &keys);
        async move {
            let many = dp
                .sysctl_read_many(&Ns::Node, keys)
                .await
                .expect("read many");
            let mut one = Vec::new();
            for k in keys {
                one.push(dp.sysctl_read(&Ns::Node, k).await.expect("read"));
            }
            assert_eq!(many, one, "{label}");
        }
    };
    check("first read").await;
    check("cached indexes").await;
    sh(
        &node,
        "ip link del rv3 && ip link del rv4 && ip link add rv4 type veth peer name rp4b && \
         sysctl -qw net.ipv4.conf.rv4.rp_filter=1 net.ipv4.conf.rv5.rp_filter=2",
    );
    check("after a delete, a re-create and changes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_alive_checks_nsfs() {
    if !require_root() {
        return;
    }
    let mut t = TestNs::new();
    let node = t.add("node");
    let zt = t.add("zt");
    let dp = dataplane(&node, IptablesBackend::Auto);
    assert!(dp.netns_alive(&ns_path(&zt)));
    assert!(dp.netns_alive(std::path::Path::new("/proc/self/ns/net")));
    assert!(!dp.netns_alive(std::path::Path::new("/var/run/netns/acni-dp-no-such-ns")));
    assert!(
        !dp.netns_alive(std::path::Path::new("/etc/hostname")),
        "a plain file is no netns"
    );
    t.del(&zt);
    assert!(!dp.netns_alive(&ns_path(&zt)));
    // An operation on a vanished pod namespace is an error naming it, not a panic.
    let err = dp
        .rules_list(&Ns::Pod(ns_path(&zt)), &[Family::V4], &[1])
        .await
        .expect_err("gone");
    assert!(err.to_string().contains(&zt), "{err}");
}

#[test]
fn new_outside_a_runtime_is_an_error() {
    let err = RealDataplane::new(RealConfig::default()).expect_err("needs tokio");
    assert!(err.to_string().contains("tokio"), "{err}");
}

#[path = "dataplane_kernel/ipv6.rs"]
mod ipv6;
