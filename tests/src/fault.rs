//! Fault injection and read-back for the reliability and chaos tests.
//!
//! - [`Rng`]: a seeded SplitMix64 (no dependency), [`seed`] reads it from the environment or
//!   makes one; tests print it so that a failing run can be replayed.
//! - The kernel's view of enrollment, as an outside observer reads it with the stock tools:
//!   [`ipset_members`] (IP → owner comment), [`pod_routes`] (our table-100 routes into istioin),
//!   [`kernel_snapshot`] (everything of a node namespace, normalized, for before/after checks).
//! - The daemon's view: [`trace`] (`ambient-cnid trace --json`), [`registry`] (`dump` records),
//!   [`count_logged_ops`] (operations of one kind in the daemon's log, across restarts).
//! - [`DirectPlugin`]: the real `ambient-cni` binary run directly with a synthetic prevResult,
//!   for churn and races that libcni + ptp would make slow or could not make at all (an IP handed
//!   to a second pod while the first one's DEL is still to come).
//! - Misbehaving daemons: [`HungSocket`] (accepts, never answers).
//! - [`restart_daemon`] / [`spawn_daemon_raw`]: a daemon on the world's state dir, waited for or
//!   not (to kill it in the middle of its start-up).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::world::World;
use crate::{run_cmd, workspace_bin, Daemon, Output, TestNet, COMMAND_TIMEOUT};

/// The daemon's ipset.
pub const IPSET: &str = "ztunnel-pods-ips";
/// The daemon's ipset of IPv6 pod IPs.
pub const IPSET6: &str = "ztunnel-pods-ips6";
/// The daemon's route protocol number.
pub const ROUTE_PROTO: &str = "212";

/// SplitMix64: tiny, seedable, good enough to pick test operations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        let n = u64::try_from(items.len()).ok()?;
        items.get(usize::try_from(self.below(n)).ok()?)
    }
}

