//! `acni-bench`: what ambient-cni adds to a pod start and how the daemon scales with the pods of a
//! node, always next to baselines measured in the same run (the machines are noisy: read ratios).
//!
//! Root only. Everything happens in network namespaces made with the test harness (`node`, a
//! shared pod netns, a ztunnel netns) and goes with them; the machine's root network namespace is
//! never changed. The bench process itself enters the `node` namespace (its own thread only, via
//! `setns`), so every binary it times runs there, as a runtime runs plugins on the node, and none
//! pays for an `ip netns exec`.
//!
//! What is timed (spawn → exit, stdin written and stdout/stderr read through pipes, as a runtime
//! does):
//! - floor: a static C program that reads stdin and exits (compiled here with `gcc -static`);
//! - baseline: a `/bin/sh` plugin doing the same per-pod kernel work with `ipset` and `ip` (on its
//!   own set and table 200), the rp_filter write as a shell builtin, JSON cut with parameter
//!   expansion (no jq: the baseline gets every advantage);
//! - ambient-cni ADD/DEL: the real plugin binary, driven directly (env + stdin with a synthetic
//!   ptp prevResult) against the real daemon, at 10, 100, 1,000 and 10,000 enrolled pods. A node
//!   ztunnel is enrolled first, so every pod ADD programs an ipset entry, a table-100 route and
//!   its host interface's rp_filter. Each pod has its own host interface (an `ifb` link: this
//!   kernel has no dummy driver), as each pod has its veth on a real node, so per-interface costs
//!   (link dumps, sysctls) scale as they would. All pods share one pod netns (the daemon only
//!   checks it exists).
//! - throughput with 1, 4 and 16 parallel callers (while the node fills from 1,000 to 10,000);
//! - reconcile: a no-change resync and the restore after the ipset, our mangle chain and table 100
//!   were flushed (`last_resync` of `ambient-cnid dump`; the daemon restarted with
//!   `--no-event-repair` for it, so that the resync does the whole restore);
//! - daemon RSS idle and at 10,000 pods;
//! - dual stack: at the first level, each round also ADDs and DELs a dual-stack pod (an IPv4 and
//!   an IPv6 address in its prevResult, as ptp + host-local with two range sets hand it; the
//!   ztunnel is dual-stack too, so both families are programmed): its ADD p50 ÷ the IPv4 pod's
//!   ADD p50 of the same rounds.
//! - firewall drivers: after the first level, blocks of ADDs with the daemon restarted on
//!   `--firewall nftables` and `--firewall iptables` in turn (`firewall.rs`): nft ADD p50 ÷
//!   iptables ADD p50.
//!
//! Rounds interleave floor, baseline and plugin so that the machine's noise hits them alike.
//!
//! Usage: `acni-bench [--pods N] [--samples N] [--resync-ms N] [--results FILE] [--quick]`.
#![deny(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambient_cni_tests::{require_root, run_cmd, Daemon, TestNet, COMMAND_TIMEOUT};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The Kubernetes namespace whose pods are enrolled.
const AMBIENT_NS: &str = "default";
/// The node address: gateway of every pod and `src` of the table-100 routes.
const GW: &str = "10.244.0.1";
/// The ztunnel pod.
const ZT_IP: &str = "10.244.0.2";
/// The node's IPv6 address: gateway of the dual-stack pods (a ULA, as the tests use).
const GW6: &str = "fd10:244::1";
/// The ztunnel pod's IPv6 address.
const ZT_IP6: &str = "fd10:244::2";
/// Host interfaces shared by the latency samples (each sample is a new pod).
const SAMPLE_IFS: usize = 8;
/// Samples run before each level's timed rounds (page cache, daemon allocations).
const WARMUP: usize = 10;
/// The baseline's ipset and table (never the daemon's).
const SHELL_SET: &str = "acni-bench-shell";
const SHELL_TABLE: &str = "200";

struct Opts {
    max_pods: usize,
    samples: usize,
    resync_ms: u64,
    results: Option<PathBuf>,
    /// Profiling aid: once the node is full, write a sample pod's env and stdin under the state
    /// dir and wait this long (or until a `done` file appears there) before going on.
    hold: Option<Duration>,
}

