//! Encoding and decoding of ZDS messages: the edge where protobuf becomes domain types.
//!
//! Decoding is pure (no I/O) so that it can be tested, and fuzzed, on its own. It enforces the
//! rules that depend on one message alone (which requests carry a descriptor); the rules that
//! depend on the session (Keep only in the snapshot, one snapshot) live in the client.

use std::os::fd::OwnedFd;

use prost::Message;
use xds_proto::istio::workload::zds::{
    self as pb, Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
    workload_response,
};

use super::{MAX_MESSAGE_SIZE, Subject, Violation, WorkloadInfo, ZdsError};

/// A request from the node agent to ztunnel, validated.
#[derive(Debug)]
pub enum Request {
    /// Start (or keep running) the proxy for this pod, inside `netns`.
    Add {
        /// The pod's uid.
        uid: String,
        /// Who the pod is.
        info: WorkloadInfo,
        /// The pod's network namespace.
        netns: OwnedFd,
    },
    /// The pod still exists but the agent has no netns for it: keep it (snapshot only).
    Keep {
        /// The pod's uid.
        uid: String,
    },
    /// The pod is gone: stop its proxy now.
    Del {
        /// The pod's uid.
        uid: String,
    },
    /// The snapshot is complete: drop every pod it did not name.
    SnapshotSent,
}

impl Request {
    /// What an acknowledgement of this request is about.
    pub fn subject(&self) -> Subject {
        match self {
            Request::Add { uid, .. } => Subject::Add(uid.clone()),
            Request::Keep { uid } => Subject::Keep(uid.clone()),
            Request::Del { uid } => Subject::Del(uid.clone()),
            Request::SnapshotSent => Subject::SnapshotSent,
        }
    }
}

/// Decodes a `WorkloadRequest` and checks its descriptors: an Add needs exactly one, every other
/// request none. The descriptors are consumed: the netns of a valid Add is returned, all others
/// are closed.
pub fn decode_request(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Request, ZdsError> {
    let req = WorkloadRequest::decode(bytes)?;
    let payload = req.payload.ok_or(Violation::EmptyRequest)?;
    let none = |kind: &'static str, fds: Vec<OwnedFd>| match fds.len() {
        0 => Ok(()),
        count => Err(Violation::UnexpectedFd { kind, count }),
    };
    match payload {
        workload_request::Payload::Add(add) => {
            let netns = match <[OwnedFd; 1]>::try_from(fds) {
                Ok([netns]) => netns,
                Err(fds) if fds.is_empty() => {
                    return Err(Violation::AddWithoutFd { uid: add.uid }.into());
                }
                Err(fds) => {
                    let count = fds.len();
                    return Err(Violation::TooManyFds {
                        uid: add.uid,
                        count,
                    }
                    .into());
                }
            };
            let info = add
                .workload_info
                .ok_or_else(|| Violation::MissingWorkloadInfo {
                    uid: add.uid.clone(),
                })?;
            Ok(Request::Add {
                uid: add.uid,
                info: info.into(),
                netns,
            })
        }
        workload_request::Payload::Keep(keep) => {
            none("KeepWorkload", fds)?;
            Ok(Request::Keep { uid: keep.uid })
        }
        workload_request::Payload::Del(del) => {
            none("DelWorkload", fds)?;
            Ok(Request::Del { uid: del.uid })
        }
        workload_request::Payload::SnapshotSent(_) => {
            none("SnapshotSent", fds)?;
            Ok(Request::SnapshotSent)
        }
    }
}

/// Decodes a `WorkloadResponse`: `Ok(Ok(()))` for an ACK, `Ok(Err(reason))` for a NACK.
pub fn decode_response(bytes: &[u8]) -> Result<Result<(), String>, ZdsError> {
    let resp = WorkloadResponse::decode(bytes)?;
    match resp.payload {
        Some(workload_response::Payload::Ack(Ack { error })) if error.is_empty() => Ok(Ok(())),
        Some(workload_response::Payload::Ack(Ack { error })) => Ok(Err(error)),
        None => Err(Violation::EmptyResponse.into()),
    }
}

/// Decodes ztunnel's `ZdsHello` and checks that it speaks V1.
pub fn decode_hello(bytes: &[u8]) -> Result<(), ZdsError> {
    let hello = ZdsHello::decode(bytes)?;
    if hello.version == Version::V1 as i32 {
        Ok(())
    } else {
        Err(ZdsError::Version(hello.version))
    }
}

