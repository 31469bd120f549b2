//! Pods that already run when ambient-cni arrives (made by libcni with ptp + host-local only, no
//! ambient-cni in their chain, so the daemon never saw their ADD) are enrolled afterwards by
//! `ambient-cnid enroll`, with real TCP captured (egress at 15001, inbound at 15006); a release
//! sends them direct again; and the uninstall sequence (`ambient-cnid uninstall` + `ambient-cnid
//! cleanup` in the node's netns, what the uninstall DaemonSet runs) leaves them talking directly
//! instead of held closed.

use std::process::Command;
use std::time::Duration;

use ambient_cni_tests::world::{World, AMBIENT_NS, POD_CIDR, POD_GW, REMOTE_IP};
use ambient_cni_tests::{require_root, run_cmd, workspace_bin, Output};
use anyhow::{Context, Result};
use serde_json::json;

/// The network of the pods made before the plugin: the node's primary CNI alone.
const PLAIN: &str = "plain";

fn assert_has(answer: &str, want: &str, what: &str) {
    assert!(
        answer.contains(want),
        "{what}: expected {want:?} in {answer:?}"
    );
}

fn cnid(w: &World, args: &[&str]) -> Result<Output> {
    let d = w.daemon()?;
    let mut c = Command::new(workspace_bin("ambient-cnid")?);
    c.args(args).arg("--socket").arg(d.socket());
    Ok(run_cmd(&mut c, None, Duration::from_secs(30)))
}

/// A world whose conf dir also holds `plain`: ptp + host-local in the node's pod CIDR (upper
/// range, so its IPs never meet the other network's), without ambient-cni.
fn world(tag: &str) -> Result<World> {
    let w = World::new(tag, &[])?;
    w.cni.write_conflist(&json!({
        "cniVersion": "1.0.0",
        "name": PLAIN,
        "plugins": [{
            "type": "ptp", "ipMasq": false,
            "ipam": {"type": "host-local", "dataDir": w.cni.ipam_dir(),
                     "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GW,
                                  "rangeStart": "10.244.1.200", "rangeEnd": "10.244.1.250"}]],
                     "routes": [{"dst": "0.0.0.0/0"}]}
        }]
    }))?;
    Ok(w)
}

