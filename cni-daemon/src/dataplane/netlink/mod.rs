//! The real dataplane: rtnetlink, ipset over netlink, iptables-restore, /proc/sys.
//!
//! Every namespace we touch (the node's, each ztunnel's) gets one [`netns::NsWorker`]: a thread
//! that entered the namespace once, owns the rtnetlink connection created there and runs the
//! blocking work for it (sysctl files, `iptables-save`/`-restore`). Tokio workers never call
//! `setns`. Which kernel answers count as success is decided in one place, [`already_done`].

mod firewall;
mod fw_iptables;
mod ipset;
mod iptables;
mod link;
mod netconf;
mod netns;
mod nfnl;
mod nft;
mod route;
mod rule;
mod sysctl;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::dataplane::{Dataplane, DpError, DpResult};
use crate::model::{Family, Ns, Route, Rule, TunnelState, Tunnels};
use netlink_packet_route::RouteNetlinkMessage;

pub use firewall::FirewallKind;
pub use iptables::{save_all as iptables_save_all, IptablesBackend};
use netns::NsWorker;
pub use nft::detect::detect as detect_firewall;
pub(crate) use nft::listing as nft_listing;
// The attribute readers the kernel-event filter (`crate::events`) shares with the dumps.
pub(crate) use route::table_of as route_table_of;
pub(crate) use rule::{priority_of as rule_priority_of, protocol_of as rule_protocol_of};

use crate::config::{DEFAULT_ROUTE_PROTOCOL, IPSET_NAME, IPSET_NAME6};

/// How [`RealDataplane`] is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealConfig {
    /// The node's network namespace file; `None` = the netns of the thread calling
    /// [`RealDataplane::new`].
    pub node_netns: Option<PathBuf>,
    /// Protocol number on every route we create, and the filter for every route we list or
    /// delete (also set on our ip rules, for people reading `ip rule`).
    pub route_protocol: u8,
    /// Which firewall driver programs the pod sets and our chains.
    pub firewall: FirewallKind,
    /// Which iptables variant to drive (iptables firewall only).
    pub iptables_backend: IptablesBackend,
    /// Name of the ipset of enrolled pod IPs (node netns only).
    pub ipset_name: String,
    /// Name of the ipset of enrolled pod IPv6 addresses (family inet6, node netns only).
    pub ipset_name6: String,
}

impl Default for RealConfig {
    fn default() -> Self {
        RealConfig {
            node_netns: None,
            route_protocol: DEFAULT_ROUTE_PROTOCOL,
            firewall: FirewallKind::Iptables,
            iptables_backend: IptablesBackend::Auto,
            ipset_name: IPSET_NAME.to_string(),
            ipset_name6: IPSET_NAME6.to_string(),
        }
    }
}

impl RealConfig {
    /// The ipset name of a family.
    pub fn ipset_name_of(&self, f: Family) -> &str {
        match f {
            Family::V4 => &self.ipset_name,
            Family::V6 => &self.ipset_name6,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The errno mapping

/// What a kernel request was meant to achieve; decides which errors mean "already so".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Add/create: the object may already be there.
    Create,
    /// Delete/destroy: the object may already be gone.
    Remove,
    /// Look one object up: it may not exist.
    Find,
    /// Anything else: every error is an error.
    Other,
}

/// THE errno mapping. `code` is a positive errno (or an ipset error code ≥ 4096). True when that
/// answer means the goal of `intent` already holds: EEXIST on create; ENOENT, ESRCH, ENODEV,
/// EADDRNOTAVAIL (and ipset's "element not there") on remove; ENODEV/ENOENT on a lookup.
pub(crate) fn already_done(intent: Intent, code: i32) -> bool {
    match intent {
        Intent::Create => code == libc::EEXIST,
        Intent::Remove => {
            matches!(
                code,
                libc::ENOENT | libc::ESRCH | libc::ENODEV | libc::EADDRNOTAVAIL
            ) || code == ipset::IPSET_ERR_EXIST
        }
        Intent::Find => matches!(code, libc::ENODEV | libc::ENOENT),
        Intent::Other => false,
    }
}

/// The positive errno of a netlink error answer, if it is one.
pub(crate) fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => {
            m.code.map(|c| c.get().checked_neg().unwrap_or(i32::MAX))
        }
        _ => None,
    }
}

/// A [`DpError::Netlink`] naming what we were doing.
pub(crate) fn nl_error(what: impl Into<String>, e: &rtnetlink::Error) -> DpError {
    let msg = match errno_of(e) {
        Some(code) => ipset::describe_code(code),
        None => e.to_string(),
    };
    DpError::Netlink {
        what: what.into(),
        msg,
    }
}

