//! `ambient-cni`: the runtime executes this once per pod event. All logic lives in the library.
//!
//! `no_main`: the C `main` below is the entry point, so std's start-up (`lang_start`) does not
//! run. On every pod event it cost ~15 syscalls that a one-shot process does not need: it opens
//! and reads `/proc/self/maps` to find the main thread's stack, maps an alternate signal stack
//! with SIGSEGV/SIGBUS handlers for a "stack overflow" message, and polls fds 0–2. What of it we
//! rely on is done here: SIGPIPE ignored (a runtime that closes our stdout early must get an
//! error from write(2), not kill us). `std::env` still works: glibc hands std the arguments and
//! environment through `.init_array`. A stack overflow (no recursion here is unbounded:
//! serde_json stops at depth 128) now ends in a plain SIGSEGV.
#![no_main]

use std::io::Write;
use std::time::Instant;

#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    // The one deadline counts from here (exec), stdin included.
    let start = Instant::now();
    // SAFETY: setting a signal's disposition to SIG_IGN touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
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
    libc::c_int::from(outcome.exit)
}
