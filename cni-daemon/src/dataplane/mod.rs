//! The seam between the reconciler and the kernel.
//!
//! [`Dataplane`] has one small set of operations per kernel object kind. `netlink` (real: rtnetlink,
//! an ipset netlink encoder, `iptables-restore`, /proc/sys) and [`fake::FakeDataplane`] (an
//! in-memory model that behaves like an idempotent kernel) implement it. The reconciler only ever
//! talks to this trait, so its unit tests run without root.

pub mod fake;
pub mod netlink;

use std::future::Future;
use std::net::IpAddr;

use crate::model::{
    Chain, Family, IpsetState, IptablesState, Ns, Route, Rule, TunnelState, Tunnels,
};

/// A kernel operation failed. Every variant names the object it was about.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DpError {
    /// A netlink request failed (errno and what we were doing).
    #[error("{what}: {msg}")]
    Netlink {
        /// e.g. `add route 10.244.1.5/32 table 100`.
        what: String,
        /// The kernel's answer.
        msg: String,
    },
    /// iptables-restore / iptables-save failed.
    #[error("iptables ({ns}): {msg}")]
    Iptables {
        /// Namespace.
        ns: String,
        /// stderr of the command, trimmed.
        msg: String,
    },
    /// Opening or entering a network namespace failed.
    #[error("netns {path}: {msg}")]
    Netns {
        /// Path of the namespace.
        path: String,
        /// Cause.
        msg: String,
    },
    /// Reading or writing /proc/sys failed.
    #[error("sysctl {key}: {msg}")]
    Sysctl {
        /// Key under /proc/sys.
        key: String,
        /// Cause.
        msg: String,
    },
    /// A link we need (e.g. a pod's host veth) does not exist.
    #[error("no such interface: {0}")]
    NoSuchLink(String),
}

/// Result of a dataplane call.
pub type DpResult<T> = Result<T, DpError>;

/// The firewall half of the dataplane: the set of enrolled pod addresses and our constant chains.
/// Two drivers implement it inside the kernel-backed dataplane (`netlink::FirewallKind`):
/// iptables + ipset, and native nftables (one `inet` table of ours); the fake implements it once.
/// The reconciler speaks only of a pod set per family and of [`Chain`]s (rules in iptables-save
/// form, which the nftables driver compiles to nft expressions).
pub trait Firewall: Send + Sync + 'static {
    // --- the pod sets (ipsets `ztunnel-pods-ips`/`-ips6`, or nft sets `pods4`/`pods6` of our
    // table), one per family, node netns only ---
    /// All entries of the set of `family` with their comments, or `None` when it does not exist.
    fn podset_list(&self, family: Family) -> impl Future<Output = DpResult<IpsetState>> + Send;
    /// Hands every entry (IP, comment) of the set of `family` to `f`; false when the set does not
    /// exist. For a resync's comparison: the kernel-backed version keeps nothing per entry; this
    /// default lists them.
    fn podset_visit<F: FnMut(IpAddr, &str) + Send>(
        &self,
        family: Family,
        mut f: F,
    ) -> impl Future<Output = DpResult<bool>> + Send {
        async move {
            match self.podset_list(family).await? {
                None => Ok(false),
                Some(m) => {
                    for (ip, owner) in &m {
                        f(*ip, owner);
                    }
                    Ok(true)
                }
            }
        }
    }
    /// Whether this is the nftables firewall (our table inet ambient-cni): the texts of plans and
    /// traces name its objects ([`crate::reconcile::Op::text`]).
    fn is_nftables(&self) -> bool {
        false
    }
    /// Create the set of `family` (hash:ip, inet or inet6, with comments) if it does not exist.
    fn podset_create(&self, family: Family) -> impl Future<Output = DpResult<()>> + Send;
    /// Destroy the set of `family` (only after no iptables rule references it).
    fn podset_destroy(&self, family: Family) -> impl Future<Output = DpResult<()>> + Send;
    /// Add or update (`-exist`) one entry, in the set of its family, with its owner as comment.
    fn podset_add(&self, ip: IpAddr, owner: &str) -> impl Future<Output = DpResult<()>> + Send;
    /// [`Firewall::podset_add`] for many entries, one result each in order. A bulk repair (10,000
    /// entries after a flush) is what this is for: the kernel-backed version pipelines the
    /// requests; this default adds them one by one.
    fn podset_add_many(
        &self,
        entries: &[(IpAddr, String)],
    ) -> impl Future<Output = Vec<DpResult<()>>> + Send {
        async move {
            let mut out = Vec::with_capacity(entries.len());
            for (ip, owner) in entries {
                out.push(self.podset_add(*ip, owner).await);
            }
            out
        }
    }
    /// Delete one entry (from the set of its family).
    fn podset_del(&self, ip: IpAddr) -> impl Future<Output = DpResult<()>> + Send;

    // --- our chains (iptables/ip6tables chains, or base chains of our nft table) ---
    /// Our chains (by name) and the jumps to them, in `ns`, in the tables of `family`.
    fn chains_read(
        &self,
        ns: &Ns,
        family: Family,
        chains: &[Chain],
    ) -> impl Future<Output = DpResult<IptablesState>> + Send;
    /// Make `chains` hold exactly these rules and make each jump stand once, first in its hook.
    /// One `iptables-restore --noflush` (`ip6tables-restore` for IPv6) per namespace.
    fn chains_apply(
        &self,
        ns: &Ns,
        family: Family,
        chains: &[Chain],
    ) -> impl Future<Output = DpResult<()>> + Send;
    /// Remove the jumps to, and then the chains themselves.
    fn chains_remove(
        &self,
        ns: &Ns,
        family: Family,
        chains: &[Chain],
    ) -> impl Future<Output = DpResult<()>> + Send;
}

