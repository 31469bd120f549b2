//! `ambient-cnid`: the node daemon of ambient-cni and its admin commands.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ambient_cni_daemon::config::{
    Config, IpFamilies, DEFAULT_ROUTE_PROTOCOL, IPSET_NAME, IPSET_NAME6,
};
use ambient_cni_daemon::daemon::Daemon;
use ambient_cni_daemon::dataplane::netlink::{
    FirewallKind, IptablesBackend, RealConfig, RealDataplane,
};
use ambient_cni_daemon::model::TunnelMode;
use ambient_cni_daemon::store::Store;
use ambient_cni_daemon::{admin, cleanup, events, install_cmd, metrics, server};
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "ambient-cnid",
    version,
    about = "Node daemon of ambient-cni: redirects enrolled pods' TCP through ztunnel"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the CNI plugin on the unix socket and keep the kernel in line (never flushes on exit).
    Run(RunArgs),
    /// Remove every kernel object the daemon created (node and ztunnel netns), nothing else.
    Cleanup(CleanupArgs),
    /// Show the daemon's status; exits 1 when it is not ready (usable as a readiness probe).
    Status(ClientArgs),
    /// Show what the daemon did recently: requests, kernel changes, repairs.
    Trace(TraceArgs),
    /// Dump registry, desired state, kernel read-back and pending changes as JSON.
    Dump(ClientArgs),
    /// Enroll a pod that is already running (no CNI ADD: made before the plugin was in the
    /// chain, or on a node without API access), or release one with --release --uid.
    Enroll(EnrollArgs),
    /// What a packet SRC → DST:PORT does on this node, step by step, from the live kernel state
    /// (run in the node netns; evaluates our rules, sends nothing).
    Explain(ambient_cni_daemon::explain::ExplainArgs),
    /// Copy the plugin into the CNI bin dir and append it to the node's CNI config (atomic,
    /// idempotent); `--watch` keeps it there, `--check` is the readiness probe.
    Install(install_cmd::InstallCmd),
    /// Remove our entry from the node's CNI config (and the binary with --remove-binary).
    Uninstall(install_cmd::UninstallCmd),
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Auto,
    Legacy,
    Nft,
}

#[derive(Clone, Copy, ValueEnum)]
enum FirewallArg {
    Iptables,
    Nftables,
    /// nftables where our nft table or kube-proxy's nftables tables exist, else iptables.
    Auto,
}

impl FirewallArg {
    /// The driver; `auto` is decided once per process (the first call, before anything is
    /// written) and logged with its reason.
    fn kind(self) -> FirewallKind {
        static AUTO: std::sync::OnceLock<FirewallKind> = std::sync::OnceLock::new();
        match self {
            FirewallArg::Iptables => FirewallKind::Iptables,
            FirewallArg::Nftables => FirewallKind::Nftables,
            FirewallArg::Auto => *AUTO.get_or_init(|| {
                let (k, why) = ambient_cni_daemon::dataplane::netlink::detect_firewall();
                info!(firewall = %k, reason = %why, "--firewall auto");
                k
            }),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Veth,
    Geneve,
}

#[derive(Args)]
struct KernelArgs {
    /// Firewall driver for the pod sets and our chains: iptables (+ ipset), nftables (one
    /// `inet ambient-cni` table written over netlink; no `nft` binary needed), or auto
    /// (nftables where our table or kube-proxy's nftables-mode tables exist).
    #[arg(
        long,
        value_enum,
        default_value = "iptables",
        env = "AMBIENT_CNI_FIREWALL"
    )]
    firewall: FirewallArg,
    /// iptables backend: auto detects it the way kube-proxy does (KUBE-IPTABLES-HINT).
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        env = "AMBIENT_CNI_IPTABLES_BACKEND"
    )]
    iptables_backend: Backend,
    /// Protocol number our routes carry (only routes with it are ever touched).
    #[arg(long, default_value_t = DEFAULT_ROUTE_PROTOCOL)]
    route_protocol: u8,
}

