//! `ambient-cnid cleanup`: remove every object the daemon created — and nothing else.
//!
//! Only an explicit cleanup removes state; the daemon itself never flushes on start or stop, so
//! enrolled pods stay captured while it restarts. Cleanup keeps going past failures and reports
//! them all.

use std::path::Path;

use crate::config::{ipv6_available, Config};
use crate::dataplane::Dataplane;
use crate::model::{Family, Ns};
use crate::reconcile::desired::{
    node_chains, zt_chains, NODE_RULE_PRIORITIES, NODE_TABLES, ZT_RULE_PRIORITIES, ZT_TABLES,
};
use crate::reconcile::{ApplyReport, Ztunnel};
use crate::registry::Registry;

async fn clean_ns<D: Dataplane>(
    dp: &D,
    ns: &Ns,
    families: &[Family],
    prios: &[u32],
    tables: &[u32],
    report: &mut ApplyReport,
) {
    match dp.rules_list(ns, families, prios).await {
        Ok(rules) => {
            for r in rules {
                note(
                    report,
                    format!("rule del {r} in {ns}"),
                    dp.rule_del(ns, &r).await,
                );
            }
        }
        Err(e) => report.errors.push(format!("listing rules in {ns}: {e}")),
    }
    match dp.routes_list(ns, families, tables).await {
        Ok(routes) => {
            for r in routes {
                note(
                    report,
                    format!("route del {r} in {ns}"),
                    dp.route_del(ns, &r).await,
                );
            }
        }
        Err(e) => report.errors.push(format!("listing routes in {ns}: {e}")),
    }
}

fn note<E: std::fmt::Display>(report: &mut ApplyReport, what: String, r: Result<(), E>) {
    match r {
        Ok(()) => report.applied.push(what),
        Err(e) => report.errors.push(format!("{what}: {e}")),
    }
}

/// The families cleanup looks at: IPv4, and IPv6 whenever the kernel has it — whatever
/// `--ip-families` the daemon ran with, so that a daemon restarted with IPv6 off leaves nothing
/// of an earlier dual-stack run behind.
fn families() -> Vec<Family> {
    if ipv6_available() {
        Family::ALL.to_vec()
    } else {
        vec![Family::V4]
    }
}

/// What removes our chains of `f` with this dataplane's firewall, for the report.
fn chains_text<D: Dataplane>(dp: &D, f: Family) -> String {
    match (dp.is_nftables(), f) {
        (true, f) => format!(
            "nft {f} chains of table inet {} remove",
            crate::config::NFT_TABLE
        ),
        (false, Family::V4) => "iptables remove".into(),
        (false, Family::V6) => "ip6tables remove".into(),
    }
}

/// What destroys our pod set of `f`, for the report.
fn set_text<D: Dataplane>(dp: &D, f: Family) -> String {
    match (dp.is_nftables(), f) {
        (true, f) => format!("nft set {} destroy", crate::config::nft_set_name(f)),
        (false, Family::V4) => "ipset destroy".into(),
        (false, Family::V6) => format!("ipset destroy {}", crate::config::IPSET_NAME6),
    }
}

/// Remove our objects from the node netns and from the ztunnel netns the registry names.
pub async fn cleanup<D: Dataplane>(dp: &D, cfg: &Config, reg: &Registry) -> ApplyReport {
    let mut report = clean_families(dp, cfg, reg, &families()).await;
    for name in cfg.tunnel_names() {
        note(
            &mut report,
            format!("link del {name}"),
            dp.link_del(&name).await,
        );
    }
    report
}

/// The families the kernel has that `--ip-families` turns off: a daemon started with IPv6 off
/// after a dual-stack run removes their objects ([`clean_families`]) before its first reconcile,
/// which looks only at the families that are on.
pub fn families_off(cfg: &Config) -> Vec<Family> {
    families()
        .into_iter()
        .filter(|f| !cfg.ip_families.has(*f))
        .collect()
}

