//! The daemon's configuration: every constant of the redirection (marks, tables, priorities,
//! addresses, ports) lives here, in one place, with the seed's values as defaults.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Family, Prefix, TunnelMode};

/// Name of the ipset of enrolled pod IPs (the seed's).
pub const IPSET_NAME: &str = "ztunnel-pods-ips";
/// Name of the ipset of enrolled pod IPv6 addresses (family inet6), the seed-style mirror.
pub const IPSET_NAME6: &str = "ztunnel-pods-ips6";

/// Our nftables table (family inet) on the nftables firewall.
pub const NFT_TABLE: &str = "ambient-cni";

/// The nft set of a family in our table, on the nftables firewall.
pub fn nft_set_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "pods4",
        Family::V6 => "pods6",
    }
}

/// The ipset name of a family.
pub fn ipset_name(f: Family) -> &'static str {
    match f {
        Family::V4 => IPSET_NAME,
        Family::V6 => IPSET_NAME6,
    }
}

/// Does this kernel have IPv6 at all (not booted with `ipv6.disable=1`)?
pub fn ipv6_available() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// The address families the daemon captures (`--ip-families`). A family that is off gets no
/// kernel objects at all, and an enrolled pod with an address of it is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpFamilies {
    /// IPv4 on.
    pub v4: bool,
    /// IPv6 on.
    pub v6: bool,
}

impl Default for IpFamilies {
    fn default() -> Self {
        IpFamilies {
            v4: true,
            v6: false,
        }
    }
}

impl IpFamilies {
    /// Both families.
    pub const DUAL: IpFamilies = IpFamilies { v4: true, v6: true };
    /// Is `f` on?
    pub fn has(&self, f: Family) -> bool {
        match f {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
    /// The families that are on, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = Family> + '_ {
        Family::ALL.into_iter().filter(|f| self.has(*f))
    }
    /// Parse `v4`, `v6`, `v4,v6` (also `ipv4`, `ipv6`, `4`, `6`, `dual`).
    pub fn parse(s: &str) -> Result<IpFamilies, String> {
        let mut out = IpFamilies {
            v4: false,
            v6: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.to_ascii_lowercase().as_str() {
                "v4" | "ipv4" | "4" => out.v4 = true,
                "v6" | "ipv6" | "6" => out.v6 = true,
                "dual" | "v4v6" => out = IpFamilies::DUAL,
                other => return Err(format!("unknown IP family {other:?} (v4, v6 or v4,v6)")),
            }
        }
        if !out.v4 && !out.v6 {
            return Err(format!("no IP family in {s:?} (v4, v6 or v4,v6)"));
        }
        Ok(out)
    }
}

impl std::fmt::Display for IpFamilies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v: Vec<&str> = self
            .iter()
            .map(|x| match x {
                Family::V4 => "v4",
                Family::V6 => "v6",
            })
            .collect();
        f.write_str(&v.join(","))
    }
}
/// Our route protocol number: every route we create carries it, so only ours are ever touched.
pub const DEFAULT_ROUTE_PROTOCOL: u8 = 212;

/// Mark bits, as the 2022 design (all set and matched with masks).
pub mod marks {
    /// TCP from an enrolled pod: route to ztunnel (table 101).
    pub const OUTBOUND: u32 = 0x100;
    /// Skip: route normally (ip rule 100 → main).
    pub const SKIP: u32 = 0x200;
    /// Connection skip (contains SKIP): saved to connmark.
    pub const CONN_SKIP: u32 = 0x220;
    /// Packet from ztunnel with a spoofed (original) source (contains SKIP): saved to connmark.
    pub const PROXY: u32 = 0x210;
    /// Return packet of a ztunnel-spoofed connection: table 102.
    pub const PROXY_RET: u32 = 0x040;
    /// TPROXY mark inside the ztunnel netns.
    pub const TPROXY: u32 = 0x400;
    /// Replies to ztunnel's original-source sockets, inside the ztunnel netns.
    pub const ORG_SRC_RET: u32 = 0x4d3;
    /// Mask of the ztunnel-netns marks.
    pub const ZT_MASK: u32 = 0xfff;
}

/// Node routing tables and rule priorities.
pub mod tables {
    /// Inbound capture: per-pod routes into istioin.
    pub const INBOUND: u32 = 100;
    /// Outbound capture: default into istioout.
    pub const OUTBOUND: u32 = 101;
    /// Return packets of spoofed connections: straight to ztunnel's veth.
    pub const PROXY_RET: u32 = 102;
    /// Node rule priorities 100..=103.
    pub const RULE_SKIP: u32 = 100;
    /// fwmark 0x100 → 101.
    pub const RULE_OUTBOUND: u32 = 101;
    /// fwmark 0x40 → 102.
    pub const RULE_PROXY_RET: u32 = 102;
    /// everything → 100.
    pub const RULE_INBOUND: u32 = 103;
    /// `goto` target of rule 100 (main's priority).
    pub const MAIN_PRIORITY: u32 = 32766;
    /// Rules in the ztunnel netns.
    pub const ZT_RULE_TPROXY: u32 = 20000;
    /// fwmark 0x4d3 → local table.
    pub const ZT_RULE_ORG_SRC: u32 = 20003;
    /// The ztunnel netns' local-delivery table.
    pub const ZT_LOCAL: u32 = 100;
    /// Metric of the fail-closed `unreachable` routes that the tunnel routes (metric 0) shadow.
    pub const FALLBACK_METRIC: u32 = 0xffff_fff0;
}

