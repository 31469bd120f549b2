//! Plugin logs: to `logFile` (O_APPEND, one write per record) or stderr. Never stdout, which
//! belongs to the one JSON document the runtime parses.
//!
//! A few lines per invocation do not need a logging framework: records are formatted here, in the
//! layout tracing's fmt layer prints (`2026-01-02T03:04:05.678901Z  INFO message key=value`),
//! so that logs of the plugin and of the daemon read alike. Until [`init`] runs (tests), records
//! are dropped.

use std::fmt::Arguments;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogLevel;

enum Sink {
    File(File),
    Stderr,
}

struct Logger {
    sink: Sink,
    level: LogLevel,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

fn rank(l: LogLevel) -> u8 {
    match l {
        LogLevel::Error => 0,
        LogLevel::Warn => 1,
        LogLevel::Info => 2,
        LogLevel::Debug => 3,
        LogLevel::Trace => 4,
    }
}

fn name(l: LogLevel) -> &'static str {
    match l {
        LogLevel::Error => "ERROR",
        LogLevel::Warn => "WARN",
        LogLevel::Info => "INFO",
        LogLevel::Debug => "DEBUG",
        LogLevel::Trace => "TRACE",
    }
}

/// What a `logFile` that is not a regular file is, for the warning.
fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens `logFile` for appending, without ever blocking: open(2) of a FIFO without a reader
/// blocks forever, so the open is O_NONBLOCK (such an open fails at once with ENXIO; on a regular
/// file O_NONBLOCK changes nothing) and anything but a regular file is refused (a FIFO with a
/// reader would block once its pipe is full; a tty or device has no business being a log). The
/// type is checked on the opened file, not only on the path, so a swap in between cannot slip by.
fn open_log(path: &Path) -> Result<File, String> {
    let refuse = |t: std::fs::FileType| {
        format!(
            "logFile {} is {}, not a regular file; logging to stderr",
            path.display(),
            kind(t)
        )
    };
    if let Ok(m) = std::fs::metadata(path) {
        if !m.is_file() {
            return Err(refuse(m.file_type()));
        }
    }
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            format!(
                "cannot open logFile {}: {e}; logging to stderr",
                path.display()
            )
        })?;
    match f.metadata() {
        Ok(m) if m.is_file() => Ok(f),
        Ok(m) => Err(refuse(m.file_type())),
        Err(e) => Err(format!(
            "cannot stat logFile {}: {e}; logging to stderr",
            path.display()
        )),
    }
}

/// Installs the logger (once; later calls change nothing). Many plugin processes append to one
/// file at once: each record is formatted into a buffer and written with one `write(2)`, and
/// O_APPEND makes each write land whole at the end. Returns a warning to log if the file could
/// not be opened or is not a regular file (then stderr is used).
pub fn init(log_file: Option<&Path>, level: LogLevel) -> Option<String> {
    let mut warning = None;
    let sink = match log_file.map(open_log) {
        Some(Ok(f)) => Sink::File(f),
        Some(Err(w)) => {
            warning = Some(w);
            Sink::Stderr
        }
        None => Sink::Stderr,
    };
    let _ = LOGGER.set(Logger { sink, level });
    warning
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// RFC 3339 UTC with microseconds.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, mo, da) = civil((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{da:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

/// Writes one record if `level` is enabled.
pub fn log(level: LogLevel, args: Arguments<'_>) {
    let Some(l) = LOGGER.get() else {
        return;
    };
    if rank(level) > rank(l.level) {
        return;
    }
    let line = format!(
        "{} {:>5} {args}\n",
        timestamp(SystemTime::now()),
        name(level)
    );
    let _ = match &l.sink {
        Sink::File(f) => (&*f).write_all(line.as_bytes()),
        Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
    };
}

/// `plog!(Info, "ADD done container_id={cid}")`: one record, formatted only if enabled.
#[macro_export]
macro_rules! plog {
    ($level:ident, $($arg:tt)+) => {
        $crate::logging::log($crate::config::LogLevel::$level, format_args!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fifo_or_a_directory_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("log.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let e = open_log(&fifo).expect_err("a FIFO is refused");
        assert!(e.contains("is a FIFO"), "{e}");
        let e = open_log(dir.path()).expect_err("a directory is refused");
        assert!(e.contains("is a directory"), "{e}");
        let file = dir.path().join("plugin.log");
        assert!(open_log(&file).is_ok(), "a new regular file is created");
        assert!(open_log(&file).is_ok(), "and appended to");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_210_096, 123_456_000);
        assert_eq!(timestamp(t), "2024-02-29T12:34:56.123456Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(timestamp(t), "2099-12-31T23:59:59.000000Z");
    }
}
