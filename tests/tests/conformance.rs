//! CNI conformance of `ambient-cni` (cni-contract.md §1–7), as root, in namespaces the tests
//! create: Debian `ptp` + `host-local` + `ambient-cni` driven through libcni (our cnitool driver)
//! for cniVersion 0.3.1, 0.4.0 and 1.0.0, with `ambient-cnid` running in the node namespace;
//! spec 1.1.0 (GC, STATUS) by running the plugin directly, since Debian's libcni stops at 1.0.0.
//!
//! Run: `cargo test -p ambient-cni-tests --test conformance` (as root). The latency loop for the
//! README is `#[ignore]`d: `cargo test -p ambient-cni-tests --test conformance -- --ignored
//! --nocapture add_latency`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_cni_tests::*;
use serde_json::{json, Value};

const SUBNET: &str = "10.244.1.0/24";
const K8S_NS: &str = "ambient-demo";
const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI_ARGS as containerd sends them (ptp rejects unknown keys without IgnoreUnknown).
fn k8s_args(pod: &str, cid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={K8S_NS};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID=uid-{pod}"
    )
}

/// ptp behind a wrapper that keeps a copy of ptp's own stdout, so a test can compare the
/// chain's final result with what ptp printed.
fn ptp_tee_script(tee_dir: &Path) -> String {
    format!(
        "#!/bin/sh\nout=$({ptp})\nrc=$?\nprintf '%s' \"$out\" > '{dir}'/\"$CNI_COMMAND-$CNI_CONTAINERID\"\nprintf '%s\\n' \"$out\"\nexit $rc\n",
        ptp = debian_plugin_dir().join("ptp").display(),
        dir = tee_dir.display()
    )
}

/// One node namespace with a daemon and a CNI env holding two networks:
/// `k8s` = ptp-tee + ambient-cni, `plain` = ptp-tee alone (own IPAM dir, same subnet).
struct Node {
    net: TestNet,
    daemon: Daemon,
    cni: CniEnv,
    tee: PathBuf,
}

impl Node {
    fn new(tag: &str, version: &str, timeout_ms: u64) -> Node {
        let net = TestNet::new(tag);
        net.add_ns("node").expect("node netns");
        let daemon = Daemon::start(&net, "node", &["--ambient-namespace", K8S_NS]).expect("daemon");
        let cni = CniEnv::new(&net, "node").expect("cni env");
        let tee = net.dir().join("tee");
        std::fs::create_dir_all(&tee).expect("tee dir");
        cni.add_script("ptp-tee", &ptp_tee_script(&tee))
            .expect("ptp-tee");
        let node = Node {
            net,
            daemon,
            cni,
            tee,
        };
        node.write_networks(version, timeout_ms);
        node
    }

    fn write_networks(&self, version: &str, timeout_ms: u64) {
        let ours = ambient_entry(self.daemon.socket(), &self.cni.plugin_log(), timeout_ms);
        let mut k8s = ptp_conflist("k8s", version, SUBNET, &self.cni.ipam_dir(), Some(ours));
        k8s["plugins"][0]["type"] = json!("ptp-tee");
        self.cni.write_conflist(&k8s).expect("k8s conflist");
        let plain_ipam = self.net.dir().join("ipam-plain");
        let mut plain = ptp_conflist("plain", version, SUBNET, &plain_ipam, None);
        plain["plugins"][0]["type"] = json!("ptp-tee");
        self.cni.write_conflist(&plain).expect("plain conflist");
    }

    fn pod(&self, name: &str) -> PathBuf {
        self.net.add_ns(name).expect("pod netns");
        self.net.ns_path(name)
    }

    fn cnitool(
        &self,
        cmd: &str,
        network: &str,
        pod: &Path,
        cid: &str,
        args: Option<&str>,
    ) -> Output {
        let mut env = vec![("CNI_CONTAINERID", cid)];
        if let Some(a) = args {
            env.push(("CNI_ARGS", a));
        }
        self.cni.cnitool(cmd, network, pod, &env)
    }

    /// ptp's own stdout for the last `verb` of `cid`.
    fn ptp_output(&self, verb: &str, cid: &str) -> Value {
        let p = self.tee.join(format!("{verb}-{cid}"));
        let body = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("ptp output {body:?}: {e}"))
    }

    fn pods(&self) -> (u64, u64) {
        let s = self.daemon.status_json().expect("daemon status");
        (
            s["pods"].as_u64().unwrap_or(u64::MAX),
            s["enrolledPods"].as_u64().unwrap_or(u64::MAX),
        )
    }

    /// Everything useful when an assertion fails.
    fn logs(&self) -> String {
        format!(
            "--- plugin log ---\n{}\n--- daemon log ---\n{}",
            std::fs::read_to_string(self.cni.plugin_log()).unwrap_or_default(),
            self.daemon.log_text()
        )
    }
}

