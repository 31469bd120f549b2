//! One worker per network namespace: a dedicated OS thread that entered the namespace once.
//!
//! A netlink socket is bound for life to the netns of the thread that created it, `/proc/sys/net`
//! resolves to the netns of the thread that opens it, and a child process inherits the netns of
//! the thread that forks it. So every namespace we touch gets its own `std::thread` that calls
//! `setns` exactly once and never leaves; tokio workers never change namespace. The thread creates
//! the rtnetlink connection (whose I/O future then runs on the tokio runtime) and afterwards
//! executes blocking closures for its namespace: sysctl file I/O and `iptables-save/-restore`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use nix::sched::CloneFlags;

use super::iptables::Backend;
use crate::dataplane::{DpError, DpResult};

/// A closure run on the namespace's thread.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// Identity of a network namespace: (st_dev, st_ino) of its nsfs file.
pub(crate) type NsId = (u64, u64);

/// The (dev, inode) of the namespace behind `path` (follows `/proc/<pid>/ns/net` links).
pub(crate) fn ns_id_of_path(path: &Path) -> std::io::Result<NsId> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

fn ns_id_of_fd(fd: &OwnedFd) -> std::io::Result<NsId> {
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(std::io::Error::from)?;
    // st_dev/st_ino widths differ between targets; both fit in u64 on Linux.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    Ok((st.st_dev as u64, st.st_ino as u64))
}

/// Is `path` a network namespace file? Checks the filesystem magic (nsfs); where `statfs`
/// itself fails for another reason than a missing file, falls back to "it opens".
pub(crate) fn is_netns(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        Ok(st) => st.filesystem_type() == nix::sys::statfs::NSFS_MAGIC,
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => false,
        Err(_) => std::fs::File::open(path).is_ok(),
    }
}

/// Opens a namespace file read-only with O_CLOEXEC (std sets it).
pub(crate) fn open_ns(path: &Path) -> DpResult<OwnedFd> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| DpError::Netns {
            path: path.display().to_string(),
            msg: format!("open: {e}"),
        })
}

/// A thread living in one network namespace, plus the rtnetlink handle it created there.
pub(crate) struct NsWorker {
    /// For error messages and logs.
    label: String,
    /// The namespace identity at the time the worker was made.
    id: NsId,
    /// Keeps the namespace alive and lets links be moved into it (`setns_by_fd`).
    fd: Arc<OwnedFd>,
    /// rtnetlink requests, bound to this namespace.
    handle: rtnetlink::Handle,
    jobs: mpsc::Sender<Job>,
    /// The connection future running on the tokio runtime; aborted with the worker.
    conn_task: tokio::task::AbortHandle,
    /// The iptables backend of this namespace, detected once.
    pub(crate) backend: OnceLock<Backend>,
}

impl std::fmt::Debug for NsWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsWorker")
            .field("label", &self.label)
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for NsWorker {
    fn drop(&mut self) {
        // The thread ends by itself once `jobs` (the only sender) is dropped with us.
        self.conn_task.abort();
        tracing::debug!(netns = %self.label, "namespace worker stopped");
    }
}

impl NsWorker {
    /// Starts the thread, enters the namespace of `fd` there and opens the rtnetlink connection.
    ///
    /// Blocks for the thread's start-up (well under a millisecond): call it from a synchronous
    /// context or through `spawn_blocking`.
    pub(crate) fn spawn(label: String, fd: OwnedFd, rt: tokio::runtime::Handle) -> DpResult<Self> {
        let err = |msg: String| DpError::Netns {
            path: label.clone(),
            msg,
        };
        let id = ns_id_of_fd(&fd).map_err(|e| err(format!("fstat: {e}")))?;
        let fd = Arc::new(fd);
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let thread_fd = Arc::clone(&fd);
        let thread_rt = rt.clone();
        std::thread::Builder::new()
            .name(format!("netns {}", short_label(&label)))
            .spawn(move || {
                if let Err(e) = nix::sched::setns(thread_fd.as_fd(), CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(format!("setns: {e}")));
                    return;
                }
                // The socket registers with tokio's reactor, which needs a runtime context;
                // entering it does not run anything on this thread.
                let conn = {
                    let _guard = thread_rt.enter();
                    rtnetlink::new_connection_with_strict_check()
                };
                match conn {
                    Ok((conn, handle, _unsolicited)) => {
                        if ready_tx.send(Ok((conn, handle))).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("netlink socket: {e}")));
                        return;
                    }
                }
                drop(thread_fd);
                while let Ok(job) = job_rx.recv() {
                    // A panicking job must not take the namespace's thread down with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| err(format!("spawn thread: {e}")))?;
        let (conn, handle) = ready_rx
            .recv()
            .map_err(|_| err("worker thread exited during start-up".into()))?
            .map_err(err)?;
        let conn_task = rt.spawn(conn).abort_handle();
        tracing::debug!(netns = %label, dev = id.0, ino = id.1, "namespace worker started");
        Ok(NsWorker {
            label,
            id,
            fd,
            handle,
            jobs: job_tx,
            conn_task,
            backend: OnceLock::new(),
        })
    }

    /// The rtnetlink handle bound to this namespace.
    pub(crate) fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// The namespace's identity when the worker was made.
    pub(crate) fn id(&self) -> NsId {
        self.id
    }

    /// Label (path) for messages.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// Raw fd of the namespace, valid as long as `self` lives.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Runs `f` on the namespace's thread and awaits its result.
    pub(crate) async fn run<T, F>(&self, f: F) -> DpResult<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await.map_err(|_| self.gone())
    }

    /// Runs `f` on the namespace's thread and blocks until it returns (construction only).
    pub(crate) fn run_sync<T, F>(&self, f: F) -> DpResult<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.recv().map_err(|_| self.gone())
    }

    fn submit(&self, job: Job) -> DpResult<()> {
        self.jobs.send(job).map_err(|_| self.gone())
    }

    fn gone(&self) -> DpError {
        DpError::Netns {
            path: self.label.clone(),
            msg: "namespace worker thread is gone (a job panicked?)".into(),
        }
    }
}

/// Thread names are limited to 15 bytes by the kernel; keep the distinctive tail.
fn short_label(label: &str) -> String {
    let tail: String = label
        .chars()
        .rev()
        .take(9)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_label_keeps_tail() {
        assert_eq!(short_label("/var/run/netns/abcdefghijkl"), "defghijkl");
        assert_eq!(short_label("x"), "x");
    }
}
