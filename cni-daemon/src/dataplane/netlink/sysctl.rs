//! Sysctls under /proc/sys, read and written from the namespace's worker thread: the
//! `net/` subtree resolves to the network namespace of the thread that opens the file.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use crate::dataplane::{DpError, DpResult};

/// `net/ipv4/conf/istioin/rp_filter` → `/proc/sys/net/ipv4/conf/istioin/rp_filter`, refusing
/// anything that could leave /proc/sys.
fn path_of(key: &str) -> DpResult<PathBuf> {
    let rel = Path::new(key);
    let ok = !key.is_empty()
        && !key.contains('\0')
        && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(DpError::Sysctl {
            key: key.to_string(),
            msg: "not a relative path under /proc/sys".into(),
        });
    }
    Ok(Path::new("/proc/sys").join(rel))
}

/// The value without its trailing newline; `None` when the key does not exist (e.g. the
/// interface is gone).
pub(crate) fn read(key: &str) -> DpResult<Option<String>> {
    let p = path_of(key)?;
    match std::fs::read_to_string(&p) {
        Ok(v) => Ok(Some(v.trim_end_matches('\n').to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DpError::Sysctl {
            key: key.to_string(),
            msg: format!("read: {e}"),
        }),
    }
}

/// Reads many keys, in order (`None`: missing). Keys under `net/ipv4/conf/` are opened relative
/// to that directory (one path walk for all of them, not one per key), read into a small buffer
/// and closed: three syscalls a key. A resync reads one rp_filter per enrolled pod; this costs
/// about half of what [`read`] in a loop does, and no thread hop per key.
pub(crate) fn read_many(keys: &[String]) -> DpResult<Vec<Option<String>>> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::Mode;
    use std::io::Read;
    const CONF: &str = "net/ipv4/conf/";
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let conf = open(
        "/proc/sys/net/ipv4/conf",
        flags | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .ok();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let full = path_of(key)?;
        let opened = match (&conf, key.strip_prefix(CONF)) {
            (Some(dir), Some(rel)) => openat(dir, rel, flags, Mode::empty()),
            _ => open(&full, flags, Mode::empty()),
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => {
                out.push(None);
                continue;
            }
            Err(e) => {
                return Err(DpError::Sysctl {
                    key: key.clone(),
                    msg: format!("read: {e}"),
                })
            }
        };
        let mut f = std::fs::File::from(fd);
        let mut buf = [0u8; 64];
        let n = f.read(&mut buf).map_err(|e| DpError::Sysctl {
            key: key.clone(),
            msg: format!("read: {e}"),
        })?;
        let text = String::from_utf8_lossy(buf.get(..n).unwrap_or(&[]));
        out.push(Some(text.trim_end_matches('\n').to_string()));
    }
    Ok(out)
}

/// Writes `value` (a missing key is an error).
pub(crate) fn write(key: &str, value: &str) -> DpResult<()> {
    let p = path_of(key)?;
    let err = |e: std::io::Error| DpError::Sysctl {
        key: key.to_string(),
        msg: format!("write {value:?}: {e}"),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .map_err(err)?;
    // One write call: procfs parses each write separately.
    f.write_all(value.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_under_proc_sys() {
        assert_eq!(
            path_of("net/ipv4/conf/istioin/rp_filter").ok(),
            Some(PathBuf::from("/proc/sys/net/ipv4/conf/istioin/rp_filter"))
        );
        assert!(path_of("../etc/passwd").is_err());
        assert!(path_of("/etc/passwd").is_err());
        assert!(path_of("net/../../x").is_err());
        assert!(path_of("").is_err());
    }

    #[test]
    fn read_many_matches_read() {
        let keys: Vec<String> = [
            "net/ipv4/conf/lo/rp_filter",
            "net/ipv4/conf/acni-no-such-if/rp_filter",
            "net/ipv4/ip_forward",
        ]
        .iter()
        .map(|k| k.to_string())
        .collect();
        let many = read_many(&keys).expect("reads");
        let one: Vec<Option<String>> = keys.iter().map(|k| read(k).expect("reads")).collect();
        assert_eq!(many, one);
        assert_eq!(many[1], None);
        assert!(read_many(&["../etc/passwd".to_string()]).is_err());
    }

    #[test]
    fn missing_key_reads_none_and_fails_to_write() {
        assert_eq!(
            read("net/ipv4/conf/acni-no-such-if/rp_filter").ok(),
            Some(None)
        );
        assert!(matches!(
            write("net/ipv4/conf/acni-no-such-if/rp_filter", "2"),
            Err(DpError::Sysctl { .. })
        ));
    }
}
