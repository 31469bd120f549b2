//! Enrollment of pods that are already running, without a CNI ADD: from the Kubernetes API (the
//! watcher's list of this node's running pods, [`Daemon::sync_running`]) or by hand
//! (`ambient-cnid enroll`, [`Daemon::enroll_running`] / [`Daemon::release_running`]).
//!
//! The node-side objects of the 2022 design need only the pod's IP and its host interface (for
//! rp_filter), so no pod netns is entered. The host interface is read from the main-table route
//! the kernel picks for the pod IP, and only a direct route counts (`10.244.1.5 dev vethX scope
//! link` of ptp/kindnet/Calico, or the bridge's `10.244.1.0/24 dev cni0`): a route through a
//! gateway or the default route is refused, never guessed from.
//!
//! Such a record is keyed like a CNI record of the same pod (UID + `eth0`), so a later CNI ADD of
//! the pod replaces it: one record per pod. Its container ID is `api:<uid>` or `manual:<uid>`
//! (`:` is not allowed in CNI container IDs, so it cannot collide with a sandbox), its netns and
//! network are empty (never swept, never collected by a CNI GC). IP reuse: a record made here
//! never takes an IP that a CNI record of another pod holds, and a CNI ADD of another pod with
//! its IP removes it (the runtime's word is fresher than the API's view).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Serialize;
use tracing::{info, warn};

use super::{decide, family_refusal, valid_ifname, valid_k8s_token, Daemon, Inner, RequestError};
use crate::dataplane::Dataplane;
use crate::model::Route;
use crate::reconcile::{self, ApplyReport};
use crate::registry::{PodKey, PodRecord, Upsert};
use crate::store::Entry;

/// Container-ID prefix of records made from the Kubernetes API.
pub const API_PREFIX: &str = "api:";
/// Container-ID prefix of records made by `ambient-cnid enroll`.
pub const MANUAL_PREFIX: &str = "manual:";
/// The interface name of such records: the one Kubernetes runtimes give a pod's first
/// attachment, so that the pod's CNI ADD has the same key.
pub const RUNNING_IFNAME: &str = "eth0";

/// Where a record enrolled without a CNI ADD came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Origin {
    /// The watcher's list of running pods (`--kube`): released when the API stops listing it.
    Api,
    /// `ambient-cnid enroll`: released by `ambient-cnid enroll --release`.
    Manual,
}

impl Origin {
    /// Its name in metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            Origin::Api => "api",
            Origin::Manual => "manual",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Origin::Api => API_PREFIX,
            Origin::Manual => MANUAL_PREFIX,
        }
    }

    /// The origin of a record made here; `None` for a record of a CNI ADD.
    pub fn of(rec: &PodRecord) -> Option<Origin> {
        if rec.container_id.starts_with(API_PREFIX) {
            Some(Origin::Api)
        } else if rec.container_id.starts_with(MANUAL_PREFIX) {
            Some(Origin::Manual)
        } else {
            None
        }
    }
}

/// A pod reported running on this node (by the API server or an admin), with what enrollment
/// needs. Every address is enrolled, of either family (`status.podIPs` of a dual-stack pod).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunningPod {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID (the ipset entry's owner).
    pub uid: String,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

impl RunningPod {
    fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A running pod of an enrolled namespace that is not enrolled, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct NotEnrolled {
    /// `namespace/name`.
    pub pod: String,
    /// Its UID.
    pub uid: String,
    /// Why (no IP, host interface not found, hostNetwork, opted out, IP held by another pod…).
    pub reason: String,
    /// Worth trying again without an API change: its host interface was not found (the primary
    /// CNI may not have written the route yet). The periodic resync retries it.
    #[serde(skip)]
    pub retry: bool,
}

impl NotEnrolled {
    fn new(pod: &RunningPod, reason: String) -> Self {
        NotEnrolled {
            pod: pod.display(),
            uid: pod.uid.clone(),
            reason,
            retry: false,
        }
    }
}

/// What one [`Daemon::sync_running`] did.
#[derive(Debug, Default)]
pub struct RunningReport {
    /// Pods enrolled (or re-enrolled with new IPs) by this call.
    pub enrolled: Vec<String>,
    /// Pods released: no longer listed, no longer enrolled, or now known from a CNI ADD.
    pub released: Vec<String>,
    /// Running pods of enrolled namespaces that are not enrolled, with the reason.
    pub not_enrolled: Vec<NotEnrolled>,
    /// The kernel changes.
    pub kernel: ApplyReport,
}

/// The answer to `ambient-cnid enroll` / `enroll --release`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollOutcome {
    /// Enrolled after the call.
    pub enrolled: bool,
    /// What happened, for the admin.
    pub detail: String,
}

