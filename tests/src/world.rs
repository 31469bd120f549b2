//! The end-to-end world of the traffic tests, the chaos test and the benchmarks: a node netns
//! running the daemon, a remote host behind a veth, pods made through libcni (our cnitool driver,
//! Debian ptp + host-local + ambient-cni), a ztunnel stand-in with TPROXY listeners, and echo
//! servers. Everything lives in the [`TestNet`]'s namespaces and goes with it.
//!
//! A world is of one [`Family`]: IPv4 ([`World::new`], as the other suites use it), IPv6 only or
//! dual stack ([`World::with_family`]). An IPv6 world turns IPv6 on without duplicate address
//! detection in each of its namespaces (never in the root namespace), gives the node↔remote link
//! ULA addresses ([`NODE_IP6`], [`REMOTE_IP6`]), forwards IPv6 in the node and hands the pods
//! addresses of [`POD_CIDR6`] through host-local (a second range set when dual stack).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use std::process::Command;

use crate::{run_cmd, workspace_bin, CniEnv, Daemon, Output, TestNet};

/// Our conflist entry as the installer writes it for these settings.
fn ambient_entry_of(socket: &std::path::Path, log: &std::path::Path) -> Value {
    json!({"type": "ambient-cni", "socket": socket, "logFile": log, "logLevel": "debug"})
}

/// Node side of the node↔remote link.
pub const NODE_IP: &str = "198.51.100.1";
/// The remote host (outside the node).
pub const REMOTE_IP: &str = "198.51.100.2";
/// Pod CIDR of the node.
pub const POD_CIDR: &str = "10.244.1.0/24";
/// Gateway of the pods (ptp puts it on every host veth).
pub const POD_GW: &str = "10.244.1.1";
/// Node side of the node↔remote link, IPv6 (a ULA: never routed outside the namespaces).
pub const NODE_IP6: &str = "fd00:198:51:100::1";
/// The remote host, IPv6.
pub const REMOTE_IP6: &str = "fd00:198:51:100::2";
/// IPv6 pod CIDR of the node.
pub const POD_CIDR6: &str = "fd10:244:1::/64";
/// IPv6 gateway of the pods (host-local's default: the range's first address; ptp puts it on
/// every host veth).
pub const POD_GW6: &str = "fd10:244:1::1";
/// The namespace whose pods are enrolled.
pub const AMBIENT_NS: &str = "default";
/// The CNI network name.
pub const NETWORK: &str = "acni-net";

/// The firewall driver a world's daemon runs with (`--firewall`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firewall {
    /// iptables + ipset (the daemon's default).
    Iptables,
    /// Native nftables: one `inet ambient-cni` table.
    Nftables,
}

thread_local! {
    static FIREWALL: std::cell::Cell<Firewall> = const { std::cell::Cell::new(Firewall::Iptables) };
}

/// Runs `f` with every [`World`] it builds on this thread using firewall `fw` (libtest runs each
/// test on a thread of its own): the same test body, run once per firewall.
pub fn on_firewall<T>(fw: Firewall, f: impl FnOnce() -> T) -> T {
    let before = FIREWALL.with(|c| c.replace(fw));
    let out = f();
    FIREWALL.with(|c| c.set(before));
    out
}

/// The firewall worlds built on this thread use.
pub fn current_firewall() -> Firewall {
    FIREWALL.with(|c| c.get())
}

/// The name of our nft table (family inet).
pub const NFT_TABLE: &str = "ambient-cni";

/// The address families of a world's node, remote host and pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4 only (the default world).
    V4,
    /// IPv6 only: no IPv4 address on the node↔remote link, pods get IPv6 addresses only.
    V6,
    /// Dual stack: both, every pod gets one address of each family.
    Dual,
}

impl Family {
    /// IPv4 addresses exist.
    pub fn has_v4(self) -> bool {
        self != Family::V6
    }

    /// IPv6 addresses exist.
    pub fn has_v6(self) -> bool {
        self != Family::V4
    }
}

