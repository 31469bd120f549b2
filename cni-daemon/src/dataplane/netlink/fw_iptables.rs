//! The iptables + ipset firewall driver: the pod sets are ipsets (`hash:ip` with comments, over
//! netlink, see [`super::ipset`]) and our chains go through `iptables-restore --noflush` (see
//! [`super::iptables`]). Moved here from the dataplane itself when the firewall became a seam of
//! its own (issue 15); the nftables driver ([`super::nft`]) stands beside it.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::netns::NsWorker;
use super::{already_done, ipset, iptables, Intent, RealConfig};
use crate::dataplane::{DpError, DpResult};
use crate::model::{Chain, Family, IpsetState, IptablesState, Ns};

/// Maps an ipset result through [`already_done`].
fn ipset_check<T: Default>(
    intent: Intent,
    what: impl FnOnce() -> String,
    r: Result<T, ipset::IpsetError>,
) -> DpResult<T> {
    match r {
        Ok(v) => Ok(v),
        Err(ipset::IpsetError::Kernel(c)) if already_done(intent, c) => Ok(T::default()),
        Err(e) => Err(DpError::Netlink {
            what: what(),
            msg: e.to_string(),
        }),
    }
}

/// From how many entries [`Firewall::podset_add_many`] runs on a blocking thread.
const IPSET_THREAD_MIN: usize = 64;

/// The driver: the ipset socket (opened in the node netns) and the configuration.
pub(crate) struct IptablesFirewall {
    cfg: RealConfig,
    ipset: Arc<Mutex<ipset::IpsetSocket>>,
}

impl IptablesFirewall {
    /// Opens the ipset socket in the node netns and resolves the node's iptables variant (kept
    /// on the node worker). Returns the driver and the variant's name.
    pub(super) fn open(cfg: &RealConfig, node: &NsWorker) -> DpResult<(Self, &'static str)> {
        let sock = node
            .run_sync(ipset::IpsetSocket::open)?
            .map_err(|e| DpError::Netlink {
                what: "open NETLINK_NETFILTER socket for ipset".into(),
                msg: e.to_string(),
            })?;
        let wanted = cfg.iptables_backend;
        let backend = node.run_sync(move || iptables::resolve(wanted))?;
        let _ = node.backend.set(backend);
        Ok((
            IptablesFirewall {
                cfg: cfg.clone(),
                ipset: Arc::new(Mutex::new(sock)),
            },
            backend.name(),
        ))
    }

    /// Backend for a namespace: the configured one, or detected once per worker.
    async fn backend_for(&self, w: &Arc<NsWorker>) -> DpResult<iptables::Backend> {
        if let Some(b) = w.backend.get() {
            return Ok(*b);
        }
        let wanted = self.cfg.iptables_backend;
        let b = w.run(move || iptables::resolve(wanted)).await?;
        Ok(*w.backend.get_or_init(|| b))
    }

    /// Runs an ipset request on the calling thread. The socket already lives in the node netns and
    /// the kernel answers in microseconds, so the hop to the blocking pool and back cost more than
    /// the request (two context switches per pod ADD, measured by acni-bench; a restore after a
    /// flush makes thousands of requests).
    async fn ipset_op<T, F>(&self, f: F) -> DpResult<Result<T, ipset::IpsetError>>
    where
        F: FnOnce(&mut ipset::IpsetSocket) -> Result<T, ipset::IpsetError>,
    {
        let mut g = self.ipset.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut g))
    }

    async fn job<T, F>(&self, w: Arc<NsWorker>, ns: &Ns, f: F) -> DpResult<T>
    where
        T: Send + 'static,
        F: FnOnce(iptables::Backend) -> Result<T, String> + Send + 'static,
    {
        let backend = self.backend_for(&w).await?;
        w.run(move || f(backend))
            .await?
            .map_err(|msg| DpError::Iptables {
                ns: ns.to_string(),
                msg,
            })
    }

    /// [`Firewall::podset_add_many`] for entries of one family.
    async fn ipset_add_family(
        &self,
        family: Family,
        entries: Vec<(IpAddr, String)>,
    ) -> Vec<DpResult<()>> {
        let name = self.cfg.ipset_name_of(family).to_string();
        // A bulk repair's adds run on a blocking thread, so that the route adds the reconciler
        // sends alongside (on this thread) go on meanwhile: ~10 ms at 10,000 entries, no longer
        // after the ~40 ms of routes (acni-bench). A few adds stay on this thread.
        let results = if entries.len() >= IPSET_THREAD_MIN {
            let sock = Arc::clone(&self.ipset);
            let (n, owned, set) = (entries.len(), entries.clone(), name.clone());
            let job = tokio::task::spawn_blocking(move || {
                let mut g = sock.lock().unwrap_or_else(|p| p.into_inner());
                g.add_many(&set, &owned)
            });
            match job.await {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("ipset batch thread: {e}");
                    return (0..n)
                        .map(|_| {
                            Err(DpError::Netlink {
                                what: format!("add to ipset {name}"),
                                msg: msg.clone(),
                            })
                        })
                        .collect();
                }
            }
        } else {
            let mut g = self.ipset.lock().unwrap_or_else(|p| p.into_inner());
            g.add_many(&name, &entries)
        };
        results
            .into_iter()
            .zip(&entries)
            .map(|(r, (ip, _))| {
                ipset_check(Intent::Create, || format!("add {ip} to ipset {name}"), r)
            })
            .collect()
    }
}