/// Typed kernel operations, per object kind. All writes are idempotent: adding what exists or
/// removing what is gone succeeds (the errno mapping lives in one place in each implementation).
/// The firewall objects are behind the [`Firewall`] supertrait.
pub trait Dataplane: Firewall {
    // --- ip rules (each of a family: `ip rule` and `ip -6 rule` are separate lists) ---
    /// Our rules (those carrying our protocol number) of `families` at the given priorities, in
    /// `ns`: a rule another agent put at one of our priorities is not listed, so it is never
    /// deleted.
    fn rules_list(
        &self,
        ns: &Ns,
        families: &[Family],
        priorities: &[u32],
    ) -> impl Future<Output = DpResult<Vec<Rule>>> + Send;
    /// Add a rule with our protocol number (EEXIST is fine).
    fn rule_add(&self, ns: &Ns, rule: &Rule) -> impl Future<Output = DpResult<()>> + Send;
    /// Delete our rule with this full selector (never another agent's).
    fn rule_del(&self, ns: &Ns, rule: &Rule) -> impl Future<Output = DpResult<()>> + Send;

    // --- routes (only those with our protocol number are listed or deleted; a route's family
    // is its prefix's, and IPv4 and IPv6 table N are separate tables) ---
    /// Our routes of `families` in the given tables.
    fn routes_list(
        &self,
        ns: &Ns,
        families: &[Family],
        tables: &[u32],
    ) -> impl Future<Output = DpResult<Vec<Route>>> + Send;
    /// Hands each of our routes of `families` in the given tables to `f`. For a resync's
    /// comparison: the kernel-backed version builds no list of the node's routes; this default
    /// lists them.
    fn routes_visit<F: FnMut(&Route) + Send>(
        &self,
        ns: &Ns,
        families: &[Family],
        tables: &[u32],
        mut f: F,
    ) -> impl Future<Output = DpResult<()>> + Send {
        async move {
            for r in self.routes_list(ns, families, tables).await? {
                f(&r);
            }
            Ok(())
        }
    }
    /// Create or replace a route (by its key).
    fn route_replace(&self, ns: &Ns, route: &Route) -> impl Future<Output = DpResult<()>> + Send;
    /// [`Dataplane::route_replace`] for many routes of one namespace, one result each in order
    /// (pipelined by the kernel-backed version, one by one here).
    fn route_replace_many(
        &self,
        ns: &Ns,
        routes: &[Route],
    ) -> impl Future<Output = Vec<DpResult<()>>> + Send {
        async move {
            let mut out = Vec::with_capacity(routes.len());
            for r in routes {
                out.push(self.route_replace(ns, r).await);
            }
            out
        }
    }
    /// Delete one of our routes: matched by key, kind (type) and our protocol — the kernel takes
    /// metric 0 as "any metric", the type tells a tunnel route from its unreachable fallback.
    /// ESRCH is fine.
    fn route_del(&self, ns: &Ns, route: &Route) -> impl Future<Output = DpResult<()>> + Send;

