//! Persistence of the registry: a snapshot plus an append-only journal, both tied to the boot ID.
//!
//! Every change is one journal line, written and `fdatasync`ed before the daemon answers the
//! plugin (and before its registry in memory changes for good: see `Daemon::persist`), so an
//! acknowledged ADD survives `kill -9`. The cost is constant in the number of pods (the snapshot
//! is rewritten only every [`COMPACT_EVERY`] lines, atomically: temp file, fsync, rename). After a
//! reboot (another boot ID) the old state is meaningless — the netns and kernel objects it
//! described are gone — and is discarded.
//!
//! Damage is survived, loudly, and never made permanent:
//! - a failed append (write or `fdatasync` error) is cut off again (the file is truncated back to
//!   its last whole line); if even that fails, the next append rewrites snapshot and journal from
//!   memory instead, so a fragment never glues onto the entry after it;
//! - replay reads every line: a damaged one (a torn write, garbage) is logged at error level with
//!   file, line number and byte offset and skipped, and replay goes on with the lines after it. A
//!   line that is a torn fragment with a whole entry glued after it (what a torn write followed by
//!   an append leaves) gives back that entry;
//! - the compaction at open rewrites the journal, so when anything was damaged the journal is first
//!   kept aside as `registry.journal.corrupt-<unix ms>` (a hard link, else a copy; if neither can be
//!   made the daemon refuses to start rather than lose it).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::registry::{PodKey, PodRecord, Registry};

/// Journal lines between two snapshots.
pub const COMPACT_EVERY: usize = 4096;

const SNAPSHOT: &str = "registry.json";
pub(crate) const JOURNAL: &str = "registry.journal";
/// How an entry line starts (serde writes the tag first): where a glued entry is looked for.
const ENTRY_START: &[u8] = b"{\"op\":";

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

/// A journal line that replay could not read whole (logged when found).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Its line number (1 = the boot ID).
    pub line: usize,
    /// The byte offset of its first byte in the file.
    pub offset: usize,
    /// The bytes that were dropped.
    pub dropped: usize,
    /// A whole entry followed the torn fragment on that line and was read.
    pub recovered: bool,
}

/// A fault for the store's tests to inject into the next append.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    /// The write stores the first `n` bytes of the line, then fails as on a full disk.
    ShortWrite(usize),
    /// The whole line is written, then its `fdatasync` fails as on a failing disk.
    Sync,
}

/// The open store.
pub struct Store {
    dir: PathBuf,
    /// Open for appending; `None` until the first [`Store::compact`] in `open`, or after a
    /// compaction that replaced the journal but could not reopen it (the next append compacts).
    journal: Option<File>,
    lines: usize,
    /// The journal's length up to its last whole, durable line.
    good_len: u64,
    /// A failed append may have left a fragment past `good_len`.
    torn: bool,
    boot_id: String,
    /// What replay at open found damaged.
    damage: Vec<Damage>,
    #[cfg(test)]
    fault: Option<Fault>,
    /// The test wants cutting a failed append off to fail too.
    #[cfg(test)]
    cut_fails: bool,
}

/// The current boot ID (empty if the kernel does not tell).
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn apply(reg: &mut Registry, entry: Entry) {
    match entry {
        Entry::Put { rec } => reg.restore(rec),
        Entry::Del { key } => {
            reg.remove_key(&key);
        }
    }
}

/// One journal line: its entry, after how many bytes of a torn fragment it starts.
fn parse_line(line: &[u8]) -> Option<(usize, Entry)> {
    if let Ok(e) = serde_json::from_slice(line) {
        return Some((0, e));
    }
    // A torn write followed by an append: fragment, then a whole entry, on one line. The entry
    // starts at a later `{"op":` (inside an entry that text is only ever escaped).
    let mut from = 1;
    while from < line.len() {
        let at = from
            + line[from..]
                .windows(ENTRY_START.len())
                .position(|w| w == ENTRY_START)?;
        if let Ok(e) = serde_json::from_slice(&line[at..]) {
            return Some((at, e));
        }
        from = at + 1;
    }
    None
}

