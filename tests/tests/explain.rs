//! `ambient-cnid explain` against real TCP (issue 13), for IPv4 and IPv6: for each path of
//! `traffic.rs` the verdict it reads from the kernel state matches where a real connection ends —
//! held closed without a ztunnel; with one, captured on 15001/15006/15008, direct when not
//! enrolled, ztunnel's own and spoofed connections and the node's probe straight to the pod — and
//! after an outside flush of the set it names the cause. The daemon runs with a 10-minute resync
//! so that the drift stays while it is explained. The `nft_` tests run the same on
//! `--firewall nftables`, where explain reads our nft table instead of iptables and the ipset.

use ambient_cni_tests::world::{
    hostport, on_firewall, Family, Firewall, Pod, World, AMBIENT_NS, NFT_TABLE, POD_GW, POD_GW6,
    REMOTE_IP, REMOTE_IP6,
};
use ambient_cni_tests::{require_root, run_cmd, workspace_bin, COMMAND_TIMEOUT};
use anyhow::{ensure, Context, Result};
use serde_json::Value;

/// Restarts the daemon with a 10-minute resync: only what explain reads decides the verdicts.
/// On nftables also without event repair: the nf_tables notifications would repair the set's
/// flush within milliseconds, before explain could see it.
fn slow_resync(w: &mut World) -> Result<()> {
    w.restart_daemon_setting(&[("--resync-interval-ms", Some("600000"))])?;
    if w.firewall() == Firewall::Nftables {
        w.restart_daemon_with(&["--no-event-repair"])?;
    }
    Ok(())
}

/// `ambient-cnid explain SRC DST [--in IFACE] [--json]` in the node netns.
fn explain(w: &World, src: &str, dst: &str, iif: Option<&str>, json: bool) -> Result<String> {
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
    if let Some(i) = iif {
        argv.extend(["--in", i]);
    }
    if json {
        argv.push("--json");
    }
    let out = run_cmd(&mut w.net.command("node", &argv), None, COMMAND_TIMEOUT);
    ensure!(out.success(), "explain {src} {dst}: {out}");
    Ok(out.stdout)
}

