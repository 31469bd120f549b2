//! The plugin driven by a real container runtime (issue 12): Debian's rootful podman 4.3 (CNI
//! backend, runc) makes the containers' networks inside our node namespace, through the node's
//! conflist (ptp + host-local + ambient-cni, patched by `ambient-cnid install`), while the daemon
//! runs there too. Real TCP through podman's containers; podman's own verbs (run, stop, start,
//! restart, rm) make the CNI ADDs and DELs, with its own cache, netns paths and CNI_ARGS.
//!
//! The machine's root network namespace is read before and after (links, addresses, rules and
//! routes of both families, iptables legacy and nft of both families, the nft ruleset, ipset
//! names, `net.*` sysctls); the test fails unless the two are equal, and prints the diff.
//!
//! Fails (never skips) under `CI` when podman is missing: `make deps` installs it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_cni_tests::podman::{wait_until, NetInfo, Podman, RootNetns};
use ambient_cni_tests::world::{World, NETWORK, REMOTE_IP};
use ambient_cni_tests::{require_root, run_cmd, workspace_bin, COMMAND_TIMEOUT};
use anyhow::{ensure, Context, Result};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(15);

fn remote() -> String {
    format!("{REMOTE_IP}:8080")
}

/// `ipset list ztunnel-pods-ips` in the node: `(ip, comment)` of each member.
fn ipset_members(w: &World) -> Result<Vec<(String, String)>> {
    let out = w
        .net
        .exec_ok("node", &["ipset", "list", "ztunnel-pods-ips"])?;
    Ok(out
        .lines()
        .skip_while(|l| !l.starts_with("Members:"))
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let ip = it.next()?.to_string();
            let comment = l
                .split_once("comment ")
                .map(|(_, c)| c.trim_matches('"').to_string())
                .unwrap_or_default();
            Some((ip, comment))
        })
        .collect())
}

