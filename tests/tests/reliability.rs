//! Reliability and security of the daemon and the plugin under faults (issue 5), as root, in
//! namespaces only: `kill -9` and SIGTERM of the daemon at several moments, drift repair, CNI GC
//! and the netns sweep, IP reuse with late DEL/ADD, parallel ADD/DEL with overlapping IPs, every
//! daemon fault the plugin can meet, the socket's privilege boundary, and hostile names.
//!
//! Every test prints its figures (`--nocapture` shows them). Run one with
//! `cargo test --release -p ambient-cni-tests --test reliability <name> -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambient_cni_tests::fault::*;
use ambient_cni_tests::world::{Pod, World, AMBIENT_NS, NETWORK, POD_CIDR, POD_GW, REMOTE_IP};
use ambient_cni_tests::{require_root, workspace_bin, Daemon, Output};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// ip → owner (pod UID) of the enrolled pods.
type Enrolled = BTreeMap<String, String>;

fn uid(name: &str) -> String {
    format!("uid-{name}")
}

/// The registry's enrolled IPs with their owner (newest claim wins, as the daemon decides).
fn registry_owners(d: &Daemon) -> Result<Enrolled> {
    let mut best: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for r in registry(d)? {
        if r["enrolled"] != json!(true) || r["ztunnel"] == json!(true) {
            continue;
        }
        let owner = match r["uid"].as_str() {
            Some(u) if !u.is_empty() => u.to_string(),
            _ => r["container_id"].as_str().unwrap_or_default().to_string(),
        };
        let seq = r["seq"].as_u64().unwrap_or(0);
        for ip in r["ips"].as_array().into_iter().flatten() {
            let ip = ip.as_str().unwrap_or_default().to_string();
            if best.get(&ip).is_none_or(|(s, _)| *s < seq) {
                best.insert(ip, (seq, owner.clone()));
            }
        }
    }
    Ok(best.into_iter().map(|(ip, (_, o))| (ip, o)).collect())
}

/// Kernel (ipset members and owners, table-100 routes) and registry agree with `want` exactly.
fn assert_enrolled(w: &World, d: &Daemon, want: &Enrolled, ctx: &str) -> Result<()> {
    let set = ipset_members(&w.net, "node")?;
    let routes = pod_routes(&w.net, "node")?;
    let reg = registry_owners(d)?;
    let want_ips: BTreeSet<String> = want.keys().cloned().collect();
    ensure!(
        &set == want,
        "{ctx}: ipset {set:?}, want {want:?}\n{}",
        d.log_text()
    );
    ensure!(
        routes == want_ips,
        "{ctx}: table-100 routes {routes:?}, want {want_ips:?}"
    );
    ensure!(&reg == want, "{ctx}: registry {reg:?}, want {want:?}");
    Ok(())
}

/// Egress and ingress of `pod` both reach the ztunnel stand-in.
fn assert_captured(w: &World, pod: &Pod) -> Result<()> {
    let out = w.answer(&pod.netns, &format!("{REMOTE_IP}:8080"), None)?;
    ensure!(
        out.contains("ztunnel port=15001"),
        "egress of {} not captured: {out}",
        pod.name
    );
    let inb = w.answer("remote", &format!("{}:8080", pod.ip), None)?;
    ensure!(
        inb.contains("ztunnel port=15006"),
        "ingress of {} not captured: {inb}",
        pod.name
    );
    Ok(())
}

fn flows(pod: &Pod) -> Vec<(&str, String)> {
    vec![
        (pod.netns.as_str(), format!("{REMOTE_IP}:8080")),
        ("remote", format!("{}:8080", pod.ip)),
    ]
}

/// Runs `body` while a thread keeps making real TCP connections along `flows`.
fn with_traffic<T>(
    w: &World,
    flows: &[(&str, String)],
    body: impl FnOnce() -> Result<T>,
) -> (TrafficTally, Result<T>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| probe_until(w, flows, &stop));
        let r = body();
        stop.store(true, Ordering::SeqCst);
        let t = h.join().unwrap_or_else(|_| TrafficTally {
            failed: u32::MAX,
            ..Default::default()
        });
        (t, r)
    })
}

