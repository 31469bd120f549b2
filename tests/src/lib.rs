//! Test harness for ambient-cni's root-only integration tests.
//!
//! Everything a test touches lives in network namespaces the test creates (never linked to the
//! machine's root namespace) and in a temp directory, and is removed when the guards drop, also
//! when the test fails or panics.
//!
//! - [`require_root`]: skip unless root; panics when `CI` is set (no silent skips in CI).
//! - [`TestNet`]: namespaces `acni-<pid>-<n>-<name>`, commands inside them, tracked processes;
//!   [`TestNet::enable_ipv6`] turns IPv6 on without DAD inside one of them.
//! - [`workspace_bin`], [`cnitool`]: the built binaries (built once per test process).
//! - [`CniEnv`]: a conf dir + plugin dir + libcni cache, and `cnitool add|check|del` in a
//!   namespace; [`ptp_conflist`] / [`ambient_entry`] build the usual chain.
//! - [`Daemon`]: `ambient-cnid run` in a namespace, on a temp socket and state dir.
//! - [`run_plugin`]: the plugin binary run directly with a given env and stdin.
//! - [`Output`]: what every command returns (status, stdout, stderr, elapsed), with helpers.
//!
//! A typical test:
//!
//! ```no_run
//! use ambient_cni_tests::*;
//! if !require_root() { return; }
//! let net = TestNet::new("example");
//! net.add_ns("node").unwrap();
//! net.add_ns("pod1").unwrap();
//! let daemon = Daemon::start(&net, "node", &["--ambient-namespace", "ns"]).unwrap();
//! let cni = CniEnv::new(&net, "node").unwrap();
//! cni.write_conflist(&ptp_conflist("k8s", "1.0.0", "10.244.1.0/24", &cni.ipam_dir(),
//!     Some(ambient_entry(daemon.socket(), &cni.plugin_log(), 5000)))).unwrap();
//! let out = cni.cnitool("add", "k8s", &net.ns_path("pod1"),
//!     &[("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u")]);
//! assert!(out.success(), "{out}");
//! ```
#![deny(clippy::unwrap_used)]

use std::fmt;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Default limit for one command a test runs (a hung command fails the test instead of CI).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// True when the test may touch the kernel. When not root: prints why and returns false, unless
/// the environment variable `CI` is set, in which case it panics (a skipped conformance test
/// must never look like a passed one in CI).
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (euid is {euid}) and CI is set: refusing to skip");
    }
    eprintln!("skipping: this test needs root (euid {euid}); run as root or under CI");
    false
}

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// `(target dir, profile dir name)` of the running test binary
/// (`<target>/<profile>/deps/<test>-<hash>`).
fn target_of_current_exe() -> Option<(PathBuf, String)> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let profile = profile_dir.file_name()?.to_str()?.to_owned();
    Some((profile_dir.parent()?.to_path_buf(), profile))
}

/// A directory holding the workspace's binaries, built once per test process:
/// `$AMBIENT_CNI_BIN_DIR` if set (nothing is built then), else `cargo build --workspace --bins`
/// with the test's own profile and target dir, so that an edited plugin or daemon is rebuilt
/// before the tests use it.
pub fn bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build_bins().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_bins() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("AMBIENT_CNI_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let (target, profile) = target_of_current_exe().context("cannot locate the target dir")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--workspace", "--bins", "--target-dir"])
        .arg(&target);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if std::env::var_os("CARGO_LOCKED").is_some() {
        cmd.arg("--locked");
    }
    let out = run_cmd(&mut cmd, None, Duration::from_secs(1800));
    if !out.success() {
        bail!("building the workspace binaries failed:\n{out}");
    }
    Ok(target.join(profile))
}

/// The path of a workspace binary (`ambient-cni`, `ambient-cnid`, ...), see [`bin_dir`].
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if !p.is_file() {
        bail!("{} was not built", p.display());
    }
    Ok(p)
}

