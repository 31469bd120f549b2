//! What the kernel should hold: a pure function of (config, registry, ztunnel).
//!
//! Every object is of a family. IPv6 mirrors IPv4 object for object (ipset `ztunnel-pods-ips6`,
//! ip6tables chains with the same marks, `ip -6` rules 100–103 and tables 100/101/102, the pods'
//! table-100 routes, and in the ztunnel netns TPROXY on `::1`, rules 20000/20003 and a local
//! default route): a family is built when it is on (`--ip-families`), and its ztunnel-side
//! objects when the ztunnel has an address of it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use crate::config::{ipset_name, marks, ports, tables, Config};
use crate::model::{
    rp_filter_key, Chain, Family, Ns, Prefix, Route, RouteKey, RouteKind, Rule, RuleAction, Scope,
    TunnelLink, TunnelMode, Tunnels,
};
use crate::registry::{PodRecord, Registry};

/// The node's active ztunnel as the reconciler needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ztunnel {
    /// Its netns (`Ns::Pod`).
    pub ns: Ns,
    /// Its IPv4 pod IP (ZIP), if it has one.
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 pod IP, if it has one.
    pub ip6: Option<Ipv6Addr>,
    /// Its host-side veth on the node (ZV).
    pub host_if: String,
    /// Its interface name inside the pod (CNI_IFNAME, usually eth0).
    pub ifname: String,
    /// Its IPv4 gateway (a node address).
    pub gateway: Option<Ipv4Addr>,
    /// Its IPv6 gateway (a node address).
    pub gateway6: Option<Ipv6Addr>,
}

impl Ztunnel {
    /// Build from the ztunnel's registry record; `None` if the record lacks what is needed (an
    /// address and the host interface).
    pub fn from_record(rec: &PodRecord) -> Option<Ztunnel> {
        let ip = rec.ips.iter().find_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        });
        let ip6 = rec.ips.iter().find_map(|a| match a {
            IpAddr::V6(v) => Some(*v),
            IpAddr::V4(_) => None,
        });
        if ip.is_none() && ip6.is_none() {
            return None;
        }
        Some(Ztunnel {
            ns: Ns::Pod(rec.netns.clone().into()),
            ip,
            ip6,
            host_if: rec.host_if.clone()?,
            ifname: rec.ifname.clone(),
            gateway: rec.gateway,
            gateway6: rec.gateway6,
        })
    }
    /// Its pod IP of family `f`.
    pub fn ip_of(&self, f: Family) -> Option<IpAddr> {
        match f {
            Family::V4 => self.ip.map(IpAddr::V4),
            Family::V6 => self.ip6.map(IpAddr::V6),
        }
    }
    /// Its gateway of family `f`.
    pub fn gateway_of(&self, f: Family) -> Option<IpAddr> {
        match f {
            Family::V4 => self.gateway.map(IpAddr::V4),
            Family::V6 => self.gateway6.map(IpAddr::V6),
        }
    }
    /// Its addresses, for logs (`10.244.1.4 fd00::4`).
    pub fn ips_text(&self) -> String {
        let v: Vec<String> = Family::ALL
            .iter()
            .filter_map(|f| self.ip_of(*f))
            .map(|i| i.to_string())
            .collect();
        v.join(" ")
    }
}

/// Desired state of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NsDesired {
    /// Our ip rules (both families).
    pub rules: BTreeSet<Rule>,
    /// Our routes by key (both families: the key's prefix says which).
    #[serde(serialize_with = "crate::model::map_as_pairs::serialize")]
    pub routes: BTreeMap<RouteKey, Route>,
    /// Our iptables chains (each jumped to from its hook, first).
    pub chains: Vec<Chain>,
    /// Our ip6tables chains (empty when IPv6 is off).
    pub chains6: Vec<Chain>,
    /// Sysctls to hold.
    pub sysctls: BTreeMap<String, String>,
}