/// Maps a netlink result through [`already_done`].
pub(crate) fn nl_check<T: Default>(
    intent: Intent,
    what: impl FnOnce() -> String,
    r: Result<T, rtnetlink::Error>,
) -> DpResult<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) if errno_of(&e).is_some_and(|c| already_done(intent, c)) => Ok(T::default()),
        Err(e) => Err(nl_error(what(), &e)),
    }
}

// ---------------------------------------------------------------------------------------------
// RealDataplane

/// The kernel-backed [`Dataplane`].
pub struct RealDataplane {
    cfg: RealConfig,
    rt: tokio::runtime::Handle,
    node: Arc<NsWorker>,
    /// Pod (ztunnel) namespace workers by path; each checked against the path's (dev, inode)
    /// whenever it is used, and dropped when the namespace is gone or was replaced: a worker
    /// holds its namespace alive, so it must not outlive the namespace's file.
    pods: Mutex<HashMap<PathBuf, Arc<NsWorker>>>,
    /// The firewall driver (iptables + ipset, or nftables), chosen by `cfg.firewall`.
    fw: firewall::FwDriver,
    /// The node netns's iptables variant (or `nftables`), for logs.
    backend_name: &'static str,
    /// Interface indexes in the node netns by name, for route requests: one netlink round trip
    /// less per pod. Emptied whenever links are read back (every full reconcile), created or
    /// deleted, and an entry is dropped and looked up again when the kernel says ENODEV.
    node_ifindex: Mutex<HashMap<String, u32>>,
    /// Netconf dumps in the node netns (None if it could not be opened: /proc/sys is used).
    netconf: Mutex<Option<netconf::NetconfSocket>>,
    /// Indexes of the interfaces whose rp_filter the resync reads, by name. An entry is used
    /// while the dump still lists its index; otherwise the name is looked up again.
    rp_ifindex: Mutex<HashMap<String, u32>>,
    /// The netns of the thread that made us (the daemon's own: only the workers ever call
    /// `setns`), read once: work for a worker of this netns runs in place, with no `stat` of
    /// `/proc/thread-self/ns/net` per call.
    home: Option<netns::NsId>,
}

/// A complete request for the raw node socket: an exclusive add (as `ip route add`) or a delete,
/// asking for an ACK; the sequence number is set when it is sent.
pub(crate) fn raw_request(m: RouteNetlinkMessage) -> Vec<u8> {
    use netlink_packet_core::{NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
    let flags = match &m {
        RouteNetlinkMessage::NewRoute(_) => NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
        _ => NLM_F_REQUEST | NLM_F_ACK,
    };
    let mut nl = NetlinkMessage::from(m);
    nl.header.flags = flags;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// From how many rp_filter keys on a resync one netconf dump (cost: all interfaces) beats
/// reading each key under /proc/sys.
const RP_FILTER_DUMP_MIN: usize = 32;

impl std::fmt::Debug for RealDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealDataplane")
            .field("cfg", &self.cfg)
            .field("backend", &self.backend_name)
            .finish()
    }
}