/// The host interface of a pod at `ip`, from the main-table route the kernel picks for it; the
/// error says why there is none. Pure.
pub fn host_if_of(ip: IpAddr, route: Option<&Route>) -> Result<String, String> {
    let Some(r) = route else {
        return Err(format!(
            "host interface not found: the main table has no route to {ip}"
        ));
    };
    let dev = r.dev.as_deref().unwrap_or("?");
    if r.key.dst.len == 0 {
        return Err(format!(
            "host interface not found: only the default route (dev {dev}) reaches {ip}; \
             a pod of this node needs a direct route (ptp, bridge, kindnet, Calico)"
        ));
    }
    if let Some(via) = r.via {
        return Err(format!(
            "host interface not found: the main table reaches {ip} through gateway {via} \
             (route {}, dev {dev}), not on a directly attached link",
            r.key.dst
        ));
    }
    match &r.dev {
        Some(d) if valid_ifname(d) => Ok(d.clone()),
        Some(d) => Err(format!(
            "host interface not found: the route to {ip} names interface {d:?}, which we do not accept"
        )),
        None => Err(format!(
            "host interface not found: the route to {ip} ({}) has no output interface",
            r.key.dst
        )),
    }
}

/// What to do with one listed pod.
enum Verdict {
    Enroll(Vec<IpAddr>),
    /// Its namespace is enrolled, but the pod cannot be: why.
    Skip(String),
    /// Not ours to enroll (namespace not enrolled, the ztunnel).
    Ignore,
}

fn judge(
    cfg: &crate::config::Config,
    policy: &super::Policy,
    zt: Option<&crate::reconcile::Ztunnel>,
    pod: &RunningPod,
) -> Verdict {
    let ns_enrolled = cfg.ambient_namespaces.contains(&pod.namespace)
        || policy.namespaces.contains(&pod.namespace);
    let (enrolled, ztunnel, reason) =
        decide(cfg, policy, &pod.namespace, &pod.name, !pod.ips.is_empty());
    if ztunnel || !ns_enrolled {
        return Verdict::Ignore;
    }
    if pod.host_network {
        return Verdict::Skip("hostNetwork: it shares the node's network namespace".into());
    }
    if pod.uid.is_empty() {
        return Verdict::Skip("no UID in the pod's metadata".into());
    }
    if pod.ips.is_empty() {
        return Verdict::Skip("no IP in status.podIPs yet".into());
    }
    if !enrolled {
        return Verdict::Skip(reason);
    }
    // Captured in all its families or not at all, as a CNI ADD.
    match family_refusal(cfg, &pod.ips, zt) {
        Some(why) => Verdict::Skip(why),
        None => Verdict::Enroll(pod.ips.clone()),
    }
}

