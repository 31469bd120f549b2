//! The gRPC client: one connection to the daemon's unix socket, one call, one deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_cni_proto::v1::cni_node_client::CniNodeClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

use crate::error::{CniError, DAEMON_INTERNAL, DAEMON_REFUSED, TRY_AGAIN};

/// A connected client, plus the socket path for messages.
pub struct Daemon {
    client: CniNodeClient<Channel>,
    socket: PathBuf,
}

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
pub fn status_to_cni(status: &tonic::Status, socket: &Path, what: &str) -> CniError {
    let details = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    };
    match status.code() {
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

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // tonic's transport error already prints its source; do not repeat it.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

impl Daemon {
    /// Dials the socket. No timeouts here: the caller wraps connect + call in one
    /// `tokio::time::timeout` (a second, inner timer would race it and blur the message), and
    /// tells the daemon the remaining time per request (grpc-timeout).
    pub async fn connect(socket: &Path) -> Result<Daemon, CniError> {
        // The URI is a placeholder: the connector below ignores it and dials the socket.
        let endpoint = Endpoint::try_from("http://[::]:50051")
            .map_err(|e| unreachable(socket, source_chain(&e)))?;
        let path = socket.to_path_buf();
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(&path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| unreachable(socket, source_chain(&e)))?;
        Ok(Daemon {
            client: CniNodeClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    /// The socket this client dialled.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The generated client, for one call.
    pub fn into_client(self) -> CniNodeClient<Channel> {
        self.client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_cni_codes() {
        let s = Path::new("/run/x.sock");
        let code = |c: Code| status_to_cni(&tonic::Status::new(c, "m"), s, "enroll the pod").code;
        assert_eq!(code(Code::Unavailable), TRY_AGAIN);
        assert_eq!(code(Code::DeadlineExceeded), TRY_AGAIN);
        assert_eq!(code(Code::Internal), DAEMON_INTERNAL);
        assert_eq!(code(Code::InvalidArgument), DAEMON_REFUSED);
        assert_eq!(code(Code::FailedPrecondition), DAEMON_REFUSED);
        assert_eq!(code(Code::PermissionDenied), DAEMON_REFUSED);
        assert_eq!(code(Code::NotFound), DAEMON_REFUSED);
        let e = status_to_cni(
            &tonic::Status::internal("ipset add failed"),
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
}
