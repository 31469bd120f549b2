//! Installer for ambient-cni: copies the plugin binary onto the node, chains our entry into the
//! node's primary CNI config, keeps it there while other agents rewrite the config, and takes it
//! out again on uninstall (issue 7; checklist in `cni-contract.md` §8 and §10).
//!
//! The crate is a library without CLI parsing; `ambient-cnid install|uninstall` wires it:
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use std::time::Duration;
//! use ambient_cni_install::{install_wait, watch, InstallConfig, PluginEntry, WatchOptions};
//!
//! let cfg = InstallConfig::new(
//!     "/usr/local/bin/ambient-cni",
//!     vec!["/host/opt/cni/bin".into()],
//!     "/host/etc/cni/net.d",
//!     PluginEntry::new("/run/ambient-cni/cni.sock").to_value(),
//! );
//! let stop = AtomicBool::new(false); // set from a SIGTERM handler
//! let report = install_wait(&cfg, Duration::from_secs(600), &stop)?;
//! println!("{report}");
//! watch(&cfg, &WatchOptions::default(), &stop)?;
//! # Ok::<(), ambient_cni_install::InstallError>(())
//! ```
//!
//! Nothing here ever removes our entry or binary on its own (not on SIGTERM, not on upgrade): the
//! entry staying while the daemon restarts is what keeps new pods from starting uncaptured.

#![deny(clippy::unwrap_used)]

pub mod conflist;
pub mod copy;
mod error;
pub mod fsutil;
mod watch;

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::conflist::{ConfigError, ConfigKind};
use crate::copy::CopyOutcome;
pub use crate::error::InstallError;
use crate::fsutil::Attrs;
pub use crate::watch::{watch, WatchOptions, WatchStats};

/// Our plugin's `type`, which is also its binary name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "ambient-cni";
/// Default daemon socket (host path; the plugin runs on the host).
pub const DEFAULT_SOCKET: &str = "/run/ambient-cni/cni.sock";
/// Default CNI bin dir on the host.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
/// Default CNI conf dir on the host.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// `cniVersion`s our plugin implements; a primary config with another version gets a warning.
pub const SUPPORTED_CNI_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How often [`install_wait`] looks for the primary config again.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Our conflist entry, typed. [`PluginEntry::to_value`] gives the JSON object for
/// [`InstallConfig::plugin_entry`]. It has no `name`/`cniVersion`: the runtime injects them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEntry {
    /// `socket`: the daemon's unix socket.
    pub socket: PathBuf,
    /// `logFile`: where the plugin logs (else stderr).
    pub log_file: Option<PathBuf>,
    /// `logLevel`.
    pub log_level: Option<String>,
    /// `timeoutMs`: the plugin's overall deadline.
    pub timeout_ms: Option<u64>,
}

impl PluginEntry {
    /// An entry with only the socket set.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        PluginEntry {
            socket: socket.into(),
            log_file: None,
            log_level: None,
            timeout_ms: None,
        }
    }

    /// The JSON object: `type` first, then the settings that are set.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), PLUGIN_TYPE.into());
        m.insert(
            "socket".into(),
            self.socket.to_string_lossy().into_owned().into(),
        );
        if let Some(f) = &self.log_file {
            m.insert("logFile".into(), f.to_string_lossy().into_owned().into());
        }
        if let Some(l) = &self.log_level {
            m.insert("logLevel".into(), l.clone().into());
        }
        if let Some(t) = self.timeout_ms {
            m.insert("timeoutMs".into(), t.into());
        }
        Value::Object(m)
    }
}

/// Everything the installer needs. Paths are as seen by the installer process (inside a pod,
/// the host dirs are usually mounted under `/host`).
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// The plugin binary to copy (inside the image).
    pub bin_src: PathBuf,
    /// CNI bin dirs to install into (`/opt/cni/bin`, `/usr/libexec/cni`, …); at least one.
    pub bin_dirs: Vec<PathBuf>,
    /// The CNI conf dir.
    pub conf_dir: PathBuf,
    /// A file name in `conf_dir` to patch instead of the first valid config.
    pub conf_override: Option<String>,
    /// Our conflist entry; a JSON object whose `type` is also the binary's name.
    pub plugin_entry: Value,
    /// Opt-in readiness through CNI STATUS: raise the conflist to `cniVersion` 1.1.0 (see
    /// [`conflist::status_readiness`]). Off by default.
    pub status_readiness: bool,
}

