//! Real TCP through the redirection the daemon programs (issue 4), in namespaces only, for IPv4,
//! IPv6 (issue 11: tests named `*ipv6*`) and dual-stack pods (`dual_stack*`).
//!
//! Each test builds a [`World`]: node netns with the daemon, a remote host, pods through libcni.
//! The ztunnel stand-in answers `ztunnel port=<listener> orig_dst=<ip:port> peer=<ip:port>`; echo
//! servers answer `<name> peer=<ip:port>` (IPv6 addresses as `[addr]:port`).
//!
//! Every path is written once, for a [`Fam`], and run for each family a test covers: the IPv6
//! tests prove exactly what the IPv4 ones do.

use std::time::Duration;

use ambient_cni_tests::require_root;
use ambient_cni_tests::world::{
    hostport, Family, Firewall, Pod, World, NFT_TABLE, POD_GW, POD_GW6, REMOTE_IP, REMOTE_IP6,
};
use anyhow::{bail, ensure, Context, Result};

fn assert_has(answer: &str, want: &str, what: &str) {
    assert!(
        answer.contains(want),
        "{what}: expected {want:?} in {answer:?}"
    );
}

/// One address family of a world: its addresses, and the names of its kernel objects.
#[derive(Clone, Copy, Debug)]
struct Fam {
    v6: bool,
}

const V4: Fam = Fam { v6: false };
const V6: Fam = Fam { v6: true };

impl Fam {
    fn name(self) -> &'static str {
        if self.v6 {
            "IPv6"
        } else {
            "IPv4"
        }
    }

    /// The remote host's address.
    fn remote(self) -> &'static str {
        if self.v6 {
            REMOTE_IP6
        } else {
            REMOTE_IP
        }
    }

    /// The pods' gateway (the node's address on every host veth, the kubelet probe's source).
    fn gw(self) -> &'static str {
        if self.v6 {
            POD_GW6
        } else {
            POD_GW
        }
    }

    /// The pod's address of this family.
    fn ip(self, p: &Pod) -> Result<String> {
        if self.v6 {
            p.need_ip6()
        } else {
            p.need_ip4()
        }
    }

    /// The pod set of enrolled addresses (named as the iptables driver names it).
    fn set(self) -> &'static str {
        if self.v6 {
            "ztunnel-pods-ips6"
        } else {
            "ztunnel-pods-ips"
        }
    }

    /// `ip`'s family flag.
    fn flag(self) -> &'static str {
        if self.v6 {
            "-6"
        } else {
            "-4"
        }
    }
}

/// The families of a world.
fn fams(family: Family) -> Vec<Fam> {
    let mut v = Vec::new();
    if family.has_v4() {
        v.push(V4);
    }
    if family.has_v6() {
        v.push(V6);
    }
    v
}

/// The start of a `peer=` or `orig_dst=` value for `ip` (`ip:` or `[ip]:`).
fn at(ip: &str) -> String {
    let hp = hostport(ip, 0);
    hp.strip_suffix('0').unwrap_or(&hp).to_string()
}

/// Destinations of the routes of table 100 (one per enrolled pod) of a family.
fn table100(w: &World, f: Fam) -> Result<Vec<String>> {
    let out = w
        .net
        .exec_ok("node", &["ip", f.flag(), "route", "show", "table", "100"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|d| {
            d.trim_end_matches("/32")
                .trim_end_matches("/128")
                .to_string()
        })
        .collect())
}

/// Asserts that `ip` is (or is not) enrolled in the node: its ipset entry and its table-100 route.
fn assert_enrolled(w: &World, f: Fam, ip: &str, want: bool, what: &str) -> Result<()> {
    let set = w.pod_set("node", f.v6)?;
    assert_eq!(
        set.iter().any(|m| m == ip),
        want,
        "{what}: {ip} in {} must be {want}: {set:?}",
        f.set()
    );
    let routes = table100(w, f)?;
    assert_eq!(
        routes.iter().any(|r| r == ip),
        want,
        "{what}: {} route to {ip} in table 100 must be {want}: {routes:?}",
        f.name()
    );
    Ok(())
}