/// The cnitool-compatible driver (`tests/cnitool`), built once per test process with
/// `tests/cnitool/build.sh`, or `$CNITOOL` if set.
pub fn cnitool() -> Result<PathBuf> {
    static TOOL: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    TOOL.get_or_init(|| {
        if let Some(p) = std::env::var_os("CNITOOL") {
            return Ok(PathBuf::from(p));
        }
        let target = target_of_current_exe()
            .map(|(t, _)| t)
            .unwrap_or_else(|| workspace_root().join("target"));
        let out_path = target.join("cnitool").join("cnitool");
        let script = workspace_root().join("tests/cnitool/build.sh");
        let out = run_cmd(
            Command::new("sh").arg(&script).arg(&out_path),
            None,
            Duration::from_secs(600),
        );
        if out.success() {
            Ok(out_path)
        } else {
            Err(format!("building cnitool failed:\n{out}"))
        }
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Where Debian's containernetworking-plugins live (`$CNI_PLUGIN_DIR` overrides).
pub fn debian_plugin_dir() -> PathBuf {
    std::env::var_os("CNI_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/cni"))
}

/// The result of one command.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status; `None` when killed by a signal (including our timeout) or never started.
    pub status: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded (also holds spawn errors and timeout notes).
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl Output {
    /// The output of a command that could not even be started (its binary failed to build).
    pub fn not_run(e: &anyhow::Error) -> Output {
        Output {
            status: None,
            stdout: String::new(),
            stderr: format!("{e:#}"),
            elapsed: Duration::ZERO,
        }
    }

    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Stdout parsed as one JSON document.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not one JSON document:\n{self}"))
    }

    /// The CNI error code on stdout, if stdout is an error document.
    pub fn cni_code(&self) -> Option<u64> {
        self.json().ok()?.get("code")?.as_u64()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with optional stdin, killing it after `timeout`. Never panics:
/// spawn failures come back as `status: None` with the error in `stderr`.
pub fn run_cmd(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let start = Instant::now();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Output {
                status: None,
                stdout: String::new(),
                stderr: format!("spawning {cmd:?} failed: {e}"),
                elapsed: start.elapsed(),
            }
        }
    };
    // Feed stdin from a thread: a plugin that stops reading (huge input) must not block us, and a
    // broken pipe is an expected outcome, not an error.
    let writer = stdin.map(<[u8]>::to_vec).and_then(|data| {
        let mut pipe = child.stdin.take()?;
        Some(std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        }))
    });
    let reader = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    // Wait in a thread (exact exit time, no polling granularity in latency figures); this thread
    // enforces the timeout. The waiter first waits without reaping (WNOWAIT) and reaps under
    // `reaped`'s lock, so a kill here can never hit a recycled pid.
    let pid = child.id();
    let reaped = std::sync::Arc::new(Mutex::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = {
        let reaped = reaped.clone();
        std::thread::spawn(move || {
            // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our own child with a valid siginfo pointer; WNOWAIT leaves it
            // waitable, so `child.wait()` below still reaps it.
            while unsafe {
                libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
            } == -1
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {
            }
            let _ = tx.send(Instant::now());
            let mut guard = reaped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let st = child.wait().ok().and_then(|s| s.code());
            *guard = true;
            st
        })
    };
    let (timed_out, end) = match rx.recv_timeout(timeout) {
        Ok(end) => (false, end),
        Err(_) => {
            let guard = reaped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let (false, Ok(pid)) = (*guard, i32::try_from(pid)) {
                // SAFETY: kill(2) on our child, not reaped yet (we hold the lock that reaping needs).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            drop(guard);
            (true, Instant::now())
        }
    };
    let status = waiter.join().ok().flatten();
    let status = if timed_out { None } else { status };
    let elapsed = end.duration_since(start);
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_t.join().unwrap_or_default();
    let mut stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    if timed_out {
        stderr.push_str(&format!("\n[harness: killed after {timeout:?}]"));
    }
    Output {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr,
        elapsed,
    }
}

/// Deletes namespaces left by earlier test processes that died (`acni-<pid>-…` whose pid is
/// gone). Runs once per process.
fn sweep_stale_namespaces() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("acni-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("harness: removing stale namespace {name}");
                kill_ns_processes(&name);
                let _ = run_cmd(
                    Command::new("ip").args(["netns", "del", &name]),
                    None,
                    COMMAND_TIMEOUT,
                );
            }
        }
    });
}

