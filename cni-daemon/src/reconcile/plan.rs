//! The difference between what we want and what the kernel has, as an ordered list of operations.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use super::desired::{pod_route_del, pod_routes, Desired, NsDesired, Ztunnel};
use crate::config::{ipset_name, Config};
use crate::model::RouteKey;
use crate::model::{
    rp_filter_key, Chain, Family, IpsetState, IptablesState, Ns, NsState, Route, Rule, TunnelState,
    Tunnels,
};
use crate::registry::Registry;

/// What was read back from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Observed {
    /// The IPv4 ipset (None: it does not exist).
    pub ipset: IpsetState,
    /// The IPv6 ipset (None: it does not exist, or IPv6 is off and it was not read).
    pub ipset6: IpsetState,
    /// Our objects in the node netns.
    pub node: NsState,
    /// Wiring of the desired tunnels (empty when none are desired).
    pub tunnels: TunnelState,
    /// Node-side tunnel links of ours that exist.
    pub links_present: Vec<String>,
    /// Our objects in the ztunnel netns (when one is desired and reachable).
    pub zt: Option<NsState>,
    /// Pods (aligned with [`Desired::pods`]) whose ipset entry was read back exactly as wanted;
    /// such entries are not in `ipset`, which holds the others (a resync then builds no map of
    /// 10,000 owner strings). Pods beyond its length are looked up in `ipset`.
    pub pod_in_set: Vec<bool>,
    /// Pods (aligned with [`Desired::pods`]) whose table-100 route was read back exactly as
    /// wanted; such routes are not in `node.routes`. Pods beyond its length are looked up there.
    pub pod_route_ok: Vec<bool>,
    /// The rp_filter of each desired pod's host interface, aligned with [`Desired::pods`]
    /// (`None`: no such interface, or the pod has none). Pods beyond its length are taken as
    /// holding what is wanted.
    pub pod_rp_filter: Vec<Option<i32>>,
}

impl Observed {
    /// The ipset of family `f`.
    pub fn ipset_of(&self, f: Family) -> &IpsetState {
        match f {
            Family::V4 => &self.ipset,
            Family::V6 => &self.ipset6,
        }
    }
    /// The ipset of family `f`, to fill.
    pub fn ipset_of_mut(&mut self, f: Family) -> &mut IpsetState {
        match f {
            Family::V4 => &mut self.ipset,
            Family::V6 => &mut self.ipset6,
        }
    }
}

/// One kernel operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    /// Create the ipset of a family.
    IpsetCreate {
        /// `ztunnel-pods-ips` (IPv4) or `ztunnel-pods-ips6` (IPv6).
        family: Family,
    },
    /// Add or update an entry (in the set of the IP's family).
    IpsetAdd {
        /// Pod IP.
        ip: IpAddr,
        /// Owner (comment).
        owner: String,
    },
    /// Remove an entry.
    IpsetDel {
        /// Pod IP.
        ip: IpAddr,
    },
    /// (Re)create one tunnel link pair.
    TunnelCreate {
        /// All tunnels (for the netns and addresses).
        tunnels: Tunnels,
        /// Node-side name of the pair to create.
        link: String,
    },
    /// Delete a node-side tunnel link.
    LinkDel {
        /// Its name.
        name: String,
    },
    /// Make our chains in `ns` exactly these, jumps first.
    IptablesApply {
        /// Namespace.
        ns: Ns,
        /// iptables (IPv4) or ip6tables (IPv6).
        family: Family,
        /// Chains.
        chains: Vec<Chain>,
    },
    /// Write a sysctl.
    SysctlWrite {
        /// Namespace.
        ns: Ns,
        /// Key under /proc/sys.
        key: String,
        /// Value.
        value: String,
    },
    /// Create or replace a route.
    RouteReplace {
        /// Namespace.
        ns: Ns,
        /// Route.
        route: Route,
    },
    /// Delete a route of ours.
    RouteDel {
        /// Namespace.
        ns: Ns,
        /// The route (key and kind are what is matched).
        route: Route,
    },
    /// Add a rule.
    RuleAdd {
        /// Namespace.
        ns: Ns,
        /// Rule.
        rule: Rule,
    },
    /// Delete a rule of ours.
    RuleDel {
        /// Namespace.
        ns: Ns,
        /// Rule.
        rule: Rule,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::IpsetCreate { family: Family::V4 } => write!(f, "create ipset"),
            Op::IpsetCreate { family } => write!(f, "create ipset {}", ipset_name(*family)),
            Op::IpsetAdd { ip, owner } => write!(f, "ipset add {ip} (owner {owner})"),
            Op::IpsetDel { ip } => write!(f, "ipset del {ip}"),
            Op::TunnelCreate { tunnels, link } => {
                write!(f, "create tunnel {link} into {}", tunnels.ztunnel_ns)
            }
            Op::LinkDel { name } => write!(f, "delete link {name}"),
            Op::IptablesApply { ns, family, chains } => {
                let names: BTreeSet<String> = chains
                    .iter()
                    .map(|c| format!("{}/{}", c.table, c.name))
                    .collect();
                let tool = match family {
                    Family::V4 => "iptables-restore",
                    Family::V6 => "ip6tables-restore",
                };
                write!(
                    f,
                    "{tool} in {ns}: {}",
                    names.into_iter().collect::<Vec<_>>().join(" ")
                )
            }
            Op::SysctlWrite { ns, key, value } => write!(f, "sysctl {key}={value} in {ns}"),
            Op::RouteReplace { ns, route } => write!(f, "route replace {route} in {ns}"),
            Op::RouteDel { ns, route } => write!(f, "route del {route} in {ns}"),
            Op::RuleAdd { ns, rule } => write!(f, "rule add {rule} in {ns}"),
            Op::RuleDel { ns, rule } => write!(f, "rule del {rule} in {ns}"),
        }
    }
}