impl InstallConfig {
    /// A config without override.
    pub fn new(
        bin_src: impl Into<PathBuf>,
        bin_dirs: Vec<PathBuf>,
        conf_dir: impl Into<PathBuf>,
        plugin_entry: Value,
    ) -> Self {
        InstallConfig {
            bin_src: bin_src.into(),
            bin_dirs,
            conf_dir: conf_dir.into(),
            conf_override: None,
            plugin_entry,
            status_readiness: false,
        }
    }

    /// Checks the settings; every entry point calls it first.
    pub fn validate(&self) -> Result<(), InstallError> {
        self.entry().map(drop)
    }

    /// The entry object and its type, validated.
    fn entry(&self) -> Result<(&Map<String, Value>, &str), InstallError> {
        let bad = |m: String| Err(InstallError::InvalidSettings(m));
        if self.bin_dirs.is_empty() {
            return bad("no CNI bin dir given".into());
        }
        if let Some(name) = &self.conf_override {
            if name.contains('/') || conflist::kind_of(name).is_none() {
                return bad(format!(
                    "config override {name:?} must be a file name in the conf dir ending in .conf, .conflist or .json"
                ));
            }
        }
        let Some(entry) = self.plugin_entry.as_object() else {
            return bad("plugin entry is not a JSON object".into());
        };
        let Some(ty) = entry.get("type").and_then(Value::as_str) else {
            return bad("plugin entry has no string `type`".into());
        };
        // The type is the binary's file name: no paths (compare CVE-2021-20206).
        if ty.is_empty() || ty == "." || ty == ".." || ty.contains(['/', '\0']) {
            return bad(format!("plugin type {ty:?} is not a plain file name"));
        }
        for key in ["name", "cniVersion"] {
            if entry.contains_key(key) {
                return bad(format!(
                    "plugin entry must not set `{key}` (the runtime injects it)"
                ));
            }
        }
        Ok((entry, ty))
    }
}

/// What a file operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The file did not exist before.
    Created,
    /// The file was replaced atomically.
    Replaced,
    /// The file was removed.
    Removed,
}

/// One file written or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// The file.
    pub path: PathBuf,
    /// What happened to it.
    pub change: Change,
}

/// The outcome of [`install`] or [`uninstall`]. An empty `changes` means nothing was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The config file that holds our entry after install (or that uninstall cleaned).
    pub primary: Option<PathBuf>,
    /// The installed binaries (present and current after install).
    pub binaries: Vec<PathBuf>,
    /// Every file written or removed, in order.
    pub changes: Vec<FileChange>,
    /// Things worth a look that did not stop the operation.
    pub warnings: Vec<String>,
}

