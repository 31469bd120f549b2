//! The daemon's behaviour, independent of gRPC: pod add/del/check, GC, the periodic resync that
//! repairs drift, and the trace of what it did. Generic over the [`Dataplane`], so the whole
//! request flow is unit-tested on the fake.

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::dataplane::Dataplane;
use crate::metrics::Metrics;
use crate::reconcile::{self, desired, ApplyReport, Op, Ztunnel};
use crate::registry::{PodRecord, Registry, Upsert};
use crate::store::{Entry, Store};

#[path = "enroll.rs"]
mod enroll;
pub use enroll::{
    host_if_of, EnrollOutcome, NotEnrolled, Origin, RunningPod, RunningReport, API_PREFIX,
    MANUAL_PREFIX,
};

/// Operations (and errors) of one apply that are logged one by one; the rest are counted.
const LOG_EACH: usize = 32;

/// "N more: 9990 ipset add, 9990 route replace" for what was not logged one by one (kinds are
/// the first two words of each line), or None when nothing is left.
fn summary<'a>(rest: impl Iterator<Item = &'a String>) -> Option<String> {
    // A handful of kinds over up to 20,000 lines (a restore): counted in a short list by the
    // lines' own text, with no allocation per line.
    let mut kinds: Vec<(&str, &str, usize)> = Vec::new();
    let mut n = 0;
    for line in rest {
        n += 1;
        let mut words = line.split_whitespace();
        let (a, b) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        match kinds.iter_mut().find(|(x, y, _)| *x == a && *y == b) {
            Some(k) => k.2 += 1,
            None => kinds.push((a, b, 1)),
        }
    }
    if n == 0 {
        return None;
    }
    kinds.sort_unstable_by(|x, y| (x.0, x.1).cmp(&(y.0, y.1)));
    let parts: Vec<String> = kinds
        .iter()
        .map(|(a, b, c)| match (a.is_empty(), b.is_empty()) {
            (false, false) => format!("{c} {a} {b}"),
            (false, true) => format!("{c} {a}"),
            _ => format!("{c} "),
        })
        .collect();
    Some(format!("{n} more: {}", parts.join(", ")))
}

/// Hands memory the allocator holds free back to the kernel, after each periodic resync. A full
/// pass builds and drops maps with an entry per pod, and glibc keeps what was freed in each
/// thread's arena: at 10,000 pods that was ~19 MB of the daemon's RSS (acni-bench). The trim
/// itself took ~8 ms there, every resync interval, outside the daemon's lock.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the kernel; it has no
    // preconditions and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How many trace events are kept.
const TRACE_EVENTS: usize = 8192;

/// A request about one pod attachment, already decoded from the wire.
#[derive(Clone, Debug, Default)]
pub struct PodEvent {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_NETNS (may be empty on DEL).
    pub netns: String,
    /// K8S_POD_NAMESPACE.
    pub namespace: String,
    /// K8S_POD_NAME.
    pub name: String,
    /// K8S_POD_UID.
    pub uid: String,
    /// Network name.
    pub network: String,
    /// Addresses (CIDR) with gateways, from prevResult.
    pub ips: Vec<(String, String)>,
    /// Host-side interface from prevResult.
    pub host_if: String,
}

/// Errors a request can end in; the server maps them to gRPC codes, the plugin to CNI codes.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request itself is wrong (bad names or addresses).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The pod cannot be handled in its current state (netns gone, not enrolled on CHECK).
    #[error("{0}")]
    Precondition(String),
    /// Programming the kernel failed.
    #[error("kernel programming failed: {0}")]
    Kernel(String),
    /// The registry could not be persisted.
    #[error("state: {0}")]
    State(String),
}

/// Outcome of an ADD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddOutcome {
    /// Redirected through ztunnel.
    pub enrolled: bool,
    /// The pod is the node's ztunnel.
    pub ztunnel: bool,
    /// Why.
    pub reason: String,
}

/// One line of `ambient-cnid trace`.
#[derive(Clone, Debug, Serialize)]
pub struct TraceEvent {
    /// Milliseconds since the epoch.
    pub unix_ms: u64,
    /// add, del, check, gc, kernel, repair, sweep, error, start.
    pub kind: String,
    /// What happened.
    pub message: String,
}

/// A [`TraceEvent`] as the ring keeps it: one exact-size allocation holding `kind` and `message`
/// (24 bytes in the ring plus the text, instead of 56 plus two strings; the ring is full on any
/// busy node, 8,192 events).
#[derive(Debug)]
struct StoredEvent {
    unix_ms: u64,
    /// `kind`, then `message` from byte `kind_len` on.
    text: Box<str>,
}

impl StoredEvent {
    fn new(kind: &str, message: &str) -> Self {
        let mut text = String::with_capacity(1 + kind.len() + message.len());
        // Byte 0 is the length of `kind` (an ASCII char: kinds are short literals; a longer one
        // is cut at a char boundary rather than mixed into the message).
        let mut k = kind.len().min(0x7f);
        while !kind.is_char_boundary(k) {
            k -= 1;
        }
        text.push(char::from(k as u8));
        text.push_str(&kind[..k]);
        text.push_str(message);
        StoredEvent {
            unix_ms: now_ms(),
            text: text.into_boxed_str(),
        }
    }

    fn split(&self) -> (&str, &str) {
        let k = self.text.as_bytes().first().copied().unwrap_or(0) as usize;
        let body = self.text.get(1..).unwrap_or("");
        body.split_at_checked(k).unwrap_or(("", body))
    }