/// The IP of a libcni ADD result.
fn result_ip(out: &Output) -> Result<String> {
    let r = out.json()?;
    Ok(r["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("no IP in the ADD result")?
        .to_string())
}

/// (1) `kill -9` of the daemon at five different moments and a SIGTERM: while it is down and
/// while it restarts, an enrolled pod's TCP keeps going through ztunnel in both directions (a
/// thread connects all the time: no connection bypasses, none fails) and the kernel state stays
/// as it was; after each restart the registry is reloaded and equals the kernel; a pod deleted
/// while the daemon was down (netns removed) is swept; an ADD while it is down fails with code 11
/// and DEL exits 0.
#[test]
fn kill_9_at_any_moment_never_uncaptures_and_restart_reloads_state() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let seed = seed("ACNI_SEED");
    let mut rng = Rng::new(seed);
    println!("restart: seed {seed} (ACNI_SEED to replay)");
    let mut w = World::new("restart", &[])?;
    w.ztunnel("zt", "a")?;
    let app = w.pod("app", AMBIENT_NS, "app")?;
    let gone = w.pod("gone", AMBIENT_NS, "gone")?;
    let mut daemon = w.daemon.take().context("daemon")?;
    let plugin = DirectPlugin::new(daemon.socket(), &w.cni.plugin_log(), NETWORK);
    let flows = flows(&app);
    let mut want: Enrolled = [(app.ip.clone(), uid("app")), (gone.ip.clone(), uid("gone"))].into();
    assert_enrolled(&w, &daemon, &want, "before any kill")?;
    let mut total = TrafficTally::default();

    for moment in [
        "idle",
        "during an ADD",
        "during a DEL",
        "during start-up",
        "during resyncs",
    ] {
        let before = kernel_snapshot(&w, "node")?;
        let t0 = Instant::now();
        let (tally, res) = with_traffic(&w, &flows, || -> Result<(Daemon, Duration)> {
            match moment {
                "idle" => {
                    daemon.kill();
                    std::thread::sleep(Duration::from_millis(800));
                    let during = kernel_snapshot(&w, "node")?;
                    ensure!(
                        during == before,
                        "kernel changed after kill -9:\n{}",
                        diff(&before, &during)
                    );
                    // A pod ADDed while the daemon is down fails closed with "try again later".
                    w.net.add_ns("late")?;
                    let late_ns = w.net.ns_path("late");
                    let prev = prev_result("vhlate", &late_ns, "10.244.1.240");
                    let out = plugin.add(
                        "cid-late",
                        &late_ns,
                        &k8s_args(AMBIENT_NS, "late", &uid("late")),
                        &prev,
                    );
                    ensure!(out.cni_code() == Some(11), "ADD while down: {out}");
                    let out = w.cnitool("add", "late", AMBIENT_NS, "late");
                    ensure!(
                        out.status == Some(1) && out.stderr.contains("unreachable"),
                        "libcni ADD while down: {out}"
                    );
                    // ... and DEL succeeds (directly and through libcni, which also undoes ptp).
                    let out = plugin.del(
                        "cid-late",
                        &late_ns,
                        &k8s_args(AMBIENT_NS, "late", &uid("late")),
                        Some(&prev),
                    );
                    ensure!(
                        out.success() && out.stdout.is_empty(),
                        "DEL while down: {out}"
                    );
                    let out = w.cnitool("del", "late", AMBIENT_NS, "late");
                    ensure!(out.success(), "libcni DEL while down: {out}");
                    w.net.del_ns("late")?;
                    // A pod goes away while the daemon is down: its DEL cannot reach the daemon,
                    // the runtime removes its netns.
                    let out = w.del(&gone);
                    ensure!(out.success(), "DEL of gone while down: {out}");
                    w.net.del_ns(&gone.netns)?;
                    want.remove(&gone.ip);
                }
                "during an ADD" => {
                    w.net.add_ns("mid")?;
                    let delay = Duration::from_micros(rng.below(30_000));
                    let out = std::thread::scope(|s| {
                        let h = s.spawn(|| w.cnitool("add", "mid", AMBIENT_NS, "mid"));
                        std::thread::sleep(delay);
                        daemon.kill();
                        h.join().map_err(|_| anyhow::anyhow!("ADD thread panicked"))
                    })?;
                    println!(
                        "restart: kill -9 {delay:?} into an ADD: ADD {}",
                        if out.success() {
                            "done"
                        } else {
                            "failed (retried after restart)"
                        }
                    );
                    if out.success() {
                        want.insert(result_ip(&out)?, uid("mid"));
                    } else {
                        ensure!(
                            out.stderr.contains("ambient-cnid"),
                            "ADD failed for another reason: {out}"
                        );
                        // The runtime tears the failed sandbox down (DEL succeeds with the daemon
                        // down) and retries once the daemon is back (below).
                        let del = w.cnitool("del", "mid", AMBIENT_NS, "mid");
                        ensure!(del.success(), "DEL after a failed ADD: {del}");
                    }
                }
                "during a DEL" => {
                    let delay = Duration::from_micros(rng.below(30_000));
                    let out = std::thread::scope(|s| {
                        let h = s.spawn(|| w.cnitool("del", "mid", AMBIENT_NS, "mid"));
                        std::thread::sleep(delay);
                        daemon.kill();
                        h.join().map_err(|_| anyhow::anyhow!("DEL thread panicked"))
                    })?;
                    println!("restart: kill -9 {delay:?} into a DEL");
                    ensure!(
                        out.success(),
                        "DEL interrupted by kill -9 must still exit 0: {out}"
                    );
                    // The runtime removes the netns; the sweep cleans up whatever the DEL did not.
                    w.net.del_ns("mid")?;
                    want.retain(|_, u| u != &uid("mid"));
                }
                "during start-up" => {
                    daemon.kill();
                    for _ in 0..3 {
                        let pid = spawn_daemon_raw(&w)?;
                        let delay = Duration::from_millis(rng.below(150));
                        std::thread::sleep(delay);
                        kill9(pid);
                        w.net.kill(pid);
                        println!("restart: kill -9 {delay:?} into start-up");
                    }
                    let during = kernel_snapshot(&w, "node")?;
                    ensure!(
                        during == before,
                        "kernel changed by killed start-ups:\n{}",
                        diff(&before, &during)
                    );
                }
                _ => {
                    daemon.kill();
                    for _ in 0..3 {
                        let (d, _) = restart_daemon(&w)?;
                        daemon = d;
                        let delay = Duration::from_millis(rng.below(1200));
                        std::thread::sleep(delay);
                        daemon.kill();
                        println!("restart: kill -9 {delay:?} after ready (resync every 500 ms)");
                    }
                    let during = kernel_snapshot(&w, "node")?;
                    ensure!(
                        during == before,
                        "kernel changed across kills:\n{}",
                        diff(&before, &during)
                    );
                }
            }
            restart_daemon(&w)
        });
        let (d, ready) = res.with_context(|| format!("round {moment}"))?;
        daemon = d;
        println!("restart: kill -9 {moment}: back and ready {ready:?} after start, round {:?}; traffic during it: {tally}", t0.elapsed());
        ensure!(
            tally.bypassed == 0 && tally.failed == 0,
            "{moment}: traffic {tally}\n{}",
            daemon.log_text()
        );
        total.add(tally);
        if moment == "during an ADD" && !want.values().any(|u| u == &uid("mid")) {
            let out = w.cnitool("add", "mid", AMBIENT_NS, "mid");
            ensure!(out.success(), "ADD retry after restart: {out}");
            want.insert(result_ip(&out)?, uid("mid"));
        }
        assert_enrolled(&w, &daemon, &want, &format!("after restart ({moment})"))?;
        assert_captured(&w, &app)?;
        if moment == "idle" {
            let swept = trace(&daemon)?;
            ensure!(
                swept
                    .iter()
                    .any(|e| e.kind == "sweep" && e.message.contains(&uid("gone"))),
                "no sweep of the pod deleted while down: {swept:?}"
            );
            let pods = daemon.status_json()?["pods"].as_u64();
            ensure!(
                pods == Some(2),
                "registry after the sweep: {pods:?} (want zt + app)"
            );
        }
    }

    // Graceful stop: the kernel keeps everything, the socket goes, ADD says "try again".
    let before = kernel_snapshot(&w, "node")?;
    let (tally, res) = with_traffic(&w, &flows, || {
        daemon.stop();
        ensure!(!daemon.socket().exists(), "SIGTERM leaves the socket file");
        let after = kernel_snapshot(&w, "node")?;
        ensure!(
            after == before,
            "SIGTERM changed the kernel:\n{}",
            diff(&before, &after)
        );
        let out = plugin.add(
            "cid-x",
            &w.net.ns_path("app"),
            &k8s_args(AMBIENT_NS, "x", "uid-x"),
            &prev_result("vhx", &w.net.ns_path("app"), "10.244.1.241"),
        );
        ensure!(
            out.cni_code() == Some(11) && out.stdout.contains("No such file"),
            "ADD after SIGTERM: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
        restart_daemon(&w)
    });
    let (d, _) = res?;
    daemon = d;
    println!("restart: SIGTERM and restart: traffic during it: {tally}");
    ensure!(
        tally.bypassed == 0 && tally.failed == 0,
        "SIGTERM: traffic {tally}"
    );
    total.add(tally);
    assert_enrolled(&w, &daemon, &want, "after SIGTERM and restart")?;
    println!("restart: all rounds: {total} connections across 6 daemon outages");
    w.daemon = Some(daemon);
    Ok(())
}

/// Objects of other owners in the node netns: (what, command).
fn foreign_objects(ipt: &str) -> Vec<(&'static str, String)> {
    vec![
        ("a route with protocol static in table 100", "ip route add blackhole 203.0.113.0/24 table 100 proto static".into()),
        ("a route with protocol boot in table 101", "ip route add blackhole 203.0.113.0/24 table 101 proto boot".into()),
        ("another ipset", "ipset create foreign-set hash:ip && ipset add foreign-set 10.244.1.77".into()),
        (
            "another mangle chain, jumped to before ours, setting a mark bit we do not own",
            format!(
                "{ipt} -t mangle -N FOREIGN && {ipt} -t mangle -A FOREIGN -j MARK --set-xmark 0x10000/0x10000 \
                 && {ipt} -t mangle -I PREROUTING 1 -j FOREIGN"
            ),
        ),
        ("a rule at priority 104", "ip rule add priority 104 fwmark 0x100/0x100 lookup 200".into()),
        ("a rule at our priority 101 with another mark", "ip rule add priority 101 fwmark 0x800/0x800 lookup 200".into()),
    ]
}

/// The foreign objects as the stock tools show them.
fn foreign_lines(w: &World, ipt: &str) -> Result<BTreeSet<String>> {
    let keep = |l: &str| {
        l.contains("203.0.113.0/24")
            || l.contains("foreign-set")
            || l.contains("FOREIGN")
            || l.starts_with("104:")
            || l.contains("0x800/0x800")
    };
    let text = w.net.exec_ok(
        "node",
        &[
            "sh",
            "-c",
            &format!(
                "ip route show table 100 proto static; ip route show table 101 proto boot; \
                 ipset save foreign-set; {ipt}-save -t mangle; ip rule show"
            ),
        ],
    )?;
    Ok(text
        .lines()
        .filter(|l| keep(l))
        .map(str::to_string)
        .collect())
}

/// One drift: what an outside agent runs in the node netns, and what the repair must say.
struct Drift {
    name: &'static str,
    cmd: String,
    repair_says: String,
}

fn drifts(ipt: &str, app: &Pod) -> Vec<Drift> {
    vec![
        Drift {
            name: "ipset flush ztunnel-pods-ips",
            cmd: "ipset flush ztunnel-pods-ips".into(),
            repair_says: format!("ipset add {} (owner {})", app.ip, uid(&app.name)),
        },
        Drift {
            name: "iptables -t mangle -F ztunnel-PREROUTING",
            cmd: format!("{ipt} -t mangle -F ztunnel-PREROUTING"),
            repair_says: "mangle/ztunnel-PREROUTING".into(),
        },
        Drift {
            name: "ip rule del priority 101 (ours)",
            cmd: "ip rule del priority 101 fwmark 0x100/0x100 lookup 101".into(),
            repair_says: "rule add 101: from all fwmark 0x100/0x100 lookup 101".into(),
        },
        Drift {
            name: "ip route del <pod ip> table 100",
            cmd: format!("ip route del {}/32 table 100 proto 212", app.ip),
            repair_says: format!("route replace {}/32", app.ip),
        },
        Drift {
            name: "ip link del istioin",
            cmd: "ip link del istioin".into(),
            repair_says: "create tunnel istioin".into(),
        },
    ]
}

/// The kernel of `ns` once it stopped changing (two equal snapshots `gap` apart).
fn settled_snapshot(w: &World, gap: Duration) -> Result<String> {
    let mut last = kernel_snapshot(w, "node")?;
    for _ in 0..20 {
        std::thread::sleep(gap);
        let now = kernel_snapshot(w, "node")?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    bail!("the node's kernel state never settled")
}

/// Applies each drift, waits for the kernel to be exactly as before, and checks the trace, the
/// traffic and the foreign objects. Returns the repair latencies.
fn repair_each_drift(
    w: &World,
    app: &Pod,
    ipt: &str,
    label: &str,
) -> Result<Vec<(&'static str, Duration)>> {
    let d = w.daemon()?;
    let foreign = foreign_lines(w, ipt)?;
    let baseline = settled_snapshot(w, Duration::from_millis(1200))?;
    let mut out = Vec::new();
    for drift in drifts(ipt, app) {
        let t0 = now_ms();
        w.net.exec_ok("node", &["sh", "-c", &drift.cmd])?;
        let took = wait_for(Duration::from_secs(8), Duration::from_millis(20), || {
            Ok(kernel_snapshot(w, "node")? == baseline)
        })
        .with_context(|| {
            let now = kernel_snapshot(w, "node").unwrap_or_default();
            format!(
                "{label}: `{}` not repaired:\n{}\n{}",
                drift.name,
                diff(&baseline, &now),
                d.log_text()
            )
        })?;
        let repairs: Vec<TraceEvent> = trace(d)?
            .into_iter()
            // `repair` from the periodic resync, `event` from the repair on rtnetlink events
            // (which usually comes first for links, rules and routes).
            .filter(|e| (e.kind == "repair" || e.kind == "event") && e.unix_ms + 5 >= t0)
            .collect();
        ensure!(
            repairs
                .iter()
                .any(|e| e.message.contains(&drift.repair_says)),
            "{label}: `{}`: no repair saying {:?} in the trace: {repairs:?}",
            drift.name,
            drift.repair_says
        );
        assert_captured(w, app)
            .with_context(|| format!("{label}: after repairing `{}`", drift.name))?;
        let now = foreign_lines(w, ipt)?;
        ensure!(
            now == foreign,
            "{label}: `{}`: objects of other owners changed: before {foreign:?}, now {now:?}",
            drift.name
        );
        println!(
            "drift ({label}): `{}` repaired in {} ms ({})",
            drift.name,
            took.as_millis(),
            repairs
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
        ensure!(
            took < Duration::from_secs(5),
            "{label}: `{}` took {took:?} (limit 5 s)",
            drift.name
        );
        out.push((drift.name, took));
    }
    Ok(out)
}

/// (2) Drift: with the real kernel, an outside agent flushes the ipset, flushes our mangle chain,
/// deletes rule 101, deletes a pod's table-100 route, deletes istioin: each is repaired within
/// 5 s (resync every 500 ms, then with the default 2 s), shows up as a `repair` or `event` in the trace,
/// and the pod is captured again. Objects of other owners (routes with other protocols in tables
/// 100/101, another ipset, another mangle chain jumped to before ours setting another mark bit,
/// rules at priority 104 and at our priority 101 with another mark) survive every resync.
#[test]
fn drift_is_repaired_within_5s_and_foreign_objects_are_never_touched() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut w = World::new("drift", &[])?;
    w.ztunnel("zt", "a")?;
    let app = w.pod("app", AMBIENT_NS, "app")?;
    let ipt = iptables_variant(&w.net, "node")?;
    let log = w.daemon()?.log_text();
    let said = log
        .lines()
        .find(|l| l.contains("iptables backend"))
        .unwrap_or("(not logged)");
    println!("drift: our chains are in {ipt}; the daemon logged: {said}");
    ensure!(
        said.contains(ipt.trim_start_matches("iptables-")),
        "daemon backend and our reading differ: {said}"
    );
    for (what, cmd) in foreign_objects(ipt) {
        w.net
            .exec_ok("node", &["sh", "-c", &cmd])
            .with_context(|| what.to_string())?;
    }
    let foreign = foreign_lines(&w, ipt)?;
    ensure!(
        foreign.len() >= 7,
        "foreign objects not all visible: {foreign:?}"
    );
    assert_captured(&w, &app)?;

    let fast = repair_each_drift(&w, &app, ipt, "resync 500 ms")?;
    // The default resync period (2 s): the same daemon state, restarted without the override.
    w.restart_daemon_setting(&[("--resync-interval-ms", None)])?;
    let default = repair_each_drift(&w, &app, ipt, "default resync")?;
    let worst = |v: &[(&str, Duration)]| v.iter().map(|(_, d)| *d).max().unwrap_or_default();
    println!(
        "drift: worst repair latency {} ms at 500 ms resync, {} ms at the default resync; limit 5000 ms",
        worst(&fast).as_millis(),
        worst(&default).as_millis()
    );
    let now = foreign_lines(&w, ipt)?;
    ensure!(
        now == foreign,
        "objects of other owners changed: {foreign:?} → {now:?}"
    );
    Ok(())
}

/// The container ID of the registry record of pod `name`.
fn cid_of(d: &Daemon, name: &str) -> Result<String> {
    registry(d)?
        .iter()
        .find(|r| r["name"] == json!(name))
        .and_then(|r| r["container_id"].as_str().map(str::to_string))
        .with_context(|| format!("no registry record of {name}"))
}

/// (3) Garbage collection: CNI GC (cniVersion 1.1.0, `cni.dev/valid-attachments`, the plugin run
/// directly since Debian's libcni stops at 1.0.0) removes exactly the unlisted attachments of
/// its network, kernel entries included; the periodic sweep removes a pod whose netns vanished
/// without a DEL; and 40 short-lived pods whose netns went leave nothing behind.
#[test]
fn cni_gc_and_the_netns_sweep_remove_exactly_the_stale_pods() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::new("gc", &[])?;
    w.ztunnel("zt", "a")?;
    let a = w.pod("a", AMBIENT_NS, "a")?;
    let b = w.pod("b", AMBIENT_NS, "b")?;
    let c = w.pod("c", AMBIENT_NS, "c")?;
    let d = w.daemon()?;
    let plugin = DirectPlugin::new(d.socket(), &w.cni.plugin_log(), NETWORK);
    let mut want: Enrolled = [&a, &b, &c]
        .iter()
        .map(|p| (p.ip.clone(), uid(&p.name)))
        .collect();
    assert_enrolled(&w, d, &want, "before GC")?;

    // GC of another network removes nothing.
    let other = DirectPlugin::new(d.socket(), &w.cni.plugin_log(), "another-net");
    let out = other.gc(&[]);
    ensure!(out.success(), "GC of another network: {out}");
    assert_enrolled(&w, d, &want, "after another network's GC")?;
    // GC listing the ztunnel and a: b and c go, from the registry and the kernel.
    let keep = vec![
        (cid_of(d, "ztunnel-a")?, "eth0".to_string()),
        (cid_of(d, "a")?, "eth0".to_string()),
    ];
    let t0 = now_ms();
    let out = plugin.gc(&keep);
    ensure!(out.success() && out.stdout.is_empty(), "GC: {out}");
    want.remove(&b.ip);
    want.remove(&c.ip);
    assert_enrolled(&w, d, &want, "after GC")?;
    let gc_events: Vec<TraceEvent> = trace(d)?
        .into_iter()
        .filter(|e| e.kind == "gc" && e.unix_ms + 5 >= t0)
        .collect();
    for (p, gone) in [(&a, false), (&b, true), (&c, true)] {
        let seen = gc_events.iter().any(|e| e.message.contains(&uid(&p.name)));
        ensure!(seen == gone, "gc trace for {}: {gc_events:?}", p.name);
    }
    ensure!(
        d.status_json()?["pods"] == json!(2),
        "registry after GC: zt + a"
    );
    assert_captured(&w, &a)?;
    println!(
        "gc: CNI GC kept zt + a, removed b and c ({} trace events)",
        gc_events.len()
    );

    // The sweep: a's netns vanishes without any DEL.
    w.net.del_ns(&a.netns)?;
    let took = wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
        Ok(ipset_members(&w.net, "node")?.is_empty() && pod_routes(&w.net, "node")?.is_empty())
    })
    .context("a's entries were not swept")?;
    want.clear();
    assert_enrolled(&w, d, &want, "after the sweep")?;
    ensure!(
        trace(d)?
            .iter()
            .any(|e| e.kind == "sweep" && e.message.contains(&uid("a"))),
        "no sweep event for a"
    );
    println!(
        "gc: pod whose netns vanished swept in {} ms (resync every 500 ms)",
        took.as_millis()
    );

    // Nothing grows: 40 pods come, their netns go without a DEL.
    w.net.exec_ok("node", &["sh", "-c", "ip link add vhgc type veth peer name vhgcp && ip link set vhgc up && ip link set vhgcp up"])?;
    for i in 0..40 {
        let name = format!("s{i}");
        w.net.add_ns(&name)?;
        let ns = w.net.ns_path(&name);
        let out = plugin.add(
            &format!("cid-{name}"),
            &ns,
            &k8s_args(AMBIENT_NS, &name, &uid(&name)),
            &prev_result("vhgc", &ns, &format!("10.244.1.{}", 100 + i)),
        );
        ensure!(out.success(), "ADD {name}: {out}");
    }
    ensure!(d.status_json()?["pods"] == json!(41), "zt + 40");
    ensure!(ipset_members(&w.net, "node")?.len() == 40);
    for i in 0..40 {
        w.net.del_ns(&format!("s{i}"))?;
    }
    let took = wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
        Ok(d.status_json()?["pods"] == json!(1) && ipset_members(&w.net, "node")?.is_empty())
    })
    .context("the 40 pods were not swept")?;
    assert_enrolled(&w, d, &want, "after sweeping 40")?;
    let journal = std::fs::metadata(w.daemon_dir.join("state").join("registry.journal"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "gc: 40 pods whose netns went swept {} ms after the last one went; registry back to 1 record (the ztunnel); journal {journal} bytes (compacted every 4096 changes)",
        took.as_millis()
    );
    Ok(())
}

