//! `ambient-cnid explain SRC DST:PORT [--proto tcp|udp] [--in IFACE] [--json]`: what a packet
//! with that 5-tuple does on this node, step by step — which of our rules match, the marks they
//! set, the ip rule and route that carry it, and where it ends (captured by ztunnel, direct,
//! rejected) — and the answer's way back. It reads the live kernel state ([`read`]) and evaluates
//! our rules itself ([`eval`], pure): no packet is sent.

pub mod eval;
pub mod ipt;
pub mod read;
pub mod view;
pub mod walk;

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::config::{ipset_name, Config};
use crate::dataplane::netlink::IptablesBackend;
use crate::model::Family;

/// The `explain` command line.
#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Source address of the packet (a pod IP, a remote address).
    pub src: IpAddr,
    /// Destination and port: `10.244.1.2:8080`, `[fd00::2]:8080`.
    pub dst: String,
    /// Transport protocol.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
    pub proto: String,
    /// The interface the packet arrives on (default: the one the node routes SRC out of).
    #[arg(long = "in")]
    pub iif: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The daemon's socket: asked for its configuration and the ztunnel's netns.
    #[arg(long, default_value = ambient_cni_proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The ztunnel's netns (default: the daemon's live ztunnel).
    #[arg(long)]
    pub ztunnel_netns: Option<PathBuf>,
    /// The ztunnel pod's IP (default: the daemon's live ztunnel).
    #[arg(long)]
    pub ztunnel_ip: Option<IpAddr>,
    /// iptables variant, as the daemon's `--iptables-backend`.
    #[arg(long, default_value = "auto", env = "AMBIENT_CNI_IPTABLES_BACKEND")]
    pub iptables_backend: IptablesBackend,
    /// The dataplane to evaluate, as the daemon's `--firewall`; auto: nftables where table
    /// inet ambient-cni exists.
    #[arg(long, value_enum, default_value = "auto", env = "AMBIENT_CNI_FIREWALL")]
    pub firewall: read::FirewallChoice,
}

/// `ADDR:PORT` or `[V6]:PORT`.
pub fn parse_dst(s: &str) -> Result<(IpAddr, u16), String> {
    let sa: std::net::SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not ADDR:PORT (IPv6 as [ADDR]:PORT)"))?;
    Ok((sa.ip(), sa.port()))
}

/// What the daemon says about itself: its configuration and its ztunnel.
struct FromDaemon {
    cfg: Config,
    zt_netns: Option<PathBuf>,
    /// Its addresses, IPv4 and IPv6.
    zt_ips: Vec<IpAddr>,
    zt_ifname: Option<String>,
}

async fn ask_daemon(socket: &std::path::Path) -> anyhow::Result<FromDaemon> {
    let d = crate::admin::connect(socket)
        .await?
        .dump(ambient_cni_proto::v1::DumpRequest {})
        .await
        .context("dump")?
        .into_inner();
    let v: serde_json::Value = serde_json::from_str(&d.json).context("the daemon's dump")?;
    let cfg: Config =
        serde_json::from_value(v["config"].clone()).context("the daemon's configuration")?;
    let zt = &v["ztunnel"];
    Ok(FromDaemon {
        cfg,
        zt_netns: zt["ns"]["Pod"].as_str().map(PathBuf::from),
        zt_ips: ["ip", "ip6"]
            .iter()
            .filter_map(|k| zt[*k].as_str().and_then(|s| s.parse().ok()))
            .collect(),
        zt_ifname: zt["ifname"].as_str().map(str::to_string),
    })
}

/// Runs `explain`.
pub async fn run(a: ExplainArgs) -> anyhow::Result<()> {
    let (dst, dport) = parse_dst(&a.dst).map_err(anyhow::Error::msg)?;
    if a.src.is_ipv4() != dst.is_ipv4() {
        bail!("{} and {dst} are of different families", a.src);
    }
    // The packet's family decides what is read: ip -6 rules and routes, ip6tables, the IPv6 set.
    let family = Family::of(a.src);
    let daemon = match ask_daemon(&a.socket).await {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("explain: the daemon did not answer ({e:#}); using the default names");
            None
        }
    };
    let cfg = daemon.as_ref().map(|d| d.cfg.clone()).unwrap_or_default();
    let mut names = eval::Names::of(&cfg);
    if let Some(n) = daemon.as_ref().and_then(|d| d.zt_ifname.clone()) {
        names.ztunnel_ifname = n;
    }
    let zt_netns = a
        .ztunnel_netns
        .clone()
        .or_else(|| daemon.as_ref().and_then(|d| d.zt_netns.clone()));
    // The ztunnel's address of the packet's family.
    let zt_ip = a
        .ztunnel_ip
        .filter(|ip| Family::of(*ip) == family)
        .or_else(|| {
            daemon.as_ref().and_then(|d| {
                d.zt_ips
                    .iter()
                    .copied()
                    .find(|ip| Family::of(*ip) == family)
            })
        });
    let (backend, fw, set) = (a.iptables_backend, a.firewall, ipset_name(family));
    let (node, nft_sets) = read::read_ns(backend, fw, family, set)
        .map_err(anyhow::Error::msg)
        .context("reading the node netns")?;
    let mut view = view::KernelView {
        node,
        sets: nft_sets.unwrap_or_else(|| read::read_sets(&[set])),
        ztunnel_ip: zt_ip,
        ..Default::default()
    };
    match &zt_netns {
        Some(p) => match read::in_netns(p, || read::read_ns(backend, fw, family, set)) {
            Ok(Ok((z, _))) => view.ztunnel = Some(z),
            Ok(Err(e)) | Err(e) => view.ztunnel_note = Some(e),
        },
        None => {
            view.ztunnel_note =
                Some("the daemon knows no live ztunnel (pass --ztunnel-netns to read one)".into())
        }
    }
    let q = eval::Query {
        src: a.src,
        dst,
        dport,
        proto: a.proto.clone(),
        iif: a.iif.clone(),
    };
    let e = eval::explain(&view, &names, &q);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&e).context("encoding the explanation")?
        );
    } else {
        print!("{}", e.render());
    }
    Ok(())
}