    fn message(&self) -> &str {
        self.split().1
    }

    fn to_event(&self) -> TraceEvent {
        let (kind, message) = self.split();
        TraceEvent {
            unix_ms: self.unix_ms,
            kind: kind.to_string(),
            message: message.to_string(),
        }
    }
}

/// Summary of the last full reconcile.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ResyncSummary {
    /// When it ran.
    pub unix_ms: u64,
    /// Operations it needed (0 = the kernel matched).
    pub repaired: usize,
    /// Errors.
    pub errors: Vec<String>,
    /// Microseconds it took.
    pub micros: u64,
    /// What started it: start, repair (the periodic resync), reconcile (a ztunnel change),
    /// event (a kernel notification about our objects).
    #[serde(default)]
    pub kind: String,
    /// What it changed (the first operations one by one, then a count by kind).
    #[serde(default)]
    pub changed: Vec<String>,
}

/// Enrollment decided outside the static `--ambient-namespace` list: by the Kubernetes watcher
/// (namespaces labelled `istio.io/dataplane-mode=ambient`, pods annotated
/// `ambient.istio.io/redirection: disabled`, host-network pods).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Namespaces whose pods are enrolled, on top of the configured ones.
    pub namespaces: BTreeSet<String>,
    /// Pods never enrolled: (namespace, name).
    pub excluded_pods: BTreeSet<(String, String)>,
}

/// Is a pod enrolled, and why. Pure.
pub fn decide(
    cfg: &Config,
    policy: &Policy,
    namespace: &str,
    name: &str,
    has_ip: bool,
) -> (bool, bool, String) {
    let ztunnel = namespace == cfg.ztunnel_namespace && name.starts_with(&cfg.ztunnel_name_prefix);
    if ztunnel {
        return (false, true, "the node's ztunnel".into());
    }
    if !has_ip {
        return (false, false, "no IP address (host-network pod?)".into());
    }
    if policy
        .excluded_pods
        .contains(&(namespace.to_string(), name.to_string()))
    {
        return (
            false,
            false,
            "pod opted out (redirection disabled or host network)".into(),
        );
    }
    if cfg.ambient_namespaces.contains(namespace) || policy.namespaces.contains(namespace) {
        (true, false, format!("namespace {namespace} is ambient"))
    } else {
        (
            false,
            false,
            format!("namespace {namespace} is not ambient"),
        )
    }
}

struct Inner {
    policy: Policy,
    reg: Registry,
    store: Option<Store>,
    last_resync: Option<ResyncSummary>,
    /// Last full reconcile that changed something.
    last_repair: Option<ResyncSummary>,
    /// Ztunnel the last full reconcile built the tunnels for.
    zt_applied: Option<Ztunnel>,
    resyncs: u64,
    /// Running pods of enrolled namespaces the last API list could not enroll (None before it).
    not_enrolled: Option<Vec<NotEnrolled>>,
    /// The last API list of this node's running pods (None without `--kube` or before it).
    running: Option<Vec<RunningPod>>,
    /// The objects of the families `--ip-families` turns off are removed (once, on start).
    families_off_cleaned: bool,
}

/// The daemon.
pub struct Daemon<D> {
    cfg: Arc<Config>,
    dp: Arc<D>,
    inner: AsyncMutex<Inner>,
    trace: Mutex<VecDeque<StoredEvent>>,
    ready: AtomicBool,
    metrics: Metrics,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A valid Linux interface name: 1–15 bytes, no `/`, `:` or whitespace, not `.`/`..`.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        // Narrower than the kernel's rule (anything but `/`, `:` and whitespace): these names end
        // up in iptables-restore input and /proc/sys paths, and every CNI's names fit
        // (`eth0`, `net1`, `veth…`, `cali…`, `lxc…`).
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// A valid container ID as libcni checks it: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn valid_container_id(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
        && s.len() <= 1024
}

/// A pod UID (the ipset comment, ≤ 255 bytes in the kernel) or name/namespace from CNI_ARGS:
/// 1–253 bytes of `[A-Za-z0-9._-]` (Kubernetes UIDs, names and namespaces all fit).
pub fn valid_k8s_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The owner a CNI ADD's record gets (its UID, else its container ID), as [`PodRecord::owner`].
fn rec_owner(ev: &PodEvent) -> &str {
    if ev.uid.is_empty() {
        &ev.container_id
    } else {
        &ev.uid
    }
}

/// The address of a CIDR (`10.244.1.5/24`, `fd00::5/64`) or of a plain address.
fn parse_ip(cidr: &str) -> Result<IpAddr, String> {
    let addr = cidr.split('/').next().unwrap_or(cidr);
    addr.parse::<IpAddr>()
        .map_err(|_| format!("not an IP address: {cidr:?}"))
}

/// The pod's addresses (both families, in prevResult's order, without duplicates) and its
/// gateway of each family (the first one given).
type PodAddrs = (Vec<IpAddr>, Option<Ipv4Addr>, Option<Ipv6Addr>);