/// Every path of the design for family `f`: enrolled `app`, not enrolled `other`, ztunnel `zt`.
fn every_path(w: &World, f: Fam, zt: &Pod, app: &Pod, other: &Pod) -> Result<()> {
    let fam = f.name();
    let (zt_ip, app_ip, other_ip) = (f.ip(zt)?, f.ip(app)?, f.ip(other)?);
    let rem = f.remote();
    let remote = hostport(rem, 8080);
    println!("{fam}: app {app_ip}, other {other_ip}, ztunnel {zt_ip}, remote {rem}");

    // Egress of an enrolled pod arrives at 15001 with the original destination intact.
    let a = w.answer("app", &remote, None)?;
    assert_has(
        &a,
        &format!("ztunnel port=15001 orig_dst={remote} peer={}", at(&app_ip)),
        &format!("{fam} enrolled egress"),
    );
    // A pod that is not enrolled reaches the remote host directly.
    let a = w.answer("other", &remote, None)?;
    assert_has(
        &a,
        &format!("remote peer={}", at(&other_ip)),
        &format!("{fam} non-enrolled egress"),
    );
    // Inbound to an enrolled pod: 15006; to its port 15008: 15008.
    let a = w.answer("remote", &hostport(&app_ip, 8080), None)?;
    assert_has(
        &a,
        &format!(
            "ztunnel port=15006 orig_dst={} peer={}",
            hostport(&app_ip, 8080),
            at(rem)
        ),
        &format!("{fam} inbound"),
    );
    let a = w.answer("remote", &hostport(&app_ip, 15008), None)?;
    assert_has(
        &a,
        &format!("ztunnel port=15008 orig_dst={}", hostport(&app_ip, 15008)),
        &format!("{fam} HBONE"),
    );
    // Inbound to a pod that is not enrolled is not captured.
    let a = w.answer("remote", &hostport(&other_ip, 8080), None)?;
    assert_has(
        &a,
        &format!("other peer={}", at(rem)),
        &format!("{fam} inbound to non-enrolled"),
    );
    // Same node: enrolled → not enrolled is egress (15001); not enrolled → enrolled is inbound (15006).
    let a = w.answer("app", &hostport(&other_ip, 8080), None)?;
    assert_has(
        &a,
        &format!("ztunnel port=15001 orig_dst={}", hostport(&other_ip, 8080)),
        &format!("{fam} pod to pod egress"),
    );
    let a = w.answer("other", &hostport(&app_ip, 8080), None)?;
    assert_has(
        &a,
        &format!(
            "ztunnel port=15006 orig_dst={} peer={}",
            hostport(&app_ip, 8080),
            at(&other_ip)
        ),
        &format!("{fam} pod to pod inbound"),
    );
    // ztunnel reaches the enrolled pod directly (no loop back into itself) ...
    let a = w.answer("zt", &hostport(&app_ip, 8080), None)?;
    assert_has(
        &a,
        &format!("app peer={}", at(&zt_ip)),
        &format!("{fam} ztunnel to pod"),
    );
    // ... also with the remote client's address as source (transparent socket): the reply comes
    // back to ztunnel through connmark 0x210 → mark 0x040 → table 102 → its veth → 0x4d3 → local.
    let a = w.answer("zt", &hostport(&app_ip, 8080), Some(rem))?;
    assert_has(
        &a,
        &format!("app peer={}", at(rem)),
        &format!("{fam} ztunnel to pod, spoofed"),
    );
    // ... and to the remote host, spoofing the enrolled pod (what ztunnel does for egress).
    let a = w.answer("zt", &remote, Some(&app_ip))?;
    assert_has(
        &a,
        &format!("remote peer={}", at(&app_ip)),
        &format!("{fam} ztunnel to remote, spoofed"),
    );
    // A kubelet probe (the node, from the pods' gateway address) reaches the pod directly.
    let a = w.answer("node", &hostport(&app_ip, 8080), None)?;
    assert_has(
        &a,
        &format!("app peer={}", at(f.gw())),
        &format!("{fam} node to pod (probe skip)"),
    );
    Ok(())
}

/// The kernel the daemon reads back matches what it wants: a resync changes nothing.
fn settled(w: &World) -> Result<()> {
    let d = w.daemon()?;
    std::thread::sleep(Duration::from_millis(1200));
    let dump = d.dump_json()?;
    assert_eq!(
        dump["pending"],
        serde_json::json!([]),
        "pending changes after settling: {dump:#}"
    );
    assert_eq!(
        dump["last_resync"]["repaired"], 0,
        "a no-change resync repaired something: {dump:#}"
    );
    Ok(())
}

