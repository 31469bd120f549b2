//! The registry of pod attachments the daemon knows, and the decisions made from it.
//!
//! A record is keyed by pod UID + ifname when the runtime gave a UID (a kubelet retry creates a new
//! sandbox, hence a new container ID, for the same pod), else by container ID + ifname. Each record
//! remembers its container ID so that a late DEL of an old sandbox does not remove its successor.
//! Every ADD gets a sequence number; when two records claim one IP (the IP was reused before the
//! old pod's DEL arrived), the newest owns it — so a late DEL of the old pod leaves the new pod's
//! kernel entries alone.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    /// Addresses of the pod, of both families (a journal written before dual stack holds IPv4
    /// strings here, which read as the same `IpAddr`s).
    pub ips: Vec<IpAddr>,
    /// The IPv4 gateway the pod uses (a node-local address with ptp/bridge).
    pub gateway: Option<Ipv4Addr>,
    /// The IPv6 gateway the pod uses (absent from records written before dual stack, and from
    /// IPv4-only pods' records, whose serialized form is as it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
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
    /// The gateway of family `f`.
    pub fn gateway_of(&self, f: crate::model::Family) -> Option<IpAddr> {
        match f {
            crate::model::Family::V4 => self.gateway.map(IpAddr::V4),
            crate::model::Family::V6 => self.gateway6.map(IpAddr::V6),
        }
    }
    /// `namespace/name` for logs.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// All records, plus the indexes derived from them.
///
/// Memory is per pod, so the layout is compact (acni-bench at 10,000 pods, massif): the records sit
/// in one `Vec` and every index holds `u32` positions into it, hashed from the record's own
/// fields, instead of a `BTreeMap<PodKey, _>` plus maps of cloned keys (each index entry used to
/// copy the container ID, ifname and pod UID: ~10 MB at 10,000 pods, now ~1.5 MB). Iteration
/// order is not meaningful; the snapshot is written sorted by key.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    records: Vec<PodRecord>,
    next_seq: u64,
    hasher: RandomState,
    /// Key (pod UID else container ID, ifname) → position. Unique.
    by_key: HashTable<u32>,
    /// (container ID, ifname) → position of the record that sandbox added.
    by_cid: HashTable<u32>,
    /// IP → positions of the records claiming it (an IP almost always has one claimant; a
    /// multimap: one entry per claim).
    by_ip: HashTable<(IpAddr, u32)>,
    /// Positions of the ztunnel records (a few at most): every pod ADD and DEL asks for the active
    /// ztunnel, and scanning all records for it grew with the node (acni-bench: ADD at 10,000
    /// pods was ~0.2 ms slower than at 10).
    ztunnels: Vec<u32>,
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

/// The same record apart from its sequence number?
fn same_but_seq(a: &PodRecord, b: &PodRecord) -> bool {
    let PodRecord {
        container_id,
        ifname,
        netns,
        namespace,
        name,
        uid,
        network,
        ips,
        gateway,
        gateway6,
        host_if,
        enrolled,
        ztunnel,
        seq: _,
    } = a;
    *container_id == b.container_id
        && *ifname == b.ifname
        && *netns == b.netns
        && *namespace == b.namespace
        && *name == b.name
        && *uid == b.uid
        && *network == b.network
        && *ips == b.ips
        && *gateway == b.gateway
        && *gateway6 == b.gateway6
        && *host_if == b.host_if
        && *enrolled == b.enrolled
        && *ztunnel == b.ztunnel
}

/// The key of a record, borrowed: (pod UID else container ID, ifname).
fn key_of(r: &PodRecord) -> (&str, &str) {
    (r.owner(), &r.ifname)
}

impl Registry {
    fn hash_pair(&self, a: &str, b: &str) -> u64 {
        self.hasher.hash_one((a, b))
    }

    fn hash_ip(&self, ip: IpAddr) -> u64 {
        self.hasher.hash_one(ip)
    }