fn record(origin: Origin, pod: &RunningPod, ips: Vec<IpAddr>, host_if: String) -> PodRecord {
    PodRecord {
        gateway6: None,
        container_id: format!("{}{}", origin.prefix(), pod.uid),
        ifname: RUNNING_IFNAME.into(),
        netns: String::new(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        network: String::new(),
        ips,
        gateway: None,
        host_if: Some(host_if),
        enrolled: true,
        ztunnel: false,
        seq: 0,
    }
}

fn key_of_uid(uid: &str) -> PodKey {
    PodKey {
        id: uid.to_string(),
        ifname: RUNNING_IFNAME.into(),
    }
}

impl<D: Dataplane> Daemon<D> {
    /// The host interface of a pod with these addresses, or why it cannot be found: every
    /// address (each in the main table of its family) must be reached directly on the same
    /// interface (the one rp_filter is set on); a pod whose families disagree is refused.
    async fn running_host_if(&self, ips: &[IpAddr]) -> Result<String, String> {
        let mut found: Option<(IpAddr, String)> = None;
        for &ip in ips {
            let dev = match self.dp.main_route_lookup(ip).await {
                Ok(r) => host_if_of(ip, r.as_ref())?,
                Err(e) => return Err(format!("looking up the route to {ip}: {e}")),
            };
            match &found {
                Some((first, d)) if *d != dev => {
                    return Err(format!(
                        "host interface not found: {first} is reached on {d} but {ip} on {dev}; \
                         one pod has one host interface"
                    ))
                }
                Some(_) => {}
                None => found = Some((ip, dev)),
            }
        }
        found
            .map(|(_, d)| d)
            .ok_or_else(|| "no IP address".to_string())
    }

    /// Removes `rec` (made here) from the registry and the state dir; returns its IPs.
    fn drop_running(&self, inner: &mut Inner, rec: &PodRecord, why: &str) -> Vec<IpAddr> {
        inner.reg.remove_key(&rec.key());
        if let Some(o) = Origin::of(rec) {
            self.metrics.running(o.label(), "released");
        }
        if let Err(e) = self.persist(inner, Entry::Del { key: rec.key() }) {
            warn!(error = %e, "persisting a release");
        }
        self.event(
            "release",
            format!(
                "{} {} {:?}: {why}",
                rec.display_name(),
                rec.owner(),
                rec.ips
            ),
        );
        rec.ips.clone()
    }

    /// Records this pod, persisted; returns the IPs whose kernel entries change.
    fn put_running(&self, inner: &mut Inner, rec: PodRecord) -> Vec<IpAddr> {
        let mut touched = rec.ips.clone();
        let key = rec.key();
        let origin = Origin::of(&rec);
        let label = format!(
            "{} {} {:?} host interface {}",
            rec.display_name(),
            rec.owner(),
            rec.ips,
            rec.host_if.as_deref().unwrap_or("?")
        );
        match inner.reg.upsert(rec) {
            Upsert::Same => return vec![],
            Upsert::Replaced(old) => touched.extend(old.ips.iter().copied()),
            Upsert::New => {}
        }
        let stored = inner.reg.records().find(|r| r.key() == key).cloned();
        if let Some(rec) = stored {
            if let Err(e) = self.persist(inner, Entry::Put { rec }) {
                warn!(error = %e, "persisting an enrollment");
            }
        }
        self.event("enroll", label);
        if let Some(o) = origin {
            self.metrics.running(o.label(), "enrolled");
        }
        touched
    }

    async fn apply_pods(&self, inner: &mut Inner, ips: BTreeSet<IpAddr>) -> (ApplyReport, String) {
        if ips.is_empty() {
            return (ApplyReport::default(), String::new());
        }
        let zt = self.live_ztunnel(&inner.reg);
        let ips: Vec<IpAddr> = ips.into_iter().collect();
        let ops = reconcile::pod_ops(&self.cfg, &inner.reg, zt.as_ref(), &ips);
        self.apply_traced(&ops, "kernel").await
    }

    /// A CNI ADD of `uid` claims `ips`: records made without an ADD for another pod that claim
    /// them are stale (the IP moved to another pod) and go. Returns their IPs.
    pub(super) fn drop_displaced(
        &self,
        inner: &mut Inner,
        ips: &[IpAddr],
        owner: &str,
    ) -> Vec<IpAddr> {
        // Through the IP index, not a scan of every record: this runs on every CNI ADD.
        let mut stale: Vec<PodRecord> = Vec::new();
        for ip in ips {
            for r in inner.reg.claimants(*ip) {
                let made_here = Origin::of(r).is_some() && r.owner() != owner;
                if made_here && !stale.iter().any(|s| s.key() == r.key()) {
                    stale.push(r.clone());
                }
            }
        }
        let mut out = Vec::new();
        for rec in &stale {
            info!(pod = %rec.display_name(), uid = %rec.owner(), "released: its IP now belongs to another pod's sandbox");
            out.extend(self.drop_running(
                inner,
                rec,
                "its IP was taken by a CNI ADD of another pod",
            ));
        }
        out
    }

    /// The watcher's view of this node's running pods (complete: every pod it lists). Enrolls
    /// those of enrolled namespaces that no CNI ADD told us about, releases the API-made records
    /// of pods no longer listed or no longer enrolled, and returns the pods it could not enroll
    /// (also kept for `status`). Kernel errors are reported; the periodic resync repairs them.
    pub async fn sync_running(&self, pods: &[RunningPod]) -> RunningReport {
        let mut inner = self.inner.lock().await;
        inner.running = Some(pods.to_vec());
        self.sync_running_locked(&mut inner, pods).await
    }

    /// The periodic resync's retry of running pods whose host interface was not found (the
    /// primary CNI writes its route after the API lists the pod IP, or the route came back),
    /// with the last API list: without it such a pod would wait for the next API change.
    pub(super) async fn retry_running(&self, inner: &mut Inner) {
        let retry: Vec<&NotEnrolled> = inner
            .not_enrolled
            .iter()
            .flatten()
            .filter(|n| n.retry)
            .collect();
        if retry.is_empty() {
            return;
        }
        let Some(pods) = inner.running.clone() else {
            return;
        };
        let names: Vec<String> = retry.iter().map(|n| n.pod.clone()).collect();
        let report = self.sync_running_locked(inner, &pods).await;
        let still: Vec<&str> = report
            .not_enrolled
            .iter()
            .filter(|n| n.retry)
            .map(|n| n.pod.as_str())
            .collect();
        info!(
            retried = ?names,
            enrolled = ?report.enrolled,
            still_without_host_interface = ?still,
            "enrollment: resync retried running pods whose host interface was not found"
        );
    }

    async fn sync_running_locked(&self, inner: &mut Inner, pods: &[RunningPod]) -> RunningReport {
        let mut report = RunningReport::default();
        let zt = self.live_ztunnel(&inner.reg);
        // Who holds what, over every record: UIDs known from a CNI ADD, records made here, and
        // the IPs CNI records claim.
        let mut cni_uids: BTreeSet<String> = BTreeSet::new();
        let mut made_here: BTreeMap<String, PodRecord> = BTreeMap::new();
        let mut cni_ips: BTreeMap<IpAddr, String> = BTreeMap::new();
        for r in inner.reg.records() {
            match Origin::of(r) {
                Some(_) => {
                    made_here.insert(r.uid.clone(), r.clone());
                }
                None => {
                    cni_uids.insert(r.owner().to_string());
                    for ip in &r.ips {
                        cni_ips.insert(*ip, r.display_name());
                    }
                }
            }
        }
        let mut want: BTreeMap<String, (&RunningPod, Vec<IpAddr>)> = BTreeMap::new();
        for pod in pods {
            if cni_uids.contains(&pod.uid) {
                continue; // its CNI ADD decided; the policy keeps it right
            }
            match judge(&self.cfg, &inner.policy, zt.as_ref(), pod) {
                Verdict::Enroll(ips) => {
                    let held = ips
                        .iter()
                        .find_map(|ip| cni_ips.get(ip).map(|holder| (*ip, holder.clone())));
                    match held {
                        Some((ip, holder)) => report.not_enrolled.push(NotEnrolled::new(
                            pod,
                            format!(
                                "IP {ip} is held by the sandbox of {holder} (from its CNI ADD)"
                            ),
                        )),
                        None => {
                            want.insert(pod.uid.clone(), (pod, ips));
                        }
                    }
                }
                Verdict::Skip(reason) => report.not_enrolled.push(NotEnrolled::new(pod, reason)),
                Verdict::Ignore => {}
            }
        }
        let mut touched = BTreeSet::new();
        for (uid, rec) in &made_here {
            let release = match Origin::of(rec) {
                Some(Origin::Api) => cni_uids.contains(uid) || !want.contains_key(uid),
                // Hand-made records stay until released by hand, or a CNI ADD takes over.
                _ => cni_uids.contains(uid),
            };
            if release {
                let why = if cni_uids.contains(uid) {
                    "now known from its CNI ADD"
                } else {
                    "no longer a running pod of an enrolled namespace"
                };
                touched.extend(self.drop_running(inner, rec, why));
                report.released.push(rec.display_name());
            }
        }
        for (uid, (pod, ips)) in &want {
            match made_here.get(uid) {
                Some(r) if Origin::of(r) == Some(Origin::Manual) => continue,
                Some(r) if r.ips == *ips && r.enrolled && r.name == pod.name => continue,
                _ => {}
            }
            let host_if = match self.running_host_if(ips).await {
                Ok(h) => h,
                Err(reason) => {
                    if let Some(old) = made_here.get(uid) {
                        touched.extend(self.drop_running(inner, old, &reason));
                        report.released.push(old.display_name());
                    }
                    report.not_enrolled.push(NotEnrolled {
                        retry: true,
                        ..NotEnrolled::new(pod, reason)
                    });
                    continue;
                }
            };
            let changed = self.put_running(inner, record(Origin::Api, pod, ips.clone(), host_if));
            if !changed.is_empty() {
                report.enrolled.push(pod.display());
            }
            touched.extend(changed);
        }
        let (kernel, changes) = self.apply_pods(inner, touched).await;
        report.kernel = kernel;
        if !report.enrolled.is_empty() || !report.released.is_empty() {
            info!(
                enrolled = ?report.enrolled,
                released = ?report.released,
                kernel = %changes,
                "enrollment: running pods without a CNI ADD"
            );
        }
        self.log_not_enrolled(inner, &report.not_enrolled);
        report
    }

    /// Logs each running pod that could not be enrolled once (again when its reason changes),
    /// and keeps the list for `status`.
    fn log_not_enrolled(&self, inner: &mut Inner, now: &[NotEnrolled]) {
        let first = inner.not_enrolled.is_none();
        let before: BTreeSet<&NotEnrolled> = inner.not_enrolled.iter().flatten().collect();
        for n in now.iter().filter(|n| !before.contains(n)) {
            warn!(pod = %n.pod, uid = %n.uid, reason = %n.reason, "enrollment: running pod of an enrolled namespace not enrolled");
            self.event("skip", format!("{} {}: {}", n.pod, n.uid, n.reason));
        }
        if first {
            info!(
                not_enrolled = now.len(),
                "enrollment: running pods listed; {} of enrolled namespaces could not be enrolled",
                now.len()
            );
        }
        inner.not_enrolled = Some(now.to_vec());
    }

    /// `ambient-cnid enroll`: enroll a running pod by hand (no API, no CNI ADD). Refused when its
    /// namespace is not enrolled, its host interface cannot be found, or a CNI record of another
    /// pod holds one of its IPs; a pod already known from its CNI ADD is left as it is.
    pub async fn enroll_running(&self, pod: RunningPod) -> Result<EnrollOutcome, RequestError> {
        for (what, v) in [
            ("pod namespace", &pod.namespace),
            ("pod name", &pod.name),
            ("pod UID", &pod.uid),
        ] {
            if !valid_k8s_token(v) {
                return Err(RequestError::Invalid(format!("invalid {what} {v:?}")));
            }
        }
        if pod.ips.is_empty() {
            return Err(RequestError::Invalid(format!(
                "{}: no IP address given",
                pod.display()
            )));
        }
        let mut inner = self.inner.lock().await;
        if let Some(r) = inner
            .reg
            .records()
            .find(|r| r.uid == pod.uid && Origin::of(r).is_none())
        {
            return Ok(EnrollOutcome {
                enrolled: r.enrolled,
                detail: format!(
                    "{} is known from its CNI ADD (container {}), enrolled: {}; nothing changed",
                    r.display_name(),
                    r.container_id,
                    r.enrolled
                ),
            });
        }
        let zt = self.live_ztunnel(&inner.reg);
        let ips = match judge(&self.cfg, &inner.policy, zt.as_ref(), &pod) {
            Verdict::Enroll(ips) => ips,
            Verdict::Skip(reason) => {
                return Err(RequestError::Precondition(format!(
                    "{} not enrolled: {reason}",
                    pod.display()
                )))
            }
            Verdict::Ignore => {
                let (_, ztunnel, reason) =
                    decide(&self.cfg, &inner.policy, &pod.namespace, &pod.name, true);
                let reason = if ztunnel {
                    "the node's ztunnel is known only from its CNI ADD (its netns is needed)".into()
                } else {
                    reason
                };
                return Err(RequestError::Precondition(format!(
                    "{} not enrolled: {reason}; nothing recorded",
                    pod.display()
                )));
            }
        };
        if let Some(holder) = inner.reg.records().find(|r| {
            Origin::of(r).is_none()
                && r.owner() != pod.uid
                && r.ips.iter().any(|ip| ips.contains(ip))
        }) {
            return Err(RequestError::Precondition(format!(
                "{} not enrolled: one of {:?} is held by the sandbox of {} ({}), from its CNI ADD",
                pod.display(),
                ips,
                holder.display_name(),
                holder.owner()
            )));
        }
        let host_if = self.running_host_if(&ips).await.map_err(|r| {
            RequestError::Precondition(format!("{} not enrolled: {r}", pod.display()))
        })?;
        // Records made without an ADD for another pod with these IPs are stale: the IP moved.
        let mut touched: BTreeSet<IpAddr> = self
            .drop_displaced(&mut inner, &ips, &pod.uid)
            .into_iter()
            .collect();
        // A record of this pod from the API has the same key: the hand-made one replaces it.
        let rec = record(Origin::Manual, &pod, ips.clone(), host_if.clone());
        touched.extend(self.put_running(&mut inner, rec));
        let (report, changes) = self.apply_pods(&mut inner, touched).await;
        info!(pod = %pod.display(), uid = %pod.uid, ips = ?ips, host_if = %host_if, kernel = %changes, "enrolled by hand (no CNI ADD)");
        if !report.ok() {
            return Err(RequestError::Kernel(report.errors.join("; ")));
        }
        Ok(EnrollOutcome {
            enrolled: true,
            detail: format!(
                "{} (uid {}) enrolled: {:?} on host interface {host_if}",
                pod.display(),
                pod.uid,
                ips
            ),
        })
    }

    /// `ambient-cnid enroll --release --uid UID`: release a pod enrolled without a CNI ADD (by
    /// hand or from the API; the watcher re-enrolls the latter while its namespace is enrolled).
    /// A pod known from its CNI ADD is refused: its DEL or its namespace's label releases it.
    pub async fn release_running(&self, uid: &str) -> Result<EnrollOutcome, RequestError> {
        if !valid_k8s_token(uid) {
            return Err(RequestError::Invalid(format!("invalid pod UID {uid:?}")));
        }
        let mut inner = self.inner.lock().await;
        let Some(rec) = inner
            .reg
            .records()
            .find(|r| r.key() == key_of_uid(uid))
            .cloned()
        else {
            return Ok(EnrollOutcome {
                enrolled: false,
                detail: format!(
                    "no pod with UID {uid} is enrolled without a CNI ADD: nothing to do"
                ),
            });
        };
        if Origin::of(&rec).is_none() {
            return Err(RequestError::Precondition(format!(
                "{} (uid {uid}) is known from its CNI ADD (container {}): its DEL releases it, not enroll --release",
                rec.display_name(),
                rec.container_id
            )));
        }
        let ips: BTreeSet<IpAddr> = self
            .drop_running(&mut inner, &rec, "released by hand")
            .into_iter()
            .collect();
        let (report, changes) = self.apply_pods(&mut inner, ips).await;
        info!(pod = %rec.display_name(), uid, kernel = %changes, "released by hand");
        if !report.ok() {
            return Err(RequestError::Kernel(report.errors.join("; ")));
        }
        Ok(EnrollOutcome {
            enrolled: false,
            detail: format!("{} (uid {uid}) released: {:?}", rec.display_name(), rec.ips),
        })
    }
}

#[cfg(test)]
#[path = "enroll_tests.rs"]
mod tests;