/// The seed in environment variable `var`, or one made from the clock.
pub fn seed(var: &str) -> u64 {
    if let Some(s) = std::env::var(var).ok().and_then(|v| v.trim().parse().ok()) {
        return s;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// Milliseconds since the epoch (the daemon's trace clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The members of our ipset in namespace `ns`, IP → comment (the owner). Empty if the set does
/// not exist.
pub fn ipset_members(net: &TestNet, ns: &str) -> Result<BTreeMap<String, String>> {
    ipset_members_of(net, ns, IPSET)
}

/// [`ipset_members`] of set `set` ([`IPSET`] or [`IPSET6`]).
pub fn ipset_members_of(net: &TestNet, ns: &str, set: &str) -> Result<BTreeMap<String, String>> {
    let out = net.exec(ns, &["ipset", "save", set]);
    if !out.success() {
        if out.stderr.contains("does not exist") {
            return Ok(BTreeMap::new());
        }
        bail!("ipset save {set}: {out}");
    }
    let mut m = BTreeMap::new();
    for line in out.stdout.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("add") {
            continue;
        }
        let (_set, ip) = (words.next(), words.next().unwrap_or_default());
        let comment = line
            .split_once(" comment ")
            .map(|(_, c)| c.trim().trim_matches('"').to_string())
            .unwrap_or_default();
        m.insert(ip.to_string(), comment);
    }
    Ok(m)
}

/// Destinations of our routes into the inbound tunnel in table 100 (one per enrolled pod IP).
pub fn pod_routes(net: &TestNet, ns: &str) -> Result<BTreeSet<String>> {
    pod_routes_of(net, ns, "-4")
}

/// [`pod_routes`] of one family: `family` is `-4` or `-6`.
pub fn pod_routes_of(net: &TestNet, ns: &str, family: &str) -> Result<BTreeSet<String>> {
    let out = net.exec_ok(
        ns,
        &[
            "ip",
            family,
            "-o",
            "route",
            "show",
            "table",
            "100",
            "proto",
            ROUTE_PROTO,
        ],
    )?;
    Ok(out
        .lines()
        .filter(|l| l.contains("dev istioin"))
        .filter_map(|l| l.split_whitespace().next())
        .map(|d| {
            d.trim_end_matches("/32")
                .trim_end_matches("/128")
                .to_string()
        })
        .collect())
}

/// Everything a person would look at in a node namespace, normalized (see
/// [`World::node_state`]), plus the ipset members with their owners: equal snapshots mean equal
/// redirection state. Every section but iptables-save (where order is meaning) is sorted: links are
/// listed by index (a recreated istioin comes last) and rules of one priority in the order they
/// were added, neither of which means anything for the redirection.
pub fn kernel_snapshot(w: &World, ns: &str) -> Result<String> {
    let mut s = String::new();
    let state = w.node_state(ns)?;
    let mut section: Vec<&str> = Vec::new();
    let mut sorted = false;
    let flush = |s: &mut String, section: &mut Vec<&str>, sorted: bool| {
        if sorted {
            section.sort_unstable();
        }
        for l in section.drain(..) {
            s.push_str(l);
            s.push('\n');
        }
    };
    for line in state.lines() {
        if line.starts_with("$ ") {
            flush(&mut s, &mut section, sorted);
            sorted = !line.starts_with("$ iptables-save");
            s.push_str(line);
            s.push('\n');
        } else {
            section.push(line);
        }
    }
    flush(&mut s, &mut section, sorted);
    s.push_str("$ ipset members\n");
    for (ip, owner) in ipset_members(&w.net, ns)? {
        s.push_str(&format!("{ip} {owner}\n"));
    }
    Ok(s)
}

/// A line-by-line difference of two snapshots, for failure messages.
pub fn diff(a: &str, b: &str) -> String {
    let la: BTreeSet<&str> = a.lines().collect();
    let lb: BTreeSet<&str> = b.lines().collect();
    let mut out = String::new();
    for l in la.difference(&lb) {
        out.push_str(&format!("- {l}\n"));
    }
    for l in lb.difference(&la) {
        out.push_str(&format!("+ {l}\n"));
    }
    out
}

/// One event of `ambient-cnid trace`.
#[derive(Clone, Debug)]
pub struct TraceEvent {
    /// Milliseconds since the epoch.
    pub unix_ms: u64,
    /// add, del, gc, kernel, repair, sweep, start, error, ...
    pub kind: String,
    /// What happened.
    pub message: String,
}

fn admin(d: &Daemon, args: &[&str]) -> Output {
    match workspace_bin("ambient-cnid") {
        Ok(bin) => run_cmd(
            Command::new(bin).args(args).arg("--socket").arg(d.socket()),
            None,
            COMMAND_TIMEOUT,
        ),
        Err(e) => Output {
            status: None,
            stdout: String::new(),
            stderr: format!("{e:#}"),
            elapsed: Duration::ZERO,
        },
    }
}

/// The daemon's whole trace (oldest first).
pub fn trace(d: &Daemon) -> Result<Vec<TraceEvent>> {
    let out = admin(d, &["trace", "--json", "--limit", "100000"]);
    if !out.success() {
        bail!("ambient-cnid trace: {out}");
    }
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).with_context(|| format!("trace line {l:?}"))?;
            Ok(TraceEvent {
                unix_ms: v["unixMs"].as_u64().unwrap_or(0),
                kind: v["kind"].as_str().unwrap_or_default().to_string(),
                message: v["message"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// The registry records of `ambient-cnid dump` (`pods`).
pub fn registry(d: &Daemon) -> Result<Vec<Value>> {
    let dump = d.dump_json()?;
    Ok(dump["pods"].as_array().cloned().unwrap_or_default())
}

/// Applied operations of `kind` (`repair`, `start`, `kernel`, ...) in the daemon's log: one line
/// per apply, `<kind> ops=<op>; <op>; ...; <n> more: <counts>`. The log survives restarts.
pub fn count_logged_ops(log: &str, kind: &str) -> usize {
    let needle = format!(" {kind} ops=");
    log.lines()
        .filter_map(|l| l.split_once(&needle).map(|(_, ops)| ops))
        .flat_map(|ops| ops.split("; "))
        .map(|op| match op.split_once(" more: ") {
            Some((n, _)) => n.trim().parse().unwrap_or(1),
            None => 1,
        })
        .sum()
}

/// `iptables-nft` or `iptables-legacy`: the variant holding our chains in `ns` (asked in this
/// order: looking at legacy first would create an empty legacy table where none existed).
pub fn iptables_variant(net: &TestNet, ns: &str) -> Result<&'static str> {
    for v in ["iptables-nft", "iptables-legacy"] {
        let out = net.exec(ns, &[&format!("{v}-save"), "-t", "mangle"]);
        if out.success() && out.stdout.contains(":ztunnel-PREROUTING") {
            return Ok(v);
        }
    }
    bail!("no iptables variant holds ztunnel-PREROUTING in {ns}")
}

/// A prevResult (1.0.0 layout) as ptp would hand it: host veth, the pod side in `netns`, one IP.
pub fn prev_result(host_if: &str, netns: &Path, ip: &str) -> Value {
    prev_result_ips(host_if, netns, &[ip])
}

/// [`prev_result`] with addresses of either family (IPv4 `/24` via [`crate::world::POD_GW`],
/// IPv6 `/64` via [`crate::world::POD_GW6`]), a default route for each family given.
pub fn prev_result_ips(host_if: &str, netns: &Path, ips: &[&str]) -> Value {
    let mut addrs = Vec::new();
    let mut routes = Vec::new();
    for ip in ips {
        let (len, gw, dst) = if ip.contains(':') {
            (64, crate::world::POD_GW6, "::/0")
        } else {
            (24, crate::world::POD_GW, "0.0.0.0/0")
        };
        addrs.push(json!({"address": format!("{ip}/{len}"), "gateway": gw, "interface": 1}));
        if !routes.contains(&json!({"dst": dst})) {
            routes.push(json!({"dst": dst}));
        }
    }
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": host_if, "mac": "5a:00:00:00:00:01"},
            {"name": "eth0", "mac": "5a:00:00:00:00:02", "sandbox": netns}
        ],
        "ips": addrs,
        "routes": routes,
        "dns": {}
    })
}

