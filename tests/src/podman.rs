//! Rootful podman (Debian's 4.3: CNI network backend, runc) confined to one namespace of a
//! [`TestNet`], and a picture of the machine's root network namespace to prove it stayed so.
//!
//! [`Podman`] runs `nsenter --net=<node netns> podman …` (the mount namespace is the machine's, so
//! the netns files podman makes under `/run/netns` are seen by the daemon too) with everything of
//! its own in a temp dir: `containers.conf` (`CONTAINERS_CONF`), `storage.conf`
//! (`CONTAINERS_STORAGE_CONF`, `vfs` driver), root, runroot, tmp dir with file locks (no shared
//! `/dev/shm/libpod_lock`), events in a file, `cgroupfs`, a private `cni_plugin_dirs` holding only
//! `ptp`, `host-local` and `ambient-cni`, and a private `network_config_dir` holding only our
//! conflist. Podman's own default network (`podman`, bridge `cni-podman0` + portmap/firewall/
//! tuning, `/etc/cni/net.d/87-podman-bridge.conflist`) is never seen: the default network is
//! renamed (podman keeps it in memory only), and its plugins are not in our plugin dir, so a
//! container without `--network` fails before any plugin runs instead of making a bridge. The image is a rootfs of Debian's `busybox-static` (plus the C runtime files
//! `acni-probe` links against), made with `podman import` — no registry.
//!
//! [`RootNetns`] is what `ip`, iptables (legacy and nft, both families), `nft`, `ipset` and
//! `sysctl net.*` show of the machine's root network namespace (PID 1's when it can be entered,
//! else the test process's own, which is the root one under `make test`); [`RootNetns::diff`]
//! lists what changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{run_cmd, Output, TestNet, COMMAND_TIMEOUT};

/// The image every container runs: busybox-static + the probe's C runtime.
pub const IMAGE: &str = "localhost/acni-busybox:test";
/// Where the `acni-probe` binary is bind-mounted in every container.
pub const PROBE_IN_CONTAINER: &str = "/acni-probe";

/// One podman installation of a test, driven inside a node namespace. Dropping it removes every
/// container (`podman rm -af`: their CNI DELs run) and fails loudly (stderr) if one survives.
pub struct Podman {
    dir: PathBuf,
    node_netns: PathBuf,
    probe: PathBuf,
}

/// A container's network as podman reports it.
#[derive(Clone, Debug)]
pub struct NetInfo {
    /// The container's init process on the host.
    pub pid: u32,
    /// Its network namespace (`/run/netns/netns-<uuid>`, made by podman).
    pub netns: PathBuf,
    /// Its IPv4 address on our network.
    pub ip: String,
}

fn conf_string(s: &Path) -> Result<String> {
    let s = s.to_str().context("non-UTF-8 path")?;
    if s.contains('"') || s.contains('\\') {
        bail!("path {s:?} cannot be written into a TOML string as is");
    }
    Ok(format!("\"{s}\""))
}