/// True while `pid` exists and is not a zombie (a zombie has left its namespace already).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn kill_ns_processes(full: &str) {
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let out = run_cmd(
            Command::new("ip").args(["netns", "pids", full]),
            None,
            COMMAND_TIMEOUT,
        );
        let pids: Vec<i32> = out
            .stdout
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for p in &pids {
            // SAFETY: kill(2) with a pid read from `ip netns pids`; at worst ESRCH.
            unsafe {
                libc::kill(*p, sig);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A set of network namespaces (and a temp dir) owned by one test. Names are
/// `acni-<pid>-<n>-<name>`, so parallel tests and leftovers of crashed runs never collide.
/// Dropping it kills the processes it started and every process left in its namespaces, then
/// deletes the namespaces and the temp dir, logging (never panicking on) failures.
pub struct TestNet {
    prefix: String,
    dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
}

impl TestNet {
    /// A new, empty set. `tag` names the test in the temp dir (`/tmp/acni-<pid>-<n>-<tag>`),
    /// which is kept short because unix socket paths must fit in 107 bytes.
    ///
    /// Panics if the temp dir cannot be created (nothing else could work then).
    pub fn new(tag: &str) -> TestNet {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        sweep_stale_namespaces();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("acni-{}-{n}", std::process::id());
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(24)
            .collect();
        let dir = std::env::temp_dir().join(format!("{prefix}-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("harness: cannot create {}: {e}", dir.display());
        }
        TestNet {
            prefix,
            dir,
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
        }
    }

    /// The unique prefix, `acni-<pid>-<n>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// This test's temp dir (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kernel name of namespace `name`: `acni-<pid>-<n>-<name>`.
    pub fn full_name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// `/var/run/netns/<full name>`.
    pub fn ns_path(&self, name: &str) -> PathBuf {
        Path::new("/var/run/netns").join(self.full_name(name))
    }

    /// Creates namespace `name` (`ip netns add`) with its loopback up; returns the full name.
    pub fn add_ns(&self, name: &str) -> Result<String> {
        let full = self.full_name(name);
        let out = run_cmd(
            Command::new("ip").args(["netns", "add", &full]),
            None,
            COMMAND_TIMEOUT,
        );
        if !out.success() {
            bail!("ip netns add {full} failed:\n{out}");
        }
        if let Ok(mut ns) = self.namespaces.lock() {
            ns.push(full.clone());
        }
        self.exec_ok(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(full)
    }

    /// Deletes namespace `name` now (e.g. to test a DEL whose netns is gone). Processes inside it
    /// are killed first.
    pub fn del_ns(&self, name: &str) -> Result<()> {
        let full = self.full_name(name);
        kill_ns_processes(&full);
        let out = run_cmd(
            Command::new("ip").args(["netns", "del", &full]),
            None,
            COMMAND_TIMEOUT,
        );
        if let Ok(mut ns) = self.namespaces.lock() {
            ns.retain(|n| n != &full);
        }
        if !out.success() {
            bail!("ip netns del {full} failed:\n{out}");
        }
        Ok(())
    }

    /// A command that runs `argv` inside namespace `name` (`ip netns exec`), for callers that
    /// need to set env or stdin themselves.
    pub fn command(&self, name: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.full_name(name)]).args(argv);
        c
    }

    /// Runs `argv` inside namespace `name` and returns its output (never fails by itself).
    pub fn exec(&self, name: &str, argv: &[&str]) -> Output {
        run_cmd(&mut self.command(name, argv), None, COMMAND_TIMEOUT)
    }

    /// Runs `argv` inside namespace `name`; an error unless it exits 0. Returns stdout.
    pub fn exec_ok(&self, name: &str, argv: &[&str]) -> Result<String> {
        let out = self.exec(name, argv);
        if !out.success() {
            bail!("{argv:?} in {} failed:\n{out}", self.full_name(name));
        }
        Ok(out.stdout)
    }

    /// Starts `argv` inside namespace `name` in the background, stdout and stderr appended to
    /// `log`. The process is killed when the `TestNet` drops (or by [`TestNet::kill`]).
    pub fn spawn(&self, name: &str, argv: &[&str], log: &Path) -> Result<u32> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = self
            .command(name, argv)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawning {argv:?}"))?;
        let pid = child.id();
        if let Ok(mut c) = self.children.lock() {
            c.push(child);
        }
        Ok(pid)
    }

    /// Stops a process started by [`TestNet::spawn`] (SIGTERM, then SIGKILL after 3 s).
    pub fn kill(&self, pid: u32) {
        if let Ok(mut children) = self.children.lock() {
            if let Some(i) = children.iter().position(|c| c.id() == pid) {
                let mut c = children.swap_remove(i);
                stop_child(&mut c, Duration::from_secs(3));
            }
        }
    }

    /// Turns IPv6 on in namespace `name` (one of ours, never the root namespace) without
    /// duplicate address detection: `all` and `default` `disable_ipv6=0` and `accept_dad=0`, so
    /// the links made afterwards in it (or moved into it) use their addresses at once instead
    /// of after a DAD second. A link made before needs [`TestNet::no_dad`] too: the kernel runs
    /// DAD unless both `all` and the link's own `accept_dad` are 0.
    pub fn enable_ipv6(&self, name: &str) -> Result<()> {
        self.exec_ok(
            name,
            &[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=0",
                "net.ipv6.conf.default.disable_ipv6=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        Ok(())
    }

    /// `accept_dad=0` and `disable_ipv6=0` on link `ifname` of namespace `name`.
    pub fn no_dad(&self, name: &str, ifname: &str) -> Result<()> {
        self.exec_ok(
            name,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{ifname}.disable_ipv6=0"),
                &format!("net.ipv6.conf.{ifname}.accept_dad=0"),
            ],
        )?;
        Ok(())
    }

    /// Waits (up to 5 s) until namespace `name` has no tentative IPv6 address (one still in
    /// DAD cannot be a source or a gateway yet); an error listing them if some stay.
    pub fn wait_no_tentative(&self, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = self.exec_ok(name, &["ip", "-6", "-o", "addr", "show", "tentative"])?;
            if t.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "tentative IPv6 addresses in {} after 5 s:\n{t}",
                    self.full_name(name)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A veth pair between two of our namespaces (`a_if` in `a`, `b_if` in `b`), both up.
    /// The pair is created inside `a`, so it never appears in the root namespace.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        self.exec_ok(
            a,
            &[
                "ip",
                "link",
                "add",
                a_if,
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                &self.full_name(b),
            ],
        )?;
        self.exec_ok(a, &["ip", "link", "set", a_if, "up"])?;
        self.exec_ok(b, &["ip", "link", "set", b_if, "up"])?;
        Ok(())
    }
}

fn stop_child(c: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(c.id()) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let children = match self.children.get_mut() {
            Ok(c) => std::mem::take(c),
            Err(p) => std::mem::take(p.into_inner()),
        };
        for mut c in children {
            stop_child(&mut c, Duration::from_secs(3));
        }
        let namespaces = match self.namespaces.get_mut() {
            Ok(n) => std::mem::take(n),
            Err(p) => std::mem::take(p.into_inner()),
        };
        for full in namespaces.iter().rev() {
            kill_ns_processes(full);
            let out = run_cmd(
                Command::new("ip").args(["netns", "del", full]),
                None,
                COMMAND_TIMEOUT,
            );
            if !out.success() {
                eprintln!("harness: ip netns del {full} failed: {out}");
            }
        }
        if std::env::var_os("ACNI_KEEP_TMP").is_none() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                eprintln!("harness: removing {} failed: {e}", self.dir.display());
            }
        }
    }
}

