//! A fake node in a temp dir: `opt/cni/bin`, `usr/libexec/cni`, `etc/cni/net.d` and a plugin
//! binary to install. Nothing here touches the machine's real CNI dirs.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ambient_cni_install::{InstallConfig, PluginEntry};
use serde_json::Value;

pub struct Node {
    pub root: tempfile::TempDir,
    pub bin_src: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    pub conf_dir: PathBuf,
}

impl Node {
    pub fn new() -> Node {
        let root = tempfile::tempdir().unwrap();
        let bin_src = root.path().join("image/usr/local/bin/ambient-cni");
        fs::create_dir_all(bin_src.parent().unwrap()).unwrap();
        fs::write(&bin_src, fake_binary(1)).unwrap();
        let bin_dirs = vec![
            root.path().join("opt/cni/bin"),
            root.path().join("usr/libexec/cni"),
        ];
        for d in &bin_dirs {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("ptp"), b"\x7fELF ptp").unwrap();
        }
        let conf_dir = root.path().join("etc/cni/net.d");
        fs::create_dir_all(&conf_dir).unwrap();
        Node {
            root,
            bin_src,
            bin_dirs,
            conf_dir,
        }
    }

    pub fn cfg(&self) -> InstallConfig {
        let mut entry = PluginEntry::new("/run/ambient-cni/cni.sock");
        entry.log_file = Some("/run/ambient-cni/plugin.log".into());
        InstallConfig::new(
            &self.bin_src,
            self.bin_dirs.clone(),
            &self.conf_dir,
            entry.to_value(),
        )
    }

    /// Puts a file from `tests/data` into the conf dir with the given mode.
    pub fn put(&self, data_name: &str, as_name: &str, mode: u32) -> PathBuf {
        let p = self.conf_dir.join(as_name);
        fs::write(&p, data(data_name)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    pub fn conf(&self, name: &str) -> PathBuf {
        self.conf_dir.join(name)
    }
}

pub fn fake_binary(version: u8) -> Vec<u8> {
    let mut b = b"\x7fELF ambient-cni fake binary v".to_vec();
    b.push(b'0' + version);
    b.extend((0..100_000u32).map(|i| (i % 253) as u8 ^ version));
    b
}

pub fn data(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

pub fn read_json(p: &Path) -> Value {
    json(&fs::read(p).unwrap())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub ino: u64,
    pub mtime: SystemTime,
}

/// Every file in `dir` with its bytes, mode, inode and mtime.
pub fn snapshot(dir: &Path) -> BTreeMap<String, FileState> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = fs::symlink_metadata(e.path()).unwrap();
        if !meta.is_file() {
            continue;
        }
        out.insert(
            e.file_name().into_string().unwrap(),
            FileState {
                bytes: fs::read(e.path()).unwrap(),
                mode: meta.permissions().mode() & 0o7777,
                ino: meta.ino(),
                mtime: meta.modified().unwrap(),
            },
        );
    }
    out
}

pub fn names(dir: &Path) -> Vec<String> {
    snapshot(dir).into_keys().collect()
}

/// The plugin types of a conflist value, in order.
pub fn types(v: &Value) -> Vec<String> {
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Writes `bytes` the way a primary CNI's installer does on restart: temp file, then rename.
pub fn rewrite_like_a_cni(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("cni-tmp");
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Polls `f` until it is true or `secs` pass.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    f()
}

// ---- dropping root's DAC override on one thread ----

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_FOWNER: u32 = 3;

/// Clears CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the calling thread's
/// effective set. Linux capabilities are per thread, so this affects only the test thread that
/// calls it, and a mode-0555 directory then stops root the way it stops any other user.
pub fn drop_dac_override_on_this_thread() -> io::Result<()> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes one header and two CapData structs (version 3 layout), both live and
    // exclusively borrowed for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let clear = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH) | (1 << CAP_FOWNER);
    data[0].effective &= !clear;
    // SAFETY: as above; capset only reads the structs. pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
