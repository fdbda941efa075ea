//! ZDS, the protocol by which the node agent hands pods to the local ztunnel, wire-compatible
//! with Istio's `istio.workload.zds`.
//!
//! # Transport
//!
//! A unix `SOCK_SEQPACKET` socket ([`DEFAULT_SOCKET_PATH`]). The **node agent listens**
//! ([`ZdsServer`]), **ztunnel connects** ([`ZdsClient`]). Every packet is one bare protobuf
//! message (no length prefix) of at most [`MAX_MESSAGE_SIZE`] bytes: ztunnel reads into a buffer
//! of that size and rejects `MSG_TRUNC` / `MSG_CTRUNC`. The pod's network namespace travels as
//! an `SCM_RIGHTS` file descriptor next to `AddWorkload`. See [`transport`].
//!
//! # Sequence
//!
//! ```text
//! ztunnel                                   node agent
//!    |--- connect ------------------------------>|
//!    |--- ZdsHello{version: V1} ---------------->|
//!    |<-- WorkloadRequest{add: uid, info} + fd --|  } the snapshot: every pod the agent
//!    |--- WorkloadResponse{ack: ""} ------------>|  } knows, Add (with its netns) or Keep
//!    |<-- WorkloadRequest{keep: uid} ------------|  } (no fd), one at a time, each acked
//!    |--- ack ---------------------------------->|  }
//!    |<-- WorkloadRequest{snapshot_sent} --------|  ztunnel drops every pod not named above
//!    |--- ack ---------------------------------->|
//!    |<-- add + fd / del, each acked ------------|  steady state
//! ```
//!
//! An `Ack` with a non-empty `error` is a NACK. Acks correlate with requests only by order, so
//! each side has at most one request in flight per connection.
//!
//! # Rules ztunnel enforces
//!
//! `AddWorkload` carries exactly one fd and a `workload_info`; `KeepWorkload`, `DelWorkload`
//! and `SnapshotSent` carry none; `KeepWorkload` after the snapshot, a second `SnapshotSent`,
//! and an empty or unknown payload are errors ([`Violation`]). [`ZdsClient`] answers a violation
//! (and a packet it cannot read) with a NACK that names it, then **closes the connection and
//! reconnects** after its backoff, which brings a fresh snapshot. That is what upstream ztunnel
//! does for read errors; for the state violations (Keep after snapshot, second snapshot) upstream
//! stops its pod manager altogether, which leaves the node unable to enrol pods until ztunnel
//! restarts; we reconnect instead. A NACK the *caller* asks for (a proxy that failed to start)
//! keeps the connection, as upstream does.
//!
//! # Several ztunnels
//!
//! During a ztunnel upgrade two instances are connected at once. As in Istio, the agent sends
//! Adds to the **newest** connection only and Deletes to **all** of them, so the old instance
//! also lets go of deleted pods while it drains.

mod error;
mod message;
pub mod transport;

mod client;
mod server;

use std::time::Duration;

pub use client::{Backoff, Event, ZdsClient};
pub use error::{Subject, Violation, ZdsError};
pub use message::{Request, decode_hello, decode_request, decode_response};
pub use server::{ServerOptions, SnapshotEntry, ZdsServer};
pub use transport::{SeqpacketConn, SeqpacketListener};

/// Where ztunnel and the node agent meet by default (Istio's `INPOD_UDS`).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";

/// The largest ZDS message, in bytes: the size of ztunnel's receive buffer.
pub const MAX_MESSAGE_SIZE: usize = 1024;

/// How long the node agent waits for ztunnel's hello and for each acknowledgement.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Permissions of the listening socket file: only the owner (root) may connect.
pub const SOCKET_MODE: u32 = 0o600;

/// Identity of a pod, as the node agent tells ztunnel (`WorkloadInfo` on the wire).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadInfo {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// The pod's service account; with the namespace it makes the pod's SPIFFE identity.
    pub service_account: String,
}

impl From<xds_proto::istio::workload::zds::WorkloadInfo> for WorkloadInfo {
    fn from(w: xds_proto::istio::workload::zds::WorkloadInfo) -> Self {
        WorkloadInfo {
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
        }
    }
}

impl From<WorkloadInfo> for xds_proto::istio::workload::zds::WorkloadInfo {
    fn from(w: WorkloadInfo) -> Self {
        xds_proto::istio::workload::zds::WorkloadInfo {
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
        }
    }
}
