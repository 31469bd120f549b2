//! Real TCP through the redirection the daemon programs (issue 4), in namespaces only.
//!
//! Each test builds a [`World`]: node netns with the daemon, a remote host, pods through libcni.
//! The ztunnel stand-in answers `ztunnel port=<listener> orig_dst=<ip:port> peer=<ip:port>`; echo
//! servers answer `<name> peer=<ip:port>`.

use std::time::Duration;

use ambient_cni_tests::require_root;
use ambient_cni_tests::world::{World, POD_GW, REMOTE_IP};
use anyhow::Result;

fn assert_has(answer: &str, want: &str, what: &str) {
    assert!(
        answer.contains(want),
        "{what}: expected {want:?} in {answer:?}"
    );
}

#[test]
fn every_path_is_captured_where_the_design_says() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::new("paths", &[])?;
    let zt = w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    let other = w.pod("other", "legacy", "other")?;
    let remote = format!("{REMOTE_IP}:8080");

    // Egress of an enrolled pod arrives at 15001 with the original destination intact.
    let a = w.answer("app", &remote, None)?;
    assert_has(
        &a,
        &format!("ztunnel port=15001 orig_dst={remote} peer={}:", app.ip),
        "enrolled egress",
    );
    // A pod that is not enrolled reaches the remote host directly.
    let a = w.answer("other", &remote, None)?;
    assert_has(
        &a,
        &format!("remote peer={}:", other.ip),
        "non-enrolled egress",
    );
    // Inbound to an enrolled pod: 15006; to its port 15008: 15008.
    let a = w.answer("remote", &format!("{}:8080", app.ip), None)?;
    assert_has(
        &a,
        &format!(
            "ztunnel port=15006 orig_dst={}:8080 peer={REMOTE_IP}:",
            app.ip
        ),
        "inbound",
    );
    let a = w.answer("remote", &format!("{}:15008", app.ip), None)?;
    assert_has(
        &a,
        &format!("ztunnel port=15008 orig_dst={}:15008", app.ip),
        "HBONE",
    );
    // Inbound to a pod that is not enrolled is not captured.
    let a = w.answer("remote", &format!("{}:8080", other.ip), None)?;
    assert_has(
        &a,
        &format!("other peer={REMOTE_IP}:"),
        "inbound to non-enrolled",
    );
    // Same node: enrolled → not enrolled is egress (15001); not enrolled → enrolled is inbound (15006).
    let a = w.answer("app", &format!("{}:8080", other.ip), None)?;
    assert_has(
        &a,
        &format!("ztunnel port=15001 orig_dst={}:8080", other.ip),
        "pod to pod egress",
    );
    let a = w.answer("other", &format!("{}:8080", app.ip), None)?;
    assert_has(
        &a,
        &format!(
            "ztunnel port=15006 orig_dst={}:8080 peer={}:",
            app.ip, other.ip
        ),
        "pod to pod inbound",
    );
    // ztunnel reaches the enrolled pod directly (no loop back into itself) ...
    let a = w.answer("zt", &format!("{}:8080", app.ip), None)?;
    assert_has(&a, &format!("app peer={}:", zt.ip), "ztunnel to pod");
    // ... also with the remote client's address as source (transparent socket): the reply comes
    // back to ztunnel through connmark 0x210 → mark 0x040 → table 102 → its veth → 0x4d3 → local.
    let a = w.answer("zt", &format!("{}:8080", app.ip), Some(REMOTE_IP))?;
    assert_has(
        &a,
        &format!("app peer={REMOTE_IP}:"),
        "ztunnel to pod, spoofed",
    );
    // ... and to the remote host, spoofing the enrolled pod (what ztunnel does for egress).
    let a = w.answer("zt", &remote, Some(&app.ip))?;
    assert_has(
        &a,
        &format!("remote peer={}:", app.ip),
        "ztunnel to remote, spoofed",
    );
    // A kubelet probe (the node, from the pods' gateway address) reaches the pod directly.
    let a = w.answer("node", &format!("{}:8080", app.ip), None)?;
    assert_has(
        &a,
        &format!("app peer={POD_GW}:"),
        "node to pod (probe skip)",
    );

    // The kernel the daemon reads back matches what it wants: a resync changes nothing.
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

#[test]
fn del_removes_everything_of_the_pod_and_its_ip_is_no_longer_captured() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::new("del", &[])?;
    w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    let keep = w.pod("keep", "default", "keep")?;
    let before = w
        .net
        .exec_ok("node", &["ipset", "list", "ztunnel-pods-ips"])?;
    assert!(
        before.contains(&app.ip) && before.contains(&keep.ip),
        "{before}"
    );
    let out = w.del(&app);
    assert!(out.success(), "{out}");
    let set = w
        .net
        .exec_ok("node", &["ipset", "list", "ztunnel-pods-ips"])?;
    assert!(
        !set.contains(&format!("{} ", app.ip)) && !set.lines().any(|l| l.starts_with(&app.ip)),
        "{set}"
    );
    assert!(set.contains(&keep.ip));
    let t100 = w
        .net
        .exec_ok("node", &["ip", "route", "show", "table", "100"])?;
    assert!(!t100.contains(&app.ip), "{t100}");
    assert!(t100.contains(&keep.ip), "{t100}");
    // Its IP now routes like any address the node does not own: not into istioin.
    let get = w.net.exec(
        "node",
        &[
            "ip", "route", "get", &app.ip, "from", REMOTE_IP, "iif", "eth1",
        ],
    );
    assert!(!get.stdout.contains("istioin"), "{get}");
    // The other pod is still captured.
    let a = w.answer("remote", &format!("{}:8080", keep.ip), None)?;
    assert!(a.contains("ztunnel port=15006"), "{a}");
    Ok(())
}

