//! Persistence of the registry: a snapshot plus an append-only journal, both tied to the boot ID.
//!
//! Every change is one journal line, written and `fdatasync`ed before the daemon answers the
//! plugin, so an acknowledged ADD survives `kill -9`. The cost is constant in the number of pods
//! (the snapshot is rewritten only every [`COMPACT_EVERY`] lines, atomically: temp file, fsync,
//! rename). After a reboot (another boot ID) the old state is meaningless — the netns and kernel
//! objects it described are gone — and is discarded. A torn last journal line (a crash mid-write)
//! is ignored.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::registry::{PodKey, PodRecord, Registry};

/// Journal lines between two snapshots.
pub const COMPACT_EVERY: usize = 4096;

const SNAPSHOT: &str = "registry.json";
pub(crate) const JOURNAL: &str = "registry.journal";

/// Errors of the store, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O on a state file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The snapshot did not parse.
    #[error("{path}: corrupt state: {msg}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        msg: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Deserialize)]
struct Snapshot {
    boot_id: String,
    registry: Registry,
}

/// What [`Snapshot`] reads, written from borrows: a compaction used to clone the whole registry
/// (~10 MB at 10,000 pods) on the ADD that triggered it.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    boot_id: &'a str,
    registry: &'a Registry,
}

/// One journal line.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Entry {
    /// A record was added or replaced (with its sequence number).
    Put {
        /// The record.
        rec: PodRecord,
    },
    /// A record was removed.
    Del {
        /// Its key.
        key: PodKey,
    },
}

/// The open store.
pub struct Store {
    dir: PathBuf,
    /// Open for appending; `None` only until the first [`Store::compact`] in `open`.
    journal: Option<File>,
    lines: usize,
    boot_id: String,
}