/// The destinations of table 100 in the node (one /32 per enrolled pod, plus ztunnel's).
fn table100(w: &World) -> Result<Vec<String>> {
    let out = w
        .net
        .exec_ok("node", &["ip", "-4", "route", "show", "table", "100"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// The daemon's registry records (`ambient-cnid dump`).
fn records(w: &World) -> Result<Vec<Value>> {
    Ok(w.daemon()?.dump_json()?["pods"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn record_of<'a>(recs: &'a [Value], name: &str) -> Option<&'a Value> {
    recs.iter().find(|r| r["name"] == name)
}

/// The enrolled pod `ip` (uid `uid-<name>`) has its ipset entry and its table-100 route.
fn has_entries(w: &World, name: &str, ip: &str) -> Result<bool> {
    let set = ipset_members(w)?;
    let entry = set
        .iter()
        .any(|(i, c)| i == ip && *c == format!("uid-{name}"));
    Ok(entry && table100(w)?.iter().any(|d| d == ip))
}

/// Neither an ipset entry nor a table-100 route for `ip`, and no record named `name`.
fn has_no_entries(w: &World, name: &str, ip: &str) -> Result<bool> {
    Ok(!ipset_members(w)?.iter().any(|(i, _)| i == ip)
        && !table100(w)?.iter().any(|d| d == ip)
        && record_of(&records(w)?, name).is_none())
}

/// Egress of container `name` (IP `ip`) reaches ztunnel's 15001 with the original destination.
fn assert_egress_captured(pm: &Podman, name: &str, ip: &str, what: &str) -> Result<()> {
    let a = pm.answer(name, &remote())?;
    let want = format!("ztunnel port=15001 orig_dst={} peer={ip}:", remote());
    ensure!(a.contains(&want), "{what}: expected {want:?}, got {a:?}");
    Ok(())
}

/// Inbound from the remote host to `ip`:8080 reaches ztunnel's 15006.
fn assert_inbound_captured(w: &World, ip: &str, what: &str) -> Result<()> {
    let a = w.answer("remote", &format!("{ip}:8080"), None)?;
    let want = format!("ztunnel port=15006 orig_dst={ip}:8080 peer={REMOTE_IP}:");
    ensure!(a.contains(&want), "{what}: expected {want:?}, got {a:?}");
    Ok(())
}

fn assert_captured(w: &World, pm: &Podman, name: &str, ip: &str, what: &str) -> Result<()> {
    assert_egress_captured(pm, name, ip, what)?;
    assert_inbound_captured(w, ip, what)
}

/// Waits until container `name` at `ip` is captured both ways (its echo server and ztunnel's
/// listeners may still be starting).
fn wait_captured(w: &World, pm: &Podman, name: &str, ip: &str, what: &str) -> Result<Duration> {
    let mut last = None;
    let took = wait_until(SETTLE, || {
        match assert_captured(w, pm, name, ip, what) {
            Ok(()) => return Ok(true),
            Err(e) => last = Some(e),
        }
        Ok(false)
    });
    took.with_context(|| format!("{what}: never captured; last: {last:?}"))
}

/// Counts what connections from an enrolled pod (and to it) met while something else happens:
/// captured by ztunnel, answered directly (a bypass), or failed (held closed).
#[derive(Default, Debug, Clone, Copy)]
struct Sample {
    captured: u32,
    bypassed: u32,
    failed: u32,
}

/// Connects out of and into the pod's netns (the host's `acni-probe` through `nsenter`, so no
/// podman lock is held while podman restarts something) until `stop` is set.
fn sample_loop(
    w: &World,
    pod_netns: &Path,
    pod_ip: &str,
    stop: &AtomicBool,
) -> Result<(Sample, Sample)> {
    let probe = workspace_bin("acni-probe")?;
    let (mut out, mut inb) = (Sample::default(), Sample::default());
    while !stop.load(Ordering::SeqCst) {
        let o = run_cmd(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", pod_netns.display()))
                .arg(&probe)
                .args(["connect", &remote(), "--timeout-ms", "500"]),
            None,
            COMMAND_TIMEOUT,
        );
        if o.stdout.starts_with("ztunnel port=15001") {
            out.captured += 1;
        } else if o.stdout.contains("remote peer=") {
            out.bypassed += 1;
        } else {
            out.failed += 1;
        }
        let dst = format!("{pod_ip}:8080");
        let probe_s = probe.to_str().unwrap_or("acni-probe");
        let i = w
            .net
            .exec("remote", &[probe_s, "connect", &dst, "--timeout-ms", "500"]);
        if i.stdout.starts_with("ztunnel port=15006") {
            inb.captured += 1;
        } else if i.stdout.contains(" peer=") {
            inb.bypassed += 1;
        } else {
            inb.failed += 1;
        }
    }
    Ok((out, inb))
}

/// The plugin's log lines about container `id`, as verbs in order ("ADD", "DEL", or
/// "DEL (daemon down)" for a DEL that exited 0 without reaching the daemon).
fn plugin_verbs(w: &World, id: &str) -> Vec<String> {
    let log = std::fs::read_to_string(w.cni.plugin_log()).unwrap_or_default();
    let id = format!("container_id={id}");
    log.lines()
        .filter(|l| l.contains(&id))
        .filter_map(|l| {
            [
                ("ADD done", "ADD"),
                ("DEL done", "DEL"),
                ("DEL not confirmed", "DEL (daemon down)"),
            ]
            .into_iter()
            .find(|(m, _)| l.contains(m))
            .map(|(_, v)| v.to_string())
        })
        .collect()
}

fn container_id(pm: &Podman, name: &str) -> Result<String> {
    Ok(pm
        .ok(&["inspect", "--format", "{{.Id}}", name], None)?
        .trim()
        .to_string())
}

fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = f();
    println!("  {what}: {:?}", t.elapsed());
    r
}

fn scenario() -> Result<()> {
    let mut w = World::new("podman", &[])?;
    let conflist = w.cni.conf_dir().join(format!("{NETWORK}.conflist"));
    let probe = workspace_bin("acni-probe")?;
    let pm = Podman::new(
        &w.net,
        "node",
        &conflist,
        &w.cni.bin_dir().join("ambient-cni"),
        &probe,
    )?;
    println!(
        "podman {} in {} (config, storage, CNI dirs in {})",
        pm.ok(&["version", "--format", "{{.Client.Version}}"], None)?
            .trim(),
        w.net.full_name("node"),
        pm.dir().display()
    );
    let info = pm.ok(&["info", "--format", "json"], None)?;
    let info: Value = serde_json::from_str(&info).context("podman info")?;
    ensure!(
        info["host"]["networkBackend"] == "cni",
        "podman must use the CNI backend: {}",
        info["host"]["networkBackend"]
    );
    let networks = pm.ok(&["network", "ls", "--format", "{{.Name}}"], None)?;
    println!(
        "  networks podman sees: {:?}",
        networks.split_whitespace().collect::<Vec<_>>()
    );
    ensure!(
        networks.split_whitespace().any(|n| n == NETWORK),
        "podman does not see {NETWORK}: {networks}"
    );

    // Podman's default network (a bridge with portmap, firewall and tuning) is not ours and
    // cannot be used: a container without --network fails before any plugin runs.
    let links_before = w.net.exec_ok("node", &["ip", "-o", "link"])?;
    let out = pm.run(
        &[
            "run",
            "--rm",
            "--name",
            "no-network",
            ambient_cni_tests::podman::IMAGE,
            "true",
        ],
        None,
    );
    println!(
        "  a container on podman's default network: {}",
        out.stderr.trim()
    );
    ensure!(
        !out.success(),
        "a container ran on podman's default network: {out}"
    );
    ensure!(
        out.stderr.contains("failed to find plugin \"bridge\""),
        "expected the default network's bridge plugin to be missing: {out}"
    );
    let links_after = w.net.exec_ok("node", &["ip", "-o", "link"])?;
    ensure!(
        links_after.lines().count() == links_before.lines().count()
            && !links_after.contains("cni-podman"),
        "the default network left links in the node:\n{links_after}"
    );

    // --- ztunnel, an enrolled pod, a pod that is not enrolled.
    println!("== pods");
    let zt = timed("podman run ztunnel-a", || {
        pm.run_pod(
            NETWORK,
            "istio-system",
            "ztunnel-a",
            &["--cap-add", "NET_ADMIN"],
            &["/acni-probe", "tproxy"],
        )
    })?;
    let app = timed("podman run app", || {
        pm.run_pod(
            NETWORK,
            "default",
            "app",
            &[],
            &["/acni-probe", "echo", "8080", "app"],
        )
    })?;
    let other = timed("podman run other", || {
        pm.run_pod(
            NETWORK,
            "legacy",
            "other",
            &[],
            &["/acni-probe", "echo", "8080", "other"],
        )
    })?;
    println!(
        "  ztunnel-a {} ({}), app {}, other {}",
        zt.ip,
        zt.netns.display(),
        app.ip,
        other.ip
    );
    let recs = records(&w)?;
    for (name, ns, enrolled) in [
        ("ztunnel-a", "istio-system", false),
        ("app", "default", true),
        ("other", "legacy", false),
    ] {
        let r =
            record_of(&recs, name).with_context(|| format!("no record of {name}: {recs:#?}"))?;
        ensure!(
            r["namespace"] == ns && r["uid"] == format!("uid-{name}"),
            "{r}"
        );
        ensure!(
            r["enrolled"] == enrolled,
            "{name} enrolled must be {enrolled}: {r}"
        );
    }
    ensure!(
        record_of(&recs, "ztunnel-a").is_some_and(|r| r["ztunnel"] == true),
        "ztunnel-a is not the node's ztunnel"
    );
    let took = wait_captured(&w, &pm, "app", &app.ip, "enrolled app")?;
    println!("  app captured {took:?} after its run");
    // A pod that is not enrolled goes direct, both ways.
    let a = pm.answer("other", &remote())?;
    ensure!(
        a.contains(&format!("remote peer={}:", other.ip)),
        "other egress: {a}"
    );
    let a = w.answer("remote", &format!("{}:8080", other.ip), None)?;
    ensure!(
        a.contains(&format!("other peer={REMOTE_IP}:")),
        "other inbound: {a}"
    );
    ensure!(has_entries(&w, "app", &app.ip)?, "app has no entries");
    ensure!(
        !ipset_members(&w)?.iter().any(|(i, _)| *i == other.ip),
        "the pod that is not enrolled is in the set"
    );
    println!("  egress app -> remote: {}", pm.answer("app", &remote())?);
    println!(
        "  remote -> app:8080: {}",
        w.answer("remote", &format!("{}:8080", app.ip), None)?
    );
    println!("  other -> remote: {}", pm.answer("other", &remote())?);
    let app_id = container_id(&pm, "app")?;
    println!(
        "  podman's libcni cache for {NETWORK}: {} file(s)",
        Podman::cached_results(NETWORK).len()
    );

    // --- stop / start: DEL (from conmon's `podman container cleanup`), then ADD in a new netns.
    println!("== podman stop / start app");
    timed("podman stop app", || {
        pm.ok(&["stop", "--time", "0", "app"], None)
    })?;
    let took = wait_until(SETTLE, || has_no_entries(&w, "app", &app.ip))
        .context("app's entries stayed after podman stop")?;
    println!("  entries of {} gone {took:?} after the stop", app.ip);
    let args = Podman::cni_args("default", "app");
    timed("podman start app", || pm.ok(&["start", "app"], Some(&args)))?;
    let app2 = pm.net_info("app", NETWORK)?;
    println!("  app is back as {} in {}", app2.ip, app2.netns.display());
    ensure!(app2.netns != app.netns, "podman start reused the netns");
    wait_captured(&w, &pm, "app", &app2.ip, "app after start")?;
    ensure!(
        has_entries(&w, "app", &app2.ip)?,
        "app has no entries after start"
    );
    if app2.ip != app.ip {
        ensure!(
            !ipset_members(&w)?.iter().any(|(i, _)| *i == app.ip),
            "the old IP stayed in the set"
        );
    }

    // --- restart: DEL and ADD again.
    println!("== podman restart app");
    timed("podman restart app", || {
        pm.ok(&["restart", "--time", "0", "app"], Some(&args))
    })?;
    let app3 = pm.net_info("app", NETWORK)?;
    println!("  app is back as {} in {}", app3.ip, app3.netns.display());
    wait_captured(&w, &pm, "app", &app3.ip, "app after restart")?;
    let recs = records(&w)?;
    let r = record_of(&recs, "app").context("no record of app after restart")?;
    ensure!(
        r["netns"] == app3.netns.to_string_lossy().as_ref() && r["container_id"] == app_id,
        "the record of app is not the restarted container: {r}"
    );
    if app3.ip != app2.ip {
        ensure!(
            !ipset_members(&w)?.iter().any(|(i, _)| *i == app2.ip),
            "the IP before the restart stayed in the set"
        );
    }
    let verbs = plugin_verbs(&w, &app_id);
    println!("  the plugin saw for app's container: {verbs:?}");
    ensure!(
        verbs == ["ADD", "DEL", "ADD", "DEL", "ADD"],
        "run, stop, start, restart must be ADD, DEL, ADD, DEL + ADD: {verbs:?}"
    );
    let app = app3;

    // --- rm removes the entries of an enrolled pod.
    println!("== podman rm");
    let tmp = pm.run_pod(
        NETWORK,
        "default",
        "app-rm",
        &[],
        &["/acni-probe", "echo", "8080", "app-rm"],
    )?;
    wait_captured(&w, &pm, "app-rm", &tmp.ip, "app-rm")?;
    ensure!(has_entries(&w, "app-rm", &tmp.ip)?, "app-rm has no entries");
    let tmp_id = container_id(&pm, "app-rm")?;
    timed("podman rm -f app-rm", || {
        pm.ok(&["rm", "--force", "--time", "0", "app-rm"], None)
    })?;
    let took = wait_until(SETTLE, || has_no_entries(&w, "app-rm", &tmp.ip))
        .context("app-rm's entries stayed after podman rm")?;
    println!("  entries of {} gone {took:?} after podman rm", tmp.ip);
    ensure!(
        !Podman::cached_results(NETWORK)
            .iter()
            .any(|f| f.contains(&tmp_id)),
        "podman's CNI cache still holds app-rm"
    );
    timed("podman rm -f other", || {
        pm.ok(&["rm", "--force", "--time", "0", "other"], None)
    })?;
    wait_until(SETTLE, || Ok(record_of(&records(&w)?, "other").is_none()))
        .context("the record of other stayed after podman rm")?;

    // --- restart of the ztunnel container: capture re-points, no connection bypasses it.
    println!("== podman restart ztunnel-a (app's traffic sampled meanwhile)");
    let stop = Arc::new(AtomicBool::new(false));
    let (out_s, in_s, zt2) = std::thread::scope(|s| -> Result<(Sample, Sample, NetInfo)> {
        let sampler = {
            let stop = stop.clone();
            let (w, netns, ip) = (&w, app.netns.clone(), app.ip.clone());
            s.spawn(move || sample_loop(w, &netns, &ip, &stop))
        };
        let zargs = Podman::cni_args("istio-system", "ztunnel-a");
        let r = (|| -> Result<NetInfo> {
            std::thread::sleep(Duration::from_millis(500));
            timed("podman restart ztunnel-a", || {
                pm.ok(&["restart", "--time", "0", "ztunnel-a"], Some(&zargs))
            })?;
            let zt2 = pm.net_info("ztunnel-a", NETWORK)?;
            let took = wait_captured(&w, &pm, "app", &app.ip, "app after ztunnel restart")?;
            println!("  app captured by the new ztunnel {took:?} after the restart");
            std::thread::sleep(Duration::from_millis(500));
            Ok(zt2)
        })();
        stop.store(true, Ordering::SeqCst);
        let (o, i) = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("the sampler panicked"))??;
        Ok((o, i, r?))
    })?;
    println!("  egress during the restart:  {out_s:?}");
    println!("  inbound during the restart: {in_s:?}");
    ensure!(
        out_s.bypassed == 0 && in_s.bypassed == 0,
        "connections bypassed ztunnel during its restart: out {out_s:?}, in {in_s:?}"
    );
    ensure!(
        out_s.captured > 0 && in_s.captured > 0,
        "nothing was captured while sampling"
    );
    println!("  new ztunnel-a {} in {}", zt2.ip, zt2.netns.display());
    ensure!(zt2.netns != zt.netns, "the ztunnel kept its netns");
    let dump = w.daemon()?.dump_json()?;
    ensure!(
        dump["ztunnel"]["ip"] == zt2.ip.as_str(),
        "the daemon's ztunnel is not the restarted one: {}",
        dump["ztunnel"]
    );
    let recs = records(&w)?;
    let zr = record_of(&recs, "ztunnel-a").context("no ztunnel record")?;
    ensure!(zr["netns"] == zt2.netns.to_string_lossy().as_ref(), "{zr}");

    // --- kill -9 of the daemon with pods running: still captured; the restarted daemon
    // reconciles (a pod removed while it was down is swept).
    println!("== kill -9 of the daemon");
    let gone = pm.run_pod(
        NETWORK,
        "default",
        "app-gone",
        &[],
        &["/acni-probe", "echo", "8080", "app-gone"],
    )?;
    wait_captured(&w, &pm, "app-gone", &gone.ip, "app-gone")?;
    if let Some(d) = w.daemon.as_mut() {
        d.kill();
    }
    w.daemon = None;
    assert_captured(&w, &pm, "app", &app.ip, "app with the daemon killed")?;
    let rm = timed("podman rm -f app-gone (daemon down)", || {
        Ok(pm.run(&["rm", "--force", "--time", "0", "app-gone"], None))
    })?;
    ensure!(rm.success(), "podman rm with the daemon down: {rm}");
    ensure!(
        has_entries(&w, "app-gone", &gone.ip).unwrap_or(false),
        "app-gone's entries went without a daemon?"
    );
    let t = Instant::now();
    w.start_daemon()?;
    println!("  daemon ready {:?} after the restart", t.elapsed());
    let took = wait_until(SETTLE, || has_no_entries(&w, "app-gone", &gone.ip))
        .context("the restarted daemon kept the pod removed while it was down")?;
    println!("  app-gone swept {took:?} after ready");
    assert_captured(&w, &pm, "app", &app.ip, "app after the daemon restart")?;
    ensure!(has_entries(&w, "app", &app.ip)?, "app lost its entries");
    wait_until(SETTLE, || {
        Ok(w.daemon()?.dump_json()?["pending"] == serde_json::json!([]))
    })
    .context("the restarted daemon left pending changes")?;
    let a = pm.answer("app", &remote())?;
    println!("  app -> remote after reconcile: {a}");

    // --- cleanup: none of our objects in the node (nor in the ztunnel's netns).
    println!("== ambient-cnid cleanup");
    if let Some(mut d) = w.daemon.take() {
        d.stop();
    }
    let state = w.daemon_dir.join("state");
    let bin = workspace_bin("ambient-cnid")?;
    let out = run_cmd(
        w.net
            .command("node", &[])
            .arg(&bin)
            .arg("cleanup")
            .arg("--state-dir")
            .arg(&state),
        None,
        COMMAND_TIMEOUT,
    );
    ensure!(out.success(), "cleanup: {out}");
    let t = Instant::now();
    pm.ok(&["rm", "--all", "--force", "--time", "0"], None)?;
    println!("  podman rm --all (daemon down): {:?}", t.elapsed());
    let node = w.node_state("node")?;
    for ours in ["ztunnel", "istioin", "istioout", "proto 212", "lookup 10"] {
        ensure!(!node.contains(ours), "{ours:?} left in the node:\n{node}");
    }
    let rules = w.net.exec_ok("node", &["ip", "rule"])?;
    ensure!(
        rules.lines().count() == 3,
        "rules left in the node:\n{rules}"
    );
    let links = w.net.exec_ok("node", &["ip", "-o", "link"])?;
    ensure!(!links.contains("veth"), "podman left host veths:\n{links}");
    ensure!(
        Podman::cached_results(NETWORK).is_empty(),
        "podman's CNI cache still holds {NETWORK} results"
    );
    drop(pm);
    Ok(())
}

#[test]
fn podman_drives_the_plugin_and_the_root_netns_is_untouched() {
    if !require_root() {
        return;
    }
    let t = Instant::now();
    let before = match RootNetns::read() {
        Ok(b) => b,
        Err(e) => panic!("reading the root netns: {e:#}"),
    };
    let result = scenario();
    let after = RootNetns::read();
    let verdict = after.map(|a| RootNetns::diff(&before, &a));
    println!(
        "== the machine's root network namespace, before and after ({})",
        RootNetns::which()
    );
    match &verdict {
        Ok(d) if d.is_empty() => println!(
            "  {} lines compared ({}): diff empty",
            before.lines(),
            before.parts.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
        Ok(d) => {
            println!("  {} lines compared, {} differ:", before.lines(), d.len());
            for l in d {
                println!("  {l}");
            }
        }
        Err(e) => println!("  cannot read it after: {e:#}"),
    }
    println!("whole test: {:?}", t.elapsed());
    if let Err(e) = result {
        panic!("{e:#}");
    }
    match verdict {
        Ok(d) => assert!(d.is_empty(), "the root netns changed: {d:#?}"),
        Err(e) => panic!("{e:#}"),
    }
}
