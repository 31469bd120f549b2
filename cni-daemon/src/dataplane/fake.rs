//! An in-memory dataplane that behaves like an idempotent kernel, for unit tests without root.
//!
//! It models what the reconciler relies on: the ipset must exist before entries go in; a route
//! needs its device; deleting a link (or the ztunnel's netns) takes every route through it along;
//! sysctls exist only for existing interfaces. Tests reach into [`FakeKernel`] to break things the
//! way other agents do (flush the set, delete a rule) and assert the next plan repairs exactly that.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{Dataplane, DpError, DpResult, Firewall};
use crate::model::{
    Chain, Family, IpsetState, IptablesState, Ns, Prefix, Route, RouteKey, RouteKind, Rule, Scope,
    TunnelState, Tunnels,
};

/// One namespace's objects.
#[derive(Clone, Debug, Default)]
pub struct FakeNs {
    /// ip rules of ours (made with our protocol number).
    pub rules: BTreeSet<Rule>,
    /// ip rules another agent made (any other protocol): never listed, added or deleted by us,
    /// but there, as in a real kernel.
    pub foreign_rules: BTreeSet<Rule>,
    /// Routes of ours.
    pub routes: BTreeMap<RouteKey, Route>,
    /// iptables chains (table, name) → rules.
    pub chains: BTreeMap<(String, String), Vec<String>>,
    /// Jumps (table, hook, chain) → positions.
    pub jumps: BTreeMap<(String, String, String), Vec<usize>>,
    /// ip6tables chains (table, name) → rules.
    pub chains6: BTreeMap<(String, String), Vec<String>>,
    /// ip6tables jumps (table, hook, chain) → positions.
    pub jumps6: BTreeMap<(String, String, String), Vec<usize>>,
    /// Sysctl values that were written.
    pub sysctls: BTreeMap<String, String>,
    /// Interfaces that exist here.
    pub links: BTreeSet<String>,
}

/// iptables chains of one family: (table, name) → rules.
type ChainMaps0 = BTreeMap<(String, String), Vec<String>>;
/// iptables jumps of one family: (table, hook, chain) → positions.
type ChainMaps1 = BTreeMap<(String, String, String), Vec<usize>>;

impl FakeNs {
    /// The iptables (IPv4) or ip6tables (IPv6) chains and jumps.
    pub fn of(&self, f: Family) -> (&ChainMaps0, &ChainMaps1) {
        match f {
            Family::V4 => (&self.chains, &self.jumps),
            Family::V6 => (&self.chains6, &self.jumps6),
        }
    }
    /// The same, to change.
    pub fn of_mut(&mut self, f: Family) -> (&mut ChainMaps0, &mut ChainMaps1) {
        match f {
            Family::V4 => (&mut self.chains, &mut self.jumps),
            Family::V6 => (&mut self.chains6, &mut self.jumps6),
        }
    }
}

/// The whole fake kernel.
#[derive(Clone, Debug, Default)]
pub struct FakeKernel {
    /// The IPv4 ipset (None: not created).
    pub ipset: IpsetState,
    /// The IPv6 ipset (None: not created).
    pub ipset6: IpsetState,
    /// Namespaces by identity.
    pub ns: BTreeMap<Ns, FakeNs>,
    /// Node tunnel links → (peer netns, peer name).
    pub tunnels: BTreeMap<String, (Ns, String)>,
    /// IPv6 addresses of the tunnel links (node end, peer end), by node-side name: a link made
    /// without them has none (the kernel then has no IPv6 route to the peer's address).
    pub tunnel_addr6: BTreeMap<String, (Prefix, Prefix)>,
    /// Netns paths that no longer exist.
    pub dead: BTreeSet<PathBuf>,
    /// Main-table routes of the node: pod IP → host interface.
    pub host_routes: BTreeMap<IpAddr, String>,
    /// More main-table routes (subnets, gateways) for `main_route_lookup`; `host_routes` count
    /// as `/32 dev X scope link` routes on top of these.
    pub main_routes: Vec<Route>,
    /// Number of write operations performed.
    pub writes: usize,
}

impl FakeKernel {
    /// The ipset of a family.
    pub fn ipset_of(&mut self, f: Family) -> &mut IpsetState {
        match f {
            Family::V4 => &mut self.ipset,
            Family::V6 => &mut self.ipset6,
        }
    }

    fn ns_mut(&mut self, ns: &Ns) -> &mut FakeNs {
        self.ns.entry(ns.clone()).or_default()
    }

