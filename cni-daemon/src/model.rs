//! Plain data for the kernel objects the daemon owns: what it wants and what it reads back.
//!
//! Everything here is comparable and cheap to clone, so `desired` and `plan` stay pure functions
//! that unit tests drive without root.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// An address family. Every kernel object of ours is of one: IPv4 and IPv6 have separate rules,
/// routing tables, ipsets and iptables/ip6tables chains, which mirror each other.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Family {
    /// IPv4 (`AF_INET`): what every record written before dual stack holds.
    #[default]
    V4,
    /// IPv6 (`AF_INET6`).
    V6,
}

impl Family {
    /// Its word in our nft chain names (`ip-mangle-prerouting`, `ip6-nat-output`).
    pub fn nft_word(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// Both, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    /// Is this the IPv6 family?
    pub fn is_v6(self) -> bool {
        self == Family::V6
    }
    /// Host prefix length (32 or 128).
    pub fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
    /// The unspecified address (`0.0.0.0`, `::`).
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
    /// `ipv4` / `ipv6`, as in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An IPv4 or IPv6 prefix (`10.244.1.5/32`, `fd00::5/128`); the family is the address's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Prefix {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length, 0..=32 (IPv4) or 0..=128 (IPv6).
    pub len: u8,
}

impl Prefix {
    /// A host route prefix (/32 or /128).
    pub fn host(addr: impl Into<IpAddr>) -> Self {
        let addr = addr.into();
        Prefix {
            addr,
            len: Family::of(addr).host_len(),
        }
    }
    /// A prefix of this address and length.
    pub fn new(addr: impl Into<IpAddr>, len: u8) -> Self {
        Prefix {
            addr: addr.into(),
            len,
        }
    }
    /// The IPv4 default route.
    pub const DEFAULT: Prefix = Prefix {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    /// The default route of a family.
    pub fn default_of(family: Family) -> Prefix {
        Prefix {
            addr: family.unspecified(),
            len: 0,
        }
    }
    /// The family of the prefix.
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
    /// Is this a host prefix (/32, /128)?
    pub fn is_host(&self) -> bool {
        self.len == self.family().host_len()
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len == 0 && self.addr.is_unspecified() {
            write!(f, "default")
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

/// Which network namespace an object lives in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Ns {
    /// The namespace the daemon runs in (the node's).
    Node,
    /// A pod's namespace, by path (`/var/run/netns/x` or `/proc/<pid>/ns/net`): the ztunnel's.
    Pod(PathBuf),
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ns::Node => write!(f, "node"),
            Ns::Pod(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What an ip rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RuleAction {
    /// `lookup <table>`
    Lookup(u32),
    /// `goto <priority>`
    Goto(u32),
}

/// One policy-routing rule (`ip rule` / `ip -6 rule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// IPv4 or IPv6 (`ip -6 rule`); the same priorities exist in both.
    #[serde(default)]
    pub family: Family,
    /// Priority; ours are identified by priority *and* full selector.
    pub priority: u32,
    /// `fwmark value/mask`, if any.
    pub fwmark: Option<(u32, u32)>,
    /// What happens on a match.
    pub action: RuleAction,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.family.is_v6() {
            write!(f, "-6 ")?;
        }
        write!(f, "{}: from all", self.priority)?;
        if let Some((v, m)) = self.fwmark {
            write!(f, " fwmark {v:#x}/{m:#x}")?;
        }
        match self.action {
            RuleAction::Lookup(t) => write!(f, " lookup {t}"),
            RuleAction::Goto(p) => write!(f, " goto {p}"),
        }
    }
}

/// Route scope, as far as we use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// `scope global` (the default for gateway routes)
    Universe,
    /// `scope link`
    Link,
    /// `scope host` (local routes)
    Host,
}

/// The kind of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RouteKind {
    /// A normal route out of an interface.
    Unicast,
    /// `local`: deliver to this host (TPROXY plumbing).
    Local,
    /// `unreachable`: the fail-closed fallback that tunnel routes shadow.
    Unreachable,
}

/// The kernel's identity of a route: table, prefix (whose family says which of the two tables
/// numbered `table`: IPv4 and IPv6 tables are separate) and metric (priority).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteKey {
    /// Routing table id.
    pub table: u32,
    /// Destination prefix.
    pub dst: Prefix,
    /// Metric (`ip route ... metric N`), 0 when unset.
    pub metric: u32,
}

/// One route in one of our tables. Every route we make carries our protocol number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Route {
    /// Identity.
    pub key: RouteKey,
    /// Unicast, local or unreachable.
    pub kind: RouteKind,
    /// Output interface name (none for unreachable).
    pub dev: Option<String>,
    /// Next hop (of the route's family).
    pub via: Option<IpAddr>,
    /// Preferred source address (of the route's family).
    pub src: Option<IpAddr>,
    /// Scope.
    pub scope: Scope,
    /// `onlink`: the gateway is reachable on `dev` without a covering route.
    pub onlink: bool,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteKind::Unicast => {}
            RouteKind::Local => write!(f, "local ")?,
            RouteKind::Unreachable => write!(f, "unreachable ")?,
        }
        if self.key.dst.family().is_v6() {
            write!(f, "-6 ")?;
        }
        write!(f, "{}", self.key.dst)?;
        if let Some(v) = self.via {
            write!(f, " via {v}")?;
        }
        if let Some(d) = &self.dev {
            write!(f, " dev {d}")?;
        }
        write!(f, " table {}", self.key.table)?;
        if self.scope == Scope::Link {
            write!(f, " scope link")?;
        }
        if let Some(s) = self.src {
            write!(f, " src {s}")?;
        }
        if self.key.metric != 0 {
            write!(f, " metric {}", self.key.metric)?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}

