//! Tunnel links between the node and the ztunnel pod: veth pairs (default) or geneve.
//!
//! A veth pair is created in the node netns with a unique temporary peer name, the peer is moved
//! into the ztunnel netns and renamed there (its final name may exist in the node netns, and a
//! stale one in the target is deleted first), then both ends get MTU, address and `up`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkGeneve, LinkUnspec, LinkVeth};

use super::netns::NsWorker;
use super::{already_done, errno_of, nl_check, nl_error, Intent};
use crate::dataplane::{DpError, DpResult};
use crate::model::{Family, Prefix, TunnelLink, TunnelMode, TunnelState, Tunnels};

/// Linux interface names: 1..=15 bytes, no '/', ':' or whitespace.
fn check_ifname(name: &str) -> DpResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(DpError::Netlink {
            what: format!("interface name {name:?}"),
            msg: "invalid interface name".into(),
        })
    }
}

/// The link called `name`, or `None`.
pub(crate) async fn get_by_name(
    h: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(m) => Ok(m),
        Err(e) if errno_of(&e).is_some_and(|c| already_done(Intent::Find, c)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The link with index `idx`, or `None`.
pub(crate) async fn get_by_index(
    h: &Handle,
    idx: u32,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h.link().get().match_index(idx).execute().try_next().await {
        Ok(m) => Ok(m),
        Err(e) if errno_of(&e).is_some_and(|c| already_done(Intent::Find, c)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Index of the link called `name`, or `None`.
pub(crate) async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    Ok(get_by_name(h, name).await?.map(|m| m.header.index))
}

/// IFLA_IFNAME.
pub(crate) fn name_of(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// IFLA_LINK: for a veth, the peer's index (in the peer's netns).
fn link_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

fn mtu_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(v) => Some(*v),
        _ => None,
    })
}

fn kind_of(m: &LinkMessage) -> Option<&InfoKind> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn is_up(m: &LinkMessage) -> bool {
    m.header.flags.contains(LinkFlags::Up)
}

/// Does link `idx` carry `addr` (IPv4 or IPv6) with exactly that prefix length?
async fn has_addr(h: &Handle, idx: u32, addr: Prefix) -> Result<bool, rtnetlink::Error> {
    let mut req = h.address().get().set_link_index_filter(idx);
    // Kernel-side filters (the connection uses strict checking): family and interface.
    req.message_mut().header.family = match addr.family() {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    req.message_mut().header.index = idx;
    let msgs: Vec<_> = req.execute().try_collect().await?;
    // IPv6 addresses carry only IFA_ADDRESS on a point-to-point-less link; IPv4 ones IFA_LOCAL.
    Ok(msgs.iter().any(|m| {
        m.header.prefix_len == addr.len
            && m.attributes.iter().any(|a| match a {
                AddressAttribute::Local(ip) => *ip == addr.addr,
                AddressAttribute::Address(ip) => addr.family().is_v6() && *ip == addr.addr,
                _ => false,
            })
    }))
}

/// Both addresses of one end of a link: IPv4, and IPv6 when wanted.
fn addrs_of(v4: Prefix, v6: Option<Prefix>) -> impl Iterator<Item = Prefix> {
    std::iter::once(v4).chain(v6)
}

/// Does the link carry every address in `want`?
async fn has_addrs(
    h: &Handle,
    idx: u32,
    want: impl Iterator<Item = Prefix>,
) -> Result<bool, rtnetlink::Error> {
    for a in want {
        if !has_addr(h, idx, a).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Deletes the link `name` in the namespace of `h` (gone already is fine). Deleting one end of a
/// veth pair deletes the other, wherever it lives.
pub(crate) async fn delete_by_name(h: &Handle, name: &str, ns: &str) -> DpResult<()> {
    let what = || format!("delete link {name} in {ns}");
    let idx = get_by_name(h, name)
        .await
        .map_err(|e| nl_error(what(), &e))?;
    let Some(idx) = idx.map(|m| m.header.index) else {
        return Ok(());
    };
    let r = h.link().del(idx).execute().await;
    nl_check(Intent::Remove, what, r)
}

/// Reads whether each wanted link pair is wired. Missing node links are left out; a missing
/// ztunnel namespace (`pod == None`) makes every present one "not wired".
pub(crate) async fn tunnels_read(
    node: &NsWorker,
    pod: Option<&NsWorker>,
    want: &Tunnels,
) -> DpResult<TunnelState> {
    let mut state = TunnelState::default();
    for l in &want.links {
        let Some(n) = get_by_name(node.handle(), &l.node_name)
            .await
            .map_err(|e| nl_error(format!("get link {} in node", l.node_name), &e))?
        else {
            continue;
        };
        let ok = match pod {
            None => false,
            Some(pod) => wired(node, pod, want, l, &n).await?,
        };
        state.links.insert(l.node_name.clone(), ok);
    }
    Ok(state)
}

/// "Wired" = node end up with its address (and MTU when one is wanted), peer present in the
/// ztunnel netns, up, with its address, and — for veth — the two ends are each other's peer.
async fn wired(
    node: &NsWorker,
    pod: &NsWorker,
    want: &Tunnels,
    l: &TunnelLink,
    n: &LinkMessage,
) -> DpResult<bool> {
    let nerr = |e: rtnetlink::Error| nl_error(format!("read link {} in node", l.node_name), &e);
    let perr =
        |e: rtnetlink::Error| nl_error(format!("read link {} in {}", l.peer_name, pod.label()), &e);
    let mtu_ok = |m: &LinkMessage| want.mtu == 0 || mtu_of(m) == Some(want.mtu);
    if !is_up(n)
        || !mtu_ok(n)
        || !has_addrs(
            node.handle(),
            n.header.index,
            addrs_of(l.node_addr, l.node_addr6),
        )
        .await
        .map_err(nerr)?
    {
        return Ok(false);
    }
    let Some(p) = get_by_name(pod.handle(), &l.peer_name)
        .await
        .map_err(perr)?
    else {
        return Ok(false);
    };
    if !is_up(&p)
        || !mtu_ok(&p)
        || !has_addrs(
            pod.handle(),
            p.header.index,
            addrs_of(l.peer_addr, l.peer_addr6),
        )
        .await
        .map_err(perr)?
    {
        return Ok(false);
    }
    Ok(match want.mode {
        TunnelMode::Veth => {
            kind_of(n) == Some(&InfoKind::Veth)
                && kind_of(&p) == Some(&InfoKind::Veth)
                && link_of(n) == Some(p.header.index)
                && link_of(&p) == Some(n.header.index)
        }
        TunnelMode::Geneve => {
            kind_of(n) == Some(&InfoKind::Geneve) && kind_of(&p) == Some(&InfoKind::Geneve)
        }
    })
}

/// A node-netns name for the peer until it is moved: unique per process and call.
fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("acnt{:08x}", h.finish() as u32)
}

/// (Re)creates the pair `node_name` of `want`.
pub(crate) async fn tunnel_create(
    node: &NsWorker,
    pod: &NsWorker,
    want: &Tunnels,
    node_name: &str,
) -> DpResult<()> {
    let l = want
        .links
        .iter()
        .find(|l| l.node_name == node_name)
        .ok_or_else(|| {
            DpError::NoSuchLink(format!("{node_name} is not one of the wanted tunnel links"))
        })?;
    check_ifname(&l.node_name)?;
    check_ifname(&l.peer_name)?;
    // Stale leftovers first: our node end (takes a veth peer with it) and anything holding the
    // peer's name in the ztunnel netns.
    delete_by_name(node.handle(), &l.node_name, "node").await?;
    delete_by_name(pod.handle(), &l.peer_name, pod.label()).await?;
    let made = match want.mode {
        TunnelMode::Veth => create_veth(node, pod, want, l).await,
        TunnelMode::Geneve => create_geneve(node, pod, want, l).await,
    };
    match &made {
        Ok(()) => {
            tracing::info!(link = %l.node_name, peer = %l.peer_name, netns = %pod.label(), mode = ?want.mode, "tunnel created")
        }
        Err(e) => {
            tracing::warn!(link = %l.node_name, error = %e, "tunnel creation failed; removing leftovers")
        }
    }
    if made.is_err() {
        // Do not leave half a pair behind; the next reconcile starts clean.
        let _ = delete_by_name(node.handle(), &l.node_name, "node").await;
        let _ = delete_by_name(pod.handle(), &l.peer_name, pod.label()).await;
    }
    made
}

async fn create_veth(
    node: &NsWorker,
    pod: &NsWorker,
    want: &Tunnels,
    l: &TunnelLink,
) -> DpResult<()> {
    let nh = node.handle();
    let ph = pod.handle();
    let tmp = temp_name();
    let what = |step: &str| format!("create veth {}<->{} ({step})", l.node_name, l.peer_name);
    nh.link()
        .add(LinkVeth::new(&l.node_name, &tmp).build())
        .execute()
        .await
        .map_err(|e| nl_error(what("add pair"), &e))?;
    // On failure here the temporary end is still in the node netns; the caller's clean-up of
    // the node end removes it.
    let tmp_idx = index_of(nh, &tmp)
        .await
        .map_err(|e| nl_error(what("find temporary peer"), &e))?
        .ok_or_else(|| DpError::NoSuchLink(format!("{tmp} (just created)")))?;
    nh.link()
        .set(
            LinkUnspec::new_with_index(tmp_idx)
                .setns_by_fd(pod.raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(|e| nl_error(what("move peer into the ztunnel netns"), &e))?;
    let pidx = index_of(ph, &tmp)
        .await
        .map_err(|e| nl_error(what("find moved peer"), &e))?
        .ok_or_else(|| DpError::NoSuchLink(format!("{tmp} in {}", pod.label())))?;
    // The moved end is down, so it can be renamed.
    let mut rename = LinkUnspec::new_with_index(pidx).name(l.peer_name.clone());
    if want.mtu != 0 {
        rename = rename.mtu(want.mtu);
    }
    ph.link()
        .set(rename.build())
        .execute()
        .await
        .map_err(|e| nl_error(what("rename peer"), &e))?;
    let ifname = l.peer_name.clone();
    configure(
        pod,
        pidx,
        &ifname,
        addrs_of(l.peer_addr, l.peer_addr6),
        0,
        &what("peer address/up"),
    )
    .await?;
    let nidx = index_of(nh, &l.node_name)
        .await
        .map_err(|e| nl_error(what("find node end"), &e))?
        .ok_or_else(|| DpError::NoSuchLink(l.node_name.clone()))?;
    configure(
        node,
        nidx,
        &l.node_name,
        addrs_of(l.node_addr, l.node_addr6),
        want.mtu,
        &what("node address/up"),
    )
    .await
}

async fn create_geneve(
    node: &NsWorker,
    pod: &NsWorker,
    want: &Tunnels,
    l: &TunnelLink,
) -> DpResult<()> {
    let hint = "(does this kernel have the geneve module? use veth tunnels otherwise)";
    let mk = |name: &str, remote| {
        let mut b = LinkGeneve::new(name, l.vni).remote(remote);
        if want.mtu != 0 {
            b = b.mtu(want.mtu);
        }
        b.build()
    };
    node.handle()
        .link()
        .add(mk(&l.node_name, want.ztunnel_ip))
        .execute()
        .await
        .map_err(|e| {
            nl_error(
                format!(
                    "create geneve link {} vni {} remote {} in node {hint}",
                    l.node_name, l.vni, want.ztunnel_ip
                ),
                &e,
            )
        })?;
    pod.handle()
        .link()
        .add(mk(&l.peer_name, want.node_ip))
        .execute()
        .await
        .map_err(|e| {
            nl_error(
                format!(
                    "create geneve link {} vni {} remote {} in {} {hint}",
                    l.peer_name,
                    l.vni,
                    want.node_ip,
                    pod.label()
                ),
                &e,
            )
        })?;
    let what = format!("configure geneve {}<->{}", l.node_name, l.peer_name);
    let pidx = index_of(pod.handle(), &l.peer_name)
        .await
        .map_err(|e| nl_error(what.clone(), &e))?
        .ok_or_else(|| DpError::NoSuchLink(l.peer_name.clone()))?;
    configure(
        pod,
        pidx,
        &l.peer_name,
        addrs_of(l.peer_addr, l.peer_addr6),
        0,
        &what,
    )
    .await?;
    let nidx = index_of(node.handle(), &l.node_name)
        .await
        .map_err(|e| nl_error(what.clone(), &e))?
        .ok_or_else(|| DpError::NoSuchLink(l.node_name.clone()))?;
    configure(
        node,
        nidx,
        &l.node_name,
        addrs_of(l.node_addr, l.node_addr6),
        0,
        &what,
    )
    .await
}

/// Lets link `ifname` in `w`'s namespace take IPv6 addresses: a namespace whose
/// `default/disable_ipv6` is 1 makes new links refuse them (EACCES).
async fn enable_ipv6(w: &NsWorker, ifname: &str) -> DpResult<()> {
    let key = format!("net/ipv6/conf/{ifname}/disable_ipv6");
    w.run(move || match super::sysctl::read(&key)? {
        Some(v) if v.trim() != "0" => super::sysctl::write(&key, "0"),
        // No such key: no IPv6 in this kernel; the address add below says so.
        _ => Ok(()),
    })
    .await?
}

/// Bring link `idx` up.
pub(crate) async fn set_up(h: &Handle, idx: u32) -> Result<(), rtnetlink::Error> {
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
}

/// MTU (when non-zero), addresses, up. IPv6 addresses are added `nodad`: the two ends are the
/// only hosts on the link, and duplicate detection would leave them tentative (unusable as next
/// hop or source) for a second or more after every tunnel (re)creation.
async fn configure(
    w: &NsWorker,
    idx: u32,
    ifname: &str,
    addrs: impl Iterator<Item = Prefix>,
    mtu: u32,
    what: &str,
) -> DpResult<()> {
    let h = w.handle();
    if mtu != 0 {
        h.link()
            .set(LinkUnspec::new_with_index(idx).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| nl_error(what, &e))?;
    }
    for addr in addrs {
        let mut req = h.address().add(idx, addr.addr, addr.len);
        if addr.family().is_v6() {
            enable_ipv6(w, ifname).await?;
            let m = req.message_mut();
            m.header.flags |= AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        let r = req.execute().await;
        nl_check(Intent::Create, || format!("{what}: address {addr}"), r)?;
    }
    set_up(h, idx).await.map_err(|e| nl_error(what, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_valid_and_distinct() {
        let a = temp_name();
        let b = temp_name();
        assert_ne!(a, b);
        assert!(check_ifname(&a).is_ok());
        assert_eq!(a.len(), 12);
    }

    #[test]
    fn ifname_rules() {
        assert!(check_ifname("istioin").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("0123456789abcdef").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
    }
}