    fn pos_of_key(&self, id: &str, ifname: &str) -> Option<usize> {
        let recs = &self.records;
        self.by_key
            .find(self.hash_pair(id, ifname), |&i| {
                key_of(&recs[i as usize]) == (id, ifname)
            })
            .map(|&i| i as usize)
    }

    fn pos_of_cid(&self, container_id: &str, ifname: &str) -> Option<usize> {
        let recs = &self.records;
        self.by_cid
            .find(self.hash_pair(container_id, ifname), |&i| {
                let r = &recs[i as usize];
                r.container_id == container_id && r.ifname == ifname
            })
            .map(|&i| i as usize)
    }

    /// Insert or update a record; assigns its sequence number.
    pub fn upsert(&mut self, mut rec: PodRecord) -> Upsert {
        let (id, ifname) = key_of(&rec);
        let pos = self.pos_of_key(id, ifname);
        if let Some(p) = pos {
            if same_but_seq(&rec, &self.records[p]) {
                return Upsert::Same;
            }
        }
        self.next_seq += 1;
        rec.seq = self.next_seq;
        match pos {
            None => {
                self.push(rec);
                Upsert::New
            }
            Some(p) => {
                self.unindex(p);
                let old = std::mem::replace(&mut self.records[p], rec);
                self.index(p);
                Upsert::Replaced(Box::new(old))
            }
        }
    }

    fn push(&mut self, rec: PodRecord) {
        let p = self.records.len();
        self.records.push(rec);
        self.index(p);
    }

    /// Adds the index entries of the record at `p` (its key must not be indexed yet).
    fn index(&mut self, p: usize) {
        let pi = p as u32;
        let r = &self.records[p];
        let (id, ifname) = key_of(r);
        let h = self.hash_pair(id, ifname);
        self.by_key.insert_unique(h, pi, |&i| {
            let r = &self.records[i as usize];
            self.hasher.hash_one(key_of(r))
        });
        // A container ID names one record: a record of another key added by the same sandbox
        // loses the by-container-ID entry (as the map this replaces did).
        let h = self.hash_pair(&r.container_id, &r.ifname);
        let recs = &self.records;
        let hasher = &self.hasher;
        match self.by_cid.entry(
            h,
            |&i| {
                let o = &recs[i as usize];
                o.container_id == r.container_id && o.ifname == r.ifname
            },
            |&i| {
                let o = &recs[i as usize];
                hasher.hash_one((o.container_id.as_str(), o.ifname.as_str()))
            },
        ) {
            Entry::Occupied(mut e) => *e.get_mut() = pi,
            Entry::Vacant(e) => {
                e.insert(pi);
            }
        }
        if r.ztunnel && !self.ztunnels.contains(&pi) {
            self.ztunnels.push(pi);
        }
        for ip in &r.ips {
            let h = hasher.hash_one(*ip);
            if self.by_ip.find(h, |&(a, i)| a == *ip && i == pi).is_none() {
                self.by_ip
                    .insert_unique(h, (*ip, pi), |&(a, _)| hasher.hash_one(a));
            }
        }
    }

    /// Drops the index entries of the record at `p`.
    fn unindex(&mut self, p: usize) {
        let pi = p as u32;
        let r = &self.records[p];
        let (id, ifname) = key_of(r);
        if let Ok(e) = self
            .by_key
            .find_entry(self.hash_pair(id, ifname), |&i| i == pi)
        {
            e.remove();
        }
        if let Ok(e) = self
            .by_cid
            .find_entry(self.hash_pair(&r.container_id, &r.ifname), |&i| i == pi)
        {
            e.remove();
        }
        self.ztunnels.retain(|&i| i != pi);
        for ip in &r.ips {
            let h = self.hasher.hash_one(*ip);
            if let Ok(e) = self.by_ip.find_entry(h, |&(a, i)| a == *ip && i == pi) {
                e.remove();
            }
        }
    }

