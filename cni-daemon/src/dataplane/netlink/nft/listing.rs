//! Our table as `explain` reads it, on the calling thread's netns: each chain of a family with
//! its hook and the text of each rule (the iptables form it was compiled from, kept in the rule's
//! comment), and the pod set's addresses. Synchronous and read-only: a debugging command, not
//! the per-pod path.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::compile::hook_of;
use super::{list_chains, visit_set, NftSocket, TABLE};
use crate::model::Family;

/// One of our chains of the family asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedChain {
    /// Its nft name (`ip-mangle-prerouting`).
    pub name: String,
    /// The iptables table and built-in chain it stands for (`mangle`, `PREROUTING`), read from
    /// its name; `None` when the name is not one of ours.
    pub stands_for: Option<(String, String)>,
    /// Whether it is hooked where that table's chain is (type, hook and priority).
    pub hooked_right: bool,
    /// Each rule's text, `None` for a rule without our comment (not made by us).
    pub rules: Vec<Option<String>>,
}

/// Our table in this netns, for family `f`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableListing {
    /// Whether table inet ambient-cni exists.
    pub exists: bool,
    /// Its chains of family `f` (name prefix `ip-` or `ip6-`).
    pub chains: Vec<ListedChain>,
    /// The pod set of `f` (`pods4`, `pods6`), if there is one.
    pub set: Option<BTreeSet<IpAddr>>,
}

/// The iptables table and built-in chain the nft chain `name` of family `f` stands for.
fn stands_for(f: Family, name: &str) -> Option<(String, String)> {
    let (table, hook) = of_family(f, name)?.split_once('-')?;
    let hook = hook.to_ascii_uppercase();
    hook_of(table, &hook)?;
    Some((table.to_string(), hook))
}

/// The rest of the nft chain name `name` after family `f`'s word (`mangle-prerouting` of
/// `ip-mangle-prerouting`), or `None` for another family's chain.
fn of_family(f: Family, name: &str) -> Option<&str> {
    name.strip_prefix(f.nft_word())?.strip_prefix('-')
}

/// Reads our table in the calling thread's netns.
pub fn list_table(f: Family) -> Result<TableListing, String> {
    let what = |e: super::NftError| format!("list nft table inet {TABLE}: {e}");
    let mut s = NftSocket::open().map_err(|e| format!("open an nfnetlink socket: {e}"))?;
    let listed = list_chains(&mut s).map_err(what)?;
    let mut set = BTreeSet::new();
    let has_set = visit_set(&mut s, f, |ip, _| {
        set.insert(ip);
    })
    .map_err(what)?;
    let mut out = TableListing {
        exists: !listed.is_empty() || has_set,
        set: has_set.then_some(set),
        ..Default::default()
    };
    for (name, hook) in listed {
        if of_family(f, &name).is_none() {
            continue; // the other family's chain
        }
        let sf = stands_for(f, &name);
        let hooked_right = sf
            .as_ref()
            .is_some_and(|(t, h)| super::hooked_as(&hook, t, h));
        let rules = super::rule_texts(&mut s, &name).map_err(what)?;
        out.chains.push(ListedChain {
            name,
            stands_for: sf,
            hooked_right,
            rules,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_map_back_to_what_they_stand_for() {
        let m = |t: &str, h: &str| Some((t.to_string(), h.to_string()));
        assert_eq!(
            stands_for(Family::V4, "ip-mangle-prerouting"),
            m("mangle", "PREROUTING")
        );
        assert_eq!(stands_for(Family::V6, "ip6-nat-output"), m("nat", "OUTPUT"));
        assert_eq!(
            stands_for(Family::V6, "ip6-filter-forward"),
            m("filter", "FORWARD")
        );
        // The other family's, and names that are not ours.
        assert_eq!(stands_for(Family::V4, "ip6-nat-output"), None);
        assert_eq!(stands_for(Family::V6, "ip-nat-output"), None);
        assert_eq!(stands_for(Family::V4, "ip-mangle-sideways"), None);
        assert_eq!(stands_for(Family::V4, "ip-weird-prerouting"), None);
        assert_eq!(stands_for(Family::V4, "ip"), None);
    }
}