fn paths_world(tag: &str, family: Family) -> Result<(World, Pod, Pod, Pod)> {
    let w = World::with_family(tag, family, &[])?;
    let zt = w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    let other = w.pod("other", "legacy", "other")?;
    Ok((w, zt, app, other))
}

#[test]
fn every_path_is_captured_where_the_design_says() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (w, zt, app, other) = paths_world("paths", Family::V4)?;
    every_path(&w, V4, &zt, &app, &other)?;
    settled(&w)
}

#[test]
fn every_path_is_captured_where_the_design_says_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (w, zt, app, other) = paths_world("paths6", Family::V6)?;
    assert!(app.ip4().is_none(), "IPv6-only pod with an IPv4 address");
    every_path(&w, V6, &zt, &app, &other)?;
    settled(&w)
}

#[test]
fn dual_stack_pods_are_captured_on_both_families_at_once() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (w, zt, app, other) = paths_world("pathsds", Family::Dual)?;
    // Both families of one pod at the same time: egress and inbound, in parallel.
    let (app4, app6) = (V4.ip(&app)?, V6.ip(&app)?);
    let answers = std::thread::scope(|s| {
        let jobs: Vec<_> = [
            ("app", hostport(REMOTE_IP, 8080)),
            ("app", hostport(REMOTE_IP6, 8080)),
            ("remote", hostport(&app4, 8080)),
            ("remote", hostport(&app6, 8080)),
        ]
        .into_iter()
        .map(|(ns, dst)| {
            let w = &w;
            s.spawn(move || w.answer(ns, &dst, None))
        })
        .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| bail!("connect thread panicked"))
            })
            .collect::<Result<Vec<String>>>()
    })?;
    let want = [
        format!(
            "ztunnel port=15001 orig_dst={} peer={}",
            hostport(REMOTE_IP, 8080),
            at(&app4)
        ),
        format!(
            "ztunnel port=15001 orig_dst={} peer={}",
            hostport(REMOTE_IP6, 8080),
            at(&app6)
        ),
        format!("ztunnel port=15006 orig_dst={}", hostport(&app4, 8080)),
        format!("ztunnel port=15006 orig_dst={}", hostport(&app6, 8080)),
    ];
    for (a, w) in answers.iter().zip(&want) {
        assert_has(a, w, "dual stack, both families at once");
    }
    // Then every path, on each family.
    every_path(&w, V4, &zt, &app, &other)?;
    every_path(&w, V6, &zt, &app, &other)?;
    settled(&w)
}

/// DEL of `app` (enrolled next to `keep`) removes its entries of every family `fams`, and its
/// addresses are no longer captured; `keep` still is.
fn del_removes_the_pod(w: &World, fams: &[Fam], app: &Pod, keep: &Pod) -> Result<()> {
    for &f in fams {
        assert_enrolled(w, f, &f.ip(app)?, true, "before DEL")?;
        assert_enrolled(w, f, &f.ip(keep)?, true, "before DEL")?;
    }
    let out = w.del(app);
    assert!(out.success(), "{out}");
    for &f in fams {
        let (ip, keep_ip) = (f.ip(app)?, f.ip(keep)?);
        assert_enrolled(w, f, &ip, false, "after DEL")?;
        assert_enrolled(w, f, &keep_ip, true, "the other pod after DEL")?;
        // Its IP now routes like any address the node does not own: not into istioin.
        let get = w.net.exec(
            "node",
            &[
                "ip",
                f.flag(),
                "route",
                "get",
                &ip,
                "from",
                f.remote(),
                "iif",
                "eth1",
            ],
        );
        assert!(!get.stdout.contains("istioin"), "{}: {get}", f.name());
        // The other pod is still captured.
        let a = w.answer("remote", &hostport(&keep_ip, 8080), None)?;
        assert!(a.contains("ztunnel port=15006"), "{}: {a}", f.name());
    }
    Ok(())
}

#[test]
fn del_removes_everything_of_the_pod_and_its_ip_is_no_longer_captured() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::new("del", &[])?;
    w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    let keep = w.pod("keep", "default", "keep")?;
    del_removes_the_pod(&w, &[V4], &app, &keep)
}

#[test]
fn del_removes_everything_of_the_pod_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::with_family("del6", Family::V6, &[])?;
    w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    let keep = w.pod("keep", "default", "keep")?;
    del_removes_the_pod(&w, &[V6], &app, &keep)
}

