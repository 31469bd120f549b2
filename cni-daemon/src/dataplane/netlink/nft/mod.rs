//! The nftables firewall driver: one table of ours, `inet ambient-cni`, in the node netns and
//! in each ztunnel netns, written over netlink (no `nft` binary, no libnftnl).
//!
//! The table holds, per family, one base chain per iptables (table, hook) the reconciler asks
//! for (`ip-mangle-prerouting`, `ip6-filter-forward`, …), hooked at the same points and
//! priorities as the iptables tables they stand for, and in the node netns the pod sets
//! `pods4` (`ipv4_addr`) and `pods6` (`ipv6_addr`), each element with its owner as comment.
//!
//! - A pod ADD is one element in one transaction (`NEWSETELEM`, exclusive; an address that is
//!   there already, maybe of another owner, is replaced by a delete + add in one transaction).
//! - The chains of a family are one atomic batch: each chain is deleted and made anew with
//!   its rules, so whatever someone did to them (flushed, deleted, rules added) is gone at once.
//! - Read back lists the table's chains and the comments of their rules (the iptables text of
//!   each rule, see [`compile`]), which the reconciler compares with what it wants.

mod compile;
pub(crate) mod detect;
pub(crate) mod listing;
mod wire;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use super::netns::NsWorker;
use crate::dataplane::{DpError, DpResult};
use crate::model::{Chain, Family, IpsetState, IptablesState, Ns};
use wire::*;

pub(crate) use compile::{chain_name, set_name};

/// Our table (family inet).
pub const TABLE: &str = crate::config::NFT_TABLE;

/// `ipv4_addr` and `ipv6_addr` (nft's data types 7 and 8).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const NF_ACCEPT: u32 = 1;

/// Elements per NEWSETELEM message of a bulk add (each ~80 bytes: under the 64 KiB an
/// attribute can hold).
const ELEMS_PER_MSG: usize = 500;
/// Messages per transaction of a bulk add.
const MSGS_PER_BATCH: usize = 8;

/// The driver: the node's socket (opened in the node netns; pod set calls run on the calling
/// thread, as the ipset driver's do).
pub(crate) struct NftFirewall {
    node: Arc<Mutex<NftSocket>>,
}

fn err(what: impl Into<String>, e: &NftError) -> DpError {
    DpError::Netlink {
        what: what.into(),
        msg: e.to_string(),
    }
}

fn gone(e: &NftError) -> bool {
    e.code() == Some(libc::ENOENT)
}

