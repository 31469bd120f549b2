//! Reads the live kernel state `explain` evaluates, of the packet's family: `ip -4|-6 -j rule`,
//! `ip -4|-6 -j route show table N` for every table a rule looks up, `iptables-save` or
//! `ip6tables-save` (the variant the daemon's detection picks) and `ipset save` — in the node
//! netns (the caller's) and, on a thread that entered it, in the ztunnel's. `explain` is a
//! debugging command, not the per-pod path: it uses the tools.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

use super::view::{self, NsView, RuleAction};
use crate::dataplane::netlink::{iptables_save_all, IptablesBackend};
use crate::model::Family;

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
/// (`ip -4` / `ip -6`) and its iptables / ip6tables rules.
pub fn read_ns(backend: IptablesBackend, f: Family) -> Result<NsView, String> {
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
    let (text, name) = iptables_save_all(backend, f)?;
    v.iptables = view::parse_iptables(&text);
    v.backend = name.to_string();
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