/// An operation's text for the firewall in use: the same as [`Op`]'s `Display` on iptables; on
/// the nftables firewall the pod set and chain operations name the nft objects the driver
/// writes (`nft add element pods4 …`, `nft batch in node: table inet ambient-cni chains …`).
pub struct OpText<'a> {
    op: &'a Op,
    nft: bool,
}

impl Op {
    /// This operation's text, on the nftables firewall when `nft`.
    pub fn text(&self, nft: bool) -> OpText<'_> {
        OpText { op: self, nft }
    }
}

impl fmt::Display for OpText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::config::{nft_set_name, NFT_TABLE};
        if !self.nft {
            return self.op.fmt(f);
        }
        match self.op {
            Op::IpsetCreate { family } => write!(
                f,
                "create nft set inet {NFT_TABLE} {}",
                nft_set_name(*family)
            ),
            Op::IpsetAdd { ip, owner } => write!(
                f,
                "nft add element {} {ip} (owner {owner})",
                nft_set_name(crate::model::Family::of(*ip))
            ),
            Op::IpsetDel { ip } => write!(
                f,
                "nft delete element {} {ip}",
                nft_set_name(crate::model::Family::of(*ip))
            ),
            Op::IptablesApply { ns, family, chains } => {
                let names: BTreeSet<String> = chains.iter().map(|c| c.nft_name(*family)).collect();
                write!(
                    f,
                    "nft batch in {ns}: table inet {NFT_TABLE} chains {}",
                    names.into_iter().collect::<Vec<_>>().join(" ")
                )
            }
            other => other.fmt(f),
        }
    }
}

/// The iptables state a set of chains implies (each jump once, at position 1).
pub fn iptables_of(chains: &[Chain]) -> IptablesState {
    let mut s = IptablesState::default();
    for c in chains {
        s.chains
            .insert((c.table.clone(), c.name.clone()), c.rules.clone());
        s.jumps
            .insert((c.table.clone(), c.hook.clone(), c.name.clone()), vec![1]);
    }
    s
}

/// The interface a sysctl key is about (`net/ipv4/conf/<if>/...`).
fn sysctl_iface(key: &str) -> Option<&str> {
    key.strip_prefix("net/ipv4/conf/")?.split('/').next()
}