impl NsDesired {
    /// The chains of a family.
    pub fn chains_of(&self, f: Family) -> &[Chain] {
        match f {
            Family::V4 => &self.chains,
            Family::V6 => &self.chains6,
        }
    }
}

/// One enrolled pod IP as a full reconcile wants it: its ipset entry (owner = the record's UID),
/// its rp_filter (on the record's host interface) and, with a ztunnel, its table-100 route.
///
/// Borrowed from the registry, a few words per pod: at 10,000 pods the desired state used to be
/// maps of formatted strings (a route with its `dev` name, an rp_filter key and value, an owner
/// copy per pod), ~3.6 MB built and dropped on every resync (acni-bench, massif).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodWant<'a> {
    /// The pod IP (unique in [`Desired::pods`], which is sorted by it: IPv4 first).
    pub ip: IpAddr,
    /// `src` of its table-100 route (of the IP's family).
    pub src: Option<IpAddr>,
    /// The record that owns the IP.
    pub rec: &'a PodRecord,
}

impl PodWant<'_> {
    /// The ipset comment.
    pub fn owner(&self) -> &str {
        self.rec.owner()
    }
    /// The node-side interface whose rp_filter is held at 2.
    pub fn host_if(&self) -> Option<&str> {
        self.rec.host_if.as_deref()
    }
    /// The IP's family.
    pub fn family(&self) -> Family {
        Family::of(self.ip)
    }
}

impl Serialize for PodWant<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("PodWant", 4)?;
        st.serialize_field("ip", &self.ip)?;
        st.serialize_field("owner", self.owner())?;
        st.serialize_field("host_if", &self.host_if())?;
        st.serialize_field("src", &self.src)?;
        st.end()
    }
}

/// What every pod's table-100 route has in common (`dev`, and `via` per family); only with a
/// ztunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRouteShape {
    /// The inbound tunnel.
    pub dev: String,
    /// Its IPv4 gateway, when IPv4 pods are routed into it.
    pub via: Option<IpAddr>,
    /// Its IPv6 gateway, when IPv6 pods are routed into it (IPv6 on, ztunnel with an IPv6 address).
    pub via6: Option<IpAddr>,
}

impl PodRouteShape {
    /// The gateway of family `f`.
    pub fn via_of(&self, f: Family) -> Option<IpAddr> {
        match f {
            Family::V4 => self.via,
            Family::V6 => self.via6,
        }
    }
    /// The route of `p` (`None`: its family is not routed into ztunnel).
    pub fn route(&self, p: &PodWant<'_>) -> Option<Route> {
        Some(Route {
            dev: Some(self.dev.clone()),
            via: Some(self.via_of(p.family())?),
            src: p.src,
            ..route(tables::INBOUND, Prefix::host(p.ip), 0)
        })
    }
    /// Is `have` the route of `p`? (No allocation: a resync compares 10,000 of them.)
    pub fn matches(&self, p: &PodWant<'_>, have: &Route) -> bool {
        have.key
            == RouteKey {
                table: tables::INBOUND,
                dst: Prefix::host(p.ip),
                metric: 0,
            }
            && have.kind == RouteKind::Unicast
            && have.dev.as_deref() == Some(self.dev.as_str())
            && have.via.is_some()
            && have.via == self.via_of(p.family())
            && have.src == p.src
            && have.scope == Scope::Universe
            && !have.onlink
    }
}

/// Everything the daemon wants the kernel to hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Desired<'a> {
    /// Enrolled pod IPs of the families on, sorted by IP (IPv4 first), one entry each: the ipset
    /// entries, their table-100 routes and their host interfaces' rp_filter.
    pub pods: Vec<PodWant<'a>>,
    /// The shape of the pods' table-100 routes; `None`: no pod routes are wanted (no ztunnel).
    pub pod_route: Option<PodRouteShape>,
    /// The families on: their ipsets exist.
    pub families: Vec<Family>,
    /// The node namespace (node-wide objects; the per-pod ones are in `pods`).
    pub node: NsDesired,
    /// The tunnels into the ztunnel pod, when there is one.
    pub tunnels: Option<Tunnels>,
    /// The ztunnel's namespace and what it should hold.
    pub zt: Option<(Ns, NsDesired)>,
}