/// (4) IP reuse with the real plugin, through libcni: a network whose host-local range holds one
/// address forces it. Pod X gets it; X goes away while the daemon is down (its DEL is lost, ptp
/// and host-local release the address, its netns is not removed yet); pod Y gets the same
/// address; then X's DEL arrives late: Y's ipset entry (comment = Y's UID), its table-100 route
/// and its capture stay. Then X's netns goes and a late ADD retry of X is refused (code 100),
/// and a late DEL without a netns exits 0, Y untouched throughout.
#[test]
fn a_late_del_or_add_of_a_pod_whose_ip_was_reused_leaves_the_new_owner_alone() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const ONLY: &str = "10.244.1.250";
    let mut w = World::new("reuse", &[])?;
    w.ztunnel("zt", "a")?;
    let socket = w.daemon()?.socket().to_path_buf();
    w.cni.write_conflist(&json!({
        "cniVersion": "1.0.0",
        "name": "reuse",
        "plugins": [
            {"type": "ptp", "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": w.cni.ipam_dir(),
                      "ranges": [[{"subnet": POD_CIDR, "rangeStart": ONLY, "rangeEnd": ONLY, "gateway": POD_GW}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            ambient_cni_tests::ambient_entry(&socket, &w.cni.plugin_log(), 5000),
        ]
    }))?;
    let cnitool = |verb: &str, ns: &str, name: &str| {
        let args = World::cni_args(AMBIENT_NS, name);
        w.cni.cnitool(
            verb,
            "reuse",
            &w.net.ns_path(ns),
            &[("CNI_ARGS", args.as_str())],
        )
    };

    w.net.add_ns("x")?;
    let out = cnitool("add", "x", "x");
    ensure!(out.success(), "ADD x: {out}");
    ensure!(result_ip(&out)? == ONLY, "{out}");
    let x_result = out.json()?;
    let x_cid = cid_of(w.daemon()?, "x")?;
    // The range is exhausted: the next pod can only get the address once X's is released.
    w.net.add_ns("y")?;
    let out = cnitool("add", "y", "y");
    ensure!(
        !out.success(),
        "a second address from a range of one: {out}"
    );
    ensure!(cnitool("del", "y", "y").success());

    // X is deleted while the daemon is down.
    w.daemon.take().context("daemon")?.kill();
    let out = cnitool("del", "x", "x");
    ensure!(out.success(), "DEL x while the daemon is down: {out}");
    let (d, _) = restart_daemon(&w)?;
    w.daemon = Some(d);
    let d = w.daemon()?;
    ensure!(
        registry(d)?.iter().any(|r| r["name"] == json!("x")),
        "X's record is kept while its netns exists"
    );

    // Y gets X's address.
    let out = cnitool("add", "y", "y");
    ensure!(out.success(), "ADD y: {out}");
    ensure!(result_ip(&out)? == ONLY, "y must reuse X's address: {out}");
    w.spawn("y", &["echo", "8080", "y"])?;
    let y = Pod {
        netns: "y".into(),
        k8s_ns: AMBIENT_NS.into(),
        name: "y".into(),
        ip: ONLY.into(),
        result: out.json()?,
    };
    let want: Enrolled = [(ONLY.to_string(), uid("y"))].into();
    assert_enrolled(
        &w,
        d,
        &want,
        "Y owns the reused address while X's record still claims it",
    )?;
    assert_captured(&w, &y)?;

    // X's DEL arrives late (the runtime retries the one the daemon missed).
    let out = cnitool("del", "x", "x");
    ensure!(out.success(), "late DEL of x: {out}");
    ensure!(
        !registry(d)?.iter().any(|r| r["name"] == json!("x")),
        "X's record is gone"
    );
    assert_enrolled(&w, d, &want, "after X's late DEL")?;
    assert_captured(&w, &y)?;
    println!(
        "reuse: {ONLY} went from X to Y; X's late DEL left Y's entry (owner {}) and route in place",
        uid("y")
    );

    // X's netns goes; a late ADD retry of X is refused, a late DEL without netns succeeds.
    w.net.del_ns("x")?;
    let plugin = DirectPlugin::new(&socket, &w.cni.plugin_log(), "reuse");
    let x_ns = w.net.ns_path("x");
    let x_args = World::cni_args(AMBIENT_NS, "x");
    let out = plugin.add(&x_cid, &x_ns, &x_args, &x_result);
    ensure!(out.cni_code() == Some(100), "late ADD retry of X: {out}");
    ensure!(out.stdout.contains("does not exist"), "{out}");
    assert_enrolled(&w, d, &want, "after X's late ADD")?;
    let out = plugin.del(&x_cid, &x_ns, &x_args, Some(&x_result));
    ensure!(
        out.success() && out.stdout.is_empty(),
        "late DEL of X without its netns: {out}"
    );
    let out = plugin.del(&x_cid, Path::new(""), &x_args, None);
    ensure!(out.success(), "late DEL of X with CNI_NETNS empty: {out}");
    assert_enrolled(&w, d, &want, "after X's late DELs")?;
    assert_captured(&w, &y)?;
    println!(
        "reuse: X's late ADD retry refused with code 100 ({}), Y untouched",
        out_msg(&plugin.add(&x_cid, &x_ns, &x_args, &x_result))
    );
    Ok(())
}

fn out_msg(o: &Output) -> String {
    o.json()
        .ok()
        .and_then(|j| j["details"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// One pod of the parallel test.
#[derive(Clone)]
struct Synthetic {
    cid: String,
    uid: String,
    ip: String,
}

/// Runs ADD (and DEL when `del`) of each pod, every pod on its own thread, all at once.
fn in_parallel(
    plugin: &DirectPlugin,
    ns: &Path,
    jobs: &[(Synthetic, bool, bool)],
) -> Vec<(String, Output)> {
    let barrier = std::sync::Barrier::new(jobs.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(p, add, del)| {
                let barrier = &barrier;
                s.spawn(move || {
                    let args = k8s_args(AMBIENT_NS, &p.cid, &p.uid);
                    let prev = prev_result("vhshared", ns, &p.ip);
                    barrier.wait();
                    let mut outs = Vec::new();
                    if *add {
                        outs.push((
                            format!("ADD {}", p.cid),
                            plugin.add(&p.cid, ns, &args, &prev),
                        ));
                    }
                    if *del {
                        outs.push((
                            format!("DEL {}", p.cid),
                            plugin.del(&p.cid, ns, &args, Some(&prev)),
                        ));
                    }
                    outs
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The registry's non-ztunnel records as container ID → (UID, IP).
fn registry_pods(d: &Daemon) -> Result<BTreeMap<String, (String, String)>> {
    Ok(registry(d)?
        .iter()
        .filter(|r| r["ztunnel"] != json!(true))
        .map(|r| {
            (
                r["container_id"].as_str().unwrap_or_default().to_string(),
                (
                    r["uid"].as_str().unwrap_or_default().to_string(),
                    r["ips"][0].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect())
}

/// Kernel = registry = expected, for a set of live pods.
fn assert_parallel_state(w: &World, d: &Daemon, live: &[Synthetic], ctx: &str) -> Result<()> {
    let want_pods: BTreeMap<String, (String, String)> = live
        .iter()
        .map(|p| (p.cid.clone(), (p.uid.clone(), p.ip.clone())))
        .collect();
    let reg = registry_pods(d)?;
    ensure!(
        reg == want_pods,
        "{ctx}: registry {reg:?}\nwant {want_pods:?}"
    );
    let owners = registry_owners(d)?;
    let set = ipset_members(&w.net, "node")?;
    let routes = pod_routes(&w.net, "node")?;
    ensure!(
        set == owners,
        "{ctx}: ipset {set:?} != registry owners {owners:?}"
    );
    let ips: BTreeSet<String> = live.iter().map(|p| p.ip.clone()).collect();
    ensure!(
        routes == ips,
        "{ctx}: table-100 routes {routes:?} != live IPs {ips:?}"
    );
    ensure!(
        set.keys().cloned().collect::<BTreeSet<_>>() == ips,
        "{ctx}: ipset IPs {set:?} != live IPs {ips:?}"
    );
    for (ip, owner) in &set {
        ensure!(
            live.iter().any(|p| &p.ip == ip && &p.uid == owner),
            "{ctx}: {ip} is owned by {owner}, which is not a live pod with that IP"
        );
    }
    Ok(())
}

/// (5) Concurrency: 80 plugin processes at once, ADD (and for a third of them DEL right after)
/// with 10 IPs shared among them (pods share one netns and one host interface), then a second
/// wave of 30 ADDs racing the DELs of half the live pods: the kernel's ipset (members and owner comments) and table-100
/// routes equal what the registry says, and both equal the expected set of live pods. A resync
/// afterwards has nothing to do.
#[test]
fn parallel_add_del_with_overlapping_ips_ends_equal_to_the_registry() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::new("parallel", &[])?;
    w.ztunnel("zt", "a")?;
    w.net.add_ns("shared")?;
    w.net.exec_ok("node", &["sh", "-c", "ip link add vhshared type veth peer name vhsharedp && ip link set vhshared up && ip link set vhsharedp up"])?;
    let d = w.daemon()?;
    let plugin = DirectPlugin::new(d.socket(), &w.cni.plugin_log(), NETWORK);
    let ns = w.net.ns_path("shared");
    let pod = |i: usize| Synthetic {
        cid: format!("par-{i}"),
        uid: format!("uid-par-{i}"),
        ip: format!("10.244.1.{}", 100 + i % 10),
    };

    let wave1: Vec<(Synthetic, bool, bool)> = (0..80).map(|i| (pod(i), true, i % 3 == 0)).collect();
    let t = Instant::now();
    let outs = in_parallel(&plugin, &ns, &wave1);
    let took1 = t.elapsed();
    ensure!(outs.len() == 80 + 27, "{} outcomes", outs.len());
    for (what, o) in &outs {
        ensure!(o.success(), "{what}: {o}");
    }
    let mut live: Vec<Synthetic> = (0..80).filter(|i| i % 3 != 0).map(pod).collect();
    assert_parallel_state(&w, d, &live, "after wave 1")?;

    // Wave 2: DEL every live pod with an even index while 30 new pods ADD on the same IPs.
    let mut wave2: Vec<(Synthetic, bool, bool)> = live
        .iter()
        .filter(|p| {
            p.cid
                .trim_start_matches("par-")
                .parse::<usize>()
                .is_ok_and(|i| i % 2 == 0)
        })
        .map(|p| (p.clone(), false, true))
        .collect();
    let dels = wave2.len();
    wave2.extend((80..110).map(|i| (pod(i), true, false)));
    let t = Instant::now();
    let outs = in_parallel(&plugin, &ns, &wave2);
    let took2 = t.elapsed();
    for (what, o) in &outs {
        ensure!(o.success(), "{what}: {o}");
    }
    live.retain(|p| !wave2.iter().any(|(q, _, del)| *del && q.cid == p.cid));
    live.extend((80..110).map(pod));
    assert_parallel_state(&w, d, &live, "after wave 2")?;

    // A full resync finds nothing to do.
    std::thread::sleep(Duration::from_millis(1200));
    let dump = d.dump_json()?;
    ensure!(
        dump["pending"] == json!([]),
        "pending after the waves: {}",
        dump["pending"]
    );
    ensure!(
        dump["last_resync"]["repaired"] == json!(0),
        "the resync after the waves repaired: {}",
        dump["last_resync"]
    );
    assert_parallel_state(&w, d, &live, "after a resync")?;
    println!(
        "parallel: wave 1: 80 ADD + 27 DEL on 10 IPs from 80 processes in {} ms; wave 2: 30 ADD + {dels} DEL in {} ms; \
         final {} live pods on {} IPs: kernel == registry == expected",
        took1.as_millis(),
        took2.as_millis(),
        live.len(),
        ipset_members(&w.net, "node")?.len()
    );
    Ok(())
}

/// A copy of the plugin binary that any user can run (the build dir may not be reachable).
fn plugin_copy(dir: &Path) -> Result<std::path::PathBuf> {
    let p = dir.join("ambient-cni");
    std::fs::copy(workspace_bin("ambient-cni")?, &p)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// `setpriv` to uid/gid 65534 without supplementary groups.
fn as_nobody() -> Vec<String> {
    [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// (6) The plugin under every daemon fault: socket missing, a stale socket of a daemon killed
/// with -9 (connection refused), a socket that accepts and never answers, a daemon that is
/// stopped (SIGSTOP: the kernel still accepts, nobody answers), a regular file where the socket
/// should be, and a socket the plugin may not open (permission denied): ADD fails with code 11
/// within its 1 s deadline naming the socket, and DEL exits 0 within its deadline, every time.
#[test]
fn plugin_fails_closed_on_add_and_succeeds_on_del_under_every_daemon_fault() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = ambient_cni_tests::TestNet::new("faults");
    net.add_ns("node")?;
    net.add_ns("pod")?;
    let pod_ns = net.ns_path("pod");
    let prev = prev_result("vhpod", &pod_ns, "10.244.1.9");
    let args = k8s_args(AMBIENT_NS, "p", "uid-p");
    let log = net.dir().join("plugin.log");
    let bin = plugin_copy(net.dir())?;
    let deadline = Duration::from_millis(1000);
    let daemon_args = ["--ambient-namespace", AMBIENT_NS];

    // Each fault: a name, the socket, and whether the plugin runs as nobody.
    let mut faults: Vec<(&str, std::path::PathBuf, bool)> = Vec::new();
    faults.push((
        "socket missing",
        net.dir().join("none").join("cni.sock"),
        false,
    ));
    // A daemon killed with -9 leaves its socket file behind.
    let killed = net.dir().join("killed");
    let pid = spawn_daemon_at(&net, "node", &killed, &daemon_args)?;
    wait_socket(&killed.join("run/cni.sock"), Duration::from_secs(20))?;
    kill9(pid);
    net.kill(pid);
    faults.push((
        "stale socket of a daemon killed -9",
        killed.join("run/cni.sock"),
        false,
    ));
    let hung_path = net.dir().join("hung.sock");
    let _hung = HungSocket::start(&hung_path)?;
    faults.push(("accepts and never answers", hung_path, false));
    let stopped = net.dir().join("stopped");
    let stopped_pid = spawn_daemon_at(&net, "node", &stopped, &daemon_args)?;
    wait_socket(&stopped.join("run/cni.sock"), Duration::from_secs(20))?;
    signal(stopped_pid, libc::SIGSTOP);
    faults.push((
        "daemon stopped (SIGSTOP)",
        stopped.join("run/cni.sock"),
        false,
    ));
    let file = net.dir().join("file.sock");
    std::fs::write(&file, b"not a socket")?;
    faults.push(("a regular file", file, false));
    let live = net.dir().join("live");
    let live_pid = spawn_daemon_at(&net, "node", &live, &daemon_args)?;
    wait_socket(&live.join("run/cni.sock"), Duration::from_secs(20))?;
    faults.push((
        "permission denied (0700 dir, plugin not root)",
        live.join("run/cni.sock"),
        true,
    ));

    for (name, socket, nobody) in &faults {
        let mut plugin = DirectPlugin::new(socket, &log, NETWORK);
        plugin.timeout_ms = deadline.as_millis() as u64;
        plugin.bin = Some(bin.clone());
        if *nobody {
            plugin.wrapper = as_nobody();
        }
        let add = plugin.add("cid-fault", &pod_ns, &args, &prev);
        let j = add.json().with_context(|| format!("{name}: ADD"))?;
        ensure!(
            add.status == Some(1) && j["code"] == json!(11),
            "{name}: ADD must fail with 11: {add}"
        );
        let msg = j["msg"].as_str().unwrap_or_default();
        ensure!(
            msg.contains(&socket.display().to_string()),
            "{name}: the message names the socket: {add}"
        );
        ensure!(
            add.elapsed < deadline + Duration::from_millis(1500),
            "{name}: ADD took {:?}",
            add.elapsed
        );
        let del = plugin.del("cid-fault", &pod_ns, &args, Some(&prev));
        ensure!(
            del.success() && del.stdout.is_empty(),
            "{name}: DEL must exit 0: {del}"
        );
        ensure!(
            del.elapsed < deadline + Duration::from_millis(1500),
            "{name}: DEL took {:?}",
            del.elapsed
        );
        println!(
            "fault {name:<46} ADD code 11 in {:>4} ms ({msg}: {}); DEL exit 0 in {:>4} ms",
            add.elapsed.as_millis(),
            j["details"].as_str().unwrap_or_default(),
            del.elapsed.as_millis()
        );
    }
    signal(stopped_pid, libc::SIGCONT);
    net.kill(stopped_pid);
    net.kill(live_pid);
    Ok(())
}

/// (7) The socket is a privilege boundary: 0600 in a 0700 directory, owned by root, and the daemon
/// listens on no TCP port. With the socket and its directory opened up on purpose, a client with
/// uid 65534 reaches the daemon and is refused by SO_PEERCRED: the plugin's ADD gets code 100
/// saying permission denied, `ambient-cnid status` fails the same way, and nothing is recorded.
#[test]
fn socket_is_0600_in_a_0700_dir_and_only_root_peers_are_served() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = ambient_cni_tests::TestNet::new("peercred");
    net.add_ns("node")?;
    net.add_ns("pod")?;
    let daemon = Daemon::start(&net, "node", &["--ambient-namespace", AMBIENT_NS])?;
    daemon.wait_ready(Duration::from_secs(20))?;
    let sock = daemon.socket().to_path_buf();
    let dir = sock.parent().context("socket dir")?;
    let (dm, sm) = (std::fs::metadata(dir)?, std::fs::symlink_metadata(&sock)?);
    use std::os::unix::fs::MetadataExt;
    ensure!(
        dm.mode() & 0o7777 == 0o700 && dm.uid() == 0,
        "socket dir mode {:o} uid {}",
        dm.mode() & 0o7777,
        dm.uid()
    );
    ensure!(
        sm.file_type().is_socket() && sm.mode() & 0o7777 == 0o600 && sm.uid() == 0,
        "socket mode {:o} uid {}",
        sm.mode() & 0o7777,
        sm.uid()
    );
    let tcp = net.exec_ok("node", &["ss", "-Htlnp"])?;
    ensure!(
        !tcp.contains("ambient-cnid"),
        "the daemon listens on TCP: {tcp}"
    );
    let unix = net.exec_ok("node", &["ss", "-Hxlp"])?;
    ensure!(
        unix.contains(&sock.display().to_string()) && unix.contains("ambient-cnid"),
        "unix listener: {unix}"
    );
    println!(
        "socket: {} mode 0600 in a 0700 dir, both root's; no TCP listener",
        sock.display()
    );

    // Open it up for the test: now only SO_PEERCRED stands between uid 65534 and the daemon.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))?;
    let pod_ns = net.ns_path("pod");
    let mut plugin = DirectPlugin::new(&sock, &net.dir().join("plugin.log"), NETWORK);
    plugin.bin = Some(plugin_copy(net.dir())?);
    plugin.wrapper = as_nobody();
    let args = k8s_args(AMBIENT_NS, "p", "uid-p");
    let prev = prev_result("vhpod", &pod_ns, "10.244.1.9");
    let add = plugin.add("cid-nobody", &pod_ns, &args, &prev);
    let j = add.json().context("ADD as nobody")?;
    ensure!(
        add.status == Some(1) && j["code"] == json!(100),
        "ADD as uid 65534: {add}"
    );
    let text = format!("{} {}", j["msg"], j["details"]);
    ensure!(
        text.contains("PermissionDenied") && text.contains("peer uid 65534 is not root"),
        "the refusal says why: {add}"
    );
    let del = plugin.del("cid-nobody", &pod_ns, &args, Some(&prev));
    ensure!(del.success(), "DEL always exits 0: {del}");
    let bin = workspace_bin("ambient-cnid")?;
    let admin_copy = net.dir().join("ambient-cnid");
    std::fs::copy(&bin, &admin_copy)?;
    std::fs::set_permissions(&admin_copy, std::fs::Permissions::from_mode(0o755))?;
    let status = run_fresh_binary(
        || {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&admin_copy)
                .arg("status")
                .arg("--socket")
                .arg(&sock);
            c
        },
        None,
    );
    ensure!(
        !status.success() && status.stderr.contains("not root"),
        "status as uid 65534: {status}"
    );
    ensure!(
        daemon.status_json()?["pods"] == json!(0),
        "a refused peer recorded something"
    );
    ensure!(
        daemon
            .log_text()
            .contains("refused a peer that is not root"),
        "the daemon logs the refusal"
    );
    println!(
        "socket: uid 65534 refused by SO_PEERCRED: ADD code 100 ({}: {}); status: {}",
        j["msg"],
        j["details"],
        status.stderr.trim()
    );
    Ok(())
}

/// (8, daemon side) Names and addresses from CNI input are checked before anything is recorded
/// or touched: the plugin refuses what libcni would (code 4 for env, 7 for prevResult), the
/// daemon refuses the rest (code 100: host interface names that are no interface names, pod
/// UIDs/names that could not be an ipset comment or a Kubernetes name, a netns path that is no
/// netns). After 20 hostile ADDs the registry and the kernel hold nothing, and a good ADD works.
#[test]
fn hostile_names_are_refused_before_anything_is_recorded() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let net = ambient_cni_tests::TestNet::new("hostile");
    net.add_ns("node")?;
    net.add_ns("pod")?;
    net.exec_ok("node", &["sh", "-c", "ip link add vhpod type veth peer name vhpodp && ip link set vhpod up && ip link set vhpodp up"])?;
    let daemon = Daemon::start(&net, "node", &["--ambient-namespace", AMBIENT_NS])?;
    daemon.wait_ready(Duration::from_secs(20))?;
    let plugin = DirectPlugin::new(daemon.socket(), &net.dir().join("plugin.log"), NETWORK);
    let pod_ns = net.ns_path("pod");
    let ns = pod_ns.to_string_lossy().into_owned();
    let good_args = k8s_args(AMBIENT_NS, "p", "uid-p");
    let good_prev = prev_result("vhpod", &pod_ns, "10.244.1.9");
    let long_uid = "u".repeat(300);

    // (what, container ID, ifname, netns, CNI_ARGS, prevResult, expected code)
    let mut cases: Vec<(String, String, String, String, String, Value, u64)> = Vec::new();
    let mut case =
        |what: &str, cid: &str, ifname: &str, netns: &str, args: &str, prev: Value, code: u64| {
            cases.push((
                what.into(),
                cid.into(),
                ifname.into(),
                netns.into(),
                args.into(),
                prev,
                code,
            ));
        };
    let p = good_prev.clone();
    case(
        "container ID with a path",
        "../../etc/passwd",
        "eth0",
        &ns,
        &good_args,
        p.clone(),
        4,
    );
    case(
        "container ID with a shell",
        "a;reboot",
        "eth0",
        &ns,
        &good_args,
        p.clone(),
        4,
    );
    case(
        "container ID starting with -",
        "-rf",
        "eth0",
        &ns,
        &good_args,
        p.clone(),
        4,
    );
    case(
        "ifname with a path",
        "cid",
        "../x",
        &ns,
        &good_args,
        p.clone(),
        4,
    );
    case(
        "ifname with a space",
        "cid",
        "e th0",
        &ns,
        &good_args,
        p.clone(),
        4,
    );
    case(
        "ifname of 16 bytes",
        "cid",
        "0123456789abcdef",
        &ns,
        &good_args,
        p.clone(),
        4,
    );
    let with = |ptr: &str, v: Value| {
        let mut x = good_prev.clone();
        if let Some(slot) = x.pointer_mut(ptr) {
            *slot = v;
        }
        x
    };
    case(
        "host interface with a path",
        "cid",
        "eth0",
        &ns,
        &good_args,
        with("/interfaces/0/name", json!("../../x")),
        100,
    );
    case(
        "host interface with a space",
        "cid",
        "eth0",
        &ns,
        &good_args,
        with("/interfaces/0/name", json!("vh pod")),
        100,
    );
    case(
        "host interface with a newline",
        "cid",
        "eth0",
        &ns,
        &good_args,
        with("/interfaces/0/name", json!("vh\npod")),
        100,
    );
    case(
        "host interface of 16 bytes",
        "cid",
        "eth0",
        &ns,
        &good_args,
        with("/interfaces/0/name", json!("vhpod0123456789a")),
        100,
    );
    case(
        "host interface ..",
        "cid",
        "eth0",
        &ns,
        &good_args,
        with("/interfaces/0/name", json!("..")),
        100,
    );
    case(
        "address /33",
        "cid",
        "eth0",
        &ns,
        &good_args,
        with("/ips/0/address", json!("10.244.1.9/33")),
        7,
    );
    case(
        "address with a shell",
        "cid",
        "eth0",
        &ns,
        &good_args,
        with("/ips/0/address", json!("10.244.1.9/24;id")),
        7,
    );
    case(
        "gateway with a shell",
        "cid",
        "eth0",
        &ns,
        &good_args,
        with("/ips/0/gateway", json!("$(id)")),
        7,
    );
    case(
        "pod UID of 300 bytes",
        "cid",
        "eth0",
        &ns,
        &k8s_args(AMBIENT_NS, "p", &long_uid),
        p.clone(),
        100,
    );
    case(
        "pod UID with a quote",
        "cid",
        "eth0",
        &ns,
        &k8s_args(AMBIENT_NS, "p", "u\"$(id)"),
        p.clone(),
        100,
    );
    case(
        "pod UID with a space",
        "cid",
        "eth0",
        &ns,
        &k8s_args(AMBIENT_NS, "p", "u v"),
        p.clone(),
        100,
    );
    case(
        "pod name with a path",
        "cid",
        "eth0",
        &ns,
        &k8s_args(AMBIENT_NS, "../p", "uid-p"),
        p.clone(),
        100,
    );
    case(
        "netns that is a file",
        "cid",
        "eth0",
        "/etc/hostname",
        &good_args,
        p.clone(),
        100,
    );
    case(
        "netns that does not exist",
        "cid",
        "eth0",
        "/var/run/netns/none",
        &good_args,
        p.clone(),
        100,
    );

    for (what, cid, ifname, netns, args, prev, code) in &cases {
        let env = vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", cid.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", ifname.as_str()),
            ("CNI_ARGS", args.as_str()),
        ];
        let out = plugin.run(&env, &plugin.conf(json!({ "prevResult": prev })));
        ensure!(
            out.cni_code() == Some(*code),
            "{what}: want code {code}: {out}"
        );
        let j = out.json()?;
        let details: String = j["details"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(110)
            .collect();
        println!(
            "hostile: {what:<30} → code {code}: {}: {details}",
            j["msg"].as_str().unwrap_or_default()
        );
        let pods = daemon.status_json()?["pods"].clone();
        ensure!(pods == json!(0), "{what}: something was recorded ({pods})");
    }
    ensure!(
        ipset_members(&net, "node")?.is_empty(),
        "hostile input reached the ipset"
    );
    let out = plugin.add("cid-good", &pod_ns, &good_args, &good_prev);
    ensure!(out.success(), "the good ADD: {out}");
    ensure!(ipset_members(&net, "node")?.get("10.244.1.9") == Some(&"uid-p".to_string()));
    Ok(())
}