/// ztunnel's listening ports.
pub mod ports {
    /// Outbound (egress of enrolled pods).
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext.
    pub const INBOUND: u16 = 15006;
    /// HBONE.
    pub const HBONE: u16 = 15008;
}

/// The daemon's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// gRPC unix socket.
    pub socket: PathBuf,
    /// Where the registry is kept.
    pub state_dir: PathBuf,
    /// Pods in these namespaces are enrolled.
    pub ambient_namespaces: BTreeSet<String>,
    /// The namespace of the ztunnel pods.
    pub ztunnel_namespace: String,
    /// A pod in `ztunnel_namespace` whose name starts with this is the node's ztunnel.
    pub ztunnel_name_prefix: String,
    /// Veth (default) or geneve tunnels.
    pub tunnel_mode: TunnelMode,
    /// MTU of the tunnel links.
    pub tunnel_mtu: u32,
    /// When no ztunnel is there, let enrolled pods' traffic flow uncaptured (default: hold closed).
    pub fail_open: bool,
    /// Period of the full resync (drift repair).
    pub resync_interval: Duration,
    /// The node address used as `src` of table-100 routes and in the probe rule; default: the
    /// gateway of the ztunnel pod (ptp/bridge put it on the node).
    pub host_ip: Option<Ipv4Addr>,
    /// Route protocol number of our routes.
    pub route_protocol: u8,
    /// Where the host's /proc is mounted (in a container): `/proc/…` netns paths are read there.
    pub host_proc: Option<PathBuf>,
    /// Inbound tunnel: node name, node address, ztunnel-side name, ztunnel address.
    pub inbound: (String, Prefix, String, Prefix),
    /// Outbound tunnel.
    pub outbound: (String, Prefix, String, Prefix),
    /// Families captured (`--ip-families`).
    pub ip_families: IpFamilies,
    /// The node IPv6 address for table-100 `src` and the probe rule (default: the ztunnel pod's
    /// IPv6 gateway).
    pub host_ip6: Option<Ipv6Addr>,
    /// IPv6 addresses of the inbound tunnel: node end, ztunnel end (a ULA /126, see README).
    pub inbound6: (Prefix, Prefix),
    /// IPv6 addresses of the outbound tunnel.
    pub outbound6: (Prefix, Prefix),
}

/// The ULA prefix of the tunnel addresses: `fd69:7374:696f::/48` ("isti-o" in ASCII), never
/// routed off the node. Inbound `…:7e::/126` and outbound `…:7f::/126` mirror 192.168.126.0/30
/// and 192.168.127.0/30 (0x7e = 126, 0x7f = 127).
fn tunnel6(subnet: u16, host: u16) -> Prefix {
    Prefix::new(
        Ipv6Addr::new(0xfd69, 0x7374, 0x696f, subnet, 0, 0, 0, host),
        126,
    )
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from(ambient_cni_proto::DEFAULT_SOCKET),
            state_dir: PathBuf::from("/run/ambient-cni/state"),
            ambient_namespaces: BTreeSet::new(),
            ztunnel_namespace: "istio-system".into(),
            ztunnel_name_prefix: "ztunnel".into(),
            tunnel_mode: TunnelMode::Veth,
            tunnel_mtu: 1500,
            fail_open: false,
            resync_interval: Duration::from_secs(2),
            host_ip: None,
            route_protocol: DEFAULT_ROUTE_PROTOCOL,
            host_proc: None,
            inbound: (
                "istioin".into(),
                Prefix {
                    addr: Ipv4Addr::new(192, 168, 126, 1).into(),
                    len: 30,
                },
                "pistioin".into(),
                Prefix {
                    addr: Ipv4Addr::new(192, 168, 126, 2).into(),
                    len: 30,
                },
            ),
            outbound: (
                "istioout".into(),
                Prefix {
                    addr: Ipv4Addr::new(192, 168, 127, 1).into(),
                    len: 30,
                },
                "pistioout".into(),
                Prefix {
                    addr: Ipv4Addr::new(192, 168, 127, 2).into(),
                    len: 30,
                },
            ),
            ip_families: IpFamilies::default(),
            host_ip6: None,
            inbound6: (tunnel6(0x7e, 1), tunnel6(0x7e, 2)),
            outbound6: (tunnel6(0x7f, 1), tunnel6(0x7f, 2)),
        }
    }
}

impl Config {
    /// The ztunnel-side address of the inbound tunnel in family `f` (next hop of table 100).
    pub fn inbound_gw(&self, f: Family) -> IpAddr {
        match f {
            Family::V4 => self.inbound.3.addr,
            Family::V6 => self.inbound6.1.addr,
        }
    }
    /// The ztunnel-side address of the outbound tunnel in family `f` (next hop of table 101).
    pub fn outbound_gw(&self, f: Family) -> IpAddr {
        match f {
            Family::V4 => self.outbound.3.addr,
            Family::V6 => self.outbound6.1.addr,
        }
    }
    /// The explicit node address of family `f` (`--host-ip`, `--host-ip6`).
    pub fn host_ip_of(&self, f: Family) -> Option<IpAddr> {
        match f {
            Family::V4 => self.host_ip.map(IpAddr::V4),
            Family::V6 => self.host_ip6.map(IpAddr::V6),
        }
    }
    /// Node-side tunnel link names.
    pub fn tunnel_names(&self) -> Vec<String> {
        vec![self.inbound.0.clone(), self.outbound.0.clone()]
    }
}