impl RealDataplane {
    /// Enters the node namespace on a worker thread, opens the rtnetlink and ipset sockets there
    /// and picks the iptables backend. Must run inside a tokio runtime (any flavour); blocks
    /// briefly (thread start, one `iptables-*-save` per variant for `Auto`).
    pub fn new(cfg: RealConfig) -> DpResult<Self> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| DpError::Netns {
            path: "node".into(),
            msg: format!("no tokio runtime: {e}"),
        })?;
        let path = cfg
            .node_netns
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/thread-self/ns/net"));
        let fd = netns::open_ns(&path)?;
        let node = Arc::new(NsWorker::spawn(path.display().to_string(), fd, rt.clone())?);
        let (fw, backend_name) = firewall::FwDriver::open(&cfg, &node)?;
        let netconf = match node.run_sync(netconf::NetconfSocket::open)? {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no netconf socket; rp_filter is read from /proc/sys");
                None
            }
        };
        let home = netns::ns_id_of_path(Path::new("/proc/thread-self/ns/net")).ok();
        Ok(RealDataplane {
            cfg,
            rt,
            node,
            pods: Mutex::new(HashMap::new()),
            fw,
            backend_name,
            node_ifindex: Mutex::new(HashMap::new()),
            netconf: Mutex::new(netconf),
            rp_ifindex: Mutex::new(HashMap::new()),
            home,
        })
    }

    /// The iptables variant used in the node netns (`legacy` or `nft`), for logs.
    pub fn backend(&self) -> &str {
        self.backend_name
    }

    /// The configuration in force.
    pub fn config(&self) -> &RealConfig {
        &self.cfg
    }

    /// Drops workers of pod namespaces whose file is gone or now names another namespace, so
    /// that we do not keep a dead ztunnel's namespace (and the veth peers in it) alive. Runs on
    /// every pod-namespace access too; call it from a periodic task to bound the lag.
    pub fn prune_netns_workers(&self) {
        let mut cache = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|path, w| {
            let keep = netns::ns_id_of_path(path).is_ok_and(|id| id == w.id());
            if !keep {
                tracing::info!(netns = %path.display(), "pod namespace gone or replaced; dropping its worker");
            }
            keep
        });
    }

    async fn worker(&self, ns: &Ns) -> DpResult<Arc<NsWorker>> {
        match ns {
            Ns::Node => Ok(Arc::clone(&self.node)),
            Ns::Pod(path) => self.pod_worker(path).await,
        }
    }

    async fn pod_worker(&self, path: &Path) -> DpResult<Arc<NsWorker>> {
        self.prune_netns_workers();
        if let Some(w) = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
        {
            return Ok(Arc::clone(w));
        }
        let fd = netns::open_ns(path)?;
        let rt = self.rt.clone();
        let label = path.display().to_string();
        let w = tokio::task::spawn_blocking(move || NsWorker::spawn(label, fd, rt))
            .await
            .map_err(|e| DpError::Netns {
                path: path.display().to_string(),
                msg: format!("worker start: {e}"),
            })??;
        let w = Arc::new(w);
        let mut cache = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        // A concurrent caller may have made one for the same namespace meanwhile: keep theirs.
        if let Some(existing) = cache.get(path) {
            if existing.id() == w.id() {
                return Ok(Arc::clone(existing));
            }
        }
        cache.insert(path.to_path_buf(), Arc::clone(&w));
        Ok(w)
    }

    /// Did we make this rule (it carries our protocol number)?
    fn is_ours(&self, m: &netlink_packet_route::rule::RuleMessage) -> bool {
        rule::protocol_of(m) == self.cfg.route_protocol
    }

    /// Is `w` the worker of the netns our own threads are in?
    fn at_home(&self, w: &NsWorker) -> bool {
        self.home == Some(w.id())
    }

    /// Runs `f` in place when `w`'s namespace is the one our threads are in (the daemon runs in
    /// the node netns, and only the workers ever change namespace), else on `w`'s thread. For
    /// /proc/sys, which resolves to the netns of the thread that opens it: no context switches.
    async fn in_ns<T, F>(&self, w: &NsWorker, f: F) -> DpResult<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self.at_home(w) {
            return Ok(f());
        }
        w.run(f).await
    }

    /// The node's rp_filter keys among `keys` from one netconf dump; `None` when a key is not an
    /// rp_filter key or the dump is not available (then /proc/sys is read).
    async fn rp_filters_by_dump(&self, keys: &[String]) -> DpResult<Option<Vec<Option<String>>>> {
        let names: Option<Vec<&str>> = keys
            .iter()
            .map(|k| {
                k.strip_prefix("net/ipv4/conf/")?
                    .strip_suffix("/rp_filter")
                    .filter(|n| !n.is_empty() && !n.contains('/'))
            })
            .collect();
        let Some(names) = names else {
            return Ok(None);
        };
        Ok(self
            .rp_filters_of(&names)
            .await?
            .map(|v| v.into_iter().map(|v| v.map(|v| v.to_string())).collect()))
    }

    /// The rp_filter of the named node interfaces from one netconf dump; `None` when the dump is
    /// not available.
    async fn rp_filters_of(&self, names: &[&str]) -> DpResult<Option<Vec<Option<i32>>>> {
        if names.iter().any(|n| n.is_empty() || n.contains('/')) {
            return Ok(None);
        }
        let dumped = {
            let mut g = self.netconf.lock().unwrap_or_else(|p| p.into_inner());
            match g.as_mut() {
                Some(s) => s.rp_filters(),
                None => return Ok(None),
            }
        };
        let values = match dumped {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "netconf dump failed; reading rp_filter from /proc/sys");
                return Ok(None);
            }
        };
        let mut cache =
            std::mem::take(&mut *self.rp_ifindex.lock().unwrap_or_else(|p| p.into_inner()));
        let unknown: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !cache.get(*n).is_some_and(|i| values.contains_key(i)))
            .collect();
        // Looked up many at a time on the node's rtnetlink connection (all of them once, after a
        // start; then the pods added since the last resync).
        for chunk in unknown.chunks(256) {
            let h = self.node.handle();
            let found = futures::future::join_all(chunk.iter().map(|n| link::index_of(h, n))).await;
            for (n, r) in chunk.iter().zip(found) {
                match r.map_err(|e| nl_error(format!("get link {n} in node"), &e))? {
                    Some(i) => {
                        cache.insert((*n).to_string(), i);
                    }
                    None => {
                        cache.remove(*n);
                    }
                }
            }
        }
        let out = names
            .iter()
            .map(|n| cache.get(*n).and_then(|i| values.get(i)).copied())
            .collect();
        // Forget the interfaces no longer asked about (pods gone since): only when there are
        // some, as the set of names costs as much as the cache.
        if cache.len() > names.len() {
            let asked: std::collections::HashSet<&str> = names.iter().copied().collect();
            cache.retain(|n, _| asked.contains(n.as_str()));
        }
        *self.rp_ifindex.lock().unwrap_or_else(|p| p.into_inner()) = cache;
        Ok(Some(out))
    }

    /// One route add (NewRoute, exclusive) or delete (DelRoute): the kernel's answer, 0 or a
    /// positive errno. In the node netns on the raw socket, synchronously: a pod ADD or DEL then
    /// costs no trip through the rtnetlink connection task and the wake-ups between threads it
    /// takes. Elsewhere, or if that socket fails, through rtnetlink.
    async fn route_request(
        &self,
        ns: &Ns,
        h: &rtnetlink::Handle,
        m: RouteNetlinkMessage,
    ) -> Result<i32, rtnetlink::Error> {
        if matches!(ns, Ns::Node) {
            let mut buf = [raw_request(m.clone())];
            let answer = {
                let mut g = self.netconf.lock().unwrap_or_else(|p| p.into_inner());
                g.as_mut().map(|s| s.acked_batch(&mut buf))
            };
            if let Some(Ok(codes)) = answer {
                if let Some(c) = codes.first() {
                    return Ok(*c);
                }
            }
        }
        let res = match m {
            RouteNetlinkMessage::NewRoute(m) => route::add_excl(h, m).await,
            RouteNetlinkMessage::DelRoute(m) => route::del(h, m).await,
            _ => Ok(()),
        };
        match res {
            Ok(()) => Ok(0),
            Err(e) => match errno_of(&e) {
                Some(c) => Ok(c),
                None => Err(e),
            },
        }
    }

    /// Route adds of `routes` as one raw batch on the node's netconf socket, then the careful path
    /// for those the kernel refused. None when that socket is not available.
    async fn route_add_raw(
        &self,
        ns: &Ns,
        w: &NsWorker,
        routes: &[Route],
    ) -> Option<Vec<DpResult<()>>> {
        // Index in `routes` of each message sent; routes whose link is unknown are not sent.
        let (mut msgs, mut sent) = (
            Vec::with_capacity(routes.len()),
            Vec::with_capacity(routes.len()),
        );
        for (i, r) in routes.iter().enumerate() {
            let oif = match &r.dev {
                Some(dev) => match self.ifindex(ns, w, dev).await {
                    Ok(Some(idx)) => Some(idx),
                    _ => continue,
                },
                None => None,
            };
            msgs.push(route::raw_add_request(r, oif, self.cfg.route_protocol));
            sent.push(i);
        }
        let codes = {
            let mut g = self.netconf.lock().unwrap_or_else(|p| p.into_inner());
            g.as_mut()?.acked_batch(&mut msgs)
        };
        let codes = match codes {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "route batch failed; adding one by one");
                Vec::new()
            }
        };
        let mut done = vec![false; routes.len()];
        for (i, code) in sent.into_iter().zip(codes) {
            if let (0, Some(d)) = (code, done.get_mut(i)) {
                *d = true;
            }
        }
        let mut out = Vec::with_capacity(routes.len());
        for (r, ok) in routes.iter().zip(done) {
            out.push(if ok {
                Ok(())
            } else {
                self.route_replace(ns, r).await
            });
        }
        Some(out)
    }

    /// [`Self::routes_dump_raw`] with the names of the interfaces the routes use (a few: the
    /// tunnels and the ztunnel's veth), looked up once each.
    #[allow(clippy::type_complexity)]
    async fn node_routes_raw(
        &self,
        families: &[Family],
        tables: &[u32],
    ) -> DpResult<Option<(Vec<route::RawRoute>, BTreeMap<u32, String>)>> {
        let Some(raw) = self.routes_dump_raw(families, tables) else {
            return Ok(None);
        };
        let h = self.node.handle();
        let mut names = BTreeMap::new();
        let mut oifs: Vec<u32> = raw.iter().filter_map(|r| r.oif).collect();
        oifs.sort_unstable();
        oifs.dedup();
        for idx in oifs {
            if let Some(l) = link::get_by_index(h, idx)
                .await
                .map_err(|e| nl_error(format!("get link {idx} in node"), &e))?
            {
                if let Some(n) = link::name_of(&l) {
                    names.insert(idx, n);
                }
            }
        }
        Ok(Some((raw, names)))
    }

    /// Our routes of `tables` in the node netns from raw dumps on the node's netconf socket,
    /// decoded straight from the datagrams (see [`route::decode_raw`]); `None` when that socket is
    /// not available or a dump fails (then rtnetlink is used).
    fn routes_dump_raw(&self, families: &[Family], tables: &[u32]) -> Option<Vec<route::RawRoute>> {
        let proto = self.cfg.route_protocol;
        let mut g = self.netconf.lock().unwrap_or_else(|p| p.into_inner());
        let sock = g.as_mut()?;
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for (f, t) in pairs(families, tables) {
            if seen.contains(&(f, t)) {
                continue;
            }
            seen.push((f, t));
            let mut req = route::raw_dump_request(f, t, proto);
            let r = sock.dump(&mut req, |ty, body| {
                if let Some(r) = route::decode_raw(ty, body, t, proto) {
                    out.push(r);
                }
            });
            match r {
                Ok(()) => {}
                // A table nothing was ever put in does not exist: it holds no routes of ours.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    tracing::warn!(error = %e, table = t, "raw route dump failed; using rtnetlink");
                    return None;
                }
            }
        }
        Some(out)
    }

    fn forget_ifindexes(&self) {
        self.node_ifindex
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The index of link `dev` in `ns` (cached for the node netns).
    async fn ifindex(
        &self,
        ns: &Ns,
        w: &NsWorker,
        dev: &str,
    ) -> Result<Option<u32>, rtnetlink::Error> {
        let cache = matches!(ns, Ns::Node);
        if cache {
            let c = self.node_ifindex.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = c.get(dev) {
                return Ok(Some(*i));
            }
        }
        // SIOCGIFINDEX on this thread: a pod ADD's new host veth costs one ioctl, not a trip
        // through the rtnetlink connection task. An absent link is None, as below; any other
        // failure (no socket to ask with) goes the netlink way.
        let quick = (cache && self.at_home(w)).then(|| nix::net::if_::if_nametoindex(dev));
        let idx = match quick {
            Some(Ok(i)) => Some(i),
            Some(Err(nix::errno::Errno::ENODEV)) => None,
            _ => link::index_of(w.handle(), dev).await?,
        };
        if let (true, Some(i)) = (cache, idx) {
            self.node_ifindex
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(dev.to_string(), i);
        }
        Ok(idx)
    }
}