/// The IPv4 node address used as `src` of table-100 routes and in the probe-skip rule.
pub fn host_ip(cfg: &Config, zt: Option<&Ztunnel>) -> Option<Ipv4Addr> {
    cfg.host_ip.or_else(|| zt.and_then(|z| z.gateway))
}

/// The node address of family `f` used as `src` of table-100 routes and in the probe-skip rule.
pub fn host_ip_of(cfg: &Config, f: Family, zt: Option<&Ztunnel>) -> Option<IpAddr> {
    cfg.host_ip_of(f)
        .or_else(|| zt.and_then(|z| z.gateway_of(f)))
}

/// A plain unicast route with this key (the fields that differ are set by the caller).
pub(crate) fn route(table: u32, dst: Prefix, metric: u32) -> Route {
    Route {
        key: RouteKey { table, dst, metric },
        kind: RouteKind::Unicast,
        dev: None,
        via: None,
        src: None,
        scope: Scope::Universe,
        onlink: false,
    }
}

fn unreachable(table: u32, dst: Prefix) -> Route {
    Route {
        kind: RouteKind::Unreachable,
        ..route(table, dst, tables::FALLBACK_METRIC)
    }
}

/// A route to ztunnel's pod IP over its veth, `scope link` (tables 100, 101, 102). IPv6 routes
/// have no scope (the kernel reports every one as global), so the IPv6 one is `Universe`.
fn zt_link_route(table: u32, zt_ip: IpAddr, host_if: &str) -> Route {
    Route {
        dev: Some(host_if.to_string()),
        scope: if zt_ip.is_ipv6() {
            Scope::Universe
        } else {
            Scope::Link
        },
        ..route(table, Prefix::host(zt_ip), 0)
    }
}

/// The `src` of an enrolled pod IP's table-100 route. An explicit --host-ip/--host-ip6 wins:
/// with CNIs whose gateway is not a node address (Calico's 169.254.1.1) the pod's gateway cannot
/// be a route's preferred source.
pub fn pod_src(cfg: &Config, rec: &PodRecord, ip: IpAddr, zt: Option<&Ztunnel>) -> Option<IpAddr> {
    let f = Family::of(ip);
    cfg.host_ip_of(f)
        .or(rec.gateway_of(f))
        .or_else(|| host_ip_of(cfg, f, zt))
}

/// Can the table-100 route of a pod IP of family `f` be built: the family is on and the ztunnel
/// has an address of it?
fn routed(cfg: &Config, f: Family, zt: Option<&Ztunnel>) -> bool {
    cfg.ip_families.has(f) && zt.is_some_and(|z| z.ip_of(f).is_some())
}

/// Table-100 routes of one enrolled pod IP.
pub fn pod_routes(cfg: &Config, rec: &PodRecord, ip: IpAddr, zt: Option<&Ztunnel>) -> Vec<Route> {
    let mut out = Vec::new();
    let f = Family::of(ip);
    if routed(cfg, f, zt) {
        out.push(Route {
            dev: Some(cfg.inbound.0.clone()),
            via: Some(cfg.inbound_gw(f)),
            src: pod_src(cfg, rec, ip, zt),
            ..route(tables::INBOUND, Prefix::host(ip), 0)
        });
    }
    out
}

/// The route a pod IP may have in table 100, as a deletion matches it (key and kind).
pub fn pod_route_del(ip: IpAddr) -> Route {
    route(tables::INBOUND, Prefix::host(ip), 0)
}

fn mark(v: u32) -> String {
    format!("{v:#x}/{v:#x}")
}

