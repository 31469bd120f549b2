//! Enrollment from the Kubernetes API (feature `kube`).
//!
//! Watches every Namespace (label `istio.io/dataplane-mode=ambient` enrolls its pods) and the Pods
//! of this node (field selector `spec.nodeName=<node>`; pods annotated
//! `ambient.istio.io/redirection: disabled` and host-network pods opt out), reduces both to a few
//! facts, and hands the [`Policy`] computed from them (a pure function, [`policy_from`]) to
//! [`Daemon::set_policy`], the reconciler the CNI path feeds too.
//!
//! Behaviour the daemon relies on:
//! - **Nothing before the first full lists.** `set_policy` is first called once both the namespace
//!   and the pod list are in. Until then the daemon keeps its start-up decisions: the static
//!   `--ambient-namespace` list, and the `enrolled` flag of every pod restored from the state dir.
//!   An empty policy at that point would release every pod enrolled by label and re-enroll it a
//!   moment later: a capture gap on every daemon restart.
//! - **API outage keeps the last policy.** Watch errors are logged and retried with kube-runtime's
//!   default backoff (0.8 s doubling to 30 s, with jitter); a relist replaces a store only once it
//!   is complete, so a reconnect never flaps pods. The CNI path keeps working meanwhile.
//! - **Debounced.** The first change arms a timer ([`WatchConfig::debounce`]); everything that
//!   arrives before it fires goes into one `set_policy`. A policy equal to the last one applied is
//!   not sent again, so pod status updates cost nothing.
//! - **Running pods.** The same pod list (phase, UID, `status.podIPs`) gives the pods that run on
//!   this node; [`Daemon::sync_running`] enrolls those of enrolled namespaces that no CNI ADD told
//!   the daemon about (pods older than the plugin, or started while it was away), and releases
//!   them when they stop being listed or enrolled.
//! - **Kernel errors are not retried here.** `set_policy` records the decision in the registry
//!   even when a kernel write fails, and the daemon's periodic resync repairs the kernel from it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::config::{
    InClusterError, InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError,
};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::daemon::{Daemon, Policy, RunningPod};
use crate::dataplane::Dataplane;
use crate::reconcile::ApplyReport;

/// Namespace label that enrolls the namespace's pods.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] that means ambient (anything else does not).
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Pod annotation that opts a pod out.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The value of [`REDIRECTION_ANNOTATION`] that opts out (anything else does not).
pub const REDIRECTION_DISABLED: &str = "disabled";
/// Default debounce window between the first change and the `set_policy` call.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);
/// Pause before restarting the watches if their streams ever end (kube's watchers do not).
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// What the watcher needs: the node, where the credentials are, and the debounce window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// This node's name (`spec.nodeName` of its pods; `NODE_NAME` from the downward API).
    pub node_name: String,
    /// A kubeconfig file. `None`: the in-cluster service account when running in a pod
    /// (`KUBERNETES_SERVICE_HOST` set), else `KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Window between the first change and the `set_policy` call it leads to.
    pub debounce: Duration,
}

impl WatchConfig {
    /// A config for `node_name` with the in-cluster credentials and the default debounce.
    pub fn new(node_name: impl Into<String>) -> Self {
        WatchConfig {
            node_name: node_name.into(),
            kubeconfig: None,
            debounce: DEFAULT_DEBOUNCE,
        }
    }

    /// The node name must be set and be a DNS subdomain: an empty one would select every
    /// unscheduled pod of the cluster, and `,` or `=` would change the field selector.
    pub fn validate(&self) -> Result<(), Error> {
        let n = &self.node_name;
        if n.is_empty() {
            return Err(Error::NoNodeName);
        }
        let ok = n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(Error::InvalidNodeName(n.clone()));
        }
        Ok(())
    }

    /// The field selector of the pod watch.
    fn pod_selector(&self) -> String {
        format!("spec.nodeName={}", self.node_name)
    }
}