impl Opts {
    fn parse() -> Result<Opts> {
        let mut o = Opts {
            max_pods: 10_000,
            samples: 200,
            resync_ms: 2000,
            results: None,
            hold: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut num = |name: &str| -> Result<u64> {
                args.next()
                    .with_context(|| format!("{name} needs a value"))?
                    .parse()
                    .with_context(|| format!("{name} needs a number"))
            };
            match a.as_str() {
                "--pods" => o.max_pods = num("--pods")? as usize,
                "--samples" => o.samples = num("--samples")? as usize,
                "--resync-ms" => o.resync_ms = num("--resync-ms")?,
                "--results" => {
                    o.results = Some(PathBuf::from(
                        args.next().context("--results needs a file")?,
                    ))
                }
                "--hold" => o.hold = Some(Duration::from_secs(num("--hold")?)),
                "--quick" => {
                    o.max_pods = 1000;
                    o.samples = 50;
                }
                "-h" | "--help" => {
                    println!("acni-bench [--pods N] [--samples N] [--resync-ms N] [--results FILE] [--quick]");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (see --help)"),
            }
        }
        if o.max_pods < 10 || o.max_pods > 60_000 || o.samples < 10 {
            bail!("--pods must be 10..60000 and --samples at least 10");
        }
        Ok(o)
    }

    fn levels(&self) -> Vec<usize> {
        let mut l: Vec<usize> = [10, 100, 1000, 10_000]
            .into_iter()
            .filter(|n| *n < self.max_pods)
            .collect();
        l.push(self.max_pods);
        l
    }
}

fn log(msg: impl AsRef<str>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    eprintln!("[{:6.1}s] {}", t.as_secs_f64(), msg.as_ref());
}

// ---------------------------------------------------------------------------------------------
// Timed execution

/// One timed process run.
struct Run {
    took: Duration,
    ok: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "ok={} after {:?}\nstdout: {}\nstderr: {}",
            self.ok,
            self.took,
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

/// Spawns `bin` with exactly `env`, writes `stdin`, reads stdout and stderr to their end and
/// reaps it: what a runtime does per plugin call, with no helper threads in the way. Inputs and
/// outputs are far below a pipe's buffer, so the sequential reads cannot dead-lock.
fn exec(bin: &Path, env: &[(&str, String)], stdin: &[u8]) -> Run {
    let start = Instant::now();
    let child = Command::new(bin)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Run {
                took: start.elapsed(),
                ok: false,
                stdout: vec![],
                stderr: format!("spawn {}: {e}", bin.display()).into_bytes(),
            }
        }
    };
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    let ok = child.wait().map(|s| s.success()).unwrap_or(false);
    Run {
        took: start.elapsed(),
        ok,
        stdout,
        stderr,
    }
}

/// p50 and p99 (nearest rank).
#[derive(Clone, Copy, Default)]
struct Pct {
    p50: Duration,
    p99: Duration,
}

fn pct(v: &[Duration]) -> Pct {
    let mut s = v.to_vec();
    s.sort();
    let at = |p: f64| {
        let n = s.len();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        s[rank - 1]
    };
    Pct {
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------------
// Pods

/// A pod as the runtime would describe it after ptp: identity, address, host interface.
struct PodSpec {
    cid: String,
    name: String,
    uid: String,
    k8s_ns: String,
    ip: String,
    /// The IPv6 address of a dual-stack pod.
    ip6: Option<String>,
    host_if: String,
}

impl PodSpec {
    /// Pod `i` of the node's population: 10.201.0.0/16, host interface `bp<i>`.
    fn member(i: usize) -> PodSpec {
        PodSpec {
            cid: format!("bench{i:08}"),
            name: format!("p{i}"),
            uid: format!("uid-p{i}"),
            k8s_ns: AMBIENT_NS.into(),
            ip: addr(201, i),
            ip6: None,
            host_if: format!("bp{i}"),
        }
    }

    /// Latency sample `k` (a new pod each time): 10.202.0.0/16, one of a few shared interfaces.
    fn sample(k: usize) -> PodSpec {
        PodSpec {
            cid: format!("sample{k:08}"),
            name: format!("s{k}"),
            uid: format!("uid-s{k}"),
            k8s_ns: AMBIENT_NS.into(),
            ip: addr(202, k),
            ip6: None,
            host_if: format!("bs{}", k % SAMPLE_IFS),
        }
    }

    /// Dual-stack latency sample `k`: 10.203.0.0/16 and fd10:203::/64, a shared interface.
    fn sample_dual(k: usize) -> PodSpec {
        PodSpec {
            cid: format!("dual{k:08}"),
            name: format!("d{k}"),
            uid: format!("uid-d{k}"),
            k8s_ns: AMBIENT_NS.into(),
            ip: addr(203, k),
            ip6: Some(format!("fd10:203::{:x}", k + 1)),
            host_if: format!("bs{}", k % SAMPLE_IFS),
        }
    }

    fn ztunnel() -> PodSpec {
        PodSpec {
            cid: "ztunnel0".into(),
            name: "ztunnel-bench".into(),
            uid: "uid-ztunnel".into(),
            k8s_ns: "istio-system".into(),
            ip: ZT_IP.into(),
            ip6: Some(ZT_IP6.into()),
            host_if: "vzt".into(),
        }
    }

    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.k8s_ns, self.name, self.cid, self.uid
        )
    }
}

/// `10.<block>.<i/250>.<i%250+1>`: 62,500 addresses per block.
fn addr(block: u8, i: usize) -> String {
    format!("10.{block}.{}.{}", (i / 250) % 256, i % 250 + 1)
}

// ---------------------------------------------------------------------------------------------
// The shell baseline