/// A result with what differs between two ADDs of two pods blanked out: MACs, the random host
/// veth name and the sandbox path.
fn normalized(result: &Value) -> Value {
    let mut v = result.clone();
    if let Some(ifs) = v.get_mut("interfaces").and_then(Value::as_array_mut) {
        for i in ifs {
            if let Some(o) = i.as_object_mut() {
                if o.contains_key("mac") {
                    o.insert("mac".into(), json!("<mac>"));
                }
                if o.contains_key("sandbox") {
                    o.insert("sandbox".into(), json!("<netns>"));
                } else if o.contains_key("name") {
                    o.insert("name".into(), json!("<host-veth>"));
                }
            }
        }
    }
    v
}

fn version_at_least(v: &str, min: &str) -> bool {
    let p = |s: &str| {
        s.split('.')
            .map(|x| x.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    p(v) >= p(min)
}

/// Everything libcni can drive at one version: ADD (= ptp's result), CHECK, DEL twice, DEL
/// without ADD, DEL without cache, DEL with the netns gone.
fn libcni_chain(version: &str) {
    if !require_root() {
        return;
    }
    let tag = format!("chain-{}", version.replace('.', ""));
    let node = Node::new(&tag, version, 5000);

    // ADD: the chain's final result is exactly ptp's, and the same as a chain without us.
    let pod1 = node.pod("pod1");
    let add = node.cnitool(
        "add",
        "k8s",
        &pod1,
        "cid-pod1",
        Some(&k8s_args("pod1", "cid-pod1")),
    );
    assert!(add.success(), "ADD {version}: {add}\n{}", node.logs());
    let result = add.json().expect("ADD result");
    assert_eq!(
        result,
        node.ptp_output("ADD", "cid-pod1"),
        "ADD output must equal ptp's result"
    );
    assert_eq!(result["cniVersion"], version);
    assert_eq!(result["ips"][0]["address"], "10.244.1.2/24", "{result}");
    assert!(
        add.stderr.is_empty(),
        "nothing on stderr: plugin logs go to logFile: {add}"
    );
    assert_eq!(node.pods(), (1, 1), "{}", node.logs());

    let plain_pod = node.pod("plain");
    let plain = node.cnitool(
        "add",
        "plain",
        &plain_pod,
        "cid-plain",
        Some(&k8s_args("plain", "cid-plain")),
    );
    assert!(plain.success(), "{plain}");
    assert_eq!(
        normalized(&result),
        normalized(&plain.json().expect("plain result"))
    );
    assert_eq!(
        node.pods(),
        (1, 1),
        "a network without our plugin does not reach the daemon"
    );

    // CHECK: libcni refuses it below 0.4.0 before calling any plugin.
    let check = node.cnitool(
        "check",
        "k8s",
        &pod1,
        "cid-pod1",
        Some(&k8s_args("pod1", "cid-pod1")),
    );
    if version_at_least(version, "0.4.0") {
        assert!(check.success(), "CHECK {version}: {check}\n{}", node.logs());
    } else {
        assert!(!check.success());
        assert!(
            check.stderr.contains("does not support the CHECK command"),
            "{check}"
        );
    }

    // DEL twice.
    for round in 1..=2 {
        let del = node.cnitool(
            "del",
            "k8s",
            &pod1,
            "cid-pod1",
            Some(&k8s_args("pod1", "cid-pod1")),
        );
        assert!(
            del.success(),
            "DEL #{round} {version}: {del}\n{}",
            node.logs()
        );
        assert_eq!(del.stdout, "", "DEL prints nothing");
    }
    assert_eq!(node.pods(), (0, 0), "{}", node.logs());

    // DEL of a container that never had an ADD.
    let ghost = node.pod("ghost");
    let del = node.cnitool(
        "del",
        "k8s",
        &ghost,
        "cid-never-added",
        Some(&k8s_args("ghost", "cid-never-added")),
    );
    assert!(del.success(), "DEL without ADD: {del}\n{}", node.logs());

    // DEL without prevResult: the libcni cache is gone (lost after a reboot, or 0.3.x).
    let pod2 = node.pod("pod2");
    let add = node.cnitool(
        "add",
        "k8s",
        &pod2,
        "cid-pod2",
        Some(&k8s_args("pod2", "cid-pod2")),
    );
    assert!(add.success(), "{add}\n{}", node.logs());
    assert_eq!(node.pods(), (1, 1));
    std::fs::remove_dir_all(node.cni.cache_dir()).expect("drop cache");
    let del = node.cnitool(
        "del",
        "k8s",
        &pod2,
        "cid-pod2",
        Some(&k8s_args("pod2", "cid-pod2")),
    );
    assert!(del.success(), "DEL without cache: {del}\n{}", node.logs());
    assert_eq!(
        node.pods(),
        (0, 0),
        "the daemon keys pods by container ID, not prevResult"
    );

    // DEL after the netns is gone (CRI-O after a reboot; containerd sends "" instead).
    let pod3 = node.pod("pod3");
    let add = node.cnitool(
        "add",
        "k8s",
        &pod3,
        "cid-pod3",
        Some(&k8s_args("pod3", "cid-pod3")),
    );
    assert!(add.success(), "{add}\n{}", node.logs());
    node.net.del_ns("pod3").expect("remove pod3 netns");
    let del = node.cnitool(
        "del",
        "k8s",
        &pod3,
        "cid-pod3",
        Some(&k8s_args("pod3", "cid-pod3")),
    );
    assert!(del.success(), "DEL with netns gone: {del}\n{}", node.logs());
    assert_eq!(node.pods(), (0, 0), "{}", node.logs());

    let del = node.cnitool("del", "plain", &plain_pod, "cid-plain", None);
    assert!(del.success(), "{del}");
}

#[test]
fn libcni_chain_0_3_1() {
    libcni_chain("0.3.1");
}

#[test]
fn libcni_chain_0_4_0() {
    libcni_chain("0.4.0");
}

#[test]
fn libcni_chain_1_0_0() {
    libcni_chain("1.0.0");
}

/// A prevResult as a 1.1.0 runtime would hand it, with 1.1.0-only fields that must survive.
fn prev_result_110(host_veth: &str, netns: &Path, ip: &str) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "interfaces": [
            {"name": host_veth, "mac": "5a:00:00:00:00:01", "mtu": 1500},
            {"name": "eth0", "mac": "5a:00:00:00:00:02", "sandbox": netns, "mtu": 1500, "socketPath": "", "pciID": ""}
        ],
        "ips": [{"address": format!("{ip}/24"), "gateway": "10.244.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1400, "advmss": 1360, "priority": 10, "table": 254, "scope": 0}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
        "x-vendor": {"kept": [1, 2, 3]}
    })
}

/// Spec 1.1.0 by direct runs: ADD (prevResult through unchanged), CHECK, GC with both keys,
/// either key and none, STATUS ok / daemon down (50), VERSION, DEL.
#[test]
fn spec_1_1_0_direct() {
    if !require_root() {
        return;
    }
    let net = TestNet::new("v110");
    net.add_ns("node").expect("node");
    let mut daemon = Daemon::start(&net, "node", &["--ambient-namespace", K8S_NS]).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");
    let log = net.dir().join("plugin.log");
    let socket = daemon.socket().to_path_buf();
    let daemon_log = daemon.dir().join("daemon.log");
    let conf = |extra: Value| {
        let mut c = json!({"cniVersion": "1.1.0", "name": "k8s11", "type": "ambient-cni",
            "socket": socket, "logFile": log, "logLevel": "debug"});
        if let (Some(m), Value::Object(e)) = (c.as_object_mut(), extra) {
            m.extend(e);
        }
        c
    };
    let logs = || {
        format!(
            "--- plugin log ---\n{}\n--- daemon log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(&daemon_log).unwrap_or_default()
        )
    };

    // Two pods with real interfaces, set up by hand as a 1.1.0 primary plugin would.
    let mut pods = Vec::new();
    for (i, name) in ["a", "b"].iter().enumerate() {
        net.add_ns(name).expect("pod ns");
        let host = format!("vh{name}");
        net.veth("node", &host, name, "eth0").expect("veth");
        let ip = format!("10.244.1.{}", 10 + i);
        net.exec_ok(
            name,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )
        .expect("addr");
        pods.push((
            format!("cid-{name}"),
            net.ns_path(name),
            prev_result_110(&host, &net.ns_path(name), &ip),
        ));
    }
    for (cid, ns, prev) in &pods {
        let ns = ns.to_string_lossy();
        let args = k8s_args(cid, cid);
        let stdin = conf(json!({"prevResult": prev})).to_string();
        let out = run_plugin(
            &ambient_cni_tests::fault::env("ADD", cid, &ns, &args),
            stdin.as_bytes(),
        );
        assert!(out.success(), "ADD 1.1.0: {out}\n{}", logs());
        // Byte for byte: same keys, same order, same numbers, one document and a newline.
        assert_eq!(out.stdout, format!("{prev}\n"));
        let check = run_plugin(
            &ambient_cni_tests::fault::env("CHECK", cid, &ns, &args),
            stdin.as_bytes(),
        );
        assert!(check.success(), "CHECK 1.1.0: {check}\n{}", logs());
        assert_eq!(check.stdout, "");
    }
    let pods_now = || {
        daemon.status_json().expect("status")["pods"]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    assert_eq!(pods_now(), 2);

    let gc = |extra: Value| {
        run_plugin(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/nonexistent")],
            conf(extra).to_string().as_bytes(),
        )
    };
    // No list at all (cnitool gc): the daemon removes nothing.
    let out = gc(json!({}));
    assert!(out.success() && out.stdout.is_empty(), "{out}");
    assert_eq!(pods_now(), 2, "GC without a list removes nothing");
    // A different network's GC does not touch ours.
    let other = run_plugin(
        &[("CNI_COMMAND", "GC")],
        json!({"cniVersion": "1.1.0", "name": "other", "socket": socket, "cni.dev/valid-attachments": []})
            .to_string()
            .as_bytes(),
    );
    assert!(other.success(), "{other}");
    assert_eq!(pods_now(), 2, "GC of another network keeps ours");
    // Both keys (current libcni): keep a, drop b.
    let keep_a = json!([{"containerID": "cid-a", "ifname": "eth0"}]);
    let out = gc(json!({"cni.dev/valid-attachments": keep_a, "cni.dev/attachments": keep_a}));
    assert!(out.success(), "{out}\n{}", logs());
    assert_eq!(pods_now(), 1, "{}", logs());
    // Only the old key, empty: drop a too.
    let out = gc(json!({"cni.dev/attachments": []}));
    assert!(out.success(), "{out}");
    assert_eq!(pods_now(), 0);
    // Only the new key works alone as well (nothing left to remove).
    let out = gc(json!({"cni.dev/valid-attachments": []}));
    assert!(out.success(), "{out}");

    // DEL (also of pods GC already removed) succeeds.
    for (cid, ns, prev) in &pods {
        let ns = ns.to_string_lossy();
        let args = k8s_args(cid, cid);
        let out = run_plugin(
            &ambient_cni_tests::fault::env("DEL", cid, &ns, &args),
            conf(json!({"prevResult": prev})).to_string().as_bytes(),
        );
        assert!(out.success() && out.stdout.is_empty(), "{out}");
    }

    // STATUS: ready → exit 0, nothing printed.
    let status = || {
        run_plugin(
            &[("CNI_COMMAND", "STATUS")],
            conf(json!({})).to_string().as_bytes(),
        )
    };
    let out = status();
    assert!(out.success(), "STATUS: {out}\n{}", logs());
    assert_eq!(out.stdout, "");

    // VERSION: no other env, empty stdin, or libcni's {"cniVersion": X}.
    let out = run_plugin(&[("CNI_COMMAND", "VERSION")], b"");
    assert!(out.success(), "{out}");
    assert_eq!(
        out.json().expect("json"),
        json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED})
    );
    let out = run_plugin(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.1.0"}"#);
    assert_eq!(
        out.stdout,
        format!(
            "{}\n",
            json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED})
        )
    );

    // STATUS with the daemon down → 50 within about a second.
    daemon.stop();
    let out = status();
    assert_eq!(out.status, Some(1), "{out}");
    let j = out.json().expect("error json");
    assert_eq!(j["cniVersion"], "1.1.0");
    assert_eq!(j["code"], 50);
    assert_eq!(
        j["msg"],
        format!("ambient-cnid at {} not available", socket.display())
    );
    assert!(out.elapsed < Duration::from_secs(2), "{out}");
    // And DEL still succeeds with the daemon down.
    let (cid, ns, _) = &pods[0];
    let ns = ns.to_string_lossy();
    let args = k8s_args(cid, cid);
    let out = run_plugin(
        &ambient_cni_tests::fault::env("DEL", cid, &ns, &args),
        conf(json!({})).to_string().as_bytes(),
    );
    assert!(out.success() && out.stdout.is_empty(), "{out}");
}