/// Encodes a message, refusing one larger than ztunnel can read.
pub(crate) fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, ZdsError> {
    let bytes = msg.encode_to_vec();
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(ZdsError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// `ZdsHello{version: V1}`.
pub(crate) fn hello() -> Vec<u8> {
    ZdsHello {
        version: Version::V1 as i32,
    }
    .encode_to_vec()
}

/// An ACK (`Ok`) or a NACK carrying the reason (`Err`). An empty reason would read as an ACK,
/// so it is replaced.
pub(crate) fn ack(outcome: Result<(), &str>) -> Vec<u8> {
    let error = match outcome {
        Ok(()) => String::new(),
        Err("") => "unspecified error".to_owned(),
        Err(reason) => reason.to_owned(),
    };
    WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack { error })),
    }
    .encode_to_vec()
}

/// A request as the node agent sends it (the netns travels separately).
pub(crate) fn request(subject: &Subject, info: Option<WorkloadInfo>) -> WorkloadRequest {
    let payload = match subject {
        Subject::Add(uid) => workload_request::Payload::Add(pb::AddWorkload {
            uid: uid.clone(),
            workload_info: info.map(Into::into),
        }),
        Subject::Keep(uid) => {
            workload_request::Payload::Keep(pb::KeepWorkload { uid: uid.clone() })
        }
        Subject::Del(uid) => workload_request::Payload::Del(pb::DelWorkload { uid: uid.clone() }),
        Subject::SnapshotSent => workload_request::Payload::SnapshotSent(pb::SnapshotSent {}),
    };
    WorkloadRequest {
        payload: Some(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn info() -> WorkloadInfo {
        WorkloadInfo {
            name: "p".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
        }
    }

    fn bytes(subject: Subject) -> Vec<u8> {
        request(&subject, Some(info())).encode_to_vec()
    }

    fn violation(r: Result<Request, ZdsError>) -> Violation {
        match r {
            Err(ZdsError::Protocol(v)) => v,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn add_needs_exactly_one_fd_and_info() {
        let add = bytes(Subject::Add("u1".into()));
        match decode_request(&add, vec![fd()]).unwrap() {
            Request::Add { uid, info: i, .. } => assert_eq!((uid.as_str(), i), ("u1", info())),
            other => panic!("{other:?}"),
        }
        let v = violation(decode_request(&add, vec![]));
        assert_eq!(v, Violation::AddWithoutFd { uid: "u1".into() });
        let v = violation(decode_request(&add, vec![fd(), fd()]));
        assert_eq!(
            v,
            Violation::TooManyFds {
                uid: "u1".into(),
                count: 2
            }
        );
        let bare = request(&Subject::Add("u2".into()), None).encode_to_vec();
        let v = violation(decode_request(&bare, vec![fd()]));
        assert_eq!(v, Violation::MissingWorkloadInfo { uid: "u2".into() });
    }

    #[test]
    fn other_requests_carry_no_fd() {
        for (subject, kind) in [
            (Subject::Keep("k".into()), "KeepWorkload"),
            (Subject::Del("d".into()), "DelWorkload"),
            (Subject::SnapshotSent, "SnapshotSent"),
        ] {
            let b = bytes(subject.clone());
            assert_eq!(decode_request(&b, vec![]).unwrap().subject(), subject);
            let v = violation(decode_request(&b, vec![fd()]));
            assert_eq!(v, Violation::UnexpectedFd { kind, count: 1 });
        }
    }

    #[test]
    fn empty_or_unknown_payload_is_rejected() {
        assert_eq!(
            violation(decode_request(&[], vec![])),
            Violation::EmptyRequest
        );
        // Field 4 is not a known payload: prost skips it, leaving no payload.
        assert_eq!(
            violation(decode_request(&[0x22, 0x00], vec![])),
            Violation::EmptyRequest
        );
        assert!(matches!(
            decode_request(&[0xff], vec![]),
            Err(ZdsError::Decode(_))
        ));
    }

    #[test]
    fn responses_and_hello() {
        assert_eq!(decode_response(&ack(Ok(()))).unwrap(), Ok(()));
        assert_eq!(
            decode_response(&ack(Err("boom"))).unwrap(),
            Err("boom".into())
        );
        assert_eq!(
            decode_response(&ack(Err(""))).unwrap(),
            Err("unspecified error".into())
        );
        assert!(matches!(
            decode_response(&[]),
            Err(ZdsError::Protocol(Violation::EmptyResponse))
        ));
        decode_hello(&hello()).unwrap();
        assert!(matches!(decode_hello(&[]), Err(ZdsError::Version(0))));
        assert!(matches!(
            decode_hello(&[0x08, 0x02]),
            Err(ZdsError::Version(2))
        ));
    }

    #[test]
    fn oversized_messages_are_not_sent() {
        let huge = WorkloadInfo {
            name: "n".repeat(MAX_MESSAGE_SIZE),
            ..info()
        };
        let msg = request(&Subject::Add("u".into()), Some(huge));
        assert!(matches!(encode(&msg), Err(ZdsError::TooLarge { .. })));
        assert!(encode(&request(&Subject::Del("u".into()), None)).is_ok());
    }
}