/// Every (family, table) pair, families first.
fn pairs(families: &[Family], tables: &[u32]) -> Vec<(Family, u32)> {
    let mut v = Vec::with_capacity(families.len() * tables.len());
    for f in families {
        for t in tables {
            v.push((*f, *t));
        }
    }
    v
}

fn pod_path(ns: &Ns) -> DpResult<&Path> {
    match ns {
        Ns::Pod(p) => Ok(p),
        Ns::Node => Err(DpError::Netns {
            path: "node".into(),
            msg: "the ztunnel namespace must be a pod namespace".into(),
        }),
    }
}

impl Dataplane for RealDataplane {
    async fn rules_list(
        &self,
        ns: &Ns,
        families: &[Family],
        priorities: &[u32],
    ) -> DpResult<Vec<Rule>> {
        let w = self.worker(ns).await?;
        let mut out = Vec::new();
        for f in families {
            let msgs = rule::dump(w.handle(), *f)
                .await
                .map_err(|e| nl_error(format!("list {f} rules in {ns}"), &e))?;
            out.extend(
                msgs.iter()
                    .filter(|m| self.is_ours(m) && priorities.contains(&rule::priority_of(m)))
                    .filter_map(rule::decode),
            );
        }
        Ok(out)
    }

    async fn rule_add(&self, ns: &Ns, r: &Rule) -> DpResult<()> {
        let w = self.worker(ns).await?;
        let have = rule::dump(w.handle(), r.family)
            .await
            .map_err(|e| nl_error(format!("list {} rules in {ns}", r.family), &e))?;
        let ours = have.iter().filter(|m| self.is_ours(m));
        if ours.filter_map(rule::decode).any(|h| h == *r) {
            return Ok(());
        }
        let res = rule::add(w.handle(), r, self.cfg.route_protocol).await;
        nl_check(Intent::Create, || format!("add rule `{r}` in {ns}"), res)
    }