/// CNI_ARGS of a Kubernetes pod.
pub fn k8s_args(namespace: &str, name: &str, uid: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}")
}

/// The real plugin binary, run directly (what libcni does) with a config built here.
#[derive(Clone, Debug)]
pub struct DirectPlugin {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The plugin's log file.
    pub log: PathBuf,
    /// Network name.
    pub network: String,
    /// cniVersion of the config.
    pub version: String,
    /// `timeoutMs`.
    pub timeout_ms: u64,
    /// The binary (default: the workspace's `ambient-cni`).
    pub bin: Option<PathBuf>,
    /// Run it through this wrapper (e.g. `setpriv --reuid=65534 ...`).
    pub wrapper: Vec<String>,
}

impl DirectPlugin {
    /// A plugin talking to `socket`, logging to `log`, network `network`, cniVersion 1.0.0,
    /// deadline 5 s.
    pub fn new(socket: &Path, log: &Path, network: &str) -> DirectPlugin {
        DirectPlugin {
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            network: network.to_string(),
            version: "1.0.0".into(),
            timeout_ms: 5000,
            bin: None,
            wrapper: Vec::new(),
        }
    }

    /// The config on stdin, with `extra` keys merged in.
    pub fn conf(&self, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": self.version,
            "name": self.network,
            "type": "ambient-cni",
            "socket": self.socket,
            "logFile": self.log,
            "logLevel": "info",
            "timeoutMs": self.timeout_ms,
        });
        if let (Some(m), Value::Object(e)) = (c.as_object_mut(), extra) {
            m.extend(e);
        }
        c
    }

    /// Runs one verb with exactly this env and stdin.
    pub fn run(&self, env: &[(&str, &str)], stdin: &Value) -> Output {
        let bin = match &self.bin {
            Some(b) => b.clone(),
            None => match workspace_bin("ambient-cni") {
                Ok(b) => b,
                Err(e) => return Output::not_run(&e),
            },
        };
        let stdin = stdin.to_string();
        run_fresh_binary(
            || {
                let mut c = match self.wrapper.split_first() {
                    Some((w, rest)) => {
                        let mut c = Command::new(w);
                        c.args(rest).arg(&bin);
                        c
                    }
                    None => Command::new(&bin),
                };
                c.env_clear().envs(env.iter().copied());
                c
            },
            Some(stdin.as_bytes()),
        )
    }

    /// ADD of a Kubernetes pod with `prev` as prevResult.
    pub fn add(&self, cid: &str, netns: &Path, args: &str, prev: &Value) -> Output {
        let ns = netns.to_string_lossy();
        self.run(
            &env("ADD", cid, &ns, args),
            &self.conf(json!({ "prevResult": prev })),
        )
    }

    /// DEL (with or without prevResult).
    pub fn del(&self, cid: &str, netns: &Path, args: &str, prev: Option<&Value>) -> Output {
        let ns = netns.to_string_lossy();
        let extra = match prev {
            Some(p) => json!({ "prevResult": p }),
            None => json!({}),
        };
        self.run(&env("DEL", cid, &ns, args), &self.conf(extra))
    }

    /// GC (cniVersion 1.1.0) keeping exactly `valid` (container ID, ifname).
    pub fn gc(&self, valid: &[(String, String)]) -> Output {
        let list: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        let mut conf = self.conf(json!({ "cni.dev/valid-attachments": list }));
        conf["cniVersion"] = json!("1.1.0");
        self.run(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/nonexistent")],
            &conf,
        )
    }
}