/// Replays a journal into `reg`. `None`: it is of another boot. Otherwise the damaged lines, each
/// logged (replay skips them and goes on).
fn replay(path: &Path, bytes: &[u8], boot: &str, reg: &mut Registry) -> Option<Vec<Damage>> {
    let mut damage = Vec::new();
    if bytes.is_empty() {
        return Some(damage);
    }
    let mut pieces = bytes.split_inclusive(|&b| b == b'\n');
    // The journal's first line is its boot ID (written whole by a compaction: temp + rename).
    let first = pieces.next().unwrap_or_default();
    if String::from_utf8_lossy(first).trim() != boot {
        return None;
    }
    let mut offset = first.len();
    for (i, piece) in pieces.enumerate() {
        let (line_no, at) = (i + 2, offset);
        offset += piece.len();
        let line = piece.strip_suffix(b"\n").unwrap_or(piece);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let tail = if piece.ends_with(b"\n") {
            ""
        } else {
            " (the last line, without its newline)"
        };
        match parse_line(line) {
            Some((0, e)) => apply(reg, e),
            Some((skip, e)) => {
                warn!(
                    file = %path.display(),
                    line = line_no,
                    offset = at,
                    dropped = skip,
                    "journal line {line_no}{tail} starts with a torn fragment of {skip} bytes (a \
                     failed write); the entry after it was read, replay goes on"
                );
                damage.push(Damage {
                    line: line_no,
                    offset: at,
                    dropped: skip,
                    recovered: true,
                });
                apply(reg, e);
            }
            None => {
                error!(
                    file = %path.display(),
                    line = line_no,
                    offset = at,
                    dropped = line.len(),
                    "journal line {line_no}{tail} is damaged (a torn write?); skipped, replay goes \
                     on with the lines after it"
                );
                damage.push(Damage {
                    line: line_no,
                    offset: at,
                    dropped: line.len(),
                    recovered: false,
                });
            }
        }
    }
    Some(damage)
}

/// Keeps a damaged journal as `registry.journal.corrupt-<unix ms>` before the compaction at
/// open replaces it: a hard link (no copy, atomic), else a copy.
fn keep_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let aside = path.with_file_name(format!("{JOURNAL}.corrupt-{ms}"));
    if fs::hard_link(path, &aside).is_err() {
        fs::copy(path, &aside).map_err(io_err(&aside))?;
    }
    Ok(aside)
}

/// The file in the state dir naming the firewall driver of the last run whose objects are all in
/// place (`iptables` or `nftables`).
pub const FIREWALL: &str = "firewall";

