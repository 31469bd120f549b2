//! Atomic copy of the plugin binary into the CNI bin dirs.
//!
//! The new binary is written under a temp name in the same dir, fsynced, made 0755 and renamed
//! over the old one. Running executions keep the old inode, and a concurrent exec never sees a
//! half-written file or `ETXTBSY` (which writing in place into a running binary would give).

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::InstallError;
use crate::fsutil::{self, Attrs};

/// Mode of the installed plugin binary.
pub const BINARY_MODE: u32 = 0o755;

/// What happened to one installed binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Same bytes and mode already in place: nothing written.
    Unchanged,
    /// The target did not exist.
    Created,
    /// The target existed with other bytes or another mode.
    Replaced,
}

/// Whether two files have the same bytes (streamed, so a large binary is not read into memory).
pub fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ra, mut rb) = (io::BufReader::new(fa), io::BufReader::new(fb));
    let (mut ba, mut bb) = ([0u8; 64 * 1024], [0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut ra, &mut ba)?;
        let m = read_full(&mut rb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Whether `dir/name` already is an up-to-date copy of `src`.
pub fn is_current(src: &Path, target: &Path) -> Result<bool, InstallError> {
    match fs::metadata(target) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o7777 == BINARY_MODE => {
            same_content(src, target).map_err(InstallError::io("compare with", target))
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstallError::io("stat", target)(e)),
    }
}

/// Installs `src` as `dir/name`, skipping the write when the content is identical.
pub fn install_binary(src: &Path, dir: &Path, name: &str) -> Result<CopyOutcome, InstallError> {
    let target = dir.join(name);
    // Fail on a bad source before touching the target dir.
    let mut source = File::open(src).map_err(InstallError::io("open plugin binary", src))?;
    let meta = source
        .metadata()
        .map_err(InstallError::io("stat plugin binary", src))?;
    if !meta.is_file() {
        return Err(InstallError::io("open plugin binary", src)(
            io::Error::other("not a regular file"),
        ));
    }
    let existed = match fs::symlink_metadata(&target) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(InstallError::io("stat", &target)(e)),
    };
    if existed && is_current(src, &target)? {
        return Ok(CopyOutcome::Unchanged);
    }
    let attrs = Attrs {
        mode: BINARY_MODE,
        owner: None,
    };
    fsutil::write_atomic(dir, name, attrs, |f| io::copy(&mut source, f).map(drop))?;
    Ok(if existed {
        CopyOutcome::Replaced
    } else {
        CopyOutcome::Created
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn copy_then_skip_then_replace() {
        let src_dir = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let src = src_dir.path().join("ambient-cni");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&src, &big).unwrap();

        assert_eq!(
            install_binary(&src, bin.path(), "ambient-cni").unwrap(),
            CopyOutcome::Created
        );
        let target = bin.path().join("ambient-cni");
        assert_eq!(fs::read(&target).unwrap(), big);
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&target).unwrap());

        assert_eq!(
            install_binary(&src, bin.path(), "ambient-cni").unwrap(),
            CopyOutcome::Unchanged
        );
        let ino2 = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&target).unwrap());
        assert_eq!(ino, ino2, "an identical binary must not be rewritten");

        let mut changed = big.clone();
        changed[299_999] ^= 1;
        fs::write(&src, &changed).unwrap();
        assert_eq!(
            install_binary(&src, bin.path(), "ambient-cni").unwrap(),
            CopyOutcome::Replaced
        );
        assert_eq!(fs::read(&target).unwrap(), changed);
        assert_eq!(
            fs::read_dir(bin.path()).unwrap().count(),
            1,
            "no temp left behind"
        );
    }

    #[test]
    fn wrong_mode_is_fixed() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, b"bin").unwrap();
        let bin = d.path().join("bin");
        fs::create_dir(&bin).unwrap();
        fs::write(bin.join("ambient-cni"), b"bin").unwrap();
        fs::set_permissions(bin.join("ambient-cni"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            install_binary(&src, &bin, "ambient-cni").unwrap(),
            CopyOutcome::Replaced
        );
        let mode = fs::metadata(bin.join("ambient-cni"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn missing_source_names_the_path() {
        let d = tempfile::tempdir().unwrap();
        let err = install_binary(&d.path().join("nope"), d.path(), "ambient-cni").unwrap_err();
        assert!(err.to_string().contains("open plugin binary"), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
