//! Repair on kernel events: rtnetlink notifications about our links, addresses, rules and routes,
//! in every network namespace we program (the node's and the ztunnel's), start a full reconcile
//! within milliseconds instead of at the next periodic resync. The periodic resync stays for what
//! sends no events (ipset, iptables, sysctls).
//!
//! One socket per namespace, subscribed to the LINK, IPV4/IPV6 IFADDR, ROUTE and RULE groups. A
//! netlink socket belongs for life to the netns it was created in, so the ztunnel's is created on
//! a short-lived thread that entered that netns (the daemon's runtime thread never changes netns),
//! and is replaced when the ztunnel changes. Notifications are filtered to ours ([`Filter`]: our
//! route protocol or tables, our rule priorities, our link names) and coalesced: the first one
//! arms a short debounce, a repair runs once the burst is quiet (or at the latest [`MAX_WAIT`]
//! after its first event), and after a repair the next waits at least as long as that repair
//! took, so a storm of 10,000 route deletes costs a few full reconciles and the daemon spends at
//! most about half its time on them: CNI calls keep being served in between.
//!
//! Not every deletion of ours is drift: a pod DEL removes its own table-100 route. Such a route
//! delete asks the daemon first ([`Daemon::wants_route_to`]) and repairs only a wanted route.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::{tables, Config};
use crate::daemon::Daemon;
use crate::dataplane::netlink::{route_table_of, rule_priority_of, rule_protocol_of};
use crate::dataplane::Dataplane;
use crate::reconcile::desired::{NODE_RULE_PRIORITIES, NODE_TABLES, ZT_RULE_PRIORITIES, ZT_TABLES};

/// rtnetlink multicast groups (linux/rtnetlink.h `RTNLGRP_*`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;
const GROUPS: [u32; 7] = [
    RTNLGRP_LINK,
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV4_RULE,
    RTNLGRP_IPV6_IFADDR,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_IPV6_RULE,
];

/// A burst is over when no event came for this long.
pub const QUIET: Duration = Duration::from_millis(5);
/// A repair starts at the latest this long after the first event of a burst.
pub const MAX_WAIT: Duration = Duration::from_millis(25);
/// The least time between the end of one event repair and the start of the next.
pub const MIN_GAP: Duration = Duration::from_millis(10);
/// How often the watcher checks whether the ztunnel (and so its netns) changed.
const FOLLOW_ZTUNNEL: Duration = Duration::from_millis(500);
/// Receive buffer of a notification socket: a storm beyond it is an overflow (ENOBUFS), which
/// itself triggers a repair.
const RCVBUF: usize = 8 << 20;

/// Which of our objects live in one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Our route (and rule) protocol number.
    pub protocol: u8,
    /// Our routing tables there.
    pub tables: Vec<u32>,
    /// Our rule priorities there.
    pub priorities: Vec<u32>,
    /// Our link names there.
    pub links: Vec<String>,
    /// The table whose /32 (/128) routes are the pods' own: a delete there asks the daemon
    /// whether the route is still wanted.
    pub pod_table: Option<u32>,
}

impl Interest {
    /// The node namespace: tables 100-102, rules 100-103, the node ends of the tunnels.
    pub fn node(cfg: &Config) -> Interest {
        Interest {
            protocol: cfg.route_protocol,
            tables: NODE_TABLES.to_vec(),
            priorities: NODE_RULE_PRIORITIES.to_vec(),
            links: cfg.tunnel_names(),
            pod_table: Some(tables::INBOUND),
        }
    }

    /// The ztunnel's namespace: its table 100, rules 20000/20003, the tunnels' ztunnel ends.
    pub fn ztunnel(cfg: &Config) -> Interest {
        Interest {
            protocol: cfg.route_protocol,
            tables: ZT_TABLES.to_vec(),
            priorities: ZT_RULE_PRIORITIES.to_vec(),
            links: vec![cfg.inbound.2.clone(), cfg.outbound.2.clone()],
            pod_table: None,
        }
    }
}

/// What one notification means for us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not about our objects (or our own additions): nothing to do.
    Ignore,
    /// One of our objects went away or was changed from outside: repair.
    Repair(&'static str),
    /// A /32 (/128) route of ours in the pods' table went away: repair if the daemon still
    /// wants a route to this address.
    PodRoute(IpAddr),
}

/// Classifies notifications for one namespace; remembers the interface indexes of our links
/// (addresses and renames are reported by index).
#[derive(Debug)]
pub struct Filter {
    interest: Interest,
    our_links: HashSet<u32>,
}