/// The firewall driver of the last run on this state dir, if it recorded one.
pub fn last_firewall(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(FIREWALL))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Records `name` as this run's firewall driver (written to a temporary file, then renamed).
pub fn record_firewall(dir: &Path, name: &str) -> Result<(), StoreError> {
    let path = dir.join(FIREWALL);
    let tmp = dir.join(format!("{FIREWALL}.tmp"));
    fs::write(&tmp, format!("{name}\n")).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// The lock file in the state dir: held (`flock`, exclusive) by the one daemon serving it.
pub const LOCK: &str = "daemon.lock";

/// Holds the state dir for this process: a second `ambient-cnid run` on the same state dir (a
/// rolling update's next pod, a run by hand) would fight the first over the kernel objects and
/// the journal. Waits up to `wait` for a holder to stop (a rolling update's old pod shutting
/// down), then fails naming the dir. The kernel drops the lock when the holder dies (`kill -9`
/// leaves no stale lock).
pub fn lock_state_dir(
    dir: &Path,
    wait: std::time::Duration,
) -> Result<nix::fcntl::Flock<File>, StoreError> {
    use nix::fcntl::{Flock, FlockArg};
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(LOCK);
    let deadline = std::time::Instant::now() + wait;
    let mut warned = false;
    loop {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                if !warned {
                    warn!(lock = %path.display(), "another ambient-cnid holds the state dir; waiting for it to stop");
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err((_, e)) => {
                return Err(StoreError::Io {
                    path: path.clone(),
                    source: if e == nix::errno::Errno::EWOULDBLOCK {
                        io::Error::new(
                            io::ErrorKind::WouldBlock,
                            format!("another ambient-cnid still holds it after {wait:?}"),
                        )
                    } else {
                        io::Error::from(e)
                    },
                })
            }
        }
    }
}

impl Store {
    /// Open (creating) the state dir and load the registry it holds. Returns the store, the
    /// registry, and whether state from a previous boot was discarded. Damaged journal lines are
    /// logged and skipped ([`Store::damage`]); the journal that held them is kept aside.
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
        let damage = match fs::read(&journal_path) {
            Ok(bytes) => match replay(&journal_path, &bytes, &boot, &mut reg) {
                Some(damage) => damage,
                None => {
                    discarded = true;
                    Vec::new()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            // Unreadable is not empty: compacting now would drop what it holds.
            Err(e) => {
                return Err(StoreError::Io {
                    path: journal_path,
                    source: e,
                })
            }
        };
        if !damage.is_empty() {
            let aside = keep_aside(&journal_path)?;
            error!(
                file = %journal_path.display(),
                damaged_lines = damage.len(),
                recovered = damage.iter().filter(|d| d.recovered).count(),
                kept_as = %aside.display(),
                "the journal had damaged lines; the damaged journal is kept aside"
            );
        }
        reg.reindex();
        let mut store = Store {
            dir: dir.to_path_buf(),
            journal: None,
            lines: 0,
            good_len: 0,
            torn: false,
            boot_id: boot,
            damage,
            #[cfg(test)]
            fault: None,
            #[cfg(test)]
            cut_fails: false,
        };
        store.compact(&reg)?;
        Ok((store, reg, discarded))
    }

    /// The journal lines the replay at open found damaged.
    pub fn damage(&self) -> &[Damage] {
        &self.damage
    }

    /// Append one change and make it durable. `reg` is the registry with the change applied (a
    /// compaction writes it). On an error the change is not in the state files (the caller
    /// undoes it in memory), and no fragment of it is left for the next append to glue onto.
    pub fn append(&mut self, entry: &Entry, reg: &Registry) -> Result<(), StoreError> {
        let path = self.dir.join(JOURNAL);
        let mut line = serde_json::to_vec(entry).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        line.push(b'\n');
        if self.torn {
            if let Err(e) = self.cut_back() {
                // The fragment of an earlier failed append is still there: rewrite the state
                // from memory (which holds this change too); the fresh journal has no fragment.
                warn!(file = %path.display(), error = %e, "cannot cut off a failed journal append; rewriting the state files");
                return self.compact(reg);
            }
        }
        if self.journal.is_none() {
            return self.compact(reg);
        }
        if let Err(e) = self.write_line(&line) {
            // Cut the partial line off at once: `kill -9` before the next append must not find
            // a fragment either (replay would skip it, but it would not glue onto anything).
            self.torn = true;
            if let Err(cut) = self.cut_back() {
                error!(file = %path.display(), error = %cut, "cannot cut off a failed journal append; the next change rewrites the state files");
            }
            return Err(StoreError::Io { path, source: e });
        }
        self.good_len += line.len() as u64;
        self.lines += 1;
        if self.lines >= COMPACT_EVERY {
            if let Err(e) = self.compact(reg) {
                // The change is durable in the journal already: the journal grows until a
                // compaction succeeds (replaying it over a newer snapshot gives the same state).
                warn!(error = %e, "compacting the state failed; the journal keeps growing");
            }
        }
        Ok(())
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let j = self
            .journal
            .as_mut()
            .ok_or_else(|| io::Error::other("journal not open"))?;
        #[cfg(test)]
        match self.fault.take() {
            Some(Fault::ShortWrite(n)) => {
                j.write_all(&line[..n.min(line.len())])?;
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "injected: no space left on device",
                ));
            }
            Some(Fault::Sync) => {
                j.write_all(line)?;
                return Err(io::Error::other("injected: fdatasync failed"));
            }
            None => {}
        }
        j.write_all(line)?;
        j.sync_data()
    }

    /// Truncates the journal back to its last whole line (after a failed append).
    fn cut_back(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if self.cut_fails {
            return Err(io::Error::other("injected: ftruncate failed"));
        }
        let j = self
            .journal
            .as_ref()
            .ok_or_else(|| io::Error::other("journal not open"))?;
        j.set_len(self.good_len)?;
        j.sync_data()?;
        self.torn = false;
        Ok(())
    }

    /// Makes the next append fail with `fault` (and cutting it off fail too if `cut_fails`).
    #[cfg(test)]
    pub(crate) fn inject(&mut self, fault: Fault, cut_fails: bool) {
        self.fault = Some(fault);
        self.cut_fails = cut_fails;
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
        // Until the rename the old journal stays in use: replaying it over the new snapshot gives
        // the same state.
        let jpath = self.dir.join(JOURNAL);
        let jtmp = self.dir.join(format!(".{JOURNAL}.tmp"));
        {
            let mut f = File::create(&jtmp).map_err(io_err(&jtmp))?;
            writeln!(f, "{}", self.boot_id).map_err(io_err(&jtmp))?;
            f.sync_all().map_err(io_err(&jtmp))?;
        }
        fs::rename(&jtmp, &jpath).map_err(io_err(&jpath))?;
        // The old journal (and any fragment in it) is gone; until the new one is open, appends
        // compact instead.
        self.journal = None;
        self.torn = false;
        self.lines = 0;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let j = OpenOptions::new()
            .append(true)
            .open(&jpath)
            .map_err(io_err(&jpath))?;
        self.good_len = j.metadata().map_err(io_err(&jpath))?.len();
        self.journal = Some(j);
        Ok(())
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
