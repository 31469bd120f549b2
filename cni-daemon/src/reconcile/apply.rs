//! The only part of the reconciler with side effects: read back, and apply a plan.

use serde::Serialize;

use super::desired::{Desired, NODE_RULE_PRIORITIES, NODE_TABLES, ZT_RULE_PRIORITIES, ZT_TABLES};
use super::plan::{Observed, Op};
use crate::dataplane::{Dataplane, DpError};
use crate::model::{Ns, NsState};

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

async fn observe_ns<D: Dataplane>(
    dp: &D,
    ns: &Ns,
    want: &super::desired::NsDesired,
    prios: &[u32],
    tables: &[u32],
) -> Result<NsState, DpError> {
    let mut s = NsState {
        rules: dp.rules_list(ns, prios).await?.into_iter().collect(),
        routes: dp
            .routes_list(ns, tables)
            .await?
            .into_iter()
            .map(|r| (r.key, r))
            .collect(),
        iptables: dp.iptables_read(ns, &want.chains).await?,
        ..Default::default()
    };
    let keys: Vec<String> = want.sysctls.keys().cloned().collect();
    let values = dp.sysctl_read_many(ns, &keys).await?;
    for (key, v) in keys.into_iter().zip(values) {
        if let Some(v) = v {
            s.sysctls.insert(key, v);
        }
    }
    Ok(s)
}

/// Read back every object of ours that `want` concerns (and the ones of ours it does not want).
pub async fn observe<D: Dataplane>(
    dp: &D,
    want: &Desired,
    tunnel_names: &[String],
) -> Result<Observed, DpError> {
    let mut o = Observed {
        ipset: dp.ipset_list().await?,
        node: observe_ns(
            dp,
            &Ns::Node,
            &want.node,
            &NODE_RULE_PRIORITIES,
            &NODE_TABLES,
        )
        .await?,
        links_present: dp.tunnel_links_present(tunnel_names).await?,
        ..Default::default()
    };
    if let Some(t) = &want.tunnels {
        o.tunnels = dp.tunnels_read(t).await?;
    }
    if let Some((ns, zwant)) = &want.zt {
        o.zt = Some(observe_ns(dp, ns, zwant, &ZT_RULE_PRIORITIES, &ZT_TABLES).await?);
    }
    Ok(o)
}

async fn apply_one<D: Dataplane>(dp: &D, op: &Op) -> Result<(), DpError> {
    match op {
        Op::IpsetCreate => dp.ipset_create().await,
        Op::IpsetAdd { ip, owner } => dp.ipset_add(*ip, owner).await,
        Op::IpsetDel { ip } => dp.ipset_del(*ip).await,
        Op::TunnelCreate { tunnels, link } => dp.tunnel_create(tunnels, link).await,
        Op::LinkDel { name } => dp.link_del(name).await,
        Op::IptablesApply { ns, chains } => dp.iptables_apply(ns, chains).await,
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

/// Apply operations in order, keeping going past failures and reporting them all. Runs of ipset
/// adds and of route replaces go to the dataplane as batches, which a restore of thousands of pods
/// needs (one request at a time costs a round trip each).
pub async fn apply<D: Dataplane>(dp: &D, ops: &[Op]) -> ApplyReport {
    let mut report = ApplyReport::default();
    let mut record = |op: &Op, r: Result<(), DpError>| match r {
        Ok(()) => report.applied.push(op.to_string()),
        Err(e) => report.errors.push(format!("{op}: {e}")),
    };
    let mut at = 0;
    while let Some(first) = ops.get(at) {
        let n = batch_len(ops, at);
        let batch = ops.get(at..at + n).unwrap_or(&[]);
        at += n.max(1);
        if n < 2 {
            record(first, apply_one(dp, first).await);
            continue;
        }
        let results = match first {
            Op::IpsetAdd { .. } => {
                let entries: Vec<_> = batch
                    .iter()
                    .filter_map(|o| match o {
                        Op::IpsetAdd { ip, owner } => Some((*ip, owner.clone())),
                        _ => None,
                    })
                    .collect();
                dp.ipset_add_many(&entries).await
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
        };
        let mut results = results.into_iter();
        for op in batch {
            let r = results.next().unwrap_or_else(|| {
                Err(DpError::Netlink {
                    what: op.to_string(),
                    msg: "no result from the batch".into(),
                })
            });
            record(op, r);
        }
    }
    report
}