fn parse_pod_ips(ips: &[(String, String)]) -> Result<PodAddrs, String> {
    let (mut out, mut gw4, mut gw6) = (Vec::new(), None, None);
    for (addr, gw) in ips {
        let ip = parse_ip(addr)?;
        if !out.contains(&ip) {
            out.push(ip);
        }
        if gw.is_empty() {
            continue;
        }
        match (ip, parse_ip(gw)?) {
            (IpAddr::V4(_), IpAddr::V4(g)) => {
                gw4.get_or_insert(g);
            }
            (IpAddr::V6(_), IpAddr::V6(g)) => {
                gw6.get_or_insert(g);
            }
            _ => return Err(format!("gateway {gw} is not of the family of {addr}")),
        }
    }
    Ok((out, gw4, gw6))
}

/// Why an enrolled pod with these addresses cannot be captured on this node, if it cannot: an
/// address of a family that is off (`--ip-families`), or of a family the active ztunnel has no
/// address of (its traffic could not be steered into ztunnel, and would be held closed for
/// ever). Checked before anything is recorded: a pod is captured in all its families or refused.
pub fn family_refusal(cfg: &Config, ips: &[IpAddr], zt: Option<&Ztunnel>) -> Option<String> {
    for f in crate::model::Family::ALL {
        let Some(ip) = ips.iter().find(|i| crate::model::Family::of(**i) == f) else {
            continue;
        };
        if !cfg.ip_families.has(f) {
            return Some(format!(
                "its {f} address {ip} cannot be captured: {f} is off on this node (--ip-families {})",
                cfg.ip_families
            ));
        }
        if let Some(z) = zt {
            if z.ip_of(f).is_none() {
                return Some(format!(
                    "its {f} address {ip} cannot be captured: the node's ztunnel has no {f} address ({})",
                    z.ips_text()
                ));
            }
        }
    }
    None
}

impl<D: Dataplane> Daemon<D> {
    /// A daemon over `dp`, with its registry loaded from `store` (None: not persisted, for tests).
    pub fn new(cfg: Arc<Config>, dp: Arc<D>, store: Option<Store>, reg: Registry) -> Self {
        Daemon {
            cfg,
            dp,
            inner: AsyncMutex::new(Inner {
                policy: Policy::default(),
                reg,
                store,
                last_resync: None,
                last_repair: None,
                zt_applied: None,
                resyncs: 0,
                not_enrolled: None,
                running: None,
                families_off_cleaned: false,
            }),
            trace: Mutex::new(VecDeque::with_capacity(1024)),
            ready: AtomicBool::new(false),
            metrics: Metrics::new(),
        }
    }

    /// The daemon's metrics (what `--metrics-addr` serves).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The dataplane.
    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    fn event(&self, kind: &str, message: impl AsRef<str>) {
        let ev = StoredEvent::new(kind, message.as_ref());
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() >= TRACE_EVENTS {
            t.pop_front();
        }
        t.push_back(ev);
    }

    /// The newest events (filtered by a substring), oldest first.
    pub fn trace(&self, filter: &str, limit: usize) -> Vec<TraceEvent> {
        let t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<TraceEvent> = t
            .iter()
            .rev()
            .filter(|e| filter.is_empty() || e.message().contains(filter))
            .take(limit)
            .map(StoredEvent::to_event)
            .collect();
        out.reverse();
        out
    }

    /// Is the daemon able to enroll pods (initial reconcile done and the base state in place)?
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn persist(&self, inner: &mut Inner, entry: Entry) -> Result<(), RequestError> {
        let Inner { store, reg, .. } = inner;
        if let Some(s) = store.as_mut() {
            s.append(&entry, reg)
                .map_err(|e| RequestError::State(e.to_string()))?;
        }
        Ok(())
    }

    /// The active ztunnel, if its record is complete and its netns exists.
    fn live_ztunnel(&self, reg: &Registry) -> Option<Ztunnel> {
        let rec = reg.ztunnel()?;
        let zt = Ztunnel::from_record(rec)?;
        self.dp.netns_alive(Path::new(&rec.netns)).then_some(zt)
    }

    async fn apply_logged(&self, ops: &[Op], kind: &str) -> ApplyReport {
        let (report, line) = self.apply_traced(ops, kind).await;
        if !line.is_empty() {
            info!(ops = %line, "{kind}");
        }
        report
    }

    /// Applies `ops`, traces them and logs their errors; returns the report and the line that
    /// lists what was applied, for the caller's one log line.
    async fn apply_traced(&self, ops: &[Op], kind: &str) -> (ApplyReport, String) {
        let report = reconcile::apply(&*self.dp, ops).await;
        self.metrics.apply_errors(report.errors.len());
        // Each operation is traced and logged, up to a point: a restore of 10,000 pods is 20,000
        // operations, and an event each would push everything else out of the trace ring.
        // Beyond LOG_EACH, one event says how many more, of which kinds. The log gets one line
        // per apply (a pod ADD is one line, not one per kernel object: each line is a write).
        let mut line = String::new();
        for a in report.applied.iter().take(LOG_EACH) {
            if !line.is_empty() {
                line.push_str("; ");
            }
            line.push_str(a);
            self.event(kind, a);
        }
        if let Some(more) = summary(report.applied.iter().skip(LOG_EACH)) {
            line.push_str("; ");
            line.push_str(&more);
            self.event(kind, more);
        }
        for e in report.errors.iter().take(LOG_EACH) {
            warn!(error = %e, "{kind} failed");
            self.event("error", e);
        }
        if let Some(more) = summary(report.errors.iter().skip(LOG_EACH)) {
            warn!(more = %more, "{kind} failed");
            self.event("error", more);
        }
        (report, line)
    }