/// Errors of the watcher's set-up; once running it only logs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No node name given.
    #[error("no node name: set --node-name or NODE_NAME (the downward API's spec.nodeName)")]
    NoNodeName,
    /// The node name is not a DNS subdomain.
    #[error("invalid node name {0:?}: not a DNS subdomain")]
    InvalidNodeName(String),
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: KubeconfigError,
    },
    /// In a pod, but the service account credentials are missing.
    #[error("in-cluster config (service account token and CA): {0}")]
    InCluster(#[source] InClusterError),
    /// Neither a kubeconfig nor an in-cluster environment.
    #[error("no kubeconfig and not running in a cluster: {0}")]
    Infer(#[source] InferConfigError),
    /// The client could not be built from the config (TLS set-up).
    #[error("building the API client: {0}")]
    Client(#[source] kube::Error),
}

/// A client for `cfg`: the kubeconfig file when given; else the in-cluster service account when
/// running in a pod; else `KUBECONFIG` or `~/.kube/config` (a developer's machine).
pub async fn client(cfg: &WatchConfig) -> Result<Client, Error> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let err = |source| Error::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            kube::Config::incluster().map_err(Error::InCluster)?
        }
        None => kube::Config::infer().await.map_err(Error::Infer)?,
    };
    Client::try_from(config).map_err(Error::Client)
}

/// What enrollment needs from a Namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFacts {
    /// Labelled `istio.io/dataplane-mode=ambient`.
    pub ambient: bool,
}

impl NamespaceFacts {
    /// The namespace's name and facts; `None` for an object without a name.
    pub fn of(ns: &Namespace) -> Option<(String, Self)> {
        let name = ns.metadata.name.clone()?;
        let ambient = ns
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
            .is_some_and(|v| v == DATAPLANE_MODE_AMBIENT);
        Some((name, NamespaceFacts { ambient }))
    }
}

/// What enrollment needs from a Pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// `spec.hostNetwork`: it shares the node's netns, nothing to redirect.
    pub host_network: bool,
    /// Annotated `ambient.istio.io/redirection: disabled`.
    pub redirection_disabled: bool,
    /// `status.phase` is `Running`.
    pub running: bool,
    /// `metadata.uid`.
    pub uid: String,
    /// `status.podIPs` (else `status.podIP`), both families; unparsable entries are skipped.
    pub ips: Vec<IpAddr>,
}

impl PodFacts {
    /// The pod's (namespace, name) and facts; `None` for an object without either.
    pub fn of(pod: &Pod) -> Option<((String, String), Self)> {
        let key = (pod.metadata.namespace.clone()?, pod.metadata.name.clone()?);
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let redirection_disabled = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REDIRECTION_ANNOTATION))
            .is_some_and(|v| v == REDIRECTION_DISABLED);
        let status = pod.status.as_ref();
        let running = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Running");
        let mut listed: Vec<&str> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().map(|p| p.ip.as_str()).collect())
            .unwrap_or_default();
        if listed.is_empty() {
            listed.extend(status.and_then(|s| s.pod_ip.as_deref()));
        }
        let mut ips = Vec::new();
        for ip in listed {
            match ip.parse::<IpAddr>() {
                Ok(a) if !ips.contains(&a) => ips.push(a),
                Ok(_) => {}
                Err(_) => {
                    debug!(pod = %format!("{}/{}", key.0, key.1), ip, "enrollment: unparsable pod IP skipped")
                }
            }
        }
        Some((
            key,
            PodFacts {
                host_network,
                redirection_disabled,
                running,
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                ips,
            },
        ))
    }

    /// Never enrolled, whatever its namespace.
    pub fn excluded(&self) -> bool {
        self.host_network || self.redirection_disabled
    }
}

/// Namespaces by name.
pub type Namespaces = BTreeMap<String, NamespaceFacts>;
/// This node's pods by (namespace, name).
pub type Pods = BTreeMap<(String, String), PodFacts>;

/// The policy the API state asks for. Pure.
///
/// Opted-out pods are listed whatever their namespace, so the annotation also works in the
/// namespaces of the static `--ambient-namespace` list.
pub fn policy_from(namespaces: &Namespaces, pods: &Pods) -> Policy {
    Policy {
        namespaces: namespaces
            .iter()
            .filter(|(_, f)| f.ambient)
            .map(|(n, _)| n.clone())
            .collect(),
        excluded_pods: pods
            .iter()
            .filter(|(_, f)| f.excluded())
            .map(|(k, _)| k.clone())
            .collect(),
    }
}

/// This node's running pods as the daemon takes them (sorted by namespace and name). Pure.
pub fn running_from(pods: &Pods) -> Vec<RunningPod> {
    pods.iter()
        .filter(|(_, f)| f.running)
        .map(|((namespace, name), f)| RunningPod {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: f.uid.clone(),
            ips: f.ips.clone(),
            host_network: f.host_network,
        })
        .collect()
}

