//! End-to-end installer behaviour on a fake node in a temp dir.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use ambient_cni_install::{
    check, install, install_wait, uninstall, Change, InstallError, PLUGIN_TYPE,
};
use common::*;
use serde_json::{json, Value};

fn our_entry() -> Value {
    json!({"type": "ambient-cni", "socket": "/run/ambient-cni/cni.sock",
           "logFile": "/run/ambient-cni/plugin.log"})
}

/// `orig` with our entry appended: what a patched conflist must mean.
fn with_ours(orig: &Value) -> Value {
    let mut v = orig.clone();
    v["plugins"].as_array_mut().unwrap().push(our_entry());
    v
}

// ---------- fresh node ----------

#[test]
fn fresh_node_without_config_is_a_clear_error() {
    let node = Node::new();
    let err = install(&node.cfg()).unwrap_err();
    assert!(err.is_retryable());
    let msg = err.to_string();
    assert!(msg.starts_with("no primary CNI config in "), "{msg}");
    assert!(msg.contains(node.conf_dir.to_str().unwrap()), "{msg}");
    // The binary went in first; the conf dir is untouched.
    for d in &node.bin_dirs {
        assert_eq!(fs::read(d.join(PLUGIN_TYPE)).unwrap(), fake_binary(1));
    }
    assert!(names(&node.conf_dir).is_empty());
}

#[test]
fn missing_conf_dir_is_no_primary_config() {
    let node = Node::new();
    fs::remove_dir(&node.conf_dir).unwrap();
    let err = install(&node.cfg()).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn install_wait_times_out_with_the_same_error() {
    let node = Node::new();
    let t = Instant::now();
    let err = install_wait(
        &node.cfg(),
        Duration::from_millis(600),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(600));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, InstallError::NoPrimaryConfig { .. }), "{err}");
}

#[test]
fn install_wait_patches_a_config_that_appears_later() {
    let node = Node::new();
    let target = node.conf("10-kindnet.conflist");
    let writer = {
        let target = target.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            rewrite_like_a_cni(&target, &data("10-kindnet.conflist"));
        })
    };
    let report = install_wait(
        &node.cfg(),
        Duration::from_secs(10),
        &AtomicBool::new(false),
    )
    .unwrap();
    writer.join().unwrap();
    assert_eq!(report.primary.as_deref(), Some(target.as_path()));
    assert_eq!(
        read_json(&target),
        with_ours(&json(&data("10-kindnet.conflist")))
    );
}

// ---------- the shapes ----------

#[test]
fn kindnet_ptp_conflist_golden() {
    let node = Node::new();
    let p = node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let report = install(&node.cfg()).unwrap();
    assert_eq!(report.primary.as_deref(), Some(p.as_path()));
    // The README shows these two files; keep them honest. UPDATE_GOLDEN=1 rewrites the golden.
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/10-kindnet.conflist.patched");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::copy(&p, &golden).unwrap();
    }
    assert_eq!(
        String::from_utf8(fs::read(&p).unwrap()).unwrap(),
        String::from_utf8(data("10-kindnet.conflist.patched")).unwrap()
    );
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
        0o644
    );
}

#[test]
fn conflist_shapes_get_our_entry_last_and_keep_everything_else() {
    for (file, want_types) in [
        ("10-kindnet.conflist", vec!["ptp", "portmap", "ambient-cni"]),
        (
            "10-calico.conflist",
            vec!["calico", "bandwidth", "portmap", "ambient-cni"],
        ),
        (
            "87-podman-bridge.conflist",
            vec!["bridge", "portmap", "firewall", "tuning", "ambient-cni"],
        ),
    ] {
        let node = Node::new();
        let p = node.put(file, file, 0o600);
        let orig = json(&data(file));
        let report = install(&node.cfg()).unwrap();
        assert_eq!(
            report.changes.iter().filter(|c| c.path == p).count(),
            1,
            "{file}"
        );
        let got = read_json(&p);
        assert_eq!(types(&got), want_types, "{file}");
        assert_eq!(
            got,
            with_ours(&orig),
            "{file}: everything but our entry is unchanged"
        );
        // Key order survives too (preserve_order), top level and nested.
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&got), keys(&orig), "{file}");
        assert_eq!(
            keys(&got["plugins"][0]),
            keys(&orig["plugins"][0]),
            "{file}"
        );
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o600,
            "{file}: mode kept"
        );
        assert_eq!(
            names(&node.conf_dir),
            vec![file.to_owned()],
            "{file}: no temp left"
        );
        assert!(check(&node.cfg()).unwrap().is_ready(), "{file}");
    }
}

