//! The daemon client: one connection to its unix socket, one gRPC call, one deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{CniError, DAEMON_INTERNAL, DAEMON_REFUSED, TRY_AGAIN};
use crate::h2::{self, CallError, Code, Status};

/// "daemon unreachable" (code 11), naming the socket.
pub fn unreachable(socket: &Path, details: impl Into<String>) -> CniError {
    CniError::new(
        TRY_AGAIN,
        format!("ambient-cnid unreachable at {}", socket.display()),
        details,
    )
}

/// "deadline passed" (code 11), naming the socket.
pub fn deadline(socket: &Path, timeout: Duration) -> CniError {
    CniError::new(
        TRY_AGAIN,
        format!(
            "ambient-cnid at {} did not answer in time",
            socket.display()
        ),
        format!("deadline of {} ms exceeded", timeout.as_millis()),
    )
}

/// Maps a gRPC status from the daemon to a CNI error.
///
/// - 11: the daemon was not reachable or gave up in a way a retry can fix (Unavailable,
///   DeadlineExceeded, Cancelled, Aborted, ResourceExhausted, and Unknown, which is what a
///   connection torn down mid-call looks like).
/// - 101: Internal / DataLoss: the daemon accepted the pod but failed to program the kernel.
/// - 100: every other status: the daemon refused (InvalidArgument, FailedPrecondition,
///   PermissionDenied, NotFound for a missing attachment, Unimplemented for an old daemon, ...).
pub fn status_to_cni(status: &Status, socket: &Path, what: &str) -> CniError {
    let details = if status.message.is_empty() {
        format!("{:?}", status.code)
    } else {
        format!("{:?}: {}", status.code, status.message)
    };
    match status.code {
        Code::DeadlineExceeded => CniError::new(
            TRY_AGAIN,
            format!(
                "ambient-cnid at {} did not answer in time",
                socket.display()
            ),
            details,
        ),
        Code::Unavailable
        | Code::Cancelled
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::Unknown => CniError::new(
            TRY_AGAIN,
            format!("ambient-cnid at {} could not {what}", socket.display()),
            details,
        ),
        Code::Internal | Code::DataLoss => CniError::new(
            DAEMON_INTERNAL,
            format!("ambient-cnid failed to {what}"),
            details,
        ),
        _ => CniError::new(
            DAEMON_REFUSED,
            format!("ambient-cnid refused to {what}"),
            details,
        ),
    }
}

/// Connects and makes one call of `method` (`PodAdd`, `PodDel`, ...), all within `timeout`. The
/// daemon learns how much of the deadline is left (`grpc-timeout`). `what` completes "could not
/// ..." in messages.
pub fn call<Req, Resp>(
    socket: &Path,
    timeout: Duration,
    method: &str,
    what: &str,
    req: &Req,
) -> Result<Resp, CniError>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let start = Instant::now();
    let deadline_at = start + timeout;
    let path = format!("/ambientcni.v1.CniNode/{method}");
    let body = req.encode_to_vec();
    let left = timeout.saturating_sub(start.elapsed());
    match h2::unary(socket, &path, &body, left, deadline_at) {
        Ok(bytes) => Resp::decode(bytes.as_slice()).map_err(|e| {
            CniError::new(
                TRY_AGAIN,
                format!(
                    "ambient-cnid at {} sent an unreadable answer",
                    socket.display()
                ),
                e.to_string(),
            )
        }),
        Err(CallError::Connect(e)) => Err(unreachable(socket, e.to_string())),
        Err(CallError::Deadline) => Err(deadline(socket, timeout)),
        Err(CallError::Status(s)) => {
            // The daemon enforces the grpc-timeout we sent: when it gives up, that is our
            // deadline, say so.
            let expired = start.elapsed() + Duration::from_millis(20) >= timeout;
            match s.code {
                Code::Cancelled | Code::DeadlineExceeded if expired => {
                    Err(deadline(socket, timeout))
                }
                _ => Err(status_to_cni(&s, socket, what)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_cni_codes() {
        let s = Path::new("/run/x.sock");
        let code = |c: Code| status_to_cni(&Status::new(c, "m"), s, "enroll the pod").code;
        assert_eq!(code(Code::Unavailable), TRY_AGAIN);
        assert_eq!(code(Code::DeadlineExceeded), TRY_AGAIN);
        assert_eq!(code(Code::Internal), DAEMON_INTERNAL);
        assert_eq!(code(Code::InvalidArgument), DAEMON_REFUSED);
        assert_eq!(code(Code::FailedPrecondition), DAEMON_REFUSED);
        assert_eq!(code(Code::PermissionDenied), DAEMON_REFUSED);
        assert_eq!(code(Code::NotFound), DAEMON_REFUSED);
        let e = status_to_cni(
            &Status::new(Code::Internal, "ipset add failed"),
            s,
            "enroll the pod",
        );
        assert_eq!(e.details, "Internal: ipset add failed");
    }

    #[test]
    fn unreachable_names_the_socket() {
        let e = unreachable(Path::new("/run/ambient-cni/cni.sock"), "No such file");
        assert_eq!(e.code, TRY_AGAIN);
        assert!(e.msg.contains("/run/ambient-cni/cni.sock"));
    }

    #[test]
    fn missing_socket_is_unreachable_with_the_os_error() {
        let dir = std::env::temp_dir().join(format!("acni-client-{}", std::process::id()));
        let sock = dir.join("absent.sock");
        let r = call::<_, ambient_cni_proto::v1::StatusReply>(
            &sock,
            Duration::from_millis(500),
            "Status",
            "report status",
            &ambient_cni_proto::v1::StatusRequest {},
        );
        let e = r.expect_err("no socket");
        assert_eq!(e.code, TRY_AGAIN);
        assert!(e.msg.contains("absent.sock"), "{e}");
        assert!(e.details.contains("No such file or directory"), "{e}");
    }
}