/// The current boot ID (empty if the kernel does not tell).
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Store {
    /// Open (creating) the state dir and load the registry it holds. Returns the store, the
    /// registry, and whether state from a previous boot was discarded.
    pub fn open(dir: &Path) -> Result<(Store, Registry, bool), StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let boot = boot_id();
        let snap_path = dir.join(SNAPSHOT);
        let journal_path = dir.join(JOURNAL);
        let mut discarded = false;
        let mut reg = match fs::read(&snap_path) {
            Ok(bytes) => {
                let snap: Snapshot =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: snap_path.clone(),
                        msg: e.to_string(),
                    })?;
                if snap.boot_id == boot {
                    snap.registry
                } else {
                    discarded = true;
                    Registry::default()
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Registry::default(),
            Err(e) => {
                return Err(StoreError::Io {
                    path: snap_path,
                    source: e,
                })
            }
        };
        // The journal's first line is its boot ID.
        if let Ok(f) = File::open(&journal_path) {
            let mut lines = BufReader::new(f).lines();
            let same_boot = matches!(lines.next(), Some(Ok(l)) if l.trim() == boot);
            if same_boot {
                for line in lines {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Entry>(&line) {
                        Ok(Entry::Put { rec }) => reg.restore(rec),
                        Ok(Entry::Del { key }) => {
                            reg.remove_key(&key);
                        }
                        // A torn tail from a crash mid-write: everything before it is intact.
                        Err(_) => break,
                    }
                }
            } else {
                discarded = true;
            }
        }
        reg.reindex();
        let mut store = Store {
            dir: dir.to_path_buf(),
            journal: None,
            lines: 0,
            boot_id: boot,
        };
        store.compact(&reg)?;
        Ok((store, reg, discarded))
    }

    /// Append one change and make it durable.
    pub fn append(&mut self, entry: &Entry, reg: &Registry) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(entry).map_err(|e| StoreError::Corrupt {
            path: self.dir.join(JOURNAL),
            msg: e.to_string(),
        })?;
        line.push(b'\n');
        let path = self.dir.join(JOURNAL);
        let journal = match self.journal.as_mut() {
            Some(j) => j,
            None => {
                return Err(StoreError::Io {
                    path,
                    source: io::Error::other("journal not open"),
                })
            }
        };
        journal.write_all(&line).map_err(io_err(&path))?;
        journal.sync_data().map_err(io_err(&path))?;
        self.lines += 1;
        if self.lines >= COMPACT_EVERY {
            self.compact(reg)?;
        }
        Ok(())
    }

    /// Write a snapshot atomically and start a new journal.
    pub fn compact(&mut self, reg: &Registry) -> Result<(), StoreError> {
        let snap_path = self.dir.join(SNAPSHOT);
        let tmp = self.dir.join(format!(".{SNAPSHOT}.tmp"));
        {
            // Streamed through a small buffer rather than built in memory (2.5 MB at 10,000 pods).
            let f = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut w = io::BufWriter::with_capacity(64 * 1024, f);
            serde_json::to_writer(
                &mut w,
                &SnapshotRef {
                    boot_id: &self.boot_id,
                    registry: reg,
                },
            )
            .map_err(|e| match e.io_error_kind() {
                Some(kind) => StoreError::Io {
                    path: tmp.clone(),
                    source: io::Error::new(kind, e),
                },
                None => StoreError::Corrupt {
                    path: snap_path.clone(),
                    msg: e.to_string(),
                },
            })?;
            let f = w.into_inner().map_err(|e| StoreError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &snap_path).map_err(io_err(&snap_path))?;
        // The snapshot now holds everything: start a fresh journal the same way (temp + rename).
        let jpath = self.dir.join(JOURNAL);
        let jtmp = self.dir.join(format!(".{JOURNAL}.tmp"));
        {
            let mut f = File::create(&jtmp).map_err(io_err(&jtmp))?;
            writeln!(f, "{}", self.boot_id).map_err(io_err(&jtmp))?;
            f.sync_all().map_err(io_err(&jtmp))?;
        }
        fs::rename(&jtmp, &jpath).map_err(io_err(&jpath))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.journal = Some(
            OpenOptions::new()
                .append(true)
                .open(&jpath)
                .map_err(io_err(&jpath))?,
        );
        self.lines = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn rec(cid: &str, ip: u8) -> PodRecord {
        PodRecord {
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: String::new(),
            namespace: "ns".into(),
            name: cid.into(),
            uid: format!("uid-{cid}"),
            network: "net".into(),
            ips: vec![Ipv4Addr::new(10, 244, 1, ip)],
            gateway: None,
            host_if: None,
            enrolled: true,
            ztunnel: false,
            seq: 0,
        }
    }

    #[test]
    fn journal_survives_reopen_and_keeps_sequence() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut st, mut reg, discarded) = Store::open(dir.path()).expect("open");
            assert!(!discarded);
            for (c, ip) in [("a", 7), ("b", 7), ("c", 9)] {
                reg.upsert(rec(c, ip));
                let r = reg.find(c, "eth0").cloned().expect("just added");
                st.append(&Entry::Put { rec: r }, &reg).expect("append");
            }
            let k = reg.find("c", "eth0").map(|r| r.key()).expect("c");
            reg.remove_key(&k);
            st.append(&Entry::Del { key: k }, &reg).expect("append");
        }
        let (_st, reg, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(reg.len(), 2);
        assert_eq!(
            reg.owner_of(Ipv4Addr::new(10, 244, 1, 7))
                .map(|r| r.container_id.as_str()),
            Some("b")
        );
    }

    #[test]
    fn torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (mut st, mut reg, _) = Store::open(dir.path()).expect("open");
            reg.upsert(rec("a", 7));
            let r = reg.find("a", "eth0").cloned().expect("a");
            st.append(&Entry::Put { rec: r }, &reg).expect("append");
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL))
            .expect("journal");
        f.write_all(b"{\"op\":\"put\",\"rec\":{\"contai")
            .expect("write");
        let (_st, reg, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn other_boot_is_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reg = Registry::default();
        reg.upsert(rec("a", 7));
        let snap = SnapshotRef {
            boot_id: "another-boot",
            registry: &reg,
        };
        fs::write(
            dir.path().join(SNAPSHOT),
            serde_json::to_vec(&snap).expect("json"),
        )
        .expect("write");
        let (_st, reg, discarded) = Store::open(dir.path()).expect("open");
        assert!(discarded);
        assert!(reg.is_empty());
    }
}
