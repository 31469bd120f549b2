//! `ambient-cni`: the runtime executes this once per pod event. All logic lives in the library.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    // The one deadline counts from here (exec), stdin included.
    let start = Instant::now();
    let lookup = |k: &str| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned());
    let outcome = ambient_cni::run_process(&lookup, start, true);
    if let Some(text) = &outcome.stderr {
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
    if let Some(doc) = &outcome.stdout {
        // One write of one document; a closed stdout leaves nothing else to tell anyone.
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(doc.as_bytes()).and_then(|()| out.flush());
    }
    ExitCode::from(outcome.exit)
}
