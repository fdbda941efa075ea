//! One delta xDS response as a stream sends it: the resources are the cache's shared
//! [`Entry`]s, and the gRPC frame is built from their pre-encoded bytes ([`Entry::encoded`]),
//! so pushing a resource to many streams neither copies it into per-stream messages nor
//! re-encodes it, and no stream keeps an encode buffer the size of its largest response.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use xds_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

use super::cache::Entry;

/// gRPC message prefix: one compression flag byte and a 4-byte big-endian length.
const GRPC_PREFIX: usize = 5;

/// Small pieces of a message are gathered into body chunks of about this size (one copy, a
/// chunk at a time); bigger pieces are sent as they are, without copying.
pub(crate) const CHUNK: usize = 64 * 1024;

/// A `DeltaDiscoveryResponse` whose resources are shared with the cache.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// `system_version_info` (the cache generation; debugging only).
    pub system_version_info: String,
    /// The resources sent, in name order.
    pub resources: Vec<Arc<Entry>>,
    /// The type URL of the response.
    pub type_url: String,
    /// The response nonce.
    pub nonce: String,
    /// Names the client must drop.
    pub removed_resources: Vec<String>,
}

impl Reply {
    /// The protobuf message this reply is sent as (copies every resource; for tests and
    /// tools, the server never builds it).
    pub fn to_proto(&self) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: self.system_version_info.clone(),
            resources: self.resources.iter().map(|e| e.to_proto()).collect(),
            type_url: self.type_url.clone(),
            nonce: self.nonce.clone(),
            removed_resources: self.removed_resources.clone(),
            control_plane: None,
        }
    }

    /// The encoded protobuf length of the message.
    pub fn encoded_len(&self) -> usize {
        self.head().len()
            + self
                .resources
                .iter()
                .map(|e| e.encoded.len())
                .sum::<usize>()
    }

    /// Every field except `resources`, encoded (protobuf fields may come in any order).
    fn head(&self) -> BytesMut {
        use prost::encoding::string;
        let mut head = BytesMut::new();
        if !self.system_version_info.is_empty() {
            string::encode(1, &self.system_version_info, &mut head);
        }
        if !self.type_url.is_empty() {
            string::encode(4, &self.type_url, &mut head);
        }
        if !self.nonce.is_empty() {
            string::encode(5, &self.nonce, &mut head);
        }
        string::encode_repeated(6, &self.removed_resources, &mut head);
        head
    }
}

/// The length-prefixed gRPC message of one [`Reply`], produced a chunk at a time: the prefix
/// and the other fields first, then the cache's encoded resources. Small pieces are gathered
/// into chunks of about [`CHUNK`] bytes; big ones are handed out as they are (shared, not
/// copied).
#[derive(Debug)]
pub(crate) struct Frames {
    head: Option<Bytes>,
    reply: Reply,
    next: usize,
}

impl Frames {
    /// The frames of `reply`.
    pub(crate) fn new(reply: Reply) -> Frames {
        let head = reply.head();
        let len = reply.encoded_len();
        let mut first = BytesMut::with_capacity(GRPC_PREFIX + head.len());
        first.put_u8(0);
        // The server refuses to send messages over its limit before it gets here.
        first.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        first.put_slice(&head);
        Frames {
            head: Some(first.freeze()),
            reply,
            next: 0,
        }
    }

    fn peek(&self) -> Option<&Bytes> {
        match &self.head {
            Some(head) => Some(head),
            None => self.reply.resources.get(self.next).map(|e| &e.encoded),
        }
    }

    fn advance(&mut self) {
        if self.head.take().is_none() {
            self.next += 1;
        }
    }

    /// The next body chunk, `None` when the message is complete.
    pub(crate) fn next_chunk(&mut self) -> Option<Bytes> {
        let first = self.peek()?.clone();
        self.advance();
        if first.len() >= CHUNK / 4 {
            return Some(first);
        }
        let mut buf = BytesMut::with_capacity(CHUNK);
        buf.put_slice(&first);
        while let Some(next) = self.peek() {
            if buf.len() + next.len() > CHUNK || next.len() >= CHUNK / 4 {
                break;
            }
            buf.put_slice(next);
            self.advance();
        }
        Some(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ads::Cache;
    use prost::Message;
    use prost_types::Any;

    fn reply(cache: &Cache, names: &[&str], removed: &[&str]) -> Reply {
        Reply {
            system_version_info: "7".into(),
            resources: names.iter().map(|n| cache.get("t", n).unwrap()).collect(),
            type_url: "t".into(),
            nonce: "1-2".into(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_grpc_frame_decodes_to_the_same_response_whatever_the_chunking() {
        let cache = Cache::new();
        // Small resources (gathered into chunks) and big ones (sent as they are).
        let sizes = [10usize, 3, 40_000, 1, 70_000, 5, 5];
        let upserts = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let any = Any {
                    type_url: "t".into(),
                    value: vec![i as u8; *n],
                };
                (format!("r{i}"), any)
            })
            .collect();
        cache.apply("t", upserts, vec![]).unwrap();
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("r{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for (names, removed) in [(&names[..], &["gone", "x"][..]), (&[][..], &[][..])] {
            let r = reply(&cache, names, removed);
            let mut frames = Frames::new(r.clone());
            let mut chunks = Vec::new();
            while let Some(c) = frames.next_chunk() {
                chunks.push(c);
            }
            // Small pieces are gathered, big ones (the 40 and 70 kB resources) go alone.
            let expected = if names.is_empty() { 1 } else { 5 };
            assert_eq!(
                chunks.len(),
                expected,
                "{:?}",
                chunks.iter().map(Bytes::len).collect::<Vec<_>>()
            );
            let frame: Vec<u8> = chunks.concat();
            assert_eq!(frame[0], 0, "not compressed");
            let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 5);
            assert_eq!(len, r.encoded_len());
            let decoded = DeltaDiscoveryResponse::decode(&frame[5..]).unwrap();
            assert_eq!(decoded, r.to_proto());
        }
    }
}
