//! Atomic file replacement and our temp-file naming.
//!
//! Every write goes to a temp file in the target's directory (same filesystem, so `rename` is
//! atomic), is fsynced, gets its final mode and owner, and is renamed over the target; then the
//! directory is fsynced so the rename survives a crash. Readers (kubelet, containerd, CRI-O, a
//! running plugin exec) see the old file or the new one, never a partial one.
//!
//! Temp names look like `.<target>.acni-tmp-<pid>-<nanos>-<n>`: hidden, and never ending in
//! `.conf`, `.conflist` or `.json`, so a runtime listing the conf dir never loads one, and the
//! watcher can ignore them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::InstallError;

/// The marker inside every temp name we create.
pub const TEMP_MARKER: &str = ".acni-tmp-";

/// Temp files of ours older than this are leftovers of a crash and get removed. Younger ones may
/// belong to a concurrent installer (an overlapping pod during a rollout) and are left alone.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(60);

/// Whether `name` is one of our temp names.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARKER)
}

fn temp_name(target_name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        ".{target_name}{TEMP_MARKER}{}-{nanos:x}-{n}",
        std::process::id()
    )
}

/// The file's final attributes.
#[derive(Debug, Clone, Copy)]
pub struct Attrs {
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Owner to restore, when known (the original file's uid/gid).
    pub owner: Option<(u32, u32)>,
}

/// A temp file that removes itself unless it was renamed into place.
struct Temp {
    path: PathBuf,
    done: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temp file");
            }
        }
    }
}

/// Replaces (or creates) `dir/name` atomically with what `fill` writes.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    attrs: Attrs,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<PathBuf, InstallError> {
    let target = dir.join(name);
    let mut temp = Temp {
        path: dir.join(temp_name(name)),
        done: true,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp.path)
        .map_err(InstallError::io("create temp file in", dir))?;
    temp.done = false;
    fill(&mut file).map_err(InstallError::io("write", &temp.path))?;
    file.flush()
        .map_err(InstallError::io("write", &temp.path))?;
    if let Some((uid, gid)) = attrs.owner {
        let meta = file
            .metadata()
            .map_err(InstallError::io("stat", &temp.path))?;
        if (meta.uid(), meta.gid()) != (uid, gid) {
            // Best effort: only root may give a file away. Mode matters for the runtime,
            // the owner only for tidiness.
            if let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                tracing::warn!(path = %target.display(), uid, gid, error = %e, "cannot keep the owner");
            }
        }
    }
    // After chown: chown clears setuid/setgid bits, and the mode must be the final one.
    file.set_permissions(fs::Permissions::from_mode(attrs.mode & 0o7777))
        .map_err(InstallError::io("chmod", &temp.path))?;
    file.sync_all()
        .map_err(InstallError::io("fsync", &temp.path))?;
    drop(file);
    fs::rename(&temp.path, &target).map_err(InstallError::io("rename into", &target))?;
    temp.done = true;
    sync_dir(dir);
    Ok(target)
}

/// Writes `bytes` to `dir/name` atomically.
pub fn write_bytes_atomic(
    dir: &Path,
    name: &str,
    attrs: Attrs,
    bytes: &[u8],
) -> Result<PathBuf, InstallError> {
    write_atomic(dir, name, attrs, |f| f.write_all(bytes))
}

/// Removes `dir/name` and fsyncs the dir; a missing file is fine.
pub fn remove(path: &Path) -> Result<bool, InstallError> {
    match fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                sync_dir(dir);
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstallError::io("remove", path)(e)),
    }
}

/// Makes renames and unlinks in `dir` durable. Best effort: some filesystems refuse fsync on a
/// directory, and the rename itself has already happened.
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "fsync of directory failed");
    }
}

/// Removes our temp files in `dir` older than `max_age` (crash leftovers). Returns what it removed.
/// A missing dir has nothing to clean.
pub fn remove_stale_temps(dir: &Path, max_age: Duration) -> Result<Vec<PathBuf>, InstallError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(InstallError::io("read directory", dir)(e)),
    };
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(InstallError::io("read directory", dir))?;
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_temp_name) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if !meta.is_file() || age < max_age {
            continue;
        }
        if remove(&path)? {
            tracing::info!(path = %path.display(), "removed stale temp file");
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::conflist::kind_of;

    #[test]
    fn temp_names_are_never_config_names() {
        for target in ["10-calico.conflist", "10-ptp.conf", "x.json", "ambient-cni"] {
            let t = temp_name(target);
            assert!(is_temp_name(&t), "{t}");
            assert_eq!(kind_of(&t), None, "{t}");
        }
        assert!(!is_temp_name("10-calico.conflist"));
    }

    #[test]
    fn write_atomic_sets_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let attrs = Attrs {
            mode: 0o640,
            owner: None,
        };
        let p = write_bytes_atomic(dir.path(), "a.conflist", attrs, b"{}\n").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{}\n");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_fill_removes_temp_and_keeps_target() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.conf"), b"orig").unwrap();
        let attrs = Attrs {
            mode: 0o644,
            owner: None,
        };
        let err = write_atomic(dir.path(), "a.conf", attrs, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(fs::read(dir.path().join("a.conf")).unwrap(), b"orig");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn only_old_temps_of_ours_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".ambient-cni.acni-tmp-1-2-3");
        let young = dir.path().join(".ambient-cni.acni-tmp-4-5-6");
        let foreign = dir.path().join(".calico.tmp");
        for p in [&old, &young, &foreign] {
            fs::write(p, b"x").unwrap();
        }
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        for p in [&old, &foreign] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        let removed = remove_stale_temps(dir.path(), STALE_TEMP_AGE).unwrap();
        assert_eq!(removed, vec![old.clone()]);
        assert!(!old.exists() && young.exists() && foreign.exists());
    }
}