/// ≥ 20 ADDs at once through libcni: all succeed with distinct IPs, the daemon holds all of them,
/// the plugin log stays one record per line, and parallel DELs empty the registry.
#[test]
fn parallel_adds() {
    if !require_root() {
        return;
    }
    const N: usize = 24;
    let node = Node::new("parallel", "1.0.0", 10_000);
    let pods: Vec<(String, PathBuf)> = (0..N)
        .map(|i| (format!("cid-par-{i}"), node.pod(&format!("p{i}"))))
        .collect();
    let outs: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(cid, ns)| {
                let node = &node;
                s.spawn(move || node.cnitool("add", "k8s", ns, cid, Some(&k8s_args(cid, cid))))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut ips = std::collections::BTreeSet::new();
    for (o, (cid, _)) in outs.iter().zip(&pods) {
        assert!(o.success(), "ADD {cid}: {o}\n{}", node.logs());
        let r = o.json().expect("result");
        assert_eq!(r, node.ptp_output("ADD", cid));
        ips.insert(
            r["ips"][0]["address"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(ips.len(), N, "distinct IPs: {ips:?}");
    assert_eq!(node.pods(), (N as u64, N as u64), "{}", node.logs());

    let log = std::fs::read_to_string(node.cni.plugin_log()).expect("plugin log");
    for line in log.lines() {
        assert!(
            line.starts_with("20") && line.contains('Z'),
            "interleaved log line: {line:?}"
        );
    }

    let outs: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(cid, ns)| {
                let node = &node;
                s.spawn(move || node.cnitool("del", "k8s", ns, cid, Some(&k8s_args(cid, cid))))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for o in &outs {
        assert!(o.success(), "DEL: {o}");
    }
    assert_eq!(node.pods(), (0, 0));
}

/// Daemon down (no socket) or hung (accepts, never answers): ADD fails closed with code 11
/// within the deadline and names the socket; DEL exits 0; a non-k8s pod still passes through.
#[test]
fn daemon_down_or_hung() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("down", "1.0.0", 1000);
    node.daemon.stop();
    let sock = node.daemon.socket().to_path_buf();
    let _ = std::fs::remove_file(&sock);

    // Through libcni: ADD fails, the message names the socket.
    let pod = node.pod("pod1");
    let add = node.cnitool(
        "add",
        "k8s",
        &pod,
        "cid-down",
        Some(&k8s_args("pod1", "cid-down")),
    );
    assert_eq!(add.status, Some(1), "{add}");
    assert!(
        add.stderr
            .contains(&format!("ambient-cnid unreachable at {}", sock.display())),
        "{add}"
    );
    let del = node.cnitool(
        "del",
        "k8s",
        &pod,
        "cid-down",
        Some(&k8s_args("pod1", "cid-down")),
    );
    assert!(del.success(), "DEL with the daemon down: {del}");

    // Non-k8s pod: passes through without the daemon.
    let pod2 = node.pod("plainpod");
    let add = node.cnitool(
        "add",
        "k8s",
        &pod2,
        "cid-nok8s",
        Some("IgnoreUnknown=1;FOO=bar"),
    );
    assert!(add.success(), "non-k8s ADD with the daemon down: {add}");
    assert_eq!(
        add.json().expect("result"),
        node.ptp_output("ADD", "cid-nok8s")
    );
    let del = node.cnitool("del", "k8s", &pod2, "cid-nok8s", None);
    assert!(del.success(), "{del}");

    // Directly: the exact error document.
    let prev = node.ptp_output("ADD", "cid-nok8s");
    let stdin = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "ambient-cni", "socket": sock,
        "timeoutMs": 1000, "prevResult": prev})
    .to_string();
    let ns = pod.to_string_lossy();
    let args = k8s_args("pod1", "cid-down");
    let out = run_plugin(
        &ambient_cni_tests::fault::env("ADD", "cid-down", &ns, &args),
        stdin.as_bytes(),
    );
    assert_eq!(out.status, Some(1));
    let j = out.json().expect("json");
    assert_eq!(j["cniVersion"], "1.0.0");
    assert_eq!(j["code"], 11);
    assert_eq!(
        j["msg"],
        format!("ambient-cnid unreachable at {}", sock.display())
    );
    assert!(
        j["details"]
            .as_str()
            .unwrap_or("")
            .contains("No such file or directory"),
        "{j}"
    );
    assert_eq!(j.as_object().map(|o| o.len()), Some(4), "{j}");

    // Hung daemon: code 11 after the 1 s deadline, not later.
    let _hung = ambient_cni_tests::fault::HungSocket::start(&sock).expect("hung socket");
    let out = run_plugin(
        &ambient_cni_tests::fault::env("ADD", "cid-down", &ns, &args),
        stdin.as_bytes(),
    );
    let j = out.json().expect("json");
    assert_eq!(j["code"], 11, "{out}");
    assert_eq!(
        j["msg"],
        format!("ambient-cnid at {} did not answer in time", sock.display())
    );
    // The call gets what is left of timeoutMs counted from exec (reading stdin came first).
    let details = j["details"].as_str().unwrap_or_default();
    let budget: u64 = details
        .strip_prefix("deadline of ")
        .and_then(|d| d.strip_suffix(" ms exceeded"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("details {details:?}"));
    assert!((900..=1000).contains(&budget), "{out}");
    assert!(
        out.elapsed >= Duration::from_millis(900) && out.elapsed < Duration::from_millis(2500),
        "{out}"
    );
    let add = node.cnitool(
        "add",
        "k8s",
        &pod,
        "cid-hung",
        Some(&k8s_args("pod1", "cid-hung")),
    );
    assert_eq!(add.status, Some(1), "{add}");
    assert!(
        add.elapsed < Duration::from_secs(4),
        "ADD must fail within the deadline: {add}"
    );
    assert!(add.stderr.contains("did not answer in time"), "{add}");
    let del = node.cnitool(
        "del",
        "k8s",
        &pod,
        "cid-hung",
        Some(&k8s_args("pod1", "cid-hung")),
    );
    assert!(del.success(), "DEL with a hung daemon: {del}");
    assert!(del.elapsed < Duration::from_secs(4), "{del}");
}

/// A pod without K8S_POD_NAMESPACE/K8S_POD_NAME (plain cnitool, podman) passes through
/// untouched and never reaches the daemon.
#[test]
fn non_k8s_pod_passes_through() {
    if !require_root() {
        return;
    }
    let node = Node::new("nok8s", "1.0.0", 5000);
    let pod = node.pod("pod");
    for args in [None, Some("IgnoreUnknown=1;K8S_POD_NAME=only-name")] {
        let add = node.cnitool("add", "k8s", &pod, "cid-nok8s", args);
        assert!(add.success(), "{add}\n{}", node.logs());
        assert_eq!(
            add.json().expect("result"),
            node.ptp_output("ADD", "cid-nok8s")
        );
        assert_eq!(node.pods(), (0, 0), "no daemon call for a non-k8s pod");
        let check = node.cnitool("check", "k8s", &pod, "cid-nok8s", args);
        assert!(check.success(), "{check}");
        let del = node.cnitool("del", "k8s", &pod, "cid-nok8s", args);
        assert!(del.success(), "{del}");
    }
    let log = std::fs::read_to_string(node.cni.plugin_log()).unwrap_or_default();
    assert!(
        log.contains("not a Kubernetes pod"),
        "pass-through is logged: {log}"
    );
}

/// Every bad input gets its code and an exact, one-line error document on stdout, exit 1.
#[test]
fn bad_inputs_get_exact_codes() {
    if !require_root() {
        return;
    }
    let net = TestNet::new("badinput");
    let sock = net.dir().join("no-daemon.sock");
    let prev = prev_result_110("vethx", Path::new("/var/run/netns/x"), "10.244.1.9");
    let good = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "ambient-cni", "socket": sock, "prevResult": prev});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c.to_string()
    };
    let without = |k: &str| {
        let mut c = good.clone();
        if let Some(m) = c.as_object_mut() {
            m.remove(k);
        }
        c.to_string()
    };
    let args = k8s_args("p", "c1");
    let base = ambient_cni_tests::fault::env("ADD", "c1", "/var/run/netns/x", &args);
    let env_with = |k: &'static str, v: Option<&'static str>| {
        let mut e: Vec<(&str, &str)> = base.iter().copied().filter(|(key, _)| *key != k).collect();
        if let Some(v) = v {
            e.push((k, v));
        }
        e
    };
    let expect = |name: &str, out: Output, want: Value| {
        assert_eq!(out.status, Some(1), "{name}: {out}");
        assert_eq!(
            out.stdout.matches('\n').count(),
            1,
            "{name}: one line: {out}"
        );
        assert_eq!(out.json().unwrap_or(Value::Null), want, "{name}: {out}");
    };
    let err = |v: &str, code: u32, msg: &str, details: &str| json!({"cniVersion": v, "code": code, "msg": msg, "details": details});
    let supported = SUPPORTED.join(", ");

    expect(
        "garbage stdin",
        run_plugin(&base, b"{\"cniVersion\": 1.0.0 garbage"),
        err(
            "1.0.0",
            6,
            "failed to decode network config",
            "expected `,` or `}` at line 1 column 19",
        ),
    );
    expect(
        "empty stdin",
        run_plugin(&base, b""),
        err(
            "1.0.0",
            6,
            "failed to decode network config",
            "stdin is empty",
        ),
    );
    expect(
        "not an object",
        run_plugin(&base, b"[1,2,3]"),
        err(
            "1.0.0",
            6,
            "failed to decode network config",
            "expected a JSON object, got [1,2,3]",
        ),
    );
    let mut huge = good.clone();
    huge["padding"] = json!("x".repeat(2 << 20));
    expect(
        "huge input",
        run_plugin(&base, huge.to_string().as_bytes()),
        err(
            "1.0.0",
            6,
            "network config too large",
            "stdin holds more than 1048576 bytes",
        ),
    );
    expect(
        "missing CNI_CONTAINERID",
        run_plugin(
            &env_with("CNI_CONTAINERID", None),
            good.to_string().as_bytes(),
        ),
        err(
            "1.0.0",
            4,
            "invalid environment variable CNI_CONTAINERID",
            "CNI_CONTAINERID is not set",
        ),
    );
    expect(
        "missing CNI_NETNS",
        run_plugin(&env_with("CNI_NETNS", None), good.to_string().as_bytes()),
        err(
            "1.0.0",
            4,
            "invalid environment variable CNI_NETNS",
            "CNI_NETNS is not set",
        ),
    );
    expect(
        "missing CNI_IFNAME",
        run_plugin(&env_with("CNI_IFNAME", None), good.to_string().as_bytes()),
        err(
            "1.0.0",
            4,
            "invalid environment variable CNI_IFNAME",
            "CNI_IFNAME is not set",
        ),
    );
    expect(
        "bad container id",
        run_plugin(
            &env_with("CNI_CONTAINERID", Some("-bad/id")),
            good.to_string().as_bytes(),
        ),
        err(
            "1.0.0",
            4,
            "invalid environment variable CNI_CONTAINERID",
            "CNI_CONTAINERID \"-bad/id\" is invalid: must match [A-Za-z0-9][A-Za-z0-9_.-]*",
        ),
    );
    expect(
        "bad ifname",
        run_plugin(
            &env_with("CNI_IFNAME", Some("eth0:1")),
            good.to_string().as_bytes(),
        ),
        err(
            "1.0.0",
            4,
            "invalid environment variable CNI_IFNAME",
            "CNI_IFNAME \"eth0:1\" is invalid: contains '/', ':' or whitespace",
        ),
    );
    expect(
        "ifname too long",
        run_plugin(
            &env_with("CNI_IFNAME", Some("a-very-long-ifname")),
            good.to_string().as_bytes(),
        ),
        err(
            "1.0.0",
            4,
            "invalid environment variable CNI_IFNAME",
            "CNI_IFNAME \"a-very-long-ifname\" is invalid: is longer than 15 bytes",
        ),
    );
    expect(
        "unknown command",
        run_plugin(
            &env_with("CNI_COMMAND", Some("FROB")),
            good.to_string().as_bytes(),
        ),
        err(
            "1.0.0",
            4,
            "invalid environment variable CNI_COMMAND",
            "CNI_COMMAND \"FROB\" is not a CNI command (ADD, DEL, CHECK, VERSION, GC, STATUS)",
        ),
    );
    expect(
        "wrong type timeoutMs",
        run_plugin(&base, with("timeoutMs", json!("5000")).as_bytes()),
        err(
            "1.0.0",
            7,
            "invalid network config: \"timeoutMs\" must be a number",
            "\"timeoutMs\" is a string: \"5000\"",
        ),
    );
    expect(
        "wrong type socket",
        run_plugin(&base, with("socket", json!(42)).as_bytes()),
        err(
            "1.0.0",
            7,
            "invalid network config: \"socket\" must be a string",
            "\"socket\" is a number: 42",
        ),
    );
    expect(
        "wrong type prevResult",
        run_plugin(&base, with("prevResult", json!([])).as_bytes()),
        err(
            "1.0.0",
            7,
            "invalid network config: \"prevResult\" must be an object",
            "\"prevResult\" is an array: []",
        ),
    );
    expect(
        "missing prevResult",
        run_plugin(&base, without("prevResult").as_bytes()),
        err(
            "1.0.0",
            7,
            "invalid network config: missing prevResult",
            "ambient-cni is a chained plugin and must come after the plugin that creates the pod's interface and addresses (e.g. ptp or bridge) in the conflist",
        ),
    );
    expect(
        "unsupported value",
        run_plugin(&base, with("logLevel", json!("loud")).as_bytes()),
        err(
            "1.0.0",
            2,
            "unsupported field logLevel=\"loud\"",
            "logLevel must be one of error, warn, info, debug, trace",
        ),
    );
    for v in ["0.1.0", "0.2.0", "9.9.9"] {
        expect(
            &format!("version {v}"),
            run_plugin(&base, with("cniVersion", json!(v)).as_bytes()),
            err(
                v,
                1,
                "incompatible CNI versions",
                &format!("config is \"{v}\", plugin supports {supported}"),
            ),
        );
        // DEL of such a config still cleans up and succeeds.
        let del = run_plugin(
            &env_with("CNI_COMMAND", Some("DEL")),
            with("cniVersion", json!(v)).as_bytes(),
        );
        assert!(del.success() && del.stdout.is_empty(), "DEL {v}: {del}");
    }
    expect(
        "no version",
        run_plugin(&base, without("cniVersion").as_bytes()),
        err(
            "1.0.0",
            1,
            "incompatible CNI versions",
            &format!("the config has no cniVersion; supported: {supported}"),
        ),
    );
    expect(
        "CHECK at 0.3.1",
        run_plugin(
            &env_with("CNI_COMMAND", Some("CHECK")),
            with("cniVersion", json!("0.3.1")).as_bytes(),
        ),
        err(
            "0.3.1",
            1,
            "incompatible CNI versions",
            "config version \"0.3.1\" does not allow CHECK (needs 0.4.0 or later)",
        ),
    );
    expect(
        "GC at 1.0.0",
        run_plugin(&[("CNI_COMMAND", "GC")], good.to_string().as_bytes()),
        err(
            "1.0.0",
            1,
            "incompatible CNI versions",
            "config version \"1.0.0\" does not allow GC (needs 1.1.0 or later)",
        ),
    );
    expect(
        "malformed prevResult IP",
        run_plugin(
            &base,
            with("prevResult", json!({"ips": [{"address": "10.0.0.1"}]})).as_bytes(),
        ),
        err(
            "1.0.0",
            7,
            "invalid prevResult",
            "prevResult.ips[0].address \"10.0.0.1\" is not an address in CIDR form",
        ),
    );

    // DEL with garbage or without env it can work with.
    let del = run_plugin(&env_with("CNI_COMMAND", Some("DEL")), b"garbage");
    assert!(
        del.success() && del.stdout.is_empty(),
        "DEL with garbage stdin still cleans up: {del}"
    );
    expect(
        "DEL without container id",
        run_plugin(
            &[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")],
            good.to_string().as_bytes(),
        ),
        err(
            "1.0.0",
            4,
            "invalid environment variable CNI_CONTAINERID",
            "CNI_CONTAINERID is not set",
        ),
    );

    // No CNI_COMMAND: a person ran it. About text on stderr, nothing on stdout, exit 0.
    let out = run_plugin(&[], b"");
    assert!(out.success(), "{out}");
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr
            .contains("CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
        "{out}"
    );

    // The driver validates CNI_ARGS pairs like upstream cnitool.
    net.add_ns("node").expect("node");
    let cni = CniEnv::new(&net, "node").expect("cni env");
    cni.write_conflist(&ptp_conflist("k8s", "1.0.0", SUBNET, &cni.ipam_dir(), None))
        .expect("conflist");
    let out = cni.cnitool(
        "add",
        "k8s",
        Path::new("/var/run/netns/none"),
        &[("CNI_ARGS", "A=1;B==2")],
    );
    assert_eq!(out.status, Some(1), "{out}");
    assert!(
        out.stderr.contains("invalid CNI_ARGS pair \"B==2\""),
        "{out}"
    );
}

/// ADD latency through libcni with and without our plugin (50 ADD/DEL each, medians). Prints
/// the numbers for the README; asserts nothing. Use release binaries for meaningful figures:
/// `cargo build --release && AMBIENT_CNI_BIN_DIR=target/release cargo test -p ambient-cni-tests
/// --test conformance -- --ignored --nocapture add_latency`.
#[test]
#[ignore]
fn add_latency() {
    if !require_root() {
        return;
    }
    let rounds: usize = std::env::var("ACNI_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50);
    let node = Node::new("latency", "1.0.0", 5000);
    let pod = node.pod("pod");
    // Interleaved rounds, so that drift and other load on the machine hit both chains alike.
    let mut t: [[Vec<Duration>; 2]; 2] = Default::default();
    for i in 0..rounds {
        for (n, network) in ["plain", "k8s"].iter().enumerate() {
            let cid = format!("cid-lat-{network}-{i}");
            let args = k8s_args("lat", &cid);
            let add = node.cnitool("add", network, &pod, &cid, Some(&args));
            assert!(add.success(), "{add}\n{}", node.logs());
            let del = node.cnitool("del", network, &pod, &cid, Some(&args));
            assert!(del.success(), "{del}");
            t[n][0].push(add.elapsed);
            t[n][1].push(del.elapsed);
        }
    }
    let [[plain_add, plain_del], [ours_add, ours_del]] = t.map(|v| v.map(median));
    let mut trivial = Vec::new();
    let mut version = Vec::new();
    for _ in 0..rounds {
        trivial.push(
            run_cmd(
                &mut std::process::Command::new("/bin/true"),
                None,
                COMMAND_TIMEOUT,
            )
            .elapsed,
        );
        version.push(run_plugin(&[("CNI_COMMAND", "VERSION")], b"").elapsed);
    }
    println!("ADD/DEL latency through libcni, median of {rounds}:");
    println!("  ptp                : ADD {plain_add:?}  DEL {plain_del:?}");
    println!("  ptp + ambient-cni  : ADD {ours_add:?}  DEL {ours_del:?}");
    println!(
        "  our share of ADD   : {:?}",
        ours_add.checked_sub(plain_add).unwrap_or_default()
    );
    println!("  exec /bin/true     : {:?}", median(trivial));
    println!("  ambient-cni VERSION: {:?}", median(version));
}