/// A CNI plugin in `sh` that does the per-pod kernel work with the usual tools: rp_filter (a
/// builtin write), a table route with `ip`, an ipset entry with `ipset`. It cuts the JSON with
/// parameter expansion instead of running jq, which would cost it one more exec.
fn shell_plugin() -> String {
    format!(
        r#"#!/bin/sh
# Baseline CNI plugin: the same per-pod kernel work as ambient-cnid, with ipset and ip.
IFS= read -r in
ip=${{in#*\"address\":\"}}; ip=${{ip%%/*}}
host=${{in#*\"interfaces\":\[\{{\"name\":\"}}; host=${{host%%\"*}}
uid=${{CNI_ARGS#*K8S_POD_UID=}}; uid=${{uid%%;*}}
case "$CNI_COMMAND" in
ADD)
  echo 2 > /proc/sys/net/ipv4/conf/$host/rp_filter || exit 1
  ip route replace $ip/32 via 192.168.126.2 dev istioin src {GW} table {SHELL_TABLE} proto 213 || exit 1
  ipset -exist add {SHELL_SET} $ip comment "$uid" || exit 1
  prev=${{in#*\"prevResult\":}}
  printf '%s\n' "${{prev%\}}}}"
  ;;
DEL)
  ipset -exist del {SHELL_SET} $ip
  ip route del $ip/32 table {SHELL_TABLE} proto 213 2>/dev/null
  exit 0
  ;;
esac
"#
    )
}

// ---------------------------------------------------------------------------------------------
// The world

struct Bench {
    /// The netns this process started in: re-entered before the namespaces are deleted (the
    /// harness kills every process left in them, and that would include us).
    #[allow(dead_code)] // held for its Drop
    home: HomeNs,
    net: TestNet,
    daemon: Daemon,
    /// The daemon's flags (a restart adds to them).
    daemon_args: Vec<String>,
    /// Our state dir on tmpfs (removed at the end).
    shm: PathBuf,
    plugin: PathBuf,
    floor: PathBuf,
    shell: PathBuf,
    pod_netns: String,
    zt_netns: String,
    /// Pods of the population enrolled so far (`bp0..`).
    pods: usize,
    /// Latency samples used so far.
    samples: usize,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.daemon.stop();
        if std::env::var_os("ACNI_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.shm);
        }
    }
}

/// The netns this process started in; re-entered on drop.
struct HomeNs(File);

impl Drop for HomeNs {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(&self.0, nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("acni-bench: cannot leave the node netns: {e}");
        }
    }
}

/// Removes state dirs of earlier runs that died (`/dev/shm/acni-bench-<pid>`).
fn sweep_stale_shm() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("acni-bench-")
            .and_then(|p| p.parse::<u32>().ok())
        {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Runs a command in the bench's own netns (the node's); an error unless it exits 0.
fn sh_ok(argv: &[&str]) -> Result<String> {
    let (bin, rest) = argv.split_first().context("empty command")?;
    let out = run_cmd(Command::new(bin).args(rest), None, COMMAND_TIMEOUT);
    if !out.success() {
        bail!("{argv:?} failed:\n{out}");
    }
    Ok(out.stdout)
}

fn enter_netns(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns {}", path.display()))?;
    Ok(())
}

fn build_floor(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("floor.c");
    std::fs::write(
        &src,
        "#include <unistd.h>\nint main(void){char b[4096];while(read(0,b,sizeof b)>0){}return 0;}\n",
    )?;
    let bin = dir.join("floor");
    let out = run_cmd(
        Command::new("gcc")
            .args(["-O2", "-static", "-o"])
            .arg(&bin)
            .arg(&src),
        None,
        COMMAND_TIMEOUT,
    );
    if !out.success() {
        bail!("gcc -static failed (install gcc and libc6-dev):\n{out}");
    }
    Ok(bin)
}

impl Bench {
    fn new(opts: &Opts) -> Result<Bench> {
        let bin_dir = ambient_cni_tests::bin_dir()?;
        let plugin = bin_dir.join("ambient-cni");
        if !plugin.is_file() {
            bail!("{} not built", plugin.display());
        }
        let net = TestNet::new("bench");
        // Declared after `net`, so dropped before it, also when set-up fails half-way.
        let home = HomeNs(File::open("/proc/thread-self/ns/net").context("open own netns")?);
        for ns in ["node", "pods", "zt"] {
            net.add_ns(ns)?;
            // The tunnels' IPv6 addresses must not wait for DAD (never the root namespace).
            net.enable_ipv6(ns)?;
        }
        // From here on this process (and every child it starts) lives in the bench's node netns.
        enter_netns(&net.ns_path("node"))?;

        // The ztunnel's veth, as ptp would make it, and the node address pods use as gateway.
        net.veth("node", "vzt", "zt", "eth0")?;
        sh_ok(&["ip", "addr", "add", &format!("{GW}/32"), "dev", "vzt"])?;
        sh_ok(&["ip", "route", "add", &format!("{ZT_IP}/32"), "dev", "vzt"])?;
        net.exec_ok(
            "zt",
            &["ip", "addr", "add", &format!("{ZT_IP}/24"), "dev", "eth0"],
        )?;
        // Dual stack: the ztunnel's and the gateway's IPv6 addresses, as ptp sets them.
        sh_ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{GW6}/128"),
            "dev",
            "vzt",
            "nodad",
        ])?;
        sh_ok(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{ZT_IP6}/128"),
            "dev",
            "vzt",
        ])?;
        net.exec_ok(
            "zt",
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{ZT_IP6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;

        // One host interface per pod of the population, plus the samples'.
        let n_if = opts.max_pods;
        let t = Instant::now();
        let mut batch = String::new();
        for i in 0..n_if {
            let _ = writeln!(batch, "link add bp{i} type ifb");
        }
        for k in 0..SAMPLE_IFS {
            let _ = writeln!(batch, "link add bs{k} type ifb");
        }
        let batch_file = net.dir().join("links.batch");
        std::fs::write(&batch_file, batch)?;
        sh_ok(&["ip", "-batch", batch_file.to_str().context("path")?])?;
        log(format!(
            "{} host interfaces made in {:?}",
            n_if + SAMPLE_IFS,
            t.elapsed()
        ));

        // The baseline's own set.
        sh_ok(&["ipset", "create", SHELL_SET, "hash:ip", "comment"])?;

        sweep_stale_shm();
        let shm = PathBuf::from(format!("/dev/shm/acni-bench-{}", std::process::id()));
        std::fs::create_dir_all(&shm)?;
        let daemon_args: Vec<String> = [
            "--ambient-namespace",
            AMBIENT_NS,
            "--resync-interval-ms",
            &opts.resync_ms.to_string(),
        ]
        .map(String::from)
        .into();
        let args: Vec<&str> = daemon_args.iter().map(String::as_str).collect();
        let daemon = Daemon::start_in(&net, "node", &shm.join("daemon"), &args)?;
        daemon.wait_ready(Duration::from_secs(20))?;

        let floor = build_floor(net.dir())?;
        let shell = net.dir().join("shell-plugin");
        std::fs::write(&shell, shell_plugin())?;
        std::fs::set_permissions(&shell, std::fs::Permissions::from_mode(0o755))?;
        let pod_netns = net.ns_path("pods").display().to_string();
        let zt_netns = net.ns_path("zt").display().to_string();
        Ok(Bench {
            home,
            net,
            daemon,
            daemon_args,
            shm,
            plugin,
            floor,
            shell,
            pod_netns,
            zt_netns,
            pods: 0,
            samples: 0,
        })
    }

    /// Stops the daemon and starts it again on the same state dir with `extra` flags added.
    fn restart_daemon(&mut self, extra: &[&str]) -> Result<()> {
        self.daemon.stop();
        let mut args: Vec<&str> = self.daemon_args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        self.daemon = Daemon::start_in(&self.net, "node", &self.shm.join("daemon"), &args)?;
        self.daemon.wait_ready(Duration::from_secs(20))
    }

    fn conf(&self, p: &PodSpec, netns: &str) -> Vec<u8> {
        let mut ips =
            vec![json!({"address": format!("{}/16", p.ip), "gateway": GW, "interface": 1})];
        let mut routes = vec![json!({"dst": "0.0.0.0/0", "gw": GW})];
        if let Some(ip6) = &p.ip6 {
            ips.push(json!({"address": format!("{ip6}/64"), "gateway": GW6, "interface": 1}));
            routes.push(json!({"dst": "::/0", "gw": GW6}));
        }
        let doc = json!({
            "cniVersion": "1.0.0",
            "name": "acni-bench",
            "type": "ambient-cni",
            "socket": self.daemon.socket(),
            "timeoutMs": 5000,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": p.host_if, "mac": "0a:58:0a:f4:00:01"},
                    {"name": "eth0", "mac": "0a:58:0a:f4:00:02", "sandbox": netns}
                ],
                "ips": ips,
                "routes": routes,
                "dns": {}
            }
        });
        let mut v = doc.to_string().into_bytes();
        v.push(b'\n');
        v
    }

    fn env(&self, cmd: &str, p: &PodSpec, netns: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", p.cid.clone()),
            ("CNI_NETNS", netns.to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_ARGS", p.cni_args()),
            ("CNI_PATH", "/opt/cni/bin".to_string()),
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
        ]
    }

    /// One plugin (or baseline) call for pod `p`; an error unless it succeeded.
    fn call(&self, bin: &Path, cmd: &str, p: &PodSpec, netns: &str) -> Result<Duration> {
        let r = exec(bin, &self.env(cmd, p, netns), &self.conf(p, netns));
        if !r.ok {
            bail!("{} {cmd} {}: {}", bin.display(), p.name, r.describe());
        }
        if cmd == "ADD" {
            let v: Value = serde_json::from_slice(&r.stdout).with_context(|| {
                format!("{cmd} {}: stdout is not JSON: {}", p.name, r.describe())
            })?;
            let v6_ok = match &p.ip6 {
                Some(ip6) => v["ips"][1]["address"].as_str() == Some(&format!("{ip6}/64")),
                None => true,
            };
            if v["ips"][0]["address"].as_str() != Some(&format!("{}/16", p.ip)) || !v6_ok {
                bail!(
                    "{cmd} {}: result is not the prevResult: {}",
                    p.name,
                    r.describe()
                );
            }
        }
        Ok(r.took)
    }

    /// The plugin without a daemon call (CNI VERSION): its start-up alone.
    fn version_once(&self) -> Result<Duration> {
        let env = [
            ("CNI_COMMAND", "VERSION".to_string()),
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ];
        let r = exec(&self.plugin, &env, b"{\"cniVersion\":\"1.0.0\"}\n");
        if !r.ok {
            bail!("plugin VERSION: {}", r.describe());
        }
        Ok(r.took)
    }

    /// The plugin with one gRPC round trip that does no kernel work (CNI STATUS).
    fn status_once(&self) -> Result<Duration> {
        let conf = json!({"cniVersion": "1.1.0", "name": "acni-bench", "type": "ambient-cni",
            "socket": self.daemon.socket(), "timeoutMs": 5000});
        let env = [
            ("CNI_COMMAND", "STATUS".to_string()),
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ];
        let r = exec(&self.plugin, &env, format!("{conf}\n").as_bytes());
        if !r.ok {
            bail!("plugin STATUS: {}", r.describe());
        }
        Ok(r.took)
    }

    fn floor_once(&self) -> Result<Duration> {
        let r = exec(
            &self.floor,
            &[],
            &self.conf(&PodSpec::sample(0), &self.pod_netns),
        );
        if !r.ok {
            bail!("floor: {}", r.describe());
        }
        Ok(r.took)
    }

    /// ADDs pods `self.pods .. self.pods + n` with `callers` parallel callers; returns the wall
    /// time.
    fn add_pods(&mut self, n: usize, callers: usize) -> Result<Duration> {
        let first = self.pods;
        let next = AtomicUsize::new(first);
        let end = first + n;
        let start = Instant::now();
        let this = &*self;
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..callers)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= end {
                                return Ok(());
                            }
                            this.call(&this.plugin, "ADD", &PodSpec::member(i), &this.pod_netns)?;
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("caller panicked".into()),
                })
                .collect()
        });
        let took = start.elapsed();
        if let Some(e) = errors.first() {
            bail!("{} of {callers} callers failed; first: {e}", errors.len());
        }
        self.pods = end;
        Ok(took)
    }

    /// Writes `env` (sourceable) and `stdin.json` of a new sample pod under `<state>/hold`, then
    /// waits: the profiling aid behind `--hold`.
    fn hold(&mut self, d: Duration) -> Result<()> {
        let p = PodSpec::sample(60_000);
        let dir = self.shm.join("hold");
        std::fs::create_dir_all(&dir)?;
        let mut env = String::new();
        for (k, v) in self.env("ADD", &p, &self.pod_netns) {
            let _ = writeln!(env, "export {k}='{v}'");
        }
        std::fs::write(dir.join("env"), env)?;
        std::fs::write(dir.join("stdin.json"), self.conf(&p, &self.pod_netns))?;
        log(format!(
            "holding {d:?} (or until {}/done exists): node netns {}, daemon pid {:?}, plugin {}, floor {}, shell {}, files in {}",
            dir.display(),
            self.net.full_name("node"),
            self.daemon_pid(),
            self.plugin.display(),
            self.floor.display(),
            self.shell.display(),
            dir.display()
        ));
        let end = Instant::now() + d;
        while Instant::now() < end && !dir.join("done").exists() {
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn daemon_pid(&self) -> Option<i32> {
        let sock = self.daemon.socket().to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_daemon = args.first().is_some_and(|a| a.ends_with("ambient-cnid"));
            if is_daemon && args.contains(&sock) {
                return Some(pid);
            }
        }
        None
    }

    /// VmRSS of the daemon, in KiB.
    fn rss_kib(&self) -> Result<u64> {
        self.status_kib("VmRSS:")
    }

    /// A `/proc/<pid>/status` size of the daemon, in KiB.
    fn status_kib(&self, key: &str) -> Result<u64> {
        let pid = self.daemon_pid().context("cannot find the daemon's pid")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {key}"))
    }

    /// Resets the daemon's peak RSS (VmHWM) to its current RSS (`clear_refs` 5).
    fn reset_peak(&self) -> Result<()> {
        let pid = self.daemon_pid().context("cannot find the daemon's pid")?;
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .context("resetting the daemon's VmHWM")
    }

    /// `last_resync` from `ambient-cnid dump`: (unix_ms, repaired, micros, errors).
    fn last_resync(&self) -> Result<(u64, u64, u64, usize)> {
        let d = self.daemon.dump_json()?;
        let r = &d["last_resync"];
        Ok((
            r["unix_ms"].as_u64().unwrap_or(0),
            r["repaired"].as_u64().unwrap_or(0),
            r["micros"].as_u64().unwrap_or(0),
            r["errors"].as_array().map(Vec::len).unwrap_or(0),
        ))
    }

    fn ipset_entries(&self) -> Result<usize> {
        let out = sh_ok(&["ipset", "list", "-t", "ztunnel-pods-ips"])?;
        out.lines()
            .find_map(|l| l.strip_prefix("Number of entries:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no entry count in `ipset list -t`")
    }

    /// The dual-stack figure times real work: the pod's IPv6 address has its table-100 route.
    fn check_dual_programmed(&self, p: &PodSpec) -> Result<()> {
        let ip6 = p.ip6.as_deref().context("not a dual-stack pod")?;
        let routes = sh_ok(&["ip", "-6", "route", "show", "table", "100"])?;
        if !routes
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ip6))
        {
            bail!(
                "dual-stack pod {}: no IPv6 table-100 route for {ip6} after its ADD (does the daemon handle IPv6?):\n{routes}",
                p.name
            );
        }
        Ok(())
    }

    /// The iptables binary of the variant holding our node chains.
    fn iptables_bin(&self) -> Result<&'static str> {
        for (save, bin) in [
            ("iptables-nft-save", "iptables-nft"),
            ("iptables-legacy-save", "iptables-legacy"),
        ] {
            if let Ok(out) = sh_ok(&[save, "-t", "mangle"]) {
                if out.contains(":ztunnel-PREROUTING") {
                    return Ok(bin);
                }
            }
        }
        bail!("no ztunnel-PREROUTING chain in mangle (nft or legacy)")
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

