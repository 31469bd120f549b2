//! The nftables firewall driver (stub: filled in by the next commit).

use std::net::IpAddr;
use std::sync::Arc;

use super::netns::NsWorker;
use crate::dataplane::{DpError, DpResult};
use crate::model::{Chain, Family, IpsetState, IptablesState, Ns};

/// The nftables driver.
pub(crate) struct NftFirewall {}

fn todo() -> DpError {
    DpError::Netlink {
        what: "nftables".into(),
        msg: "not implemented".into(),
    }
}

impl NftFirewall {
    pub(super) fn open(_node: &NsWorker) -> DpResult<Self> {
        Err(todo())
    }
    pub(super) async fn podset_list(&self, _n: &NsWorker, _f: Family) -> DpResult<IpsetState> {
        Err(todo())
    }
    pub(super) async fn podset_visit<F: FnMut(IpAddr, &str) + Send>(
        &self,
        _n: &NsWorker,
        _f: Family,
        _v: F,
    ) -> DpResult<bool> {
        Err(todo())
    }
    pub(super) async fn podset_create(&self, _n: &NsWorker, _f: Family) -> DpResult<()> {
        Err(todo())
    }
    pub(super) async fn podset_destroy(&self, _n: &NsWorker, _f: Family) -> DpResult<()> {
        Err(todo())
    }
    pub(super) async fn podset_add(&self, _n: &NsWorker, _ip: IpAddr, _o: &str) -> DpResult<()> {
        Err(todo())
    }
    pub(super) async fn podset_add_many(
        &self,
        _n: &NsWorker,
        e: &[(IpAddr, String)],
    ) -> Vec<DpResult<()>> {
        e.iter().map(|_| Err(todo())).collect()
    }
    pub(super) async fn podset_del(&self, _n: &NsWorker, _ip: IpAddr) -> DpResult<()> {
        Err(todo())
    }
    pub(super) async fn chains_read(
        &self,
        _w: Arc<NsWorker>,
        _ns: &Ns,
        _f: Family,
        _c: &[Chain],
    ) -> DpResult<IptablesState> {
        Err(todo())
    }
    pub(super) async fn chains_apply(
        &self,
        _w: Arc<NsWorker>,
        _ns: &Ns,
        _f: Family,
        _c: &[Chain],
    ) -> DpResult<()> {
        Err(todo())
    }
    pub(super) async fn chains_remove(
        &self,
        _w: Arc<NsWorker>,
        _ns: &Ns,
        _f: Family,
        _c: &[Chain],
    ) -> DpResult<()> {
        Err(todo())
    }
}
