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
