//! The enrollment watcher without a cluster: the pure policy, the event loop on scripted watcher
//! streams, and the whole watch end to end against a fake API server behind `kube::Client::new`
//! (list, watch, field selector, injected errors), feeding the daemon on the fake dataplane.
//! Everything runs on paused tokio time, so backoff and debounce cost no wall time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;
use crate::config::Config;
use crate::daemon::Policy;
use crate::dataplane::fake::FakeDataplane;
use crate::reconcile::ApplyReport;

use super::fake_api::*;

// ---------------------------------------------------------------------------------------------
// Pure parts.

#[test]
fn policy_enrolls_labelled_namespaces_and_excludes_opted_out_pods() {
    let nss: Namespaces = [
        namespace("shop", &[AMBIENT]),
        namespace("plain", &[]),
        namespace("off", &[(DATAPLANE_MODE_LABEL, "none")]),
        namespace("case", &[(DATAPLANE_MODE_LABEL, "Ambient")]),
        namespace("other-label", &[("dataplane-mode", "ambient")]),
    ]
    .iter()
    .filter_map(NamespaceFacts::of)
    .collect();
    let pods: Pods = [
        pod("shop", "a", false, &[]),
        pod("shop", "b", false, &[DISABLED]),
        pod("shop", "c", false, &[(REDIRECTION_ANNOTATION, "enabled")]),
        pod("kube-system", "kube-proxy", true, &[]),
        // Opted out in a namespace that only the static list may enroll: excluded all the same.
        pod("static", "d", false, &[DISABLED]),
    ]
    .iter()
    .filter_map(PodFacts::of)
    .collect();
    let p = policy_from(&nss, &pods);
    assert_eq!(p.namespaces, names(&["shop"]));
    assert_eq!(
        p.excluded_pods,
        keys(&[
            ("shop", "b"),
            ("kube-system", "kube-proxy"),
            ("static", "d")
        ])
    );
    assert_eq!(policy_from(&nss, &pods), p, "pure");
    assert_eq!(
        policy_from(&Namespaces::new(), &Pods::new()),
        Policy::default()
    );
}

#[test]
fn objects_without_names_are_skipped() {
    let n: Namespace =
        serde_json::from_value(json!({"metadata": {"labels": map(&[AMBIENT])}})).expect("json");
    assert!(NamespaceFacts::of(&n).is_none());
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("json");
    assert!(PodFacts::of(&p).is_none(), "no namespace");
    let p: Pod =
        serde_json::from_value(json!({"metadata": {"name": "x", "namespace": "y"}})).expect("json");
    assert_eq!(
        PodFacts::of(&p),
        Some((("y".into(), "x".into()), PodFacts::default())),
        "no spec: not excluded"
    );
}

#[test]
fn relist_replaces_the_store_only_when_complete() {
    let mut c: Cache<String, NamespaceFacts> = Cache::default();
    let f = NamespaceFacts::of;
    assert!(!c.apply(Event::Init, f));
    assert!(!c.apply(Event::InitApply(namespace("a", &[AMBIENT])), f));
    assert!(
        !c.synced && c.live.is_empty(),
        "nothing live before InitDone"
    );
    assert!(
        c.apply(Event::InitDone, f),
        "the first list counts as a change"
    );
    assert!(c.synced && c.live["a"].ambient);
    // A relist after a watch error: the old state stays live until it completes.
    c.apply(Event::Init, f);
    c.apply(Event::InitApply(namespace("b", &[])), f);
    assert!(c.live.contains_key("a") && !c.live.contains_key("b"));
    assert!(c.apply(Event::InitDone, f));
    assert_eq!(
        c.live.keys().cloned().collect::<Vec<_>>(),
        vec!["b".to_string()],
        "a was deleted meanwhile"
    );
    // The same relist again changes nothing.
    c.apply(Event::Init, f);
    c.apply(Event::InitApply(namespace("b", &[])), f);
    assert!(!c.apply(Event::InitDone, f));
    // Updates that do not touch the facts (other labels, status) change nothing.
    assert!(!c.apply(Event::Apply(namespace("b", &[("team", "x")])), f));
    assert!(c.apply(Event::Apply(namespace("b", &[AMBIENT])), f));
    assert!(c.apply(Event::Delete(namespace("b", &[])), f));
    assert!(
        !c.apply(Event::Delete(namespace("b", &[])), f),
        "deleting twice"
    );
}