#[test]
fn running_pods_without_the_plugin_are_enrolled_by_hand_released_and_direct_after_uninstall(
) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut w = world("enroll")?;
    let _zt = w.ztunnel("zt", "a")?;
    let app = w.pod_in(PLAIN, "app", AMBIENT_NS, "app")?;
    let other = w.pod_in(PLAIN, "other", AMBIENT_NS, "other")?;
    let remote = format!("{REMOTE_IP}:8080");
    let to_app = format!("{}:8080", app.ip);

    // Made without our plugin: the daemon never heard of them, their traffic is direct.
    assert_has(
        &w.answer("app", &remote, None)?,
        &format!("remote peer={}:", app.ip),
        "before",
    );
    assert_has(
        &w.answer("remote", &to_app, None)?,
        &format!("app peer={REMOTE_IP}:"),
        "inbound before",
    );

    // Enrolled by hand: captured both ways, with the pod UID as the ipset entry's owner.
    let out = cnid(
        &w,
        &[
            "enroll",
            "--namespace",
            AMBIENT_NS,
            "--pod",
            "app",
            "--uid",
            "uid-app",
            "--ip",
            &app.ip,
        ],
    )?;
    assert!(out.success(), "enroll: {out}");
    println!("enroll: {}", out.stdout.trim());
    assert_has(
        &w.answer("app", &remote, None)?,
        &format!("ztunnel port=15001 orig_dst={remote} peer={}:", app.ip),
        "egress after enroll",
    );
    assert_has(
        &w.answer("remote", &to_app, None)?,
        &format!("ztunnel port=15006 orig_dst={to_app} peer={REMOTE_IP}:"),
        "inbound after enroll",
    );
    assert_has(
        &w.answer("other", &remote, None)?,
        &format!("remote peer={}:", other.ip),
        "the other pod stays direct",
    );
    let set = w
        .net
        .exec_ok("node", &["ipset", "list", "ztunnel-pods-ips"])?;
    assert_has(
        &set,
        &format!("{} comment \"uid-app\"", app.ip),
        "ipset owner",
    );
    // The host interface is the one of ptp's main-table route to the pod.
    let hif = w.net.exec_ok(
        "node",
        &[
            "ip",
            "-o",
            "route",
            "show",
            "table",
            "main",
            "exact",
            &format!("{}/32", app.ip),
        ],
    )?;
    let dev = hif
        .split_whitespace()
        .skip_while(|t| *t != "dev")
        .nth(1)
        .context("dev of the pod route")?
        .to_string();
    let rp = w.net.exec_ok(
        "node",
        &["sysctl", "-n", &format!("net.ipv4.conf.{dev}.rp_filter")],
    )?;
    assert_eq!(
        rp.trim(),
        "2",
        "rp_filter on the pod's host interface {dev}"
    );

    // Refusals say why, and change nothing.
    let out = cnid(
        &w,
        &[
            "enroll",
            "--namespace",
            AMBIENT_NS,
            "--pod",
            "ghost",
            "--uid",
            "uid-ghost",
            "--ip",
            "10.244.9.9",
        ],
    )?;
    assert!(!out.success(), "a pod without a route: {out}");
    assert_has(&out.stderr, "host interface not found", "no route");
    let out = cnid(
        &w,
        &[
            "enroll",
            "--namespace",
            "legacy",
            "--pod",
            "other",
            "--uid",
            "uid-other",
            "--ip",
            &other.ip,
        ],
    )?;
    assert!(!out.success(), "a namespace that is not ambient: {out}");
    assert_has(&out.stderr, "not ambient", "namespace");

    // Released: direct again.
    let out = cnid(&w, &["enroll", "--release", "--uid", "uid-app"])?;
    assert!(out.success(), "release: {out}");
    assert_has(
        &w.answer("app", &remote, None)?,
        &format!("remote peer={}:", app.ip),
        "released",
    );
    assert_has(
        &w.answer("remote", &to_app, None)?,
        &format!("app peer={REMOTE_IP}:"),
        "inbound released",
    );

    // Enrolled again, survives a daemon restart (state dir), then the uninstall sequence.
    let out = cnid(
        &w,
        &[
            "enroll",
            "--namespace",
            AMBIENT_NS,
            "--pod",
            "app",
            "--uid",
            "uid-app",
            "--ip",
            &app.ip,
        ],
    )?;
    assert!(out.success(), "enroll again: {out}");
    if let Some(mut d) = w.daemon.take() {
        d.stop();
    }
    w.start_daemon()?;
    assert_has(
        &w.answer("app", &remote, None)?,
        "ztunnel port=15001",
        "still captured after a restart",
    );
    let st = w.daemon()?.status_json()?;
    println!("status after restart: {st}");

    // Uninstall: the daemon's DaemonSet is deleted (the daemon stops, leaving the kernel as it
    // is), then the uninstall DaemonSet runs `uninstall` and `cleanup` in the node's netns.
    if let Some(mut d) = w.daemon.take() {
        d.stop();
    }
    let bin = workspace_bin("ambient-cnid")?;
    let bin = bin.to_str().context("binary path")?;
    let conf = w.cni.conf_dir();
    let plugins = w.cni.bin_dir();
    let out = w.net.exec(
        "node",
        &[
            bin,
            "uninstall",
            "--conf-dir",
            conf.to_str().context("conf dir")?,
            "--bin-dir",
            plugins.to_str().context("bin dir")?,
        ],
    );
    assert!(out.success(), "uninstall: {out}");
    let state = w.daemon_dir.join("state");
    let out = w.net.exec(
        "node",
        &[
            bin,
            "cleanup",
            "--state-dir",
            state.to_str().context("state dir")?,
        ],
    );
    assert!(out.success(), "cleanup: {out}");
    assert_has(
        &w.answer("app", &remote, None)?,
        &format!("remote peer={}:", app.ip),
        "direct after uninstall",
    );
    assert_has(
        &w.answer("remote", &to_app, None)?,
        &format!("app peer={REMOTE_IP}:"),
        "inbound direct after uninstall",
    );
    let state = w.node_state("node")?;
    assert!(
        !state.contains("ztunnel"),
        "objects left after uninstall:\n{state}"
    );
    Ok(())
}
