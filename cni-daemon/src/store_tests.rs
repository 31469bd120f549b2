//! The store: reopen, boot IDs, torn and damaged journal lines, failed appends.

use super::*;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

fn rec(cid: &str, ip: u8) -> PodRecord {
    PodRecord {
        container_id: cid.into(),
        ifname: "eth0".into(),
        netns: String::new(),
        namespace: "ns".into(),
        name: cid.into(),
        uid: format!("uid-{cid}"),
        network: "net".into(),
        ips: vec![Ipv4Addr::new(10, 244, 1, ip).into()],
        gateway: None,
        gateway6: None,
        host_if: None,
        enrolled: true,
        ztunnel: false,
        seq: 0,
    }
}

/// Adds `cid` to `reg` and journals it, as the daemon does.
fn put(st: &mut Store, reg: &mut Registry, cid: &str, ip: u8) -> Result<(), StoreError> {
    reg.upsert(rec(cid, ip));
    let r = reg.find(cid, "eth0").cloned().expect("just added");
    st.append(&Entry::Put { rec: r }, reg)
}

fn journal(dir: &Path) -> Vec<u8> {
    fs::read(dir.join(JOURNAL)).expect("journal")
}

fn names(reg: &Registry) -> Vec<String> {
    let mut v: Vec<String> = reg.records().map(|r| r.container_id.clone()).collect();
    v.sort();
    v
}

fn corrupt_copies(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .expect("state dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("registry.journal.corrupt-"))
        })
        .collect()
}

/// Whatever tracing logs while `f` runs, as text.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text =
        String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    (out, text)
}

#[test]
fn journal_survives_reopen_and_keeps_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut st, mut reg, discarded) = Store::open(dir.path()).expect("open");
        assert!(!discarded);
        for (c, ip) in [("a", 7), ("b", 7), ("c", 9)] {
            put(&mut st, &mut reg, c, ip).expect("append");
        }
        let k = reg.find("c", "eth0").map(|r| r.key()).expect("c");
        reg.remove_key(&k);
        st.append(&Entry::Del { key: k }, &reg).expect("append");
    }
    let (st, reg, _) = Store::open(dir.path()).expect("reopen");
    assert_eq!(reg.len(), 2);
    assert!(st.damage().is_empty());
    assert!(
        corrupt_copies(dir.path()).is_empty(),
        "nothing damaged, nothing kept aside"
    );
    assert_eq!(
        reg.owner_of(Ipv4Addr::new(10, 244, 1, 7).into())
            .map(|r| r.container_id.as_str()),
        Some("b")
    );
}

/// A journal exactly as this format has always written it (boot line, then one JSON entry per
/// line) still loads.
#[test]
fn a_journal_of_todays_format_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = serde_json::to_string(&rec("a", 7)).expect("json");
    let text = format!(
        "{}\n{{\"op\":\"put\",\"rec\":{r}}}\n{{\"op\":\"put\",\"rec\":{}}}\n{{\"op\":\"del\",\"key\":{{\"id\":\"uid-b\",\"ifname\":\"eth0\"}}}}\n",
        boot_id(),
        serde_json::to_string(&rec("b", 8)).expect("json"),
    );
    fs::write(dir.path().join(JOURNAL), text).expect("write");
    let (st, reg, discarded) = Store::open(dir.path()).expect("open");
    assert!(!discarded);
    assert!(st.damage().is_empty(), "{:?}", st.damage());
    assert_eq!(names(&reg), ["a"]);
}

#[test]
fn torn_tail_is_skipped_logged_and_kept_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut st, mut reg, _) = Store::open(dir.path()).expect("open");
        put(&mut st, &mut reg, "a", 7).expect("append");
    }
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join(JOURNAL))
        .expect("journal");
    f.write_all(b"{\"op\":\"put\",\"rec\":{\"contai")
        .expect("write");
    let before = journal(dir.path());
    let ((st, reg), log) = logged(|| {
        let (st, reg, _) = Store::open(dir.path()).expect("reopen");
        (st, reg)
    });
    assert_eq!(names(&reg), ["a"]);
    assert_eq!(st.damage().len(), 1);
    assert_eq!(st.damage()[0].line, 3);
    assert!(!st.damage()[0].recovered);
    assert!(log.contains("ERROR") && log.contains("line=3"), "{log}");
    let aside = corrupt_copies(dir.path());
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(fs::read(&aside[0]).expect("aside"), before);
    println!("torn tail: {log}");
}