    /// A pod's sandbox is up: record it and, if enrolled, redirect it.
    pub async fn add(&self, mut ev: PodEvent) -> Result<AddOutcome, RequestError> {
        if let (Some(host_proc), Some(rest)) =
            (&self.cfg.host_proc, ev.netns.strip_prefix("/proc/"))
        {
            // In a container, the runtime's `/proc/<pid>/ns/net` is the host's /proc.
            ev.netns = host_proc.join(rest).to_string_lossy().into_owned();
        }
        if !valid_container_id(&ev.container_id) {
            return Err(RequestError::Invalid(format!(
                "invalid container ID {:?}",
                ev.container_id
            )));
        }
        if !valid_ifname(&ev.ifname) {
            return Err(RequestError::Invalid(format!(
                "invalid interface name {:?}",
                ev.ifname
            )));
        }
        for (what, v) in [("pod namespace", &ev.namespace), ("pod name", &ev.name)] {
            if !valid_k8s_token(v) {
                return Err(RequestError::Invalid(format!("invalid {what} {v:?}")));
            }
        }
        if !ev.uid.is_empty() && !valid_k8s_token(&ev.uid) {
            return Err(RequestError::Invalid(format!(
                "invalid pod UID {:?}",
                ev.uid
            )));
        }
        if !ev.host_if.is_empty() && !valid_ifname(&ev.host_if) {
            return Err(RequestError::Invalid(format!(
                "invalid host interface name {:?}",
                ev.host_if
            )));
        }
        if ev.netns.is_empty() || !self.dp.netns_alive(Path::new(&ev.netns)) {
            return Err(RequestError::Precondition(format!(
                "network namespace {:?} of container {} does not exist (a late ADD of a deleted pod?)",
                ev.netns, ev.container_id
            )));
        }
        let (ips, gateway, gateway6) = parse_pod_ips(&ev.ips).map_err(RequestError::Invalid)?;
        let (enrolled, ztunnel, reason) = {
            let inner = self.inner.lock().await;
            let d = decide(
                &self.cfg,
                &inner.policy,
                &ev.namespace,
                &ev.name,
                !ips.is_empty(),
            );
            if d.0 {
                let zt = self.live_ztunnel(&inner.reg);
                if let Some(why) = family_refusal(&self.cfg, &ips, zt.as_ref()) {
                    let msg = format!(
                        "pod {}/{} ({}) is in an ambient namespace but {why}; refused, nothing was changed",
                        ev.namespace, ev.name, ev.container_id
                    );
                    warn!("{msg}");
                    self.event("refused", &msg);
                    return Err(RequestError::Precondition(msg));
                }
            }
            d
        };
        let mut host_if = (!ev.host_if.is_empty()).then(|| ev.host_if.clone());
        if host_if.is_none() && (enrolled || ztunnel) {
            if let Some(ip) = ips.first() {
                host_if = self
                    .dp
                    .route_dev_lookup(*ip)
                    .await
                    .map_err(|e| RequestError::Kernel(e.to_string()))?;
            }
        }
        if ztunnel && host_if.is_none() {
            return Err(RequestError::Precondition(format!(
                "ztunnel {}/{}: cannot find its host-side interface",
                ev.namespace, ev.name
            )));
        }
        let rec = PodRecord {
            container_id: ev.container_id.clone(),
            ifname: ev.ifname.clone(),
            netns: ev.netns.clone(),
            namespace: ev.namespace.clone(),
            name: ev.name.clone(),
            uid: ev.uid.clone(),
            network: ev.network.clone(),
            ips: ips.clone(),
            gateway,
            gateway6,
            host_if,
            enrolled,
            ztunnel,
            seq: 0,
        };
        let label = format!(
            "{} {} ({}) {:?}",
            rec.display_name(),
            rec.owner(),
            ev.container_id,
            ips
        );
        let mut inner = self.inner.lock().await;
        let up = inner.reg.upsert(rec);
        let mut touched: BTreeSet<IpAddr> = ips.iter().copied().collect();
        let mut was_ztunnel = false;
        if let Upsert::Replaced(old) = &up {
            touched.extend(old.ips.iter().copied());
            was_ztunnel = old.ztunnel;
        }
        touched.extend(self.drop_displaced(&mut inner, &ips, rec_owner(&ev)));
        if up != Upsert::Same {
            if let Some(rec) = inner.reg.find(&ev.container_id, &ev.ifname).cloned() {
                // Durable first, kernel after: nothing below has touched the kernel yet, so when
                // the journal write (or its fdatasync) fails, putting the registry back is the
                // whole undo and the plugin gets the error (code 101); no half-applied pod.
                let key = rec.key();
                if let Err(e) = self.persist(&mut inner, Entry::Put { rec }) {
                    match up {
                        Upsert::New => {
                            inner.reg.remove_key(&key);
                        }
                        Upsert::Replaced(old) => inner.reg.restore(*old),
                        Upsert::Same => {}
                    }
                    warn!(pod = %label, error = %e, "pod not added: its record is not durable");
                    return Err(e);
                }
            }
        }
        self.event("add", format!("{label}: {reason}"));
        let report = if ztunnel || was_ztunnel {
            info!(pod = %label, enrolled, ztunnel, "pod added: {reason}");
            self.full_reconcile(&mut inner, "reconcile").await
        } else {
            let zt = self.live_ztunnel(&inner.reg);
            let ips: Vec<IpAddr> = touched.into_iter().collect();
            let ops = reconcile::pod_ops(&self.cfg, &inner.reg, zt.as_ref(), &ips);
            // One line per pod ADD: who, why, and what changed in the kernel.
            let (report, changes) = self.apply_traced(&ops, "kernel").await;
            info!(pod = %label, enrolled, ztunnel, kernel = %changes, "pod added: {reason}");
            report
        };
        if !report.ok() {
            return Err(RequestError::Kernel(report.errors.join("; ")));
        }
        Ok(AddOutcome {
            enrolled,
            ztunnel,
            reason,
        })
    }