impl Podman {
    /// Sets podman up in `<net dir>/podman` for namespace `node` of `net`: config files, a
    /// plugin dir linking Debian's `ptp` and `host-local` and `ambient_cni`, a config dir with a
    /// copy of `conflist`, and the image (imported from a rootfs built here). `probe` is the
    /// `acni-probe` binary the containers run (bind-mounted read-only).
    pub fn new(
        net: &TestNet,
        node: &str,
        conflist: &Path,
        ambient_cni: &Path,
        probe: &Path,
    ) -> Result<Podman> {
        let which = run_cmd(
            Command::new("sh").args([
                "-c",
                "for b in podman runc conmon; do command -v $b || exit 1; done",
            ]),
            None,
            COMMAND_TIMEOUT,
        );
        if which.stdout.lines().count() != 3 {
            bail!(
                "podman, runc and conmon are needed (apt-get install --no-install-recommends \
                 podman runc conmon busybox-static, or `make deps`):\n{which}"
            );
        }
        let dir = net.dir().join("podman");
        for sub in [
            "net.d",
            "cni-bin",
            "root",
            "runroot",
            "tmp",
            "rootfs/bin",
            "home",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let plugin_dir = dir.join("cni-bin");
        for (name, target) in [
            ("ptp", crate::debian_plugin_dir().join("ptp")),
            ("host-local", crate::debian_plugin_dir().join("host-local")),
            ("ambient-cni", ambient_cni.to_path_buf()),
        ] {
            if !target.is_file() {
                bail!("plugin {} not found", target.display());
            }
            std::os::unix::fs::symlink(&target, plugin_dir.join(name))
                .with_context(|| format!("linking {name}"))?;
        }
        let name = conflist
            .file_name()
            .context("conflist has no file name")?
            .to_owned();
        std::fs::copy(conflist, dir.join("net.d").join(name))
            .with_context(|| format!("copying {}", conflist.display()))?;
        // Lower limits than the defaults (podman asks for the maximum, which needs
        // CAP_SYS_RESOURCE: runc's setrlimit fails with EPERM in a sandbox without it).
        let containers_conf = format!(
            "# ambient-cni test: podman confined to {node_ns}\n\
             [containers]\n\
             default_sysctls = []\n\
             default_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n\
             netns = \"bridge\"\n\
             log_driver = \"k8s-file\"\n\
             [engine]\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             events_logfile_path = {events}\n\
             lock_type = \"file\"\n\
             runtime = \"runc\"\n\
             tmp_dir = {tmp}\n\
             volume_path = {volumes}\n\
             [network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [{plugins}]\n\
             network_config_dir = {netd}\n\
             default_network = \"acni-no-default-network\"\n",
            node_ns = net.full_name(node),
            events = conf_string(&dir.join("events.log"))?,
            tmp = conf_string(&dir.join("tmp"))?,
            volumes = conf_string(&dir.join("root").join("volumes"))?,
            plugins = conf_string(&plugin_dir)?,
            netd = conf_string(&dir.join("net.d"))?,
        );
        std::fs::write(dir.join("containers.conf"), containers_conf)?;
        let storage_conf = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = {}\nrunroot = {}\n",
            conf_string(&dir.join("root"))?,
            conf_string(&dir.join("runroot"))?,
        );
        std::fs::write(dir.join("storage.conf"), storage_conf)?;
        let pm = Podman {
            dir,
            node_netns: net.ns_path(node),
            probe: probe.to_path_buf(),
        };
        pm.import_image()?;
        Ok(pm)
    }

