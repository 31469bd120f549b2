//! Our iptables chains through `<variant>-restore --noflush` and `<variant>-save`.
//!
//! Everything here is blocking and runs on the namespace's worker thread: a child process
//! inherits the network namespace of the thread that spawns it. Rendering and parsing are pure
//! functions, unit-tested without root.
//!
//! Rules are compared as text, in `iptables-save`'s normal form, so callers must render them the
//! way iptables-save prints them (e.g. `-i X -p tcp -m tcp --dport N`, `! -d IP/32`).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};
use std::str::FromStr;

use crate::model::{Chain, Family, IptablesState};

/// Which iptables variant to drive (configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IptablesBackend {
    /// Detect per namespace like kubernetes-sigs/iptables-wrappers: kubelet's hint chains in
    /// mangle (nft first, then legacy), else the variant that already holds more rules, else nft.
    #[default]
    Auto,
    /// `iptables-legacy-restore` / `iptables-legacy-save`.
    Legacy,
    /// `iptables-nft-restore` / `iptables-nft-save`.
    Nft,
}

impl IptablesBackend {
    /// `auto`, `legacy` or `nft`.
    pub fn as_str(self) -> &'static str {
        match self {
            IptablesBackend::Auto => "auto",
            IptablesBackend::Legacy => "legacy",
            IptablesBackend::Nft => "nft",
        }
    }
}

impl fmt::Display for IptablesBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IptablesBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IptablesBackend::Auto),
            "legacy" => Ok(IptablesBackend::Legacy),
            "nft" => Ok(IptablesBackend::Nft),
            other => Err(format!(
                "unknown iptables backend {other:?} (auto, legacy, nft)"
            )),
        }
    }
}

/// A concrete variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }
    /// The save tool of the variant for a family: IPv6 uses the same variant (chosen once per
    /// namespace from the IPv4 tables, as kube-proxy does) with its `ip6tables-*` tools.
    fn save_bin_of(self, f: Family) -> &'static str {
        match (self, f) {
            (Backend::Legacy, Family::V4) => "iptables-legacy-save",
            (Backend::Nft, Family::V4) => "iptables-nft-save",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-save",
            (Backend::Nft, Family::V6) => "ip6tables-nft-save",
        }
    }
    fn restore_bin_of(self, f: Family) -> &'static str {
        match (self, f) {
            (Backend::Legacy, Family::V4) => "iptables-legacy-restore",
            (Backend::Nft, Family::V4) => "iptables-nft-restore",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-restore",
            (Backend::Nft, Family::V6) => "ip6tables-nft-restore",
        }
    }
}

/// The configured variant, or the detected one for `Auto` (runs `*-save`: call on the worker).
pub(crate) fn resolve(wanted: IptablesBackend) -> Backend {
    match wanted {
        IptablesBackend::Legacy => Backend::Legacy,
        IptablesBackend::Nft => Backend::Nft,
        IptablesBackend::Auto => detect(),
    }
}

const HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

fn detect() -> Backend {
    for b in [Backend::Nft, Backend::Legacy] {
        // `iptables-legacy-save -t mangle` would instantiate an empty legacy mangle table in a
        // namespace that has none; look only where the table exists. (`thread-self`: /proc/net
        // is the main thread's namespace, this runs on the namespace's worker thread.)
        if b == Backend::Legacy && !legacy_table_exists("mangle") {
            continue;
        }
        if let Ok(out) = run_save(b, Some("mangle")) {
            if has_hint(&out) {
                tracing::info!(
                    backend = b.name(),
                    "iptables backend: kubelet hint chain found"
                );
                return b;
            }
        }
    }
    // Without `-t`, save lists existing tables only and creates nothing.
    let count = |b| run_save(b, None).map(|o| count_rules(&o)).unwrap_or(0);
    let (nft, legacy) = (count(Backend::Nft), count(Backend::Legacy));
    let b = pick_by_rules(nft, legacy);
    tracing::info!(
        backend = b.name(),
        nft_rules = nft,
        legacy_rules = legacy,
        "iptables backend detected"
    );
    b
}

fn legacy_table_exists(table: &str) -> bool {
    std::fs::read_to_string("/proc/thread-self/net/ip_tables_names")
        .map(|s| s.lines().any(|l| l.trim() == table))
        .unwrap_or(false)
}

fn has_hint(save: &str) -> bool {
    save.lines().any(|l| {
        l.strip_prefix(':')
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|c| HINT_CHAINS.contains(&c))
    })
}

fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