#[test]
fn node_name_is_required_and_checked() {
    assert!(matches!(
        WatchConfig::new("").validate(),
        Err(Error::NoNodeName)
    ));
    for bad in ["node,spec.nodeName!=x", "a=b", "Node-1", "-n", "n-", "a b"] {
        assert!(
            matches!(
                WatchConfig::new(bad).validate(),
                Err(Error::InvalidNodeName(_))
            ),
            "{bad}"
        );
    }
    for good in ["node-1", "ip-10-0-0-1.eu-west-1.compute.internal", "k"] {
        assert!(WatchConfig::new(good).validate().is_ok(), "{good}");
    }
    assert_eq!(
        WatchConfig::new("node-1").pod_selector(),
        "spec.nodeName=node-1"
    );
}

// ---------------------------------------------------------------------------------------------
// The event loop on scripted watcher streams, with a recording `set_policy`.

type NsEvents = mpsc::UnboundedSender<watcher::Result<Event<Namespace>>>;
type PodEvents = mpsc::UnboundedSender<watcher::Result<Event<Pod>>>;

struct Loop {
    ns: Option<NsEvents>,
    pods: Option<PodEvents>,
    calls: Arc<Mutex<Vec<Policy>>>,
    task: tokio::task::JoinHandle<Watch>,
}

impl Loop {
    fn start() -> Loop {
        let (ns_tx, ns_rx) = mpsc::unbounded_channel();
        let (pod_tx, pod_rx) = mpsc::unbounded_channel();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let rec = calls.clone();
        let task = tokio::spawn(async move {
            let mut w = Watch::default();
            let mut apply = move |v: View| {
                lock(&rec).push(v.policy);
                async { ApplyReport::default() }
            };
            let (ns, pods) = (
                UnboundedReceiverStream::new(ns_rx),
                UnboundedReceiverStream::new(pod_rx),
            );
            drive(&mut w, ns, pods, DEFAULT_DEBOUNCE, &mut apply).await;
            w
        });
        Loop {
            ns: Some(ns_tx),
            pods: Some(pod_tx),
            calls,
            task,
        }
    }

    fn ns(&self, ev: watcher::Result<Event<Namespace>>) {
        self.ns
            .as_ref()
            .expect("open")
            .send(ev)
            .expect("loop running");
    }

    fn pod(&self, ev: watcher::Result<Event<Pod>>) {
        self.pods
            .as_ref()
            .expect("open")
            .send(ev)
            .expect("loop running");
    }

    fn ns_list(&self, items: Vec<Namespace>) {
        self.ns(Ok(Event::Init));
        for n in items {
            self.ns(Ok(Event::InitApply(n)));
        }
        self.ns(Ok(Event::InitDone));
    }

    fn pod_list(&self, items: Vec<Pod>) {
        self.pod(Ok(Event::Init));
        for p in items {
            self.pod(Ok(Event::InitApply(p)));
        }
        self.pod(Ok(Event::InitDone));
    }

    fn calls(&self) -> Vec<Policy> {
        lock(&self.calls).clone()
    }