impl Report {
    /// Whether anything on disk changed.
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }

    fn push(&mut self, path: PathBuf, change: Change) {
        tracing::info!(path = %path.display(), change = ?change, "ambient-cni install");
        self.changes.push(FileChange { path, change });
    }

    fn warn(&mut self, msg: String) {
        tracing::warn!("{msg}");
        self.warnings.push(msg);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.changes {
            let what = match c.change {
                Change::Created => "created",
                Change::Replaced => "replaced",
                Change::Removed => "removed",
            };
            writeln!(f, "{what} {}", c.path.display())?;
        }
        if self.changes.is_empty() {
            writeln!(f, "no change")?;
        }
        if let Some(p) = &self.primary {
            writeln!(f, "primary config: {}", p.display())?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// The outcome of [`check`]: ready when `problems` is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The config file the runtime uses (as we select it), if any.
    pub primary: Option<PathBuf>,
    /// Why we are not installed, one line each.
    pub problems: Vec<String>,
}

impl Status {
    /// Binary current in every bin dir and our entry last in the primary config.
    pub fn is_ready(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ready() {
            if let Some(p) = &self.primary {
                writeln!(f, "installed: {}", p.display())?;
            }
        }
        for p in &self.problems {
            writeln!(f, "not installed: {p}")?;
        }
        Ok(())
    }
}

/// Installs once: removes our stale temp files, copies the binary into every bin dir, then
/// patches the primary config. Binary first, so the runtime never calls an entry whose binary is
/// missing. Fails with [`InstallError::NoPrimaryConfig`] when there is no primary config yet;
/// see [`install_wait`] to wait for one.
pub fn install(cfg: &InstallConfig) -> Result<Report, InstallError> {
    let mut report = Report::default();
    install_binaries(cfg, &mut report)?;
    patch_primary(cfg, &mut report)?;
    Ok(report)
}

/// Like [`install`], but when no primary config exists yet, waits up to `timeout` for the primary
/// CNI to write one (a fresh node). Returns early with the last error when `stop` is set.
pub fn install_wait(
    cfg: &InstallConfig,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Report, InstallError> {
    let deadline = Instant::now() + timeout;
    let mut report = Report::default();
    install_binaries(cfg, &mut report)?;
    let mut logged = false;
    loop {
        let mut attempt = report.clone();
        match patch_primary(cfg, &mut attempt) {
            Ok(()) => return Ok(attempt),
            Err(e) if e.is_retryable() && !stop.load(Ordering::Acquire) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(e);
                }
                if !logged {
                    tracing::info!(timeout = ?timeout, "{e}; waiting for the primary CNI");
                    logged = true;
                }
                std::thread::sleep(WAIT_POLL.min(deadline - now));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Removes our entry from every conflist in the conf dir that holds it (atomically, keeping each
/// file's mode and owner), and our binary from every bin dir when `remove_binary` is set.
///
/// Keeping the binary is the safe default: CRI-O runs DEL for older pods from its cached config,
/// which still names our plugin. A `.conf` we converted stays a `.conflist` with the original
/// plugin and the original `name`/`cniVersion`: libcni reads both the same way.
pub fn uninstall(cfg: &InstallConfig, remove_binary: bool) -> Result<Report, InstallError> {
    let (_, our_type) = cfg.entry()?;
    let mut report = Report::default();
    remove_stale_temps(cfg, &mut report)?;
    let names = match list_config_names(&cfg.conf_dir) {
        Ok(n) => n,
        Err(InstallError::NoPrimaryConfig { detail, .. }) => {
            report.warn(format!(
                "{}: {detail}; no config to clean",
                cfg.conf_dir.display()
            ));
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    for name in names {
        if conflist::kind_of(&name) != Some(ConfigKind::List) {
            continue;
        }
        let path = cfg.conf_dir.join(&name);
        let Ok(bytes) = fs::read(&path) else { continue };
        let Ok(value) = conflist::parse(ConfigKind::List, &bytes) else {
            continue;
        };
        match conflist::unpatch(&value, our_type) {
            Ok(None) => {}
            Ok(Some(clean)) => {
                let attrs = attrs_for_write(&path)?;
                fsutil::write_bytes_atomic(
                    &cfg.conf_dir,
                    &name,
                    attrs,
                    &conflist::to_bytes(&clean),
                )?;
                report.push(path.clone(), Change::Replaced);
                report.primary.get_or_insert(path);
            }
            Err(e) => report.warn(format!("{}: {e}; left as it is", path.display())),
        }
    }
    if remove_binary {
        for dir in &cfg.bin_dirs {
            let path = dir.join(our_type);
            if fsutil::remove(&path)? {
                report.push(path, Change::Removed);
            }
        }
    }
    Ok(report)
}

/// Read-only check for readiness probes: is the binary current in every bin dir, and is our
/// entry the last plugin of the primary config?
pub fn check(cfg: &InstallConfig) -> Result<Status, InstallError> {
    let (entry, our_type) = cfg.entry()?;
    let mut status = Status::default();
    for dir in &cfg.bin_dirs {
        let target = dir.join(our_type);
        match copy::is_current(&cfg.bin_src, &target) {
            Ok(true) => {}
            Ok(false) => status.problems.push(format!(
                "{} is missing or differs from {}",
                target.display(),
                cfg.bin_src.display()
            )),
            Err(e) => status.problems.push(e.to_string()),
        }
    }
    match find_primary(cfg, our_type) {
        Ok(p) => {
            if let Some(kind) = conflist::multus_type(p.kind, &p.value) {
                let e = InstallError::Multus {
                    path: p.path.clone(),
                    kind,
                };
                status.problems.push(e.to_string());
            } else {
                let patched = conflist::patch(p.kind, &p.value, entry).ok().map(|mut v| {
                    conflist::status_readiness(&p.value, &mut v, our_type, cfg.status_readiness);
                    v
                });
                if p.kind != ConfigKind::List || patched.as_ref() != Some(&p.value) {
                    status.problems.push(format!(
                        "{} does not end with our {our_type} entry",
                        p.path.display()
                    ));
                }
            }
            status.primary = Some(p.path);
        }
        Err(e) => status.problems.push(e.to_string()),
    }
    Ok(status)
}

fn remove_stale_temps(cfg: &InstallConfig, report: &mut Report) -> Result<(), InstallError> {
    for dir in cfg.bin_dirs.iter().chain(std::iter::once(&cfg.conf_dir)) {
        for path in fsutil::remove_stale_temps(dir, fsutil::STALE_TEMP_AGE)? {
            report.push(path, Change::Removed);
        }
    }
    Ok(())
}

fn install_binaries(cfg: &InstallConfig, report: &mut Report) -> Result<(), InstallError> {
    let (_, our_type) = cfg.entry()?;
    remove_stale_temps(cfg, report)?;
    for dir in &cfg.bin_dirs {
        let path = dir.join(our_type);
        match copy::install_binary(&cfg.bin_src, dir, our_type)? {
            CopyOutcome::Unchanged => {
                tracing::debug!(path = %path.display(), "plugin binary is current");
            }
            CopyOutcome::Created => report.push(path.clone(), Change::Created),
            CopyOutcome::Replaced => report.push(path.clone(), Change::Replaced),
        }
        report.binaries.push(path);
    }
    Ok(())
}

/// The config file the runtime would use.
struct Primary {
    name: String,
    path: PathBuf,
    kind: ConfigKind,
    value: Value,
}

/// Config file names in `dir`, sorted by bytes. A missing dir is "no primary config" (retryable:
/// the container runtime or the primary CNI creates it).
fn list_config_names(dir: &Path) -> Result<Vec<String>, InstallError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(InstallError::NoPrimaryConfig {
                dir: dir.to_owned(),
                detail: "the directory does not exist".into(),
            })
        }
        Err(e) => return Err(InstallError::io("read directory", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(InstallError::io("read directory", dir))?;
        if let Some(name) = entry.file_name().to_str() {
            if conflist::kind_of(name).is_some() {
                names.push(name.to_owned());
            }
        }
    }
    conflist::sort_names(&mut names);
    Ok(names)
}

fn read_config(path: &Path, kind: ConfigKind, our_type: &str) -> Result<Value, ConfigErrorOrIo> {
    let bytes = fs::read(path).map_err(ConfigErrorOrIo::Io)?;
    let value = conflist::parse(kind, &bytes).map_err(ConfigErrorOrIo::Config)?;
    conflist::check_primary(kind, &value, our_type).map_err(ConfigErrorOrIo::Config)?;
    Ok(value)
}

enum ConfigErrorOrIo {
    Io(io::Error),
    Config(ConfigError),
}

/// The override, or the first file (by bytes) that is a valid primary config. Invalid files are
/// skipped with a warning, as CRI-O and Istio do: if the runtime is containerd, a broken first
/// file already keeps the node NotReady; if it is CRI-O, it uses the file we patch.
fn find_primary(cfg: &InstallConfig, our_type: &str) -> Result<Primary, InstallError> {
    let dir = &cfg.conf_dir;
    if let Some(name) = &cfg.conf_override {
        let path = dir.join(name);
        let kind = conflist::kind_of(name).ok_or_else(|| {
            InstallError::InvalidSettings(format!(
                "config override {name:?} has no config extension"
            ))
        })?;
        return match read_config(&path, kind, our_type) {
            Ok(value) => Ok(Primary {
                name: name.clone(),
                path,
                kind,
                value,
            }),
            Err(ConfigErrorOrIo::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                Err(InstallError::NoPrimaryConfig {
                    dir: dir.clone(),
                    detail: format!("the config override {name} does not exist"),
                })
            }
            Err(ConfigErrorOrIo::Io(e)) => Err(InstallError::io("read", path)(e)),
            Err(ConfigErrorOrIo::Config(source)) => {
                Err(InstallError::InvalidConfig { path, source })
            }
        };
    }
    let names = list_config_names(dir)?;
    let mut skipped = Vec::new();
    for name in &names {
        let path = dir.join(name);
        let kind = conflist::kind_of(name).ok_or_else(|| {
            InstallError::InvalidSettings(format!("{name:?} has no config extension"))
        })?;
        match read_config(&path, kind, our_type) {
            Ok(value) => {
                for (n, why) in &skipped {
                    tracing::warn!(file = %dir.join(n).display(), reason = %why, "skipped CNI config");
                }
                return Ok(Primary {
                    name: name.clone(),
                    path,
                    kind,
                    value,
                });
            }
            // Removed between listing and reading: the next event brings the new state.
            Err(ConfigErrorOrIo::Io(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(ConfigErrorOrIo::Io(e)) => skipped.push((name.clone(), e.to_string())),
            Err(ConfigErrorOrIo::Config(e)) => skipped.push((name.clone(), e.to_string())),
        }
    }
    let detail = if skipped.is_empty() {
        "no .conf, .conflist or .json file".to_owned()
    } else {
        let list: Vec<String> = skipped
            .iter()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        format!("every candidate was skipped ({})", list.join("; "))
    };
    Err(InstallError::NoPrimaryConfig {
        dir: dir.clone(),
        detail,
    })
}

/// Mode and owner of the file we are about to replace; refuses symlinks.
fn attrs_for_write(path: &Path) -> Result<Attrs, InstallError> {
    let meta = fs::symlink_metadata(path).map_err(InstallError::io("stat", path))?;
    if meta.file_type().is_symlink() {
        return Err(InstallError::Symlink {
            path: path.to_owned(),
        });
    }
    Ok(Attrs {
        mode: meta.permissions().mode(),
        owner: Some((meta.uid(), meta.gid())),
    })
}

fn patch_primary(cfg: &InstallConfig, report: &mut Report) -> Result<(), InstallError> {
    let (entry, our_type) = cfg.entry()?;
    let p = find_primary(cfg, our_type)?;
    if let Some(kind) = conflist::multus_type(p.kind, &p.value) {
        return Err(InstallError::Multus { path: p.path, kind });
    }
    if let Some(v) = p.value.get("cniVersion").and_then(Value::as_str) {
        if !SUPPORTED_CNI_VERSIONS.contains(&v) {
            report.warn(format!(
                "{} has cniVersion {v}, which {our_type} does not implement ({})",
                p.path.display(),
                SUPPORTED_CNI_VERSIONS.join(", ")
            ));
        }
    }
    let mut patched =
        conflist::patch(p.kind, &p.value, entry).map_err(|source| InstallError::InvalidConfig {
            path: p.path.clone(),
            source,
        })?;
    conflist::status_readiness(&p.value, &mut patched, our_type, cfg.status_readiness);
    let dir = &cfg.conf_dir;
    match p.kind {
        ConfigKind::List => {
            if patched == p.value {
                tracing::debug!(path = %p.path.display(), "our entry is already last");
            } else {
                let attrs = attrs_for_write(&p.path)?;
                fsutil::write_bytes_atomic(dir, &p.name, attrs, &conflist::to_bytes(&patched))?;
                report.push(p.path.clone(), Change::Replaced);
            }
            report.primary = Some(p.path);
        }
        ConfigKind::Single => {
            // Write the .conflist first, then delete the .conf: at every moment one valid file
            // carries the network (the .conf sorts first while both exist).
            let attrs = attrs_for_write(&p.path)?;
            let list_name = conflist::conflist_name(&p.name);
            let list_path = dir.join(&list_name);
            let bytes = conflist::to_bytes(&patched);
            let existing = match fs::read(&list_path) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(InstallError::io("read", list_path)(e)),
            };
            match existing {
                Some(old) if old == bytes => {}
                Some(old) => {
                    let ours = conflist::parse(ConfigKind::List, &old)
                        .is_ok_and(|v| conflist::contains_ours(&v, our_type));
                    if !ours {
                        return Err(InstallError::ConflistExists {
                            conf: p.path,
                            conflist: list_path,
                        });
                    }
                    attrs_for_write(&list_path)?;
                    fsutil::write_bytes_atomic(dir, &list_name, attrs, &bytes)?;
                    report.push(list_path.clone(), Change::Replaced);
                }
                None => {
                    fsutil::write_bytes_atomic(dir, &list_name, attrs, &bytes)?;
                    report.push(list_path.clone(), Change::Created);
                }
            }
            if fsutil::remove(&p.path)? {
                report.push(p.path, Change::Removed);
            }
            report.primary = Some(list_path);
        }
    }
    Ok(())
}
