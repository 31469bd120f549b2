//! Pods that already run when ambient-cni arrives (made by libcni with ptp + host-local only, no
//! ambient-cni in their chain, so the daemon never saw their ADD) are enrolled afterwards, with
//! real TCP captured (egress at 15001, inbound at 15006): by `ambient-cnid enroll`, and from the
//! Kubernetes API (`--kube` against the fake API server of the daemon's watcher tests, served
//! over TCP in the node's netns) for a dual-stack pod, both families. A release (or the label's
//! removal, or the pod's deletion from the API) sends them direct again; and the uninstall
//! sequence (`ambient-cnid uninstall` + `ambient-cnid cleanup` in the node's netns, what the
//! uninstall DaemonSet runs) leaves them talking directly instead of held closed.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambient_cni_daemon::fake_api::{self, FakeApi};
use ambient_cni_daemon::k8s::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL};
use ambient_cni_tests::world::{hostport, Family, Pod, World, AMBIENT_NS, REMOTE_IP, REMOTE_IP6};
use ambient_cni_tests::{require_root, run_cmd, workspace_bin, Output};
use anyhow::{anyhow, Context, Result};

/// The network of the pods made before the plugin: the node's primary CNI alone.
const PLAIN: &str = "plain";

fn assert_has(answer: &str, want: &str, what: &str) {
    assert!(
        answer.contains(want),
        "{what}: expected {want:?} in {answer:?}"
    );
}

fn cnid(w: &World, args: &[&str]) -> Result<Output> {
    let d = w.daemon()?;
    let mut c = Command::new(workspace_bin("ambient-cnid")?);
    c.args(args).arg("--socket").arg(d.socket());
    Ok(run_cmd(&mut c, None, Duration::from_secs(30)))
}

/// A world whose conf dir also holds `plain`: ptp + host-local in the node's pod CIDR (upper
/// range, so its IPs never meet the other network's), without ambient-cni.
fn world(tag: &str) -> Result<World> {
    let w = World::new(tag, &[])?;
    w.add_plain_network(PLAIN)?;
    Ok(w)
}

#[test]
fn running_pods_without_the_plugin_are_enrolled_by_hand_released_and_direct_after_uninstall(
) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut w = world("enroll")?;
    let _zt = w.ztunnel("zt", "a")?;
    let app = w.pod_in(PLAIN, "app", AMBIENT_NS, "app")?;
    let other = w.pod_in(PLAIN, "other", AMBIENT_NS, "other")?;
    let remote = format!("{REMOTE_IP}:8080");
    let to_app = format!("{}:8080", app.ip);

    // Made without our plugin: the daemon never heard of them, their traffic is direct.
    assert_has(
        &w.answer("app", &remote, None)?,
        &format!("remote peer={}:", app.ip),
        "before",
    );
    assert_has(
        &w.answer("remote", &to_app, None)?,
        &format!("app peer={REMOTE_IP}:"),
        "inbound before",
    );

    // Enrolled by hand: captured both ways, with the pod UID as the ipset entry's owner.
    let out = cnid(
        &w,
        &[
            "enroll",
            "--namespace",
            AMBIENT_NS,
            "--pod",
            "app",
            "--uid",
            "uid-app",
            "--ip",
            &app.ip,
        ],
    )?;
    assert!(out.success(), "enroll: {out}");
    println!("enroll: {}", out.stdout.trim());
    assert_has(
        &w.answer("app", &remote, None)?,
        &format!("ztunnel port=15001 orig_dst={remote} peer={}:", app.ip),
        "egress after enroll",
    );
    assert_has(
        &w.answer("remote", &to_app, None)?,
        &format!("ztunnel port=15006 orig_dst={to_app} peer={REMOTE_IP}:"),
        "inbound after enroll",
    );
    assert_has(
        &w.answer("other", &remote, None)?,
        &format!("remote peer={}:", other.ip),
        "the other pod stays direct",
    );
    let set = w
        .net
        .exec_ok("node", &["ipset", "list", "ztunnel-pods-ips"])?;
    assert_has(
        &set,
        &format!("{} comment \"uid-app\"", app.ip),
        "ipset owner",
    );
    // The host interface is the one of ptp's main-table route to the pod.
    let hif = w.net.exec_ok(
        "node",
        &[
            "ip",
            "-o",
            "route",
            "show",
            "table",
            "main",
            "exact",
            &format!("{}/32", app.ip),
        ],
    )?;
    let dev = hif
        .split_whitespace()
        .skip_while(|t| *t != "dev")
        .nth(1)
        .context("dev of the pod route")?
        .to_string();
    let rp = w.net.exec_ok(
        "node",
        &["sysctl", "-n", &format!("net.ipv4.conf.{dev}.rp_filter")],
    )?;
    assert_eq!(
        rp.trim(),
        "2",
        "rp_filter on the pod's host interface {dev}"
    );

    // Refusals say why, and change nothing.
    let out = cnid(
        &w,
        &[
            "enroll",
            "--namespace",
            AMBIENT_NS,
            "--pod",
            "ghost",
            "--uid",
            "uid-ghost",
            "--ip",
            "10.244.9.9",
        ],
    )?;
    assert!(!out.success(), "a pod without a route: {out}");
    assert_has(&out.stderr, "host interface not found", "no route");
    let out = cnid(
        &w,
        &[
            "enroll",
            "--namespace",
            "legacy",
            "--pod",
            "other",
            "--uid",
            "uid-other",
            "--ip",
            &other.ip,
        ],
    )?;
    assert!(!out.success(), "a namespace that is not ambient: {out}");
    assert_has(&out.stderr, "not ambient", "namespace");

    // Released: direct again.
    let out = cnid(&w, &["enroll", "--release", "--uid", "uid-app"])?;
    assert!(out.success(), "release: {out}");
    assert_has(
        &w.answer("app", &remote, None)?,
        &format!("remote peer={}:", app.ip),
        "released",
    );
    assert_has(
        &w.answer("remote", &to_app, None)?,
        &format!("app peer={REMOTE_IP}:"),
        "inbound released",
    );

    // Enrolled again, survives a daemon restart (state dir), then the uninstall sequence.
    let out = cnid(
        &w,
        &[
            "enroll",
            "--namespace",
            AMBIENT_NS,
            "--pod",
            "app",
            "--uid",
            "uid-app",
            "--ip",
            &app.ip,
        ],
    )?;
    assert!(out.success(), "enroll again: {out}");
    if let Some(mut d) = w.daemon.take() {
        d.stop();
    }
    w.start_daemon()?;
    assert_has(
        &w.answer("app", &remote, None)?,
        "ztunnel port=15001",
        "still captured after a restart",
    );
    let st = w.daemon()?.status_json()?;
    println!("status after restart: {st}");

    // Uninstall: the daemon's DaemonSet is deleted (the daemon stops, leaving the kernel as it
    // is), then the uninstall DaemonSet runs `uninstall` and `cleanup` in the node's netns.
    w.uninstall()?;
    assert_has(
        &w.answer("app", &remote, None)?,
        &format!("remote peer={}:", app.ip),
        "direct after uninstall",
    );
    assert_has(
        &w.answer("remote", &to_app, None)?,
        &format!("app peer={REMOTE_IP}:"),
        "inbound direct after uninstall",
    );
    let state = w.node_state("node")?;
    assert!(
        !state.contains("ztunnel"),
        "objects left after uninstall:\n{state}"
    );
    Ok(())
}