/// The node's iptables (IPv4) or ip6tables (IPv6) chains (kernel-state.md §1.2, with the
/// departures the README lists). `zt` is the ztunnel's host veth and its address of the family;
/// `hip` the node address of the family. Both families have the same rules and marks; only the
/// set name and the addresses differ.
pub fn node_chains(
    cfg: &Config,
    family: Family,
    zt: Option<(&str, IpAddr)>,
    hip: Option<IpAddr>,
) -> Vec<Chain> {
    let set = ipset_name(family);
    let hl = family.host_len();
    let (skip, conn_skip, proxy, ret, out) = (
        mark(marks::SKIP),
        mark(marks::CONN_SKIP),
        mark(marks::PROXY),
        mark(marks::PROXY_RET),
        mark(marks::OUTBOUND),
    );
    let mut pre = Vec::new();
    for tun in [&cfg.inbound.0, &cfg.outbound.0] {
        pre.push(format!("-i {tun} -j MARK --set-xmark {skip}"));
        pre.push(format!("-i {tun} -j RETURN"));
    }
    if cfg.tunnel_mode == TunnelMode::Geneve && family == Family::V4 {
        pre.push("-p udp -m udp --dport 6081 -j RETURN".to_string());
    }
    pre.push(format!(
        "-m connmark --mark {conn_skip} -j MARK --set-xmark {skip}"
    ));
    pre.push(format!("-m mark --mark {skip} -j RETURN"));
    if let Some((host_if, _)) = zt {
        pre.push(format!(
            "! -i {host_if} -m connmark --mark {proxy} -j MARK --set-xmark {ret}"
        ));
    }
    pre.push(format!("-m mark --mark {ret} -j RETURN"));
    if let Some((host_if, ip)) = zt {
        pre.push(format!(
            "! -s {ip}/{hl} -i {host_if} -j MARK --set-xmark {proxy}"
        ));
        pre.push(format!("-m mark --mark {skip} -j RETURN"));
        pre.push(format!("-i {host_if} -j MARK --set-xmark {conn_skip}"));
    }
    pre.push(format!("-p udp -j MARK --set-xmark {conn_skip}"));
    // Not in the original: ztunnel only takes TCP, so other protocols to an enrolled pod (ICMP,
    // anything but UDP) must not be routed into the inbound tunnel (prototype-findings B7). For
    // IPv6 this also keeps neighbour discovery to the pods out of the tunnel.
    pre.push(format!(
        "! -p tcp -m set --match-set {set} dst -j MARK --set-xmark {skip}"
    ));
    pre.push(format!("-m mark --mark {skip} -j RETURN"));
    pre.push(format!(
        "-p tcp -m set --match-set {set} src -j MARK --set-xmark {out}"
    ));

    let save = vec![
        format!(
            "-m mark --mark {conn_skip} -j CONNMARK --save-mark --nfmask {:#x} --ctmask {:#x}",
            marks::CONN_SKIP,
            marks::CONN_SKIP
        ),
        format!(
            "-m mark --mark {proxy} -j CONNMARK --save-mark --nfmask {:#x} --ctmask {:#x}",
            marks::PROXY,
            marks::PROXY
        ),
    ];
    // Kubelet probes (node address, local socket) to enrolled pods skip capture. Masked, unlike
    // the original, which overwrote the whole mark.
    let mut output = match hip {
        Some(h) => vec![format!(
            "-s {h}/{hl} -p tcp -m owner --socket-exists -m set --match-set {set} dst -j MARK --set-xmark {conn_skip}"
        )],
        None => vec![],
    };
    // Not in the original: what the node itself sends to an enrolled pod that is not TCP (a ping
    // from the node, say) goes straight to the pod instead of into ztunnel, which only takes TCP;
    // B7 does the same for forwarded packets.
    output.push(format!(
        "! -p tcp -m set --match-set {set} dst -j MARK --set-xmark {skip}"
    ));
    let accept = vec![format!("-m mark --mark {out} -j ACCEPT")];
    // Fail closed: TCP to an enrolled pod that leaves by any way but the inbound tunnel, carrying
    // none of the marks of captured (0x100), skipped (0x200) or ztunnel-return (0x040) traffic,
    // is going around ztunnel — because there is none (its netns vanished and took istioin and the
    // table-100 routes along) or it is between a DEL and its replacement's ADD. Rejected with a
    // reset. A rule, not an `unreachable` route: such a route for the pod's IP would also fail
    // the kernel's reverse-path check of the pod's own packets (ARP included).
    let hold = format!(
        "! -o {} -p tcp -m set --match-set {set} dst -m mark --mark 0x0/{:#x} -j REJECT --reject-with tcp-reset",
        cfg.inbound.0,
        marks::OUTBOUND | marks::SKIP | marks::PROXY_RET
    );
    let (mut fwd, mut local_out) = (accept.clone(), vec![]);
    if !cfg.fail_open {
        fwd.push(hold.clone());
        local_out.push(hold);
    }
    let c = |table: &str, hook: &str, rules: Vec<String>| Chain {
        table: table.into(),
        name: format!("ztunnel-{hook}"),
        hook: hook.into(),
        rules,
    };
    vec![
        c("mangle", "PREROUTING", pre),
        c("mangle", "POSTROUTING", vec![]),
        c("mangle", "OUTPUT", output),
        c("mangle", "INPUT", save.clone()),
        c("mangle", "FORWARD", save),
        c("nat", "PREROUTING", accept.clone()),
        c("nat", "POSTROUTING", accept.clone()),
        c("filter", "FORWARD", fwd),
        c("filter", "OUTPUT", local_out),
    ]
}

