//! What the kernel should hold: a pure function of (config, registry, ztunnel).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::config::{marks, ports, tables, Config, IPSET_NAME};
use crate::model::{
    rp_filter_key, Chain, Ns, Prefix, Route, RouteKey, RouteKind, Rule, RuleAction, Scope,
    TunnelLink, TunnelMode, Tunnels,
};
use crate::registry::{PodRecord, Registry};

/// The node's active ztunnel as the reconciler needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ztunnel {
    /// Its netns (`Ns::Pod`).
    pub ns: Ns,
    /// Its pod IP (ZIP).
    pub ip: Ipv4Addr,
    /// Its host-side veth on the node (ZV).
    pub host_if: String,
    /// Its interface name inside the pod (CNI_IFNAME, usually eth0).
    pub ifname: String,
    /// Its gateway (a node address).
    pub gateway: Option<Ipv4Addr>,
}

impl Ztunnel {
    /// Build from the ztunnel's registry record; `None` if the record lacks what is needed.
    pub fn from_record(rec: &PodRecord) -> Option<Ztunnel> {
        Some(Ztunnel {
            ns: Ns::Pod(rec.netns.clone().into()),
            ip: *rec.ips.first()?,
            host_if: rec.host_if.clone()?,
            ifname: rec.ifname.clone(),
            gateway: rec.gateway,
        })
    }
}

/// Desired state of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NsDesired {
    /// Our ip rules.
    pub rules: BTreeSet<Rule>,
    /// Our routes by key.
    #[serde(serialize_with = "crate::model::map_as_pairs::serialize")]
    pub routes: BTreeMap<RouteKey, Route>,
    /// Our iptables chains (each jumped to from its hook, first).
    pub chains: Vec<Chain>,
    /// Sysctls to hold.
    pub sysctls: BTreeMap<String, String>,
}

/// One enrolled pod IP as a full reconcile wants it: its ipset entry (owner = the record's UID),
/// its rp_filter (on the record's host interface) and, with a ztunnel, its table-100 route.
///
/// Borrowed from the registry, a few words per pod: at 10,000 pods the desired state used to be
/// maps of formatted strings (a route with its `dev` name, an rp_filter key and value, an owner
/// copy per pod), ~3.6 MB built and dropped on every resync (acni-bench, massif).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodWant<'a> {
    /// The pod IP (unique in [`Desired::pods`], which is sorted by it).
    pub ip: Ipv4Addr,
    /// `src` of its table-100 route.
    pub src: Option<Ipv4Addr>,
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

/// What every pod's table-100 route has in common (`dev` and `via`); only with a ztunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRouteShape {
    /// The inbound tunnel.
    pub dev: String,
    /// Its gateway.
    pub via: Ipv4Addr,
}

impl PodRouteShape {
    /// The route of `p`.
    pub fn route(&self, p: &PodWant<'_>) -> Route {
        Route {
            dev: Some(self.dev.clone()),
            via: Some(self.via),
            src: p.src,
            ..route(tables::INBOUND, Prefix::host(p.ip), 0)
        }
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
            && have.via == Some(self.via)
            && have.src == p.src
            && have.scope == Scope::Universe
            && !have.onlink
    }
}

/// Everything the daemon wants the kernel to hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Desired<'a> {
    /// Enrolled pod IPs, sorted by IP, one entry each: the ipset entries, their table-100 routes
    /// and their host interfaces' rp_filter.
    pub pods: Vec<PodWant<'a>>,
    /// The shape of the pods' table-100 routes; `None`: no pod routes are wanted (no ztunnel).
    pub pod_route: Option<PodRouteShape>,
    /// The node namespace (node-wide objects; the per-pod ones are in `pods`).
    pub node: NsDesired,
    /// The tunnels into the ztunnel pod, when there is one.
    pub tunnels: Option<Tunnels>,
    /// The ztunnel's namespace and what it should hold.
    pub zt: Option<(Ns, NsDesired)>,
}

