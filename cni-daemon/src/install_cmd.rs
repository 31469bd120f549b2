//! `ambient-cnid install` / `uninstall`: the CLI face of the `ambient-cni-install` crate, as the
//! DaemonSet's install container runs it (settings from flags or the manifest's env variables).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambient_cni_install::{self as install, InstallConfig, PluginEntry, WatchOptions};
use anyhow::{bail, Context};
use clap::Args;

/// Where the plugin goes and what its conflist entry says.
#[derive(Args, Clone, Debug)]
pub struct InstallArgs {
    /// The plugin binary to copy (default: `ambient-cni` next to this executable).
    #[arg(long, env = "AMBIENT_CNI_BIN_SRC")]
    pub bin_src: Option<PathBuf>,
    /// CNI bin dirs to install into (comma-separated or repeated).
    #[arg(long = "bin-dir", env = "AMBIENT_CNI_BIN_DIRS", value_delimiter = ',', default_value = install::DEFAULT_BIN_DIR)]
    pub bin_dirs: Vec<PathBuf>,
    /// The CNI conf dir.
    #[arg(long, env = "AMBIENT_CNI_CONF_DIR", default_value = install::DEFAULT_CONF_DIR)]
    pub conf_dir: PathBuf,
    /// Patch this file of the conf dir instead of the first valid config.
    #[arg(long, env = "AMBIENT_CNI_CONF_OVERRIDE")]
    pub conf_override: Option<String>,
    /// The daemon's socket, as the plugin on the host sees it.
    #[arg(long, env = "AMBIENT_CNI_SOCKET", default_value = ambient_cni_proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The plugin's `logFile`.
    #[arg(long, env = "AMBIENT_CNI_PLUGIN_LOG_FILE")]
    pub plugin_log_file: Option<PathBuf>,
    /// The plugin's `logLevel`.
    #[arg(long, env = "AMBIENT_CNI_PLUGIN_LOG_LEVEL")]
    pub plugin_log_level: Option<String>,
    /// The plugin's `timeoutMs`.
    #[arg(long, env = "AMBIENT_CNI_PLUGIN_TIMEOUT_MS")]
    pub plugin_timeout_ms: Option<u64>,
    /// Readiness through CNI STATUS: raise the patched conflist to cniVersion 1.1.0, so that the
    /// runtime holds pod creation while the daemon is not ready. Only when every plugin of the
    /// chain implements 1.1.0 (the node's network is NotReady while the daemon is down).
    #[arg(long, env = "AMBIENT_CNI_STATUS_READINESS")]
    pub status_readiness: bool,
}

/// `install` flags.
#[derive(Args, Debug)]
pub struct InstallCmd {
    #[command(flatten)]
    pub paths: InstallArgs,
    /// After installing, keep watching and re-patch when the primary CNI rewrites its config.
    #[arg(long)]
    pub watch: bool,
    /// Only check that binary and entry are in place (exit 1 if not): a readiness probe.
    #[arg(long, conflicts_with = "watch")]
    pub check: bool,
    /// How long to wait for the primary CNI's config on a fresh node, in seconds.
    #[arg(long, default_value_t = 600)]
    pub wait_secs: u64,
}

/// `uninstall` flags.
#[derive(Args, Debug)]
pub struct UninstallCmd {
    #[command(flatten)]
    pub paths: InstallArgs,
    /// Remove the binary too (by default it stays: CRI-O runs DEL of older pods from its cache).
    #[arg(long)]
    pub remove_binary: bool,
}

fn config(a: &InstallArgs) -> anyhow::Result<InstallConfig> {
    let bin_src = match &a.bin_src {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name(install::PLUGIN_TYPE),
    };
    let entry = PluginEntry {
        socket: a.socket.clone(),
        log_file: a.plugin_log_file.clone(),
        log_level: a.plugin_log_level.clone(),
        timeout_ms: a.plugin_timeout_ms,
    };
    let mut cfg = InstallConfig::new(bin_src, a.bin_dirs.clone(), &a.conf_dir, entry.to_value());
    cfg.conf_override = a.conf_override.clone().filter(|s| !s.is_empty());
    cfg.status_readiness = a.status_readiness;
    cfg.validate().context("install settings")?;
    Ok(cfg)
}

fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        signal_flag(sig, stop.clone())?;
    }
    Ok(stop)
}

/// Sets `flag` when `sig` arrives (a thread waiting on the signal through tokio would need a
/// runtime; the installer is synchronous, so a small signal thread does it).
fn signal_flag(sig: i32, flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let s = Signal::try_from(sig).context("signal")?;
    let mut set = SigSet::empty();
    set.add(s);
    set.thread_block().context("blocking the signal")?;
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            flag.store(true, Ordering::Release);
        }
    });
    Ok(())
}

/// `ambient-cnid install`.
pub fn run_install(c: InstallCmd) -> anyhow::Result<()> {
    let cfg = config(&c.paths)?;
    if c.check {
        let status = install::check(&cfg)?;
        println!("{status}");
        if !status.is_ready() {
            bail!("not installed");
        }
        return Ok(());
    }
    let stop = stop_flag()?;
    let report = install::install_wait(&cfg, Duration::from_secs(c.wait_secs), &stop)?;
    println!("{report}");
    if c.watch {
        let stats = install::watch(&cfg, &WatchOptions::default(), &stop)?;
        println!("watch stopped: {stats:?}");
    }
    Ok(())
}

/// `ambient-cnid uninstall`.
pub fn run_uninstall(c: UninstallCmd) -> anyhow::Result<()> {
    let cfg = config(&c.paths)?;
    let report = install::uninstall(&cfg, c.remove_binary)?;
    println!("{report}");
    Ok(())
}
