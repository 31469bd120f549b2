//! Chaos (issue 5), as root, in namespaces only: churn of ADD/DEL with IP reuse through the real
//! plugin binary while the daemon is killed with -9 at random points (idle, in the middle of a
//! plugin call, in the middle of its own start-up) and restarted, and an outside agent flushes
//! the ipset and our mangle chain. The driver behaves like a runtime: an ADD that fails with
//! code 11 is torn down (DEL, netns removed) and retried as a new sandbox of the same pod once
//! the daemon is back; a deleted pod's netns is removed; now and then a late DEL or a late ADD of
//! a long-deleted pod arrives. At the end, after a resync, the kernel (ipset members with their
//! owners, table-100 routes) and the registry are compared with the set of live pods:
//! `leaked=N missing=N repaired=N`, and the test fails unless leaked and missing are 0.
//!
//! The pods are dual stack: each sandbox has an IPv4 and an IPv6 address, drawn from small pools
//! of each family (so both are reused), and the outside agent flushes either family's set and
//! mangle chain; the comparison covers both ipsets and both families' table-100 routes.
//!
//! `make test` runs 300 operations; `make chaos` runs `ACNI_CHAOS_OPS` (default there: 2000).
//! `ACNI_CHAOS_SEED` replays a run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambient_cni_tests::fault::*;
use ambient_cni_tests::world::{
    hostport, Family, World, AMBIENT_NS, NETWORK, REMOTE_IP, REMOTE_IP6,
};
use ambient_cni_tests::{require_root, Daemon, Output};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// Pod IPs the churn draws from: few, so that they are reused all the time.
const POOL: std::ops::Range<u8> = 100..116;
/// At most this many pods hold an IP (live or waiting for their ADD retry).
const MAX_PODS: usize = 12;

/// One sandbox of one pod.
#[derive(Clone, Debug)]
struct Sandbox {
    pod: usize,
    attempt: usize,
    uid: String,
    ip: String,
    ip6: String,
}

impl Sandbox {
    fn cid(&self) -> String {
        format!("chaos-{}-{}", self.pod, self.attempt)
    }
    fn ns(&self) -> String {
        format!("c{}-{}", self.pod, self.attempt)
    }
    fn args(&self) -> String {
        k8s_args(AMBIENT_NS, &format!("pod-{}", self.pod), &self.uid)
    }
}

#[derive(Default)]
struct Counts {
    adds: u32,
    add_retries: u32,
    dels: u32,
    late_dels: u32,
    late_adds: u32,
    kills_idle: u32,
    kills_mid_call: u32,
    kills_in_startup: u32,
    restarts: u32,
    ipset_flushes: u32,
    chain_flushes: u32,
    down_ops: u32,
}

struct Chaos<'w> {
    w: &'w World,
    rng: Rng,
    plugin: DirectPlugin,
    ipt: &'static str,
    daemon: Option<Daemon>,
    live: BTreeMap<usize, Sandbox>,
    retry: Vec<Sandbox>,
    dead: Vec<Sandbox>,
    next_pod: usize,
    n: Counts,
    restart_ms: Vec<u128>,
}