#[derive(Args)]
struct RunArgs {
    /// The unix socket the plugin talks to (0600; a directory the daemon creates is 0700).
    #[arg(long, default_value = ambient_cni_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where the pod registry is kept (snapshot + journal).
    #[arg(long, default_value = "/run/ambient-cni/state")]
    state_dir: PathBuf,
    /// Enroll pods of this namespace (repeatable, or comma-separated in the env variable).
    #[arg(
        long = "ambient-namespace",
        env = "AMBIENT_CNI_AMBIENT_NAMESPACES",
        value_delimiter = ','
    )]
    ambient_namespaces: Vec<String>,
    /// A JSON file with more settings: {"ambientNamespaces": [...]}.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Namespace of the ztunnel pods.
    #[arg(
        long,
        default_value = "istio-system",
        env = "AMBIENT_CNI_ZTUNNEL_NAMESPACE"
    )]
    ztunnel_namespace: String,
    /// A pod there whose name starts with this is the node's ztunnel.
    #[arg(
        long,
        default_value = "ztunnel",
        env = "AMBIENT_CNI_ZTUNNEL_NAME_PREFIX"
    )]
    ztunnel_name_prefix: String,
    /// Where the host's /proc is mounted when the daemon runs in a container: pod netns paths
    /// `/proc/<pid>/ns/net` from the runtime are read under it.
    #[arg(long, env = "AMBIENT_CNI_HOST_PROC")]
    host_proc: Option<PathBuf>,
    /// How the tunnels into ztunnel are built.
    #[arg(long, value_enum, default_value = "veth")]
    tunnel_mode: Mode,
    /// MTU of the tunnel links.
    #[arg(long, default_value_t = 1500)]
    tunnel_mtu: u32,
    /// Without a ztunnel, let enrolled pods' traffic flow uncaptured instead of holding it closed.
    #[arg(long)]
    fail_open: bool,
    /// Period of the full resync that repairs drift, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    resync_interval_ms: u64,
    /// Node address for table-100 `src` and the probe skip (default: the ztunnel pod's gateway).
    #[arg(long)]
    host_ip: Option<Ipv4Addr>,
    /// Node IPv6 address for IPv6 table-100 `src` and the probe skip (default: the ztunnel pod's
    /// IPv6 gateway).
    #[arg(long)]
    host_ip6: Option<Ipv6Addr>,
    /// Address families to capture: `v4`, `v6`, `v4,v6`, or `auto` (IPv4, plus IPv6 when the
    /// node's network namespace has IPv6 enabled). An enrolled pod with an address of a family
    /// that is off is refused (CNI error 100), as is one whose family the ztunnel has no address
    /// of.
    #[arg(long, default_value = "auto", env = "AMBIENT_CNI_IP_FAMILIES")]
    ip_families: String,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Also enroll from the Kubernetes API: namespaces labelled istio.io/dataplane-mode=ambient,
    /// minus pods annotated ambient.istio.io/redirection=disabled and host-network pods.
    #[arg(long, env = "AMBIENT_CNI_KUBE")]
    kube: bool,
    /// This node's name (the pod watch is limited to it).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// A kubeconfig (default: the pod's service account, else KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "AMBIENT_CNI_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Log filter: a level and/or `target=level` pairs, e.g. info or info,ambient_cni_daemon=debug.
    #[arg(long, default_value = "info", env = "AMBIENT_CNI_LOG")]
    log_level: String,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:15014); off when empty.
    #[arg(long, env = "AMBIENT_CNI_METRICS_ADDR", default_value = "")]
    metrics_addr: String,
    /// Allow a --metrics-addr that is not a loopback address (the port then leaves the node).
    #[arg(long, env = "AMBIENT_CNI_METRICS_ALLOW_REMOTE")]
    metrics_allow_remote: bool,
    /// Do not repair on kernel events (rtnetlink notifications, and nf_tables notifications on
    /// the nftables firewall); only the periodic resync repairs.
    #[arg(long, env = "AMBIENT_CNI_NO_EVENT_REPAIR")]
    no_event_repair: bool,
}

#[derive(Args)]
struct CleanupArgs {
    /// The state dir of the daemon (to find the ztunnel netns).
    #[arg(long, default_value = "/run/ambient-cni/state")]
    state_dir: PathBuf,
    #[command(flatten)]
    kernel: KernelArgs,
}

#[derive(Args)]
struct ClientArgs {
    /// The daemon's socket.
    #[arg(long, default_value = ambient_cni_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TraceArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only events mentioning this (pod name, UID, IP, container ID).
    #[arg(long, default_value = "")]
    filter: String,
    /// How many events.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Keep printing new events.
    #[arg(long)]
    follow: bool,
}

