//! Keeps our entry and binary in place while other agents rewrite the CNI dirs.
//!
//! One blocking thread, one inotify fd watching the conf dir and each bin dir. An event that
//! matters (a config file created, closed after writing, moved in or out, or deleted; our binary
//! replaced or removed; a watched dir itself gone; the kernel queue overflowing) marks the state
//! dirty. A pass runs [`crate::install`] once the burst has settled (`debounce`) and at least
//! `min_interval` after the previous pass, so a burst of events costs one pass. A periodic
//! `resync` pass covers dirs that did not exist yet and anything inotify could not tell us.
//!
//! No write loop: our own rename produces one more event, and that pass compares content (the
//! patched value against what is on disk, the binary byte for byte), finds nothing to do, and
//! writes nothing. Our temp names are ignored outright.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::conflist;
use crate::error::InstallError;
use crate::fsutil;
use crate::InstallConfig;

/// Timing of [`watch`].
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Minimum time between two passes (rate limit). Default 1 s.
    pub min_interval: Duration,
    /// Quiet time after the first event before a pass, to coalesce a burst. Default 200 ms.
    pub debounce: Duration,
    /// A pass runs at least this often, events or not. Default 60 s.
    pub resync: Duration,
    /// Warn when this many passes in one minute had to write (another agent keeps undoing us).
    /// Default 5.
    pub warn_rewrites_per_minute: usize,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            min_interval: Duration::from_secs(1),
            debounce: Duration::from_millis(200),
            resync: Duration::from_secs(60),
            warn_rewrites_per_minute: 5,
        }
    }
}

/// Counters returned by [`watch`] when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Passes run (including the first and the periodic ones).
    pub passes: u64,
    /// Passes that wrote or removed something.
    pub writes: u64,
    /// Passes that failed (logged and retried on the next event or resync).
    pub errors: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Longest time between two looks at `stop`.
const STOP_POLL: Duration = Duration::from_millis(100);
/// How often to retry adding a watch on a dir that does not exist (yet).
const REWATCH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Conf,
    Bin,
}

struct Watched {
    path: PathBuf,
    role: Role,
    wd: Option<WatchDescriptor>,
}

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// Runs an install pass now, then again whenever the conf dir or our binary changes, until
/// `stop` is set (looked at every 100 ms). Pass failures (no primary config yet, a Multus
/// config, …) are logged and counted, not returned: the next event or resync retries. Returns an
/// error only for invalid settings or when inotify itself fails.
pub fn watch(
    cfg: &InstallConfig,
    opts: &WatchOptions,
    stop: &AtomicBool,
) -> Result<WatchStats, InstallError> {
    cfg.validate()?;
    let bin_name = cfg
        .plugin_entry
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or_default()
        .to_owned();
    let mut ino = Inotify::init().map_err(InstallError::io("inotify init for", &cfg.conf_dir))?;
    let mut watched: Vec<Watched> = std::iter::once((cfg.conf_dir.clone(), Role::Conf))
        .chain(cfg.bin_dirs.iter().map(|d| (d.clone(), Role::Bin)))
        .map(|(path, role)| Watched {
            path,
            role,
            wd: None,
        })
        .collect();

    let mut stats = WatchStats::default();
    let mut rewrites: VecDeque<Instant> = VecDeque::new();
    let mut buf = [0u8; 8192];
    let start = Instant::now();
    let mut due: Option<Instant> = Some(start); // first pass right away
    let mut last_pass: Option<Instant> = None;
    let mut next_resync = start + opts.resync;
    let mut next_rewatch = start;

    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(stats);
        }
        let now = Instant::now();
        if now >= next_rewatch {
            // A dir that appears may already hold the file we wait for: look once it is watched.
            if add_missing_watches(&mut ino, &mut watched) {
                schedule(&mut due, last_pass, opts);
            }
            next_rewatch = now + REWATCH;
        }
        if now >= next_resync {
            due = Some(due.map_or(now, |d| d.min(now)));
            next_resync = now + opts.resync;
        }
        if due.is_some_and(|d| now >= d) {
            due = None;
            last_pass = Some(now);
            run_pass(cfg, opts, &mut stats, &mut rewrites);
            // Re-add watches right after a pass: it may have found (or created) a dir.
            if add_missing_watches(&mut ino, &mut watched) {
                schedule(&mut due, last_pass, opts);
            }
        }

        let mut timeout = STOP_POLL.min(next_resync.saturating_duration_since(now));
        if let Some(d) = due {
            timeout = timeout.min(d.saturating_duration_since(now));
        }
        if !wait_readable(&ino, timeout)
            .map_err(InstallError::io("poll inotify for", &cfg.conf_dir))?
        {
            continue;
        }
        let mut relevant = false;
        loop {
            let events = match ino.read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(InstallError::io("read inotify events for", &cfg.conf_dir)(
                        e,
                    ))
                }
            };
            for ev in events {
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    tracing::warn!("inotify queue overflowed; resyncing");
                    relevant = true;
                    continue;
                }
                for w in watched.iter_mut().filter(|w| w.wd.as_ref() == Some(&ev.wd)) {
                    let gone = ev.mask.intersects(
                        EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED,
                    );
                    if gone {
                        // MOVE_SELF keeps watching the moved dir: drop it, re-add by path.
                        if let Some(wd) = w.wd.take() {
                            let _ = ino.watches().remove(wd);
                        }
                        tracing::info!(dir = %w.path.display(), "watched dir went away");
                        relevant = true;
                    } else if is_relevant(w.role, ev.name, &bin_name) {
                        tracing::debug!(dir = %w.path.display(), name = ?ev.name, mask = ?ev.mask, "change");
                        relevant = true;
                    }
                }
            }
        }
        if relevant {
            schedule(&mut due, last_pass, opts);
        }
    }
}