    /// A pod attachment is going away: remove exactly what it owned. Unknown attachments succeed.
    pub async fn del(&self, container_id: &str, ifname: &str) -> Result<bool, RequestError> {
        let mut inner = self.inner.lock().await;
        let Some(rec) = inner.reg.remove(container_id, ifname) else {
            self.event(
                "del",
                format!("{container_id}/{ifname}: not known (nothing to do)"),
            );
            return Ok(false);
        };
        if let Err(e) = self.persist(&mut inner, Entry::Del { key: rec.key() }) {
            // As in `add`: the kernel is untouched until the removal is durable; the record stays
            // (a DEL retry or the netns sweep removes it later).
            inner.reg.restore(rec);
            warn!(container_id, error = %e, "pod not deleted: its removal is not durable");
            return Err(e);
        }
        self.event(
            "del",
            format!(
                "{} {} ({container_id}) {:?}",
                rec.display_name(),
                rec.owner(),
                rec.ips
            ),
        );
        let (report, changes) = self.forget(&mut inner, &rec).await;
        info!(pod = %rec.display_name(), container_id, kernel = %changes, "pod deleted");
        if !report.ok() {
            return Err(RequestError::Kernel(report.errors.join("; ")));
        }
        Ok(true)
    }

    /// Undo what a removed record had in the kernel. Also returns the list of kernel changes for
    /// the caller's log line (empty when a full reconcile ran: that logs its own).
    async fn forget(&self, inner: &mut Inner, rec: &PodRecord) -> (ApplyReport, String) {
        if rec.ztunnel {
            (self.full_reconcile(inner, "reconcile").await, String::new())
        } else if rec.enrolled {
            let zt = self.live_ztunnel(&inner.reg);
            let ops = reconcile::pod_ops(&self.cfg, &inner.reg, zt.as_ref(), &rec.ips);
            self.apply_traced(&ops, "kernel").await
        } else {
            (ApplyReport::default(), String::new())
        }
    }

    /// Replace the enrollment policy (from the Kubernetes watcher) and re-decide every known pod:
    /// pods that join or leave are applied like an ADD or DEL of their IPs.
    pub async fn set_policy(&self, policy: Policy) -> ApplyReport {
        let mut inner = self.inner.lock().await;
        if inner.policy == policy {
            return ApplyReport::default();
        }
        inner.policy = policy;
        let zt = self.live_ztunnel(&inner.reg);
        let flipped: Vec<PodRecord> = inner
            .reg
            .records()
            .filter_map(|r| {
                let (mut enrolled, _, mut reason) = decide(
                    &self.cfg,
                    &inner.policy,
                    &r.namespace,
                    &r.name,
                    !r.ips.is_empty(),
                );
                // No CNI call to fail here: a pod that cannot be captured stays as it is, and
                // the refusal is logged.
                if enrolled && !r.enrolled {
                    if let Some(why) = family_refusal(&self.cfg, &r.ips, zt.as_ref()) {
                        let msg = format!(
                            "{} would join ambient ({reason}) but {why}; refused, left uncaptured",
                            r.display_name()
                        );
                        warn!("{msg}");
                        self.event("refused", &msg);
                        enrolled = false;
                        reason = msg;
                    }
                }
                (enrolled != r.enrolled && !r.ztunnel).then(|| {
                    self.event(
                        "policy",
                        format!(
                            "{} {}: {}",
                            r.display_name(),
                            if enrolled { "joins" } else { "leaves" },
                            reason
                        ),
                    );
                    PodRecord {
                        enrolled,
                        ..r.clone()
                    }
                })
            })
            .collect();
        let mut ips = BTreeSet::new();
        for rec in flipped {
            ips.extend(rec.ips.iter().copied());
            let key = (rec.container_id.clone(), rec.ifname.clone());
            inner.reg.upsert(rec);
            if let Some(r) = inner.reg.find(&key.0, &key.1).cloned() {
                if let Err(e) = self.persist(&mut inner, Entry::Put { rec: r }) {
                    warn!(error = %e, "persisting a policy change");
                }
            }
        }
        if ips.is_empty() {
            return ApplyReport::default();
        }
        let ips: Vec<IpAddr> = ips.into_iter().collect();
        let ops = reconcile::pod_ops(&self.cfg, &inner.reg, zt.as_ref(), &ips);
        self.apply_logged(&ops, "kernel").await
    }