/// Remove our objects of `fams` (rules, routes, chains, the set) from the node netns and from the
/// ztunnel netns the registry names; the tunnel links stay (they serve the other family too).
pub async fn clean_families<D: Dataplane>(
    dp: &D,
    cfg: &Config,
    reg: &Registry,
    fams: &[Family],
) -> ApplyReport {
    let mut report = ApplyReport::default();
    if fams.is_empty() {
        return report;
    }
    // ztunnel netns first, while its tunnels still exist.
    if let Some(z) = reg.ztunnel().and_then(Ztunnel::from_record) {
        if let Ns::Pod(p) = &z.ns {
            if dp.netns_alive(Path::new(p)) {
                for f in fams {
                    // Only the chains' names count for a removal.
                    let ip = z.ip_of(*f).unwrap_or(f.unspecified());
                    note(
                        &mut report,
                        format!("{} in {}", chains_text(dp, *f), z.ns),
                        dp.chains_remove(&z.ns, *f, &zt_chains(cfg, *f, &z, ip))
                            .await,
                    );
                }
                clean_ns(
                    dp,
                    &z.ns,
                    fams,
                    &ZT_RULE_PRIORITIES,
                    &ZT_TABLES,
                    &mut report,
                )
                .await;
            }
        }
    }
    // Stop steering first (rules), then routes, chains, the set (once nothing references it).
    clean_ns(
        dp,
        &Ns::Node,
        fams,
        &NODE_RULE_PRIORITIES,
        &NODE_TABLES,
        &mut report,
    )
    .await;
    for f in fams {
        note(
            &mut report,
            format!("{} in node", chains_text(dp, *f)),
            dp.chains_remove(&Ns::Node, *f, &node_chains(cfg, *f, None, None))
                .await,
        );
    }
    for f in fams {
        note(&mut report, set_text(dp, *f), dp.podset_destroy(*f).await);
    }
    report
}

/// Removes the objects of the *other* firewall driver (`dp` is a dataplane opened with it): its
/// chains in the node netns and in the ztunnel netns `zt` (the one of the previous run), and
/// its pod sets. For a daemon switched from iptables to nftables or back, called once its own
/// objects are all in place (its first reconcile succeeded), so that no enrolled pod's TCP is
/// ever without capture. Idempotent: nothing to remove is no error.
pub async fn retire_firewall<D: Dataplane>(
    dp: &D,
    cfg: &Config,
    zt: Option<&Ztunnel>,
) -> ApplyReport {
    let mut report = ApplyReport::default();
    let fams = families();
    if let Some(z) = zt {
        if let Ns::Pod(p) = &z.ns {
            if dp.netns_alive(Path::new(p)) {
                for f in &fams {
                    let ip = z.ip_of(*f).unwrap_or(f.unspecified());
                    note(
                        &mut report,
                        format!("{} in {}", chains_text(dp, *f), z.ns),
                        dp.chains_remove(&z.ns, *f, &zt_chains(cfg, *f, z, ip))
                            .await,
                    );
                }
            }
        }
    }
    for f in &fams {
        note(
            &mut report,
            format!("{} in node", chains_text(dp, *f)),
            dp.chains_remove(&Ns::Node, *f, &node_chains(cfg, *f, None, None))
                .await,
        );
    }
    for f in &fams {
        note(&mut report, set_text(dp, *f), dp.podset_destroy(*f).await);
    }
    report
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::daemon::Daemon;
    use crate::dataplane::fake::FakeDataplane;

    #[tokio::test]
    async fn cleanup_leaves_nothing_of_ours() {
        let mut cfg = Config::default();
        cfg.ambient_namespaces.insert("default".into());
        let dp = Arc::new(FakeDataplane::new());
        dp.kernel().add_host_link("vethz");
        dp.kernel().add_host_link("vetha");
        let d = Daemon::new(Arc::new(cfg.clone()), dp.clone(), None, Registry::default());
        d.resync().await;
        let ev = crate::daemon::test_event;
        d.add(ev(
            "z",
            "istio-system",
            "ztunnel-abc",
            "10.244.1.2",
            "vethz",
        ))
        .await
        .expect("ztunnel add");
        d.add(ev("a", "default", "app", "10.244.1.5", "vetha"))
            .await
            .expect("pod add");
        let reg = {
            let mut r = Registry::default();
            r.upsert(crate::registry::PodRecord {
                container_id: "z".into(),
                ifname: "eth0".into(),
                netns: "/tmp/acni-fake-netns-z".into(),
                namespace: "istio-system".into(),
                name: "ztunnel-abc".into(),
                uid: "uid-z".into(),
                network: "k8s".into(),
                ips: vec!["10.244.1.2".parse().expect("ip")],
                gateway: None,
                gateway6: None,
                host_if: Some("vethz".into()),
                enrolled: false,
                ztunnel: true,
                seq: 0,
            });
            r
        };
        let rep = cleanup(&*dp, &cfg, &reg).await;
        assert!(rep.ok(), "{:?}", rep.errors);
        let k = dp.kernel();
        assert!(k.ipset.is_none());
        assert!(k.tunnels.is_empty());
        for (ns, n) in &k.ns {
            assert!(n.rules.is_empty(), "rules left in {ns}");
            assert!(n.routes.is_empty(), "routes left in {ns}");
            assert!(
                n.chains.is_empty() && n.jumps.is_empty(),
                "chains left in {ns}"
            );
        }
    }
}