/// The issue's case: four acknowledged ADDs, a torn line before the fourth's (line 5: the boot ID
/// is line 1). Restart must have all four, log the damage and keep the damaged journal.
#[test]
fn a_torn_line_in_the_middle_loses_nothing_after_it() {
    for glued in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut st, mut reg, _) = Store::open(dir.path()).expect("open");
            for (c, ip) in [("a", 1), ("b", 2), ("c", 3)] {
                put(&mut st, &mut reg, c, ip).expect("append");
            }
        }
        {
            // A fragment left by a failed write, on its own line or glued onto the next append.
            let mut f = OpenOptions::new()
                .append(true)
                .open(dir.path().join(JOURNAL))
                .expect("journal");
            let frag: &[u8] = if glued {
                b"{\"op\":\"put\",\"rec\":{\"container_id\":\"x"
            } else {
                b"{\"op\":\"put\",\"rec\":{\"container_id\":\"x\n"
            };
            f.write_all(frag).expect("write");
        }
        {
            // The daemon appends after it (its store does not know of the fragment).
            let dir2 = tempfile::tempdir().expect("tempdir");
            let (mut st2, mut reg2, _) = Store::open(dir2.path()).expect("open");
            put(&mut st2, &mut reg2, "d", 4).expect("append");
            let lines = journal(dir2.path());
            let d_line = lines.split(|&b| b == b'\n').nth(1).expect("d's line");
            let mut f = OpenOptions::new()
                .append(true)
                .open(dir.path().join(JOURNAL))
                .expect("journal");
            f.write_all(d_line).expect("write");
            f.write_all(b"\n").expect("write");
        }
        let ((st, reg), log) = logged(|| {
            let (st, reg, _) = Store::open(dir.path()).expect("reopen");
            (st, reg)
        });
        assert_eq!(names(&reg), ["a", "b", "c", "d"], "glued={glued}: {log}");
        assert_eq!(st.damage().len(), 1, "glued={glued}");
        assert_eq!(st.damage()[0].line, 5);
        assert_eq!(st.damage()[0].recovered, glued);
        assert!(log.contains("line=5"), "{log}");
        assert_eq!(corrupt_copies(dir.path()).len(), 1);
        // The compaction kept everything: a second restart still has all four, with no damage.
        let (st, reg, _) = Store::open(dir.path()).expect("reopen again");
        assert_eq!(names(&reg), ["a", "b", "c", "d"]);
        assert!(st.damage().is_empty());
        println!("torn middle (glued={glued}): {log}");
    }
}

#[test]
fn garbage_lines_anywhere_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = |c: &str, ip: u8| serde_json::to_string(&Entry::Put { rec: rec(c, ip) }).expect("json");
    let text = format!(
        "{}\n\u{0}\u{0}\u{0}\n{}\nnot json\n{}\n\u{ff}{}\n{{\"op\":\"put\"",
        boot_id(),
        e("a", 1),
        e("b", 2),
        e("c", 3)
    );
    fs::write(dir.path().join(JOURNAL), text).expect("write");
    let (st, reg, _) = Store::open(dir.path()).expect("open");
    // Line 6: a stray byte, then c's whole entry, which is recovered.
    assert_eq!(names(&reg), ["a", "b", "c"]);
    let lines: Vec<(usize, bool)> = st.damage().iter().map(|d| (d.line, d.recovered)).collect();
    assert_eq!(lines, [(2, false), (4, false), (6, true), (7, false)]);
}

#[test]
fn a_failed_append_is_cut_off_and_the_next_one_lands_whole() {
    for fault in [Fault::ShortWrite(17), Fault::Sync] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut st, mut reg, _) = Store::open(dir.path()).expect("open");
        put(&mut st, &mut reg, "a", 1).expect("append");
        let good = journal(dir.path());
        st.inject(fault, false);
        let err = put(&mut st, &mut reg, "b", 2).expect_err("injected");
        assert!(err.to_string().contains("registry.journal"), "{err}");
        assert_eq!(
            journal(dir.path()),
            good,
            "{fault:?}: the partial line was cut off"
        );
        // The daemon undoes b in memory; the next change lands on a line of its own.
        reg.remove("b", "eth0");
        put(&mut st, &mut reg, "c", 3).expect("append");
        drop(st);
        let (st, reg, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(names(&reg), ["a", "c"], "{fault:?}");
        assert!(st.damage().is_empty(), "{fault:?}: {:?}", st.damage());
    }
}