/// The fake API server, served over TCP on the node netns's loopback (a thread that entered the
/// node netns binds it and serves it there), and a kubeconfig for it.
struct ApiServer {
    api: FakeApi,
    kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    fn start(w: &World) -> Result<ApiServer> {
        let api = FakeApi::default();
        let ns = std::fs::File::open(w.net.ns_path("node")).context("node netns")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = api.clone();
        let thread = std::thread::spawn(move || {
            let bound = (|| -> Result<_> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let l = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
                Ok((rt, l))
            })();
            match bound {
                Ok((rt, l)) => {
                    let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
                    rt.block_on(async {
                        tokio::select! {
                            r = served.serve_tcp(l) => eprintln!("fake API server stopped: {r:?}"),
                            _ = stopped => {}
                        }
                    });
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
            }
        });
        let addr = rx
            .recv()
            .context("fake API thread")?
            .map_err(|e| anyhow!("fake API server: {e}"))?;
        let kubeconfig = w.net.dir().join("kubeconfig");
        std::fs::write(&kubeconfig, fake_api::kubeconfig(addr))?;
        Ok(ApiServer {
            api,
            kubeconfig,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Namespace `ns`, labelled ambient or not.
    fn namespace(&self, ns: &str, ambient: bool) {
        let label = [(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT)];
        self.api.put_ns(ns, if ambient { &label[..] } else { &[] });
    }

    /// `pod` as the API lists it: Running on `node-1`, UID `uid-<name>`, its addresses in
    /// `status.podIPs`.
    fn running(&self, pod: &Pod) {
        let ips: Vec<String> = pod.ips().iter().map(|a| a.to_string()).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        self.api.put_pod_json(
            &pod.k8s_ns,
            &pod.name,
            fake_api::running_pod_json(&pod.k8s_ns, &pod.name, NODE, false, &[], &ips),
        );
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const NODE: &str = "node-1";

/// `ip:` or `[ip]:`, how the probe's answers name a peer.
fn at(ip: &str) -> String {
    let hp = hostport(ip, 0);
    hp.strip_suffix('0').unwrap_or(&hp).to_string()
}

/// The pod's TCP in every family, both ways: each answer says whether it went through ztunnel
/// (15001 out, 15006 in) or directly.
fn paths(w: &World, pod: &Pod) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for ip in pod.ips() {
        let (ip, remote) = (
            ip.to_string(),
            if ip.is_ipv4() { REMOTE_IP } else { REMOTE_IP6 },
        );
        let egress = hostport(remote, 8080);
        let a = w.answer(&pod.netns, &egress, None)?;
        let captured = format!("ztunnel port=15001 orig_dst={egress} peer={}", at(&ip));
        let direct = format!("remote peer={}", at(&ip));
        out.push((
            format!("{} -> {egress}: {a}", pod.name),
            if a.contains(&captured) {
                true
            } else if a.contains(&direct) {
                false
            } else {
                anyhow::bail!("unexpected answer to {egress}: {a}")
            },
        ));
        let inbound = hostport(&ip, 8080);
        let a = w.answer("remote", &inbound, None)?;
        out.push((
            format!("remote -> {inbound}: {a}"),
            a.contains(&format!("ztunnel port=15006 orig_dst={inbound}")),
        ));
    }
    Ok(out)
}

/// Waits until every path of `pod` is captured (`true`) or direct (`false`); prints how long.
fn until_all(w: &World, pod: &Pod, captured: bool, what: &str) -> Result<()> {
    let t0 = Instant::now();
    let mut last = Vec::new();
    let r = World::eventually(Duration::from_secs(30), || {
        last = paths(w, pod).unwrap_or_default();
        Ok(!last.is_empty() && last.iter().all(|(_, c)| *c == captured))
    });
    println!("{what}: after {:?}", t0.elapsed());
    r.with_context(|| format!("{what}: {last:#?}"))
}

/// The ipset entries (both families) whose owner is `uid`.
fn entries_of(w: &World, uid: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for set in ["ztunnel-pods-ips", "ztunnel-pods-ips6"] {
        let l = w.net.exec("node", &["ipset", "list", set]);
        out.extend(
            l.stdout
                .lines()
                .filter(|l| l.contains(&format!("comment \"{uid}\"")))
                .map(str::to_string),
        );
    }
    Ok(out)
}

#[test]
fn running_dual_stack_pods_are_enrolled_from_the_api_released_and_direct_after_uninstall(
) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut w = World::with_family("enrapi", Family::Dual, &[])?;
    w.add_plain_network(PLAIN)?;
    let _zt = w.ztunnel("zt", "a")?;
    // Made by the primary CNI alone, in a namespace that is not ambient yet.
    let app = w.pod_in(PLAIN, "app", "shop", "app")?;
    let (ip4, ip6) = (app.need_ip4()?, app.need_ip6()?);
    println!("app: {ip4} {ip6}");
    let api = ApiServer::start(&w)?;
    api.namespace("shop", false);
    api.namespace(AMBIENT_NS, true);
    api.running(&app);
    let kubeconfig = api
        .kubeconfig
        .to_str()
        .context("kubeconfig path")?
        .to_string();
    w.restart_daemon_with(&["--kube", "--kubeconfig", &kubeconfig, "--node-name", NODE])?;
    until_all(&w, &app, false, "direct before the label")?;

    // The label enrolls the running pod in both families, owner = its UID.
    api.namespace("shop", true);
    until_all(&w, &app, true, "captured after the label")?;
    let entries = entries_of(&w, "uid-app")?;
    assert!(
        entries.iter().any(|e| e.starts_with(&ip4)) && entries.iter().any(|e| e.starts_with(&ip6)),
        "both families in the sets: {entries:?}"
    );
    let st = w.daemon()?.status_json()?;
    println!("status: {st}");

    // The label's removal releases it.
    api.namespace("shop", false);
    until_all(&w, &app, false, "direct after the label's removal")?;
    assert!(entries_of(&w, "uid-app")?.is_empty());

    // Deleted from the API (while its namespace is ambient): its entries go.
    api.namespace("shop", true);
    until_all(&w, &app, true, "captured again")?;
    api.api.del_pod("shop", "app");
    until_all(
        &w,
        &app,
        false,
        "direct after the pod's deletion from the API",
    )?;
    assert!(entries_of(&w, "uid-app")?.is_empty(), "entries left");

    // Listed again, then uninstalled with connections going on in both families.
    api.running(&app);
    until_all(&w, &app, true, "captured once listed again")?;
    // The daemon's DaemonSet is deleted (its kernel state stays), then the uninstall DaemonSet
    // runs while the pod keeps connecting.
    if let Some(mut d) = w.daemon.take() {
        d.stop();
    }
    let (stop, ok, failed) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    std::thread::scope(|s| -> Result<()> {
        let traffic = s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                match paths(&w, &app) {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let r = w.uninstall_commands();
        stop.store(true, Ordering::SeqCst);
        let _ = traffic.join();
        r
    })?;
    println!(
        "during uninstall: {} rounds answered, {} with a failed connection",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    until_all(&w, &app, false, "direct after uninstall")?;
    let state = w.node_state("node")?;
    assert!(
        !state.contains("ztunnel"),
        "objects left after uninstall:\n{state}"
    );
    Ok(())
}