#[test]
fn dual_stack_del_removes_both_families() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::with_family("delds", Family::Dual, &[])?;
    w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    let keep = w.pod("keep", "default", "keep")?;
    del_removes_the_pod(&w, &[V4, V6], &app, &keep)?;
    // Nothing of the deleted pod is left in the daemon either.
    let dump = w.daemon()?.dump_json()?.to_string();
    for ip in app.ips() {
        assert!(
            !dump.contains(&format!("\"{ip}")),
            "{ip} still in the dump: {dump}"
        );
    }
    Ok(())
}

/// No ztunnel, a ztunnel, its DEL, a replacement, its netns vanishing, another replacement, a
/// late DEL of the first: held closed whenever no ztunnel is there, captured otherwise.
fn held_closed_then_captured(family: Family, f: Fam, tag: &str) -> Result<()> {
    let w = World::with_family(tag, family, &[])?;
    let app = w.pod("app", "default", "app")?;
    let remote = hostport(f.remote(), 8080);
    let inbound = hostport(&f.ip(&app)?, 8080);
    let closed = |when: &str| {
        let out = w.connect("app", &remote, None);
        assert!(
            !out.success(),
            "{when}: egress must not bypass ztunnel: {out}"
        );
        let out = w.connect("remote", &inbound, None);
        assert!(
            !out.success(),
            "{when}: inbound must not bypass ztunnel: {out}"
        );
    };
    let captured = |when: &str| -> Result<()> {
        let a = w.answer("app", &remote, None).context(when.to_string())?;
        assert_has(&a, "ztunnel port=15001", when);
        let a = w
            .answer("remote", &inbound, None)
            .context(when.to_string())?;
        assert_has(&a, "ztunnel port=15006", when);
        Ok(())
    };
    // No ztunnel on the node yet: held closed in both directions (no bypass).
    closed("before any ztunnel");
    // The first ztunnel arrives: the pod enrolled before it is captured.
    let z1 = w.ztunnel("zt1", "one")?;
    captured("first ztunnel")?;
    // ztunnel DEL: held closed again until the replacement's ADD.
    assert!(w.del(&z1).success());
    closed("after the ztunnel's DEL");
    let _z2 = w.ztunnel("zt2", "two")?;
    captured("replacement ztunnel")?;
    // The ztunnel's netns vanishes without a DEL: the kernel deletes the veths and every route
    // through them; the fallbacks keep it closed.
    w.net.del_ns("zt2")?;
    closed("after the ztunnel's netns vanished");
    // A replacement in a new netns captures again, with fresh tunnels.
    let _z3 = w.ztunnel("zt3", "three")?;
    captured("third ztunnel")?;
    // A late DEL of the old ztunnel does not tear down the new one's tunnels.
    let late = w.cnitool("del", "zt1", "istio-system", "ztunnel-one");
    assert!(late.success(), "{late}");
    captured("after a late DEL of the first ztunnel")
}

#[test]
fn pod_before_ztunnel_is_held_closed_then_captured_and_replacements_capture() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    held_closed_then_captured(Family::V4, V4, "ztlife")
}

#[test]
fn pod_before_ztunnel_is_held_closed_then_captured_and_replacements_capture_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    held_closed_then_captured(Family::V6, V6, "ztlife6")
}

fn fail_open(family: Family, f: Fam, tag: &str) -> Result<()> {
    let w = World::with_family(tag, family, &["--fail-open"])?;
    let app = w.pod("app", "default", "app")?;
    let app_ip = f.ip(&app)?;
    let remote = hostport(f.remote(), 8080);
    let a = w.answer("app", &remote, None)?;
    assert_has(
        &a,
        &format!("remote peer={}", at(&app_ip)),
        "fail-open egress",
    );
    let a = w.answer("remote", &hostport(&app_ip, 8080), None)?;
    assert_has(
        &a,
        &format!("app peer={}", at(f.remote())),
        "fail-open inbound",
    );
    w.ztunnel("zt", "a")?;
    let a = w.answer("app", &remote, None)?;
    assert_has(&a, "ztunnel port=15001", "fail-open, ztunnel up");
    let a = w.answer("remote", &hostport(&app_ip, 8080), None)?;
    assert_has(&a, "ztunnel port=15006", "fail-open, ztunnel up");
    Ok(())
}