    /// The record at `from` moved to `to`: point its index entries there.
    fn reposition(&mut self, from: usize, to: usize) {
        let (fi, ti) = (from as u32, to as u32);
        let r = &self.records[to];
        let (id, ifname) = key_of(r);
        if let Some(i) = self
            .by_key
            .find_mut(self.hash_pair(id, ifname), |&i| i == fi)
        {
            *i = ti;
        }
        if let Some(i) = self
            .by_cid
            .find_mut(self.hash_pair(&r.container_id, &r.ifname), |&i| i == fi)
        {
            *i = ti;
        }
        for z in self.ztunnels.iter_mut().filter(|z| **z == fi) {
            *z = ti;
        }
        for ip in &r.ips {
            let h = self.hasher.hash_one(*ip);
            if let Some(e) = self.by_ip.find_mut(h, |&(a, i)| a == *ip && i == fi) {
                e.1 = ti;
            }
        }
    }

    /// Removes the record at `p` (the last record takes its place).
    fn take(&mut self, p: usize) -> PodRecord {
        self.unindex(p);
        let last = self.records.len() - 1;
        let rec = self.records.swap_remove(p);
        if p != last {
            self.reposition(last, p);
        }
        rec
    }

    /// Put back a record loaded from the journal, keeping its sequence number.
    pub fn restore(&mut self, rec: PodRecord) {
        self.next_seq = self.next_seq.max(rec.seq);
        let (id, ifname) = key_of(&rec);
        match self.pos_of_key(id, ifname) {
            Some(p) => {
                self.unindex(p);
                self.records[p] = rec;
                self.index(p);
            }
            None => self.push(rec),
        }
    }

    /// Rebuild the derived indexes (the indexes are built as records come in, so this is only a
    /// consistency reset) and return spare capacity.
    pub fn reindex(&mut self) {
        self.by_key.clear();
        self.by_cid.clear();
        self.by_ip.clear();
        self.ztunnels.clear();
        self.records.shrink_to_fit();
        for p in 0..self.records.len() {
            self.index(p);
        }
    }

    /// Remove the record of this attachment if (and only if) it belongs to `container_id`.
    pub fn remove(&mut self, container_id: &str, ifname: &str) -> Option<PodRecord> {
        let p = self.pos_of_cid(container_id, ifname)?;
        Some(self.take(p))
    }

    /// Remove a record by key (GC, sweeps).
    pub fn remove_key(&mut self, key: &PodKey) -> Option<PodRecord> {
        let p = self.pos_of_key(&key.id, &key.ifname)?;
        Some(self.take(p))
    }

    /// The record of this attachment, by container ID.
    pub fn find(&self, container_id: &str, ifname: &str) -> Option<&PodRecord> {
        self.pos_of_cid(container_id, ifname)
            .map(|p| &self.records[p])
    }

    /// All records (in no particular order).
    pub fn records(&self) -> impl Iterator<Item = &PodRecord> {
        self.records.iter()
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
            .map(|&i| &self.records[i as usize])
            .filter(|r| r.ztunnel)
            .max_by_key(|r| r.seq)
    }