/// The forward verdict and outcome.
fn verdict(w: &World, src: &str, dst: &str, iif: Option<&str>) -> Result<(String, Value)> {
    let v: Value = serde_json::from_str(&explain(w, src, dst, iif, true)?)?;
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

/// The interface the node's main table routes the pod address `ip` out of (its veth). With the
/// skip mark 0x200 rule 100 sends the lookup to the main table; without it, rule 103 would take
/// an enrolled pod's address into table 100.
fn dev_of(w: &World, ip: &str) -> Result<String> {
    let out = w
        .net
        .exec_ok("node", &["ip", "-j", "route", "get", ip, "mark", "0x200"])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["dev"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no route to {ip}: {out}"))
}

/// Asserts that explain says `src → dst` goes directly out of `dev`, and prints the verdict.
fn direct(w: &World, what: &str, src: &str, dst: &str, iif: Option<&str>, dev: &str) -> Result<()> {
    let (v, o) = verdict(w, src, dst, iif)?;
    println!("{what}: {v}");
    ensure!(
        o["kind"] == "direct" && o["dev"] == dev,
        "{what}: expected direct via {dev}: {v} {o}"
    );
    Ok(())
}

/// Asserts that explain says `src → dst` is captured on `port`, and prints the verdict.
fn captured(w: &World, what: &str, src: &str, dst: &str, port: u64) -> Result<()> {
    let (v, o) = verdict(w, src, dst, None)?;
    println!("{what}: {v}");
    ensure!(captured_on(&o) == Some(port), "{what}: {v} {o}");
    ensure!(v.contains("original destination kept"), "{what}: {v}");
    Ok(())
}

/// The address of `p` of the world's family.
fn ip_of(p: &Pod, v6: bool) -> Result<String> {
    if v6 {
        p.need_ip6()
    } else {
        p.need_ip4()
    }
}

fn paths(family: Family, tag: &str) -> Result<()> {
    let v6 = family == Family::V6;
    let (rem, gw, set) = if v6 {
        (REMOTE_IP6, POD_GW6, "ztunnel-pods-ips6")
    } else {
        (REMOTE_IP, POD_GW, "ztunnel-pods-ips")
    };
    let mut w = World::with_family(tag, family, &[])?;
    slow_resync(&mut w)?;
    let app = w.pod("app", AMBIENT_NS, "app")?;
    let other = w.pod("other", "legacy", "other")?;
    let (app_ip, other_ip) = (ip_of(&app, v6)?, ip_of(&other, v6)?);
    let remote = hostport(rem, 8080);
    let app8080 = hostport(&app_ip, 8080);
    let other8080 = hostport(&other_ip, 8080);

    // No ztunnel yet: the enrolled pod's TCP is held closed both ways.
    let (v, o) = verdict(&w, &app_ip, &remote, None)?;
    println!("no ztunnel, app → remote: {v}");
    ensure!(o["kind"] == "rejected" && v.contains("held closed"), "{v}");
    ensure!(
        !w.connect("app", &remote, None).success(),
        "app reached the remote without ztunnel"
    );
    let (v, o) = verdict(&w, rem, &app8080, None)?;
    println!("no ztunnel, remote → app: {v}");
    ensure!(
        o["kind"] == "rejected" && v.contains("held closed, no ztunnel"),
        "{v}"
    );
    ensure!(
        !w.connect("remote", &app8080, None).success(),
        "remote reached app without ztunnel"
    );

    let zt = w.ztunnel("zt", "a")?;
    let zt_ip = ip_of(&zt, v6)?;
    let (zv, app_dev, other_dev, eth1) = (
        dev_of(&w, &zt_ip)?,
        dev_of(&w, &app_ip)?,
        dev_of(&w, &other_ip)?,
        "eth1".to_string(),
    );
    // Enrolled egress: captured on 15001, original destination kept.
    captured(&w, "app → remote", &app_ip, &remote, 15001)?;
    let a = w.answer("app", &remote, None)?;
    ensure!(
        a.contains("port=15001") && a.contains(&format!("orig_dst={remote}")),
        "{a}"
    );
    // Not enrolled: direct, both ways.
    direct(&w, "other → remote", &other_ip, &remote, None, &eth1)?;
    ensure!(w
        .answer("other", &remote, None)?
        .starts_with("remote peer="));
    direct(&w, "remote → other", rem, &other8080, None, &other_dev)?;
    ensure!(w
        .answer("remote", &other8080, None)?
        .starts_with("other peer="));
    // Inbound: 15006, and 15008 for the HBONE port.
    captured(&w, "remote → app:8080", rem, &app8080, 15006)?;
    ensure!(w.answer("remote", &app8080, None)?.contains("port=15006"));
    let hbone = hostport(&app_ip, 15008);
    captured(&w, "remote → app:15008", rem, &hbone, 15008)?;
    ensure!(w.answer("remote", &hbone, None)?.contains("port=15008"));
    // Pod to pod on the node: egress of the enrolled one, inbound to it from the other.
    captured(&w, "app → other", &app_ip, &other8080, 15001)?;
    ensure!(w.answer("app", &other8080, None)?.contains("port=15001"));
    captured(&w, "other → app", &other_ip, &app8080, 15006)?;
    ensure!(w.answer("other", &app8080, None)?.contains("port=15006"));
    // ztunnel to the pod, with its own address and spoofing the remote client, and to the
    // remote spoofing the pod: straight out, no loop back into ztunnel.
    direct(&w, "ztunnel → app", &zt_ip, &app8080, None, &app_dev)?;
    ensure!(w.answer("zt", &app8080, None)?.starts_with("app peer="));
    direct(
        &w,
        "ztunnel (as remote) → app",
        rem,
        &app8080,
        Some(&zv),
        &app_dev,
    )?;
    ensure!(w
        .answer("zt", &app8080, Some(rem))?
        .starts_with("app peer="));
    direct(
        &w,
        "ztunnel (as app) → remote",
        &app_ip,
        &remote,
        Some(&zv),
        &eth1,
    )?;
    ensure!(w
        .answer("zt", &remote, Some(&app_ip))?
        .starts_with("remote peer="));
    // The node's probe from the pods' gateway address: made on the node, straight to the pod.
    direct(&w, "node (probe) → app", gw, &app8080, None, &app_dev)?;
    ensure!(w.answer("node", &app8080, None)?.starts_with("app peer="));

    println!(
        "--- explain {app_ip} {remote} (enrolled)\n{}",
        explain(&w, &app_ip, &remote, None, false)?
    );
    println!(
        "--- explain {other_ip} {remote} (not enrolled)\n{}",
        explain(&w, &other_ip, &remote, None, false)?
    );

    // Drift: the set flushed from outside (the resync is 10 minutes away).
    match w.firewall() {
        Firewall::Iptables => w.net.exec_ok("node", &["ipset", "flush", set])?,
        Firewall::Nftables => {
            let nft_set = if v6 { "pods6" } else { "pods4" };
            w.net
                .exec_ok("node", &["nft", "flush", "set", "inet", NFT_TABLE, nft_set])?
        }
    };
    let e: Value = serde_json::from_str(&explain(&w, &app_ip, &remote, None, true)?)?;
    let v = e["forward"]["verdict"].as_str().unwrap_or_default();
    println!("after an outside flush of {set}, app → remote: {v}");
    ensure!(
        v.starts_with("not captured: pod IP missing from the set"),
        "{v}"
    );
    ensure!(e["forward"]["outcome"]["kind"] == "direct", "{e}");
    // The remote's answer is routed into ztunnel as inbound (table 100 still has the pod): its
    // listener resets the connection it does not hold.
    let r = e["reply"]["verdict"].as_str().unwrap_or_default();
    println!("  the answer: {r}");
    ensure!(e["reply"]["outcome"]["kind"] == "rejected", "{e}");
    let out = w.connect("app", &remote, None);
    ensure!(
        !out.success() && !out.stdout.contains("port=15001"),
        "the connection went through although the set is empty: {out}"
    );
    // Inbound capture does not depend on the set.
    captured(&w, "remote → app:8080 (set flushed)", rem, &app8080, 15006)?;
    ensure!(w.answer("remote", &app8080, None)?.contains("port=15006"));
    println!(
        "--- explain {app_ip} {remote} (set flushed)\n{}",
        explain(&w, &app_ip, &remote, None, false)?
    );
    Ok(())
}

#[test]
fn explain_agrees_with_real_tcp_on_every_path() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    paths(Family::V4, "explain")
}

#[test]
fn explain_agrees_with_real_tcp_on_every_path_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    paths(Family::V6, "explain6")
}

/// The same paths on `--firewall nftables`: explain reads table inet ambient-cni (auto-detected).
#[test]
fn nft_explain_agrees_with_real_tcp_on_every_path() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    on_firewall(Firewall::Nftables, || paths(Family::V4, "nexplain"))
}

#[test]
fn nft_explain_agrees_with_real_tcp_on_every_path_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    on_firewall(Firewall::Nftables, || paths(Family::V6, "nexplain6"))
}