impl Chaos<'_> {
    fn ns_path(&self, s: &Sandbox) -> PathBuf {
        self.w.net.ns_path(&s.ns())
    }

    fn prev(&self, s: &Sandbox) -> Value {
        prev_result_ips("vhchaos", &self.ns_path(s), &[&s.ip, &s.ip6])
    }

    /// A free address of each family, drawn independently (an IPv6 address comes back with
    /// another IPv4 one, and the other way round).
    fn free_ips(&mut self) -> Option<(String, String)> {
        let used: BTreeSet<&str> = self
            .live
            .values()
            .chain(&self.retry)
            .flat_map(|s| [s.ip.as_str(), s.ip6.as_str()])
            .collect();
        let free = |f: &dyn Fn(u8) -> String| -> Vec<String> {
            POOL.map(f)
                .filter(|ip| !used.contains(ip.as_str()))
                .collect()
        };
        let (v4, v6) = (
            free(&|i| format!("10.244.1.{i}")),
            free(&|i| format!("fd10:244:1::{i:x}")),
        );
        Some((self.rng.pick(&v4).cloned()?, self.rng.pick(&v6).cloned()?))
    }

    fn up(&self) -> bool {
        self.daemon.is_some()
    }

    fn restart(&mut self) -> Result<()> {
        let (d, took) = restart_daemon(self.w)?;
        self.daemon = Some(d);
        self.n.restarts += 1;
        self.restart_ms.push(took.as_millis());
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// Runs `call` (a plugin run); with `kill_after`, kills the daemon that long into it.
    fn call(
        &mut self,
        kill_after: Option<Duration>,
        call: impl FnOnce(&DirectPlugin) -> Output + Send,
    ) -> Result<Output> {
        let Some(delay) = kill_after.filter(|_| self.up()) else {
            return Ok(call(&self.plugin));
        };
        let plugin = self.plugin.clone();
        let mut daemon = self.daemon.take();
        let out = std::thread::scope(|s| {
            let h = s.spawn(|| call(&plugin));
            std::thread::sleep(delay);
            if let Some(d) = daemon.as_mut() {
                d.kill();
            }
            h.join()
        })
        .map_err(|_| anyhow::anyhow!("plugin thread panicked"))?;
        self.n.kills_mid_call += 1;
        Ok(out)
    }

    /// ADD of one sandbox, as a runtime does it: on code 11, DEL, remove the netns, retry later
    /// as a new sandbox of the same pod.
    fn add(&mut self, s: Sandbox, kill_after: Option<Duration>) -> Result<()> {
        self.w.net.add_ns(&s.ns())?;
        let (cid, ns, args, prev) = (s.cid(), self.ns_path(&s), s.args(), self.prev(&s));
        let out = self.call(kill_after, |p| p.add(&cid, &ns, &args, &prev))?;
        if out.success() {
            self.live.insert(s.pod, s);
            return Ok(());
        }
        ensure!(
            out.cni_code() == Some(11),
            "ADD {cid} failed with something else than 11: {out}"
        );
        let del = self.plugin.del(&cid, &ns, &args, Some(&prev));
        ensure!(del.success(), "DEL after a failed ADD must exit 0: {del}");
        self.w.net.del_ns(&s.ns())?;
        self.retry.push(Sandbox {
            attempt: s.attempt + 1,
            ..s
        });
        Ok(())
    }

    fn del(&mut self, pod: usize, kill_after: Option<Duration>) -> Result<()> {
        let Some(s) = self.live.remove(&pod) else {
            return Ok(());
        };
        let (cid, ns, args, prev) = (s.cid(), self.ns_path(&s), s.args(), self.prev(&s));
        let out = self.call(kill_after, |p| p.del(&cid, &ns, &args, Some(&prev)))?;
        ensure!(
            out.success() && out.stdout.is_empty(),
            "DEL {cid} must exit 0: {out}"
        );
        self.w.net.del_ns(&s.ns())?;
        self.dead.push(s);
        self.n.dels += 1;
        Ok(())
    }

    fn step(&mut self) -> Result<()> {
        if !self.up() {
            self.n.down_ops += 1;
        }
        // The daemon comes back after a few operations (sometimes killed again in its start-up).
        if !self.up() && self.rng.chance(0.3) {
            if self.rng.chance(0.2) {
                let pid = spawn_daemon_raw(self.w)?;
                std::thread::sleep(Duration::from_millis(self.rng.below(120)));
                kill9(pid);
                self.w.net.kill(pid);
                self.n.kills_in_startup += 1;
            }
            self.restart()?;
        }
        // A pod whose ADD failed is retried first once the daemon is back (kubelet's backoff).
        if self.up() && !self.retry.is_empty() {
            let s = self.retry.remove(0);
            self.n.add_retries += 1;
            return self.add(s, None);
        }
        let kill_mid = (self.up() && self.rng.chance(0.02))
            .then(|| Duration::from_micros(self.rng.below(8000)));
        let r = self.rng.below(100);
        match r {
            0..=39 => {
                if self.live.len() + self.retry.len() >= MAX_PODS {
                    return self.del_random(kill_mid);
                }
                let Some((ip, ip6)) = self.free_ips() else {
                    return Ok(());
                };
                let pod = self.next_pod;
                self.next_pod += 1;
                self.n.adds += 1;
                let s = Sandbox {
                    pod,
                    attempt: 0,
                    uid: format!("uid-chaos-{pod}"),
                    ip,
                    ip6,
                };
                self.add(s, kill_mid)
            }
            40..=74 => self.del_random(kill_mid),
            75..=79 => {
                // A late DEL of a long-deleted pod (its IP may belong to someone else now).
                if let Some(s) = self.rng.pick(&self.dead).cloned() {
                    let out = self.plugin.del(
                        &s.cid(),
                        &self.ns_path(&s),
                        &s.args(),
                        Some(&self.prev(&s)),
                    );
                    ensure!(out.success(), "late DEL {}: {out}", s.cid());
                    self.n.late_dels += 1;
                }
                Ok(())
            }
            80..=82 => {
                // A late ADD retry of a deleted pod: its netns is gone, so it is refused.
                if let Some(s) = self.rng.pick(&self.dead).cloned() {
                    let out =
                        self.plugin
                            .add(&s.cid(), &self.ns_path(&s), &s.args(), &self.prev(&s));
                    let want = if self.up() { 100 } else { 11 };
                    ensure!(
                        out.cni_code() == Some(want),
                        "late ADD {} (daemon up: {}): {out}",
                        s.cid(),
                        self.up()
                    );
                    self.n.late_adds += 1;
                }
                Ok(())
            }
            83..=86 => {
                let set = if self.rng.chance(0.5) { IPSET } else { IPSET6 };
                self.w.net.exec_ok("node", &["ipset", "flush", set])?;
                self.n.ipset_flushes += 1;
                Ok(())
            }
            87..=90 => {
                // iptables-nft → ip6tables-nft, iptables-legacy → ip6tables-legacy.
                let ipt6 = self.ipt.replacen("iptables", "ip6tables", 1);
                let tool = if self.rng.chance(0.5) {
                    self.ipt
                } else {
                    &ipt6
                };
                self.w
                    .net
                    .exec_ok("node", &[tool, "-t", "mangle", "-F", "ztunnel-PREROUTING"])?;
                self.n.chain_flushes += 1;
                Ok(())
            }
            91..=92 => {
                if self.up() {
                    self.kill();
                    self.n.kills_idle += 1;
                }
                Ok(())
            }
            _ => {
                std::thread::sleep(Duration::from_millis(self.rng.below(300)));
                Ok(())
            }
        }
    }

    fn del_random(&mut self, kill_mid: Option<Duration>) -> Result<()> {
        let pods: Vec<usize> = self.live.keys().copied().collect();
        match self.rng.pick(&pods).copied() {
            Some(p) => self.del(p, kill_mid),
            None => Ok(()),
        }
    }
}

