//! The watch loop against a primary CNI that rewrites its config, on a fake node in a temp dir.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ambient_cni_install::{watch, InstallConfig, WatchOptions, WatchStats};
use common::*;

struct Running {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<WatchStats>>,
}

impl Running {
    fn start(cfg: InstallConfig, opts: WatchOptions) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || watch(&cfg, &opts, &s).unwrap());
        Running {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> WatchStats {
        self.stop.store(true, Ordering::Release);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn fast() -> WatchOptions {
    WatchOptions {
        min_interval: Duration::from_millis(300),
        debounce: Duration::from_millis(50),
        resync: Duration::from_secs(3600),
        ..WatchOptions::default()
    }
}

fn ours_is_last(node: &Node, name: &str) -> bool {
    fs::read(node.conf(name))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| {
            v["plugins"]
                .as_array()
                .and_then(|p| p.last())
                .is_some_and(|p| p["type"] == "ambient-cni")
        })
}

#[test]
fn primary_rewriting_its_config_gets_repatched() {
    let node = Node::new();
    node.put("10-calico.conflist", "10-calico.conflist", 0o644);
    let w = Running::start(node.cfg(), fast());
    assert!(
        eventually(5, || ours_is_last(&node, "10-calico.conflist")),
        "initial pass"
    );

    // Calico's installer restarts and writes its file again (temp + rename).
    rewrite_like_a_cni(
        &node.conf("10-calico.conflist"),
        &data("10-calico.conflist"),
    );
    let t = Instant::now();
    assert!(
        eventually(5, || ours_is_last(&node, "10-calico.conflist")),
        "re-patched after rename"
    );
    eprintln!("re-patched {:?} after the rewrite", t.elapsed());

    // Another writes in place (truncate + write, CLOSE_WRITE).
    fs::write(node.conf("10-calico.conflist"), data("10-calico.conflist")).unwrap();
    assert!(
        eventually(5, || ours_is_last(&node, "10-calico.conflist")),
        "re-patched after write"
    );

    let stats = w.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.writes, 3, "initial + two rewrites: {stats:?}");
}

#[test]
fn our_own_write_does_not_loop() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let w = Running::start(node.cfg(), fast());
    assert!(eventually(5, || ours_is_last(&node, "10-kindnet.conflist")));
    rewrite_like_a_cni(
        &node.conf("10-kindnet.conflist"),
        &data("10-kindnet.conflist"),
    );
    assert!(eventually(5, || ours_is_last(&node, "10-kindnet.conflist")));
    let settled = snapshot(&node.conf_dir);
    std::thread::sleep(Duration::from_millis(1500)); // five rate-limit intervals
    assert_eq!(
        snapshot(&node.conf_dir),
        settled,
        "no further writes (same inode and mtime)"
    );
    let stats = w.stop();
    assert_eq!(stats.writes, 2, "{stats:?}");
    // Each of our renames triggers one more pass that finds nothing to do; nothing more.
    assert!(stats.passes <= 4, "{stats:?}");
}

#[test]
fn a_burst_of_rewrites_is_coalesced() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let opts = WatchOptions {
        min_interval: Duration::from_secs(1),
        ..fast()
    };
    let w = Running::start(node.cfg(), opts);
    assert!(eventually(5, || ours_is_last(&node, "10-kindnet.conflist")));
    for _ in 0..20 {
        rewrite_like_a_cni(
            &node.conf("10-kindnet.conflist"),
            &data("10-kindnet.conflist"),
        );
    }
    assert!(eventually(5, || ours_is_last(&node, "10-kindnet.conflist")));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ours_is_last(&node, "10-kindnet.conflist"));
    let stats = w.stop();
    assert!(
        stats.writes <= 3,
        "20 rewrites, at most 2 re-patches: {stats:?}"
    );
    assert!(stats.passes <= 5, "{stats:?}");
}

#[test]
fn removed_or_replaced_binary_is_restored() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let w = Running::start(node.cfg(), fast());
    let bin = node.bin_dirs[1].join("ambient-cni");
    assert!(eventually(5, || fs::read(&bin).ok() == Some(fake_binary(1))));
    fs::remove_file(&bin).unwrap();
    assert!(
        eventually(5, || fs::read(&bin).ok() == Some(fake_binary(1))),
        "restored after delete"
    );
    fs::write(&bin, b"someone else's binary").unwrap();
    assert!(
        eventually(5, || fs::read(&bin).ok() == Some(fake_binary(1))),
        "restored after overwrite"
    );
    let stats = w.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
}

#[test]
fn fresh_node_gets_patched_once_the_primary_writes_its_config() {
    let node = Node::new();
    fs::remove_dir(&node.conf_dir).unwrap(); // not even the dir yet
    let w = Running::start(node.cfg(), fast());
    std::thread::sleep(Duration::from_millis(300));
    // The dir and the file appear together, before the watch on the dir can be added (it is
    // retried every second): the pass that follows adding the watch finds the file.
    fs::create_dir_all(&node.conf_dir).unwrap();
    rewrite_like_a_cni(&node.conf("10-ptp.conf"), &data("10-ptp.conf"));
    assert!(eventually(5, || ours_is_last(&node, "10-ptp.conflist")));
    assert!(!node.conf("10-ptp.conf").exists());

    // ptp restarts and writes its .conf again: converted again.
    rewrite_like_a_cni(&node.conf("10-ptp.conf"), &data("10-ptp.conf"));
    assert!(eventually(5, || !node.conf("10-ptp.conf").exists()
        && ours_is_last(&node, "10-ptp.conflist")));
    let stats = w.stop();
    assert!(
        stats.errors >= 1,
        "the first pass found no config: {stats:?}"
    );
    assert!(stats.last_error.unwrap().contains("no primary CNI config"));
}

#[test]
fn temp_names_and_foreign_files_do_not_trigger_passes() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let w = Running::start(node.cfg(), fast());
    assert!(eventually(5, || ours_is_last(&node, "10-kindnet.conflist")));
    std::thread::sleep(Duration::from_millis(400));
    fs::write(node.conf(".10-kindnet.conflist.acni-tmp-1-2-3"), b"x").unwrap();
    fs::write(node.conf("calico-kubeconfig"), b"x").unwrap();
    fs::write(node.bin_dirs[0].join("bridge"), b"x").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let stats = w.stop();
    // The initial pass, plus at most the one our own rename triggered.
    assert!(stats.passes <= 2, "{stats:?}");
}

#[test]
fn multus_errors_are_counted_and_the_loop_keeps_running() {
    let node = Node::new();
    node.put("00-multus.conf", "00-multus.conf", 0o644);
    node.put("10-calico.conflist", "10-calico.conflist", 0o644);
    let w = Running::start(node.cfg(), fast());
    std::thread::sleep(Duration::from_millis(400));
    // The admin removes Multus: the next event patches calico.
    fs::remove_file(node.conf("00-multus.conf")).unwrap();
    assert!(eventually(5, || ours_is_last(&node, "10-calico.conflist")));
    let stats = w.stop();
    // The first pass, and the one our own binary copy triggered, both refused Multus.
    assert!((1..=2).contains(&stats.errors), "{stats:?}");
    assert!(stats.last_error.unwrap().contains("Multus"));
}

#[test]
fn stop_returns_promptly() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let w = Running::start(node.cfg(), WatchOptions::default());
    assert!(eventually(5, || ours_is_last(&node, "10-kindnet.conflist")));
    let t = Instant::now();
    w.stop();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}
