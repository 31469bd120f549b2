//! The registry of pod attachments the daemon knows, and the decisions made from it.
//!
//! A record is keyed by pod UID + ifname when the runtime gave a UID (a kubelet retry creates a new
//! sandbox, hence a new container ID, for the same pod), else by container ID + ifname. Each record
//! remembers its container ID so that a late DEL of an old sandbox does not remove its successor.
//! Every ADD gets a sequence number; when two records claim one IP (the IP was reused before the
//! old pod's DEL arrived), the newest owns it — so a late DEL of the old pod leaves the new pod's
//! kernel entries alone.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The key of one record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodKey {
    /// Pod UID when known, else the container ID.
    pub id: String,
    /// Interface name inside the pod.
    pub ifname: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.id, self.ifname)
    }
}

/// One pod attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// CNI_CONTAINERID of the sandbox that added it.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_NETNS at ADD.
    pub netns: String,
    /// Pod namespace, name, UID (from CNI_ARGS).
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID (may be empty).
    pub uid: String,
    /// CNI network name (for GC).
    pub network: String,
    /// IPv4 addresses of the pod.
    pub ips: Vec<Ipv4Addr>,
    /// The gateway the pod uses (a node-local address with ptp/bridge).
    pub gateway: Option<Ipv4Addr>,
    /// Host-side interface of the pod, if known.
    pub host_if: Option<String>,
    /// Redirected through ztunnel?
    pub enrolled: bool,
    /// Is this the node's ztunnel?
    pub ztunnel: bool,
    /// ADD order; the newest claim on an IP wins.
    pub seq: u64,
}

impl PodRecord {
    /// The key of this record.
    pub fn key(&self) -> PodKey {
        PodKey {
            id: if self.uid.is_empty() {
                self.container_id.clone()
            } else {
                self.uid.clone()
            },
            ifname: self.ifname.clone(),
        }
    }
    /// The owner string put into kernel objects (ipset comments): the pod UID, else container ID.
    pub fn owner(&self) -> &str {
        if self.uid.is_empty() {
            &self.container_id
        } else {
            &self.uid
        }
    }
    /// `namespace/name` for logs.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// All records, plus the IP owner index derived from them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    #[serde(with = "crate::model::map_as_pairs")]
    records: BTreeMap<PodKey, PodRecord>,
    next_seq: u64,
    /// (container ID, ifname) → key. Derived; rebuilt by [`Registry::reindex`] after loading.
    #[serde(skip)]
    by_cid: HashMap<(String, String), PodKey>,
    /// IP → keys of the records claiming it. Derived. A Vec, not a set: an IP almost always has
    /// one claimant, and a one-key BTreeSet allocates a whole B-tree node (~550 bytes) per IP.
    #[serde(skip)]
    by_ip: HashMap<Ipv4Addr, Vec<PodKey>>,
    /// Keys of the ztunnel records (a few at most). Derived: every pod ADD and DEL asks for the
    /// active ztunnel, and scanning all records for it grew with the node (acni-bench: ADD at
    /// 10,000 pods was ~0.2 ms slower than at 10).
    #[serde(skip)]
    ztunnels: Vec<PodKey>,
}

/// What an ADD changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Upsert {
    /// A new record.
    New,
    /// The same sandbox again (an ADD retry): nothing changed.
    Same,
    /// The record replaced an older one (new sandbox of the same pod or changed IPs).
    Replaced(Box<PodRecord>),
}

impl Registry {
    /// Insert or update a record; assigns its sequence number.
    pub fn upsert(&mut self, mut rec: PodRecord) -> Upsert {
        let key = rec.key();
        if let Some(old) = self.records.get(&key) {
            let mut cmp = rec.clone();
            cmp.seq = old.seq;
            if &cmp == old {
                return Upsert::Same;
            }
        }
        self.next_seq += 1;
        rec.seq = self.next_seq;
        self.index(&key, &rec);
        match self.records.insert(key.clone(), rec) {
            None => Upsert::New,
            Some(old) => {
                self.unindex(&key, &old);
                // The new record may share IPs or the container ID with the old one.
                if let Some(new) = self.records.get(&key).cloned() {
                    self.index(&key, &new);
                }
                Upsert::Replaced(Box::new(old))
            }
        }
    }