    /// The rootfs: `/bin/busybox` (static) with its applet links, and the files `acni-probe`
    /// needs at run time (from `ldd`), imported as [`IMAGE`] with `PATH=/bin`.
    fn import_image(&self) -> Result<()> {
        let rootfs = self.dir.join("rootfs");
        let busybox = Path::new("/bin/busybox");
        let file = run_cmd(Command::new("ldd").arg(busybox), None, COMMAND_TIMEOUT);
        if file.success() {
            bail!("/bin/busybox is not static (install busybox-static, not busybox):\n{file}");
        }
        std::fs::copy(busybox, rootfs.join("bin/busybox")).context("copying /bin/busybox")?;
        let list = run_cmd(Command::new(busybox).arg("--list"), None, COMMAND_TIMEOUT);
        if !list.success() {
            bail!("busybox --list: {list}");
        }
        for applet in list.stdout.split_whitespace().filter(|a| *a != "busybox") {
            if applet.contains('/') {
                continue;
            }
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        for lib in runtime_files(&self.probe)? {
            let rel = lib.strip_prefix("/").unwrap_or(&lib);
            let to = rootfs.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // The file's content (a symlink's target), under the name the loader asks for.
            std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
        }
        let tar = self.dir.join("rootfs.tar");
        let out = run_cmd(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            None,
            COMMAND_TIMEOUT,
        );
        if !out.success() {
            bail!("tar of the rootfs: {out}");
        }
        let tar = tar.to_str().context("non-UTF-8 path")?;
        self.ok(&["import", "--change", "ENV PATH=/bin", tar, IMAGE], None)?;
        Ok(())
    }

    /// The `podman` command, inside the node namespace, with our config and a clean env (plus
    /// `CNI_ARGS` when given: podman appends them to its own `IgnoreUnknown=1;K8S_POD_NAME=<name>`).
    pub fn command(&self, args: &[&str], cni_args: Option<&str>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.node_netns.display()))
            .args(["podman", "--log-level", "warning"])
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", self.dir.join("home"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
        if let Some(a) = cni_args {
            c.env("CNI_ARGS", a);
        }
        c
    }

    /// Runs podman (see [`Podman::command`]).
    pub fn run(&self, args: &[&str], cni_args: Option<&str>) -> Output {
        run_cmd(&mut self.command(args, cni_args), None, COMMAND_TIMEOUT)
    }

    /// Runs podman; an error unless it exits 0. Returns stdout.
    pub fn ok(&self, args: &[&str], cni_args: Option<&str>) -> Result<String> {
        let out = self.run(args, cni_args);
        if !out.success() {
            bail!("podman {args:?} failed:\n{out}");
        }
        Ok(out.stdout)
    }

    /// CNI_ARGS as kubelet passes them for pod `k8s_ns/name` (UID `uid-<name>`).
    pub fn cni_args(k8s_ns: &str, name: &str) -> String {
        format!("K8S_POD_NAMESPACE={k8s_ns};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}")
    }

    /// `podman run -d --name <name> --network <network>` of [`IMAGE`] with the probe mounted,
    /// `extra` podman options and `argv` as the command, identified as pod `k8s_ns/name`.
    pub fn run_pod(
        &self,
        network: &str,
        k8s_ns: &str,
        name: &str,
        extra: &[&str],
        argv: &[&str],
    ) -> Result<NetInfo> {
        let mount = format!("{}:{PROBE_IN_CONTAINER}:ro", self.probe.display());
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            "-v",
            mount.as_str(),
        ];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.extend_from_slice(argv);
        self.ok(&args, Some(&Self::cni_args(k8s_ns, name)))?;
        self.net_info(name, network)
    }

    /// The container's pid, netns and IPv4 address on `network` (`podman inspect`).
    pub fn net_info(&self, name: &str, network: &str) -> Result<NetInfo> {
        let out = self.ok(&["inspect", "--format", "json", name], None)?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("podman inspect {name}: {out}"))?;
        let c = &v[0];
        let pid = c["State"]["Pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0)
            .with_context(|| format!("{name} has no pid (not running?): {}", c["State"]))?;
        let netns = c["NetworkSettings"]["SandboxKey"]
            .as_str()
            .filter(|s| !s.is_empty())
            .with_context(|| format!("{name} has no netns"))?;
        let ip = c["NetworkSettings"]["Networks"][network]["IPAddress"]
            .as_str()
            .filter(|s| !s.is_empty())
            .with_context(|| format!("{name} has no IPv4 address on {network}"))?;
        Ok(NetInfo {
            pid,
            netns: PathBuf::from(netns),
            ip: ip.to_string(),
        })
    }

    /// `podman exec <name> /acni-probe connect <dst> --timeout-ms <ms>`.
    pub fn connect(&self, name: &str, dst: &str, timeout_ms: u64) -> Output {
        let ms = timeout_ms.to_string();
        self.run(
            &[
                "exec",
                name,
                PROBE_IN_CONTAINER,
                "connect",
                dst,
                "--timeout-ms",
                &ms,
            ],
            None,
        )
    }

    /// Connects from container `name` to `dst` and returns the answer (an error with the
    /// output when it fails).
    pub fn answer(&self, name: &str, dst: &str) -> Result<String> {
        let out = self.connect(name, dst, 2000);
        if !out.success() {
            bail!("connect {dst} from container {name}: {out}");
        }
        Ok(out.stdout.trim().to_string())
    }

    /// Everything of this installation (config, storage, events).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CNI cache results of podman for `network` (libcni's default `/var/lib/cni/results`,
    /// files `<network>-<container id>-<ifname>`).
    pub fn cached_results(network: &str) -> Vec<String> {
        std::fs::read_dir("/var/lib/cni/results")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("{network}-")))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let out = self.run(&["rm", "--all", "--force", "--time", "0"], None);
        if !out.success() {
            eprintln!("podman: rm --all failed: {out}");
        }
        let left = self.run(&["ps", "--all", "--quiet"], None);
        if !left.stdout.trim().is_empty() {
            eprintln!("podman: containers left after rm --all: {}", left.stdout);
        }
    }
}

