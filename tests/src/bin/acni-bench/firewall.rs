//! The per-pod cost of each firewall driver, in the same run: the daemon is restarted on the same
//! state dir with `--firewall nftables` and `--firewall iptables` in turn (blocks A B A B, so a
//! drift of the machine's speed hits both alike), and each block times plugin ADDs of new pods at
//! the first level's population. What an ADD does differs only in the firewall half: one ipset
//! entry (ipset netlink) or one element of our nft set (one nfnetlink batch); the route and the
//! rp_filter write are the same.

use anyhow::{bail, Result};

use super::{log, ms, pct, sh_ok, Bench, Pct, PodSpec, WARMUP};

/// ADD p50/p99 of each driver over all its blocks.
#[derive(Default)]
pub(super) struct FirewallCost {
    pub iptables: Pct,
    pub nftables: Pct,
    /// Timed ADDs per driver.
    pub samples: usize,
}

/// The blocks, in order; the last one leaves the daemon on iptables, as the rest of the run is.
const BLOCKS: [&str; 4] = ["nftables", "iptables", "nftables", "iptables"];

pub(super) fn compare(b: &mut Bench, samples: usize) -> Result<FirewallCost> {
    let per_block = samples.div_ceil(2).max(5);
    let (mut ipt, mut nft) = (Vec::new(), Vec::new());
    for fw in BLOCKS {
        b.restart_daemon(&["--firewall", fw])?;
        for r in 0..WARMUP + per_block {
            let p = PodSpec::sample(b.samples);
            b.samples += 1;
            let a = b.call(&b.plugin, "ADD", &p, &b.pod_netns)?;
            if r == 0 {
                // The figure times real work: the pod is in this driver's set.
                check_in_set(fw, &p.ip)?;
            }
            b.call(&b.plugin, "DEL", &p, &b.pod_netns)?;
            if r >= WARMUP {
                if fw == "nftables" { &mut nft } else { &mut ipt }.push(a);
            }
        }
    }
    let cost = FirewallCost {
        iptables: pct(&ipt),
        nftables: pct(&nft),
        samples: ipt.len(),
    };
    log(format!(
        "{} pods: ADD p50 {} ms on nftables, {} ms on iptables ({} ADDs each, blocks {BLOCKS:?})",
        b.pods,
        ms(cost.nftables.p50),
        ms(cost.iptables.p50),
        cost.samples
    ));
    Ok(cost)
}

/// An error unless `ip` is in the pod set of driver `fw` (read with the distribution's tools).
fn check_in_set(fw: &str, ip: &str) -> Result<()> {
    let listing = if fw == "nftables" {
        sh_ok(&["nft", "list", "set", "inet", "ambient-cni", "pods4"])?
    } else {
        sh_ok(&["ipset", "list", "ztunnel-pods-ips"])?
    };
    if !listing.contains(ip) {
        bail!("{fw}: pod {ip} is not in the pod set after its ADD:\n{listing}");
    }
    Ok(())
}

/// nft ADD p50 ÷ iptables ADD p50.
pub(super) fn ratio(c: &FirewallCost) -> f64 {
    c.nftables.p50.as_secs_f64() / c.iptables.p50.as_secs_f64().max(1e-9)
}