/// `ambient-cnid run` inside one of a [`TestNet`]'s namespaces, killed on drop.
pub struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon in namespace `ns` with a fresh dir under the test's temp dir
    /// (`--socket <dir>/cni.sock --state-dir <dir>/state`, plus `args`), and waits for the
    /// socket to accept connections.
    pub fn start(net: &TestNet, ns: &str, args: &[&str]) -> Result<Daemon> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = net
            .dir()
            .join(format!("d{}", N.fetch_add(1, Ordering::SeqCst)));
        Daemon::start_in(net, ns, &dir, args)
    }

    /// Like [`Daemon::start`] with a given dir: a restart on the same dir keeps the state.
    pub fn start_in(net: &TestNet, ns: &str, dir: &Path, args: &[&str]) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("run").join("cni.sock");
        let state = dir.join("state");
        let log = dir.join("daemon.log");
        let bin = workspace_bin("ambient-cnid")?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = net
            .command(ns, &[])
            .arg(&bin)
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("spawning ambient-cnid")?;
        let mut d = Daemon {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
            log,
        };
        d.wait_socket(Duration::from_secs(20))?;
        Ok(d)
    }

    fn wait_socket(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!(
                        "ambient-cnid exited with {st} before serving:\n{}",
                        self.log_text()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "ambient-cnid did not open {} in {timeout:?}:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `ambient-cnid status` reports ready.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let bin = workspace_bin("ambient-cnid")?;
        let deadline = Instant::now() + timeout;
        loop {
            let out = run_cmd(
                Command::new(&bin)
                    .arg("status")
                    .arg("--socket")
                    .arg(&self.socket),
                None,
                COMMAND_TIMEOUT,
            );
            if out.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "ambient-cnid not ready after {timeout:?}:\n{out}\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ambient-cnid status --json` (pods, enrolledPods, ready, ...), whatever the exit code.
    pub fn status_json(&self) -> Result<Value> {
        let bin = workspace_bin("ambient-cnid")?;
        let out = run_cmd(
            Command::new(&bin)
                .arg("status")
                .arg("--json")
                .arg("--socket")
                .arg(&self.socket),
            None,
            COMMAND_TIMEOUT,
        );
        serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("ambient-cnid status:\n{out}"))
    }

    /// `ambient-cnid dump` parsed as JSON.
    pub fn dump_json(&self) -> Result<Value> {
        let bin = workspace_bin("ambient-cnid")?;
        let out = run_cmd(
            Command::new(&bin)
                .arg("dump")
                .arg("--socket")
                .arg(&self.socket),
            None,
            COMMAND_TIMEOUT,
        );
        serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("ambient-cnid dump:\n{out}"))
    }

    /// The socket the plugin must use.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's dir (socket dir `run/`, `state/`, `daemon.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon (SIGTERM, SIGKILL after 5 s). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(5));
        }
    }

    /// Kills the daemon at once (SIGKILL, no shutdown path), e.g. to test crash recovery.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A CNI setup for the driver: conf dir (`NETCONFPATH`), plugin dir (`CNI_PATH`) with Debian's