fn route_dst(m: &RouteMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

impl Filter {
    /// A filter for `interest`, knowing the indexes of our links that exist now.
    pub fn new(interest: Interest, our_links: impl IntoIterator<Item = u32>) -> Filter {
        Filter {
            interest,
            our_links: our_links.into_iter().collect(),
        }
    }

    /// What `msg` means for us. Our own additions (routes and rules of our protocol appearing,
    /// our links coming up) need nothing; deletions of ours, changes of our links and foreign
    /// routes in our tables do.
    pub fn classify(&mut self, msg: &RouteNetlinkMessage) -> Verdict {
        let i = &self.interest;
        match msg {
            RouteNetlinkMessage::DelRoute(m) => {
                let ours = u8::from(m.header.protocol) == i.protocol;
                let table = route_table_of(m);
                if !ours && !i.tables.contains(&table) {
                    return Verdict::Ignore;
                }
                let host = matches!(
                    (route_dst(m), m.header.destination_prefix_length),
                    (Some(IpAddr::V4(_)), 32) | (Some(IpAddr::V6(_)), 128)
                );
                match (i.pod_table == Some(table) && host, route_dst(m)) {
                    (true, Some(ip)) => Verdict::PodRoute(ip),
                    _ => Verdict::Repair("route"),
                }
            }
            RouteNetlinkMessage::NewRoute(m) => {
                // A route of ours appearing is our own doing; another protocol's route in one of
                // our tables may have replaced ours.
                if u8::from(m.header.protocol) != i.protocol
                    && i.tables.contains(&route_table_of(m))
                {
                    Verdict::Repair("route")
                } else {
                    Verdict::Ignore
                }
            }
            RouteNetlinkMessage::DelRule(m) => {
                if rule_protocol_of(m) == i.protocol || i.priorities.contains(&rule_priority_of(m))
                {
                    Verdict::Repair("rule")
                } else {
                    Verdict::Ignore
                }
            }
            RouteNetlinkMessage::NewLink(m) => {
                let index = m.header.index;
                match link_name(m) {
                    Some(n) if i.links.iter().any(|l| l == n) => {
                        self.our_links.insert(index);
                        if m.header.flags.contains(LinkFlags::Up) {
                            Verdict::Ignore
                        } else {
                            Verdict::Repair("link")
                        }
                    }
                    // One of ours renamed.
                    Some(_) if self.our_links.remove(&index) => Verdict::Repair("link"),
                    _ => Verdict::Ignore,
                }
            }
            RouteNetlinkMessage::DelLink(m) => {
                let named = link_name(m).is_some_and(|n| i.links.iter().any(|l| l == n));
                if self.our_links.remove(&m.header.index) || named {
                    Verdict::Repair("link")
                } else {
                    Verdict::Ignore
                }
            }
            RouteNetlinkMessage::DelAddress(m) => {
                let labelled = m.attributes.iter().any(
                    |a| matches!(a, AddressAttribute::Label(l) if i.links.iter().any(|n| n == l)),
                );
                if labelled || self.our_links.contains(&m.header.index) {
                    Verdict::Repair("address")
                } else {
                    Verdict::Ignore
                }
            }
            _ => Verdict::Ignore,
        }
    }
}

/// Decodes every netlink message in one datagram.
pub fn decode_all(mut buf: &[u8]) -> Vec<RouteNetlinkMessage> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = match NetlinkBuffer::new_checked(buf) {
            Ok(b) => b.length() as usize,
            Err(_) => break,
        };
        let Some(one) = buf.get(..len) else { break };
        if let Ok(NetlinkMessage {
            payload: NetlinkPayload::InnerMessage(m),
            ..
        }) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(one)
        {
            out.push(m);
        }
        let next = (len + 3) & !3;
        if len == 0 || next > buf.len() {
            break;
        }
        buf = &buf[next..];
    }
    out
}

/// A subscribed notification socket (non-blocking) and the indexes of our links that existed
/// when it was made.
fn subscribe_here(links: &[String]) -> io::Result<(Socket, Vec<u32>)> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    for g in GROUPS {
        sock.add_membership(g)?;
    }
    // Root may exceed rmem_max (SO_RCVBUFFORCE); otherwise take what the limit allows.
    if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF).is_err()
    {
        let _ = sock.set_rx_buf_sz(RCVBUF);
    }
    sock.set_non_blocking(true)?;
    let indexes = links
        .iter()
        .filter_map(|n| nix::net::if_::if_nametoindex(n.as_str()).ok())
        .collect();
    Ok((sock, indexes))
}

/// [`subscribe_here`] in the netns of `path` (None: the calling thread's), on a thread that
/// enters it and ends: the socket stays in that netns.
fn subscribe(netns: Option<&Path>, links: &[String]) -> io::Result<(Socket, Vec<u32>)> {
    let Some(path) = netns else {
        return subscribe_here(links);
    };
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            subscribe_here(links)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("subscriber thread panicked")))
    })
}

/// What woke the debouncer, shared by the watchers.
struct Trigger {
    notify: Notify,
}