#[test]
fn pod_before_ztunnel_is_held_closed_then_captured_and_replacements_capture() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::new("ztlife", &[])?;
    let app = w.pod("app", "default", "app")?;
    let remote = format!("{REMOTE_IP}:8080");
    let inbound = format!("{}:8080", app.ip);
    // No ztunnel on the node yet: held closed in both directions (no bypass).
    assert!(
        !w.connect("app", &remote, None).success(),
        "egress must not bypass ztunnel"
    );
    assert!(
        !w.connect("remote", &inbound, None).success(),
        "inbound must not bypass ztunnel"
    );
    // The first ztunnel arrives: the pod enrolled before it is captured.
    let z1 = w.ztunnel("zt1", "one")?;
    assert!(w
        .answer("app", &remote, None)?
        .contains("ztunnel port=15001"));
    assert!(w
        .answer("remote", &inbound, None)?
        .contains("ztunnel port=15006"));
    // ztunnel DEL: held closed again until the replacement's ADD.
    assert!(w.del(&z1).success());
    assert!(!w.connect("app", &remote, None).success());
    assert!(!w.connect("remote", &inbound, None).success());
    let _z2 = w.ztunnel("zt2", "two")?;
    assert!(w
        .answer("app", &remote, None)?
        .contains("ztunnel port=15001"));
    assert!(w
        .answer("remote", &inbound, None)?
        .contains("ztunnel port=15006"));
    // The ztunnel's netns vanishes without a DEL: the kernel deletes the veths and every route
    // through them; the fallbacks keep it closed.
    w.net.del_ns("zt2")?;
    assert!(!w.connect("app", &remote, None).success());
    assert!(!w.connect("remote", &inbound, None).success());
    // A replacement in a new netns captures again, with fresh tunnels.
    let _z3 = w.ztunnel("zt3", "three")?;
    assert!(w
        .answer("app", &remote, None)?
        .contains("ztunnel port=15001"));
    assert!(w
        .answer("remote", &inbound, None)?
        .contains("ztunnel port=15006"));
    // A late DEL of the old ztunnel does not tear down the new one's tunnels.
    let late = w.cnitool("del", "zt1", "istio-system", "ztunnel-one");
    assert!(late.success(), "{late}");
    assert!(w
        .answer("app", &remote, None)?
        .contains("ztunnel port=15001"));
    Ok(())
}

#[test]
fn fail_open_lets_traffic_flow_without_ztunnel() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::new("failopen", &["--fail-open"])?;
    let app = w.pod("app", "default", "app")?;
    let a = w.answer("app", &format!("{REMOTE_IP}:8080"), None)?;
    assert!(a.contains(&format!("remote peer={}:", app.ip)), "{a}");
    let a = w.answer("remote", &format!("{}:8080", app.ip), None)?;
    assert!(a.contains("app peer="), "{a}");
    w.ztunnel("zt", "a")?;
    assert!(w
        .answer("app", &format!("{REMOTE_IP}:8080"), None)?
        .contains("ztunnel port=15001"));
    Ok(())
}

#[test]
fn cleanup_leaves_no_object_of_ours() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut w = World::new("cleanup", &[])?;
    // The daemon is already running (its start-up reconcile made the base state); take the
    // "before" picture in a twin node namespace built the same way, without a daemon.
    w.net.add_ns("twin")?;
    w.net.add_ns("twinpeer")?;
    w.net.veth("twin", "eth1", "twinpeer", "eth0")?;
    w.net.exec_ok(
        "twin",
        &["ip", "addr", "add", "198.51.100.1/24", "dev", "eth1"],
    )?;
    let before = w.node_state("twin")?;
    let zt = w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    assert!(w
        .answer("app", &format!("{REMOTE_IP}:8080"), None)?
        .contains("ztunnel port=15001"));
    if let Some(mut d) = w.daemon.take() {
        d.stop();
    }
    let bin = ambient_cni_tests::workspace_bin("ambient-cnid")?;
    let state = w.daemon_dir.join("state");
    let out = w.net.exec(
        "node",
        &[
            bin.to_str().unwrap_or_default(),
            "cleanup",
            "--state-dir",
            state.to_str().unwrap_or_default(),
        ],
    );
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
    let zs = w.net.exec_ok("zt", &["iptables-save"])?;
    assert!(!zs.contains("ztunnel"), "{zs}");
    let zr = w.net.exec_ok("zt", &["ip", "rule"])?;
    assert!(!zr.contains("20000") && !zr.contains("20003"), "{zr}");
    let zl = w.net.exec_ok("zt", &["ip", "-o", "link"])?;
    assert!(!zl.contains("pistio"), "{zl}");
    Ok(())
}