fn table_msg() -> Msg {
    let mut m = Msg::new(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    m.put_str(NFTA_TABLE_NAME, TABLE);
    m
}

fn set_msg(f: Family) -> Msg {
    let (ty, len) = match f {
        Family::V4 => (TYPE_IPADDR, 4),
        Family::V6 => (TYPE_IP6ADDR, 16),
    };
    let mut m = Msg::new(NFT_MSG_NEWSET, NLM_F_CREATE);
    m.put_str(NFTA_SET_TABLE, TABLE)
        .put_str(NFTA_SET_NAME, set_name(f))
        .put_be32(NFTA_SET_KEY_TYPE, ty)
        .put_be32(NFTA_SET_KEY_LEN, len)
        .put_be32(NFTA_SET_ID, 1);
    m
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A NEWSETELEM (`owner` given) or DELSETELEM of elements of one family.
fn elems_msg(
    f: Family,
    flags: u16,
    elems: &[(IpAddr, Option<&str>)],
    add: bool,
) -> Result<Msg, NftError> {
    let ty = if add {
        NFT_MSG_NEWSETELEM
    } else {
        NFT_MSG_DELSETELEM
    };
    let mut m = Msg::new(ty, flags);
    m.put_str(NFTA_SET_ELEM_LIST_TABLE, TABLE)
        .put_str(NFTA_SET_ELEM_LIST_SET, set_name(f));
    m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
    for (ip, owner) in elems {
        m.begin(NFTA_LIST_ELEM);
        m.begin(NFTA_SET_ELEM_KEY)
            .put(NFTA_DATA_VALUE, &ip_bytes(*ip))
            .end();
        if let (true, Some(o)) = (add, owner) {
            m.put(NFTA_SET_ELEM_USERDATA, &comment_udata(o)?);
        }
        m.end();
    }
    m.end();
    Ok(m)
}

/// Hands every element (address, comment) of our set of `f` to `v`; false when there is no
/// such set (or no table).
fn visit_set(
    s: &mut NftSocket,
    f: Family,
    mut v: impl FnMut(IpAddr, &str),
) -> Result<bool, NftError> {
    let mut m = Msg::new(NFT_MSG_GETSETELEM, 0);
    m.put_str(NFTA_SET_ELEM_LIST_TABLE, TABLE)
        .put_str(NFTA_SET_ELEM_LIST_SET, set_name(f));
    let r = s.dump(m, |_, attrs| {
        let Some(list) = attr(attrs, NFTA_SET_ELEM_LIST_ELEMENTS) else {
            return;
        };
        for (ty, e) in nlas(list).flatten() {
            if ty != NFTA_LIST_ELEM {
                continue;
            }
            let key = attr(e, NFTA_SET_ELEM_KEY).and_then(|k| attr(k, NFTA_DATA_VALUE));
            let ip = match key {
                Some(k) if k.len() == 4 => k
                    .try_into()
                    .ok()
                    .map(|a: [u8; 4]| IpAddr::from(Ipv4Addr::from(a))),
                Some(k) if k.len() == 16 => k
                    .try_into()
                    .ok()
                    .map(|a: [u8; 16]| IpAddr::from(Ipv6Addr::from(a))),
                _ => None,
            };
            let owner = attr(e, NFTA_SET_ELEM_USERDATA)
                .and_then(comment_of)
                .unwrap_or("");
            if let Some(ip) = ip {
                v(ip, owner);
            }
        }
    });
    match r {
        Ok(()) => Ok(true),
        Err(e) if gone(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One of our chains as listed: hook number, priority and type (None: not a base chain).
type Listed = BTreeMap<String, Option<(u32, i32, String)>>;

/// The chains of our table.
fn list_chains(s: &mut NftSocket) -> Result<Listed, NftError> {
    let mut out = Listed::new();
    let mut m = Msg::new(NFT_MSG_GETCHAIN, 0);
    m.put_str(NFTA_CHAIN_TABLE, TABLE);
    let r = s.dump(m, |_, a| {
        if attr_str(a, NFTA_CHAIN_TABLE) != Some(TABLE) {
            return;
        }
        let Some(name) = attr_str(a, NFTA_CHAIN_NAME) else {
            return;
        };
        let hook = attr(a, NFTA_CHAIN_HOOK).and_then(|h| {
            let num = attr_be32(h, NFTA_HOOK_HOOKNUM)?;
            let prio = attr_be32(h, NFTA_HOOK_PRIORITY)?;
            let ty = attr_str(a, NFTA_CHAIN_TYPE)?.to_string();
            Some((num, i32::from_ne_bytes(prio.to_ne_bytes()), ty))
        });
        out.insert(name.to_string(), hook);
    });
    match r {
        Ok(()) => Ok(out),
        Err(e) if gone(&e) => Ok(out),
        Err(e) => Err(e),
    }
}

/// Number of our sets.
fn count_sets(s: &mut NftSocket) -> Result<usize, NftError> {
    let mut n = 0;
    let mut m = Msg::new(NFT_MSG_GETSET, 0);
    m.put_str(NFTA_SET_TABLE, TABLE);
    let r = s.dump(m, |_, a| {
        if attr_str(a, NFTA_SET_TABLE) == Some(TABLE) {
            n += 1;
        }
    });
    match r {
        Ok(()) => Ok(n),
        Err(e) if gone(&e) => Ok(0),
        Err(e) => Err(e),
    }
}

/// The comments of the rules of one of our chains, in order (a rule without one reads as
/// `<rule without comment>`, so that it differs from every rule we want).
fn rule_comments(s: &mut NftSocket, chain: &str) -> Result<Vec<String>, NftError> {
    Ok(rule_texts(s, chain)?
        .into_iter()
        .map(|c| c.unwrap_or_else(|| "<rule without comment>".to_string()))
        .collect())
}

/// The comment (our rule text) of each rule of one of our chains, in order.
fn rule_texts(s: &mut NftSocket, chain: &str) -> Result<Vec<Option<String>>, NftError> {
    let mut out = Vec::new();
    let mut m = Msg::new(NFT_MSG_GETRULE, 0);
    m.put_str(NFTA_RULE_TABLE, TABLE)
        .put_str(NFTA_RULE_CHAIN, chain);
    let r = s.dump(m, |_, a| {
        if attr_str(a, NFTA_RULE_TABLE) != Some(TABLE)
            || attr_str(a, NFTA_RULE_CHAIN) != Some(chain)
        {
            return;
        }
        let c = attr(a, NFTA_RULE_USERDATA).and_then(comment_of);
        out.push(c.map(str::to_string));
    });
    match r {
        Ok(()) => Ok(out),
        Err(e) if gone(&e) => Ok(out),
        Err(e) => Err(e),
    }
}

/// Deletes the table when nothing of ours is left in it.
fn drop_table_if_empty(s: &mut NftSocket) -> Result<(), NftError> {
    if list_chains(s)?.is_empty() && count_sets(s)? == 0 {
        let mut m = Msg::new(NFT_MSG_DELTABLE, 0);
        m.put_str(NFTA_TABLE_NAME, TABLE);
        match s.batch(vec![m]) {
            Err(e) if !gone(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// "Delete this chain if it exists", in a batch: add it (a no-op when it exists), delete it.
fn chain_delete_msgs(name: &str) -> [Msg; 2] {
    let mut add = Msg::new(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
    add.put_str(NFTA_CHAIN_TABLE, TABLE)
        .put_str(NFTA_CHAIN_NAME, name);
    let mut del = Msg::new(NFT_MSG_DELCHAIN, 0);
    del.put_str(NFTA_CHAIN_TABLE, TABLE)
        .put_str(NFTA_CHAIN_NAME, name);
    [add, del]
}

/// The batch that makes the chains of family `f` exactly `chains`.
fn apply_batch(f: Family, chains: &[Chain]) -> Result<Vec<Msg>, String> {
    let mut msgs = vec![table_msg()];
    if chains
        .iter()
        .any(|c| c.rules.iter().any(|r| r.contains("--match-set")))
    {
        msgs.push(set_msg(f));
    }
    for c in chains {
        let (ty, hook, prio) = compile::hook_of(&c.table, &c.hook)
            .ok_or_else(|| format!("no nft hook for {} {}", c.table, c.hook))?;
        let name = chain_name(f, c);
        msgs.extend(chain_delete_msgs(&name));
        let mut m = Msg::new(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
        m.put_str(NFTA_CHAIN_TABLE, TABLE)
            .put_str(NFTA_CHAIN_NAME, &name);
        m.begin(NFTA_CHAIN_HOOK)
            .put_be32(NFTA_HOOK_HOOKNUM, hook)
            .put_be32(NFTA_HOOK_PRIORITY, u32::from_ne_bytes(prio.to_ne_bytes()))
            .end();
        m.put_be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .put_str(NFTA_CHAIN_TYPE, ty);
        msgs.push(m);
        for r in &c.rules {
            let mut m = Msg::new(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
            m.put_str(NFTA_RULE_TABLE, TABLE)
                .put_str(NFTA_RULE_CHAIN, &name);
            m.begin(NFTA_RULE_EXPRESSIONS);
            compile::compile(&mut m, f, r)?;
            m.end();
            m.put(
                NFTA_RULE_USERDATA,
                &comment_udata(r).map_err(|e| e.to_string())?,
            );
            msgs.push(m);
        }
    }
    Ok(msgs)
}

/// Is a chain listed with `hooked` hooked where iptables' `table` `hook` is (type, hook number
/// and priority)?
fn hooked_as(hooked: &Option<(u32, i32, String)>, table: &str, hook: &str) -> bool {
    match (hooked, compile::hook_of(table, hook)) {
        (Some((n, p, t)), Some((wt, wn, wp))) => *n == wn && *p == wp && t == wt,
        _ => false,
    }
}

fn read(f: Family, chains: &[Chain]) -> Result<IptablesState, NftError> {
    let mut s = NftSocket::open().map_err(NftError::Io)?;
    let listed = list_chains(&mut s)?;
    let mut st = IptablesState::default();
    for c in chains {
        let name = chain_name(f, c);
        let Some(hooked) = listed.get(&name) else {
            continue;
        };
        st.chains.insert(
            (c.table.clone(), c.name.clone()),
            rule_comments(&mut s, &name)?,
        );
        if hooked_as(hooked, &c.table, &c.hook) {
            st.jumps
                .insert((c.table.clone(), c.hook.clone(), c.name.clone()), vec![1]);
        }
    }
    Ok(st)
}

fn remove(f: Family, chains: &[Chain]) -> Result<(), NftError> {
    let mut s = NftSocket::open().map_err(NftError::Io)?;
    let mut msgs = vec![table_msg()];
    for c in chains {
        msgs.extend(chain_delete_msgs(&chain_name(f, c)));
    }
    s.batch(msgs)?;
    drop_table_if_empty(&mut s)
}

/// Is nf_tables there? A clear error naming the module when it is not.
fn probe(s: &mut NftSocket) -> DpResult<()> {
    s.request(Msg::new(NFT_MSG_GETGEN, 0))
        .map_err(|e| start_error("nftables firewall: talk to nf_tables", &e))
}

/// Whether `e` means the kernel has no nf_tables: without the nfnetlink module the socket
/// cannot be made (EPROTONOSUPPORT); with nfnetlink (ipset, conntrack) but without nf_tables,
/// nfnetlink finds no subsystem for our messages and answers EINVAL (after trying to load
/// `nfnetlink-subsys-10`); some kernels say EOPNOTSUPP or ENOENT.
fn no_nf_tables(e: &NftError) -> bool {
    let code = match e {
        NftError::Io(io) => io.raw_os_error(),
        other => other.code(),
    };
    matches!(
        code,
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOENT | libc::EPROTONOSUPPORT)
    )
}

/// The start-up error for `e`: names the module and the way out when nf_tables is missing.
fn start_error(what: &str, e: &NftError) -> DpError {
    DpError::Netlink {
        what: what.into(),
        msg: if no_nf_tables(e) {
            format!(
                "the kernel has no nf_tables (module nf_tables not loaded and not loadable: \
                 modprobe nf_tables, or use --firewall iptables): {e}"
            )
        } else {
            e.to_string()
        },
    }
}

/// Watches our table for changes by others (NFNLGRP_NFTABLES) through `mon` (opened in the
/// netns to watch, see [`open_monitor`]) on a thread of its own and calls `on_change` for each,
/// so that damage is repaired at once instead of at the next resync; until `stop` is set (then
/// looked at twice a second), or for the life of the daemon without one.
pub(super) fn watch(
    mut mon: NftMonitor,
    on_change: impl Fn() + Send + 'static,
    stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    thread: &str,
) -> DpResult<()> {
    let what = |e: &dyn std::fmt::Display| DpError::Netlink {
        what: "start the nf_tables notification thread".into(),
        msg: e.to_string(),
    };
    if stop.is_some() {
        mon.set_timeout(std::time::Duration::from_millis(500))
            .map_err(|e| what(&e))?;
    }
    let stopped = move || {
        stop.as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    };
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            while !stopped() {
                match mon.wait(TABLE) {
                    Ok(()) => on_change(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "nf_tables notifications: receive failed");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
            }
        })
        .map(drop)
        .map_err(|e| what(&e))
}

/// Opens a notification socket in `worker`'s netns (a socket belongs for life to the netns
/// it was made in; any thread may read it).
pub(super) async fn open_monitor(worker: &NsWorker) -> DpResult<NftMonitor> {
    worker
        .run(NftMonitor::open)
        .await?
        .map_err(|e| DpError::Netlink {
            what: format!("subscribe to nf_tables notifications in {}", worker.label()),
            msg: e.to_string(),
        })
}

impl NftFirewall {
    /// Opens the node's socket and checks that the kernel speaks nf_tables. Writes nothing.
    pub(super) fn open(node: &NsWorker) -> DpResult<Self> {
        let mut s = node.run_sync(NftSocket::open)?.map_err(|e| {
            start_error(
                "open NETLINK_NETFILTER socket for nftables",
                &NftError::Io(e),
            )
        })?;
        probe(&mut s)?;
        Ok(NftFirewall {
            node: Arc::new(Mutex::new(s)),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut NftSocket) -> T) -> T {
        let mut g = self.node.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub(super) async fn podset_list(&self, _n: &NsWorker, f: Family) -> DpResult<IpsetState> {
        let mut m = BTreeMap::new();
        let there = self
            .with(|s| {
                visit_set(s, f, |ip, o| {
                    m.insert(ip, o.to_string());
                })
            })
            .map_err(|e| err(format!("list nft set {TABLE} {}", set_name(f)), &e))?;
        Ok(there.then_some(m))
    }

    pub(super) async fn podset_visit<F: FnMut(IpAddr, &str) + Send>(
        &self,
        _n: &NsWorker,
        f: Family,
        v: F,
    ) -> DpResult<bool> {
        self.with(|s| visit_set(s, f, v))
            .map_err(|e| err(format!("list nft set {TABLE} {}", set_name(f)), &e))
    }

    pub(super) async fn podset_create(&self, _n: &NsWorker, f: Family) -> DpResult<()> {
        self.with(|s| s.batch(vec![table_msg(), set_msg(f)]))
            .map_err(|e| err(format!("create nft set inet {TABLE} {}", set_name(f)), &e))
    }

    pub(super) async fn podset_destroy(&self, _n: &NsWorker, f: Family) -> DpResult<()> {
        let mut m = Msg::new(NFT_MSG_DELSET, 0);
        m.put_str(NFTA_SET_TABLE, TABLE)
            .put_str(NFTA_SET_NAME, set_name(f));
        self.with(|s| {
            match s.batch(vec![m]) {
                Err(e) if !gone(&e) => return Err(e),
                _ => {}
            }
            drop_table_if_empty(s)
        })
        .map_err(|e| err(format!("delete nft set inet {TABLE} {}", set_name(f)), &e))
    }

    pub(super) async fn podset_add(&self, _n: &NsWorker, ip: IpAddr, owner: &str) -> DpResult<()> {
        let f = Family::of(ip);
        let what = || format!("add {ip} to nft set {}", set_name(f));
        let one = [(ip, Some(owner))];
        let add = |flags| elems_msg(f, flags, &one, true).map_err(|e| err(what(), &e));
        let first = add(NLM_F_CREATE | NLM_F_EXCL)?;
        match self.with(|s| s.batch(vec![first])) {
            Ok(()) => Ok(()),
            // There already (maybe another owner's comment): replace it in one transaction.
            Err(e) if e.code() == Some(libc::EEXIST) => {
                let del = elems_msg(f, 0, &one, false).map_err(|e| err(what(), &e))?;
                let again = add(NLM_F_CREATE)?;
                self.with(|s| s.batch(vec![del, again]))
                    .map_err(|e| err(what(), &e))
            }
            Err(e) => Err(err(what(), &e)),
        }
    }

    pub(super) async fn podset_add_many(
        &self,
        _n: &NsWorker,
        entries: &[(IpAddr, String)],
    ) -> Vec<DpResult<()>> {
        let mut out: Vec<DpResult<()>> = (0..entries.len()).map(|_| Ok(())).collect();
        for f in Family::ALL {
            let idx: Vec<usize> = (0..entries.len())
                .filter(|i| entries.get(*i).is_some_and(|(ip, _)| Family::of(*ip) == f))
                .collect();
            for batch in idx.chunks(ELEMS_PER_MSG * MSGS_PER_BATCH) {
                // add (creates the missing), delete, add: every element ends with its owner.
                let res = (|| {
                    let mut msgs = Vec::new();
                    for part in batch.chunks(ELEMS_PER_MSG) {
                        let elems: Vec<(IpAddr, Option<&str>)> = part
                            .iter()
                            .filter_map(|i| entries.get(*i))
                            .map(|(ip, o)| (*ip, Some(o.as_str())))
                            .collect();
                        msgs.push(elems_msg(f, NLM_F_CREATE, &elems, true)?);
                        msgs.push(elems_msg(f, 0, &elems, false)?);
                        msgs.push(elems_msg(f, NLM_F_CREATE, &elems, true)?);
                    }
                    self.with(|s| s.batch(msgs))
                })();
                if let Err(e) = res {
                    let e = err(format!("add to nft set {}", set_name(f)), &e);
                    for i in batch {
                        if let Some(slot) = out.get_mut(*i) {
                            *slot = Err(e.clone());
                        }
                    }
                }
            }
        }
        out
    }

    pub(super) async fn podset_del(&self, _n: &NsWorker, ip: IpAddr) -> DpResult<()> {
        let f = Family::of(ip);
        let what = || format!("delete {ip} from nft set {}", set_name(f));
        let m = elems_msg(f, 0, &[(ip, None)], false).map_err(|e| err(what(), &e))?;
        match self.with(|s| s.batch(vec![m])) {
            Err(e) if !gone(&e) => Err(err(what(), &e)),
            _ => Ok(()),
        }
    }

    pub(super) async fn chains_read(
        &self,
        w: Arc<NsWorker>,
        ns: &Ns,
        f: Family,
        chains: &[Chain],
    ) -> DpResult<IptablesState> {
        let chains = chains.to_vec();
        w.run(move || read(f, &chains))
            .await?
            .map_err(|e| err(format!("list nft table inet {TABLE} in {ns}"), &e))
    }

    pub(super) async fn chains_apply(
        &self,
        w: Arc<NsWorker>,
        ns: &Ns,
        f: Family,
        chains: &[Chain],
    ) -> DpResult<()> {
        let what = || format!("apply {f} chains of nft table inet {TABLE} in {ns}");
        let msgs = apply_batch(f, chains).map_err(|m| DpError::Netlink {
            what: what(),
            msg: m,
        })?;
        w.run(move || {
            let mut s = NftSocket::open().map_err(NftError::Io)?;
            s.batch(msgs)
        })
        .await?
        .map_err(|e| err(what(), &e))
    }

    pub(super) async fn chains_remove(
        &self,
        w: Arc<NsWorker>,
        ns: &Ns,
        f: Family,
        chains: &[Chain],
    ) -> DpResult<()> {
        let chains = chains.to_vec();
        w.run(move || remove(f, &chains)).await?.map_err(|e| {
            err(
                format!("remove {f} chains of nft table inet {TABLE} in {ns}"),
                &e,
            )
        })
    }
}

#[cfg(test)]
mod tests;