/// The chain inside the ztunnel netns (§2) for family `f`: TPROXY into ztunnel's ports (on
/// 127.0.0.1, or ::1 for IPv6: ztunnel listens on both loopbacks), and the mark that hands
/// replies to its original-source sockets to local delivery. `zt_ip` is its address of `f`.
pub fn zt_chains(cfg: &Config, f: Family, zt: &Ztunnel, zt_ip: IpAddr) -> Vec<Chain> {
    let lo = match f {
        Family::V4 => "127.0.0.1",
        Family::V6 => "::1",
    };
    let tp = |port: u16| {
        format!(
            "-j TPROXY --on-port {port} --on-ip {lo} --tproxy-mark {:#x}/{:#x}",
            marks::TPROXY,
            marks::ZT_MASK
        )
    };
    let (pin, pout) = (&cfg.inbound.2, &cfg.outbound.2);
    vec![Chain {
        table: "mangle".into(),
        name: "ztunnel-PREROUTING".into(),
        hook: "PREROUTING".into(),
        rules: vec![
            format!(
                "-i {pin} -p tcp -m tcp --dport {} {}",
                ports::HBONE,
                tp(ports::HBONE)
            ),
            format!("-i {pout} -p tcp {}", tp(ports::OUTBOUND)),
            format!("-i {pin} -p tcp {}", tp(ports::INBOUND)),
            format!(
                "! -d {}/{} -i {} -p tcp -j MARK --set-xmark {:#x}/{:#x}",
                zt_ip,
                f.host_len(),
                zt.ifname,
                marks::ORG_SRC_RET,
                marks::ZT_MASK
            ),
        ],
    }]
}