    // --- tunnel links ---
    /// Which of the tunnel links exist and whether each is wired as `want` says.
    fn tunnels_read(&self, want: &Tunnels) -> impl Future<Output = DpResult<TunnelState>> + Send;
    /// (Re)create the named link pair of `want` (deleting a stale one first), address it, bring it up.
    fn tunnel_create(
        &self,
        want: &Tunnels,
        node_name: &str,
    ) -> impl Future<Output = DpResult<()>> + Send;
    /// Delete a node-side tunnel link (its peer goes with it).
    fn link_del(&self, name: &str) -> impl Future<Output = DpResult<()>> + Send;
    /// Node-side tunnel links of ours that exist (by name), whatever their wiring.
    fn tunnel_links_present(
        &self,
        names: &[String],
    ) -> impl Future<Output = DpResult<Vec<String>>> + Send;

    // --- sysctls (per namespace) ---
    /// Read one key; `None` when it does not exist (e.g. the interface is gone).
    fn sysctl_read(
        &self,
        ns: &Ns,
        key: &str,
    ) -> impl Future<Output = DpResult<Option<String>>> + Send;
    /// [`Dataplane::sysctl_read`] for many keys of one namespace, in order: a resync reads one
    /// rp_filter per enrolled pod. The kernel-backed version reads them all in one go.
    fn sysctl_read_many(
        &self,
        ns: &Ns,
        keys: &[String],
    ) -> impl Future<Output = DpResult<Vec<Option<String>>>> + Send {
        async move {
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                out.push(self.sysctl_read(ns, k).await?);
            }
            Ok(out)
        }
    }
    /// The IPv4 rp_filter of each of these node interfaces, in order (`None`: no such interface).
    /// A resync reads one per enrolled pod: the kernel-backed version takes them from one netconf
    /// dump, with no key strings per pod; this default reads the keys under /proc/sys.
    fn rp_filter_read_many(
        &self,
        ifnames: &[&str],
    ) -> impl Future<Output = DpResult<Vec<Option<i32>>>> + Send {
        rp_filter_by_sysctl(self, ifnames)
    }
    /// Write one key.
    fn sysctl_write(
        &self,
        ns: &Ns,
        key: &str,
        value: &str,
    ) -> impl Future<Output = DpResult<()>> + Send;

    // --- lookups ---
    /// The node interface that the main table routes `ip` out of (the pod's host veth).
    fn route_dev_lookup(&self, ip: IpAddr)
        -> impl Future<Output = DpResult<Option<String>>> + Send;
    /// The main-table route the kernel picks for `ip` (longest prefix, then lowest metric),
    /// decoded, with its output interface by name; `None` when no unicast route matches or the
    /// winner has a shape we do not model (multipath). Enrolling a running pod without its CNI
    /// result reads its host interface from this, and only from a direct route (no gateway).
    /// Either family: the main table of `ip`'s family is read.
    fn main_route_lookup(&self, ip: IpAddr)
        -> impl Future<Output = DpResult<Option<Route>>> + Send;
    /// Does this netns path exist and is it a network namespace?
    fn netns_alive(&self, path: &std::path::Path) -> bool;
}

/// The rp_filter of each node interface in `ifnames`, read key by key under /proc/sys (the
/// default of [`Dataplane::rp_filter_read_many`], and the kernel-backed one's fallback). A value
/// that is not a number reads as -1: it is not what we want, so it is written.
pub(crate) async fn rp_filter_by_sysctl<D: Dataplane + ?Sized>(
    dp: &D,
    ifnames: &[&str],
) -> DpResult<Vec<Option<i32>>> {
    let keys: Vec<String> = ifnames
        .iter()
        .map(|n| crate::model::rp_filter_key(n))
        .collect();
    let values = dp.sysctl_read_many(&Ns::Node, &keys).await?;
    Ok(values
        .into_iter()
        .map(|v| v.map(|v| v.trim().parse().unwrap_or(-1)))
        .collect())
}
