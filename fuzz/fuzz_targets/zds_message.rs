//! ZDS messages (the node agent <-> ztunnel protocol over a seqpacket socket): what ztunnel
//! decodes from the agent (`decode_request`, with the descriptors that came with the packet)
//! and what the agent decodes from ztunnel (`decode_hello`, `decode_response`).
//!
//! Input: one control byte, then one packet (at most 1024 bytes, the transport's limit). The
//! control byte's low two bits are the number of descriptors that arrived with the packet
//! (`/dev/null` stands in for a network namespace); bits 2-3 choose the decoder (0 and 3:
//! request, 1: hello, 2: response).
//!
//! Invariants: an Add is accepted only with exactly one descriptor and every other request
//! only with none; an accepted request encodes back to a packet that decodes to the same
//! request; a NACK always carries its reason.
#![no_main]

use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use xds_proto::istio::workload::zds::{self as pb, workload_request::Payload};
use zmesh_core::zds::{Request, decode_hello, decode_request, decode_response};

fn devnull() -> OwnedFd {
    std::fs::File::open("/dev/null")
        .expect("open /dev/null")
        .into()
}

/// The packet the node agent would send for `req` (descriptor apart).
fn encode(req: &Request) -> Vec<u8> {
    let payload = match req {
        Request::Add { uid, info, .. } => Payload::Add(pb::AddWorkload {
            uid: uid.clone(),
            workload_info: Some(info.clone().into()),
        }),
        Request::Keep { uid } => Payload::Keep(pb::KeepWorkload { uid: uid.clone() }),
        Request::Del { uid } => Payload::Del(pb::DelWorkload { uid: uid.clone() }),
        Request::SnapshotSent => Payload::SnapshotSent(pb::SnapshotSent {}),
    };
    pb::WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn same(a: &Request, b: &Request) -> bool {
    match (a, b) {
        (
            Request::Add { uid, info, .. },
            Request::Add {
                uid: u, info: i, ..
            },
        ) => uid == u && info == i,
        _ => a.subject() == b.subject(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, packet)) = data.split_first() else {
        return;
    };
    if packet.len() > 1024 {
        return;
    }
    match (control >> 2) & 3 {
        1 => {
            let _ = decode_hello(packet);
        }
        2 => {
            if let Ok(Err(reason)) = decode_response(packet) {
                assert!(
                    !reason.is_empty(),
                    "a NACK without a reason reads as an ACK"
                );
            }
        }
        _ => {
            let fds: Vec<OwnedFd> = (0..control & 3).map(|_| devnull()).collect();
            let count = fds.len();
            let Ok(req) = decode_request(packet, fds) else {
                return;
            };
            match &req {
                Request::Add { .. } => assert_eq!(count, 1, "Add accepted with {count} fds"),
                _ => assert_eq!(count, 0, "{:?} accepted with {count} fds", req.subject()),
            }
            let fds = match req {
                Request::Add { .. } => vec![devnull()],
                _ => Vec::new(),
            };
            let again = decode_request(&encode(&req), fds).expect("a re-encoded request decodes");
            assert!(same(&req, &again), "{req:?} came back as {again:?}");
        }
    }
});