/// Node rules 100–103 of one family.
pub fn node_rules(family: Family) -> BTreeSet<Rule> {
    [
        Rule {
            family,
            priority: tables::RULE_SKIP,
            fwmark: Some((marks::SKIP, marks::SKIP)),
            action: RuleAction::Goto(tables::MAIN_PRIORITY),
        },
        Rule {
            family,
            priority: tables::RULE_OUTBOUND,
            fwmark: Some((marks::OUTBOUND, marks::OUTBOUND)),
            action: RuleAction::Lookup(tables::OUTBOUND),
        },
        Rule {
            family,
            priority: tables::RULE_PROXY_RET,
            fwmark: Some((marks::PROXY_RET, marks::PROXY_RET)),
            action: RuleAction::Lookup(tables::PROXY_RET),
        },
        Rule {
            family,
            priority: tables::RULE_INBOUND,
            fwmark: None,
            action: RuleAction::Lookup(tables::INBOUND),
        },
    ]
    .into_iter()
    .collect()
}

/// ztunnel-netns rules 20000/20003 of one family.
pub fn zt_rules(family: Family) -> [Rule; 2] {
    [
        Rule {
            family,
            priority: tables::ZT_RULE_TPROXY,
            fwmark: Some((marks::TPROXY, marks::ZT_MASK)),
            action: RuleAction::Lookup(tables::ZT_LOCAL),
        },
        Rule {
            family,
            priority: tables::ZT_RULE_ORG_SRC,
            fwmark: Some((marks::ORG_SRC_RET, marks::ZT_MASK)),
            action: RuleAction::Lookup(tables::ZT_LOCAL),
        },
    ]
}

/// Node rule priorities we own.
pub const NODE_RULE_PRIORITIES: [u32; 4] = [
    tables::RULE_SKIP,
    tables::RULE_OUTBOUND,
    tables::RULE_PROXY_RET,
    tables::RULE_INBOUND,
];
/// Node tables we own routes in.
pub const NODE_TABLES: [u32; 3] = [tables::INBOUND, tables::OUTBOUND, tables::PROXY_RET];
/// ztunnel-netns rule priorities we own.
pub const ZT_RULE_PRIORITIES: [u32; 2] = [tables::ZT_RULE_TPROXY, tables::ZT_RULE_ORG_SRC];
/// ztunnel-netns tables we own routes in.
pub const ZT_TABLES: [u32; 1] = [tables::ZT_LOCAL];

/// The tunnels for this ztunnel (IPv6 addresses on the links when IPv6 is on and the ztunnel has
/// an IPv6 address).
pub fn tunnels(cfg: &Config, zt: &Ztunnel) -> Tunnels {
    let v6 = routed(cfg, Family::V6, Some(zt));
    let link = |t: &(String, Prefix, String, Prefix), t6: &(Prefix, Prefix), vni: u32| TunnelLink {
        node_name: t.0.clone(),
        node_addr: t.1,
        peer_name: t.2.clone(),
        peer_addr: t.3,
        node_addr6: v6.then_some(t6.0),
        peer_addr6: v6.then_some(t6.1),
        vni,
    };
    Tunnels {
        mode: cfg.tunnel_mode,
        ztunnel_ns: zt.ns.clone(),
        ztunnel_ip: zt.ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        node_ip: host_ip(cfg, Some(zt)).unwrap_or(Ipv4Addr::UNSPECIFIED),
        mtu: cfg.tunnel_mtu,
        links: vec![
            link(&cfg.inbound, &cfg.inbound6, 1000),
            link(&cfg.outbound, &cfg.outbound6, 1001),
        ],
    }
}