/// `ptp`, `host-local`, `loopback` and our `ambient-cni`, a libcni cache dir and a host-local
/// data dir, all under the test's temp dir. Commands run inside namespace `ns` (the "node").
pub struct CniEnv {
    dir: PathBuf,
    ns_full: String,
}

impl CniEnv {
    /// Creates the dirs and links the plugins. Builds the plugin and the driver if needed.
    pub fn new(net: &TestNet, ns: &str) -> Result<CniEnv> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = net
            .dir()
            .join(format!("cni{}", N.fetch_add(1, Ordering::SeqCst)));
        for sub in ["net.d", "bin", "cache", "ipam"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let env = CniEnv {
            dir,
            ns_full: net.full_name(ns),
        };
        for p in ["ptp", "host-local", "loopback"] {
            env.link_plugin(p, &debian_plugin_dir().join(p))?;
        }
        env.link_plugin("ambient-cni", &workspace_bin("ambient-cni")?)?;
        cnitool()?;
        Ok(env)
    }

    /// Symlinks `target` into the plugin dir as `name` (replacing an existing entry).
    pub fn link_plugin(&self, name: &str, target: &Path) -> Result<()> {
        if !target.is_file() {
            bail!(
                "plugin {} not found (apt-get install containernetworking-plugins?)",
                target.display()
            );
        }
        let link = self.bin_dir().join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link)
            .with_context(|| format!("linking {}", link.display()))?;
        Ok(())
    }

    /// Writes an executable shell script into the plugin dir as `name`.
    pub fn add_script(&self, name: &str, body: &str) -> Result<PathBuf> {
        let p = self.bin_dir().join(name);
        std::fs::write(&p, body)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(p)
    }

    /// Writes `conflist` as `<conf dir>/<name>.conflist` (name from its `name` key).
    pub fn write_conflist(&self, conflist: &Value) -> Result<PathBuf> {
        let name = conflist
            .get("name")
            .and_then(Value::as_str)
            .context("conflist has no name")?;
        let p = self.conf_dir().join(format!("{name}.conflist"));
        std::fs::write(&p, serde_json::to_vec_pretty(conflist)?)?;
        Ok(p)
    }

    /// `NETCONFPATH`.
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }

    /// `CNI_PATH`.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// `CNI_CACHE_DIR` (libcni's result cache; delete it to test DEL without a cache).
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    /// host-local's `dataDir` for this env.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    /// A log file for the plugin's `logFile`.
    pub fn plugin_log(&self) -> PathBuf {
        self.dir.join("plugin.log")
    }

    /// Runs `cnitool <cmd> <network> <netns>` inside the node namespace with a clean env
    /// (`PATH`, `NETCONFPATH`, `CNI_PATH`, `CNI_CACHE_DIR`) plus `env` (e.g. `CNI_ARGS`,
    /// `CNI_IFNAME`, `CNI_CONTAINERID`).
    pub fn cnitool(&self, cmd: &str, network: &str, netns: &Path, env: &[(&str, &str)]) -> Output {
        let tool = match cnitool() {
            Ok(t) => t,
            Err(e) => return Output::not_run(&e),
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns_full])
            .arg(tool)
            .arg(cmd)
            .arg(network)
            .arg(netns)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("NETCONFPATH", self.conf_dir())
            .env("CNI_PATH", self.bin_dir())
            .env("CNI_CACHE_DIR", self.cache_dir())
            .envs(env.iter().copied());
        run_cmd(&mut c, None, COMMAND_TIMEOUT)
    }
}