#[derive(Default)]
struct Level {
    pods: usize,
    add: Pct,
    del: Pct,
    /// The floor in this level's rounds: how noisy the machine was meanwhile.
    floor: Pct,
    /// The daemon's CPU time per plugin ADD and DEL (p50): on-CPU time of all its threads.
    cpu_add: Option<Duration>,
    cpu_del: Option<Duration>,
}

#[derive(Default)]
struct Results {
    floor: Pct,
    version: Pct,
    status: Pct,
    /// The daemon's CPU time per STATUS call (p50), first level.
    cpu_status: Option<Duration>,
    shell_add: Pct,
    shell_del: Pct,
    levels: Vec<Level>,
    /// (callers, ADDs, wall time, pods before, pods after)
    throughput: Vec<(usize, usize, Duration, usize, usize)>,
    restore: Option<(u64, u64, usize)>,
    /// How many complete restores the median is of.
    restores: usize,
    nochange: Option<u64>,
    /// ADD of a dual-stack pod, and of the IPv4 pod of the same rounds (first level).
    dual_add: Pct,
    dual_v4_add: Pct,
    /// ADD on each firewall driver (first level, blocks of its own).
    firewall: firewall::FirewallCost,
    rss_idle_kib: u64,
    rss_full_kib: u64,
    max_pods: usize,
}