    /// Owner of each enrolled IP: the newest enrolled record claiming it.
    pub fn enrolled_ips(&self) -> BTreeMap<IpAddr, &PodRecord> {
        let mut out: BTreeMap<IpAddr, &PodRecord> = BTreeMap::new();
        for r in self.records.iter().filter(|r| r.enrolled) {
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

    /// Every record that claims `ip`, enrolled or not, in no order (through the IP index: the
    /// records holding one IP are few, so this is constant-time enough for the per-pod path).
    pub fn claimants(&self, ip: IpAddr) -> impl Iterator<Item = &PodRecord> {
        self.by_ip
            .iter_hash(self.hash_ip(ip))
            .filter(move |(a, _)| *a == ip)
            .map(|&(_, i)| &self.records[i as usize])
    }

    /// The owner of one IP: the newest enrolled record claiming it.
    pub fn owner_of(&self, ip: IpAddr) -> Option<&PodRecord> {
        self.claimants(ip)
            .filter(|r| r.enrolled)
            .max_by_key(|r| r.seq)
    }
}

/// The serialized form (state file, `dump`): `{"records": [[key, record], …], "next_seq": n}`,
/// sorted by key, as when the records were a `BTreeMap<PodKey, PodRecord>`.
impl Serialize for Registry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct KeyRef<'a> {
            id: &'a str,
            ifname: &'a str,
        }
        struct Sorted<'a>(Vec<&'a PodRecord>);
        impl Serialize for Sorted<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|r| {
                    let (id, ifname) = key_of(r);
                    (KeyRef { id, ifname }, *r)
                }))
            }
        }
        let mut recs: Vec<&PodRecord> = self.records.iter().collect();
        recs.sort_unstable_by(|a, b| key_of(a).cmp(&key_of(b)));
        let mut st = s.serialize_struct("Registry", 2)?;
        st.serialize_field("records", &Sorted(recs))?;
        st.serialize_field("next_seq", &self.next_seq)?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for Registry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Repr {
            records: Vec<(PodKey, PodRecord)>,
            next_seq: u64,
        }
        let repr = Repr::deserialize(d)?;
        let mut reg = Registry {
            next_seq: repr.next_seq,
            ..Registry::default()
        };
        reg.records.reserve_exact(repr.records.len());
        for (_, rec) in repr.records {
            // Later pairs win, as they did when collected into a map.
            reg.restore(rec);
        }
        reg.next_seq = repr.next_seq;
        Ok(reg)
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
            ips: vec![Ipv4Addr::from(ip).into()],
            gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
            gateway6: None,
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

    /// The indexes hold positions into the record list, and a removal moves the last record
    /// into the hole: every lookup must still find every record, after any mix of changes.
    #[test]
    fn indexes_follow_records_through_removals_and_replacements() {
        let mut r = Registry::default();
        for i in 0..200u8 {
            r.upsert(rec(&format!("c{i}"), &format!("u{i}"), [10, 244, 2, i]));
        }
        r.upsert(PodRecord {
            ztunnel: true,
            enrolled: false,
            ..rec("zt", "uzt", [10, 244, 3, 1])
        });
        for i in (0..200u8).step_by(3) {
            assert!(r.remove(&format!("c{i}"), "eth0").is_some());
        }
        for i in (1..200u8).step_by(7).filter(|i| i % 3 != 0) {
            // A new sandbox of the same pod, with a new IP.
            r.upsert(rec(&format!("d{i}"), &format!("u{i}"), [10, 244, 4, i]));
        }
        let check = |r: &Registry| {
            assert_eq!(r.ztunnel().map(|z| z.uid.as_str()), Some("uzt"));
            for i in 0..200u8 {
                let gone = i % 3 == 0;
                let moved = !gone && i % 7 == 1;
                let (cid, ip) = if moved {
                    (format!("d{i}"), [10, 244, 4, i])
                } else {
                    (format!("c{i}"), [10, 244, 2, i])
                };
                let found = r.find(&cid, "eth0").map(|p| p.uid.clone());
                let owner = r.owner_of(Ipv4Addr::from(ip).into()).map(|p| p.uid.clone());
                let want = (!gone).then(|| format!("u{i}"));
                assert_eq!(found, want, "find {cid}");
                assert_eq!(owner, want, "owner of {ip:?}");
                if moved {
                    assert!(r.find(&format!("c{i}"), "eth0").is_none());
                    assert!(r.owner_of(Ipv4Addr::from([10, 244, 2, i]).into()).is_none());
                }
            }
            assert_eq!(r.len(), 200 - 67 + 1);
        };
        check(&r);
        let json = serde_json::to_string(&r).expect("serializable");
        let back: Registry = serde_json::from_str(&json).expect("parses");
        check(&back);
        assert_eq!(serde_json::to_string(&back).expect("serializable"), json);
        assert!(r
            .remove_key(&PodKey {
                id: "uzt".into(),
                ifname: "eth0".into()
            })
            .is_some());
        assert!(r.ztunnel().is_none());
    }

    /// The state file keeps the format of the `BTreeMap<PodKey, PodRecord>` it was: pairs sorted
    /// by key, then `next_seq`.
    #[test]
    fn serialized_as_sorted_key_record_pairs() {
        let mut r = Registry::default();
        r.upsert(rec("b", "", [10, 244, 1, 2]));
        r.upsert(rec("a", "", [10, 244, 1, 3]));
        let v: serde_json::Value = serde_json::to_value(&r).expect("serializable");
        let keys: Vec<&str> = v["records"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|p| p[0]["id"].as_str().expect("id"))
            .collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(v["records"][0][0]["ifname"], "eth0");
        assert_eq!(v["records"][0][1]["container_id"], "a");
        assert_eq!(v["next_seq"], 2);
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
        let ip = IpAddr::from(Ipv4Addr::new(10, 244, 1, 7));
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
            Some(vec![IpAddr::from(Ipv4Addr::new(10, 244, 1, 8))])
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
        let ip = IpAddr::from(Ipv4Addr::new(10, 244, 1, 7));
        assert_eq!(
            back.owner_of(ip).map(|p| p.container_id.as_str()),
            Some("s2")
        );
        assert!(back.find("s1", "eth0").is_none());
        assert!(back.remove("s2", "eth0").is_some());
        assert!(back.owner_of(ip).is_none());
    }

    /// A record as the IPv4-only version wrote it (its exact field set, `ips` as IPv4 strings,
    /// no `gateway6`) still loads, and an IPv4-only record is written back the same way.
    #[test]
    fn a_record_written_before_dual_stack_loads_and_round_trips() {
        let old = r#"{"container_id":"c1","ifname":"eth0","netns":"/var/run/netns/c1","namespace":"default","name":"app","uid":"u1","network":"k8s","ips":["10.244.1.5"],"gateway":"10.244.1.1","host_if":"veth1","enrolled":true,"ztunnel":false,"seq":7}"#;
        let r: PodRecord = serde_json::from_str(old).expect("old record loads");
        assert_eq!(r.ips, vec![IpAddr::from(Ipv4Addr::new(10, 244, 1, 5))]);
        assert_eq!(r.gateway, Some(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(r.gateway6, None);
        assert_eq!(serde_json::to_string(&r).expect("serializable"), old);
        // A dual-stack record keeps both families and its IPv6 gateway.
        let mut d = r.clone();
        d.ips.push("fd00:10:244:1::5".parse().expect("v6"));
        d.gateway6 = Some("fd00:10:244:1::1".parse().expect("v6"));
        let text = serde_json::to_string(&d).expect("serializable");
        assert!(
            text.contains(r#""ips":["10.244.1.5","fd00:10:244:1::5"]"#),
            "{text}"
        );
        let back: PodRecord = serde_json::from_str(&text).expect("loads");
        assert_eq!(back, d);
    }

    #[test]
    fn an_ipv6_address_reused_by_another_pod_belongs_to_the_newest() {
        let v6: IpAddr = "fd00:10:244:1::7".parse().expect("v6");
        let dual = |cid: &str, uid: &str, last: u8| PodRecord {
            ips: vec![Ipv4Addr::new(10, 244, 1, last).into(), v6],
            ..rec(cid, uid, [10, 244, 1, last])
        };
        let mut r = Registry::default();
        r.upsert(dual("x", "ux", 7));
        // Another pod gets the same IPv6 address (and another IPv4 one) before x's DEL.
        r.upsert(dual("y", "uy", 8));
        assert_eq!(r.owner_of(v6).map(|p| p.uid.as_str()), Some("uy"));
        r.remove("x", "eth0");
        assert_eq!(r.owner_of(v6).map(|p| p.uid.as_str()), Some("uy"));
        assert!(r.owner_of(Ipv4Addr::new(10, 244, 1, 7).into()).is_none());
        assert_eq!(r.enrolled_ips().len(), 2);
    }
}