#[test]
fn fail_open_lets_traffic_flow_without_ztunnel() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    fail_open(Family::V4, V4, "failopen")
}

#[test]
fn fail_open_lets_traffic_flow_without_ztunnel_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    fail_open(Family::V6, V6, "failopen6")
}

/// The daemon programs a world of `family`, captures, then `cleanup` leaves the node as a twin
/// that never ran it, and nothing of ours in the ztunnel netns.
/// `cross`: cleanup runs with the other firewall's `--firewall` than the daemon did (an uninstall
/// that does not know it): it must remove everything all the same.
fn cleanup_leaves_nothing(family: Family, tag: &str, cross: bool) -> Result<()> {
    let mut w = World::with_family(tag, family, &[])?;
    // The daemon is already running (its start-up reconcile made the base state); take the
    // "before" picture in a twin node namespace built the same way, without a daemon.
    w.net.add_ns("twin")?;
    w.net.add_ns("twinpeer")?;
    if family.has_v6() {
        w.net.enable_ipv6("twin")?;
        w.net.enable_ipv6("twinpeer")?;
        // As in the node: an IPv6 router has subnet-router anycast routes.
        w.net
            .exec_ok("twin", &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    }
    w.net.veth("twin", "eth1", "twinpeer", "eth0")?;
    if family.has_v4() {
        w.net.exec_ok(
            "twin",
            &["ip", "addr", "add", "198.51.100.1/24", "dev", "eth1"],
        )?;
    }
    if family.has_v6() {
        w.net.exec_ok(
            "twin",
            &[
                "ip",
                "-6",
                "addr",
                "add",
                "fd00:198:51:100::1/64",
                "dev",
                "eth1",
                "nodad",
            ],
        )?;
    }
    let nft = w.firewall() == Firewall::Nftables;
    if nft {
        // Another agent's objects, in the node and in the twin alike: a table with a name like
        // ours, and a chain on the same hook and priority as our mangle prerouting chain.
        for ns in ["node", "twin"] {
            w.net
                .exec_ok(ns, &["nft", "add", "table", "inet", "ambient-cni-other"])?;
            w.net.exec_ok(
                ns,
                &[
                    "nft",
                    "add chain inet ambient-cni-other pre { type filter hook prerouting priority -150; }",
                ],
            )?;
            w.net.exec_ok(
                ns,
                &[
                    "nft",
                    "add rule inet ambient-cni-other pre meta mark 0x4242 counter",
                ],
            )?;
        }
    }
    let before = w.node_state("twin")?;
    let zt = w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    for f in fams(family) {
        let a = w.answer("app", &hostport(f.remote(), 8080), None)?;
        assert_has(&a, "ztunnel port=15001", f.name());
    }
    if let Some(mut d) = w.daemon.take() {
        d.stop();
    }
    let bin = ambient_cni_tests::workspace_bin("ambient-cnid")?;
    let state = w.daemon_dir.join("state");
    let mut argv = vec![
        bin.to_str().unwrap_or_default(),
        "cleanup",
        "--state-dir",
        state.to_str().unwrap_or_default(),
    ];
    if nft != cross {
        argv.extend(["--firewall", "nftables"]);
    }
    let out = w.net.exec("node", &argv);
    assert!(out.success(), "cleanup: {out}");
    // Pods go away (the daemon is down: DEL still succeeds).
    assert!(w.del(&app).success());
    assert!(w.del(&zt).success());
    let after = w.node_state("node")?;
    // The node differs from the twin only by the link name of its remote side.
    assert_eq!(
        before, after,
        "node state after cleanup differs from a node that never ran the daemon"
    );
    if nft {
        let tables = w.net.exec_ok("zt", &["nft", "list", "tables"])?;
        assert!(!tables.contains(&format!("{NFT_TABLE}\n")), "{tables}");
        let node = w.net.exec_ok("node", &["nft", "list", "ruleset"])?;
        assert!(
            !node.contains(&format!("table inet {NFT_TABLE} ")),
            "{node}"
        );
        assert!(
            node.contains("table inet ambient-cni-other") && node.contains("meta mark 0x00004242"),
            "another agent's table and chain must survive: {node}"
        );
    }
    let zs = w.net.exec_ok("zt", &["iptables-save"])?;
    assert!(!zs.contains("ztunnel"), "{zs}");
    let zl = w.net.exec_ok("zt", &["ip", "-o", "link"])?;
    assert!(!zl.contains("pistio"), "{zl}");
    let mut rules = vec![w.net.exec_ok("zt", &["ip", "rule"])?];
    if family.has_v6() {
        let zs6 = w.net.exec_ok("zt", &["ip6tables-save"])?;
        assert!(!zs6.contains("ztunnel"), "{zs6}");
        rules.push(w.net.exec_ok("zt", &["ip", "-6", "rule"])?);
        let zr6 = w
            .net
            .exec_ok("zt", &["ip", "-6", "route", "show", "table", "all"])?;
        assert!(!zr6.contains("proto 212"), "{zr6}");
        let sets = w.net.exec_ok("node", &["ipset", "list", "-n"])?;
        assert!(!sets.contains("ztunnel-pods-ips6"), "{sets}");
        assert!(w.pod_set("node", true)?.is_empty());
    }
    for zr in rules {
        assert!(!zr.contains("20000") && !zr.contains("20003"), "{zr}");
    }
    Ok(())
}

#[test]
fn cleanup_leaves_no_object_of_ours() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    cleanup_leaves_nothing(Family::V4, "cleanup", false)
}