    async fn rule_del(&self, ns: &Ns, r: &Rule) -> DpResult<()> {
        let w = self.worker(ns).await?;
        let have = rule::dump(w.handle(), r.family)
            .await
            .map_err(|e| nl_error(format!("list {} rules in {ns}", r.family), &e))?;
        // Send back the kernel's own message of every matching rule, so that the kernel can
        // only match that rule and never a foreign one with extra selectors.
        for m in have
            .into_iter()
            .filter(|m| self.is_ours(m) && rule::decode(m).as_ref() == Some(r))
        {
            let res = rule::del(w.handle(), m).await;
            nl_check(Intent::Remove, || format!("delete rule `{r}` in {ns}"), res)?;
        }
        Ok(())
    }

    async fn routes_list(
        &self,
        ns: &Ns,
        families: &[Family],
        tables: &[u32],
    ) -> DpResult<Vec<Route>> {
        let w = self.worker(ns).await?;
        let h = w.handle();
        if matches!(ns, Ns::Node) {
            if let Some((raw, names)) = self.node_routes_raw(families, tables).await? {
                return Ok(raw.into_iter().map(|r| r.to_route(&names)).collect());
            }
        }
        let mut msgs = Vec::new();
        let mut seen = Vec::new();
        for (f, t) in pairs(families, tables) {
            if seen.contains(&(f, t)) {
                continue;
            }
            seen.push((f, t));
            let part = route::dump(h, f, Some(t), Some(self.cfg.route_protocol))
                .await
                .map_err(|e| nl_error(format!("list {f} routes of table {t} in {ns}"), &e))?;
            msgs.extend(part);
        }
        let mut names = BTreeMap::new();
        for idx in route::oifs(&msgs) {
            if let Some(l) = link::get_by_index(h, idx)
                .await
                .map_err(|e| nl_error(format!("get link {idx} in {ns}"), &e))?
            {
                if let Some(n) = link::name_of(&l) {
                    names.insert(idx, n);
                }
            }
        }
        Ok(msgs
            .iter()
            .filter_map(|m| route::decode(m, &names))
            .collect())
    }

