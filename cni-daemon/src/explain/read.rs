//! Reads the live kernel state `explain` evaluates, of the packet's family: `ip -4|-6 -j rule`,
//! `ip -4|-6 -j route show table N` for every table a rule looks up, `iptables-save` or
//! `ip6tables-save` (the variant the daemon's detection picks) and `ipset save` — in the node
//! netns (the caller's) and, on a thread that entered it, in the ztunnel's. `explain` is a
//! debugging command, not the per-pod path: it uses the tools.
//!
//! On the nftables dataplane our chains and the pod set are read from table inet ambient-cni
//! over netlink (no `nft` binary): each base chain becomes a jump from the built-in chain it
//! stands for to `ambient-cni/<chain>`, holding the rule texts kept in the rules' comments, so
//! the same evaluator walks both dataplanes.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

use super::view::{self, NsView, RuleAction};
use crate::dataplane::netlink::nft_listing::{list_table, TableListing};
use crate::dataplane::netlink::{iptables_save_all, IptablesBackend};
use crate::model::Family;

/// The prefix of our nft chains as the evaluator sees them (a jump target of a built-in chain).
pub const NFT_CHAIN: &str = "ambient-cni/";

/// The firewall `explain` evaluates, as the daemon's `--firewall`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FirewallChoice {
    /// nftables when table inet ambient-cni exists in the netns read, else iptables.
    Auto,
    /// Our iptables chains and the ipset.
    Iptables,
    /// Our table inet ambient-cni.
    Nftables,
}

/// Pod sets by name (`ztunnel-pods-ips`, `ztunnel-pods-ips6`).
pub type Sets = std::collections::BTreeMap<String, BTreeSet<std::net::IpAddr>>;

fn run(argv: &[&str]) -> Result<String, String> {
    let (bin, args) = argv.split_first().ok_or("empty command")?;
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}: {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One namespace (the calling thread's), the side of family `f`: its ip rules and routes
/// (`ip -4` / `ip -6`) and its iptables / ip6tables rules, with our nft table merged in on the
/// nftables dataplane — then also our pod set of `f`, by the name the rules use (`set_name`).
pub fn read_ns(
    backend: IptablesBackend,
    fw: FirewallChoice,
    f: Family,
    set_name: &str,
) -> Result<(NsView, Option<Sets>), String> {
    let nft = match fw {
        FirewallChoice::Iptables => None,
        FirewallChoice::Nftables => Some(list_table(f)?),
        FirewallChoice::Auto => Some(list_table(f)?).filter(|l| l.exists),
    };
    let Some(mut nft) = nft else {
        return Ok((read_ns_iptables(backend, f, false)?, None));
    };
    // The iptables rules of others on the same hooks still count (best effort: an nft-only
    // node may have no iptables tools).
    let mut v = read_ns_iptables(backend, f, true)?;
    let sets = nft
        .set
        .take()
        .map(|s| Sets::from([(set_name.to_string(), s)]))
        .unwrap_or_default();
    merge_nft(&mut v, nft);
    Ok((v, Some(sets)))
}

/// Adds our nft chains to `v.iptables` as chains `ambient-cni/<name>`, each jumped to first by
/// the built-in chain it stands for (our base chains have the priority of that table's).
pub(crate) fn merge_nft(v: &mut NsView, nft: TableListing) {
    let prev = std::mem::take(&mut v.backend);
    v.backend = if prev.is_empty() {
        "nftables (table inet ambient-cni)".into()
    } else {
        format!("nftables (table inet ambient-cni), iptables {prev}")
    };
    if !nft.exists {
        v.notes
            .push("table inet ambient-cni does not exist: none of our chains is there".into());
    }
    for c in nft.chains {
        let Some((table, hook)) = c.stands_for else {
            v.notes.push(format!(
                "nft chain {} of table inet ambient-cni is not one of ours: not evaluated",
                c.name
            ));
            continue;
        };
        if !c.hooked_right {
            v.notes.push(format!(
                "nft chain {} is not hooked where {table} {hook} is: not evaluated",
                c.name
            ));
            continue;
        }
        let ours = format!("{NFT_CHAIN}{}", c.name);
        let list = v.iptables.entry(table).or_default();
        list.insert(0, (hook, format!("-j {ours}")));
        let mut foreign = 0;
        for r in c.rules {
            match r {
                Some(body) => list.push((ours.clone(), body)),
                None => foreign += 1,
            }
        }
        if foreign > 0 {
            v.notes.push(format!(
                "{foreign} rule(s) of nft chain {} carry no comment of ours (someone else's): \
                 not evaluated",
                c.name
            ));
        }
    }
}

fn read_ns_iptables(
    backend: IptablesBackend,
    f: Family,
    best_effort: bool,
) -> Result<NsView, String> {
    let v6 = f == Family::V6;
    let fam = if v6 { "-6" } else { "-4" };
    let rules = view::parse_rules(&run(&["ip", fam, "-j", "rule", "show"])?, v6)?;
    let mut tables: BTreeSet<u32> = rules
        .iter()
        .filter_map(|r| match r.action {
            RuleAction::Lookup(t) => Some(t),
            _ => None,
        })
        .collect();
    tables.extend([254, 255]);
    let mut v = NsView {
        rules,
        ..Default::default()
    };
    for t in tables {
        // A table with no route does not exist: `ip` says so ("FIB table does not exist") and
        // fails, or prints nothing. Either way it holds no route.
        let text = match run(&["ip", fam, "-j", "route", "show", "table", &t.to_string()]) {
            Ok(t) => t,
            Err(e) if e.contains("table does not exist") => String::new(),
            Err(e) => return Err(e),
        };
        let routes = if text.trim().is_empty() {
            Vec::new()
        } else {
            view::parse_routes(&text, v6)?
        };
        v.tables.insert(t, routes);
    }
    match iptables_save_all(backend, f) {
        Ok((text, name)) => {
            v.iptables = view::parse_iptables(&text);
            v.backend = name.to_string();
        }
        Err(e) if best_effort => v.notes.push(format!("iptables rules not read: {e}")),
        Err(e) => return Err(e),
    }
    Ok(v)
}

/// The members of our sets (absent sets are left out).
pub fn read_sets(names: &[&str]) -> std::collections::BTreeMap<String, BTreeSet<std::net::IpAddr>> {
    let mut out = std::collections::BTreeMap::new();
    for n in names {
        if let Ok(text) = run(&["ipset", "save", n]) {
            out.extend(view::parse_ipset(&text));
        }
    }
    out
}

/// Runs `f` on a thread that entered the netns of `path` (a child process it starts runs there
/// too).
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let ns = std::fs::File::open(path).map_err(|e| format!("netns {}: {e}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns {}: {e}", path.display()))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err("reader thread panicked".into()))
    })
}