impl Desired<'_> {
    /// Position of `ip` in [`Desired::pods`].
    pub fn pod(&self, ip: IpAddr) -> Option<&PodWant<'_>> {
        let i = self.pods.binary_search_by_key(&ip, |p| p.ip).ok()?;
        self.pods.get(i)
    }

    /// The index in [`Desired::pods`] of the pod whose table-100 route `r` is exactly.
    pub fn pod_route_index(&self, r: &Route) -> Option<usize> {
        let shape = self.pod_route.as_ref()?;
        if r.key.table != tables::INBOUND || !r.key.dst.is_host() || r.key.metric != 0 {
            return None;
        }
        let i = self
            .pods
            .binary_search_by_key(&r.key.dst.addr, |p| p.ip)
            .ok()?;
        let p = self.pods.get(i)?;
        shape.matches(p, r).then_some(i)
    }

    /// Is a route with this key wanted in the node netns?
    pub fn wants_node_route(&self, key: &RouteKey) -> bool {
        self.node.routes.contains_key(key)
            || (self
                .pod_route
                .as_ref()
                .is_some_and(|s| s.via_of(key.dst.family()).is_some())
                && key.table == tables::INBOUND
                && key.metric == 0
                && key.dst.is_host()
                && self.pod(key.dst.addr).is_some())
    }

    /// The ipset entries of both families as one map (IP → owner), for tests and dumps.
    pub fn ipset_map(&self) -> BTreeMap<IpAddr, String> {
        self.pods
            .iter()
            .map(|p| (p.ip, p.owner().to_string()))
            .collect()
    }

    /// Every node route, the pods' included, as a map (for tests and dumps).
    pub fn node_routes_map(&self) -> BTreeMap<RouteKey, Route> {
        let mut m = self.node.routes.clone();
        if let Some(shape) = &self.pod_route {
            for r in self.pods.iter().filter_map(|p| shape.route(p)) {
                m.insert(r.key, r);
            }
        }
        m
    }

    /// Every node sysctl, the pods' rp_filter included, as a map (for tests and dumps).
    pub fn node_sysctls_map(&self) -> BTreeMap<String, String> {
        let mut m = self.node.sysctls.clone();
        for h in self.pods.iter().filter_map(|p| p.host_if()) {
            m.insert(rp_filter_key(h), "2".into());
        }
        m
    }
}

/// The enrolled IPs of the registry with their owners, sorted by IP: per IP the record with the
/// highest `seq` (the later one in the registry on a tie), as [`Registry::enrolled_ips`] says,
/// without building a map.
pub fn enrolled_sorted(reg: &Registry) -> Vec<(IpAddr, &PodRecord)> {
    let mut v: Vec<(IpAddr, &PodRecord)> = reg
        .records()
        .filter(|r| r.enrolled)
        .flat_map(|r| r.ips.iter().map(move |ip| (*ip, r)))
        .collect();
    // Stable: records with the same IP and seq keep their registry order; the last one wins.
    v.sort_by_key(|(ip, r)| (*ip, r.seq));
    let mut out: Vec<(IpAddr, &PodRecord)> = Vec::with_capacity(v.len());
    for (ip, r) in v {
        match out.last_mut() {
            Some(last) if last.0 == ip => last.1 = r,
            _ => out.push((ip, r)),
        }
    }
    out
}

/// The node-side objects of one family.
fn node_family(cfg: &Config, f: Family, zt: Option<&Ztunnel>, d: &mut NsDesired) {
    let zip = zt.and_then(|z| z.ip_of(f).map(|ip| (z, ip)));
    d.rules.extend(node_rules(f));
    let chains = node_chains(
        cfg,
        f,
        zip.map(|(z, ip)| (z.host_if.as_str(), ip)),
        host_ip_of(cfg, f, zt),
    );
    match f {
        Family::V4 => d.chains = chains,
        Family::V6 => d.chains6 = chains,
    }
    if !cfg.fail_open {
        let r = unreachable(tables::OUTBOUND, Prefix::default_of(f));
        d.routes.insert(r.key, r);
    }
    if let Some((z, ip)) = zip {
        for t in NODE_TABLES {
            let r = zt_link_route(t, ip, &z.host_if);
            d.routes.insert(r.key, r);
        }
        let out = Route {
            dev: Some(cfg.outbound.0.clone()),
            via: Some(cfg.outbound_gw(f)),
            ..route(tables::OUTBOUND, Prefix::default_of(f), 0)
        };
        d.routes.insert(out.key, out);
        let ret = Route {
            dev: Some(z.host_if.clone()),
            via: Some(ip),
            onlink: true,
            ..route(tables::PROXY_RET, Prefix::default_of(f), 0)
        };
        d.routes.insert(ret.key, ret);
    }
}