/// Our plugin's conflist entry: socket, debug log to `log_file`, deadline.
pub fn ambient_entry(socket: &Path, log_file: &Path, timeout_ms: u64) -> Value {
    json!({
        "type": "ambient-cni",
        "socket": socket,
        "logFile": log_file,
        "logLevel": "debug",
        "timeoutMs": timeout_ms,
    })
}

/// A conflist of Debian `ptp` (no masquerade, host-local IPAM in `subnet` with a default route,
/// data in `ipam_dir`) followed by `ambient` if given.
pub fn ptp_conflist(
    name: &str,
    version: &str,
    subnet: &str,
    ipam_dir: &Path,
    ambient: Option<Value>,
) -> Value {
    let mut plugins = vec![json!({
        "type": "ptp",
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "subnet": subnet,
            "dataDir": ipam_dir,
            "routes": [{"dst": "0.0.0.0/0"}]
        }
    })];
    plugins.extend(ambient);
    json!({"cniVersion": version, "name": name, "plugins": plugins})
}

/// Runs the `ambient-cni` binary directly (no namespace needed: it only dials a socket) with
/// exactly `env` and `stdin`.
pub fn run_plugin(env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let bin = match workspace_bin("ambient-cni") {
        Ok(b) => b,
        Err(e) => return Output::not_run(&e),
    };
    let mut c = Command::new(bin);
    c.env_clear().envs(env.iter().copied());
    run_cmd(&mut c, Some(stdin), COMMAND_TIMEOUT)
}

/// The median of some durations (zero for none).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_cmd_captures_output_status_and_timeout() {
        let out = run_cmd(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            Some(b"in"),
            COMMAND_TIMEOUT,
        );
        assert_eq!(out.status, Some(3));
        assert_eq!(out.stdout, "in");
        assert_eq!(out.stderr.trim(), "err");
        let out = run_cmd(
            Command::new("sleep").arg("5"),
            None,
            Duration::from_millis(100),
        );
        assert_eq!(out.status, None);
        assert!(out.elapsed < Duration::from_secs(3));
        let out = run_cmd(
            &mut Command::new("/nonexistent/binary"),
            None,
            COMMAND_TIMEOUT,
        );
        assert_eq!(out.status, None);
    }

    #[test]
    fn huge_stdin_to_a_process_that_does_not_read_does_not_hang() {
        let big = vec![b'x'; 8 << 20];
        let out = run_cmd(&mut Command::new("true"), Some(&big), COMMAND_TIMEOUT);
        assert_eq!(out.status, Some(0));
    }

    #[test]
    fn median_picks_the_middle() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(median(vec![]), Duration::ZERO);
    }

    #[test]
    fn conflist_has_ptp_then_ours() {
        let c = ptp_conflist(
            "n",
            "1.0.0",
            "10.244.1.0/24",
            Path::new("/tmp/i"),
            Some(ambient_entry(Path::new("/s"), Path::new("/l"), 5)),
        );
        assert_eq!(c["plugins"][0]["type"], "ptp");
        assert_eq!(c["plugins"][1]["type"], "ambient-cni");
        assert_eq!(c["plugins"][1]["timeoutMs"], 5);
    }

    #[test]
    fn testnet_creates_and_removes_namespaces() {
        if !require_root() {
            return;
        }
        let path;
        let stray;
        {
            let net = TestNet::new("harness");
            net.add_ns("a").expect("add a");
            net.add_ns("b").expect("add b");
            net.veth("a", "va", "b", "vb").expect("veth");
            path = net.ns_path("a");
            assert!(path.exists());
            let links = net.exec_ok("b", &["ip", "-o", "link"]).expect("links");
            assert!(links.contains("vb@"), "{links}");
            let pid = net
                .spawn("a", &["sleep", "300"], &net.dir().join("sleep.log"))
                .expect("spawn");
            assert!(Path::new(&format!("/proc/{pid}")).exists());
            // A process started outside the tracker is also killed on drop.
            stray = std::process::Command::new("ip")
                .args(["netns", "exec", &net.full_name("b"), "sleep", "300"])
                .stdout(Stdio::null())
                .spawn()
                .ok();
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(!path.exists(), "namespace must be gone after drop");
        if let Some(mut c) = stray {
            let t = Instant::now();
            let _ = c.wait();
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "the stray sleep must have been killed"
            );
        }
    }
}
pub mod fault;
pub mod podman;
pub mod world;