    async fn routes_visit<F: FnMut(&Route) + Send>(
        &self,
        ns: &Ns,
        families: &[Family],
        tables: &[u32],
        mut f: F,
    ) -> DpResult<()> {
        if matches!(ns, Ns::Node) {
            if let Some((raw, names)) = self.node_routes_raw(families, tables).await? {
                for r in raw {
                    f(&r.to_route(&names));
                }
                return Ok(());
            }
        }
        for r in self.routes_list(ns, families, tables).await? {
            f(&r);
        }
        Ok(())
    }

    async fn route_replace(&self, ns: &Ns, r: &Route) -> DpResult<()> {
        let w = self.worker(ns).await?;
        let h = w.handle();
        let what = || format!("replace route `{r}` in {ns}");
        let mut msg = None;
        // Twice at most: a cached index of a link that was since replaced gives ENODEV once.
        for attempt in 0..2 {
            let oif = match &r.dev {
                Some(dev) => Some(
                    self.ifindex(ns, &w, dev)
                        .await
                        .map_err(|e| nl_error(what(), &e))?
                        .ok_or_else(|| DpError::NoSuchLink(format!("{dev} (in {ns})")))?,
                ),
                None => None,
            };
            let m = route::build(r, oif, self.cfg.route_protocol);
            // Plain add first: it cannot disturb anything. Only when a route with this key exists
            // do we look at it, and replace it only if it is ours.
            let code = self
                .route_request(ns, h, RouteNetlinkMessage::NewRoute(m.clone()))
                .await
                .map_err(|e| nl_error(what(), &e))?;
            match code {
                0 => return Ok(()),
                libc::EEXIST => {
                    msg = Some(m);
                    break;
                }
                libc::ENODEV if attempt == 0 && r.dev.is_some() => self.forget_ifindexes(),
                // An IPv6 route on a loopback that is down (a ztunnel netns whose runtime left
                // `lo` down) is refused with ENETDOWN; IPv4 takes it. Our local routes need `lo`
                // up, and ztunnel's listeners on ::1/127.0.0.1 too: bring it up, once.
                libc::ENETDOWN if attempt == 0 && r.dev.as_deref() == Some("lo") => {
                    let idx = oif.unwrap_or(1);
                    tracing::info!(%ns, route = %r, "lo is down in {ns}: bringing it up for our local route");
                    link::set_up(h, idx).await.map_err(|e| {
                        nl_error(format!("{} (bringing lo up in {ns})", what()), &e)
                    })?;
                }
                libc::ENETDOWN => {
                    return Err(DpError::Netlink {
                        what: what(),
                        msg: format!(
                            "{} (is the route's interface down in {ns}?)",
                            ipset::describe_code(libc::ENETDOWN)
                        ),
                    })
                }
                code => {
                    return Err(DpError::Netlink {
                        what: what(),
                        msg: ipset::describe_code(code),
                    })
                }
            }
        }
        let Some(msg) = msg else {
            return Err(DpError::Netlink {
                what: what(),
                msg: "link vanished twice".into(),
            });
        };
        let same_key = route::dump(h, r.key.dst.family(), Some(r.key.table), None)
            .await
            .map_err(|e| nl_error(what(), &e))?
            .into_iter()
            .filter(|m| route::key_of(m) == Some(r.key))
            .collect::<Vec<_>>();
        if let Some(foreign) = same_key
            .iter()
            .find(|m| u8::from(m.header.protocol) != self.cfg.route_protocol)
        {
            tracing::warn!(route = %r, %ns, protocol = u8::from(foreign.header.protocol), "foreign route holds our key");
            return Err(DpError::Netlink {
                what: what(),
                msg: format!(
                    "a route with the same table, prefix and metric exists with protocol {} (not ours: {}); not replacing it",
                    u8::from(foreign.header.protocol),
                    self.cfg.route_protocol
                ),
            });
        }
        route::replace(h, msg)
            .await
            .map_err(|e| nl_error(what(), &e))
    }