/// The files the dynamic loader maps for `bin` (`ldd`): the loader and the libraries, by the
/// absolute paths the binary asks for. Empty for a static binary.
fn runtime_files(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = run_cmd(Command::new("ldd").arg(bin), None, COMMAND_TIMEOUT);
    if !out.success() {
        // "not a dynamic executable": nothing to add.
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for line in out.stdout.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)".
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    if files.is_empty() {
        bail!("ldd {} listed nothing usable:\n{out}", bin.display());
    }
    Ok(files)
}

/// What a person would look at in the machine's root network namespace (PID 1's), by source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootNetns {
    /// `(what, normalised lines)` per source.
    pub parts: BTreeMap<String, Vec<String>>,
}

/// Reads of the root namespace: links, addresses, rules, routes of both families, iptables
/// legacy and nft of both families, the nft ruleset, ipset names.
const ROOT_READS: &[&[&str]] = &[
    &["ip", "-d", "-o", "link", "show"],
    &["ip", "-o", "addr", "show"],
    &["ip", "-4", "rule", "show"],
    &["ip", "-6", "rule", "show"],
    &["ip", "-4", "route", "show", "table", "all"],
    &["ip", "-6", "route", "show", "table", "all"],
    &["iptables-legacy-save"],
    &["ip6tables-legacy-save"],
    &["iptables-nft-save"],
    &["ip6tables-nft-save"],
    &["nft", "list", "ruleset"],
    &["ipset", "list", "-n"],
];

/// `net.*` keys that change on their own (counters, secrets, per-boot values).
const VOLATILE_SYSCTLS: &[&str] = &["net.netfilter.nf_conntrack_count", "stable_secret"];

impl RootNetns {
    /// The command that runs `argv` in the root namespace: under `nsenter --net=/proc/1/ns/net`
    /// when PID 1's namespace can be opened (some sandboxes refuse it), else as is.
    fn command(argv: &[&str]) -> Command {
        if std::fs::File::open("/proc/1/ns/net").is_ok() {
            let mut c = Command::new("nsenter");
            c.arg("--net=/proc/1/ns/net").args(argv);
            c
        } else {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    }

    /// The namespace read: `net:[<inode>]` and how it was entered.
    pub fn which() -> String {
        let link = |p: &str| {
            std::fs::read_link(p)
                .map(|l| l.display().to_string())
                .unwrap_or_else(|e| format!("?({e})"))
        };
        if std::fs::File::open("/proc/1/ns/net").is_ok() {
            format!("PID 1's {}", link("/proc/1/ns/net"))
        } else {
            format!(
                "the test process's own {} (PID 1's cannot be opened here)",
                link("/proc/self/ns/net")
            )
        }
    }

    /// Reads the root namespace now (read-only commands). Fails when a read fails: an
    /// unreadable part must not look unchanged.
    pub fn read() -> Result<RootNetns> {
        let mut parts = BTreeMap::new();
        for argv in ROOT_READS {
            let out = run_cmd(&mut Self::command(argv), None, COMMAND_TIMEOUT);
            if !out.success() {
                bail!("reading the root netns with {argv:?} failed:\n{out}");
            }
            parts.insert(argv.join(" "), normalize_root(&out.stdout));
        }
        let out = run_cmd(&mut Self::command(&["sysctl", "-a"]), None, COMMAND_TIMEOUT);
        // `sysctl -a` exits non-zero for the few keys that cannot be read; the rest is there.
        let lines: Vec<String> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("net."))
            .filter(|l| !VOLATILE_SYSCTLS.iter().any(|v| l.contains(v)))
            .map(str::to_string)
            .collect();
        if lines.len() < 100 {
            bail!("sysctl -a gave only {} net.* keys:\n{out}", lines.len());
        }
        parts.insert("sysctl -a (net.*)".into(), lines);
        Ok(RootNetns { parts })
    }