    /// Let the loop take everything sent and its debounce timer fire (paused time: instant).
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn no_set_policy_before_both_initial_lists() {
    let l = Loop::start();
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.settle().await;
    assert!(l.calls().is_empty(), "namespaces listed, pods not yet");
    l.ns(Ok(Event::Apply(namespace("bank", &[AMBIENT]))));
    l.pod(Ok(Event::Init));
    l.pod(Ok(Event::InitApply(pod("shop", "b", false, &[DISABLED]))));
    l.settle().await;
    assert!(l.calls().is_empty(), "the pod list is not complete");
    l.pod(Ok(Event::InitDone));
    l.settle().await;
    let calls = l.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].namespaces, names(&["bank", "shop"]));
    assert_eq!(calls[0].excluded_pods, keys(&[("shop", "b")]));
}

#[tokio::test(start_paused = true)]
async fn empty_cluster_still_sends_one_policy_once_listed() {
    let l = Loop::start();
    l.pod_list(vec![]);
    l.ns_list(vec![]);
    l.settle().await;
    assert_eq!(
        l.calls(),
        vec![Policy::default()],
        "in sync: the API says nothing is ambient"
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_events_gives_one_set_policy() {
    let l = Loop::start();
    l.ns_list(vec![]);
    l.pod_list(vec![]);
    l.settle().await;
    assert_eq!(l.calls().len(), 1);
    for i in 0..20 {
        l.ns(Ok(Event::Apply(namespace(&format!("ns{i}"), &[AMBIENT]))));
        l.pod(Ok(Event::Apply(pod(
            &format!("ns{i}"),
            "p",
            false,
            &[DISABLED],
        ))));
    }
    // Changes trickling in within the window join the same call.
    tokio::time::sleep(DEFAULT_DEBOUNCE / 2).await;
    l.ns(Ok(Event::Apply(namespace("late", &[AMBIENT]))));
    l.settle().await;
    let calls = l.calls();
    assert_eq!(calls.len(), 2, "one call for the whole burst");
    assert_eq!(calls[1].namespaces.len(), 21);
    assert_eq!(calls[1].excluded_pods.len(), 20);
}

#[tokio::test(start_paused = true)]
async fn constant_churn_does_not_starve_the_policy() {
    let l = Loop::start();
    l.ns_list(vec![]);
    l.pod_list(vec![]);
    l.settle().await;
    // A change every 50 ms for 2 s: the window opens at the first change and does not slide.
    for i in 0..40 {
        l.ns(Ok(Event::Apply(namespace(&format!("ns{i}"), &[AMBIENT]))));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = l.calls().len();
    assert!(during >= 10, "policies sent while churning: {during}");
    l.settle().await;
    assert_eq!(l.calls().last().map(|p| p.namespaces.len()), Some(40));
}

#[tokio::test(start_paused = true)]
async fn unchanged_policy_is_not_sent_again() {
    let l = Loop::start();
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.pod_list(vec![pod("shop", "a", false, &[])]);
    l.settle().await;
    assert_eq!(l.calls().len(), 1);
    // Status and unrelated label updates; a change reverted within the window.
    l.pod(Ok(Event::Apply(pod(
        "shop",
        "a",
        false,
        &[("kubectl.kubernetes.io/restartedAt", "now")],
    ))));
    l.ns(Ok(Event::Apply(namespace(
        "shop",
        &[AMBIENT, ("team", "web")],
    ))));
    l.ns(Ok(Event::Apply(namespace("shop", &[]))));
    l.ns(Ok(Event::Apply(namespace("shop", &[AMBIENT]))));
    l.settle().await;
    assert_eq!(l.calls().len(), 1);
    // A new running pod is a change of the view (the daemon may have to enroll it), not of
    // the policy: one call, with the same policy.
    l.pod(Ok(Event::Apply(pod("other", "x", false, &[]))));
    l.settle().await;
    let calls = l.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0], calls[1]);
}

#[tokio::test(start_paused = true)]
async fn watch_errors_keep_the_last_policy_and_relists_do_not_flap() {
    let l = Loop::start();
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.pod_list(vec![pod("shop", "b", false, &[DISABLED])]);
    l.settle().await;
    assert_eq!(l.calls().len(), 1);
    // The API goes away: errors on both streams, a relist that breaks half way.
    l.ns(Err(watcher::Error::NoResourceVersion));
    l.pod(Err(watcher::Error::NoResourceVersion));
    l.ns(Ok(Event::Init));
    l.ns(Err(watcher::Error::NoResourceVersion));
    l.settle().await;
    assert_eq!(l.calls().len(), 1, "errors change nothing");
    // It comes back: full relists with the same content change nothing either.
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.pod_list(vec![pod("shop", "b", false, &[DISABLED])]);
    l.settle().await;
    assert_eq!(
        l.calls().len(),
        1,
        "a relist of the same state is not a change"
    );
    // Something changed while we were away: the relist brings it, once.
    l.ns_list(vec![
        namespace("shop", &[AMBIENT]),
        namespace("bank", &[AMBIENT]),
    ]);
    l.pod_list(vec![]);
    l.settle().await;
    let calls = l.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].namespaces, names(&["bank", "shop"]));
    assert!(calls[1].excluded_pods.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_pending_change_is_applied_when_a_stream_ends() {
    let mut l = Loop::start();
    l.ns_list(vec![namespace("shop", &[AMBIENT])]);
    l.pod_list(vec![]);
    // Let the loop take the events, not yet its debounce timer.
    tokio::time::sleep(DEFAULT_DEBOUNCE / 3).await;
    assert!(l.calls().is_empty(), "still debouncing");
    l.ns = None;
    let w = (&mut l.task).await.expect("loop ends without panicking");
    assert_eq!(
        w.applied.map(|v| v.policy.namespaces),
        Some(names(&["shop"]))
    );
    assert_eq!(l.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn labelled_namespace_enrolls_its_pods_and_unlabelling_releases_them() {
    let api = FakeApi::default();
    api.put_ns("shop", &[]);
    api.put_ns("kube-system", &[]);
    let mut n = Node::new(Config::default()).await;
    assert!(
        !n.add("a", "shop", "a", "10.244.1.5", "vetha").await,
        "not ambient yet"
    );
    assert!(!n.add("b", "shop", "b", "10.244.1.6", "vethb").await);
    n.watch(&api);
    n.until("in sync", |n| n.policies().len() == 1).await;
    assert!(n.captured().is_empty());

    api.put_ns("shop", &[AMBIENT]);
    n.until("shop enrolled", |n| {
        n.captured() == set(&["10.244.1.5", "10.244.1.6"])
    })
    .await;
    // A pod added later through the CNI path follows the policy.
    assert!(n.add("c", "shop", "c", "10.244.1.7", "vethc").await);

    api.put_ns("shop", &[(DATAPLANE_MODE_LABEL, "none")]);
    n.until("shop released", |n| n.captured().is_empty()).await;
    api.put_ns("shop", &[AMBIENT]);
    n.until("shop back", |n| n.captured().len() == 3).await;
    api.del_ns("shop");
    n.until("deleted namespace released", |n| n.captured().is_empty())
        .await;
    assert_eq!(
        n.policies().len(),
        5,
        "one set_policy per change: {:?}",
        n.policies()
    );

    // Only this node's pods are watched, by field selector, on the list and on the watch.
    let pod_requests = [
        api.requests("/api/v1/pods", false),
        api.requests("/api/v1/pods", true),
    ]
    .concat();
    assert!(pod_requests.len() >= 2);
    for r in &pod_requests {
        assert!(r.contains("fieldSelector=spec.nodeName=node-1"), "{r}");
    }
    assert!(api
        .requests("/api/v1/namespaces", false)
        .iter()
        .all(|r| !r.contains("fieldSelector")));
}

#[tokio::test(start_paused = true)]
async fn annotated_and_host_network_pods_are_excluded() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_pod("shop", "a", NODE, false, &[]);
    api.put_pod("shop", "b", NODE, false, &[DISABLED]);
    api.put_pod("shop", "h", NODE, true, &[]);
    // Another node's pod never reaches this node's policy.
    api.put_pod("shop", "far", "node-2", false, &[DISABLED]);
    let mut n = Node::new(Config::default()).await;
    n.add("a", "shop", "a", "10.244.1.5", "vetha").await;
    n.add("b", "shop", "b", "10.244.1.6", "vethb").await;
    n.watch(&api);
    n.until("in sync", |n| !n.policies().is_empty()).await;
    let p = n.policies()[0].clone();
    assert_eq!(p.namespaces, names(&["shop"]));
    assert_eq!(p.excluded_pods, keys(&[("shop", "b"), ("shop", "h")]));
    assert_eq!(n.captured(), set(&["10.244.1.5"]), "b opted out");

    // The annotation is read live: removing it enrolls b, setting it again releases it.
    api.put_pod("shop", "b", NODE, false, &[]);
    n.until("b joins", |n| {
        n.captured() == set(&["10.244.1.5", "10.244.1.6"])
    })
    .await;
    api.put_pod("shop", "b", NODE, false, &[DISABLED]);
    n.until("b leaves", |n| n.captured() == set(&["10.244.1.5"]))
        .await;
    // A pod opting out before its CNI ADD is never enrolled.
    api.put_pod("shop", "c", NODE, false, &[DISABLED]);
    n.until("c excluded", |n| {
        n.policies()
            .last()
            .is_some_and(|p| p.excluded_pods.contains(&("shop".into(), "c".into())))
    })
    .await;
    assert!(!n.add("c", "shop", "c", "10.244.1.7", "vethc").await);
    assert_eq!(n.captured(), set(&["10.244.1.5"]));
}

#[tokio::test(start_paused = true)]
async fn list_errors_are_retried_with_backoff() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.fail_next(Kind::Pod, false, 500);
    api.fail_next(Kind::Pod, false, 503);
    let mut n = Node::new(Config::default()).await;
    n.add("a", "shop", "a", "10.244.1.5", "vetha").await;
    let t0 = tokio::time::Instant::now();
    n.watch(&api);
    n.until("enrolled after the retries", |n| {
        n.captured() == set(&["10.244.1.5"])
    })
    .await;
    assert_eq!(
        api.requests("/api/v1/pods", false).len(),
        3,
        "two failed lists, then one that worked"
    );
    assert_eq!(n.policies().len(), 1, "nothing before the good list");
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "backed off: {:?}",
        t0.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn broken_watches_reconnect_without_flapping() {
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    api.put_pod("shop", "b", NODE, false, &[DISABLED]);
    let mut n = Node::new(Config::default()).await;
    n.add("a", "shop", "a", "10.244.1.5", "vetha").await;
    n.add("b", "shop", "b", "10.244.1.6", "vethb").await;
    n.watch(&api);
    n.until("in sync", |n| n.captured() == set(&["10.244.1.5"]))
        .await;
    let writes = n.dp.kernel().writes;
    let watches = api.requests("/api/v1/namespaces", true).len();

    // The connections drop, a change happens while we are away, the next watch fails too.
    api.break_watches();
    api.fail_next(Kind::Namespace, true, 500);
    api.put_ns("bank", &[AMBIENT]);
    n.until("re-watched", |n| {
        n.policies()
            .last()
            .is_some_and(|p| p.namespaces.contains("bank"))
            && api.requests("/api/v1/namespaces", true).len() >= watches + 2
    })
    .await;
    assert_eq!(
        n.policies().len(),
        2,
        "only the real change was sent: {:?}",
        n.policies()
    );
    assert_eq!(n.captured(), set(&["10.244.1.5"]));
    assert_eq!(
        n.dp.kernel().writes,
        writes,
        "no pod was released and re-enrolled on the way"
    );

    // And the watch is live again.
    api.put_pod("shop", "b", NODE, false, &[]);
    n.until("b joins", |n| {
        n.captured() == set(&["10.244.1.5", "10.244.1.6"])
    })
    .await;
}

/// `run` itself, across a daemon restart with the API out at first: the restarted daemon keeps the
/// enrollment it restored from its state dir (a pod enrolled by label, one by the static list)
/// until both lists are in, instead of releasing the labelled pod and enrolling it again.
#[tokio::test(start_paused = true)]
async fn api_outage_after_restart_keeps_the_restored_enrollment() {
    let state = tempfile::tempdir().expect("state dir");
    let mut cfg = Config::default();
    cfg.ambient_namespaces.insert("static".into());
    let n = Node::boot(
        cfg.clone(),
        Arc::new(FakeDataplane::new()),
        Some(state.path()),
    )
    .await;
    let mut before = Policy::default();
    before.namespaces.insert("shop".into());
    n.daemon.set_policy(before).await;
    assert!(n.add("a", "shop", "a", "10.244.1.5", "vetha").await);
    assert!(n.add("s", "static", "s", "10.244.1.6", "vethb").await);
    let dp = n.dp.clone();
    drop(n);

    // The restart: same kernel, registry from the state dir, empty policy.
    let n = Node::boot(cfg, dp, Some(state.path())).await;
    assert_eq!(
        n.captured(),
        set(&["10.244.1.5", "10.244.1.6"]),
        "the restart itself keeps both"
    );
    let writes = n.dp.kernel().writes;
    let api = FakeApi::default();
    api.put_ns("shop", &[AMBIENT]);
    for _ in 0..3 {
        api.fail_next(Kind::Namespace, false, 503);
    }
    let task = tokio::spawn(run(n.daemon.clone(), api.client(), WatchConfig::new(NODE)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !api.requests("/api/v1/pods", false).is_empty(),
        "pods listed"
    );
    assert!(
        api.requests("/api/v1/namespaces", false).len() < 4,
        "namespaces still failing"
    );
    assert_eq!(
        n.captured(),
        set(&["10.244.1.5", "10.244.1.6"]),
        "nothing released while the API is out"
    );
    assert_eq!(n.dp.kernel().writes, writes);
    n.until("namespace list in", |_| {
        api.requests("/api/v1/namespaces", false).len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        n.captured(),
        set(&["10.244.1.5", "10.244.1.6"]),
        "the API agrees: nothing to change"
    );
    assert_eq!(
        n.dp.kernel().writes,
        writes,
        "no release and re-enroll on the way"
    );

    api.put_ns("shop", &[]);
    n.until("shop released", |n| n.captured() == set(&["10.244.1.6"]))
        .await;
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn run_refuses_an_empty_node_name() {
    let n = Node::new(Config::default()).await;
    let r = run(
        n.daemon.clone(),
        FakeApi::default().client(),
        WatchConfig::new(""),
    )
    .await;
    assert!(matches!(r, Err(Error::NoNodeName)));
}

// ---------------------------------------------------------------------------------------------
// Building the client.

#[tokio::test]
async fn client_from_a_kubeconfig_builds_with_the_ring_provider() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
         clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: c, context: {cluster: k, user: u, namespace: shop}}]\n",
    )
    .expect("write kubeconfig");
    let mut cfg = WatchConfig::new(NODE);
    cfg.kubeconfig = Some(path);
    // Building the TLS config panics when rustls has no (or two) process-wide providers.
    let c = client(&cfg).await.expect("client from kubeconfig");
    assert_eq!(c.default_namespace(), "shop");
}

#[tokio::test]
async fn missing_kubeconfig_names_the_file() {
    let mut cfg = WatchConfig::new(NODE);
    cfg.kubeconfig = Some("/nonexistent/acni-kubeconfig".into());
    let Err(e) = client(&cfg).await else {
        panic!("a client from a missing kubeconfig");
    };
    assert!(matches!(e, Error::Kubeconfig { .. }));
    assert!(
        e.to_string().contains("/nonexistent/acni-kubeconfig"),
        "{e}"
    );
}