/// Reads one namespace's notifications until the socket fails; notifies `trigger` for each
/// batch holding something to repair.
async fn watch<D: Dataplane>(
    daemon: Arc<Daemon<D>>,
    sock: Socket,
    mut filter: Filter,
    label: &'static str,
    trigger: Arc<Trigger>,
) {
    // SAFETY: the socket owns its descriptor, closes it only when dropped (with the AsyncFd
    // that owns it), and `as_raw_fd` always returns that same descriptor.
    let registered =
        unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) };
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(netns = label, error = %e, "kernel events: cannot watch the socket");
            return;
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut pod_routes: Vec<IpAddr> = Vec::new();
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                warn!(netns = label, error = %e, "kernel events: socket failed");
                return;
            }
        };
        let mut repair: Option<&'static str> = None;
        pod_routes.clear();
        // Drain what is there, in bounded batches (one wake-up reads at most 1,024 datagrams,
        // then yields to the CNI calls).
        for _ in 0..1024 {
            buf.clear();
            match fd.get_ref().recv(&mut buf, 0) {
                Ok(0) => break,
                Ok(_) => {
                    for m in decode_all(&buf) {
                        match filter.classify(&m) {
                            Verdict::Ignore => {}
                            Verdict::Repair(what) => {
                                repair.get_or_insert(what);
                            }
                            Verdict::PodRoute(ip) => pod_routes.push(ip),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Events were lost: whatever they were, a full reconcile covers them.
                    daemon.metrics().event_overflow(label);
                    repair.get_or_insert("overflow");
                }
                Err(e) => {
                    warn!(netns = label, error = %e, "kernel events: receive failed");
                    return;
                }
            }
        }
        drop(guard);
        if repair.is_none() && !pod_routes.is_empty() && daemon.wants_route_to(&pod_routes).await {
            repair = Some("route");
        }
        if let Some(what) = repair {
            debug!(netns = label, what, "kernel event: repair");
            daemon.metrics().kernel_event(label);
            trigger.notify.notify_one();
        }
        tokio::task::yield_now().await;
    }
}

/// A watcher task on one namespace.
struct Watcher {
    netns: Option<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start<D: Dataplane>(
    daemon: &Arc<Daemon<D>>,
    netns: Option<String>,
    interest: Interest,
    label: &'static str,
    trigger: &Arc<Trigger>,
) -> io::Result<Watcher> {
    let links = interest.links.clone();
    let path = netns.clone().map(PathBuf::from);
    let (sock, indexes) = tokio::task::spawn_blocking(move || subscribe(path.as_deref(), &links))
        .await
        .map_err(|e| io::Error::other(format!("subscriber task: {e}")))??;
    debug!(
        netns = label,
        fd = sock.as_raw_fd(),
        "kernel events: subscribed"
    );
    let task = tokio::spawn(watch(
        daemon.clone(),
        sock,
        Filter::new(interest, indexes),
        label,
        trigger.clone(),
    ));
    Ok(Watcher { netns, task })
}

/// Watches the node netns (`node_netns`, None: the daemon's own) and the live ztunnel's, and
/// runs [`Daemon::repair_on_event`] when our objects change. Runs for the life of the daemon.
pub async fn run<D: Dataplane>(daemon: Arc<Daemon<D>>, node_netns: Option<PathBuf>) {
    let cfg = daemon.config().clone();
    let trigger = Arc::new(Trigger {
        notify: Notify::new(),
    });
    let node_path = node_netns.map(|p| p.to_string_lossy().into_owned());
    let _node = match start(&daemon, node_path, Interest::node(&cfg), "node", &trigger).await {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "kernel events: cannot subscribe in the node netns; repairs wait for the periodic resync");
            return;
        }
    };
    info!("repairing on kernel events (node netns)");
    let mut zt: Option<Watcher> = None;
    loop {
        // Follow the ztunnel: a new one has a new netns.
        let want = daemon.ztunnel_netns().await;
        if zt.as_ref().map(|w| &w.netns) != Some(&want) {
            zt = None;
            if let Some(path) = &want {
                match start(
                    &daemon,
                    Some(path.clone()),
                    Interest::ztunnel(&cfg),
                    "ztunnel",
                    &trigger,
                )
                .await
                {
                    Ok(w) => {
                        info!(netns = %path, "repairing on kernel events (ztunnel netns)");
                        zt = Some(w);
                    }
                    Err(e) => {
                        warn!(netns = %path, error = %e, "kernel events: cannot subscribe in the ztunnel netns (retrying)");
                    }
                }
            }
        }
        tokio::select! {
            _ = trigger.notify.notified() => {}
            _ = tokio::time::sleep(FOLLOW_ZTUNNEL) => continue,
        }
        // Debounce: wait for the burst to go quiet, but not past MAX_WAIT from its first event.
        let first = Instant::now();
        loop {
            let left = MAX_WAIT.saturating_sub(first.elapsed());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = trigger.notify.notified() => {}
                _ = tokio::time::sleep(QUIET.min(left)) => break,
            }
        }
        let t = Instant::now();
        let report = daemon.repair_on_event().await;
        let took = t.elapsed();
        if !report.applied.is_empty() || !report.errors.is_empty() {
            info!(
                changed = report.applied.len(),
                errors = report.errors.len(),
                waited_ms = first.elapsed().as_millis() as u64,
                took_ms = took.as_millis() as u64,
                "repaired after kernel events"
            );
        }
        // Leave the daemon to its CNI calls for at least as long as the repair took; events
        // arriving meanwhile leave a permit in `notify` and start the next round.
        tokio::time::sleep(took.max(MIN_GAP)).await;
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