    fn index(&mut self, key: &PodKey, rec: &PodRecord) {
        self.by_cid
            .insert((rec.container_id.clone(), rec.ifname.clone()), key.clone());
        if rec.ztunnel && !self.ztunnels.contains(key) {
            self.ztunnels.push(key.clone());
        }
        for ip in &rec.ips {
            let keys = self.by_ip.entry(*ip).or_default();
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
    }

    fn unindex(&mut self, key: &PodKey, rec: &PodRecord) {
        let cid = (rec.container_id.clone(), rec.ifname.clone());
        if self.by_cid.get(&cid) == Some(key) {
            self.by_cid.remove(&cid);
        }
        if rec.ztunnel {
            self.ztunnels.retain(|k| k != key);
        }
        for ip in &rec.ips {
            if let Some(set) = self.by_ip.get_mut(ip) {
                set.retain(|k| k != key);
                if set.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    /// Put back a record loaded from the journal, keeping its sequence number.
    pub fn restore(&mut self, rec: PodRecord) {
        self.next_seq = self.next_seq.max(rec.seq);
        let key = rec.key();
        if let Some(old) = self.records.insert(key.clone(), rec.clone()) {
            self.unindex(&key, &old);
        }
        self.index(&key, &rec);
    }

    /// Rebuild the derived indexes (after deserializing).
    pub fn reindex(&mut self) {
        self.by_cid.clear();
        self.by_ip.clear();
        self.ztunnels.clear();
        let recs: Vec<(PodKey, PodRecord)> = self
            .records
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        for (k, r) in recs {
            self.index(&k, &r);
        }
    }

    /// Remove the record of this attachment if (and only if) it belongs to `container_id`.
    pub fn remove(&mut self, container_id: &str, ifname: &str) -> Option<PodRecord> {
        let key = self
            .by_cid
            .get(&(container_id.to_string(), ifname.to_string()))?
            .clone();
        self.remove_key(&key)
    }

    /// Remove a record by key (GC, sweeps).
    pub fn remove_key(&mut self, key: &PodKey) -> Option<PodRecord> {
        let rec = self.records.remove(key)?;
        self.unindex(key, &rec);
        Some(rec)
    }

    /// The record of this attachment, by container ID.
    pub fn find(&self, container_id: &str, ifname: &str) -> Option<&PodRecord> {
        let key = self
            .by_cid
            .get(&(container_id.to_string(), ifname.to_string()))?;
        self.records.get(key)
    }

    /// All records.
    pub fn records(&self) -> impl Iterator<Item = &PodRecord> {
        self.records.values()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// No records?
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The node's active ztunnel: the newest ztunnel record.
    pub fn ztunnel(&self) -> Option<&PodRecord> {
        self.ztunnels
            .iter()
            .filter_map(|k| self.records.get(k))
            .filter(|r| r.ztunnel)
            .max_by_key(|r| r.seq)
    }

    /// Owner of each enrolled IP: the newest enrolled record claiming it.
    pub fn enrolled_ips(&self) -> BTreeMap<Ipv4Addr, &PodRecord> {
        let mut out: BTreeMap<Ipv4Addr, &PodRecord> = BTreeMap::new();
        for r in self.records.values().filter(|r| r.enrolled) {
            for ip in &r.ips {
                match out.get(ip) {
                    Some(cur) if cur.seq > r.seq => {}
                    _ => {
                        out.insert(*ip, r);
                    }
                }
            }
        }
        out
    }

    /// The owner of one IP (constant-time enough: records holding the IP are few).
    pub fn owner_of(&self, ip: Ipv4Addr) -> Option<&PodRecord> {
        self.by_ip
            .get(&ip)?
            .iter()
            .filter_map(|k| self.records.get(k))
            .filter(|r| r.enrolled)
            .max_by_key(|r| r.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rec(cid: &str, uid: &str, ip: [u8; 4]) -> PodRecord {
        PodRecord {
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: format!("/var/run/netns/{cid}"),
            namespace: "default".into(),
            name: format!("pod-{cid}"),
            uid: uid.into(),
            network: "k8s".into(),
            ips: vec![Ipv4Addr::from(ip)],
            gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
            host_if: Some(format!("veth{cid}")),
            enrolled: true,
            ztunnel: false,
            seq: 0,
        }
    }

    #[test]
    fn ztunnel_is_the_newest_ztunnel_record_through_every_change() {
        let zt = |cid: &str, uid: &str, ip: u8| PodRecord {
            ztunnel: true,
            enrolled: false,
            ..rec(cid, uid, [10, 244, 1, ip])
        };
        let mut r = Registry::default();
        r.upsert(rec("p", "up", [10, 244, 1, 5]));
        assert!(r.ztunnel().is_none());
        r.upsert(zt("z1", "uz1", 2));
        r.upsert(zt("z2", "uz2", 3));
        assert_eq!(r.ztunnel().map(|z| z.container_id.as_str()), Some("z2"));
        // A new sandbox of the same ztunnel pod replaces its record.
        r.upsert(zt("z1b", "uz1", 4));
        assert_eq!(r.ztunnel().map(|z| z.container_id.as_str()), Some("z1b"));
        // The record turns into a plain pod: no longer a ztunnel.
        r.upsert(rec("z1c", "uz1", [10, 244, 1, 4]));
        assert_eq!(r.ztunnel().map(|z| z.container_id.as_str()), Some("z2"));
        let json = serde_json::to_string(&r).expect("serializable");
        let mut back: Registry = serde_json::from_str(&json).expect("parses");
        back.reindex();
        assert_eq!(back.ztunnel().map(|z| z.container_id.as_str()), Some("z2"));
        assert!(back.remove("z2", "eth0").is_some());
        assert!(back.ztunnel().is_none());
    }

    #[test]
    fn add_twice_is_same() {
        let mut r = Registry::default();
        assert_eq!(r.upsert(rec("a", "u1", [10, 244, 1, 7])), Upsert::New);
        assert_eq!(r.upsert(rec("a", "u1", [10, 244, 1, 7])), Upsert::Same);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn late_del_of_reused_ip_keeps_new_owner() {
        let mut r = Registry::default();
        r.upsert(rec("x", "ux", [10, 244, 1, 7]));
        r.upsert(rec("y", "uy", [10, 244, 1, 7]));
        let ip = Ipv4Addr::new(10, 244, 1, 7);
        assert_eq!(r.owner_of(ip).map(|p| p.uid.as_str()), Some("uy"));
        r.remove("x", "eth0");
        assert_eq!(r.owner_of(ip).map(|p| p.uid.as_str()), Some("uy"));
        assert_eq!(r.enrolled_ips().len(), 1);
    }

    #[test]
    fn del_of_old_sandbox_keeps_new_sandbox_of_same_pod() {
        let mut r = Registry::default();
        r.upsert(rec("s1", "u1", [10, 244, 1, 7]));
        assert!(matches!(
            r.upsert(rec("s2", "u1", [10, 244, 1, 8])),
            Upsert::Replaced(_)
        ));
        assert!(r.remove("s1", "eth0").is_none());
        assert_eq!(
            r.find("s2", "eth0").map(|p| p.ips.clone()),
            Some(vec![Ipv4Addr::new(10, 244, 1, 8)])
        );
    }

    #[test]
    fn indexes_survive_reindex_and_replacement() {
        let mut r = Registry::default();
        r.upsert(rec("s1", "u1", [10, 244, 1, 7]));
        r.upsert(rec("s2", "u1", [10, 244, 1, 7]));
        let json = serde_json::to_string(&r).expect("serializable");
        let mut back: Registry = serde_json::from_str(&json).expect("parses");
        back.reindex();
        let ip = Ipv4Addr::new(10, 244, 1, 7);
        assert_eq!(
            back.owner_of(ip).map(|p| p.container_id.as_str()),
            Some("s2")
        );
        assert!(back.find("s1", "eth0").is_none());
        assert!(back.remove("s2", "eth0").is_some());
        assert!(back.owner_of(ip).is_none());
    }
}