/// One of our iptables chains with its full rule list, in `iptables-save` form without `-A CHAIN`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Chain {
    /// `mangle`, `nat`, `filter`.
    pub table: String,
    /// Our chain name (`ztunnel-PREROUTING`).
    pub name: String,
    /// The built-in chain that jumps to it, at position 1.
    pub hook: String,
    /// Rule bodies in order, e.g. `-i istioin -j MARK --set-xmark 0x200/0x200`.
    pub rules: Vec<String>,
}

impl Chain {
    /// Its base chain of family `f` in our nft table (nftables firewall): `ip-mangle-prerouting`,
    /// `ip6-nat-output`.
    pub fn nft_name(&self, f: Family) -> String {
        format!(
            "{}-{}-{}",
            f.nft_word(),
            self.table.to_ascii_lowercase(),
            self.hook.to_ascii_lowercase()
        )
    }
}

/// What the iptables side of one namespace looks like, as far as our chains go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IptablesState {
    /// Our chains, keyed by (table, name), with their rules as read back.
    #[serde(with = "map_as_pairs")]
    pub chains: BTreeMap<(String, String), Vec<String>>,
    /// Jumps to our chains: (table, hook, chain) → positions (1-based) where they stand.
    #[serde(with = "map_as_pairs")]
    pub jumps: BTreeMap<(String, String, String), Vec<usize>>,
}

/// How the two tunnels into the ztunnel pod are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TunnelMode {
    /// veth pairs with one end moved into the ztunnel netns (works everywhere; default).
    Veth,
    /// geneve links (VNI 1000/1001) as in the 2022 original, where the kernel has geneve.
    Geneve,
}

/// One tunnel link pair: node end and ztunnel end.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TunnelLink {
    /// Node-side name (`istioin`).
    pub node_name: String,
    /// Node-side address with prefix (`192.168.126.1/30`).
    pub node_addr: Prefix,
    /// ztunnel-side name (`pistioin`).
    pub peer_name: String,
    /// ztunnel-side address (`192.168.126.2/30`).
    pub peer_addr: Prefix,
    /// Node-side IPv6 address, when IPv6 is captured (`fd69:7374:696f:7e::1/126`).
    #[serde(default)]
    pub node_addr6: Option<Prefix>,
    /// ztunnel-side IPv6 address (`fd69:7374:696f:7e::2/126`).
    #[serde(default)]
    pub peer_addr6: Option<Prefix>,
    /// geneve VNI (ignored for veth).
    pub vni: u32,
}

/// The tunnels into one ztunnel netns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tunnels {
    /// Veth or geneve.
    pub mode: TunnelMode,
    /// The ztunnel pod's netns (must be `Ns::Pod`).
    pub ztunnel_ns: Ns,
    /// For geneve: the ztunnel pod IP (node side remote) and the node address seen from ztunnel.
    pub ztunnel_ip: Ipv4Addr,
    /// The node address the ztunnel reaches the node by (geneve remote inside ztunnel).
    pub node_ip: Ipv4Addr,
    /// MTU of all four links.
    pub mtu: u32,
    /// inbound (istioin/pistioin) and outbound (istioout/pistioout).
    pub links: Vec<TunnelLink>,
}

/// What we read back about the tunnels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelState {
    /// Node-side links of ours that exist, by name, with whether they are wired as desired
    /// (up, address present, peer present and up with its address in the expected netns).
    pub links: BTreeMap<String, bool>,
}

/// Everything of ours in one namespace that can be listed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsState {
    /// Our rules (priorities in our ranges whose selectors we recognise).
    pub rules: BTreeSet<Rule>,
    /// Our routes (our protocol number), by identity.
    #[serde(with = "map_as_pairs")]
    pub routes: BTreeMap<RouteKey, Route>,
    /// Our iptables chains and jumps.
    pub iptables: IptablesState,
    /// Our ip6tables chains and jumps.
    #[serde(default)]
    pub iptables6: IptablesState,
    /// Sysctl values we care about (key → value), read for the keys we want set.
    pub sysctls: BTreeMap<String, String>,
}

/// One ipset of enrolled pod IPs (one per family) as read back: `None` when the set does not exist.
pub type IpsetState = Option<BTreeMap<IpAddr, String>>;

/// A sysctl key is a path under /proc/sys/, e.g. `net/ipv4/conf/istioin/rp_filter`.
pub fn rp_filter_key(ifname: &str) -> String {
    format!("net/ipv4/conf/{ifname}/rp_filter")
}

/// Serialize a map with non-string keys as a list of `[key, value]` pairs (JSON objects need
/// string keys); used for the state file and `ambient-cnid dump`.
pub mod map_as_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Serialize as pairs.
    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    /// Deserialize from pairs.
    pub fn deserialize<
        'de,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    >(
        d: D,
    ) -> Result<BTreeMap<K, V>, D::Error> {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}
