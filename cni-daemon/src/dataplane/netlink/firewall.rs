//! The firewall seam of the kernel-backed dataplane: which driver programs the pod sets and our
//! chains, and the [`Firewall`] implementation of [`RealDataplane`] that hands each call to it.
//!
//! Two drivers, as netavark keeps its firewall drivers behind one trait: iptables + ipset
//! ([`super::fw_iptables`]) and native nftables over netlink ([`super::nft`]). Routes, rules,
//! links, sysctls, the namespace workers and the reconciler are shared; only the pod set and
//! the constant chains differ.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::fw_iptables::IptablesFirewall;
use super::netns::NsWorker;
use super::nft::NftFirewall;
use super::{RealConfig, RealDataplane};
use crate::dataplane::{DpResult, Firewall};
use crate::model::{Chain, Family, IpsetState, IptablesState, Ns};

/// Which firewall driver to use (`ambient-cnid run --firewall`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FirewallKind {
    /// iptables (or ip6tables) chains through `iptables-restore`, pod sets as ipsets.
    #[default]
    Iptables,
    /// One nftables table `inet ambient-cni` of ours, written over netlink.
    Nftables,
}

impl FirewallKind {
    /// `iptables` or `nftables`.
    pub fn as_str(self) -> &'static str {
        match self {
            FirewallKind::Iptables => "iptables",
            FirewallKind::Nftables => "nftables",
        }
    }

    /// The other driver.
    pub fn other(self) -> FirewallKind {
        match self {
            FirewallKind::Iptables => FirewallKind::Nftables,
            FirewallKind::Nftables => FirewallKind::Iptables,
        }
    }
}

impl fmt::Display for FirewallKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FirewallKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(FirewallKind::Iptables),
            "nftables" | "nft" => Ok(FirewallKind::Nftables),
            other => Err(format!("unknown firewall {other:?} (iptables, nftables)")),
        }
    }
}

/// The driver in use.
pub(super) enum FwDriver {
    Iptables(IptablesFirewall),
    Nftables(NftFirewall),
}

impl FwDriver {
    /// Opens the driver's sockets in the node netns; returns it and a name for logs (the
    /// iptables variant, or `nftables`).
    pub(super) fn open(cfg: &RealConfig, node: &NsWorker) -> DpResult<(Self, &'static str)> {
        match cfg.firewall {
            FirewallKind::Iptables => {
                let (d, name) = IptablesFirewall::open(cfg, node)?;
                Ok((FwDriver::Iptables(d), name))
            }
            FirewallKind::Nftables => {
                Ok((FwDriver::Nftables(NftFirewall::open(node)?), "nftables"))
            }
        }
    }
}

impl RealDataplane {
    /// With the nftables firewall: calls `on_change` (from a thread of its own) whenever someone
    /// else changes our table, so that the caller can resync at once. False (and nothing
    /// started) with the iptables firewall, which has no such notifications.
    pub async fn watch_firewall(&self, on_change: impl Fn() + Send + 'static) -> DpResult<bool> {
        if !self.is_nftables() {
            return Ok(false);
        }
        let mon = super::nft::open_monitor(&self.node).await?;
        super::nft::watch(mon, on_change, None, "nft-monitor")?;
        Ok(true)
    }

    /// [`RealDataplane::watch_firewall`] for our table in another netns (the ztunnel's), until
    /// `stop` is set (the thread ends within half a second).
    pub async fn watch_firewall_in(
        &self,
        netns: &std::path::Path,
        on_change: impl Fn() + Send + 'static,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> DpResult<bool> {
        if !self.is_nftables() {
            return Ok(false);
        }
        let mon = super::nft::open_monitor(&*self.pod_worker(netns).await?).await?;
        super::nft::watch(mon, on_change, Some(stop), "nft-monitor-zt")?;
        Ok(true)
    }
}

impl Firewall for RealDataplane {
    fn is_nftables(&self) -> bool {
        matches!(self.fw, FwDriver::Nftables(_))
    }

    async fn podset_list(&self, family: Family) -> DpResult<IpsetState> {
        match &self.fw {
            FwDriver::Iptables(d) => d.podset_list(family).await,
            FwDriver::Nftables(d) => d.podset_list(&self.node, family).await,
        }
    }

    async fn podset_visit<F: FnMut(IpAddr, &str) + Send>(
        &self,
        family: Family,
        f: F,
    ) -> DpResult<bool> {
        match &self.fw {
            FwDriver::Iptables(d) => d.podset_visit(family, f).await,
            FwDriver::Nftables(d) => d.podset_visit(&self.node, family, f).await,
        }
    }

    async fn podset_create(&self, family: Family) -> DpResult<()> {
        match &self.fw {
            FwDriver::Iptables(d) => d.podset_create(family).await,
            FwDriver::Nftables(d) => d.podset_create(&self.node, family).await,
        }
    }

    async fn podset_destroy(&self, family: Family) -> DpResult<()> {
        match &self.fw {
            FwDriver::Iptables(d) => d.podset_destroy(family).await,
            FwDriver::Nftables(d) => d.podset_destroy(&self.node, family).await,
        }
    }

    async fn podset_add(&self, ip: IpAddr, owner: &str) -> DpResult<()> {
        match &self.fw {
            FwDriver::Iptables(d) => d.podset_add(ip, owner).await,
            FwDriver::Nftables(d) => d.podset_add(&self.node, ip, owner).await,
        }
    }

    async fn podset_add_many(&self, entries: &[(IpAddr, String)]) -> Vec<DpResult<()>> {
        match &self.fw {
            FwDriver::Iptables(d) => d.podset_add_many(entries).await,
            FwDriver::Nftables(d) => d.podset_add_many(&self.node, entries).await,
        }
    }

    async fn podset_del(&self, ip: IpAddr) -> DpResult<()> {
        match &self.fw {
            FwDriver::Iptables(d) => d.podset_del(ip).await,
            FwDriver::Nftables(d) => d.podset_del(&self.node, ip).await,
        }
    }

    async fn chains_read(
        &self,
        ns: &Ns,
        family: Family,
        chains: &[Chain],
    ) -> DpResult<IptablesState> {
        let w = self.worker(ns).await?;
        match &self.fw {
            FwDriver::Iptables(d) => d.chains_read(w, ns, family, chains).await,
            FwDriver::Nftables(d) => d.chains_read(w, ns, family, chains).await,
        }
    }

    async fn chains_apply(&self, ns: &Ns, family: Family, chains: &[Chain]) -> DpResult<()> {
        let w = self.worker(ns).await?;
        match &self.fw {
            FwDriver::Iptables(d) => d.chains_apply(w, ns, family, chains).await,
            FwDriver::Nftables(d) => d.chains_apply(w, ns, family, chains).await,
        }
    }

    async fn chains_remove(&self, ns: &Ns, family: Family, chains: &[Chain]) -> DpResult<()> {
        let w = self.worker(ns).await?;
        match &self.fw {
            FwDriver::Iptables(d) => d.chains_remove(w, ns, family, chains).await,
            FwDriver::Nftables(d) => d.chains_remove(w, ns, family, chains).await,
        }
    }
}