    /// Is the attachment in the state ADD left it in?
    pub async fn check(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<(bool, String), RequestError> {
        let inner = self.inner.lock().await;
        let Some(rec) = inner.reg.find(container_id, ifname).cloned() else {
            return Err(RequestError::Precondition(format!(
                "no record of container {container_id} interface {ifname}"
            )));
        };
        drop(inner);
        if !rec.enrolled {
            return Ok((
                false,
                format!("{} is known and not enrolled", rec.display_name()),
            ));
        }
        let mut set = std::collections::BTreeMap::new();
        for f in self.cfg.ip_families.iter() {
            if rec.ips.iter().any(|ip| crate::model::Family::of(*ip) == f) {
                set.extend(
                    self.dp
                        .podset_list(f)
                        .await
                        .map_err(|e| RequestError::Kernel(e.to_string()))?
                        .unwrap_or_default(),
                );
            }
        }
        let missing: Vec<String> = rec
            .ips
            .iter()
            .filter(|ip| !set.contains_key(*ip))
            .map(|ip| ip.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(RequestError::Precondition(format!(
                "{}: IPs {} are not in the ipset (a resync will repair it)",
                rec.display_name(),
                missing.join(",")
            )));
        }
        Ok((
            true,
            format!(
                "{} enrolled, {} IPs in the ipset",
                rec.display_name(),
                rec.ips.len()
            ),
        ))
    }

    /// CNI GC: remove the records of `network` whose attachment is not listed.
    pub async fn gc(
        &self,
        network: &str,
        valid: Option<&[(String, String)]>,
    ) -> (u32, Vec<String>) {
        let Some(valid) = valid else {
            self.event(
                "gc",
                format!("network {network}: no attachment list sent, nothing removed"),
            );
            return (0, vec![]);
        };
        let keep: BTreeSet<(&str, &str)> = valid
            .iter()
            .map(|(c, i)| (c.as_str(), i.as_str()))
            .collect();
        let mut inner = self.inner.lock().await;
        let stale: Vec<PodRecord> = inner
            .reg
            .records()
            .filter(|r| {
                r.network == network
                    && !keep.contains(&(r.container_id.as_str(), r.ifname.as_str()))
            })
            .cloned()
            .collect();
        let mut errors = Vec::new();
        let mut removed = 0;
        for rec in &stale {
            inner.reg.remove_key(&rec.key());
            if let Err(e) = self.persist(&mut inner, Entry::Del { key: rec.key() }) {
                // Not durable: keep the record and its kernel state (a later GC retries).
                inner.reg.restore(rec.clone());
                errors.push(e.to_string());
                continue;
            }
            self.event(
                "gc",
                format!(
                    "{} {} ({}) {:?}",
                    rec.display_name(),
                    rec.owner(),
                    rec.container_id,
                    rec.ips
                ),
            );
            removed += 1;
            errors.extend(self.forget(&mut inner, rec).await.0.errors);
        }
        (removed, errors)
    }

    /// Is this pod netns certainly gone? A missing `/var/run/netns/x` counts only while its
    /// directory is visible: if the daemon's mount of the netns dir were missing, every pod would
    /// look gone, and sweeping them all would uncapture the node.
    fn netns_gone(&self, netns: &str) -> bool {
        let p = Path::new(netns);
        if self.dp.netns_alive(p) {
            return false;
        }
        netns.starts_with("/proc/") || p.parent().is_some_and(|d| d.is_dir())
    }

    /// Records whose netns is gone are stale (their pod was deleted while we were not told).
    fn sweep(&self, inner: &mut Inner) -> Vec<PodRecord> {
        let gone: Vec<PodRecord> = inner
            .reg
            .records()
            .filter(|r| self.netns_gone(&r.netns))
            .cloned()
            .collect();
        for rec in &gone {
            inner.reg.remove_key(&rec.key());
            if let Err(e) = self.persist(inner, Entry::Del { key: rec.key() }) {
                warn!(error = %e, "persisting a sweep");
            }
            info!(pod = %rec.display_name(), netns = %rec.netns, "swept: its netns is gone");
            self.event(
                "sweep",
                format!(
                    "{} {} ({}) {:?}: netns {} is gone",
                    rec.display_name(),
                    rec.owner(),
                    rec.container_id,
                    rec.ips,
                    rec.netns
                ),
            );
        }
        gone
    }

    /// A family that is off (`--ip-families v4` after a dual-stack run) keeps nothing of ours:
    /// its set, chains, rules and routes go before the first reconcile (which looks only at the
    /// families that are on). Done once; failures are logged and retried on the next resync.
    async fn clean_families_off(&self, inner: &mut Inner) {
        let off = crate::cleanup::families_off(&self.cfg);
        let report = crate::cleanup::clean_families(&*self.dp, &self.cfg, &inner.reg, &off).await;
        for e in &report.errors {
            warn!(error = %e, "removing the objects of a family that is off");
            self.event("error", e);
        }
        if !off.is_empty() {
            info!(families_off = ?off, removed = report.applied.len(), errors = report.errors.len(), "objects of the address families that are off removed");
            self.event(
                "families-off",
                format!(
                    "{off:?}: {} removal steps, {} errors",
                    report.applied.len(),
                    report.errors.len()
                ),
            );
        }
        // Once: what failed here (no ip6tables on the node, say) holds nothing of ours either.
        inner.families_off_cleaned = true;
    }

    async fn full_reconcile(&self, inner: &mut Inner, kind: &str) -> ApplyReport {
        let start = std::time::Instant::now();
        let zt = self.live_ztunnel(&inner.reg);
        if zt != inner.zt_applied {
            match &zt {
                Some(z) => self.event(
                    "ztunnel",
                    format!(
                        "active ztunnel: {} ip {} veth {}",
                        z.ns,
                        z.ips_text(),
                        z.host_if
                    ),
                ),
                None => self.event(
                    "ztunnel",
                    if self.cfg.fail_open {
                        "no ztunnel: enrolled pods flow uncaptured (--fail-open)"
                    } else {
                        "no ztunnel: enrolled pods' TCP is held closed until one arrives"
                    },
                ),
            }
        }
        let want = desired(&self.cfg, &inner.reg, zt.as_ref());
        let report = match reconcile::observe(&*self.dp, &want, &self.cfg.tunnel_names()).await {
            Ok(have) => {
                let ops = reconcile::plan(&want, &have);
                if ops.is_empty() {
                    debug!("reconcile: kernel matches");
                }
                self.apply_logged(&ops, kind).await
            }
            Err(e) => {
                let msg = format!("reading kernel state: {e}");
                warn!("{msg}");
                self.event("error", &msg);
                ApplyReport {
                    applied: vec![],
                    errors: vec![msg],
                }
            }
        };
        if report.ok() {
            inner.zt_applied = zt;
        }
        inner.resyncs += 1;
        self.metrics
            .reconcile(kind, &report.applied, start.elapsed());
        let mut changed: Vec<String> = report.applied.iter().take(LOG_EACH).cloned().collect();
        changed.extend(summary(report.applied.iter().skip(LOG_EACH)));
        let done = ResyncSummary {
            unix_ms: now_ms(),
            repaired: report.applied.len(),
            errors: report.errors.clone(),
            micros: start.elapsed().as_micros() as u64,
            kind: kind.to_string(),
            changed,
        };
        if done.repaired > 0 {
            inner.last_repair = Some(done.clone());
        }
        inner.last_resync = Some(done);
        report
    }

    /// One periodic pass: sweep records whose netns is gone, then a full reconcile that repairs
    /// drift. Logged as `repair` when something was missing.
    pub async fn resync(&self) -> ApplyReport {
        let mut inner = self.inner.lock().await;
        self.sweep(&mut inner);
        if !inner.families_off_cleaned {
            self.clean_families_off(&mut inner).await;
        }
        let first = !self.is_ready();
        let report = self
            .full_reconcile(&mut inner, if first { "start" } else { "repair" })
            .await;
        if report.ok() {
            self.ready.store(true, Ordering::SeqCst);
        }
        self.retry_running(&mut inner).await;
        drop(inner);
        release_free_memory();
        report
    }

    /// A full reconcile because the kernel told us one of our objects changed (rtnetlink
    /// notifications, see `events.rs`). Traced and counted as `event`.
    pub async fn repair_on_event(&self) -> ApplyReport {
        let mut inner = self.inner.lock().await;
        let report = self.full_reconcile(&mut inner, "event").await;
        if report.ok() && !self.is_ready() {
            self.ready.store(true, Ordering::SeqCst);
        }
        report
    }

    /// Does the daemon want a route to any of `ips` (an enrolled pod's or the ztunnel's)? The
    /// event watcher asks before repairing after our routes were deleted: a pod DEL's own route
    /// delete is no drift. Both families: the registry holds IPv4 and IPv6 addresses.
    pub async fn wants_route_to(&self, ips: &[IpAddr]) -> bool {
        let inner = self.inner.lock().await;
        let zt_ips: &[IpAddr] = inner.reg.ztunnel().map_or(&[], |r| r.ips.as_slice());
        ips.iter()
            .any(|ip| zt_ips.contains(ip) || inner.reg.owner_of(*ip).is_some())
    }

    /// The netns path of the live ztunnel, if any (the event watcher follows it).
    pub async fn ztunnel_netns(&self) -> Option<String> {
        let inner = self.inner.lock().await;
        let rec = inner.reg.ztunnel()?;
        self.dp
            .netns_alive(Path::new(&rec.netns))
            .then(|| rec.netns.clone())
    }

    /// Status for `ambient-cnid status`, the STATUS verb and metrics scrapes.
    pub async fn status(&self) -> StatusView {
        let inner = self.inner.lock().await;
        StatusView {
            ready: self.is_ready(),
            pods: inner.reg.len(),
            enrolled: inner.reg.records().filter(|r| r.enrolled).count(),
            ztunnel: self.live_ztunnel(&inner.reg),
            last_resync: inner.last_resync.clone(),
            last_repair: inner.last_repair.clone(),
            resyncs: inner.resyncs,
            ip_families: self
                .cfg
                .ip_families
                .iter()
                .map(|f| f.name().to_string())
                .collect(),
            not_enrolled: inner.not_enrolled.as_ref().map_or(0, Vec::len),
            running: inner
                .reg
                .records()
                .filter_map(Origin::of)
                .fold((0, 0), |(api, manual), o| match o {
                    Origin::Api => (api + 1, manual),
                    Origin::Manual => (api, manual + 1),
                }),
        }
    }

    /// Everything for `ambient-cnid dump`: registry, desired state, kernel read-back, pending plan.
    pub async fn dump(&self) -> serde_json::Value {
        let inner = self.inner.lock().await;
        let zt = self.live_ztunnel(&inner.reg);
        let want = desired(&self.cfg, &inner.reg, zt.as_ref());
        let have = reconcile::observe(&*self.dp, &want, &self.cfg.tunnel_names()).await;
        let pending: Vec<String> = match &have {
            Ok(h) => reconcile::plan(&want, h)
                .iter()
                .map(|o| o.text(self.dp.is_nftables()).to_string())
                .collect(),
            Err(_) => vec![],
        };
        #[derive(Serialize)]
        struct Dump<'a> {
            config: &'a Config,
            pods: Vec<&'a PodRecord>,
            ztunnel: Option<Ztunnel>,
            desired: reconcile::Desired<'a>,
            observed: Option<&'a reconcile::Observed>,
            observe_error: Option<String>,
            pending: Vec<String>,
            last_resync: Option<ResyncSummary>,
        }
        let dump = Dump {
            config: &self.cfg,
            pods: inner.reg.records().collect(),
            ztunnel: zt,
            desired: want,
            observed: have.as_ref().ok(),
            observe_error: have.as_ref().err().map(|e| e.to_string()),
            pending,
            last_resync: inner.last_resync.clone(),
        };
        serde_json::to_value(&dump).unwrap_or_else(|e| {
            serde_json::Value::String(format!("cannot serialize the dump: {e}"))
        })
    }
}

