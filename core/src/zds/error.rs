//! Errors of the ZDS subsystem, worded for the operator who reads them in a log.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::MAX_MESSAGE_SIZE;

/// Everything that can go wrong between the node agent and ztunnel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZdsError {
    /// The listening socket could not be created.
    #[error(
        "cannot listen on the ZDS socket {path}: {source} (check that its directory exists and \
         is writable by the node agent)"
    )]
    Listen { path: PathBuf, source: io::Error },
    /// ztunnel could not connect to the node agent.
    #[error(
        "cannot connect to the node agent's ZDS socket {path}: {source} (is the node agent \
         running on this node, and is the socket path the same on both sides?)"
    )]
    Connect { path: PathBuf, source: io::Error },
    /// A system call on an established connection failed.
    #[error("ZDS socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection (end of file).
    #[error("the peer closed the ZDS connection")]
    Closed,
    /// A packet did not fit into the receive buffer.
    #[error(
        "received a truncated ZDS message (MSG_TRUNC: more than {MAX_MESSAGE_SIZE} bytes); the \
         peer is not speaking ZDS or is incompatible with this version"
    )]
    Truncated,
    /// The ancillary data did not fit into the receive buffer.
    #[error(
        "received truncated ancillary data (MSG_CTRUNC); the peer sent more file descriptors \
         than a ZDS message may carry"
    )]
    ControlTruncated,
    /// A message to send is larger than ztunnel can read.
    #[error(
        "ZDS message of {len} bytes exceeds the {MAX_MESSAGE_SIZE} bytes ztunnel can read (are \
         the pod's name, namespace or service account unusually long?)"
    )]
    TooLarge { len: usize },
    /// A packet is not a valid protobuf message of the expected type.
    #[error("malformed ZDS message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A well-formed message broke the protocol's rules.
    #[error("ZDS protocol violation: {0}")]
    Protocol(#[from] Violation),
    /// ztunnel's hello names a protocol version the node agent does not speak.
    #[error(
        "ztunnel announced ZDS version {0} but this node agent speaks only V1 (1); upgrade the \
         older of the two"
    )]
    Version(i32),
    /// ztunnel connected but did not say hello in time.
    #[error("ztunnel connected but sent no hello within {0:?}")]
    HelloTimeout(Duration),
    /// ztunnel did not answer a request in time; the connection is closed.
    #[error("ztunnel did not acknowledge {subject} within {timeout:?}")]
    AckTimeout { subject: Subject, timeout: Duration },
    /// ztunnel answered a request with a NACK.
    #[error("ztunnel refused {subject}: {reason}")]
    Nack { subject: Subject, reason: String },
    /// The connection ended before ztunnel answered the request.
    #[error("ztunnel's connection closed before it acknowledged {subject}")]
    ConnectionLost { subject: Subject },
    /// An Add was requested while no ztunnel is connected.
    #[error("no ztunnel is connected to the node agent (is ztunnel running on this node?)")]
    NotConnected,
}

/// The request an acknowledgement (or its absence) is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `AddWorkload` for the pod with this uid.
    Add(String),
    /// `KeepWorkload` for the pod with this uid.
    Keep(String),
    /// `DelWorkload` for the pod with this uid.
    Del(String),
    /// `SnapshotSent`.
    SnapshotSent,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Add(uid) => write!(f, "pod {uid:?}"),
            Subject::Keep(uid) => write!(f, "keeping pod {uid:?}"),
            Subject::Del(uid) => write!(f, "removal of pod {uid:?}"),
            Subject::SnapshotSent => f.write_str("the end of the snapshot"),
        }
    }
}

/// A rule of the protocol that a well-formed message broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// `AddWorkload` without the netns fd.
    #[error("AddWorkload for pod {uid:?} carries no network namespace file descriptor")]
    AddWithoutFd { uid: String },
    /// `AddWorkload` with more than one fd.
    #[error("AddWorkload for pod {uid:?} carries {count} file descriptors, expected exactly one")]
    TooManyFds { uid: String, count: usize },
    /// A request other than `AddWorkload` with fds.
    #[error("{kind} carries {count} file descriptor(s), expected none")]
    UnexpectedFd { kind: &'static str, count: usize },
    /// `AddWorkload` without `workload_info`.
    #[error("AddWorkload for pod {uid:?} has no workload_info")]
    MissingWorkloadInfo { uid: String },
    /// `KeepWorkload` after `SnapshotSent`.
    #[error("KeepWorkload for pod {uid:?} after SnapshotSent (Keep is only valid in the snapshot)")]
    KeepAfterSnapshot { uid: String },
    /// A second `SnapshotSent` on one connection.
    #[error("a second SnapshotSent on the same connection")]
    SecondSnapshot,
    /// A `WorkloadRequest` with no payload, or one this version does not know.
    #[error("WorkloadRequest with an empty or unknown payload (is the node agent newer?)")]
    EmptyRequest,
    /// A `WorkloadResponse` with no payload, or one this version does not know.
    #[error("WorkloadResponse with an empty or unknown payload (is ztunnel newer?)")]
    EmptyResponse,
    /// ztunnel sent something while no request was waiting for an answer.
    #[error("ztunnel sent a message while no request was waiting for an answer")]
    Unsolicited,
}