/// What the API state asks of the daemon: the policy, and the running pods to enroll from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Labelled namespaces and opted-out pods.
    pub policy: Policy,
    /// This node's running pods.
    pub running: Vec<RunningPod>,
}

/// Hand `view` to the daemon: the policy first (re-decides every known pod), then the running
/// pods (enrolls the ones no CNI ADD told it about, with that policy).
pub async fn apply_view<D: Dataplane>(daemon: &Daemon<D>, view: View) -> ApplyReport {
    let mut report = daemon.set_policy(view.policy).await;
    let running = daemon.sync_running(&view.running).await;
    report.applied.extend(running.kernel.applied);
    report.errors.extend(running.kernel.errors);
    report
}

/// One watched kind reduced to facts, following kube-runtime's watcher events. A relist
/// (`Init`, `InitApply`…, `InitDone`) is buffered and replaces the live map only when complete,
/// so a reconnect never shows a partial state.
#[derive(Debug)]
struct Cache<K, V> {
    live: BTreeMap<K, V>,
    relist: Option<BTreeMap<K, V>>,
    synced: bool,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache {
            live: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<K: Ord, V: PartialEq> Cache<K, V> {
    /// Apply one event; true when the live map changed (or the first list completed).
    fn apply<T>(&mut self, ev: Event<T>, facts: impl Fn(&T) -> Option<(K, V)>) -> bool {
        match ev {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                if let Some((k, v)) = facts(&o) {
                    self.relist.get_or_insert_with(BTreeMap::new).insert(k, v);
                }
                false
            }
            Event::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                let changed = !self.synced || fresh != self.live;
                self.synced = true;
                self.live = fresh;
                changed
            }
            Event::Apply(o) => match facts(&o) {
                Some((k, v)) => {
                    let same = self.live.get(&k) == Some(&v);
                    self.live.insert(k, v);
                    !same
                }
                None => false,
            },
            Event::Delete(o) => match facts(&o) {
                Some((k, _)) => self.live.remove(&k).is_some(),
                None => false,
            },
        }
    }
}

/// The watcher's state: both stores and the last policy handed to the daemon.
#[derive(Debug, Default)]
struct Watch {
    namespaces: Cache<String, NamespaceFacts>,
    pods: Cache<(String, String), PodFacts>,
    applied: Option<View>,
}

impl Watch {
    fn synced(&self) -> bool {
        self.namespaces.synced && self.pods.synced
    }

    /// Hand the current view to `apply` if both lists are in and it changed.
    async fn flush<F, Fut>(&mut self, apply: &mut F)
    where
        F: FnMut(View) -> Fut,
        Fut: Future<Output = ApplyReport>,
    {
        if !self.synced() {
            debug!(
                namespaces = self.namespaces.synced,
                pods = self.pods.synced,
                "enrollment: waiting for the initial lists before changing the policy"
            );
            return;
        }
        let view = View {
            policy: policy_from(&self.namespaces.live, &self.pods.live),
            running: running_from(&self.pods.live),
        };
        if self.applied.as_ref() == Some(&view) {
            return;
        }
        let first = self.applied.is_none();
        self.log_changes(&view.policy);
        if first {
            info!(
                namespaces = view.policy.namespaces.len(),
                excluded_pods = view.policy.excluded_pods.len(),
                running_pods = view.running.len(),
                "enrollment: in sync with the API server"
            );
        }
        let report = apply(view.clone()).await;
        if !report.ok() {
            warn!(
                errors = %report.errors.join("; "),
                "enrollment: applying the policy failed in part; the periodic resync repairs the kernel"
            );
        }
        self.applied = Some(view);
    }