#[test]
fn single_conf_becomes_a_conflist_with_name_and_version_kept() {
    let node = Node::new();
    let conf = node.put("10-ptp.conf", "10-ptp.conf", 0o640);
    let report = install(&node.cfg()).unwrap();
    let list = node.conf("10-ptp.conflist");
    assert_eq!(report.primary.as_deref(), Some(list.as_path()));
    assert!(!conf.exists(), "the .conf is replaced by the .conflist");
    assert_eq!(names(&node.conf_dir), vec!["10-ptp.conflist".to_owned()]);
    let changes: Vec<_> = report
        .changes
        .iter()
        .filter(|c| c.path.starts_with(&node.conf_dir))
        .collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(
        (changes[0].path.as_path(), changes[0].change),
        (list.as_path(), Change::Created)
    );
    assert_eq!(
        (changes[1].path.as_path(), changes[1].change),
        (conf.as_path(), Change::Removed)
    );
    assert_eq!(
        read_json(&list),
        json!({
            "cniVersion": "0.4.0",
            "name": "ptpnet",
            "plugins": [
                {"type": "ptp", "ipMasq": true, "mtu": 1450,
                 "ipam": {"type": "host-local", "subnet": "10.1.1.0/24", "dataDir": "/run/cni-ipam-state",
                          "routes": [{"dst": "0.0.0.0/0"}]},
                 "dns": {"nameservers": ["10.1.1.1"]}},
                our_entry()
            ]
        })
    );
    assert_eq!(
        fs::metadata(&list).unwrap().permissions().mode() & 0o7777,
        0o640,
        "mode of the .conf"
    );

    // The primary restarts and writes its .conf again: it sorts before our .conflist, so the
    // runtime would use it. Install converts it again over our own .conflist.
    node.put("10-ptp.conf", "10-ptp.conf", 0o640);
    let again = install(&node.cfg()).unwrap();
    assert!(again.changed());
    assert_eq!(names(&node.conf_dir), vec!["10-ptp.conflist".to_owned()]);
    assert_eq!(types(&read_json(&list)), ["ptp", "ambient-cni"]);
}

#[test]
fn json_extension_is_treated_as_a_single_conf() {
    let node = Node::new();
    node.put("10-ptp.conf", "20-ptp.json", 0o644);
    install(&node.cfg()).unwrap();
    assert_eq!(names(&node.conf_dir), vec!["20-ptp.conflist".to_owned()]);
}

#[test]
fn first_valid_file_by_byte_order_wins() {
    let node = Node::new();
    node.put(
        "87-podman-bridge.conflist",
        "87-podman-bridge.conflist",
        0o644,
    );
    node.put("10-calico.conflist", "10-calico.conflist", 0o644);
    node.put("10-kindnet.conflist", "10-Kindnet.conflist", 0o644); // 'K' < 'c'
    let before = snapshot(&node.conf_dir);
    let report = install(&node.cfg()).unwrap();
    assert_eq!(report.primary, Some(node.conf("10-Kindnet.conflist")));
    let after = snapshot(&node.conf_dir);
    assert_eq!(before["10-calico.conflist"], after["10-calico.conflist"]);
    assert_eq!(
        before["87-podman-bridge.conflist"],
        after["87-podman-bridge.conflist"]
    );
}

#[test]
fn override_picks_a_later_file() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let bridge = node.put(
        "87-podman-bridge.conflist",
        "87-podman-bridge.conflist",
        0o644,
    );
    let before = snapshot(&node.conf_dir);
    let mut cfg = node.cfg();
    cfg.conf_override = Some("87-podman-bridge.conflist".into());
    assert_eq!(install(&cfg).unwrap().primary, Some(bridge.clone()));
    assert_eq!(
        types(&read_json(&bridge)).last().map(String::as_str),
        Some("ambient-cni")
    );
    assert_eq!(
        before["10-kindnet.conflist"],
        snapshot(&node.conf_dir)["10-kindnet.conflist"]
    );
}