    async fn route_replace_many(&self, ns: &Ns, routes: &[Route]) -> Vec<DpResult<()>> {
        // Plain adds, many per request batch; the few that meet an existing route (EEXIST) or a
        // replaced link (ENODEV) take the careful one-by-one path of `route_replace`. In the node
        // netns the batch goes out raw (128 adds a `send`, ~2x faster than through rtnetlink's
        // per-request futures at 10,000 routes); elsewhere as concurrent rtnetlink requests.
        const IN_FLIGHT: usize = 128;
        let w = match self.worker(ns).await {
            Ok(w) => w,
            Err(e) => return routes.iter().map(|_| Err(e.clone())).collect(),
        };
        if matches!(ns, Ns::Node) {
            if let Some(out) = self.route_add_raw(ns, &w, routes).await {
                return out;
            }
        }
        let mut out = Vec::with_capacity(routes.len());
        for chunk in routes.chunks(IN_FLIGHT) {
            let mut sent = Vec::with_capacity(chunk.len());
            for r in chunk {
                let oif = match &r.dev {
                    Some(dev) => match self.ifindex(ns, &w, dev).await {
                        Ok(Some(i)) => Some(i),
                        _ => {
                            sent.push(None);
                            continue;
                        }
                    },
                    None => None,
                };
                sent.push(Some(route::add_excl(
                    w.handle(),
                    route::build(r, oif, self.cfg.route_protocol),
                )));
            }
            // One answer per route, aligned with `chunk` (None: its link was not found).
            let adds = futures::future::join_all(sent.into_iter().map(|f| async move {
                match f {
                    Some(f) => Some(f.await),
                    None => None,
                }
            }))
            .await;
            for (r, quick) in chunk.iter().zip(adds) {
                let res = match quick {
                    Some(Ok(())) => Ok(()),
                    // EEXIST, ENODEV, an unknown link, or anything else: decide one by one.
                    _ => self.route_replace(ns, r).await,
                };
                out.push(res);
            }
        }
        out
    }

    async fn route_del(&self, ns: &Ns, r: &Route) -> DpResult<()> {
        let w = self.worker(ns).await?;
        let key = &r.key;
        let what = || format!("delete route {r} in {ns}");
        // Matched by table, prefix, our protocol and the route's type; the metric too when it is
        // not 0 (the kernel reads 0 as "any metric"). Our metric-0 routes are unicast or local,
        // their fallbacks unreachable with a non-zero metric, so the type tells them apart and no
        // dump is needed: the cost is one request, whatever the size of the table.
        let req = route::del_request(key, r.kind, self.cfg.route_protocol);
        let code = self
            .route_request(ns, w.handle(), RouteNetlinkMessage::DelRoute(req))
            .await
            .map_err(|e| nl_error(what(), &e))?;
        if code == 0 || already_done(Intent::Remove, code) {
            Ok(())
        } else {
            Err(DpError::Netlink {
                what: what(),
                msg: ipset::describe_code(code),
            })
        }
    }

    async fn tunnels_read(&self, want: &Tunnels) -> DpResult<TunnelState> {
        self.forget_ifindexes();
        let path = pod_path(&want.ztunnel_ns)?;
        let pod = if self.netns_alive(path) {
            Some(self.pod_worker(path).await?)
        } else {
            None
        };
        link::tunnels_read(&self.node, pod.as_deref(), want).await
    }

    async fn tunnel_create(&self, want: &Tunnels, node_name: &str) -> DpResult<()> {
        self.forget_ifindexes();
        let path = pod_path(&want.ztunnel_ns)?;
        let pod = self.pod_worker(path).await?;
        link::tunnel_create(&self.node, &pod, want, node_name).await
    }

    async fn link_del(&self, name: &str) -> DpResult<()> {
        self.forget_ifindexes();
        link::delete_by_name(self.node.handle(), name, "node").await
    }