/// The daemon's status.
#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    /// Able to enroll pods.
    pub ready: bool,
    /// Records.
    pub pods: usize,
    /// Enrolled records.
    pub enrolled: usize,
    /// Active ztunnel.
    pub ztunnel: Option<Ztunnel>,
    /// Last full reconcile.
    pub last_resync: Option<ResyncSummary>,
    /// Last full reconcile that changed something (a repair).
    pub last_repair: Option<ResyncSummary>,
    /// Number of full reconciles since start.
    pub resyncs: u64,
    /// The families captured (`IPv4`, `IPv6`).
    pub ip_families: Vec<String>,
    /// Running pods of enrolled namespaces the API lists that could not be enrolled.
    pub not_enrolled: usize,
    /// Records of pods enrolled without a CNI ADD: (from the API, by hand).
    pub running: (usize, usize),
}

impl StatusView {
    /// The active ztunnel's addresses, both families.
    pub fn ztunnel_ips(&self) -> Vec<String> {
        self.ztunnel
            .iter()
            .flat_map(|z| crate::model::Family::ALL.map(|f| z.ip_of(f)))
            .flatten()
            .map(|ip| ip.to_string())
            .collect()
    }
}

/// A CNI ADD as the plugin sends it after ptp, for the crate's tests: `ifname` eth0, a netns path
/// under /tmp (the fake dataplane decides whether it is alive), UID `uid-<cid>`, gateway 10.244.1.1.
#[cfg(test)]
pub(crate) fn test_event(cid: &str, ns: &str, name: &str, addr: &str, hif: &str) -> PodEvent {
    test_event_ips(cid, ns, name, &[addr], hif)
}