/// The node address used as `src` of table-100 routes and in the probe-skip rule.
pub fn host_ip(cfg: &Config, zt: Option<&Ztunnel>) -> Option<Ipv4Addr> {
    cfg.host_ip.or_else(|| zt.and_then(|z| z.gateway))
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

/// A route to ztunnel's pod IP over its veth, `scope link` (tables 100, 101, 102).
fn zt_link_route(table: u32, zt: &Ztunnel) -> Route {
    Route {
        dev: Some(zt.host_if.clone()),
        scope: Scope::Link,
        ..route(table, Prefix::host(zt.ip), 0)
    }
}

/// Table-100 routes of one enrolled pod IP.
pub fn pod_routes(cfg: &Config, rec: &PodRecord, ip: Ipv4Addr, zt: Option<&Ztunnel>) -> Vec<Route> {
    let mut out = Vec::new();
    if zt.is_some() {
        // An explicit --host-ip wins: with CNIs whose gateway is not a node address (Calico's
        // 169.254.1.1) the pod's gateway cannot be a route's preferred source.
        let src = cfg.host_ip.or(rec.gateway).or_else(|| host_ip(cfg, zt));
        out.push(Route {
            dev: Some(cfg.inbound.0.clone()),
            via: Some(cfg.inbound_gw()),
            src,
            ..route(tables::INBOUND, Prefix::host(ip), 0)
        });
    }
    out
}

/// The route a pod IP may have in table 100, as a deletion matches it (key and kind).
pub fn pod_route_del(ip: Ipv4Addr) -> Route {
    route(tables::INBOUND, Prefix::host(ip), 0)
}

fn mark(v: u32) -> String {
    format!("{v:#x}/{v:#x}")
}

/// The node's iptables chains (kernel-state.md §1.2, with the departures the README lists).
pub fn node_chains(cfg: &Config, zt: Option<&Ztunnel>, hip: Option<Ipv4Addr>) -> Vec<Chain> {
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
    if cfg.tunnel_mode == TunnelMode::Geneve {
        pre.push("-p udp -m udp --dport 6081 -j RETURN".to_string());
    }
    pre.push(format!(
        "-m connmark --mark {conn_skip} -j MARK --set-xmark {skip}"
    ));
    pre.push(format!("-m mark --mark {skip} -j RETURN"));
    if let Some(z) = zt {
        pre.push(format!(
            "! -i {} -m connmark --mark {proxy} -j MARK --set-xmark {ret}",
            z.host_if
        ));
    }
    pre.push(format!("-m mark --mark {ret} -j RETURN"));
    if let Some(z) = zt {
        pre.push(format!(
            "! -s {}/32 -i {} -j MARK --set-xmark {proxy}",
            z.ip, z.host_if
        ));
        pre.push(format!("-m mark --mark {skip} -j RETURN"));
        pre.push(format!("-i {} -j MARK --set-xmark {conn_skip}", z.host_if));
    }
    pre.push(format!("-p udp -j MARK --set-xmark {conn_skip}"));
    // Not in the original: ztunnel only takes TCP, so other protocols to an enrolled pod (ICMP,
    // anything but UDP) must not be routed into the inbound tunnel (prototype-findings B7).
    pre.push(format!(
        "! -p tcp -m set --match-set {IPSET_NAME} dst -j MARK --set-xmark {skip}"
    ));
    pre.push(format!("-m mark --mark {skip} -j RETURN"));
    pre.push(format!(
        "-p tcp -m set --match-set {IPSET_NAME} src -j MARK --set-xmark {out}"
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
            "-s {h}/32 -p tcp -m owner --socket-exists -m set --match-set {IPSET_NAME} dst -j MARK --set-xmark {conn_skip}"
        )],
        None => vec![],
    };
    // Not in the original: what the node itself sends to an enrolled pod that is not TCP (a ping
    // from the node, say) goes straight to the pod instead of into ztunnel, which only takes TCP;
    // B7 does the same for forwarded packets.
    output.push(format!(
        "! -p tcp -m set --match-set {IPSET_NAME} dst -j MARK --set-xmark {skip}"
    ));
    let accept = vec![format!("-m mark --mark {out} -j ACCEPT")];
    // Fail closed: TCP to an enrolled pod that leaves by any way but the inbound tunnel, carrying
    // none of the marks of captured (0x100), skipped (0x200) or ztunnel-return (0x040) traffic,
    // is going around ztunnel — because there is none (its netns vanished and took istioin and the
    // table-100 routes along) or it is between a DEL and its replacement's ADD. Rejected with a
    // reset. A rule, not an `unreachable` route: such a route for the pod's IP would also fail
    // the kernel's reverse-path check of the pod's own packets (ARP included).
    let hold = format!(
        "! -o {} -p tcp -m set --match-set {IPSET_NAME} dst -m mark --mark 0x0/{:#x} -j REJECT --reject-with tcp-reset",
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

/// The chain inside the ztunnel netns (§2): TPROXY into ztunnel's ports, and the mark that hands
/// replies to its original-source sockets to local delivery.
pub fn zt_chains(cfg: &Config, zt: &Ztunnel) -> Vec<Chain> {
    let tp = |port: u16| {
        format!(
            "-j TPROXY --on-port {port} --on-ip 127.0.0.1 --tproxy-mark {:#x}/{:#x}",
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
                "! -d {}/32 -i {} -p tcp -j MARK --set-xmark {:#x}/{:#x}",
                zt.ip,
                zt.ifname,
                marks::ORG_SRC_RET,
                marks::ZT_MASK
            ),
        ],
    }]
}

