//! The daemon's configuration: every constant of the redirection (marks, tables, priorities,
//! addresses, ports) lives here, in one place, with the seed's values as defaults.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Prefix, TunnelMode};

/// Name of the ipset of enrolled pod IPs (the seed's).
pub const IPSET_NAME: &str = "ztunnel-pods-ips";
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
                    addr: Ipv4Addr::new(192, 168, 126, 1),
                    len: 30,
                },
                "pistioin".into(),
                Prefix {
                    addr: Ipv4Addr::new(192, 168, 126, 2),
                    len: 30,
                },
            ),
            outbound: (
                "istioout".into(),
                Prefix {
                    addr: Ipv4Addr::new(192, 168, 127, 1),
                    len: 30,
                },
                "pistioout".into(),
                Prefix {
                    addr: Ipv4Addr::new(192, 168, 127, 2),
                    len: 30,
                },
            ),
        }
    }
}

impl Config {
    /// The ztunnel-side address of the inbound tunnel (next hop of table 100).
    pub fn inbound_gw(&self) -> Ipv4Addr {
        self.inbound.3.addr
    }
    /// The ztunnel-side address of the outbound tunnel (next hop of table 101).
    pub fn outbound_gw(&self) -> Ipv4Addr {
        self.outbound.3.addr
    }
    /// Node-side tunnel link names.
    pub fn tunnel_names(&self) -> Vec<String> {
        vec![self.inbound.0.clone(), self.outbound.0.clone()]
    }
}