    async fn tunnel_links_present(&self, names: &[String]) -> DpResult<Vec<String>> {
        self.forget_ifindexes();
        // One lookup per name, not a dump of every link: a node has a veth per pod, and decoding
        // 10,000 full link messages each resync cost ~100 ms and left the daemon's RSS at
        // ~330 MB (measured by acni-bench).
        let mut present = Vec::new();
        for n in names {
            let l = link::get_by_name(self.node.handle(), n)
                .await
                .map_err(|e| nl_error(format!("get link {n} in node"), &e))?;
            if l.is_some() {
                present.push(n.clone());
            }
        }
        Ok(present)
    }

    async fn sysctl_read(&self, ns: &Ns, key: &str) -> DpResult<Option<String>> {
        let w = self.worker(ns).await?;
        let k = key.to_string();
        self.in_ns(&w, move || sysctl::read(&k)).await?
    }

    async fn sysctl_read_many(&self, ns: &Ns, keys: &[String]) -> DpResult<Vec<Option<String>>> {
        if matches!(ns, Ns::Node) && keys.len() >= RP_FILTER_DUMP_MIN {
            if let Some(values) = self.rp_filters_by_dump(keys).await? {
                return Ok(values);
            }
        }
        let w = self.worker(ns).await?;
        let keys = keys.to_vec();
        self.in_ns(&w, move || sysctl::read_many(&keys)).await?
    }

    async fn rp_filter_read_many(&self, ifnames: &[&str]) -> DpResult<Vec<Option<i32>>> {
        if ifnames.len() >= RP_FILTER_DUMP_MIN {
            if let Some(values) = self.rp_filters_of(ifnames).await? {
                return Ok(values);
            }
        }
        crate::dataplane::rp_filter_by_sysctl(self, ifnames).await
    }

    async fn sysctl_write(&self, ns: &Ns, key: &str, value: &str) -> DpResult<()> {
        let w = self.worker(ns).await?;
        let (k, v) = (key.to_string(), value.to_string());
        self.in_ns(&w, move || sysctl::write(&k, &v)).await?
    }

    async fn route_dev_lookup(&self, ip: IpAddr) -> DpResult<Option<String>> {
        let h = self.node.handle();
        let main = u32::from(netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN);
        let msgs = route::dump(h, Family::of(ip), Some(main), None)
            .await
            .map_err(|e| nl_error(format!("look up route to {ip}"), &e))?;
        let Some(idx) = route::lpm_main(&msgs, ip) else {
            return Ok(None);
        };
        let l = link::get_by_index(h, idx)
            .await
            .map_err(|e| nl_error(format!("get link {idx}"), &e))?;
        Ok(l.as_ref().and_then(link::name_of))
    }

    async fn main_route_lookup(&self, ip: IpAddr) -> DpResult<Option<Route>> {
        // The main table of the address's family: an IPv6 pod's host route (ptp's
        // `fd00::5 dev vethX`, the bridge's `fd00::/64 dev cni0`) is in the IPv6 one.
        let h = self.node.handle();
        let main = u32::from(netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN);
        let msgs = route::dump(h, Family::of(ip), Some(main), None)
            .await
            .map_err(|e| nl_error(format!("look up the main route to {ip}"), &e))?;
        let Some(m) = route::lpm_main_msg(&msgs, ip) else {
            return Ok(None);
        };
        let mut names = BTreeMap::new();
        for idx in route::oifs(std::slice::from_ref(m)) {
            if let Some(l) = link::get_by_index(h, idx)
                .await
                .map_err(|e| nl_error(format!("get link {idx}"), &e))?
            {
                if let Some(n) = link::name_of(&l) {
                    names.insert(idx, n);
                }
            }
        }
        Ok(route::decode(m, &names))
    }

    fn netns_alive(&self, path: &Path) -> bool {
        let alive = netns::is_netns(path);
        if !alive {
            let mut cache = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            cache.remove(path);
        }
        alive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert!(already_done(Intent::Create, libc::EEXIST));
        assert!(!already_done(Intent::Create, libc::ENOENT));
        for e in [
            libc::ENOENT,
            libc::ESRCH,
            libc::ENODEV,
            libc::EADDRNOTAVAIL,
            ipset::IPSET_ERR_EXIST,
        ] {
            assert!(already_done(Intent::Remove, e), "{e}");
        }
        assert!(!already_done(Intent::Remove, libc::EPERM));
        assert!(!already_done(Intent::Remove, libc::EEXIST));
        assert!(already_done(Intent::Find, libc::ENODEV));
        assert!(!already_done(Intent::Other, libc::EEXIST));
    }

    #[test]
    fn config_defaults() {
        let c = RealConfig::default();
        assert_eq!(c.route_protocol, 212);
        assert_eq!(c.ipset_name, "ztunnel-pods-ips");
        assert_eq!(c.iptables_backend, IptablesBackend::Auto);
        assert_eq!(c.node_netns, None);
    }
}