/// Runs a command whose binary may have been copied just now: while a test thread writes the
/// copy, another thread's fork can inherit the open file for the moment before its exec, and
/// executing the copy then fails with ETXTBSY ("Text file busy"). That is retried.
pub fn run_fresh_binary(mk: impl Fn() -> Command, stdin: Option<&[u8]>) -> Output {
    let mut tries = 0;
    loop {
        let out = run_cmd(&mut mk(), stdin, COMMAND_TIMEOUT);
        let busy = out.stderr.contains("Text file busy") && out.stdout.is_empty();
        if !busy || tries >= 50 {
            return out;
        }
        tries += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The env of a direct ADD/DEL/CHECK.
pub fn env<'a>(
    cmd: &'a str,
    cid: &'a str,
    netns: &'a str,
    args: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/nonexistent"),
    ]
}

/// A unix socket that accepts connections and never answers (a hung daemon).
pub struct HungSocket {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HungSocket {
    /// Binds `path` (which must not exist) and starts accepting.
    pub fn start(path: &Path) -> Result<HungSocket> {
        let l = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(HungSocket {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for HungSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The world's daemon arguments, as `&str`s.
fn world_args(w: &World) -> Vec<&str> {
    w.daemon_args.iter().map(String::as_str).collect()
}

/// Starts the daemon on the world's state dir and socket and waits until it is ready. Returns it
/// with the time from spawn to ready.
pub fn restart_daemon(w: &World) -> Result<(Daemon, Duration)> {
    let t = Instant::now();
    let d = Daemon::start_in(&w.net, "node", &w.daemon_dir, &world_args(w))?;
    d.wait_ready(Duration::from_secs(20))?;
    Ok((d, t.elapsed()))
}

/// Starts `ambient-cnid run` on the world's state dir without waiting for anything (to kill it
/// during its start-up). Returns its pid; the [`TestNet`] reaps it.
pub fn spawn_daemon_raw(w: &World) -> Result<u32> {
    let args: Vec<&str> = world_args(w);
    spawn_daemon_at(&w.net, "node", &w.daemon_dir, &args)
}

/// Starts `ambient-cnid run --socket <dir>/run/cni.sock --state-dir <dir>/state <args>` in `ns`,
/// logging to `<dir>/daemon.log`, without waiting. Returns its pid (`ip netns exec` execs the
/// daemon in place), for signals; the [`TestNet`] reaps it.
pub fn spawn_daemon_at(net: &TestNet, ns: &str, dir: &Path, args: &[&str]) -> Result<u32> {
    std::fs::create_dir_all(dir)?;
    let bin = workspace_bin("ambient-cnid")?;
    let socket = dir.join("run").join("cni.sock");
    let state = dir.join("state");
    let mut argv: Vec<String> = vec![
        bin.to_string_lossy().into_owned(),
        "run".into(),
        "--socket".into(),
        socket.to_string_lossy().into_owned(),
        "--state-dir".into(),
        state.to_string_lossy().into_owned(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    net.spawn(ns, &argv, &dir.join("daemon.log"))
}

/// Waits until a unix socket accepts connections.
pub fn wait_socket(path: &Path, timeout: Duration) -> Result<()> {
    wait_for(timeout, Duration::from_millis(20), || {
        Ok(std::os::unix::net::UnixStream::connect(path).is_ok())
    })
    .with_context(|| format!("{} never accepted", path.display()))
    .map(|_| ())
}

/// Sends `sig` to a pid we started.
pub fn signal(pid: u32, sig: i32) {
    if let Ok(p) = i32::try_from(pid) {
        // SAFETY: kill(2) on a child of ours that the TestNet has not reaped; at worst ESRCH.
        unsafe {
            libc::kill(p, sig);
        }
    }
}

/// SIGKILL to a pid we started.
pub fn kill9(pid: u32) {
    signal(pid, libc::SIGKILL);
}

/// Polls `f` every `every` until it returns true or `timeout` passes; returns the time it took.
pub fn wait_for(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if f()? {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(every);
    }
}

/// Counts of real TCP connections made while something else happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficTally {
    /// Answered by the ztunnel stand-in.
    pub captured: u32,
    /// Answered by the real destination: the redirection was bypassed.
    pub bypassed: u32,
    /// No answer (reset, timeout).
    pub failed: u32,
}

impl std::fmt::Display for TrafficTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "captured={} bypassed={} failed={}",
            self.captured, self.bypassed, self.failed
        )
    }
}

impl TrafficTally {
    /// Adds one connection outcome.
    pub fn record(&mut self, out: &Output) {
        if !out.success() {
            self.failed += 1;
        } else if out.stdout.starts_with("ztunnel ") {
            self.captured += 1;
        } else {
            self.bypassed += 1;
        }
    }

    /// Sum.
    pub fn add(&mut self, o: TrafficTally) {
        self.captured += o.captured;
        self.bypassed += o.bypassed;
        self.failed += o.failed;
    }
}

/// Connects along every `(from namespace, ip:port)` flow, round after round, until `stop` is set
/// (at least one round); returns what it saw. Meant for a scoped thread next to a restart.
pub fn probe_until(w: &World, flows: &[(&str, String)], stop: &AtomicBool) -> TrafficTally {
    let mut t = TrafficTally::default();
    loop {
        for (from, dst) in flows {
            t.record(&w.connect(from, dst, None));
        }
        if stop.load(Ordering::SeqCst) {
            return t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_seeded_and_spreads() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..1000).map(|_| a.below(1200)).collect();
        let ys: Vec<u64> = (0..1000).map(|_| b.below(1200)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 1200));
        let distinct: BTreeSet<u64> = xs.iter().copied().collect();
        assert!(distinct.len() > 500, "{}", distinct.len());
        let hits = (0..10_000).filter(|_| a.chance(0.25)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| a.chance(0.0)));
    }

    #[test]
    fn logged_ops_are_counted() {
        let log = "2025 INFO ambient_cni_daemon::daemon: repair ops=ipset add 10.0.0.1 (owner u)\n\
                   2025 INFO ambient_cni_daemon::daemon: start ops=create ipset; route add \
                   10.0.0.1/32 table 100; 40 more: 20 ipset add, 20 route add\n\
                   2025 INFO ambient_cni_daemon::daemon: repair ops=sysctl x=2\n";
        assert_eq!(count_logged_ops(log, "repair"), 2);
        assert_eq!(count_logged_ops(log, "start"), 42);
        assert_eq!(count_logged_ops(log, "kernel"), 0);
    }
}