    fn log_changes(&self, new: &Policy) {
        let empty = Policy::default();
        let old = self.applied.as_ref().map_or(&empty, |v| &v.policy);
        for ns in new.namespaces.difference(&old.namespaces) {
            info!(namespace = %ns, "enrollment: namespace joins ambient ({DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT})");
        }
        for ns in old.namespaces.difference(&new.namespaces) {
            info!(namespace = %ns, "enrollment: namespace leaves ambient (label removed or namespace deleted)");
        }
        for key in new.excluded_pods.difference(&old.excluded_pods) {
            let pod = format!("{}/{}", key.0, key.1);
            match self.pods.live.get(key) {
                // Host-network pods never reach the CNI path; not worth an info line each.
                Some(f) if f.host_network && !f.redirection_disabled => {
                    debug!(pod = %pod, "enrollment: host-network pod excluded")
                }
                _ => {
                    info!(pod = %pod, "enrollment: pod opted out ({REDIRECTION_ANNOTATION}: {REDIRECTION_DISABLED})")
                }
            }
        }
        for key in old.excluded_pods.difference(&new.excluded_pods) {
            let pod = format!("{}/{}", key.0, key.1);
            if self.pods.live.contains_key(key) {
                info!(pod = %pod, "enrollment: pod no longer opted out");
            } else {
                debug!(pod = %pod, "enrollment: opted-out pod deleted");
            }
        }
    }
}

/// Consume both event streams until one ends, calling `apply` (debounced) with each new policy.
async fn drive<NS, PS, F, Fut>(
    w: &mut Watch,
    mut ns: NS,
    mut pods: PS,
    debounce: Duration,
    apply: &mut F,
) where
    NS: Stream<Item = watcher::Result<Event<Namespace>>> + Unpin,
    PS: Stream<Item = watcher::Result<Event<Pod>>> + Unpin,
    F: FnMut(View) -> Fut,
    Fut: Future<Output = ApplyReport>,
{
    let mut flush_at: Option<Instant> = None;
    loop {
        let changed = tokio::select! {
            ev = ns.next() => match ev {
                Some(Ok(ev)) => w.namespaces.apply(ev, NamespaceFacts::of),
                Some(Err(e)) => {
                    warn!(error = %e, "enrollment: namespace watch failed; keeping the last policy, retrying");
                    false
                }
                None => break,
            },
            ev = pods.next() => match ev {
                Some(Ok(ev)) => w.pods.apply(ev, PodFacts::of),
                Some(Err(e)) => {
                    warn!(error = %e, "enrollment: pod watch failed; keeping the last policy, retrying");
                    false
                }
                None => break,
            },
            () = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                flush_at = None;
                w.flush(apply).await;
                false
            }
        };
        if changed && flush_at.is_none() {
            flush_at = Some(Instant::now() + debounce);
        }
    }
    w.flush(apply).await;
}

/// Watch the API and call `apply` with each new view; returns only on a config error.
async fn watch_with<F, Fut>(
    client: Client,
    cfg: WatchConfig,
    mut apply: F,
) -> Result<Infallible, Error>
where
    F: FnMut(View) -> Fut,
    Fut: Future<Output = ApplyReport>,
{
    cfg.validate()?;
    info!(node = %cfg.node_name, debounce_ms = cfg.debounce.as_millis() as u64, "enrollment: watching namespaces and this node's pods");
    let mut w = Watch::default();
    loop {
        let ns = watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        let pods = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&cfg.pod_selector()),
        )
        .default_backoff();
        drive(&mut w, pin!(ns), pin!(pods), cfg.debounce, &mut apply).await;
        // kube's watchers retry forever and never end; should one ever, start over. The stores
        // stay, and the restarted watches relist before anything changes.
        warn!("enrollment: a watch stream ended; restarting the watches");
        tokio::time::sleep(RESTART_PAUSE).await;
    }
}

/// Keep `daemon`'s enrollment policy in step with the API server: namespaces labelled
/// `istio.io/dataplane-mode=ambient`, this node's pods that opt out, and this node's running pods
/// (enrolled even without a CNI ADD). Runs until the task is
/// dropped; returns only when `cfg` is invalid. Never calls `set_policy` before the first full
/// list of both namespaces and pods (see the module docs).
pub async fn run<D: Dataplane>(
    daemon: Arc<Daemon<D>>,
    client: Client,
    cfg: WatchConfig,
) -> Result<Infallible, Error> {
    watch_with(client, cfg, move |view| {
        let d = daemon.clone();
        async move { apply_view(&d, view).await }
    })
    .await
}

#[cfg(test)]
#[path = "k8s_fake_api.rs"]
mod fake_api;
#[cfg(test)]
#[path = "k8s_running_tests.rs"]
mod running_tests;
#[cfg(test)]
#[path = "k8s_tests.rs"]
mod tests;
