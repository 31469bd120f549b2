//! `ambient-cnid explain` against real TCP (issue 13): for each path of `traffic.rs` the verdict
//! it reads from the kernel state matches where a real connection ends — held closed without a
//! ztunnel, captured on 15001/15006/15008 with one, direct when not enrolled — and after an
//! outside flush of the ipset it names the cause. The daemon runs with a 10-minute resync so
//! that the drift stays while it is explained.

use ambient_cni_tests::world::{World, AMBIENT_NS, REMOTE_IP};
use ambient_cni_tests::{require_root, run_cmd, workspace_bin, COMMAND_TIMEOUT};
use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn slow_resync(w: &mut World) -> Result<()> {
    if let Some(mut d) = w.daemon.take() {
        d.stop();
    }
    let i = w
        .daemon_args
        .iter()
        .position(|a| a == "--resync-interval-ms")
        .context("World sets the interval")?;
    w.daemon_args[i + 1] = "600000".into();
    w.start_daemon()
}

/// `ambient-cnid explain SRC DST [--json]` in the node netns.
fn explain(w: &World, src: &str, dst: &str, json: bool) -> Result<String> {
    let bin = workspace_bin("ambient-cnid")?;
    let d = w.daemon()?;
    let mut argv: Vec<&str> = vec![
        bin.to_str().context("path")?,
        "explain",
        src,
        dst,
        "--socket",
        d.socket().to_str().context("path")?,
    ];
    if json {
        argv.push("--json");
    }
    let out = run_cmd(&mut w.net.command("node", &argv), None, COMMAND_TIMEOUT);
    ensure!(out.success(), "explain {src} {dst}: {out}");
    Ok(out.stdout)
}

/// The forward verdict and outcome kind.
fn verdict(w: &World, src: &str, dst: &str) -> Result<(String, Value)> {
    let v: Value = serde_json::from_str(&explain(w, src, dst, true)?)?;
    Ok((
        v["forward"]["verdict"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["forward"]["outcome"].clone(),
    ))
}

fn captured_on(outcome: &Value) -> Option<u64> {
    (outcome["kind"] == "captured")
        .then(|| outcome["port"].as_u64())
        .flatten()
}

#[test]
fn explain_agrees_with_real_tcp_on_every_path() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut w = World::new("explain", &[])?;
    slow_resync(&mut w)?;
    let app = w.pod("app", AMBIENT_NS, "app")?;
    let other = w.pod("other", "legacy", "other")?;
    let remote = format!("{REMOTE_IP}:8080");
    let app8080 = format!("{}:8080", app.ip);

    // No ztunnel yet: the enrolled pod's TCP is held closed both ways.
    let (v, o) = verdict(&w, &app.ip, &remote)?;
    println!("no ztunnel, app → remote: {v}");
    ensure!(o["kind"] == "rejected" && v.contains("held closed"), "{v}");
    ensure!(
        !w.connect("app", &remote, None).success(),
        "app reached the remote without ztunnel"
    );
    let (v, o) = verdict(&w, REMOTE_IP, &app8080)?;
    println!("no ztunnel, remote → app: {v}");
    ensure!(
        o["kind"] == "rejected" && v.contains("held closed, no ztunnel"),
        "{v}"
    );
    ensure!(
        !w.connect("remote", &app8080, None).success(),
        "remote reached app without ztunnel"
    );

    w.ztunnel("zt", "a")?;
    // Enrolled egress: captured on 15001, original destination kept.
    let (v, o) = verdict(&w, &app.ip, &remote)?;
    ensure!(captured_on(&o) == Some(15001), "{v}");
    ensure!(v.contains("original destination kept"), "{v}");
    let a = w.answer("app", &remote, None)?;
    ensure!(
        a.contains("port=15001") && a.contains(&format!("orig_dst={remote}")),
        "{a}"
    );
    // Inbound: 15006, and 15008 for the HBONE port.
    let (v, o) = verdict(&w, REMOTE_IP, &app8080)?;
    ensure!(captured_on(&o) == Some(15006), "{v}");
    ensure!(w.answer("remote", &app8080, None)?.contains("port=15006"));
    let hbone = format!("{}:15008", app.ip);
    let (v, o) = verdict(&w, REMOTE_IP, &hbone)?;
    ensure!(captured_on(&o) == Some(15008), "{v}");
    ensure!(w.answer("remote", &hbone, None)?.contains("port=15008"));
    // Pod to pod on the node: egress of the enrolled one, inbound to it from the other.
    let other8080 = format!("{}:8080", other.ip);
    let (v, o) = verdict(&w, &app.ip, &other8080)?;
    ensure!(captured_on(&o) == Some(15001), "{v}");
    ensure!(w.answer("app", &other8080, None)?.contains("port=15001"));
    let (v, o) = verdict(&w, &other.ip, &app8080)?;
    ensure!(captured_on(&o) == Some(15006), "{v}");
    ensure!(w.answer("other", &app8080, None)?.contains("port=15006"));
    // Not enrolled: direct, both ways.
    let (v, o) = verdict(&w, &other.ip, &remote)?;
    ensure!(v == "direct via eth1" && o["kind"] == "direct", "{v}");
    ensure!(w
        .answer("other", &remote, None)?
        .starts_with("remote peer="));
    let (v, o) = verdict(&w, REMOTE_IP, &other8080)?;
    ensure!(o["kind"] == "direct", "{v}");
    ensure!(w
        .answer("remote", &other8080, None)?
        .starts_with("other peer="));

    println!(
        "--- explain {} {remote} (enrolled)\n{}",
        app.ip,
        explain(&w, &app.ip, &remote, false)?
    );
    println!(
        "--- explain {} {remote} (not enrolled)\n{}",
        other.ip,
        explain(&w, &other.ip, &remote, false)?
    );

    // Drift: the set flushed from outside (the resync is 10 minutes away).
    w.net
        .exec_ok("node", &["ipset", "flush", "ztunnel-pods-ips"])?;
    let (v, o) = verdict(&w, &app.ip, &remote)?;
    println!("after an outside ipset flush, app → remote: {v}");
    ensure!(
        v.starts_with("not captured: pod IP missing from the set"),
        "{v}"
    );
    ensure!(o["kind"] == "direct", "{o}");
    let out = w.connect("app", &remote, None);
    ensure!(
        !out.stdout.contains("port=15001"),
        "captured although the set is empty: {out}"
    );
    // Inbound capture does not depend on the set.
    let (v, o) = verdict(&w, REMOTE_IP, &app8080)?;
    ensure!(captured_on(&o) == Some(15006), "{v}");
    ensure!(w.answer("remote", &app8080, None)?.contains("port=15006"));
    println!(
        "--- explain {} {remote} (ipset flushed)\n{}",
        app.ip,
        explain(&w, &app.ip, &remote, false)?
    );
    Ok(())
}
