//! Opt-in readiness through CNI STATUS (`AMBIENT_CNI_STATUS_READINESS`): the patched conflist is
//! raised to cniVersion 1.1.0 with the old version kept in our entry; re-installing changes
//! nothing; turning it off or uninstalling puts the version back; 1.1.0 configs are left alone.
#![allow(clippy::unwrap_used)]

mod common;

use ambient_cni_install::conflist::READINESS_FROM_KEY;
use ambient_cni_install::{check, install, uninstall, PLUGIN_TYPE};
use common::*;
use serde_json::json;

#[test]
fn status_readiness_raises_the_version_and_uninstall_puts_it_back() {
    let node = Node::new();
    let p = node.put("10-kindnet.conflist", "10-kindnet.conflist", 0o644);
    let orig = read_json(&p);
    assert_eq!(orig["cniVersion"], "0.3.1");
    let mut cfg = node.cfg();
    cfg.status_readiness = true;
    install(&cfg).unwrap();
    let v = read_json(&p);
    assert_eq!(
        v["cniVersion"], "1.1.0",
        "runtimes ask STATUS from 1.1.0 on"
    );
    let ours = v["plugins"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(ours["type"], PLUGIN_TYPE);
    assert_eq!(ours[READINESS_FROM_KEY], "0.3.1");
    assert_eq!(
        v["plugins"][0], orig["plugins"][0],
        "the primary's plugins untouched"
    );
    assert!(check(&cfg).unwrap().is_ready());

    // Again: the same bytes, the mtime stays.
    let before = snapshot(&node.conf_dir);
    let r = install(&cfg).unwrap();
    assert!(!r.changed(), "{r:?}");
    assert_eq!(snapshot(&node.conf_dir), before);

    // The option turned off: the version goes back, the entry stays.
    let off = node.cfg();
    assert!(
        !check(&off).unwrap().is_ready(),
        "the file is not what `off` writes"
    );
    install(&off).unwrap();
    let v = read_json(&p);
    assert_eq!(v["cniVersion"], "0.3.1");
    assert!(v["plugins"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .get(READINESS_FROM_KEY)
        .is_none());

    // On again, then uninstall: the primary's own file as it was, version included.
    install(&cfg).unwrap();
    uninstall(&cfg, false).unwrap();
    assert_eq!(read_json(&p), orig);
}

#[test]
fn a_config_already_at_1_1_0_is_left_at_its_version() {
    let node = Node::new();
    let p = node.conf("10-ptp.conflist");
    let orig = json!({"cniVersion": "1.1.0", "name": "k8s", "plugins": [
        {"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}}]});
    std::fs::write(&p, serde_json::to_vec(&orig).unwrap()).unwrap();
    for on in [true, false] {
        let mut cfg = node.cfg();
        cfg.status_readiness = on;
        install(&cfg).unwrap();
        let v = read_json(&p);
        assert_eq!(v["cniVersion"], "1.1.0");
        let ours = v["plugins"].as_array().unwrap().last().unwrap();
        assert!(
            ours.get(READINESS_FROM_KEY).is_none(),
            "nothing to put back: {ours}"
        );
    }
}

#[test]
fn a_single_conf_is_raised_in_its_new_conflist() {
    let node = Node::new();
    let conf = node.conf("10-ptp.conf");
    std::fs::write(
        &conf,
        serde_json::to_vec(&json!({"cniVersion": "0.4.0", "name": "n", "type": "ptp",
            "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}}))
        .unwrap(),
    )
    .unwrap();
    let mut cfg = node.cfg();
    cfg.status_readiness = true;
    install(&cfg).unwrap();
    let v = read_json(&node.conf("10-ptp.conflist"));
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["plugins"][1][READINESS_FROM_KEY], "0.4.0");
    uninstall(&cfg, false).unwrap();
    assert_eq!(
        read_json(&node.conf("10-ptp.conflist"))["cniVersion"],
        "0.4.0"
    );
}