#[derive(Args)]
struct EnrollArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The pod's Kubernetes namespace (must be enrolled: --ambient-namespace or labelled).
    #[arg(long, required_unless_present = "release")]
    namespace: Option<String>,
    /// The pod's name.
    #[arg(long, required_unless_present = "release")]
    pod: Option<String>,
    /// The pod's UID (metadata.uid): the owner of its entries; its CNI ADD, if one comes, takes
    /// the record over.
    #[arg(long)]
    uid: String,
    /// A pod address (repeat for each; either family, IPv4 ones are enrolled).
    #[arg(long = "ip", required_unless_present = "release")]
    ips: Vec<std::net::IpAddr>,
    /// Release the pod with --uid (enrolled without a CNI ADD) instead.
    #[arg(long, conflicts_with_all = ["namespace", "pod", "ips"])]
    release: bool,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct FileConfig {
    #[serde(default)]
    ambient_namespaces: Vec<String>,
}

fn init_logs(filter: &str) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `Targets`, not `EnvFilter`: the same `info,crate=debug` syntax without a regex engine (the
    // daemon's resident memory is mostly its code pages).
    let f: tracing_subscriber::filter::Targets = filter
        .parse()
        .with_context(|| format!("bad --log-level {filter:?}"))?;
    use std::io::IsTerminal;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .with(f)
        .init();
    Ok(())
}

/// The dataplane's settings from the kernel flags, with `firewall` as its firewall driver.
fn real_config(k: &KernelArgs, firewall: FirewallKind) -> RealConfig {
    RealConfig {
        node_netns: None,
        route_protocol: k.route_protocol,
        firewall,
        iptables_backend: match k.iptables_backend {
            Backend::Auto => IptablesBackend::Auto,
            Backend::Legacy => IptablesBackend::Legacy,
            Backend::Nft => IptablesBackend::Nft,
        },
        ipset_name: IPSET_NAME.to_string(),
        ipset_name6: IPSET_NAME6.to_string(),
    }
}

/// The real dataplane, in the netns the daemon runs in. Must be called inside the runtime.
fn open_dataplane(k: &KernelArgs) -> anyhow::Result<RealDataplane> {
    let dp = RealDataplane::new(real_config(k, k.firewall.kind()))
        .context("opening the kernel dataplane")?;
    Ok(dp)
}

/// Removes what the other firewall driver than `k`'s left (after a switch of `--firewall`, once
/// ours is in place; and on `cleanup`). Without the other's kernel support (no nf_tables, no
/// iptables tools) there is nothing of it to remove: `Err` says why it was not opened.
async fn retire_other_firewall(
    k: &KernelArgs,
    cfg: &Config,
    zt: Option<&ambient_cni_daemon::reconcile::Ztunnel>,
) -> Result<ambient_cni_daemon::reconcile::ApplyReport, ambient_cni_daemon::dataplane::DpError> {
    let dp = RealDataplane::new(real_config(k, k.firewall.kind().other()))?;
    Ok(cleanup::retire_firewall(&dp, cfg, zt).await)
}

fn config_from(a: &RunArgs) -> anyhow::Result<Config> {
    let mut namespaces: BTreeSet<String> = a
        .ambient_namespaces
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if let Some(p) = &a.config {
        let body = std::fs::read(p).with_context(|| format!("reading --config {}", p.display()))?;
        let fc: FileConfig = serde_json::from_slice(&body)
            .with_context(|| format!("parsing --config {}", p.display()))?;
        namespaces.extend(fc.ambient_namespaces);
    }
    if a.resync_interval_ms < 100 {
        anyhow::bail!("--resync-interval-ms {} is below 100", a.resync_interval_ms);
    }
    if !(576..=65535).contains(&a.tunnel_mtu) {
        anyhow::bail!("--tunnel-mtu {} is out of range 576..65535", a.tunnel_mtu);
    }
    let ip_families = if a.ip_families.trim() == "auto" {
        auto_families()
    } else {
        IpFamilies::parse(&a.ip_families).map_err(|e| anyhow::anyhow!("--ip-families: {e}"))?
    };
    // IPv6 TCP needs at least 1280 bytes on every link (RFC 8200).
    if ip_families.v6 && a.tunnel_mtu < 1280 {
        anyhow::bail!(
            "--tunnel-mtu {} is below IPv6's minimum of 1280 (--ip-families {ip_families})",
            a.tunnel_mtu
        );
    }
    Ok(Config {
        socket: a.socket.clone(),
        state_dir: a.state_dir.clone(),
        ambient_namespaces: namespaces,
        ztunnel_namespace: a.ztunnel_namespace.clone(),
        ztunnel_name_prefix: a.ztunnel_name_prefix.clone(),
        tunnel_mode: match a.tunnel_mode {
            Mode::Veth => TunnelMode::Veth,
            Mode::Geneve => TunnelMode::Geneve,
        },
        tunnel_mtu: a.tunnel_mtu,
        fail_open: a.fail_open,
        resync_interval: Duration::from_millis(a.resync_interval_ms),
        host_ip: a.host_ip,
        host_ip6: a.host_ip6,
        ip_families,
        route_protocol: a.kernel.route_protocol,
        host_proc: a.host_proc.clone(),
        ..Config::default()
    })
}