#[test]
fn a_fragment_that_cannot_be_cut_off_makes_the_next_append_compact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut st, mut reg, _) = Store::open(dir.path()).expect("open");
    put(&mut st, &mut reg, "a", 1).expect("append");
    st.inject(Fault::ShortWrite(20), true);
    put(&mut st, &mut reg, "b", 2).expect_err("injected");
    let torn = journal(dir.path());
    assert!(!torn.ends_with(b"\n"), "the fragment is still there");
    reg.remove("b", "eth0");
    st.cut_fails = true;
    put(&mut st, &mut reg, "c", 3).expect("compacts instead");
    // The fresh journal holds only the boot line: c is in the snapshot.
    assert_eq!(journal(dir.path()), format!("{}\n", boot_id()).into_bytes());
    st.cut_fails = false;
    put(&mut st, &mut reg, "d", 4).expect("append");
    drop(st);
    let (st, reg, _) = Store::open(dir.path()).expect("reopen");
    assert_eq!(names(&reg), ["a", "c", "d"]);
    assert!(st.damage().is_empty());
}

#[test]
fn other_boot_is_discarded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut reg = Registry::default();
    reg.upsert(rec("a", 7));
    let snap = SnapshotRef {
        boot_id: "another-boot",
        registry: &reg,
    };
    fs::write(
        dir.path().join(SNAPSHOT),
        serde_json::to_vec(&snap).expect("json"),
    )
    .expect("write");
    let (_st, reg, discarded) = Store::open(dir.path()).expect("open");
    assert!(discarded);
    assert!(reg.is_empty());
}

/// A journal line written by the IPv4-only version (`ips` as IPv4 strings, no `gateway6`)
/// still loads.
#[test]
fn a_journal_line_of_the_ipv4_only_version_loads() {
    let line = r#"{"op":"put","rec":{"container_id":"c1","ifname":"eth0","netns":"/var/run/netns/c1","namespace":"default","name":"app","uid":"u1","network":"k8s","ips":["10.244.1.5"],"gateway":"10.244.1.1","host_if":"veth1","enrolled":true,"ztunnel":false,"seq":7}}"#;
    let Entry::Put { rec } = serde_json::from_str::<Entry>(line).expect("loads") else {
        panic!("not a put");
    };
    assert_eq!(
        rec.ips,
        vec![std::net::IpAddr::from(Ipv4Addr::new(10, 244, 1, 5))]
    );
    assert_eq!(rec.gateway6, None);
}

#[test]
fn one_daemon_per_state_dir_and_the_lock_goes_with_its_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = lock_state_dir(dir.path(), std::time::Duration::ZERO).expect("first lock");
    // A second holder (another open file description, as another process has) is refused
    // once the wait is over, naming the lock file.
    let t = std::time::Instant::now();
    let err = lock_state_dir(dir.path(), std::time::Duration::from_millis(300))
        .expect_err("a second daemon on the same state dir");
    assert!(t.elapsed() >= std::time::Duration::from_millis(300));
    let msg = err.to_string();
    assert!(
        msg.contains(LOCK) && msg.contains("another ambient-cnid"),
        "{msg}"
    );
    // The holder stops: the next one gets it at once; the registry files are left alone.
    drop(first);
    let _again = lock_state_dir(dir.path(), std::time::Duration::ZERO).expect("after the holder");
    // A waiter gets it when the holder goes away during its wait.
    drop(_again);
    let held = lock_state_dir(dir.path(), std::time::Duration::ZERO).expect("lock");
    let p = dir.path().to_path_buf();
    let waiter = std::thread::spawn(move || lock_state_dir(&p, std::time::Duration::from_secs(5)));
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(held);
    waiter.join().expect("thread").expect("the waiter's lock");
}

#[test]
fn the_last_firewall_is_recorded_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(last_firewall(dir.path()), None);
    record_firewall(dir.path(), "nftables").expect("record");
    assert_eq!(last_firewall(dir.path()).as_deref(), Some("nftables"));
    record_firewall(dir.path(), "iptables").expect("record");
    assert_eq!(last_firewall(dir.path()).as_deref(), Some("iptables"));
    assert!(!dir.path().join(format!("{FIREWALL}.tmp")).exists());
}