/// The kernel's and the registry's view compared with the expected live pods (ip → uid, plus
/// the container IDs): (leaked, missing, details).
fn compare(
    w: &World,
    d: &Daemon,
    want: &BTreeMap<String, String>,
    want_cids: &BTreeSet<String>,
) -> Result<(usize, usize, String)> {
    let mut set = ipset_members_of(&w.net, "node", IPSET)?;
    set.extend(ipset_members_of(&w.net, "node", IPSET6)?);
    let mut routes = pod_routes_of(&w.net, "node", "-4")?;
    routes.extend(pod_routes_of(&w.net, "node", "-6")?);
    let reg: BTreeSet<String> = registry(d)?
        .iter()
        .filter(|r| r["ztunnel"] != json!(true))
        .filter_map(|r| r["container_id"].as_str().map(str::to_string))
        .collect();
    let want_ips: BTreeSet<String> = want.keys().cloned().collect();
    let mut leaked = Vec::new();
    let mut missing = Vec::new();
    for (ip, owner) in &set {
        if want.get(ip) != Some(owner) {
            leaked.push(format!("ipset {ip} ({owner})"));
        }
    }
    for (ip, owner) in want {
        if set.get(ip) != Some(owner) {
            missing.push(format!(
                "ipset {ip} ({owner}, kernel has {:?})",
                set.get(ip)
            ));
        }
    }
    leaked.extend(routes.difference(&want_ips).map(|r| format!("route {r}")));
    missing.extend(want_ips.difference(&routes).map(|r| format!("route {r}")));
    leaked.extend(reg.difference(want_cids).map(|c| format!("record {c}")));
    missing.extend(want_cids.difference(&reg).map(|c| format!("record {c}")));
    Ok((
        leaked.len(),
        missing.len(),
        format!("leaked {leaked:?}\nmissing {missing:?}"),
    ))
}