    /// Remove a netns as the kernel does when its last user goes: node links whose peer lived
    /// there vanish, and so does every node route through them.
    pub fn kill_ns(&mut self, path: &Path) {
        let ns = Ns::Pod(path.to_path_buf());
        self.dead.insert(path.to_path_buf());
        self.ns.remove(&ns);
        let gone: Vec<String> = self
            .tunnels
            .iter()
            .filter(|(_, (p, _))| *p == ns)
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            self.drop_node_link(&n);
        }
    }

    fn drop_node_link(&mut self, name: &str) {
        self.tunnel_addr6.remove(name);
        if let Some((peer_ns, peer)) = self.tunnels.remove(name) {
            if let Some(p) = self.ns.get_mut(&peer_ns) {
                p.links.remove(&peer);
                p.routes
                    .retain(|_, r| r.dev.as_deref() != Some(peer.as_str()));
                p.sysctls.retain(|k, _| !k.contains(&format!("/{peer}/")));
            }
        }
        let node = self.ns_mut(&Ns::Node);
        node.links.remove(name);
        node.routes.retain(|_, r| r.dev.as_deref() != Some(name));
        node.sysctls
            .retain(|k, _| !k.contains(&format!("/{name}/")));
    }

    /// Create a host interface in the node netns (a pod's veth).
    pub fn add_host_link(&mut self, name: &str) {
        self.ns_mut(&Ns::Node).links.insert(name.to_string());
    }

    /// Remove a host interface and the routes through it.
    pub fn del_host_link(&mut self, name: &str) {
        let node = self.ns_mut(&Ns::Node);
        node.links.remove(name);
        node.routes.retain(|_, r| r.dev.as_deref() != Some(name));
        node.sysctls
            .retain(|k, _| !k.contains(&format!("/{name}/")));
    }

    fn link_exists(&self, ns: &Ns, dev: &str) -> bool {
        dev == "lo" || self.ns.get(ns).is_some_and(|n| n.links.contains(dev))
    }

    fn alive(&self, ns: &Ns) -> bool {
        match ns {
            Ns::Node => true,
            Ns::Pod(p) => !self.dead.contains(p),
        }
    }
}

/// The fake dataplane.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    kernel: Mutex<FakeKernel>,
}

fn err(what: impl Into<String>, msg: &str) -> DpError {
    DpError::Netlink {
        what: what.into(),
        msg: msg.into(),
    }
}

impl FakeDataplane {
    /// A fresh, empty kernel.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inspect or break the fake kernel.
    pub fn kernel(&self) -> MutexGuard<'_, FakeKernel> {
        // A panic while holding the lock only happens inside a failing test.
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write<T>(&self, f: impl FnOnce(&mut FakeKernel) -> DpResult<T>) -> DpResult<T> {
        let mut k = self.kernel();
        let r = f(&mut k)?;
        k.writes += 1;
        Ok(r)
    }
}

fn sysctl_iface(key: &str) -> Option<&str> {
    key.strip_prefix("net/ipv4/conf/")?.split('/').next()
}

impl Firewall for FakeDataplane {
    async fn podset_list(&self, family: Family) -> DpResult<IpsetState> {
        Ok(self.kernel().ipset_of(family).clone())
    }
    async fn podset_create(&self, family: Family) -> DpResult<()> {
        self.write(|k| {
            k.ipset_of(family).get_or_insert_with(BTreeMap::new);
            Ok(())
        })
    }
    async fn podset_destroy(&self, family: Family) -> DpResult<()> {
        self.write(|k| {
            let name = format!("--match-set {} ", crate::config::ipset_name(family));
            let referenced = k.ns.get(&Ns::Node).is_some_and(|n| {
                n.chains
                    .values()
                    .chain(n.chains6.values())
                    .flatten()
                    .any(|r| r.contains(&name))
            });
            if referenced {
                return Err(err(
                    "destroy ipset",
                    "Set cannot be destroyed: it is in use by a kernel component",
                ));
            }
            *k.ipset_of(family) = None;
            Ok(())
        })
    }
    async fn podset_add(&self, ip: IpAddr, owner: &str) -> DpResult<()> {
        self.write(|k| match k.ipset_of(Family::of(ip)).as_mut() {
            Some(s) => {
                s.insert(ip, owner.to_string());
                Ok(())
            }
            None => Err(err(
                format!("ipset add {ip}"),
                "The set with the given name does not exist",
            )),
        })
    }
    async fn podset_del(&self, ip: IpAddr) -> DpResult<()> {
        self.write(|k| {
            if let Some(s) = k.ipset_of(Family::of(ip)).as_mut() {
                s.remove(&ip);
            }
            Ok(())
        })
    }
    async fn chains_read(
        &self,
        ns: &Ns,
        family: Family,
        chains: &[Chain],
    ) -> DpResult<IptablesState> {
        let k = self.kernel();
        let mut s = IptablesState::default();
        if let Some(n) = k.ns.get(ns) {
            let (nc, nj) = n.of(family);
            for c in chains {
                let key = (c.table.clone(), c.name.clone());
                if let Some(rules) = nc.get(&key) {
                    s.chains.insert(key, rules.clone());
                }
                let jk = (c.table.clone(), c.hook.clone(), c.name.clone());
                if let Some(p) = nj.get(&jk) {
                    s.jumps.insert(jk, p.clone());
                }
            }
        }
        Ok(s)
    }
    async fn chains_apply(&self, ns: &Ns, family: Family, chains: &[Chain]) -> DpResult<()> {
        self.write(|k| {
            if !k.alive(ns) {
                return Err(DpError::Netns {
                    path: ns.to_string(),
                    msg: "No such file or directory".into(),
                });
            }
            let (nc, nj) = k.ns_mut(ns).of_mut(family);
            for c in chains {
                nc.insert((c.table.clone(), c.name.clone()), c.rules.clone());
                nj.insert((c.table.clone(), c.hook.clone(), c.name.clone()), vec![1]);
            }
            Ok(())
        })
    }
    async fn chains_remove(&self, ns: &Ns, family: Family, chains: &[Chain]) -> DpResult<()> {
        self.write(|k| {
            let (nc, nj) = k.ns_mut(ns).of_mut(family);
            for c in chains {
                nc.remove(&(c.table.clone(), c.name.clone()));
                nj.remove(&(c.table.clone(), c.hook.clone(), c.name.clone()));
            }
            Ok(())
        })
    }
}