fn plan_ns(
    ns: &Ns,
    want: &NsDesired,
    have: &NsState,
    recreated: &BTreeSet<String>,
    wanted: &dyn Fn(&RouteKey) -> bool,
    ops: &mut Vec<Op>,
    dels: &mut Vec<Op>,
) {
    if iptables_of(&want.chains) != have.iptables {
        ops.push(Op::IptablesApply {
            ns: ns.clone(),
            family: Family::V4,
            chains: want.chains.clone(),
        });
    }
    if !want.chains6.is_empty() && iptables_of(&want.chains6) != have.iptables6 {
        ops.push(Op::IptablesApply {
            ns: ns.clone(),
            family: Family::V6,
            chains: want.chains6.clone(),
        });
    }
    for (key, value) in &want.sysctls {
        let fresh = sysctl_iface(key).is_some_and(|i| recreated.contains(i));
        let write = match have.sysctls.get(key) {
            Some(v) => v != value || fresh,
            // The interface does not exist: only write if this plan creates it.
            None => fresh,
        };
        if write {
            ops.push(Op::SysctlWrite {
                ns: ns.clone(),
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    for (key, route) in &want.routes {
        // Recreating a link makes the kernel drop every route through it: replay those.
        let through_new = route.dev.as_ref().is_some_and(|d| recreated.contains(d));
        if have.routes.get(key) != Some(route) || through_new {
            ops.push(Op::RouteReplace {
                ns: ns.clone(),
                route: route.clone(),
            });
        }
    }
    for rule in want.rules.difference(&have.rules) {
        ops.push(Op::RuleAdd {
            ns: ns.clone(),
            rule: *rule,
        });
    }
    for (key, route) in &have.routes {
        if !wanted(key) {
            dels.push(Op::RouteDel {
                ns: ns.clone(),
                route: route.clone(),
            });
        }
    }
    for rule in have.rules.difference(&want.rules) {
        dels.push(Op::RuleDel {
            ns: ns.clone(),
            rule: *rule,
        });
    }
}

/// Plan a full reconcile. The order makes each step's prerequisites exist: the set before the
/// rules that match it, links before routes and sysctls on them, node-wide routes before the
/// rules that steer into their tables, the pods' table-100 routes and ipset entries after
/// everything they rely on (side by side), and deletions last.
///
/// The per-pod part is a walk over `want.pods` (sorted, a few words each) against what
/// [`super::observe`] flagged as already right: nothing per pod is allocated unless it differs.
pub fn plan(want: &Desired, have: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut dels = Vec::new();
    let empty = BTreeMap::new();
    for f in &want.families {
        if have.ipset_of(*f).is_none() {
            ops.push(Op::IpsetCreate { family: *f });
        }
    }
    let have_set = |f: Family| have.ipset_of(f).as_ref().unwrap_or(&empty);
    let mut recreated = BTreeSet::new();
    match &want.tunnels {
        Some(t) => {
            for l in &t.links {
                if have.tunnels.links.get(&l.node_name) != Some(&true) {
                    ops.push(Op::TunnelCreate {
                        tunnels: t.clone(),
                        link: l.node_name.clone(),
                    });
                    recreated.insert(l.node_name.clone());
                    recreated.insert(l.peer_name.clone());
                }
            }
        }
        None => {
            for name in &have.links_present {
                dels.push(Op::LinkDel { name: name.clone() });
            }
        }
    }
    plan_ns(
        &Ns::Node,
        &want.node,
        &have.node,
        &recreated,
        &|k| want.wants_node_route(k),
        &mut ops,
        &mut dels,
    );
    // The pods' rp_filter (their host interfaces are never ones this plan creates).
    for (i, p) in want.pods.iter().enumerate() {
        let (Some(h), Some(Some(v))) = (p.host_if(), have.pod_rp_filter.get(i)) else {
            continue;
        };
        if *v != 2 {
            ops.push(Op::SysctlWrite {
                ns: Ns::Node,
                key: rp_filter_key(h),
                value: "2".into(),
            });
        }
    }
    if let Some((ns, zwant)) = &want.zt {
        let zhave = have.zt.clone().unwrap_or_default();
        plan_ns(
            ns,
            zwant,
            &zhave,
            &recreated,
            &|k| zwant.routes.contains_key(k),
            &mut ops,
            &mut dels,
        );
    }
    // The pods' table-100 routes, then their ipset entries: next to each other, so that apply
    // can run the two batches of a bulk repair side by side. A pod in the set whose route is not
    // there yet is no worse off than one not in the set: rule 103's lookup in table 100 finds
    // nothing and falls through to main.
    if let Some(shape) = &want.pod_route {
        let through_new = recreated.contains(&shape.dev);
        for (i, p) in want.pods.iter().enumerate() {
            if have.pod_route_ok.get(i) == Some(&true) && !through_new {
                continue;
            }
            let Some(route) = shape.route(p) else {
                continue;
            };
            let same = have
                .node
                .routes
                .get(&route.key)
                .is_some_and(|h| shape.matches(p, h));
            if !same || through_new {
                ops.push(Op::RouteReplace {
                    ns: Ns::Node,
                    route,
                });
            }
        }
    }
    for (i, p) in want.pods.iter().enumerate() {
        if have.pod_in_set.get(i) == Some(&true) {
            continue;
        }
        if have_set(p.family()).get(&p.ip).map(String::as_str) != Some(p.owner()) {
            ops.push(Op::IpsetAdd {
                ip: p.ip,
                owner: p.owner().to_string(),
            });
        }
    }
    for f in Family::ALL {
        // An entry of the wrong family in a set cannot be (the kernel refuses it); the filter
        // only keeps a fake or a hand-made set honest.
        for ip in have_set(f)
            .keys()
            .filter(|ip| want.pod(**ip).is_none() && Family::of(**ip) == f)
        {
            dels.push(Op::IpsetDel { ip: *ip });
        }
    }
    // Stop capturing before removing where captured traffic would go.
    dels.sort_by_key(|op| match op {
        Op::IpsetDel { .. } => 0,
        Op::RuleDel { .. } => 1,
        Op::RouteDel { .. } => 2,
        _ => 3,
    });
    ops.extend(dels);
    ops
}

/// The idempotent operations that bring the given IPs' objects in line with the registry: for an
/// IP with an enrolled owner, its rp_filter, table-100 routes and ipset entry; for an IP nobody
/// owns any more, the removal of the entry and the routes. Cost: constant per IP.
pub fn pod_ops(cfg: &Config, reg: &Registry, zt: Option<&Ztunnel>, ips: &[IpAddr]) -> Vec<Op> {
    let mut ops = Vec::new();
    for ip in ips {
        // A family that is off has no objects (its pods are refused before they get here).
        if !cfg.ip_families.has(Family::of(*ip)) {
            continue;
        }
        match reg.owner_of(*ip) {
            Some(rec) => {
                if let Some(h) = &rec.host_if {
                    ops.push(Op::SysctlWrite {
                        ns: Ns::Node,
                        key: rp_filter_key(h),
                        value: "2".into(),
                    });
                }
                for route in pod_routes(cfg, rec, *ip, zt) {
                    ops.push(Op::RouteReplace {
                        ns: Ns::Node,
                        route,
                    });
                }
                ops.push(Op::IpsetAdd {
                    ip: *ip,
                    owner: rec.owner().to_string(),
                });
            }
            None => {
                ops.push(Op::IpsetDel { ip: *ip });
                ops.push(Op::RouteDel {
                    ns: Ns::Node,
                    route: pod_route_del(*ip),
                });
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_texts_name_the_objects_of_the_firewall_in_use() {
        let chain = Chain {
            table: "mangle".into(),
            name: "ztunnel-PREROUTING".into(),
            hook: "PREROUTING".into(),
            rules: vec!["-j RETURN".into()],
        };
        let ops = [
            Op::IpsetCreate { family: Family::V6 },
            Op::IpsetAdd {
                ip: "10.244.1.2".parse().expect("ip"),
                owner: "uid-a".into(),
            },
            Op::IpsetDel {
                ip: "fd10::2".parse().expect("ip"),
            },
            Op::IptablesApply {
                ns: Ns::Node,
                family: Family::V6,
                chains: vec![chain],
            },
        ];
        let text = |nft| {
            ops.iter()
                .map(|o| o.text(nft).to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            text(false),
            [
                "create ipset ztunnel-pods-ips6",
                "ipset add 10.244.1.2 (owner uid-a)",
                "ipset del fd10::2",
                "ip6tables-restore in node: mangle/ztunnel-PREROUTING",
            ]
        );
        assert_eq!(
            text(true),
            [
                "create nft set inet ambient-cni pods6",
                "nft add element pods4 10.244.1.2 (owner uid-a)",
                "nft delete element pods6 fd10::2",
                "nft batch in node: table inet ambient-cni chains ip6-mangle-prerouting",
            ]
        );
        // Everything else reads the same on both.
        let other = Op::LinkDel {
            name: "istioin".into(),
        };
        assert_eq!(other.text(true).to_string(), other.to_string());
    }
}