#[test]
fn cleanup_leaves_no_object_of_ours_dual_stack() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    cleanup_leaves_nothing(Family::Dual, "cleanupds", false)
}

#[test]
fn cleanup_leaves_no_object_of_ours_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    cleanup_leaves_nothing(Family::V6, "cleanup6", false)
}

/// An uninstall that does not know the daemon's `--firewall`: cleanup with the other one still
/// leaves the node as if the daemon had never run (dual stack).
#[test]
fn cleanup_with_the_other_firewall_flag_leaves_no_object_of_ours() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    cleanup_leaves_nothing(Family::Dual, "cleanupx", true)
}

/// Every test above again, on the nftables firewall (`--firewall nftables`): the same bodies,
/// unchanged, with the worlds they build running the daemon on nft (`nft::<test name>`); and the
/// nft-only drift tests.
mod nft {
    use super::*;

    macro_rules! on_nft {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() -> Result<()> {
                    ambient_cni_tests::world::on_firewall(Firewall::Nftables, super::$name)
                }
            )*
        };
    }

    on_nft!(
        every_path_is_captured_where_the_design_says,
        every_path_is_captured_where_the_design_says_ipv6,
        dual_stack_pods_are_captured_on_both_families_at_once,
        del_removes_everything_of_the_pod_and_its_ip_is_no_longer_captured,
        del_removes_everything_of_the_pod_ipv6,
        dual_stack_del_removes_both_families,
        pod_before_ztunnel_is_held_closed_then_captured_and_replacements_capture,
        pod_before_ztunnel_is_held_closed_then_captured_and_replacements_capture_ipv6,
        fail_open_lets_traffic_flow_without_ztunnel,
        fail_open_lets_traffic_flow_without_ztunnel_ipv6,
        cleanup_leaves_no_object_of_ours,
        cleanup_leaves_no_object_of_ours_dual_stack,
        cleanup_leaves_no_object_of_ours_ipv6,
        cleanup_with_the_other_firewall_flag_leaves_no_object_of_ours,
    );

    /// Damage done to our table by someone else, in the node netns and in the ztunnel's, and
    /// repaired by the daemon: each time the pod set holds the pods again, the chains are back,
    /// and TCP from the enrolled pod goes through ztunnel. The daemon runs with a 10-minute
    /// resync here, so every repair is the notification-driven one. The time to repair is
    /// printed (not asserted).
    #[test]
    fn drift_in_our_table_is_repaired() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        on_firewall_nft(|| {
            let (mut w, _zt, app, _other) = paths_world("nftdrift", Family::Dual)?;
            let ips = [app.need_ip4()?, app.need_ip6()?];
            w.restart_daemon_setting(&[("--resync-interval-ms", Some("600000"))])?;
            // One look = one `nft list table` (sets with their elements, chains).
            let whole = |w: &World| -> Result<bool> {
                let rs = w
                    .net
                    .exec_ok("node", &["nft", "list", "table", "inet", NFT_TABLE]);
                let Ok(rs) = rs else { return Ok(false) };
                let els = |set: &str| {
                    rs.split(&format!("set {set} {{"))
                        .nth(1)
                        .map(ambient_cni_tests::world::nft_elements)
                        .unwrap_or_default()
                };
                // The ztunnel netns's table: both TPROXY chains.
                let zt = w
                    .net
                    .exec_ok("zt", &["nft", "list", "table", "inet", NFT_TABLE])
                    .unwrap_or_default();
                Ok(rs.contains("chain ip-mangle-prerouting")
                    && rs.contains("chain ip6-mangle-prerouting")
                    && els("pods4").contains(&ips[0])
                    && els("pods6").contains(&ips[1])
                    && zt.contains("chain ip-mangle-prerouting")
                    && zt.contains("chain ip6-mangle-prerouting")
                    && zt.matches(" tproxy ").count() >= 6)
            };
            World::eventually(Duration::from_secs(10), || whole(&w))?;
            let listing = w
                .net
                .exec_ok("node", &["nft", "list", "table", "inet", NFT_TABLE])?;
            println!("nft list table inet {NFT_TABLE} (node):\n{listing}");
            let damage: [(&str, &str, String); 6] = [
                ("node", "nft flush ruleset", "flush ruleset".into()),
                (
                    "node",
                    "delete table",
                    format!("delete table inet {NFT_TABLE}"),
                ),
                (
                    "node",
                    "delete chain",
                    format!("delete chain inet {NFT_TABLE} ip-mangle-prerouting"),
                ),
                (
                    "node",
                    "delete element",
                    format!("delete element inet {NFT_TABLE} pods4 {{ {} }}", ips[0]),
                ),
                (
                    "zt",
                    "delete chain in the ztunnel netns",
                    format!("delete chain inet {NFT_TABLE} ip6-mangle-prerouting"),
                ),
                (
                    "zt",
                    "nft flush ruleset in the ztunnel netns",
                    "flush ruleset".into(),
                ),
            ];
            let zt_listing = w
                .net
                .exec_ok("zt", &["nft", "list", "table", "inet", NFT_TABLE])?;
            println!("nft list table inet {NFT_TABLE} (ztunnel netns):\n{zt_listing}");
            let mut worst = Duration::ZERO;
            for (ns, what, cmd) in damage {
                w.net.exec_ok(ns, &["nft", &cmd])?;
                let t0 = std::time::Instant::now();
                // Polled every 5 ms (each look is one `nft list` run): the figure is the time
                // until the whole table was back, as seen from outside, printed, not asserted.
                let deadline = t0 + Duration::from_secs(10);
                while !whole(&w)? {
                    if std::time::Instant::now() > deadline {
                        bail!("{what} was not repaired within 10 s");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let took = t0.elapsed();
                worst = worst.max(took);
                println!("repair after {what}: {took:?}");
                for f in [V4, V6] {
                    let a = w.answer("app", &hostport(f.remote(), 8080), None)?;
                    assert_has(&a, "ztunnel port=15001", &format!("{what}, {}", f.name()));
                }
            }
            println!(
                "worst repair: {worst:?} (notification-driven; the resync interval is 10 minutes)"
            );
            w.restart_daemon_setting(&[("--resync-interval-ms", Some("500"))])?;
            settled(&w)
        })
    }

    /// iptables → nftables → iptables on a dual-stack node, the daemon restarted with the other
    /// `--firewall` each time: TCP of the enrolled pod is captured before, while the daemon is
    /// down, and after each switch; after each, nothing of the other firewall is left in the node
    /// or the ztunnel netns. (Connections are checked one after another at each step, not as a
    /// continuous stream.)
    #[test]
    fn switching_firewall_leaves_nothing_of_the_other() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        let (mut w, _zt, app, _other) = paths_world("fwswitch", Family::Dual)?;
        let captured = |w: &World, when: &str| -> Result<()> {
            for f in [V4, V6] {
                let a = w.answer("app", &hostport(f.remote(), 8080), None)?;
                assert_has(&a, "ztunnel port=15001", &format!("{when}, {}", f.name()));
            }
            Ok(())
        };
        captured(&w, "iptables")?;
        assert!(
            !ipt_left(&w)?.is_empty(),
            "the iptables driver made nothing?"
        );
        for (to, name) in [
            (Firewall::Nftables, "nftables"),
            (Firewall::Iptables, "iptables"),
        ] {
            if let Some(d) = w.daemon.as_mut() {
                d.stop();
            }
            captured(&w, &format!("daemon down before switching to {name}"))?;
            w.switch_firewall(to)?;
            captured(&w, &format!("after switching to {name}"))?;
            let (mine, other) = match to {
                Firewall::Nftables => (nft_left(&w)?, ipt_left(&w)?),
                Firewall::Iptables => (ipt_left(&w)?, nft_left(&w)?),
            };
            assert!(!mine.is_empty(), "{name}: nothing of ours");
            assert!(
                other.is_empty(),
                "after switching to {name}, left of the other: {other:?}"
            );
            assert!(w.pod_set("node", false)?.contains(&app.need_ip4()?));
            settled(&w)?;
        }
        Ok(())
    }

    /// What the iptables driver left in the node and ztunnel netns: our chains and pod sets.
    fn ipt_left(w: &World) -> Result<Vec<String>> {
        let mut left = Vec::new();
        for ns in ["node", "zt"] {
            for tool in ["iptables-save", "ip6tables-save"] {
                let out = w.net.exec_ok(ns, &[tool])?;
                left.extend(
                    out.lines()
                        .filter(|l| l.contains("ztunnel-"))
                        .map(|l| format!("{ns}: {l}")),
                );
            }
        }
        let sets = w.net.exec_ok("node", &["ipset", "list", "-n"])?;
        left.extend(
            sets.lines()
                .filter(|l| l.contains("ztunnel-pods"))
                .map(str::to_string),
        );
        Ok(left)
    }

    /// Our nft table in the node and ztunnel netns, where it exists.
    fn nft_left(w: &World) -> Result<Vec<String>> {
        let mut left = Vec::new();
        for ns in ["node", "zt"] {
            let out = w.net.exec_ok(ns, &["nft", "list", "tables"])?;
            left.extend(
                out.lines()
                    .filter(|l| l.trim() == format!("table inet {NFT_TABLE}"))
                    .map(|l| format!("{ns}: {l}")),
            );
        }
        Ok(left)
    }

    /// `--firewall auto` follows the node: iptables where nothing speaks nftables; nftables once
    /// kube-proxy's nftables-mode table is there (restart), and still nftables on the next
    /// restart after that table is gone (our own table is the sign now). TCP captured each time,
    /// nothing of the other driver left, and the log says why.
    #[test]
    fn auto_firewall_follows_the_node() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        let (mut w, _zt, _app, _other) = paths_world("fwauto", Family::V4)?;
        let captured = |w: &World, when: &str| {
            let a = w.answer("app", &hostport(V4.remote(), 8080), None)?;
            assert_has(&a, "ztunnel port=15001", when);
            anyhow::Ok(())
        };
        let auto = [("--firewall", Some("auto"))];
        let log_says = |w: &World, what: &str| -> Result<()> {
            let log = w.daemon()?.log_text();
            let line = log
                .lines()
                .rfind(|l| l.contains("--firewall auto"))
                .unwrap_or_default();
            println!("{line}");
            ensure!(
                line.contains(what),
                "the last auto decision is not {what:?}:\n{log}"
            );
            Ok(())
        };

        w.restart_daemon_setting(&auto)?;
        settled(&w)?;
        log_says(&w, "firewall=iptables")?;
        captured(&w, "auto on a node without nftables users")?;
        ensure!(!ipt_left(&w)?.is_empty() && nft_left(&w)?.is_empty());

        w.net
            .exec_ok("node", &["nft", "add", "table", "ip", "kube-proxy"])?;
        w.restart_daemon_setting(&auto)?;
        settled(&w)?;
        log_says(&w, "kube-proxy runs in nftables mode")?;
        captured(&w, "auto beside kube-proxy's nftables table")?;
        let (nft, ipt) = (nft_left(&w)?, ipt_left(&w)?);
        ensure!(
            nft.len() == 2 && ipt.is_empty(),
            "nft {nft:?}, iptables {ipt:?}"
        );

        w.net
            .exec_ok("node", &["nft", "delete", "table", "ip", "kube-proxy"])?;
        w.restart_daemon_setting(&auto)?;
        settled(&w)?;
        log_says(&w, "table inet ambient-cni exists")?;
        captured(&w, "auto after a run on nftables")?;
        ensure!(ipt_left(&w)?.is_empty());
        Ok(())
    }

    fn on_firewall_nft<T>(f: impl FnOnce() -> T) -> T {
        ambient_cni_tests::world::on_firewall(Firewall::Nftables, f)
    }
}