/// `ip:port`, or `[ip]:port` for an IPv6 address (what `acni-probe connect` and the answers use).
pub fn hostport(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// One pod made through libcni.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Short netns name in the TestNet.
    pub netns: String,
    /// Kubernetes namespace.
    pub k8s_ns: String,
    /// Pod name.
    pub name: String,
    /// Its first address in the ADD result: IPv4 in IPv4 and dual-stack worlds, IPv6 in an
    /// IPv6-only world. [`Pod::ip4`] and [`Pod::ip6`] give each family's.
    pub ip: String,
    /// The ADD result.
    pub result: Value,
}

impl Pod {
    /// Every address of the ADD result, in its order.
    pub fn ips(&self) -> Vec<IpAddr> {
        result_ips(&self.result)
    }

    /// Its IPv4 address, if it has one.
    pub fn ip4(&self) -> Option<String> {
        self.ips()
            .into_iter()
            .find(IpAddr::is_ipv4)
            .map(|a| a.to_string())
    }

    /// Its IPv6 address, if it has one.
    pub fn ip6(&self) -> Option<String> {
        self.ips()
            .into_iter()
            .find(IpAddr::is_ipv6)
            .map(|a| a.to_string())
    }

    /// Its IPv6 address, or an error naming the pod (for tests of IPv6 paths).
    pub fn need_ip6(&self) -> Result<String> {
        self.ip6()
            .with_context(|| format!("pod {} has no IPv6 address: {}", self.name, self.result))
    }

    /// Its IPv4 address, or an error naming the pod.
    pub fn need_ip4(&self) -> Result<String> {
        self.ip4()
            .with_context(|| format!("pod {} has no IPv4 address: {}", self.name, self.result))
    }
}

/// The addresses (`ips[].address`, prefix dropped) of a CNI result.
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|i| i["address"].as_str())
                .filter_map(|a| a.split('/').next())
                .filter_map(|a| a.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The node's primary CNI alone, as network `name`: ptp + host-local in the pod CIDRs of
/// `family` (dual stack: one range set per family, as kind's dual-stack config does). `upper`
/// gives it only the upper part of each range (.200–.250, ::200–::250), so that its pods never
/// get an address of the world's network (both keep their leases in the same IPAM dir).
pub fn primary_conflist(name: &str, family: Family, ipam_dir: &Path, upper: bool) -> Value {
    let range = |subnet: &str, gateway: &str, lo: &str, hi: &str| {
        if upper {
            json!([{"subnet": subnet, "gateway": gateway, "rangeStart": lo, "rangeEnd": hi}])
        } else {
            json!([{"subnet": subnet, "gateway": gateway}])
        }
    };
    let mut ranges = Vec::new();
    let mut routes = Vec::new();
    if family.has_v4() {
        ranges.push(range(POD_CIDR, POD_GW, "10.244.1.200", "10.244.1.250"));
        routes.push(json!({"dst": "0.0.0.0/0"}));
    }
    if family.has_v6() {
        ranges.push(range(
            POD_CIDR6,
            POD_GW6,
            "fd10:244:1::200",
            "fd10:244:1::250",
        ));
        routes.push(json!({"dst": "::/0"}));
    }
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "ptp", "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": ipam_dir,
                      "ranges": ranges,
                      "routes": routes}},
        ]
    })
}

/// The world.
pub struct World {
    /// Namespaces and processes (dropped last).
    pub net: TestNet,
    /// CNI dirs and the driver.
    pub cni: CniEnv,
    /// The daemon in the node netns (None while stopped).
    pub daemon: Option<Daemon>,
    /// The daemon's dir (kept across restarts).
    pub daemon_dir: PathBuf,
    /// Extra daemon arguments.
    pub daemon_args: Vec<String>,
    probe: PathBuf,
    family: Family,
    firewall: Firewall,
}

impl World {
    /// Builds node + remote, starts the daemon with `daemon_args` (plus the ambient namespace and
    /// a fast resync), writes the conflist, starts the remote echo server on 8080. IPv4 only.
    pub fn new(tag: &str, daemon_args: &[&str]) -> Result<World> {
        World::with_family(tag, Family::V4, daemon_args)
    }