/// Node rules 100–103.
pub fn node_rules() -> BTreeSet<Rule> {
    [
        Rule {
            priority: tables::RULE_SKIP,
            fwmark: Some((marks::SKIP, marks::SKIP)),
            action: RuleAction::Goto(tables::MAIN_PRIORITY),
        },
        Rule {
            priority: tables::RULE_OUTBOUND,
            fwmark: Some((marks::OUTBOUND, marks::OUTBOUND)),
            action: RuleAction::Lookup(tables::OUTBOUND),
        },
        Rule {
            priority: tables::RULE_PROXY_RET,
            fwmark: Some((marks::PROXY_RET, marks::PROXY_RET)),
            action: RuleAction::Lookup(tables::PROXY_RET),
        },
        Rule {
            priority: tables::RULE_INBOUND,
            fwmark: None,
            action: RuleAction::Lookup(tables::INBOUND),
        },
    ]
    .into_iter()
    .collect()
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

/// The tunnels for this ztunnel.
pub fn tunnels(cfg: &Config, zt: &Ztunnel) -> Tunnels {
    let link = |t: &(String, Prefix, String, Prefix), vni: u32| TunnelLink {
        node_name: t.0.clone(),
        node_addr: t.1,
        peer_name: t.2.clone(),
        peer_addr: t.3,
        vni,
    };
    Tunnels {
        mode: cfg.tunnel_mode,
        ztunnel_ns: zt.ns.clone(),
        ztunnel_ip: zt.ip,
        node_ip: host_ip(cfg, Some(zt)).unwrap_or(Ipv4Addr::UNSPECIFIED),
        mtu: cfg.tunnel_mtu,
        links: vec![link(&cfg.inbound, 1000), link(&cfg.outbound, 1001)],
    }
}

impl Desired<'_> {
    /// Position of `ip` in [`Desired::pods`].
    pub fn pod(&self, ip: Ipv4Addr) -> Option<&PodWant<'_>> {
        let i = self.pods.binary_search_by_key(&ip, |p| p.ip).ok()?;
        self.pods.get(i)
    }

    /// The index in [`Desired::pods`] of the pod whose table-100 route `r` is exactly.
    pub fn pod_route_index(&self, r: &Route) -> Option<usize> {
        let shape = self.pod_route.as_ref()?;
        if r.key.table != tables::INBOUND || r.key.dst.len != 32 || r.key.metric != 0 {
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
            || (self.pod_route.is_some()
                && key.table == tables::INBOUND
                && key.metric == 0
                && key.dst.len == 32
                && self.pod(key.dst.addr).is_some())
    }

    /// The ipset as a map (IP → owner), for tests and dumps.
    pub fn ipset_map(&self) -> BTreeMap<Ipv4Addr, String> {
        self.pods
            .iter()
            .map(|p| (p.ip, p.owner().to_string()))
            .collect()
    }

    /// Every node route, the pods' included, as a map (for tests and dumps).
    pub fn node_routes_map(&self) -> BTreeMap<RouteKey, Route> {
        let mut m = self.node.routes.clone();
        if let Some(shape) = &self.pod_route {
            for p in &self.pods {
                let r = shape.route(p);
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
pub fn enrolled_sorted(reg: &Registry) -> Vec<(Ipv4Addr, &PodRecord)> {
    let mut v: Vec<(Ipv4Addr, &PodRecord)> = reg
        .records()
        .filter(|r| r.enrolled)
        .flat_map(|r| r.ips.iter().map(move |ip| (*ip, r)))
        .collect();
    // Stable: records with the same IP and seq keep their registry order; the last one wins.
    v.sort_by_key(|(ip, r)| (*ip, r.seq));
    let mut out: Vec<(Ipv4Addr, &PodRecord)> = Vec::with_capacity(v.len());
    for (ip, r) in v {
        match out.last_mut() {
            Some(last) if last.0 == ip => last.1 = r,
            _ => out.push((ip, r)),
        }
    }
    out
}

/// The whole desired state. `zt` is the active ztunnel whose netns exists, if any.
pub fn desired<'a>(cfg: &Config, reg: &'a Registry, zt: Option<&Ztunnel>) -> Desired<'a> {
    let hip = host_ip(cfg, zt);
    let mut d = Desired::default();
    let zt_src = host_ip(cfg, zt);
    d.pods = enrolled_sorted(reg)
        .into_iter()
        .map(|(ip, rec)| PodWant {
            ip,
            // As in `pod_routes`.
            src: cfg.host_ip.or(rec.gateway).or(zt_src),
            rec,
        })
        .collect();
    if zt.is_some() {
        d.pod_route = Some(PodRouteShape {
            dev: cfg.inbound.0.clone(),
            via: cfg.inbound_gw(),
        });
    }
    d.node.rules = node_rules();
    d.node.chains = node_chains(cfg, zt, hip);
    if !cfg.fail_open {
        let r = unreachable(tables::OUTBOUND, Prefix::DEFAULT);
        d.node.routes.insert(r.key, r);
    }
    if let Some(z) = zt {
        for t in NODE_TABLES {
            let r = zt_link_route(t, z);
            d.node.routes.insert(r.key, r);
        }
        let out = Route {
            dev: Some(cfg.outbound.0.clone()),
            via: Some(cfg.outbound_gw()),
            ..route(tables::OUTBOUND, Prefix::DEFAULT, 0)
        };
        d.node.routes.insert(out.key, out);
        let ret = Route {
            dev: Some(z.host_if.clone()),
            via: Some(z.ip),
            onlink: true,
            ..route(tables::PROXY_RET, Prefix::DEFAULT, 0)
        };
        d.node.routes.insert(ret.key, ret);
        d.node.sysctls.insert(rp_filter_key(&z.host_if), "2".into());
        d.tunnels = Some(tunnels(cfg, z));

        let mut zd = NsDesired {
            rules: [
                Rule {
                    priority: tables::ZT_RULE_TPROXY,
                    fwmark: Some((marks::TPROXY, marks::ZT_MASK)),
                    action: RuleAction::Lookup(tables::ZT_LOCAL),
                },
                Rule {
                    priority: tables::ZT_RULE_ORG_SRC,
                    fwmark: Some((marks::ORG_SRC_RET, marks::ZT_MASK)),
                    action: RuleAction::Lookup(tables::ZT_LOCAL),
                },
            ]
            .into_iter()
            .collect(),
            chains: zt_chains(cfg, z),
            ..Default::default()
        };
        let local = Route {
            kind: RouteKind::Local,
            dev: Some("lo".into()),
            scope: Scope::Host,
            ..route(tables::ZT_LOCAL, Prefix::DEFAULT, 0)
        };
        zd.routes.insert(local.key, local);
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
        let want: Vec<(Ipv4Addr, &str)> = reg
            .enrolled_ips()
            .into_iter()
            .map(|(ip, r)| (ip, r.owner()))
            .collect();
        let got: Vec<(Ipv4Addr, &str)> = enrolled_sorted(&reg)
            .into_iter()
            .map(|(ip, r)| (ip, r.owner()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got.len(), 3);
        assert!(got.contains(&(Ipv4Addr::new(10, 0, 0, 2), "uid-c")));
    }
}