/// The whole desired state. `zt` is the active ztunnel whose netns exists, if any.
pub fn desired<'a>(cfg: &Config, reg: &'a Registry, zt: Option<&Ztunnel>) -> Desired<'a> {
    let fams = cfg.ip_families;
    let mut d = Desired {
        families: fams.iter().collect(),
        ..Desired::default()
    };
    d.pods = enrolled_sorted(reg)
        .into_iter()
        .filter(|(ip, _)| fams.has(Family::of(*ip)))
        .map(|(ip, rec)| PodWant {
            ip,
            src: pod_src(cfg, rec, ip, zt),
            rec,
        })
        .collect();
    if zt.is_some() {
        d.pod_route = Some(PodRouteShape {
            dev: cfg.inbound.0.clone(),
            via: routed(cfg, Family::V4, zt).then(|| cfg.inbound_gw(Family::V4)),
            via6: routed(cfg, Family::V6, zt).then(|| cfg.inbound_gw(Family::V6)),
        });
    }
    for f in fams.iter() {
        node_family(cfg, f, zt, &mut d.node);
    }
    if let Some(z) = zt {
        d.node.sysctls.insert(rp_filter_key(&z.host_if), "2".into());
        d.tunnels = Some(tunnels(cfg, z));
        let mut zd = NsDesired::default();
        for f in fams.iter() {
            let Some(ip) = z.ip_of(f) else { continue };
            zd.rules.extend(zt_rules(f));
            let chains = zt_chains(cfg, f, z, ip);
            match f {
                Family::V4 => zd.chains = chains,
                Family::V6 => zd.chains6 = chains,
            }
            // IPv6 local routes, like every IPv6 route, report no scope.
            let local = Route {
                kind: RouteKind::Local,
                dev: Some("lo".into()),
                scope: if f.is_v6() {
                    Scope::Universe
                } else {
                    Scope::Host
                },
                ..route(tables::ZT_LOCAL, Prefix::default_of(f), 0)
            };
            zd.routes.insert(local.key, local);
        }
        for name in [&cfg.inbound.2, &cfg.outbound.2] {
            zd.sysctls.insert(rp_filter_key(name), "2".into());
        }
        d.zt = Some((z.ns.clone(), zd));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cid: &str, ips: &[&str], enrolled: bool) -> PodRecord {
        PodRecord {
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{cid}"),
            namespace: "default".into(),
            name: cid.into(),
            uid: format!("uid-{cid}"),
            network: "n".into(),
            ips: ips.iter().filter_map(|i| i.parse().ok()).collect(),
            gateway: None,
            gateway6: None,
            host_if: Some(format!("veth{cid}")),
            enrolled,
            ztunnel: false,
            seq: 0,
        }
    }

    #[test]
    fn enrolled_sorted_agrees_with_enrolled_ips() {
        let mut reg = Registry::default();
        reg.upsert(rec("a", &["10.0.0.2", "10.0.0.9"], true));
        reg.upsert(rec("b", &["10.0.0.1"], true));
        // A later owner of a reused IP wins; an unenrolled record owns nothing.
        reg.upsert(rec("c", &["10.0.0.2"], true));
        reg.upsert(rec("d", &["10.0.0.3", "10.0.0.1"], false));
        let want: Vec<(IpAddr, &str)> = reg
            .enrolled_ips()
            .into_iter()
            .map(|(ip, r)| (ip, r.owner()))
            .collect();
        let got: Vec<(IpAddr, &str)> = enrolled_sorted(&reg)
            .into_iter()
            .map(|(ip, r)| (ip, r.owner()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got.len(), 3);
        assert!(got.contains(&(IpAddr::from(Ipv4Addr::new(10, 0, 0, 2)), "uid-c")));
    }
}
