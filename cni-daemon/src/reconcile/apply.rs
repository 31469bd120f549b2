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
        routes: dp.routes_list(ns, tables).await?.into_iter().map(|r| (r.key, r)).collect(),
        iptables: dp.iptables_read(ns, &want.chains).await?,
        ..Default::default()
    };
    for key in want.sysctls.keys() {
        if let Some(v) = dp.sysctl_read(ns, key).await? {
            s.sysctls.insert(key.clone(), v);
        }
    }
    Ok(s)
}

/// Read back every object of ours that `want` concerns (and the ones of ours it does not want).
pub async fn observe<D: Dataplane>(dp: &D, want: &Desired, tunnel_names: &[String]) -> Result<Observed, DpError> {
    let mut o = Observed {
        ipset: dp.ipset_list().await?,
        node: observe_ns(dp, &Ns::Node, &want.node, &NODE_RULE_PRIORITIES, &NODE_TABLES).await?,
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

/// Apply operations in order, keeping going past failures and reporting them all.
pub async fn apply<D: Dataplane>(dp: &D, ops: &[Op]) -> ApplyReport {
    let mut report = ApplyReport::default();
    for op in ops {
        match apply_one(dp, op).await {
            Ok(()) => report.applied.push(op.to_string()),
            Err(e) => report.errors.push(format!("{op}: {e}")),
        }
    }
    report
}
