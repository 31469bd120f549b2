//! The journal under damage, with the real daemon (issue 17), as root, in namespaces only: four
//! acknowledged pod ADDs (plus the ztunnel), the daemon killed, torn lines put into its journal
//! — one glued before the fourth pod's line (what a failed write followed by the next append
//! leaves), one on a line of its own in the middle, one at the end — and a restart. Every
//! acknowledged pod must be back, in the registry and in the kernel (the start-up pass removes
//! the kernel entries of pods it does not know: a lost record means a pod that bypasses
//! ztunnel), the damage must be logged with line numbers, and the damaged journal kept aside.
//!
//! `cargo test --profile ci -p ambient-cni-tests --test journal -- --nocapture` prints the log.

use ambient_cni_tests::fault::ipset_members;
use ambient_cni_tests::require_root;
use ambient_cni_tests::world::{Pod, World, AMBIENT_NS};
use anyhow::{ensure, Context, Result};
use serde_json::json;

/// Line numbers (1-based) of the journal lines that mention `needle`.
fn lines_with(journal: &[u8], needle: &str) -> Vec<usize> {
    journal
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| String::from_utf8_lossy(l).contains(needle))
        .map(|(i, _)| i + 1)
        .collect()
}

#[test]
fn torn_journal_lines_lose_no_acknowledged_pod_at_restart() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut w = World::new("journal", &[])?;
    w.ztunnel("zt", "a")?;
    let pods: Vec<Pod> = (1..=4)
        .map(|i| w.pod(&format!("p{i}"), AMBIENT_NS, &format!("p{i}")))
        .collect::<Result<_>>()?;
    ensure!(
        w.daemon()?.status_json()?["pods"] == json!(5),
        "zt + 4 pods"
    );
    let mut daemon = w.daemon.take().context("daemon")?;
    daemon.kill();

    let state = w.daemon_dir.join("state");
    let path = state.join("registry.journal");
    let journal = std::fs::read(&path).context("journal")?;
    let p3 = lines_with(&journal, "uid-p3");
    let p4 = lines_with(&journal, "uid-p4");
    ensure!(
        p3.len() == 1 && p4.len() == 1,
        "one line per pod: {}",
        String::from_utf8_lossy(&journal)
    );
    let mut damaged = Vec::new();
    for (i, line) in journal.split_inclusive(|&b| b == b'\n').enumerate() {
        if i + 1 == p3[0] {
            damaged.extend_from_slice(b"{\"op\":\"put\",\"rec\":{\"container_id\":\"tor\n");
        }
        if i + 1 == p4[0] {
            damaged.extend_from_slice(b"{\"op\":\"put\",\"rec\":{\"container_id\":\"cid-x");
        }
        damaged.extend_from_slice(line);
    }
    damaged.extend_from_slice(b"{\"op\":\"del\",\"key\":{\"id\":\"uid-p");
    std::fs::write(&path, &damaged)?;

    w.start_daemon()?;
    let d = w.daemon()?;
    let status = d.status_json()?;
    let log = d.log_text();
    let said: Vec<&str> = log.lines().filter(|l| l.contains("journal")).collect();
    println!(
        "journal: restart after 3 torn lines: pods {}; the daemon logged:\n{}",
        status["pods"],
        said.join("\n")
    );
    ensure!(status["pods"] == json!(5), "every pod is back: {status}");
    let set = ipset_members(&w.net, "node")?;
    for p in &pods {
        ensure!(
            set.contains_key(&p.ip),
            "{} ({}) is still in the ipset after the start-up pass: {set:?}",
            p.name,
            p.ip
        );
    }
    // The middle line (its own), the glued fragment before p4 (+1: the inserted line moved it),
    // the tail.
    for line in [p3[0], p4[0] + 1, lines_with(&damaged, "").len()] {
        ensure!(
            said.iter().any(|l| l.contains(&format!("line={line} "))),
            "line {line} is logged: {said:?}"
        );
    }
    ensure!(
        log.contains("ERROR") && log.contains("kept aside"),
        "the damage is logged loudly"
    );
    let aside: Vec<_> = std::fs::read_dir(&state)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("registry.journal.corrupt-")
        })
        .collect();
    ensure!(aside.len() == 1, "the damaged journal is kept aside");
    ensure!(std::fs::read(aside[0].path())? == damaged, "as it was");
    Ok(())
}