/// `--ip-families auto`: IPv4, and IPv6 when this network namespace has it enabled (the kernel
/// has IPv6 and `net.ipv6.conf.all.disable_ipv6` is 0): then a node that hands pods IPv6
/// addresses gets them captured. A node where IPv6 is off gets no IPv6 objects.
fn auto_families() -> IpFamilies {
    let v6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() == "0")
        .unwrap_or(false);
    IpFamilies { v4: true, v6 }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The metrics listener of `--metrics-addr` (None when empty), bound before the kernel is touched
/// so that a bad address stops start-up with nothing changed.
async fn bind_metrics(a: &RunArgs) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let addr = a.metrics_addr.trim();
    if addr.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("--metrics-addr {addr:?} is not an IP:port"))?;
    metrics::check_addr(addr, a.metrics_allow_remote).map_err(anyhow::Error::msg)?;
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-addr {addr}"))?;
    Ok(Some(l))
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let cfg = Arc::new(config_from(&a)?);
    let metrics_listener = bind_metrics(&a).await?;
    let kube = prepare_kube(&a).await?;
    // One daemon per state dir: held until this process ends (before any kernel write).
    let _lock = ambient_cni_daemon::store::lock_state_dir(&cfg.state_dir, Duration::from_secs(30))
        .context("locking the state dir")?;
    let dp = Arc::new(open_dataplane(&a.kernel)?);
    let (store, reg, discarded) = Store::open(&cfg.state_dir)
        .with_context(|| format!("opening state dir {}", cfg.state_dir.display()))?;
    if discarded {
        warn!(dir = %cfg.state_dir.display(), "state from a previous boot discarded");
    }
    info!(pods = reg.len(), namespaces = ?cfg.ambient_namespaces, ip_families = %cfg.ip_families, "starting");
    // The ztunnel of the previous run: a switch of firewall removes the old one's chains there.
    let zt_before = reg
        .ztunnel()
        .and_then(ambient_cni_daemon::reconcile::Ztunnel::from_record);
    let daemon = Arc::new(Daemon::new(cfg.clone(), dp.clone(), Some(store), reg));
    // Bring the kernel in line before serving: restores every recorded pod, flushes nothing.
    let first = daemon.resync().await;
    if !first.ok() {
        error!(errors = ?first.errors, "initial reconcile failed; serving anyway, STATUS reports not ready until a resync succeeds");
    }
    // A switch of --firewall (or a state dir that never recorded one, as after an upgrade):
    // once ours is all in place, remove what the other driver left. A restart on the same
    // driver skips it (it costs ~80 ms of start-up).
    let fw = a.kernel.firewall.kind();
    if first.ok() {
        let last = ambient_cni_daemon::store::last_firewall(&cfg.state_dir);
        if last.as_deref() != Some(fw.as_str()) {
            match retire_other_firewall(&a.kernel, &cfg, zt_before.as_ref()).await {
                Ok(r) => {
                    info!(firewall = %fw.other(), done = r.applied.len(), errors = ?r.errors, "removed what the other firewall left (if anything)")
                }
                Err(e) => {
                    info!(firewall = %fw.other(), error = %e, "not removing objects of the other firewall: it cannot be opened here")
                }
            }
            if let Err(e) = ambient_cni_daemon::store::record_firewall(&cfg.state_dir, fw.as_str())
            {
                warn!(error = %e, "recording the firewall driver (the next start retires the other again)");
            }
        }
    }
    start_kube_watcher(kube, &daemon);
    let watcher = (!a.no_event_repair).then(|| tokio::spawn(events::run(daemon.clone(), None)));
    let metrics_task = metrics_listener.map(|l| {
        let d = daemon.clone();
        let state_dir = cfg.state_dir.clone();
        tokio::spawn(metrics::serve(
            l,
            move || {
                let d = d.clone();
                let state_dir = state_dir.clone();
                async move {
                    let s = d.status().await;
                    d.metrics().render(&metrics::Snapshot::of(
                        &s,
                        metrics::journal_bytes(&state_dir),
                    ))
                }
            },
            std::future::pending(),
        ))
    });
    let listener =
        server::bind(&cfg.socket).with_context(|| format!("binding {}", cfg.socket.display()))?;
    info!(socket = %cfg.socket.display(), "serving");
    // nftables: a change to our table by someone else (NFNLGRP_NFTABLES) is repaired at once,
    // as an rtnetlink event is (traced and counted as `event`); kicks while a repair runs
    // coalesce into one more.
    let kick = Arc::new(tokio::sync::Notify::new());
    let nft_repair = if a.no_event_repair {
        None
    } else {
        let k = kick.clone();
        let watching = match dp.watch_firewall(move || k.notify_one()).await {
            Ok(true) => {
                info!("watching nf_tables notifications for our table");
                true
            }
            Ok(false) => false,
            Err(e) => {
                warn!(error = %e, "no nf_tables notifications; drift is repaired at the next resync");
                false
            }
        };
        watching.then(|| {
            let d = daemon.clone();
            let follow = follow_ztunnel_table(daemon.clone(), dp.clone(), kick.clone());
            let repair = async move {
                loop {
                    kick.notified().await;
                    d.repair_on_event().await;
                }
            };
            tokio::spawn(async move {
                tokio::join!(repair, follow);
            })
        })
    };
    let resync = {
        let d = daemon.clone();
        let every = cfg.resync_interval;
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                d.resync().await;
            }
        })
    };
    let served = server::serve(daemon, listener, shutdown_signal()).await;
    resync.abort();
    for t in [watcher, metrics_task, nft_repair].into_iter().flatten() {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.socket);
    info!("stopped; kernel state left in place (pods stay captured)");
    served.context("serving the socket")
}

