//! The only part of the reconciler with side effects: read back, and apply a plan.

use serde::Serialize;

use super::desired::{Desired, NODE_RULE_PRIORITIES, NODE_TABLES, ZT_RULE_PRIORITIES, ZT_TABLES};
use super::plan::{Observed, Op};
use crate::dataplane::{Dataplane, DpError};
use crate::model::{Family, IpsetState, Ns, NsState};

/// What an apply did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ApplyReport {
    /// Operations that succeeded, as text.
    pub applied: Vec<String>,
    /// Operations that failed, with the kernel's answer. Apply keeps going past failures.
    pub errors: Vec<String>,
}

impl ApplyReport {
    /// Nothing failed.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Our rules, routes and sysctls in `ns` (netlink and /proc/sys; the iptables state is read
/// apart, see [`observe`]). With `pods`, a route that is exactly one of those pods' table-100
/// route is flagged in `pod_route_ok` (aligned with `want.pods`) instead of kept.
async fn observe_ns<D: Dataplane>(
    dp: &D,
    ns: &Ns,
    want: &super::desired::NsDesired,
    families: &[Family],
    prios: &[u32],
    tables: &[u32],
    pods: Option<(&Desired<'_>, &mut Vec<bool>)>,
) -> Result<NsState, DpError> {
    let mut s = NsState {
        rules: dp
            .rules_list(ns, families, prios)
            .await?
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let routes = &mut s.routes;
    match pods {
        Some((d, ok)) => {
            ok.clear();
            ok.resize(d.pods.len(), false);
            dp.routes_visit(ns, families, tables, |r| {
                if let Some(i) = d.pod_route_index(r) {
                    if let Some(slot) = ok.get_mut(i) {
                        *slot = true;
                        return;
                    }
                }
                routes.insert(r.key, r.clone());
            })
            .await?;
        }
        None => {
            dp.routes_visit(ns, families, tables, |r| {
                routes.insert(r.key, r.clone());
            })
            .await?
        }
    }
    let keys: Vec<String> = want.sysctls.keys().cloned().collect();
    let values = dp.sysctl_read_many(ns, &keys).await?;
    for (key, v) in keys.into_iter().zip(values) {
        if let Some(v) = v {
            s.sysctls.insert(key, v);
        }
    }
    Ok(s)
}

/// The ipset of `family`: an entry that is exactly a wanted pod's is flagged in `in_set`
/// (aligned with `want.pods`, sized by the caller), the others are kept (`None`: no set).
async fn observe_ipset<D: Dataplane>(
    dp: &D,
    family: Family,
    want: &Desired<'_>,
    in_set: &mut [bool],
) -> Result<IpsetState, DpError> {
    let mut others = std::collections::BTreeMap::new();
    let exists = dp
        .podset_visit(family, |ip, owner| {
            if let Ok(i) = want.pods.binary_search_by_key(&ip, |p| p.ip) {
                if let (Some(p), Some(slot)) = (want.pods.get(i), in_set.get_mut(i)) {
                    if p.owner() == owner {
                        *slot = true;
                        return;
                    }
                }
            }
            others.insert(ip, owner.to_string());
        })
        .await?;
    Ok(exists.then_some(others))
}

/// The rp_filter of each pod's host interface, aligned with `want.pods`.
async fn pod_rp_filters<D: Dataplane>(
    dp: &D,
    want: &Desired<'_>,
) -> Result<Vec<Option<i32>>, DpError> {
    let names: Vec<&str> = want.pods.iter().filter_map(|p| p.host_if()).collect();
    let mut values = dp.rp_filter_read_many(&names).await?.into_iter();
    Ok(want
        .pods
        .iter()
        .map(|p| match p.host_if() {
            Some(_) => values.next().flatten(),
            None => None,
        })
        .collect())
}

/// Read back every object of ours that `want` concerns (and the ones of ours it does not want).
///
/// The iptables reads (an `iptables-save` process per namespace, on that namespace's worker
/// thread) run while the netlink reads go on, instead of one after the other.
pub async fn observe<D: Dataplane>(
    dp: &D,
    want: &Desired<'_>,
    tunnel_names: &[String],
) -> Result<Observed, DpError> {
    let fams = &want.families;
    let v6 = fams.contains(&Family::V6);
    let node_ipt = dp.chains_read(&Ns::Node, Family::V4, &want.node.chains);
    // ip6tables-save alongside iptables-save: each on its own worker thread.
    let node_ipt6 = async {
        if v6 {
            dp.chains_read(&Ns::Node, Family::V6, &want.node.chains6)
                .await
        } else {
            Ok(Default::default())
        }
    };
    let zt_ipt = async {
        match &want.zt {
            Some((ns, zwant)) => {
                let v4 = dp.chains_read(ns, Family::V4, &zwant.chains).await?;
                let v6 = if zwant.chains6.is_empty() {
                    Default::default()
                } else {
                    dp.chains_read(ns, Family::V6, &zwant.chains6).await?
                };
                Ok(Some((v4, v6)))
            }
            None => Ok(None),
        }
    };
    let rest = async {
        let mut o = Observed {
            pod_in_set: vec![false; want.pods.len()],
            ..Default::default()
        };
        for f in fams {
            let set = observe_ipset(dp, *f, want, &mut o.pod_in_set).await?;
            *o.ipset_of_mut(*f) = set;
        }
        o.node = observe_ns(
            dp,
            &Ns::Node,
            &want.node,
            fams,
            &NODE_RULE_PRIORITIES,
            &NODE_TABLES,
            Some((want, &mut o.pod_route_ok)),
        )
        .await?;
        o.links_present = dp.tunnel_links_present(tunnel_names).await?;
        if let Some(t) = &want.tunnels {
            o.tunnels = dp.tunnels_read(t).await?;
        }
        if let Some((ns, zwant)) = &want.zt {
            o.zt =
                Some(observe_ns(dp, ns, zwant, fams, &ZT_RULE_PRIORITIES, &ZT_TABLES, None).await?);
        }
        o.pod_rp_filter = pod_rp_filters(dp, want).await?;
        Ok::<_, DpError>(o)
    };
    let (node_ipt, node_ipt6, zt_ipt, o) = futures::join!(node_ipt, node_ipt6, zt_ipt, rest);
    let mut o = o?;
    o.node.iptables = node_ipt?;
    o.node.iptables6 = node_ipt6?;
    if let (Some(z), Some((ipt, ipt6))) = (o.zt.as_mut(), zt_ipt?) {
        z.iptables = ipt;
        z.iptables6 = ipt6;
    }
    Ok(o)
}

async fn apply_one<D: Dataplane>(dp: &D, op: &Op) -> Result<(), DpError> {
    match op {
        Op::IpsetCreate { family } => dp.podset_create(*family).await,
        Op::IpsetAdd { ip, owner } => dp.podset_add(*ip, owner).await,
        Op::IpsetDel { ip } => dp.podset_del(*ip).await,
        Op::TunnelCreate { tunnels, link } => dp.tunnel_create(tunnels, link).await,
        Op::LinkDel { name } => dp.link_del(name).await,
        Op::IptablesApply { ns, family, chains } => dp.chains_apply(ns, *family, chains).await,
        Op::SysctlWrite { ns, key, value } => dp.sysctl_write(ns, key, value).await,
        Op::RouteReplace { ns, route } => dp.route_replace(ns, route).await,
        Op::RouteDel { ns, route } => dp.route_del(ns, route).await,
        Op::RuleAdd { ns, rule } => dp.rule_add(ns, rule).await,
        Op::RuleDel { ns, rule } => dp.rule_del(ns, rule).await,
    }
}

/// How many operations from `at` on form a batch: consecutive ipset adds, or consecutive route
/// replaces in one namespace (a plan puts them next to each other).
fn batch_len(ops: &[Op], at: usize) -> usize {
    let rest = ops.get(at..).unwrap_or(&[]);
    match rest.first() {
        Some(Op::IpsetAdd { .. }) => rest
            .iter()
            .take_while(|o| matches!(o, Op::IpsetAdd { .. }))
            .count(),
        Some(Op::RouteReplace { ns, .. }) => rest
            .iter()
            .take_while(|o| matches!(o, Op::RouteReplace { ns: n, .. } if n == ns))
            .count(),
        _ => 1,
    }
}

/// May `op` run while an `iptables-restore` started earlier in this plan is still running? Only
/// netlink writes that add what the plan wants and that no iptables rule needs to exist first:
/// sysctls, route replaces, rule adds and ipset adds (the set itself is created before any
/// restore, by an earlier step). Everything else waits for the restores in flight: another
/// restore of the same namespace, the set's creation, tunnels, and every deletion ("stop
/// capturing before removing where captured traffic would go").
fn overlaps_iptables(op: &Op, inflight_ns: &[&Ns]) -> bool {
    match op {
        Op::SysctlWrite { .. } | Op::RouteReplace { .. } | Op::RuleAdd { .. } => true,
        Op::IpsetAdd { .. } => true,
        Op::IptablesApply { ns, .. } => !inflight_ns.contains(&ns),
        Op::IpsetCreate { .. }
        | Op::IpsetDel { .. }
        | Op::TunnelCreate { .. }
        | Op::LinkDel { .. }
        | Op::RouteDel { .. }
        | Op::RuleDel { .. } => false,
    }
}

/// Room for the text of most operations (`route replace 10.244.39.16/32 via 192.168.126.1 dev
/// istioin table 100 src 10.244.0.1 in node` is 79 bytes).
const OP_TEXT_CAPACITY: usize = 96;

/// From how many operations each a batch of route replaces and the batch of ipset adds after it
/// run side by side (a pod ADD's single route and entry do not: a thread hop costs more than
/// they do).
const SIDE_BY_SIDE_MIN: usize = 64;

/// Runs one step (a single operation or a batch) and returns one result per operation.
async fn apply_step<D: Dataplane>(dp: &D, batch: &[Op]) -> Vec<Result<(), DpError>> {
    let Some(first) = batch.first() else {
        return Vec::new();
    };
    if batch.len() < 2 {
        return vec![apply_one(dp, first).await];
    }
    match first {
        Op::IpsetAdd { .. } => {
            let entries: Vec<_> = batch
                .iter()
                .filter_map(|o| match o {
                    Op::IpsetAdd { ip, owner } => Some((*ip, owner.clone())),
                    _ => None,
                })
                .collect();
            dp.podset_add_many(&entries).await
        }
        Op::RouteReplace { ns, .. } => {
            let routes: Vec<_> = batch
                .iter()
                .filter_map(|o| match o {
                    Op::RouteReplace { route, .. } => Some(route.clone()),
                    _ => None,
                })
                .collect();
            dp.route_replace_many(ns, &routes).await
        }
        _ => Vec::new(),
    }
}

/// Apply operations in order, keeping going past failures and reporting them all (in the order of
/// `ops`, whatever order they finished in).
///
/// Runs of ipset adds and of route replaces go to the dataplane as batches, which a restore of
/// thousands of pods needs (one request at a time costs a round trip each). An `iptables-restore`
/// (tens of milliseconds of another process, on its namespace's worker thread) runs while the
/// netlink writes after it go on, as far as [`overlaps_iptables`] allows: a restore after a flush
/// of 10,000 pods waited ~35–60 ms for it before the first route went in (acni-bench).
pub async fn apply<D: Dataplane>(dp: &D, ops: &[Op]) -> ApplyReport {
    use futures::future::{select, Either};
    use futures::stream::{FuturesUnordered, StreamExt};

    let mut results: Vec<Option<Result<(), DpError>>> = vec![None; ops.len()];
    // Restores in flight: (index in `ops`, its namespace, the future).
    let mut inflight = FuturesUnordered::new();
    let mut inflight_ns: Vec<(usize, &Ns)> = Vec::new();
    let mut at = 0;
    while let Some(first) = ops.get(at) {
        let busy: Vec<&Ns> = inflight_ns.iter().map(|(_, ns)| *ns).collect();
        if !inflight_ns.is_empty() && !overlaps_iptables(first, &busy) {
            while let Some((i, r)) = inflight.next().await {
                if let Some(slot) = results.get_mut(i) {
                    *slot = Some(r);
                }
            }
            inflight_ns.clear();
            continue;
        }
        if let Op::IptablesApply { ns, .. } = first {
            let i = at;
            inflight.push(async move { (i, apply_one(dp, first).await) });
            inflight_ns.push((i, ns));
            at += 1;
            continue;
        }
        let n = batch_len(ops, at).max(1);
        let batch = ops.get(at..at + n).unwrap_or(&[]);
        // A big batch of route replaces followed by a big batch of ipset adds (a plan puts the
        // pods' routes and entries next to each other): both at once, the ipset one first so
        // that it is under way (on a thread of its own, in the kernel-backed dataplane) while the
        // routes go in. Their order does not matter: a pod in the set without its table-100
        // route falls through to main, as if it were not in the set.
        let side_len = match (batch.first(), ops.get(at + n)) {
            (Some(Op::RouteReplace { .. }), Some(Op::IpsetAdd { .. })) if n >= SIDE_BY_SIDE_MIN => {
                let m = batch_len(ops, at + n);
                if m >= SIDE_BY_SIDE_MIN {
                    m
                } else {
                    0
                }
            }
            _ => 0,
        };
        let side = ops.get(at + n..at + n + side_len).unwrap_or(&[]);
        let both = async {
            let (side_out, mut out) = futures::join!(apply_step(dp, side), apply_step(dp, batch));
            out.extend(side_out);
            out
        };
        let n = n + side_len;
        // The step, while the restores in flight are driven to completion alongside it.
        let out = {
            let mut step = std::pin::pin!(both);
            loop {
                match select(step.as_mut(), inflight.next()).await {
                    Either::Left((out, _)) => break out,
                    Either::Right((Some((i, r)), _)) => {
                        if let Some(slot) = results.get_mut(i) {
                            *slot = Some(r);
                        }
                        inflight_ns.retain(|(j, _)| *j != i);
                    }
                    Either::Right((None, _)) => break step.await,
                }
            }
        };
        let mut out = out.into_iter();
        for slot in results.iter_mut().skip(at).take(n) {
            *slot = out.next();
        }
        at += n;
    }
    while let Some((i, r)) = inflight.next().await {
        if let Some(slot) = results.get_mut(i) {
            *slot = Some(r);
        }
    }
    let mut report = ApplyReport::default();
    // Each line written into a buffer of its final size at once: `to_string` grows it a few
    // times per line, and a restore of 10,000 pods reports 20,000 lines.
    let nft = dp.is_nftables();
    let text = |op: &Op| {
        use std::fmt::Write;
        let mut s = String::with_capacity(OP_TEXT_CAPACITY);
        let _ = write!(s, "{}", op.text(nft));
        s
    };
    for (op, r) in ops.iter().zip(results) {
        match r.unwrap_or_else(|| {
            Err(DpError::Netlink {
                what: op.text(nft).to_string(),
                msg: "no result from the batch".into(),
            })
        }) {
            Ok(()) => report.applied.push(text(op)),
            Err(e) => report.errors.push(format!("{}: {e}", op.text(nft))),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::FakeDataplane;
    use crate::model::{Chain, Prefix, Route};
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    fn chain(rule: &str) -> Vec<Chain> {
        vec![Chain {
            table: "mangle".into(),
            name: "ztunnel-PREROUTING".into(),
            hook: "PREROUTING".into(),
            rules: vec![rule.into()],
        }]
    }

    fn route(last: u8) -> Route {
        super::super::desired::route(100, Prefix::host(Ipv4Addr::new(10, 0, 0, last)), 0)
    }

    #[test]
    fn only_additions_overlap_a_restore() {
        let node = Ns::Node;
        let zt = Ns::Pod(PathBuf::from("/run/netns/zt"));
        let busy = [&node];
        let ipt = |ns: &Ns| Op::IptablesApply {
            ns: ns.clone(),
            family: Family::V4,
            chains: vec![],
        };
        assert!(overlaps_iptables(
            &Op::RouteReplace {
                ns: node.clone(),
                route: route(1)
            },
            &busy
        ));
        assert!(overlaps_iptables(
            &Op::IpsetAdd {
                ip: Ipv4Addr::LOCALHOST.into(),
                owner: "u".into()
            },
            &busy
        ));
        assert!(overlaps_iptables(&ipt(&zt), &busy));
        assert!(!overlaps_iptables(&ipt(&node), &busy));
        assert!(!overlaps_iptables(
            &Op::IpsetCreate { family: Family::V4 },
            &busy
        ));
        assert!(!overlaps_iptables(
            &Op::IpsetDel {
                ip: Ipv4Addr::LOCALHOST.into()
            },
            &busy
        ));
        assert!(!overlaps_iptables(
            &Op::RouteDel {
                ns: node.clone(),
                route: route(1)
            },
            &busy
        ));
        assert!(!overlaps_iptables(
            &Op::LinkDel {
                name: "istioin".into()
            },
            &busy
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn results_are_reported_in_plan_order_whatever_finished_first() {
        let dp = FakeDataplane::new();
        let mut ops = vec![
            Op::IpsetCreate { family: Family::V4 },
            Op::IptablesApply {
                ns: Ns::Node,
                family: Family::V4,
                chains: chain("-j RETURN"),
            },
        ];
        ops.extend((1..=3).map(|i| Op::RouteReplace {
            ns: Ns::Node,
            route: route(i),
        }));
        ops.extend((1..=3).map(|i| Op::IpsetAdd {
            ip: Ipv4Addr::new(10, 0, 0, i).into(),
            owner: format!("uid-{i}"),
        }));
        // A second restore of the same namespace waits for the first; so does a deletion.
        ops.push(Op::IptablesApply {
            ns: Ns::Node,
            family: Family::V4,
            chains: chain("-j ACCEPT"),
        });
        ops.push(Op::RouteDel {
            ns: Ns::Node,
            route: route(3),
        });
        ops.push(Op::IpsetDel {
            ip: Ipv4Addr::new(10, 0, 0, 9).into(),
        });
        let r = apply(&dp, &ops).await;
        assert!(r.ok(), "{:?}", r.errors);
        let want: Vec<String> = ops.iter().map(Op::to_string).collect();
        assert_eq!(r.applied, want);
        let k = dp.kernel();
        let node = k.ns.get(&Ns::Node).expect("node ns");
        assert_eq!(
            node.chains
                .get(&("mangle".to_string(), "ztunnel-PREROUTING".to_string())),
            Some(&vec!["-j ACCEPT".to_string()]),
            "the later restore won"
        );
        assert_eq!(node.routes.len(), 2);
        assert_eq!(k.ipset.as_ref().map(|s| s.len()), Some(3));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_restore_is_reported_and_the_rest_still_applied() {
        let dp = FakeDataplane::new();
        let dead = PathBuf::from("/run/netns/gone");
        dp.kernel().dead.insert(dead.clone());
        let ops = vec![
            Op::IpsetCreate { family: Family::V4 },
            Op::IptablesApply {
                ns: Ns::Pod(dead),
                family: Family::V4,
                chains: chain("-j RETURN"),
            },
            Op::RouteReplace {
                ns: Ns::Node,
                route: route(1),
            },
            Op::RouteReplace {
                ns: Ns::Node,
                route: route(2),
            },
        ];
        let r = apply(&dp, &ops).await;
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(
            r.errors[0].starts_with("iptables-restore in"),
            "{:?}",
            r.errors
        );
        assert_eq!(r.applied.len(), 3);
    }
}