fn pick_by_rules(nft: usize, legacy: usize) -> Backend {
    if legacy > nft {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// The whole `*-save` (`ip6tables-*-save` for IPv6) output of the calling thread's netns, with
/// the variant `wanted` resolves to by the daemon's own detection, and that variant's name (for
/// `ambient-cnid explain`).
pub fn save_all(wanted: IptablesBackend, f: Family) -> Result<(String, &'static str), String> {
    let b = resolve(wanted);
    run_save_of(b, f, None).map(|s| (s, b.name()))
}

fn run_save(b: Backend, table: Option<&str>) -> Result<String, String> {
    run_save_of(b, Family::V4, table)
}

fn run_save_of(b: Backend, f: Family, table: Option<&str>) -> Result<String, String> {
    let bin = b.save_bin_of(f);
    let mut cmd = Command::new(bin);
    if let Some(t) = table {
        cmd.args(["-t", t]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{bin}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{} {}: {}: {}",
            bin,
            table.map(|t| format!("-t {t}")).unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_restore(b: Backend, f: Family, input: &str) -> Result<(), String> {
    let bin = b.restore_bin_of(f);
    // `-w 10`: wait up to 10 s for the xtables lock (legacy); nft ignores it.
    let mut child = Command::new(bin)
        .args(["--noflush", "-w", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{bin}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{bin}: writing input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{bin}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{bin} --noflush: {}: {}\ninput was:\n{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One table as `iptables-save` prints it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SavedTable {
    /// Declared chains (built-in and user).
    pub(crate) chains: Vec<String>,
    /// Rules in order: (chain, body after `-A CHAIN `).
    pub(crate) rules: Vec<(String, String)>,
}

impl SavedTable {
    fn has_chain(&self, name: &str) -> bool {
        self.chains.iter().any(|c| c == name)
    }
    fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.rules
            .iter()
            .filter(move |(c, _)| c == chain)
            .map(|(_, r)| r.as_str())
    }
}

/// Parses the section of `table` in save output. Comments and other tables are skipped.
pub(crate) fn parse_save(text: &str, table: &str) -> SavedTable {
    let mut t = SavedTable::default();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            inside = name == table;
            continue;
        }
        if !inside {
            continue;
        }
        if line == "COMMIT" {
            inside = false;
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                t.chains.push(name.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, body) = rest.split_once(' ').unwrap_or((rest, ""));
            t.rules.push((chain.to_string(), body.to_string()));
        }
    }
    t
}

/// The chain a rule body jumps (`-j`) or goes (`-g`) to, as its final target.
fn jump_target(body: &str) -> Option<&str> {
    let mut toks = body.split_whitespace();
    let mut target = None;
    while let Some(t) = toks.next() {
        if t == "-j" || t == "--jump" || t == "-g" || t == "--goto" {
            target = toks.next();
        }
    }
    target
}

/// Positions (1-based) in `hook` of the rules that jump to `chain`.
fn jump_positions(saved: &SavedTable, hook: &str, chain: &str) -> Vec<usize> {
    saved
        .rules_of(hook)
        .enumerate()
        .filter(|(_, r)| jump_target(r) == Some(chain))
        .map(|(i, _)| i + 1)
        .collect()
}

fn check_chains(chains: &[Chain]) -> Result<(), String> {
    let word = |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    for c in chains {
        if !word(&c.table) || !word(&c.name) || !word(&c.hook) {
            return Err(format!(
                "invalid table/chain/hook name in {:?}/{:?}/{:?}",
                c.table, c.name, c.hook
            ));
        }
        if let Some(r) = c
            .rules
            .iter()
            .find(|r| r.trim().is_empty() || r.contains(['\n', '\r', '\0']))
        {
            return Err(format!("invalid rule {r:?} in chain {}", c.name));
        }
    }
    Ok(())
}

/// Tables in first-seen order.
fn tables_of(chains: &[Chain]) -> Vec<&str> {
    let mut v: Vec<&str> = Vec::new();
    for c in chains {
        if !v.contains(&c.table.as_str()) {
            v.push(&c.table);
        }
    }
    v
}

/// The restore input that makes `chains` (all of `table`) hold exactly their rules and puts each
/// jump alone at position 1 of its hook, given what the table holds now.
pub(crate) fn render_apply(table: &str, chains: &[&Chain], saved: &SavedTable) -> String {
    let mut s = format!("*{table}\n");
    // Declaring a chain under --noflush creates it, or flushes just it when it exists.
    for c in chains {
        s.push_str(&format!(":{} - [0:0]\n", c.name));
    }
    for c in chains {
        for r in &c.rules {
            s.push_str(&format!("-A {} {}\n", c.name, r.trim()));
        }
    }
    for c in chains {
        let jumps: Vec<&str> = saved
            .rules_of(&c.hook)
            .filter(|r| jump_target(r) == Some(c.name.as_str()))
            .collect();
        let first = saved.rules_of(&c.hook).next();
        let want = format!("-j {}", c.name);
        let good = jumps.len() == 1 && first == Some(want.as_str());
        if !good {
            // Each -D removes the first rule matching that exact spec; then one -I at the top.
            for j in &jumps {
                s.push_str(&format!("-D {} {}\n", c.hook, j));
            }
            s.push_str(&format!("-I {} 1 {}\n", c.hook, want));
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// The restore input that removes every jump to `chains` (all of `table`) and then the chains;
/// `None` when there is nothing of ours in the table.
pub(crate) fn render_remove(table: &str, chains: &[&Chain], saved: &SavedTable) -> Option<String> {
    let ours = |n: &str| chains.iter().any(|c| c.name == n);
    let mut s = format!("*{table}\n");
    let mut any = false;
    // Jumps from chains that stay (built-ins or foreign chains); ours get flushed anyway.
    for (chain, body) in &saved.rules {
        if !ours(chain) && jump_target(body).is_some_and(ours) {
            s.push_str(&format!("-D {chain} {body}\n"));
            any = true;
        }
    }
    let present: Vec<&&Chain> = chains.iter().filter(|c| saved.has_chain(&c.name)).collect();
    for c in &present {
        s.push_str(&format!("-F {}\n", c.name));
        any = true;
    }
    for c in &present {
        s.push_str(&format!("-X {}\n", c.name));
    }
    s.push_str("COMMIT\n");
    any.then_some(s)
}

/// Reads our chains and the jumps to them.
pub(crate) fn read(b: Backend, f: Family, chains: &[Chain]) -> Result<IptablesState, String> {
    check_chains(chains)?;
    let mut st = IptablesState {
        chains: BTreeMap::new(),
        jumps: BTreeMap::new(),
    };
    // One `*-save` of every table rather than one per table: each is a process start, and a
    // resync reads three tables (acni-bench: 3 saves were 8-20 ms of a resync).
    let all = run_save_of(b, f, None)?;
    for table in tables_of(chains) {
        let saved = parse_save(&all, table);
        for c in chains.iter().filter(|c| c.table == table) {
            if saved.has_chain(&c.name) {
                let rules = saved.rules_of(&c.name).map(str::to_string).collect();
                st.chains.insert((c.table.clone(), c.name.clone()), rules);
            }
            let pos = jump_positions(&saved, &c.hook, &c.name);
            if !pos.is_empty() {
                st.jumps
                    .insert((c.table.clone(), c.hook.clone(), c.name.clone()), pos);
            }
        }
    }
    Ok(st)
}

/// One save of every table and one `--noflush` restore with a section per table: two process
/// starts instead of two per table (acni-bench: six of them were ~45 ms of a restore).
pub(crate) fn apply(b: Backend, f: Family, chains: &[Chain]) -> Result<(), String> {
    check_chains(chains)?;
    let all = run_save_of(b, f, None)?;
    let mut input = String::new();
    for table in tables_of(chains) {
        let saved = parse_save(&all, table);
        let mine: Vec<&Chain> = chains.iter().filter(|c| c.table == table).collect();
        input.push_str(&render_apply(table, &mine, &saved));
    }
    if input.is_empty() {
        return Ok(());
    }
    run_restore(b, f, &input)
}

/// Deletes the jumps, then flushes and deletes the chains; missing ones are fine.
pub(crate) fn remove(b: Backend, f: Family, chains: &[Chain]) -> Result<(), String> {
    check_chains(chains)?;
    for table in tables_of(chains) {
        let saved = parse_save(&run_save_of(b, f, Some(table))?, table);
        let mine: Vec<&Chain> = chains.iter().filter(|c| c.table == table).collect();
        if let Some(input) = render_remove(table, &mine, &saved) {
            run_restore(b, f, &input)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-save v1.8.9 on x
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j ztunnel-PREROUTING
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ztunnel-PREROUTING - [0:0]
:KUBE-IPTABLES-HINT - [0:0]
-A PREROUTING -j KUBE-X
-A PREROUTING -j ztunnel-PREROUTING
-A PREROUTING -i eth0 -j ztunnel-PREROUTING
-A ztunnel-PREROUTING -i istioin -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -m comment --comment \"a b\" -j RETURN
COMMIT
# Completed
";

    fn chain(table: &str, name: &str, hook: &str, rules: &[&str]) -> Chain {
        Chain {
            table: table.into(),
            name: name.into(),
            hook: hook.into(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn parses_one_table() {
        let t = parse_save(SAVE, "mangle");
        assert_eq!(
            t.chains,
            vec![
                "PREROUTING",
                "OUTPUT",
                "ztunnel-PREROUTING",
                "KUBE-IPTABLES-HINT"
            ]
        );
        assert_eq!(t.rules.len(), 5);
        assert_eq!(
            t.rules_of("ztunnel-PREROUTING").collect::<Vec<_>>(),
            vec![
                "-i istioin -j MARK --set-xmark 0x200/0x200",
                "-m comment --comment \"a b\" -j RETURN"
            ]
        );
        assert_eq!(
            jump_positions(&t, "PREROUTING", "ztunnel-PREROUTING"),
            vec![2, 3]
        );
        assert!(has_hint(SAVE));
        assert_eq!(count_rules(SAVE), 6);
        let n = parse_save(SAVE, "nat");
        assert_eq!(n.rules.len(), 1);
        assert_eq!(parse_save(SAVE, "raw"), SavedTable::default());
    }

    #[test]
    fn jump_targets() {
        assert_eq!(jump_target("-j X"), Some("X"));
        assert_eq!(jump_target("-i a -g Y"), Some("Y"));
        assert_eq!(jump_target("-j MARK --set-xmark 0x1/0x1"), Some("MARK"));
        assert_eq!(jump_target("-m mark --mark 1"), None);
    }

    #[test]
    fn apply_fixes_misplaced_jumps() {
        let t = parse_save(SAVE, "mangle");
        let c = chain(
            "mangle",
            "ztunnel-PREROUTING",
            "PREROUTING",
            &["-i istioin -j RETURN"],
        );
        let out = render_apply("mangle", &[&c], &t);
        assert_eq!(
            out,
            "*mangle\n:ztunnel-PREROUTING - [0:0]\n-A ztunnel-PREROUTING -i istioin -j RETURN\n\
             -D PREROUTING -j ztunnel-PREROUTING\n-D PREROUTING -i eth0 -j ztunnel-PREROUTING\n\
             -I PREROUTING 1 -j ztunnel-PREROUTING\nCOMMIT\n"
        );
    }

    #[test]
    fn apply_keeps_a_good_jump() {
        let t = parse_save(
            "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j Z\n-A PREROUTING -j KUBE\nCOMMIT\n",
            "nat",
        );
        let c = chain("nat", "Z", "PREROUTING", &[]);
        assert_eq!(render_apply("nat", &[&c], &t), "*nat\n:Z - [0:0]\nCOMMIT\n");
        // Missing jump: inserted.
        let empty = SavedTable::default();
        assert_eq!(
            render_apply("nat", &[&c], &empty),
            "*nat\n:Z - [0:0]\n-I PREROUTING 1 -j Z\nCOMMIT\n"
        );
    }

    #[test]
    fn remove_deletes_jumps_then_chains() {
        let t = parse_save(SAVE, "mangle");
        let c = chain("mangle", "ztunnel-PREROUTING", "PREROUTING", &[]);
        let gone = chain("mangle", "ztunnel-OUTPUT", "OUTPUT", &[]);
        let out = render_remove("mangle", &[&c, &gone], &t).expect("something to do");
        assert_eq!(
            out,
            "*mangle\n-D PREROUTING -j ztunnel-PREROUTING\n-D PREROUTING -i eth0 -j ztunnel-PREROUTING\n\
             -F ztunnel-PREROUTING\n-X ztunnel-PREROUTING\nCOMMIT\n"
        );
        assert_eq!(render_remove("mangle", &[&gone], &t), None);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(check_chains(&[chain("mangle", "a b", "PREROUTING", &[])]).is_err());
        assert!(check_chains(&[chain(
            "mangle",
            "A",
            "PREROUTING",
            &["-j X\n-A INPUT -j DROP"]
        )])
        .is_err());
        assert!(check_chains(&[chain("mangle", "A", "PREROUTING", &["-j RETURN"])]).is_ok());
    }

    #[test]
    fn backend_choice() {
        assert_eq!(pick_by_rules(0, 0), Backend::Nft);
        assert_eq!(pick_by_rules(3, 10), Backend::Legacy);
        assert_eq!(pick_by_rules(10, 3), Backend::Nft);
        assert_eq!(
            "legacy".parse::<IptablesBackend>(),
            Ok(IptablesBackend::Legacy)
        );
        assert!("x".parse::<IptablesBackend>().is_err());
    }
}
