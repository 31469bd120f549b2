//! Plugin logs: to `logFile` (O_APPEND, one write per record) or stderr. Never stdout, which
//! belongs to the one JSON document the runtime parses.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

use crate::config::LogLevel;

fn filter(level: LogLevel) -> Targets {
    let l = match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    // Only our own events: h2/hyper/tower at debug would bury one pod's story.
    Targets::new().with_target("ambient_cni", l)
}

/// Installs the global subscriber. Many plugin processes append to one file at once: the fmt
/// layer formats a record into a buffer and writes it with one `write(2)`, and O_APPEND makes
/// each write land whole at the end. Returns a warning to log if the file could not be opened
/// (then stderr is used).
pub fn init(log_file: Option<&Path>, level: LogLevel) -> Option<String> {
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_target(false);
    let mut warning = None;
    if let Some(path) = log_file {
        match OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
        {
            Ok(file) => {
                let _ = tracing_subscriber::registry()
                    .with(fmt.with_writer(Mutex::new(file)).with_filter(filter(level)))
                    .try_init();
                return None;
            }
            Err(e) => {
                warning = Some(format!(
                    "cannot open logFile {}: {e}; logging to stderr",
                    path.display()
                ))
            }
        }
    }
    let _ = tracing_subscriber::registry()
        .with(fmt.with_writer(std::io::stderr).with_filter(filter(level)))
        .try_init();
    warning
}