/// Plans a pass after the debounce and the rate limit, unless one is planned already (so a burst
/// of events coalesces into that one).
fn schedule(due: &mut Option<Instant>, last_pass: Option<Instant>, opts: &WatchOptions) {
    if due.is_none() {
        let now = Instant::now();
        let earliest = last_pass.map_or(now, |l| l + opts.min_interval);
        *due = Some((now + opts.debounce).max(earliest));
    }
}

fn is_relevant(role: Role, name: Option<&OsStr>, bin_name: &str) -> bool {
    let Some(name) = name.and_then(OsStr::to_str) else {
        return false;
    };
    if fsutil::is_temp_name(name) {
        return false;
    }
    match role {
        Role::Conf => conflist::kind_of(name).is_some(),
        Role::Bin => name == bin_name,
    }
}

/// Adds the watches that are missing; true when at least one was added.
fn add_missing_watches(ino: &mut Inotify, watched: &mut [Watched]) -> bool {
    let mut added = false;
    for w in watched.iter_mut().filter(|w| w.wd.is_none()) {
        match ino.watches().add(&w.path, mask()) {
            Ok(wd) => {
                tracing::debug!(dir = %w.path.display(), "watching");
                w.wd = Some(wd);
                added = true;
            }
            Err(e) => tracing::debug!(dir = %w.path.display(), error = %e, "cannot watch yet"),
        }
    }
    added
}

fn run_pass(
    cfg: &InstallConfig,
    opts: &WatchOptions,
    stats: &mut WatchStats,
    rewrites: &mut VecDeque<Instant>,
) {
    stats.passes += 1;
    match crate::install(cfg) {
        Ok(report) if report.changed() => {
            stats.writes += 1;
            let now = Instant::now();
            rewrites.push_back(now);
            while rewrites
                .front()
                .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
            {
                rewrites.pop_front();
            }
            if rewrites.len() >= opts.warn_rewrites_per_minute {
                tracing::warn!(
                    rewrites = rewrites.len(),
                    "re-installed {} times in the last minute: another agent keeps rewriting {}",
                    rewrites.len(),
                    cfg.conf_dir.display()
                );
            }
        }
        Ok(_) => tracing::debug!("install pass: nothing to do"),
        Err(e) => {
            stats.errors += 1;
            let msg = e.to_string();
            if stats.last_error.as_deref() != Some(msg.as_str()) {
                tracing::error!("{msg}");
            } else {
                tracing::debug!("{msg}");
            }
            stats.last_error = Some(msg);
        }
    }
}

/// Waits until the inotify fd is readable or `timeout` passes. `Ok(false)` on timeout or EINTR.
fn wait_readable(ino: &Inotify, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: ino.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid, exclusively borrowed pollfd for the whole call and nfds is 1;
    // the fd stays open because `ino` is borrowed for the duration.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}