impl IptablesFirewall {
    pub(super) async fn podset_list(&self, family: Family) -> DpResult<IpsetState> {
        let name = self.cfg.ipset_name_of(family).to_string();
        let r = self.ipset_op(|s| s.list(&name)).await?;
        match r {
            Ok(m) => Ok(Some(m)),
            Err(ipset::IpsetError::Kernel(c)) if already_done(Intent::Find, c) => Ok(None),
            Err(e) => Err(DpError::Netlink {
                what: format!("list ipset {name}"),
                msg: e.to_string(),
            }),
        }
    }

    pub(super) async fn podset_visit<F: FnMut(IpAddr, &str) + Send>(
        &self,
        family: Family,
        f: F,
    ) -> DpResult<bool> {
        let name = self.cfg.ipset_name_of(family).to_string();
        let r = self.ipset_op(|s| s.list_visit(&name, f)).await?;
        match r {
            Ok(()) => Ok(true),
            Err(ipset::IpsetError::Kernel(c)) if already_done(Intent::Find, c) => Ok(false),
            Err(e) => Err(DpError::Netlink {
                what: format!("list ipset {name}"),
                msg: e.to_string(),
            }),
        }
    }

    pub(super) async fn podset_create(&self, family: Family) -> DpResult<()> {
        let name = self.cfg.ipset_name_of(family).to_string();
        let want_family = ipset::family_code(family);
        let r = self
            .ipset_op(|s| match s.create(&name, family) {
                Ok(_) => Ok(()),
                // Only a set with other parameters clashes (same ones are fine without
                // NLM_F_EXCL): accept it if it is a hash:ip set of the family, as a reconcile
                // can use it.
                Err(ipset::IpsetError::Kernel(libc::EEXIST)) => {
                    let h = s.header(&name)?;
                    if h.typename.as_deref() == Some("hash:ip") && h.family == Some(want_family) {
                        Ok(())
                    } else {
                        Err(ipset::IpsetError::Invalid(format!(
                            "a set of that name exists with type {:?} family {:?}",
                            h.typename, h.family
                        )))
                    }
                }
                Err(e) => Err(e),
            })
            .await?;
        let fam = if family.is_v6() { "inet6" } else { "inet" };
        ipset_check(
            Intent::Other,
            || format!("create ipset {name} hash:ip family {fam} comment"),
            r,
        )
    }

    pub(super) async fn podset_destroy(&self, family: Family) -> DpResult<()> {
        let name = self.cfg.ipset_name_of(family).to_string();
        let r = self.ipset_op(|s| s.destroy(&name)).await?;
        ipset_check(Intent::Remove, || format!("destroy ipset {name}"), r)
    }

    pub(super) async fn podset_add(&self, ip: IpAddr, owner: &str) -> DpResult<()> {
        let name = self.cfg.ipset_name_of(Family::of(ip));
        let r = self.ipset_op(|s| s.add(name, ip, owner)).await?;
        ipset_check(Intent::Create, || format!("add {ip} to ipset {name}"), r)
    }

    pub(super) async fn podset_add_many(&self, entries: &[(IpAddr, String)]) -> Vec<DpResult<()>> {
        // One pipelined batch per family (a plan sorts the pods by IP: IPv4 first), results put
        // back in the order of `entries`.
        let mut out: Vec<Option<DpResult<()>>> = (0..entries.len()).map(|_| None).collect();
        for family in Family::ALL {
            let (idx, part): (Vec<usize>, Vec<(IpAddr, String)>) = entries
                .iter()
                .enumerate()
                .filter(|(_, (ip, _))| Family::of(*ip) == family)
                .map(|(i, e)| (i, e.clone()))
                .unzip();
            if part.is_empty() {
                continue;
            }
            let results = self.ipset_add_family(family, part).await;
            for (i, r) in idx.into_iter().zip(results) {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(r);
                }
            }
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(DpError::Netlink {
                        what: "add to ipset".into(),
                        msg: "no result from the batch".into(),
                    })
                })
            })
            .collect()
    }

    pub(super) async fn podset_del(&self, ip: IpAddr) -> DpResult<()> {
        let name = self.cfg.ipset_name_of(Family::of(ip));
        let r = self.ipset_op(|s| s.del(name, ip)).await?;
        ipset_check(
            Intent::Remove,
            || format!("delete {ip} from ipset {name}"),
            r,
        )
    }

    pub(super) async fn chains_read(
        &self,
        w: Arc<NsWorker>,
        ns: &Ns,
        family: Family,
        chains: &[Chain],
    ) -> DpResult<IptablesState> {
        let chains = chains.to_vec();
        self.job(w, ns, move |b| iptables::read(b, family, &chains))
            .await
    }

    pub(super) async fn chains_apply(
        &self,
        w: Arc<NsWorker>,
        ns: &Ns,
        family: Family,
        chains: &[Chain],
    ) -> DpResult<()> {
        let chains = chains.to_vec();
        self.job(w, ns, move |b| iptables::apply(b, family, &chains))
            .await
    }

    pub(super) async fn chains_remove(
        &self,
        w: Arc<NsWorker>,
        ns: &Ns,
        family: Family,
        chains: &[Chain],
    ) -> DpResult<()> {
        let chains = chains.to_vec();
        self.job(w, ns, move |b| iptables::remove(b, family, &chains))
            .await
    }
}
