//! Dual-stack node operations, as root in namespaces (issue 11): a ztunnel netns whose loopback
//! goes down (the IPv6 local route on `lo` is refused with ENETDOWN there) is brought back by the
//! daemon's repair with IPv6 captured again; and a daemon restarted with `--ip-families v4` after
//! a dual-stack run removes every IPv6 object of ours on start, IPv4 staying captured.

use ambient_cni_tests::fault::{ipset_members_of, pod_routes_of, IPSET, IPSET6};
use ambient_cni_tests::require_root;
use ambient_cni_tests::world::{hostport, Family, Pod, World, REMOTE_IP, REMOTE_IP6};
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// Is `pod`'s egress to `remote` captured (answered by ztunnel at 15001)?
fn captured(w: &World, pod: &Pod, remote: &str) -> bool {
    w.answer(&pod.netns, &hostport(remote, 8080), None)
        .is_ok_and(|a| a.contains("ztunnel port=15001"))
}

#[test]
fn a_ztunnel_loopback_that_goes_down_is_brought_up_by_the_repair_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let w = World::with_family("ztlo", Family::Dual, &[])?;
    let zt = w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    assert!(captured(&w, &app, REMOTE_IP6), "captured before");
    // Down: the kernel drops the routes on lo, and IPv6 refuses to add them back while it is.
    w.net
        .exec_ok(&zt.netns, &["ip", "link", "set", "lo", "down"])?;
    let t0 = Instant::now();
    World::eventually(Duration::from_secs(20), || {
        Ok(captured(&w, &app, REMOTE_IP6) && captured(&w, &app, REMOTE_IP))
    })
    .with_context(|| {
        format!(
            "IPv6 not captured again; daemon log:\n{}",
            w.daemon().map(|d| d.log_text()).unwrap_or_default()
        )
    })?;
    println!("captured again after {:?}", t0.elapsed());
    let lo = w
        .net
        .exec_ok(&zt.netns, &["ip", "-o", "link", "show", "lo"])?;
    assert!(lo.contains(",UP"), "lo is up again: {lo}");
    let log = w.daemon()?.log_text();
    assert!(log.contains("lo is down"), "the daemon says what it did");
    Ok(())
}

#[test]
fn a_family_switched_off_leaves_no_object_after_the_restart_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut w = World::with_family("famoff", Family::Dual, &[])?;
    let _zt = w.ztunnel("zt", "a")?;
    let app = w.pod("app", "default", "app")?;
    let ip6 = app.need_ip6()?;
    assert!(ipset_members_of(&w.net, "node", IPSET6)?.contains_key(&ip6));
    assert!(pod_routes_of(&w.net, "node", "-6")?.contains(&ip6));
    let v6_state = |w: &World| -> Result<String> {
        let mut s = String::new();
        for argv in [
            &["ip6tables-save"][..],
            &["ip", "-6", "rule"],
            &["ip", "-6", "route", "show", "table", "100"],
            &["ip", "-6", "route", "show", "table", "101"],
            &["ip", "-6", "route", "show", "table", "102"],
            &["ipset", "list", "-n"],
        ] {
            s.push_str(&w.net.exec("node", argv).stdout);
        }
        Ok(s)
    };
    let before = v6_state(&w)?;
    assert!(before.contains("ztunnel-") && before.contains(IPSET6));

    w.restart_daemon_with(&["--ip-families", "v4"])?;
    let after = v6_state(&w)?;
    println!("IPv6 state after the restart with --ip-families v4:\n{after}");
    let ip6t = w.net.exec("node", &["ip6tables-save"]).stdout;
    assert!(!ip6t.contains("ztunnel-"), "ip6tables chains left:\n{ip6t}");
    assert!(
        !after.lines().any(|l| l.trim() == IPSET6),
        "IPv6 set left:\n{after}"
    );
    for prio in ["100:", "101:", "102:", "103:"] {
        assert!(
            !after.lines().any(|l| l.starts_with(prio)),
            "ip -6 rule {prio} left:\n{after}"
        );
    }
    assert!(pod_routes_of(&w.net, "node", "-6")?.is_empty());
    // IPv4 is untouched: still captured, still in its set.
    assert!(ipset_members_of(&w.net, "node", IPSET)?.contains_key(&app.need_ip4()?));
    assert!(captured(&w, &app, REMOTE_IP), "IPv4 still captured");
    Ok(())
}