/// Interleaved rounds at the current population: floor, baseline ADD, plugin ADD, plugin DEL,
/// baseline DEL. The sample pod is new each round and gone at the end of it.
/// Samples pooled over all levels.
#[derive(Default)]
struct Pool {
    floor: Vec<Duration>,
    version: Vec<Duration>,
    status: Vec<Duration>,
    /// The daemon's CPU time per STATUS call, first level.
    cpu_status: Vec<Duration>,
    sadd: Vec<Duration>,
    sdel: Vec<Duration>,
}

fn rounds(
    b: &mut Bench,
    n: usize,
    pool: &mut Pool,
    mut dual: Option<&mut Vec<Duration>>,
) -> Result<Level> {
    let mut add = Vec::with_capacity(n);
    let mut del = Vec::with_capacity(n);
    let (mut cpu_add, mut cpu_del) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let first = pool.floor.len();
    let first_level = first == 0;
    let pid = b.daemon_pid();
    // The daemon's on-CPU time across one call (read outside the timed region; the daemon is
    // idle between calls, so a periodic resync is the only other thing counted: p50 hides it).
    let cpu = |what: &mut dyn FnMut() -> Result<Duration>| -> Result<(Duration, Option<Duration>)> {
        let before = pid.and_then(daemon_cpu_ns);
        let took = what()?;
        let after = pid.and_then(daemon_cpu_ns);
        let used = before
            .zip(after)
            .map(|(x, y)| Duration::from_nanos(y.saturating_sub(x)));
        Ok((took, used))
    };
    for r in 0..WARMUP + n {
        let p = PodSpec::sample(b.samples);
        b.samples += 1;
        let f = b.floor_once()?;
        let v = b.version_once()?;
        let (st, cpu_st) = cpu(&mut || b.status_once())?;
        let sa = b.call(&b.shell, "ADD", &p, &b.pod_netns)?;
        let (a, cpu_a) = cpu(&mut || b.call(&b.plugin, "ADD", &p, &b.pod_netns))?;
        let (d, cpu_d) = cpu(&mut || b.call(&b.plugin, "DEL", &p, &b.pod_netns))?;
        let sd = b.call(&b.shell, "DEL", &p, &b.pod_netns)?;
        // A dual-stack pod in the same round, right after the IPv4 one.
        let dual_add = if dual.is_some() {
            let q = PodSpec::sample_dual(b.samples);
            let a = b.call(&b.plugin, "ADD", &q, &b.pod_netns)?;
            if r == 0 {
                b.check_dual_programmed(&q)?;
            }
            b.call(&b.plugin, "DEL", &q, &b.pod_netns)?;
            Some(a)
        } else {
            None
        };
        if let (true, Some(v), Some(a)) = (r >= WARMUP, dual.as_deref_mut(), dual_add) {
            v.push(a);
        }
        if r >= WARMUP {
            pool.floor.push(f);
            pool.version.push(v);
            pool.status.push(st);
            pool.sadd.push(sa);
            pool.sdel.push(sd);
            add.push(a);
            del.push(d);
            cpu_add.extend(cpu_a);
            cpu_del.extend(cpu_d);
            if first_level {
                pool.cpu_status.extend(cpu_st);
            }
        }
    }
    Ok(Level {
        pods: b.pods,
        add: pct(&add),
        del: pct(&del),
        floor: pct(pool.floor.get(first..).unwrap_or(&[])),
        cpu_add: p50(&cpu_add),
        cpu_del: p50(&cpu_del),
    })
}