#[test]
fn several_bin_dirs_all_get_the_binary() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let report = install(&node.cfg()).unwrap();
    assert_eq!(report.binaries.len(), 2);
    for d in &node.bin_dirs {
        let p = d.join("ambient-cni");
        assert_eq!(fs::read(&p).unwrap(), fake_binary(1));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(names(d), vec!["ambient-cni".to_owned(), "ptp".to_owned()]);
    }
}

// ---------- re-install, upgrade ----------

#[test]
fn reinstall_changes_nothing_on_disk() {
    let node = Node::new();
    node.put("10-calico.conflist", "10-calico.conflist", 0o644);
    install(&node.cfg()).unwrap();
    let conf_before = snapshot(&node.conf_dir);
    let bin_before = snapshot(&node.bin_dirs[0]);
    std::thread::sleep(Duration::from_millis(20)); // a rewrite would show in mtime
    let report = install(&node.cfg()).unwrap();
    assert!(!report.changed(), "{report}");
    assert_eq!(
        snapshot(&node.conf_dir),
        conf_before,
        "same bytes, inode and mtime"
    );
    assert_eq!(snapshot(&node.bin_dirs[0]), bin_before);
}

#[test]
fn upgrade_replaces_binary_and_entry_in_place() {
    let node = Node::new();
    let p = node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    install(&node.cfg()).unwrap();
    // New version: other binary bytes, other settings in the entry.
    fs::write(&node.bin_src, fake_binary(2)).unwrap();
    let mut cfg = node.cfg();
    cfg.plugin_entry["timeoutMs"] = json!(3000);
    let report = install(&cfg).unwrap();
    assert!(report
        .changes
        .iter()
        .any(|c| c.change == Change::Replaced && c.path == p));
    for d in &node.bin_dirs {
        assert_eq!(fs::read(d.join("ambient-cni")).unwrap(), fake_binary(2));
    }
    let got = read_json(&p);
    assert_eq!(types(&got), ["ptp", "portmap", "ambient-cni"]);
    assert_eq!(got["plugins"][2]["timeoutMs"], 3000);
}

#[test]
fn stale_temp_files_of_ours_are_removed() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let stale_bin = node.bin_dirs[0].join(".ambient-cni.acni-tmp-42-abc-0");
    let stale_conf = node.conf(".10-kindnet.conflist.acni-tmp-42-abc-1");
    let foreign = node.conf(".10-kindnet.conflist.tmp");
    for p in [&stale_bin, &stale_conf, &foreign] {
        fs::write(p, b"half-written").unwrap();
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(600))
            .unwrap();
    }
    let report = install(&node.cfg()).unwrap();
    assert!(!stale_bin.exists() && !stale_conf.exists());
    assert!(foreign.exists(), "not ours: never deleted");
    let removed: Vec<_> = report
        .changes
        .iter()
        .filter(|c| c.change == Change::Removed)
        .map(|c| &c.path)
        .collect();
    assert_eq!(removed, [&stale_bin, &stale_conf]);
}

// ---------- uninstall ----------

#[test]
fn uninstall_restores_the_meaning_of_each_shape() {
    for file in [
        "10-kindnet.conflist",
        "10-calico.conflist",
        "87-podman-bridge.conflist",
    ] {
        let node = Node::new();
        let p = node.put(file, file, 0o600);
        install(&node.cfg()).unwrap();
        let report = uninstall(&node.cfg(), false).unwrap();
        assert_eq!(report.primary.as_deref(), Some(p.as_path()), "{file}");
        assert_eq!(
            read_json(&p),
            json(&data(file)),
            "{file}: equal in meaning to the original"
        );
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o600,
            "{file}"
        );
        // Binary stays unless asked (CRI-O DELs older pods through it).
        assert!(node.bin_dirs[0].join("ambient-cni").exists(), "{file}");
        // Uninstall twice is a no-op.
        assert!(!uninstall(&node.cfg(), false).unwrap().changed(), "{file}");
    }
}