/// nftables: watches our table in the live ztunnel's netns too (its TPROXY chains), following
/// the ztunnel as it changes (looked at twice a second); a change there kicks the same repair.
async fn follow_ztunnel_table(
    daemon: Arc<Daemon<RealDataplane>>,
    dp: Arc<RealDataplane>,
    kick: Arc<tokio::sync::Notify>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut current: Option<(String, Arc<AtomicBool>)> = None;
    loop {
        let ns = daemon.ztunnel_netns().await;
        if current.as_ref().map(|(p, _)| p) != ns.as_ref() {
            if let Some((_, stop)) = current.take() {
                stop.store(true, Ordering::Relaxed);
            }
            if let Some(path) = ns {
                let stop = Arc::new(AtomicBool::new(false));
                let k = kick.clone();
                match dp
                    .watch_firewall_in(Path::new(&path), move || k.notify_one(), stop.clone())
                    .await
                {
                    Ok(true) => {
                        info!(netns = %path, "watching nf_tables notifications for our table in the ztunnel netns")
                    }
                    Ok(false) => return,
                    Err(e) => {
                        warn!(error = %e, "no nf_tables notifications in the ztunnel netns; its drift is repaired at the next resync")
                    }
                }
                current = Some((path, stop));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The enrollment watcher's settings and client, made before the daemon touches the kernel so
/// that bad settings stop start-up with nothing changed.
#[cfg(feature = "kube")]
type KubeWatch = Option<(kube::Client, ambient_cni_daemon::k8s::WatchConfig)>;
#[cfg(not(feature = "kube"))]
type KubeWatch = Option<std::convert::Infallible>;

#[cfg(feature = "kube")]
async fn prepare_kube(a: &RunArgs) -> anyhow::Result<KubeWatch> {
    use ambient_cni_daemon::k8s;
    if !a.kube {
        return Ok(None);
    }
    let mut wc = k8s::WatchConfig::new(a.node_name.clone().unwrap_or_default());
    wc.kubeconfig = a.kubeconfig.clone();
    wc.validate().context("--kube settings")?;
    let client = k8s::client(&wc).await.context("Kubernetes client")?;
    Ok(Some((client, wc)))
}

#[cfg(not(feature = "kube"))]
async fn prepare_kube(a: &RunArgs) -> anyhow::Result<KubeWatch> {
    if a.kube {
        anyhow::bail!("--kube: this ambient-cnid was built without the `kube` feature");
    }
    Ok(None)
}

/// With `--kube`, the watcher feeds the daemon's enrollment policy (never before the first
/// complete list of namespaces and pods; until then the restored enrollment stands).
#[cfg(feature = "kube")]
fn start_kube_watcher(watch: KubeWatch, daemon: &Arc<Daemon<RealDataplane>>) {
    let Some((client, wc)) = watch else { return };
    let d = daemon.clone();
    tokio::spawn(async move {
        // It runs for the life of the daemon; it only returns on bad settings.
        let Err(e) = ambient_cni_daemon::k8s::run(d, client, wc).await;
        error!(error = %e, "enrollment watcher stopped");
    });
    info!("enrollment watcher started");
}

#[cfg(not(feature = "kube"))]
fn start_kube_watcher(_watch: KubeWatch, _daemon: &Arc<Daemon<RealDataplane>>) {}

async fn run_cleanup(a: CleanupArgs) -> anyhow::Result<()> {
    let cfg = Config {
        route_protocol: a.kernel.route_protocol,
        ..Config::default()
    };
    let dp = open_dataplane(&a.kernel)?;
    let (_store, reg, _) = Store::open(&a.state_dir)
        .with_context(|| format!("opening state dir {}", a.state_dir.display()))?;
    let mut report = cleanup::cleanup(&dp, &cfg, &reg).await;
    // And whatever the other firewall driver left (a node switched between them, or an
    // uninstall run without the daemon's --firewall): no chain of ours may stay to hold pods
    // closed once the daemon is gone.
    let zt = reg
        .ztunnel()
        .and_then(ambient_cni_daemon::reconcile::Ztunnel::from_record);
    match retire_other_firewall(&a.kernel, &cfg, zt.as_ref()).await {
        Ok(r) => {
            report.applied.extend(r.applied);
            report.errors.extend(r.errors);
        }
        Err(e) => eprintln!(
            "note: {} not cleaned: it cannot be opened here ({e})",
            a.kernel.firewall.kind().other()
        ),
    }
    for line in &report.applied {
        println!("{line}");
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if !report.ok() {
        anyhow::bail!("{} errors during cleanup", report.errors.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        // The installer is synchronous: no runtime.
        Cmd::Install(c) => init_logs("info").and_then(|()| install_cmd::run_install(c)),
        Cmd::Uninstall(c) => init_logs("info").and_then(|()| install_cmd::run_uninstall(c)),
        cmd => run_async(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambient-cnid: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_async(cmd: Cmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        match cmd {
            Cmd::Run(a) => {
                init_logs(&a.log_level)?;
                run(a).await
            }
            Cmd::Cleanup(a) => {
                init_logs("warn")?;
                run_cleanup(a).await
            }
            Cmd::Status(c) => admin::status(&c.socket, c.json).await,
            Cmd::Trace(t) => {
                admin::trace(
                    &t.client.socket,
                    &t.filter,
                    t.limit,
                    t.follow,
                    t.client.json,
                )
                .await
            }
            Cmd::Dump(c) => admin::dump(&c.socket).await,
            Cmd::Enroll(e) => {
                let args = admin::EnrollArgs {
                    namespace: e.namespace.unwrap_or_default(),
                    pod: e.pod.unwrap_or_default(),
                    uid: e.uid,
                    ips: e.ips,
                    release: e.release,
                };
                admin::enroll(&e.client.socket, args, e.client.json).await
            }
            Cmd::Explain(e) => ambient_cni_daemon::explain::run(e).await,
            Cmd::Install(_) | Cmd::Uninstall(_) => {
                anyhow::bail!("internal: the installer runs without a runtime")
            }
        }
    })
}