impl Dataplane for FakeDataplane {
    async fn rules_list(
        &self,
        ns: &Ns,
        families: &[Family],
        priorities: &[u32],
    ) -> DpResult<Vec<Rule>> {
        let k = self.kernel();
        Ok(k.ns
            .get(ns)
            .map(|n| {
                n.rules
                    .iter()
                    .filter(|r| priorities.contains(&r.priority) && families.contains(&r.family))
                    .copied()
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn rule_add(&self, ns: &Ns, rule: &Rule) -> DpResult<()> {
        self.write(|k| {
            if !k.alive(ns) {
                return Err(DpError::Netns {
                    path: ns.to_string(),
                    msg: "No such file or directory".into(),
                });
            }
            k.ns_mut(ns).rules.insert(*rule);
            Ok(())
        })
    }
    async fn rule_del(&self, ns: &Ns, rule: &Rule) -> DpResult<()> {
        self.write(|k| {
            k.ns_mut(ns).rules.remove(rule);
            Ok(())
        })
    }
    async fn routes_list(
        &self,
        ns: &Ns,
        families: &[Family],
        tables: &[u32],
    ) -> DpResult<Vec<Route>> {
        let k = self.kernel();
        Ok(k.ns
            .get(ns)
            .map(|n| {
                n.routes
                    .values()
                    .filter(|r| {
                        tables.contains(&r.key.table) && families.contains(&r.key.dst.family())
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn route_replace(&self, ns: &Ns, route: &Route) -> DpResult<()> {
        self.write(|k| {
            if let Some(dev) = &route.dev {
                if !k.link_exists(ns, dev) {
                    return Err(err(format!("route replace {route}"), "No such device"));
                }
            }
            // As the kernel: a next hop or source of the other family is invalid, and an IPv6
            // next hop on a tunnel link without an IPv6 address is unreachable.
            let fam = route.key.dst.family();
            if route
                .via
                .into_iter()
                .chain(route.src)
                .any(|a| Family::of(a) != fam)
            {
                return Err(err(format!("route replace {route}"), "Invalid argument"));
            }
            if let (Family::V6, Some(via), Some(dev), false) =
                (fam, route.via, &route.dev, route.onlink)
            {
                let on_tunnel = *ns == Ns::Node && k.tunnels.contains_key(dev);
                let covered = k
                    .tunnel_addr6
                    .get(dev)
                    .is_some_and(|(_, peer)| peer.addr == via);
                if on_tunnel && !covered {
                    return Err(err(
                        format!("route replace {route}"),
                        "Network is unreachable",
                    ));
                }
            }
            k.ns_mut(ns).routes.insert(route.key, route.clone());
            Ok(())
        })
    }
    async fn route_del(&self, ns: &Ns, route: &Route) -> DpResult<()> {
        self.write(|k| {
            let n = k.ns_mut(ns);
            if n.routes
                .get(&route.key)
                .is_some_and(|r| r.kind == route.kind)
            {
                n.routes.remove(&route.key);
            }
            Ok(())
        })
    }
    async fn tunnels_read(&self, want: &Tunnels) -> DpResult<TunnelState> {
        let k = self.kernel();
        let mut s = TunnelState::default();
        for l in &want.links {
            let addr6 = match (l.node_addr6, l.peer_addr6) {
                (Some(a), Some(b)) => Some((a, b)),
                _ => None,
            };
            let ok = k.tunnels.get(&l.node_name)
                == Some(&(want.ztunnel_ns.clone(), l.peer_name.clone()))
                && k.tunnel_addr6.get(&l.node_name).copied() == addr6
                && k.alive(&want.ztunnel_ns);
            if k.tunnels.contains_key(&l.node_name) || ok {
                s.links.insert(l.node_name.clone(), ok);
            }
        }
        Ok(s)
    }
    async fn tunnel_create(&self, want: &Tunnels, node_name: &str) -> DpResult<()> {
        self.write(|k| {
            if !k.alive(&want.ztunnel_ns) {
                return Err(DpError::Netns {
                    path: want.ztunnel_ns.to_string(),
                    msg: "No such file or directory".into(),
                });
            }
            let Some(l) = want.links.iter().find(|l| l.node_name == node_name) else {
                return Err(DpError::NoSuchLink(node_name.to_string()));
            };
            k.drop_node_link(node_name);
            k.tunnels.insert(
                node_name.to_string(),
                (want.ztunnel_ns.clone(), l.peer_name.clone()),
            );
            if let (Some(a), Some(b)) = (l.node_addr6, l.peer_addr6) {
                k.tunnel_addr6.insert(node_name.to_string(), (a, b));
            }
            k.ns_mut(&Ns::Node).links.insert(node_name.to_string());
            k.ns_mut(&want.ztunnel_ns).links.insert(l.peer_name.clone());
            Ok(())
        })
    }
    async fn link_del(&self, name: &str) -> DpResult<()> {
        self.write(|k| {
            k.drop_node_link(name);
            Ok(())
        })
    }
    async fn tunnel_links_present(&self, names: &[String]) -> DpResult<Vec<String>> {
        let k = self.kernel();
        Ok(names
            .iter()
            .filter(|n| k.tunnels.contains_key(*n))
            .cloned()
            .collect())
    }
    async fn sysctl_read(&self, ns: &Ns, key: &str) -> DpResult<Option<String>> {
        let k = self.kernel();
        let Some(iface) = sysctl_iface(key) else {
            return Ok(None);
        };
        if !k.link_exists(ns, iface) {
            return Ok(None);
        }
        Ok(Some(
            k.ns.get(ns)
                .and_then(|n| n.sysctls.get(key).cloned())
                .unwrap_or_else(|| "1".into()),
        ))
    }
    async fn sysctl_write(&self, ns: &Ns, key: &str, value: &str) -> DpResult<()> {
        self.write(|k| {
            let exists = sysctl_iface(key).is_some_and(|i| k.link_exists(ns, i));
            if !exists {
                return Err(DpError::Sysctl {
                    key: key.into(),
                    msg: "No such file or directory".into(),
                });
            }
            k.ns_mut(ns)
                .sysctls
                .insert(key.to_string(), value.to_string());
            Ok(())
        })
    }
    async fn route_dev_lookup(&self, ip: IpAddr) -> DpResult<Option<String>> {
        Ok(self.kernel().host_routes.get(&ip).cloned())
    }
    async fn main_route_lookup(&self, ip: IpAddr) -> DpResult<Option<Route>> {
        let k = self.kernel();
        if let Some(dev) = k.host_routes.get(&ip) {
            return Ok(Some(Route {
                key: RouteKey {
                    table: 254,
                    dst: Prefix::host(ip),
                    metric: 0,
                },
                kind: RouteKind::Unicast,
                dev: Some(dev.clone()),
                via: None,
                src: None,
                scope: Scope::Link,
                onlink: false,
            }));
        }
        let covers = |r: &&Route| match (r.key.dst.addr, ip) {
            (IpAddr::V4(dst), IpAddr::V4(ip)) => {
                let len = u32::from(r.key.dst.len.min(32));
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                u32::from(dst) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(dst), IpAddr::V6(ip)) => {
                let len = u32::from(r.key.dst.len.min(128));
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                u128::from(dst) & mask == u128::from(ip) & mask
            }
            _ => false,
        };
        Ok(k.main_routes
            .iter()
            .filter(covers)
            .max_by_key(|r| (r.key.dst.len, std::cmp::Reverse(r.key.metric)))
            .cloned())
    }
    fn netns_alive(&self, path: &Path) -> bool {
        !self.kernel().dead.contains(path)
    }
}