/// On-CPU time of every thread of `pid` so far, in ns (the first field of each task's
/// `schedstat`): exact, where `/proc/<pid>/stat` counts in 10 ms ticks.
fn daemon_cpu_ns(pid: i32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// [`pct`]'s p50, or `None` without samples (the daemon's pid or schedstat was not readable).
fn p50(v: &[Duration]) -> Option<Duration> {
    (!v.is_empty()).then(|| pct(v).p50)
}

fn reconcile(b: &Bench, r: &mut Results, resync_ms: u64) -> Result<()> {
    let interval = Duration::from_millis(resync_ms);
    // No-change resyncs: the latest ones, after the node has been quiet for a while.
    let mut nochange = Vec::new();
    let mut seen = 0;
    let deadline = Instant::now() + interval * 8;
    while nochange.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(interval / 2);
        let (at, repaired, micros, errors) = b.last_resync()?;
        if at != seen && repaired == 0 && errors == 0 {
            nochange.push(micros);
        }
        seen = at;
    }
    nochange.sort();
    r.nochange = nochange.get(nochange.len() / 2).copied();
    log(format!("no-change resyncs: {nochange:?} µs"));

    // Restore after a flush of the ipset, our mangle chain and table 100.
    // Three complete restores (a flush that straddles a resync is retried); the median counts.
    let ipt = b.iptables_bin()?;
    let want = b.pods;
    let mut done = Vec::new();
    for attempt in 0..6 {
        let t = Instant::now();
        sh_ok(&["ipset", "flush", "ztunnel-pods-ips"])?;
        sh_ok(&[ipt, "-t", "mangle", "-F", "ztunnel-PREROUTING"])?;
        sh_ok(&["ip", "route", "flush", "table", "100"])?;
        let flushed = t.elapsed();
        let deadline = Instant::now() + interval * 3 + Duration::from_secs(30);
        loop {
            if b.ipset_entries()? >= want {
                break;
            }
            if Instant::now() > deadline {
                bail!("the daemon did not restore {want} ipset entries");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen_after = t.elapsed();
        // Let the resync finish (the ipset entries are its last step), then read what it did.
        std::thread::sleep(Duration::from_millis(50));
        let (_, repaired, micros, errors) = b.last_resync()?;
        log(format!(
            "restore attempt {attempt}: flush took {flushed:?}, ipset full {seen_after:?} after the flush began; \
             last resync repaired {repaired} in {micros} µs ({errors} errors)"
        ));
        // Every entry and route (plus the chain): else the flush straddled a resync, retry.
        if repaired as usize >= 2 * want {
            done.push((micros, repaired, errors));
            if done.len() == 3 {
                break;
            }
        }
        std::thread::sleep(interval);
    }
    done.sort();
    r.restore = done.get(done.len() / 2).copied();
    r.restores = done.len();
    Ok(())
}

fn run(opts: &Opts) -> Result<Results> {
    let mut b = Bench::new(opts)?;
    let mut r = Results {
        max_pods: opts.max_pods,
        ..Results::default()
    };
    r.rss_idle_kib = b.rss_kib()?;
    log(format!("daemon ready, RSS idle {} KiB", r.rss_idle_kib));

    // The node's ztunnel first: from then on every pod ADD also programs a table-100 route.
    let zt = PodSpec::ztunnel();
    let t = b.call(&b.plugin, "ADD", &zt, &b.zt_netns.clone())?;
    log(format!("ztunnel enrolled in {t:?}"));

    let mut pool = Pool::default();
    for level in opts.levels() {
        // Fill the node up to `level`. Between 1,000 and 10,000 pods this is the throughput test.
        let missing = level - b.pods;
        if b.pods >= 1000 && missing >= 900 {
            let parts = [(1, missing / 9), (4, missing * 4 / 9)];
            let mut done = 0;
            for (callers, n) in parts.into_iter().chain([(16, 0)]) {
                let n = if callers == 16 { missing - done } else { n };
                let before = b.pods;
                let took = b.add_pods(n, callers)?;
                done += n;
                log(format!(
                    "{n} ADDs with {callers} callers in {took:?}: {:.0}/s",
                    n as f64 / took.as_secs_f64()
                ));
                r.throughput.push((callers, n, took, before, b.pods));
            }
        } else if missing > 0 {
            let took = b.add_pods(missing, 4)?;
            log(format!("filled to {} pods in {took:?}", b.pods));
        }
        // The dual-stack figure at the first level only (a small node, like the floor ratio).
        let mut dual = Vec::new();
        let first_level = r.levels.is_empty();
        let lv = rounds(
            &mut b,
            opts.samples,
            &mut pool,
            first_level.then_some(&mut dual),
        )?;
        if first_level {
            r.dual_add = pct(&dual);
            r.dual_v4_add = lv.add;
            log(format!(
                "{} pods: dual-stack ADD p50 {} ms p99 {} ms (IPv4 ADD p50 {} ms in the same rounds)",
                lv.pods,
                ms(r.dual_add.p50),
                ms(r.dual_add.p99),
                ms(lv.add.p50)
            ));
        }
        log(format!(
            "{} pods: ADD p50 {} ms p99 {} ms, DEL p50 {} ms p99 {} ms",
            lv.pods,
            ms(lv.add.p50),
            ms(lv.add.p99),
            ms(lv.del.p50),
            ms(lv.del.p99)
        ));
        r.levels.push(lv);
        if first_level {
            r.firewall = firewall::compare(&mut b, opts.samples)?;
        }
    }
    if let Some(h) = opts.hold {
        b.hold(h)?;
    }
    r.floor = pct(&pool.floor);
    // From the first level: STATUS also counts the daemon's pods, which takes longer at 10,000.
    let first = opts.samples.min(pool.status.len());
    r.version = pct(pool.version.get(..first).unwrap_or(&[]));
    r.status = pct(pool.status.get(..first).unwrap_or(&[]));
    r.cpu_status = p50(&pool.cpu_status);
    r.shell_add = pct(&pool.sadd);
    r.shell_del = pct(&pool.sdel);
    // The kernel's high-water mark over two resync intervals (reset first): a resync allocates,
    // then gives back, faster than any sampling would see.
    b.reset_peak()?;
    let before = b.rss_kib()?;
    std::thread::sleep(Duration::from_millis(2 * opts.resync_ms + 200));
    r.rss_full_kib = b.status_kib("VmHWM:")?;
    log(format!(
        "daemon RSS at {} pods: peak {} KiB over two resyncs, {} KiB before, {} KiB after",
        b.pods,
        r.rss_full_kib,
        before,
        b.rss_kib()?
    ));
    // The restore figure is the periodic resync's: without event repair, which would put the
    // flushed table-100 routes back from rtnetlink events before the resync (and split the work
    // over two reconciles).
    b.restart_daemon(&["--no-event-repair"])?;
    reconcile(&b, &mut r, opts.resync_ms)?;
    let errors = b
        .daemon
        .log_text()
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .count();
    if errors > 0 {
        log(format!("the daemon logged {errors} errors (see its log)"));
    }
    drop(b);
    Ok(r)
}

mod firewall;
mod report;
use report::{loadavg, machine, table};

fn main() -> ExitCode {
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("acni-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !require_root() {
        eprintln!("acni-bench: needs root (it builds network namespaces)");
        return ExitCode::from(2);
    }
    // The binaries next to this one (target/release), unless the caller says otherwise.
    if std::env::var_os("AMBIENT_CNI_BIN_DIR").is_none() {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            std::env::set_var("AMBIENT_CNI_BIN_DIR", dir);
        }
    }
    let load_at_start = loadavg();
    log(format!(
        "acni-bench: up to {} pods, {} samples per level, resync every {} ms",
        opts.max_pods, opts.samples, opts.resync_ms
    ));
    let r = match run(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("acni-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let machine = machine(&load_at_start);
    let head = format!(
        "ambient-cni bench: {machine}; daemon state dir on tmpfs (/dev/shm); {} timed rounds per level",
        opts.samples
    );
    let tbl = table(&r, &opts);
    println!("\n{head}\n\n{tbl}");
    if let Some(path) = &opts.results {
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmark results\n");
        let _ = writeln!(md, "Machine: {machine}.\n");
        let _ = writeln!(
            md,
            "Produced by `make bench` (`tests/src/bin/acni-bench/`). Every figure comes from one run; \
             floor, baseline and plugin calls are interleaved round by round, so read the ratios. \
             Latencies are spawn → exit of the binary with stdin/stdout/stderr on pipes, as a runtime \
             runs a plugin. The daemon (`--resync-interval-ms {}`) keeps its state dir on tmpfs \
             (`/dev/shm`). Each pod has its own host interface; the node's ztunnel is enrolled, so \
             an ADD programs an ipset entry, a table-100 route and an rp_filter write.\n",
            opts.resync_ms
        );
        let _ = writeln!(md, "{tbl}");
        if let Err(e) = std::fs::write(path, md) {
            eprintln!("acni-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        log(format!("results written to {}", path.display()));
    }
    ExitCode::SUCCESS
}