#[test]
fn uninstall_of_a_converted_conf_keeps_libcni_meaning() {
    let node = Node::new();
    node.put("10-ptp.conf", "10-ptp.conf", 0o644);
    install(&node.cfg()).unwrap();
    uninstall(&node.cfg(), false).unwrap();
    // libcni's ConfListFromConf view of the original .conf: same name, version, one plugin.
    let mut plugin = json(&data("10-ptp.conf"));
    let obj = plugin.as_object_mut().unwrap();
    let version = obj.shift_remove("cniVersion").unwrap();
    let name = obj.shift_remove("name").unwrap();
    assert_eq!(
        read_json(&node.conf("10-ptp.conflist")),
        json!({"cniVersion": version, "name": name, "plugins": [plugin]})
    );
}

#[test]
fn uninstall_removes_binary_only_when_asked_and_nothing_foreign() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let other = node.put("10-calico.conflist", "99-other.conflist", 0o644);
    fs::write(node.conf("README"), b"not a config").unwrap();
    install(&node.cfg()).unwrap();
    let report = uninstall(&node.cfg(), true).unwrap();
    for d in &node.bin_dirs {
        assert_eq!(names(d), vec!["ptp".to_owned()], "only our binary removed");
    }
    assert_eq!(
        names(&node.conf_dir),
        ["10-kindnet.conflist", "99-other.conflist", "README"].map(String::from)
    );
    assert_eq!(
        fs::read(other).unwrap(),
        data("10-calico.conflist"),
        "untouched, not even reformatted"
    );
    assert_eq!(
        report
            .changes
            .iter()
            .filter(|c| c.change == Change::Removed)
            .count(),
        2
    );
}

#[test]
fn uninstall_cleans_every_file_that_holds_our_entry() {
    let node = Node::new();
    let a = node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    install(&node.cfg()).unwrap();
    // A new primary appears before ours; install patches it too.
    let b = node.put("10-calico.conflist", "05-calico.conflist", 0o644);
    install(&node.cfg()).unwrap();
    uninstall(&node.cfg(), false).unwrap();
    assert_eq!(read_json(&a), json(&data("10-kindnet.conflist")));
    assert_eq!(read_json(&b), json(&data("10-calico.conflist")));
}

// ---------- bad input ----------

#[test]
fn malformed_first_file_is_skipped_and_left_alone() {
    let node = Node::new();
    let broken = node.conf("05-broken.conflist");
    fs::write(
        &broken,
        b"{\"cniVersion\": \"0.3.1\", \"name\": \"x\", \"plugins\": [{\"type\": \"pt",
    )
    .unwrap();
    let good = node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let report = install(&node.cfg()).unwrap();
    assert_eq!(report.primary, Some(good));
    assert!(fs::read(&broken).unwrap().ends_with(b"\"pt"), "untouched");
}