    /// Number of lines compared.
    pub fn lines(&self) -> usize {
        self.parts.values().map(Vec::len).sum()
    }

    /// What differs from `before`: `"<source>: - <line>"` for lines gone, `"+ <line>"` for new
    /// ones (as multisets: a duplicated line counts).
    pub fn diff(before: &RootNetns, after: &RootNetns) -> Vec<String> {
        let mut d = Vec::new();
        let keys: std::collections::BTreeSet<&String> =
            before.parts.keys().chain(after.parts.keys()).collect();
        for k in keys {
            fn count(p: Option<&Vec<String>>) -> BTreeMap<&str, i64> {
                let mut m: BTreeMap<&str, i64> = BTreeMap::new();
                for l in p.into_iter().flatten() {
                    *m.entry(l.as_str()).or_default() += 1;
                }
                m
            }
            let b = count(before.parts.get(k));
            let a = count(after.parts.get(k));
            for (l, n) in &b {
                for _ in 0..(n - a.get(l).copied().unwrap_or(0)).max(0) {
                    d.push(format!("{k}: - {l}"));
                }
            }
            for (l, n) in &a {
                for _ in 0..(n - b.get(l).copied().unwrap_or(0)).max(0) {
                    d.push(format!("{k}: + {l}"));
                }
            }
        }
        d
    }
}

/// Drops what changes without a change of configuration: comment lines and packet counters of
/// the iptables dumps, address lifetimes and route expiry timers, link and neighbour use counts.
fn normalize_root(s: &str) -> Vec<String> {
    s.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut out = Vec::new();
            let mut words = l.split_whitespace();
            while let Some(w) = words.next() {
                match w {
                    // `valid_lft 86391sec preferred_lft 86391sec`, `expires 290sec`, `used 3/0`.
                    "valid_lft" | "preferred_lft" | "expires" | "used" => {
                        words.next();
                    }
                    _ if w.starts_with('[') && w.ends_with(']') && w.contains(':') => {}
                    _ => out.push(w),
                }
            }
            out.join(" ")
        })
        .collect()
}

/// Waits until `f` holds (polling every 100 ms) or `timeout` passes; returns how long it took.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_drops_counters_and_timers() {
        let s = "# Generated by iptables\n:INPUT ACCEPT [12:345]\n\
                 4: eth0 inet6 fd00::2/64 scope global dynamic valid_lft 86391sec preferred_lft 14391sec\n\
                 default via fe80::1 dev eth0 proto ra metric 1024 expires 1790sec pref medium\n";
        assert_eq!(
            normalize_root(s),
            vec![
                ":INPUT ACCEPT",
                "4: eth0 inet6 fd00::2/64 scope global dynamic",
                "default via fe80::1 dev eth0 proto ra metric 1024 pref medium",
            ]
        );
    }

    #[test]
    fn diff_lists_gone_and_new_lines_as_multisets() {
        let mk = |l: &[&str]| RootNetns {
            parts: BTreeMap::from([(
                "ip rule".to_string(),
                l.iter().map(|s| s.to_string()).collect(),
            )]),
        };
        let a = mk(&["0: local", "32766: main", "32766: main"]);
        let b = mk(&["0: local", "32766: main", "100: ours"]);
        assert_eq!(
            RootNetns::diff(&a, &b),
            vec!["ip rule: - 32766: main", "ip rule: + 100: ours"]
        );
        assert!(RootNetns::diff(&a, &a).is_empty());
    }

    #[test]
    fn ldd_lines_give_absolute_paths() {
        // A static binary has nothing to add; this test binary itself is dynamic.
        let me = std::env::current_exe().expect("current exe");
        let files = runtime_files(&me).expect("ldd");
        assert!(files.iter().all(|f| f.is_absolute()), "{files:?}");
    }
}