    /// [`World::new`] for a family: IPv6 only or dual stack (see the module doc).
    pub fn with_family(tag: &str, family: Family, daemon_args: &[&str]) -> Result<World> {
        let net = TestNet::new(tag);
        for ns in ["node", "remote"] {
            net.add_ns(ns)?;
            if family.has_v6() {
                net.enable_ipv6(ns)?;
            }
        }
        net.veth("node", "eth1", "remote", "eth0")?;
        if family.has_v4() {
            net.exec_ok(
                "node",
                &["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "eth1"],
            )?;
            net.exec_ok(
                "remote",
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{REMOTE_IP}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            net.exec_ok("remote", &["ip", "route", "add", POD_CIDR, "via", NODE_IP])?;
        }
        net.exec_ok("node", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // Strict reverse-path filtering, as on many real nodes: the path must work with it.
        net.exec_ok("node", &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"])?;
        if family.has_v6() {
            net.no_dad("node", "eth1")?;
            net.no_dad("remote", "eth0")?;
            for (ns, dev, addr) in [("node", "eth1", NODE_IP6), ("remote", "eth0", REMOTE_IP6)] {
                net.exec_ok(
                    ns,
                    &[
                        "ip",
                        "-6",
                        "addr",
                        "add",
                        &format!("{addr}/64"),
                        "dev",
                        dev,
                        "nodad",
                    ],
                )?;
            }
            net.exec_ok(
                "remote",
                &["ip", "-6", "route", "add", POD_CIDR6, "via", NODE_IP6],
            )?;
            // Inside the node netns only (ptp also turns it on there for IPv6 pods).
            net.exec_ok("node", &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }
        let cni = CniEnv::new(&net, "node")?;
        let daemon_dir = net.dir().join("daemon");
        let mut args: Vec<String> = vec![
            "--ambient-namespace".into(),
            AMBIENT_NS.into(),
            "--resync-interval-ms".into(),
            "500".into(),
        ];
        let firewall = current_firewall();
        if firewall == Firewall::Nftables {
            args.extend(["--firewall".to_string(), "nftables".to_string()]);
        }
        args.extend(daemon_args.iter().map(|s| s.to_string()));
        let probe = workspace_bin("acni-probe")?;
        let mut w = World {
            net,
            cni,
            daemon: None,
            daemon_dir,
            daemon_args: args,
            probe,
            family,
            firewall,
        };
        w.start_daemon()?;
        let d = w.daemon()?;
        // The node's primary config (ptp + host-local, as kind's kindnet), then our installer
        // appends our entry and copies the plugin, as the DaemonSet does.
        let conf =
            w.cni
                .write_conflist(&primary_conflist(NETWORK, family, &w.cni.ipam_dir(), false))?;
        let out = run_cmd(
            Command::new(workspace_bin("ambient-cnid")?)
                .arg("install")
                .arg("--bin-src")
                .arg(workspace_bin("ambient-cni")?)
                .arg("--bin-dir")
                .arg(w.cni.bin_dir())
                .arg("--conf-dir")
                .arg(w.cni.conf_dir())
                .arg("--socket")
                .arg(d.socket())
                .arg("--plugin-log-file")
                .arg(w.cni.plugin_log())
                .args(["--plugin-log-level", "debug", "--wait-secs", "5"]),
            None,
            Duration::from_secs(30),
        );
        if !out.success() {
            bail!("ambient-cnid install: {out}");
        }
        let patched: Value = serde_json::from_slice(&std::fs::read(&conf)?)?;
        if patched["plugins"][1] != ambient_entry_of(d.socket(), &w.cni.plugin_log()) {
            bail!("the installer wrote an unexpected entry: {patched:#}");
        }
        w.spawn("remote", &["echo", "8080", "remote"])?;
        Ok(w)
    }

    /// (Re)starts the daemon on the same dir (state kept) and waits until it is ready.
    pub fn start_daemon(&mut self) -> Result<()> {
        let args: Vec<&str> = self.daemon_args.iter().map(String::as_str).collect();
        let d = Daemon::start_in(&self.net, "node", &self.daemon_dir, &args)?;
        d.wait_ready(Duration::from_secs(20))?;
        self.daemon = Some(d);
        Ok(())
    }

    /// Adds network `name` to the conf dir: the node's primary CNI without ambient-cni (pods
    /// made through it are never seen by the daemon's CNI path), in the upper part of the ranges.
    pub fn add_plain_network(&self, name: &str) -> Result<()> {
        self.cni.write_conflist(&primary_conflist(
            name,
            self.family,
            &self.cni.ipam_dir(),
            true,
        ))?;
        Ok(())
    }

    /// What the uninstall DaemonSet does after the daemon's DaemonSet is gone: stops the daemon
    /// (leaving the kernel as it is), then runs `ambient-cnid uninstall` and `ambient-cnid
    /// cleanup` in the node's netns.
    pub fn uninstall(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        self.uninstall_commands()
    }

    /// `ambient-cnid uninstall` and `ambient-cnid cleanup` in the node's netns (the daemon
    /// stopped first: [`World::uninstall`]).
    pub fn uninstall_commands(&self) -> Result<()> {
        let bin = workspace_bin("ambient-cnid")?;
        let bin = bin.to_str().context("binary path")?;
        let conf = self.cni.conf_dir();
        let plugins = self.cni.bin_dir();
        let out = self.net.exec(
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
        if !out.success() {
            bail!("ambient-cnid uninstall: {out}");
        }
        let state = self.daemon_dir.join("state");
        let out = self.net.exec(
            "node",
            &[
                bin,
                "cleanup",
                "--state-dir",
                state.to_str().context("state dir")?,
            ],
        );
        if !out.success() {
            bail!("ambient-cnid cleanup: {out}");
        }
        Ok(())
    }

    /// Restarts the daemon with `extra` arguments added to its own (kept for later restarts).
    pub fn restart_daemon_with(&mut self, extra: &[&str]) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        self.daemon_args.extend(extra.iter().map(|s| s.to_string()));
        self.start_daemon()
    }

    /// Restarts the daemon with each `(flag, value)` of `settings` in its arguments instead of
    /// what it had for that flag: `Some(v)` sets `flag v`, `None` drops the flag (kept for later
    /// restarts; the kernel state stays while it is down).
    pub fn restart_daemon_setting(&mut self, settings: &[(&str, Option<&str>)]) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        for (flag, value) in settings {
            if let Some(i) = self.daemon_args.iter().position(|a| a == flag) {
                self.daemon_args.drain(i..i + 2);
            }
            if let Some(v) = value {
                self.daemon_args.extend([flag.to_string(), v.to_string()]);
            }
        }
        self.start_daemon()
    }

    /// Restarts the daemon with another `--firewall` (the kernel state stays while it is down).
    pub fn switch_firewall(&mut self, fw: Firewall) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        let mut args = Vec::new();
        let mut it = std::mem::take(&mut self.daemon_args).into_iter();
        while let Some(a) = it.next() {
            if a == "--firewall" {
                it.next();
            } else {
                args.push(a);
            }
        }
        if fw == Firewall::Nftables {
            args.extend(["--firewall".to_string(), "nftables".to_string()]);
        }
        self.daemon_args = args;
        self.firewall = fw;
        self.start_daemon()
    }

    /// The firewall this world's daemon runs with.
    pub fn firewall(&self) -> Firewall {
        self.firewall
    }

    /// The addresses in the pod set of a family in `ns` (the ipset, or our nft set); empty when
    /// the set does not exist.
    pub fn pod_set(&self, ns: &str, v6: bool) -> Result<Vec<String>> {
        match self.firewall {
            Firewall::Iptables => {
                let set = if v6 {
                    "ztunnel-pods-ips6"
                } else {
                    "ztunnel-pods-ips"
                };
                let out = self.net.exec(ns, &["ipset", "list", set]);
                if !out.success() {
                    if out.stderr.contains("does not exist") {
                        return Ok(Vec::new());
                    }
                    bail!("ipset list {set}: {out}");
                }
                Ok(out
                    .stdout
                    .lines()
                    .skip_while(|l| !l.starts_with("Members:"))
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next())
                    .map(str::to_string)
                    .collect())
            }
            Firewall::Nftables => {
                let set = if v6 { "pods6" } else { "pods4" };
                let out = self
                    .net
                    .exec(ns, &["nft", "list", "set", "inet", NFT_TABLE, set]);
                if !out.success() {
                    return Ok(Vec::new());
                }
                Ok(nft_elements(&out.stdout))
            }
        }
    }

    /// The families of this world.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The running daemon.
    pub fn daemon(&self) -> Result<&Daemon> {
        self.daemon.as_ref().context("the daemon is not running")
    }

    /// Runs `acni-probe <args>` in the background inside `ns`.
    pub fn spawn(&self, ns: &str, args: &[&str]) -> Result<u32> {
        let mut argv = vec![self.probe.to_str().context("probe path")?];
        argv.extend_from_slice(args);
        let log = self.net.dir().join(format!("probe-{ns}.log"));
        let pid = self.net.spawn(ns, &argv, &log)?;
        // Listeners are up almost at once; give them a moment.
        std::thread::sleep(Duration::from_millis(150));
        Ok(pid)
    }

    /// CNI_ARGS of a pod.
    pub fn cni_args(k8s_ns: &str, name: &str) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={k8s_ns};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}"
        )
    }

    /// Runs the driver for a pod's netns.
    pub fn cnitool(&self, verb: &str, netns: &str, k8s_ns: &str, name: &str) -> Output {
        let args = Self::cni_args(k8s_ns, name);
        self.cni.cnitool(
            verb,
            NETWORK,
            &self.net.ns_path(netns),
            &[("CNI_ARGS", args.as_str())],
        )
    }

    /// Creates a pod netns and ADDs it through libcni; starts an echo server on 8080 in it.
    pub fn pod(&self, netns: &str, k8s_ns: &str, name: &str) -> Result<Pod> {
        self.pod_in(NETWORK, netns, k8s_ns, name)
    }

    /// Like [`World::pod`] through another conflist of the conf dir (by its `name`), e.g. one
    /// without our plugin: a pod that ran before ambient-cni was in the chain.
    pub fn pod_in(&self, network: &str, netns: &str, k8s_ns: &str, name: &str) -> Result<Pod> {
        self.net.add_ns(netns)?;
        if self.family.has_v6() {
            // Before the ADD: ptp creates eth0 here, with this namespace's defaults.
            self.net.enable_ipv6(netns)?;
        }
        let args = Self::cni_args(k8s_ns, name);
        let out = self.cni.cnitool(
            "add",
            network,
            &self.net.ns_path(netns),
            &[("CNI_ARGS", args.as_str())],
        );
        if !out.success() {
            bail!("cnitool add {name}: {out}");
        }
        let result = out.json()?;
        let ips = result_ips(&result);
        let ip = ips.first().context("no IP in the ADD result")?.to_string();
        if self.family.has_v4() && !ips.iter().any(IpAddr::is_ipv4) {
            bail!("cnitool add {name}: no IPv4 address in the result: {result}");
        }
        if self.family.has_v6() && !ips.iter().any(IpAddr::is_ipv6) {
            bail!("cnitool add {name}: no IPv6 address in the result: {result}");
        }
        if self.family.has_v6() {
            self.net.no_dad(netns, "eth0")?;
            self.net.wait_no_tentative(netns)?;
        }
        self.spawn(netns, &["echo", "8080", name])?;
        Ok(Pod {
            netns: netns.into(),
            k8s_ns: k8s_ns.into(),
            name: name.into(),
            ip,
            result,
        })
    }

    /// A ztunnel pod (istio-system/ztunnel-<suffix>) with the TPROXY listeners.
    pub fn ztunnel(&self, netns: &str, suffix: &str) -> Result<Pod> {
        let p = self.pod(netns, "istio-system", &format!("ztunnel-{suffix}"))?;
        self.spawn(netns, &["tproxy"])?;
        Ok(p)
    }

    /// DEL through libcni.
    pub fn del(&self, pod: &Pod) -> Output {
        self.cnitool("del", &pod.netns, &pod.k8s_ns, &pod.name)
    }

    /// `acni-probe connect` from `ns` to `dst` (ip:port), optionally from a spoofed source.
    pub fn connect(&self, ns: &str, dst: &str, src: Option<&str>) -> Output {
        let mut argv = vec![
            self.probe.to_str().unwrap_or("acni-probe"),
            "connect",
            dst,
            "--timeout-ms",
            "2000",
        ];
        if let Some(s) = src {
            argv.extend_from_slice(&["--src", s]);
        }
        self.net.exec(ns, &argv)
    }

    /// Connects and returns the answer, or an error with the output.
    pub fn answer(&self, ns: &str, dst: &str, src: Option<&str>) -> Result<String> {
        let out = self.connect(ns, dst, src);
        if !out.success() {
            bail!("connect {dst} from {ns}: {out}");
        }
        Ok(out.stdout.trim().to_string())
    }

    /// Waits (up to `timeout`) for `f` to hold, polling.
    pub fn eventually(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if f()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("condition not met within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node's kernel state, as a person would look at it (for comparisons and messages).
    pub fn node_state(&self, ns: &str) -> Result<String> {
        let mut s = String::new();
        let mut cmds: Vec<&[&str]> = vec![
            &["iptables-save"][..],
            &["ipset", "list", "-n"],
            &["ip", "rule"],
            &["ip", "-4", "route", "show", "table", "all"],
            &["ip", "-o", "link"],
        ];
        // IPv6 worlds: the IPv6 tables, rules and routes too (IPv4 worlds read what they always
        // did, so the other suites' snapshots are unchanged).
        if self.family.has_v6() {
            cmds.extend_from_slice(&[
                &["ip6tables-save"][..],
                &["ip", "-6", "rule"],
                &["ip", "-6", "route", "show", "table", "all"],
            ]);
        }
        if self.firewall == Firewall::Nftables {
            cmds.push(&["nft", "list", "tables"][..]);
        }
        for argv in cmds {
            let out = self.net.exec(ns, argv);
            s.push_str(&format!(
                "$ {}\n{}\n",
                argv.join(" "),
                normalize(&out.stdout)
            ));
        }
        Ok(s)
    }
}

/// The addresses of `elements = { a comment "…", b, … }` in `nft list set` output.
pub fn nft_elements(listing: &str) -> Vec<String> {
    let Some(start) = listing.find("elements = {") else {
        return Vec::new();
    };
    let body = &listing[start + "elements = {".len()..];
    let body = body.split('}').next().unwrap_or("");
    body.split(',')
        .filter_map(|e| e.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Drops what changes between two reads without meaning a change of state: iptables-save's
/// comment and counter lines, link statistics and per-link ids.
fn normalize(s: &str) -> String {
    const BUILTIN: [&str; 5] = [
        ":PREROUTING ",
        ":INPUT ",
        ":FORWARD ",
        ":OUTPUT ",
        ":POSTROUTING ",
    ];
    s.lines()
        // iptables-save: only rules and non-built-in chains count (an empty table that merely
        // exists — nft keeps tables once made — is no state of ours).
        .filter(|l| !l.starts_with('#') && !l.starts_with('*') && *l != "COMMIT")
        .filter(|l| !BUILTIN.iter().any(|b| l.starts_with(b)))
        .map(|l| {
            let l = if l.starts_with(':') {
                l.split(" [").next().unwrap_or(l)
            } else {
                l
            };
            // `ip -o link`: keep "name: <flags>", drop the index, addresses and counters.
            match l.split_once(": ") {
                Some((idx, rest)) if idx.chars().all(|c| c.is_ascii_digit()) => {
                    let rest = rest.split(" qdisc").next().unwrap_or(rest);
                    // `eth1@if7:` — the peer's index differs between otherwise equal worlds.
                    match rest.split_once('@') {
                        Some((name, tail)) => format!(
                            "{name}{}",
                            tail.split_once(':').map(|(_, t)| t).unwrap_or("")
                        ),
                        None => rest.to_string(),
                    }
                }
                _ => l.to_string(),
            }
        })
        // IPv6 link-local addresses come from random MACs: the same route in two worlds.
        .map(|l| mask_link_local(&l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `fe80::<anything>` → `fe80::*` (a /64 route `fe80::/64` stays as it is).
fn mask_link_local(l: &str) -> String {
    l.split(' ')
        .map(|w| {
            if w.starts_with("fe80::") && w != "fe80::/64" {
                "fe80::*"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