fn chaos(ops: usize) -> Result<()> {
    let seed = seed("ACNI_CHAOS_SEED");
    println!("chaos: {ops} operations, seed {seed} (ACNI_CHAOS_SEED={seed} replays the choices; kill timing is real time)");
    let mut w = World::with_family("chaos", Family::Dual, &[])?;
    w.ztunnel("zt", "a")?;
    let app = w.pod("app", AMBIENT_NS, "app")?;
    w.net.exec_ok(
        "node",
        &["sh", "-c", "ip link add vhchaos type veth peer name vhchaosp && ip link set vhchaos up && ip link set vhchaosp up"],
    )?;
    let ipt = iptables_variant(&w.net, "node")?;
    let daemon = w.daemon.take().context("daemon")?;
    let mut plugin = DirectPlugin::new(daemon.socket(), &w.cni.plugin_log(), NETWORK);
    plugin.timeout_ms = 2000;
    let mut c = Chaos {
        w: &w,
        rng: Rng::new(seed),
        plugin,
        ipt,
        daemon: Some(daemon),
        live: BTreeMap::new(),
        retry: Vec::new(),
        dead: Vec::new(),
        next_pod: 0,
        n: Counts::default(),
        restart_ms: Vec::new(),
    };
    let start = Instant::now();
    for i in 0..ops {
        c.step()
            .with_context(|| format!("operation {i} of seed {seed}"))?;
    }
    // The end: the daemon back, every failed ADD retried, like a runtime would.
    if !c.up() {
        c.restart()?;
    }
    while let Some(s) = c.retry.pop() {
        c.n.add_retries += 1;
        c.add(s, None)?;
        ensure!(c.retry.is_empty() || c.up(), "daemon went away");
    }
    let churn = start.elapsed();
    let d = c.daemon.take().context("daemon")?;
    // One full resync after the last operation.
    let last = now_ms();
    wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        Ok(d.dump_json()?["last_resync"]["unix_ms"]
            .as_u64()
            .unwrap_or(0)
            > last + 50)
    })?;
    let mut want: BTreeMap<String, String> = c
        .live
        .values()
        .flat_map(|s| {
            [
                (s.ip.clone(), s.uid.clone()),
                (s.ip6.clone(), s.uid.clone()),
            ]
        })
        .collect();
    let (app4, app6) = (app.need_ip4()?, app.need_ip6()?);
    want.insert(app4.clone(), "uid-app".into());
    want.insert(app6.clone(), "uid-app".into());
    let mut want_cids: BTreeSet<String> = c.live.values().map(Sandbox::cid).collect();
    let app_cid = registry(&d)?
        .iter()
        .find(|r| r["name"] == json!("app"))
        .and_then(|r| r["container_id"].as_str().map(str::to_string))
        .context("app's record")?;
    want_cids.insert(app_cid);
    let (leaked, missing, details) = compare(&w, &d, &want, &want_cids)?;
    let log = d.log_text();
    let repaired = count_logged_ops(&log, "repair");
    let start_ops = count_logged_ops(&log, "start");
    let swept = log
        .lines()
        .filter(|l| l.contains("swept: its netns is gone"))
        .count();
    let n = &c.n;
    println!(
        "chaos: {ops} ops in {:.1} s: {} ADD ({} retried after code 11), {} DEL, {} late DEL, {} late ADD; \
         kill -9: {} idle, {} mid-call, {} in start-up; {} restarts (ready in {} ms median); {} ops while down; \
         outside agent: {} ipset flushes, {} chain flushes; {} records swept; {} start-up ops",
        churn.as_secs_f64(),
        n.adds,
        n.add_retries,
        n.dels,
        n.late_dels,
        n.late_adds,
        n.kills_idle,
        n.kills_mid_call,
        n.kills_in_startup,
        n.restarts,
        {
            let mut v = c.restart_ms.clone();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        },
        n.down_ops,
        n.ipset_flushes,
        n.chain_flushes,
        swept,
        start_ops
    );
    println!(
        "chaos: live pods at the end: {} (+ app), seed {seed}",
        c.live.len()
    );
    println!("leaked={leaked} missing={missing} repaired={repaired}");
    if leaked != 0 || missing != 0 {
        bail!("kernel/registry differ from the live pods (seed {seed}):\n{details}\n{log}");
    }
    // The real pod that lived through all of it is captured both ways, in both families.
    for (remote, ip) in [(REMOTE_IP, &app4), (REMOTE_IP6, &app6)] {
        let out = w.answer("app", &hostport(remote, 8080), None)?;
        ensure!(
            out.contains("ztunnel port=15001"),
            "app egress to {remote} after the chaos: {out}"
        );
        let out = w.answer("remote", &hostport(ip, 8080), None)?;
        ensure!(
            out.contains("ztunnel port=15006"),
            "app ingress to {ip} after the chaos: {out}"
        );
    }
    w.daemon = Some(d);
    Ok(())
}

/// The short churn for `make test` (`ACNI_CHAOS_OPS` overrides, `make chaos` sets it).
#[test]
fn churn_with_kill_9_and_flushes_leaks_nothing_and_misses_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ops = std::env::var("ACNI_CHAOS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    chaos(ops)
}