#[test]
fn only_malformed_configs_is_an_error_that_lists_them() {
    let node = Node::new();
    fs::write(node.conf("10-a.conflist"), b"not json").unwrap();
    fs::write(node.conf("20-b.conf"), b"{\"name\": \"no type\"}").unwrap();
    fs::write(
        node.conf("30-c.conflist"),
        br#"{"name": "n", "plugins": {"type": "ptp"}}"#,
    )
    .unwrap();
    let before = snapshot(&node.conf_dir);
    let err = install(&node.cfg()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no primary CNI config"), "{msg}");
    assert!(msg.contains("10-a.conflist: not valid JSON"), "{msg}");
    assert!(
        msg.contains("20-b.conf: plugins[0] has no non-empty string `type`"),
        "{msg}"
    );
    assert!(
        msg.contains("30-c.conflist: `plugins` is not an array (found an object)"),
        "{msg}"
    );
    assert_eq!(snapshot(&node.conf_dir), before);
}

#[test]
fn override_with_plugins_not_an_array_is_an_error_and_untouched() {
    let node = Node::new();
    let p = node.conf("10-bad.conflist");
    fs::write(
        &p,
        br#"{"cniVersion": "1.0.0", "name": "n", "plugins": {"type": "ptp"}}"#,
    )
    .unwrap();
    let before = snapshot(&node.conf_dir);
    let mut cfg = node.cfg();
    cfg.conf_override = Some("10-bad.conflist".into());
    let err = install(&cfg).unwrap_err();
    assert!(matches!(err, InstallError::InvalidConfig { .. }), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(
        err.to_string(),
        format!(
            "invalid CNI config {}: `plugins` is not an array (found an object)",
            p.display()
        )
    );
    assert_eq!(snapshot(&node.conf_dir), before);
}

#[test]
fn missing_override_waits_like_a_missing_config() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let mut cfg = node.cfg();
    cfg.conf_override = Some("10-calico.conflist".into());
    let err = install(&cfg).unwrap_err();
    assert!(err.is_retryable());
    assert!(
        err.to_string()
            .contains("the config override 10-calico.conflist does not exist"),
        "{err}"
    );
}

#[test]
fn our_entry_in_the_middle_moves_last_and_duplicates_collapse() {
    let node = Node::new();
    let p = node.conf("10-calico.conflist");
    let mut v = json(&data("10-calico.conflist"));
    let plugins = v["plugins"].as_array_mut().unwrap();
    plugins.insert(1, json!({"type": "ambient-cni", "socket": "/old.sock"}));
    plugins.insert(0, json!({"type": "ambient-cni"}));
    fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    install(&node.cfg()).unwrap();
    let got = read_json(&p);
    assert_eq!(
        types(&got),
        ["calico", "bandwidth", "portmap", "ambient-cni"]
    );
    assert_eq!(got, with_ours(&json(&data("10-calico.conflist"))));
}

#[test]
fn multus_is_refused_with_a_clear_message() {
    let node = Node::new();
    let m = node.put("00-multus.conf", "00-multus.conf", 0o644);
    node.put("10-calico.conflist", "10-calico.conflist", 0o644);
    let before = snapshot(&node.conf_dir);
    let err = install(&node.cfg()).unwrap_err();
    assert!(matches!(err, InstallError::Multus { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(m.to_str().unwrap()) && msg.contains("multus-shim"),
        "{msg}"
    );
    assert!(msg.contains("not supported yet"), "{msg}");
    assert_eq!(snapshot(&node.conf_dir), before, "nothing patched");
    assert!(!check(&node.cfg()).unwrap().is_ready());
}

#[test]
fn conf_conversion_refuses_to_overwrite_a_foreign_conflist() {
    let node = Node::new();
    node.put("10-ptp.conf", "10-ptp.conf", 0o644);
    // Not a valid primary (no plugins), so the .conf is picked, and the .conflist is in the way.
    fs::write(
        node.conf("10-ptp.conflist"),
        b"{\"name\": \"someone else's\"}",
    )
    .unwrap();
    let before = snapshot(&node.conf_dir);
    let err = install(&node.cfg()).unwrap_err();
    assert!(matches!(err, InstallError::ConflistExists { .. }), "{err}");
    assert_eq!(snapshot(&node.conf_dir), before);
}

#[test]
fn symlinked_primary_is_refused() {
    let node = Node::new();
    let real = node.root.path().join("real.conflist");
    fs::write(&real, data("10-kindnet.conflist")).unwrap();
    std::os::unix::fs::symlink(&real, node.conf("10-kindnet.conflist")).unwrap();
    let err = install(&node.cfg()).unwrap_err();
    assert!(matches!(err, InstallError::Symlink { .. }), "{err}");
    assert_eq!(fs::read(&real).unwrap(), data("10-kindnet.conflist"));
}

#[test]
fn conf_dir_that_is_not_a_directory_is_an_error_naming_it() {
    // The parent of the "conf dir" is a regular file: every open fails with ENOTDIR, the way a
    // wrong hostPath mount does. Proves: a clear error naming the path, no panic, no write.
    let node = Node::new();
    let file = node.root.path().join("etc/cni/not-a-dir");
    fs::write(&file, b"x").unwrap();
    let mut cfg = node.cfg();
    cfg.conf_dir = file.join("net.d");
    let err = install(&cfg).unwrap_err();
    assert!(!err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("net.d") && msg.contains("Not a directory"),
        "{msg}"
    );
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

/// Runs `f` on a thread whose effective capabilities lack DAC override (see common).
fn without_dac_override<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        drop_dac_override_on_this_thread().unwrap();
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn read_only_conf_dir_is_a_clear_error_and_the_original_is_untouched() {
    // Tests run as root, and root ignores a 0555 mode. The test thread drops CAP_DAC_OVERRIDE
    // (and friends) from its own effective set, so the kernel enforces the mode as for any
    // process: this proves what happens on a really read-only dir (EACCES creating the temp file).
    let node = Node::new();
    let p = node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let before = snapshot(&node.conf_dir);
    fs::set_permissions(&node.conf_dir, fs::Permissions::from_mode(0o555)).unwrap();
    let cfg = node.cfg();
    let probe = node.conf_dir.join("probe");
    let (err, probe_failed) = without_dac_override(move || {
        let probe_failed = fs::write(&probe, b"x").is_err();
        (install(&cfg).unwrap_err(), probe_failed)
    });
    fs::set_permissions(&node.conf_dir, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        probe_failed,
        "the dropped capability must make the dir read-only for the thread"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("create temp file in {}", node.conf_dir.display())),
        "{msg}"
    );
    assert!(msg.contains("Permission denied"), "{msg}");
    assert_eq!(
        snapshot(&node.conf_dir),
        before,
        "original untouched, no temp left"
    );
    assert_eq!(read_json(&p), json(&data("10-kindnet.conflist")));
}

#[test]
fn read_only_bin_dir_fails_before_the_config_is_patched() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let before = snapshot(&node.conf_dir);
    fs::set_permissions(&node.bin_dirs[1], fs::Permissions::from_mode(0o555)).unwrap();
    let cfg = node.cfg();
    let err = without_dac_override(move || install(&cfg).unwrap_err());
    fs::set_permissions(&node.bin_dirs[1], fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        err.to_string().contains(node.bin_dirs[1].to_str().unwrap()),
        "{err}"
    );
    // No entry without its binary: the config was not touched.
    assert_eq!(snapshot(&node.conf_dir), before);
}

#[test]
fn bad_settings_are_rejected_up_front() {
    let node = Node::new();
    node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let before = snapshot(&node.conf_dir);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"type": "ambient-cni", "name": "x"}),
            "must not set `name`",
        ),
        (
            json!({"type": "ambient-cni", "cniVersion": "1.0.0"}),
            "must not set `cniVersion`",
        ),
        (json!({"type": "../../bin/sh"}), "not a plain file name"),
        (json!({"socket": "/x"}), "no string `type`"),
        (json!(["ambient-cni"]), "not a JSON object"),
    ];
    for (entry, want) in cases {
        let mut cfg = node.cfg();
        cfg.plugin_entry = entry;
        let err = install(&cfg).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
    let mut cfg = node.cfg();
    cfg.conf_override = Some("../etc/passwd".into());
    assert!(install(&cfg).is_err());
    assert_eq!(snapshot(&node.conf_dir), before);
    assert!(!node.bin_dirs[0].join("ambient-cni").exists());
}

#[test]
fn unsupported_cni_version_is_a_warning() {
    let node = Node::new();
    let p = node.conf("10-old.conflist");
    fs::write(
        &p,
        br#"{"cniVersion": "0.2.0", "name": "old", "plugins": [{"type": "ptp"}]}"#,
    )
    .unwrap();
    let report = install(&node.cfg()).unwrap();
    assert_eq!(report.warnings.len(), 1, "{report}");
    assert!(report.warnings[0].contains("0.2.0"));
}

#[test]
fn check_reports_what_is_missing() {
    let node = Node::new();
    let p = node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let s = check(&node.cfg()).unwrap();
    assert!(!s.is_ready());
    assert_eq!(s.problems.len(), 3, "{s}"); // two binaries, one entry
    install(&node.cfg()).unwrap();
    let s = check(&node.cfg()).unwrap();
    assert!(s.is_ready(), "{s}");
    assert_eq!(s.primary, Some(p.clone()));
    rewrite_like_a_cni(&p, &data("10-kindnet.conflist"));
    assert!(!check(&node.cfg()).unwrap().is_ready());
}