/// [`test_event`] with addresses of either family, in this order: an IPv4 one as `/24` with
/// gateway 10.244.1.1, an IPv6 one as `/64` with gateway fd00:10:244:1::1 (ptp-style).
#[cfg(test)]
pub(crate) fn test_event_ips(
    cid: &str,
    ns: &str,
    name: &str,
    addrs: &[&str],
    hif: &str,
) -> PodEvent {
    PodEvent {
        container_id: cid.into(),
        ifname: "eth0".into(),
        netns: format!("/tmp/acni-fake-netns-{cid}"),
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{cid}"),
        network: "k8s".into(),
        ips: addrs
            .iter()
            .map(|a| {
                if a.contains(':') {
                    (format!("{a}/64"), "fd00:10:244:1::1".into())
                } else {
                    (format!("{a}/24"), "10.244.1.1".into())
                }
            })
            .collect(),
        host_if: hif.into(),
    }
}

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "durability_tests.rs"]
mod durability_tests;

#[cfg(test)]
#[path = "daemon_dual_tests.rs"]
mod dual_tests;

#[cfg(test)]
mod foreign_rule_tests {
    use std::sync::Arc;

    use super::Daemon;
    use crate::config::Config;
    use crate::dataplane::fake::FakeDataplane;
    use crate::model::{Ns, Rule, RuleAction};
    use crate::registry::Registry;

    #[tokio::test]
    async fn a_foreign_rule_at_our_priority_survives_resyncs() {
        let dp = Arc::new(FakeDataplane::new());
        let d = Daemon::new(
            Arc::new(Config::default()),
            dp.clone(),
            None,
            Registry::default(),
        );
        assert!(d.resync().await.ok());
        let foreign = Rule {
            family: crate::model::Family::V4,
            priority: 101,
            fwmark: Some((0x800, 0x800)),
            action: RuleAction::Lookup(200),
        };
        dp.kernel()
            .ns
            .get_mut(&Ns::Node)
            .expect("node ns")
            .foreign_rules
            .insert(foreign);
        let r = d.resync().await;
        assert!(r.ok() && r.applied.is_empty(), "{:?}", r.applied);
        assert!(dp.kernel().ns[&Ns::Node].foreign_rules.contains(&foreign));
        assert_eq!(d.dump().await["pending"], serde_json::json!([]));
    }
}

#[cfg(test)]
mod trace_tests {
    use super::StoredEvent;

    #[test]
    fn trace_events_keep_kind_and_message() {
        for (kind, msg) in [("add", "default/p 10.0.0.1"), ("", ""), ("kernel", "é ü")] {
            let e = StoredEvent::new(kind, msg).to_event();
            assert_eq!((e.kind.as_str(), e.message.as_str()), (kind, msg));
        }
        let long = "k".repeat(300);
        let e = StoredEvent::new(&long, "m").to_event();
        assert_eq!((e.kind.len(), e.message.as_str()), (0x7f, "m"));
    }
}
