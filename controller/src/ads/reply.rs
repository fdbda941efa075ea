//! One delta xDS response as a stream sends it: the resources are the cache's shared
//! [`Entry`]s, and the gRPC frame is built from their pre-encoded bytes ([`Entry::encoded`]),
//! so pushing a resource to many streams neither copies it into per-stream messages nor
//! re-encodes it, and no stream keeps an encode buffer the size of its largest response.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use xds_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

use super::cache::{Entry, Snapshot};

/// gRPC message prefix: one compression flag byte and a 4-byte big-endian length.
const GRPC_PREFIX: usize = 5;

/// Small pieces of a message are gathered into body chunks of about this size (one copy, a
/// chunk at a time); bigger pieces are sent as they are, without copying.
pub(crate) const CHUNK: usize = 64 * 1024;

/// The resources of a [`Reply`], in name order, shared with the cache.
#[derive(Clone, Debug)]
pub enum Resources {
    /// A list of entries.
    List(Vec<Arc<Entry>>),
    /// Every entry of a cache snapshot, with their encoded bytes joined
    /// ([`Cache::encoded`](super::Cache::encoded)): a whole type, sent to many streams
    /// without a list or a copy per stream.
    All(Arc<Snapshot>, Bytes),
}

impl std::ops::Deref for Resources {
    type Target = [Arc<Entry>];

    fn deref(&self) -> &[Arc<Entry>] {
        match self {
            Resources::List(entries) => entries,
            Resources::All(snapshot, _) => snapshot,
        }
    }
}

impl PartialEq for Resources {
    fn eq(&self, other: &Resources) -> bool {
        **self == **other
    }
}

impl From<Vec<Arc<Entry>>> for Resources {
    fn from(entries: Vec<Arc<Entry>>) -> Resources {
        Resources::List(entries)
    }
}

/// A `DeltaDiscoveryResponse` whose resources are shared with the cache.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// `system_version_info` (the cache generation; debugging only).
    pub system_version_info: String,
    /// The resources sent, in name order.
    pub resources: Resources,
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

    /// What the reply holds that nothing else keeps for long: its removal names, and its list
    /// of entries or, for a whole snapshot, the joined buffer (which the cache lets go at the
    /// type's next change).
    pub fn queued_bytes(&self) -> usize {
        let removed: usize = (self.removed_resources.iter())
            .map(|n| n.len() + std::mem::size_of::<String>())
            .sum();
        removed
            + match &self.resources {
                Resources::List(entries) => entries.len() * std::mem::size_of::<Arc<Entry>>(),
                Resources::All(_, encoded) => encoded.len(),
            }
    }

    /// The encoded protobuf length of the message.
    pub fn encoded_len(&self) -> usize {
        self.head().len()
            + match &self.resources {
                Resources::List(entries) => entries.iter().map(|e| e.encoded.len()).sum(),
                Resources::All(_, encoded) => encoded.len(),
            }
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
/// copied), and so is a whole snapshot's joined buffer, [`CHUNK`] bytes at a time. The other
/// fields, which hold the reply's own removal names (megabytes of them, for a client that
/// asks for names that do not exist), go [`CHUNK`] bytes at a time too: HTTP/2 buffers
/// whatever chunk it is given, and hyper asks for the next one when its send buffer has room,
/// so a reply stays counted in its budget ([`Reply::queued_bytes`]) until HTTP/2 holds no
/// more of it than that buffer and one chunk.
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
        match (&self.head, &self.reply.resources) {
            (Some(head), _) => Some(head),
            (None, Resources::List(entries)) => entries.get(self.next).map(|e| &e.encoded),
            (None, Resources::All(..)) => None,
        }
    }

    fn advance(&mut self) {
        if self.head.take().is_none() {
            self.next += 1;
        }
    }

    /// The next body chunk, `None` when the message is complete.
    pub(crate) fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(head) = &mut self.head
            && head.len() > CHUNK
        {
            return Some(head.split_to(CHUNK));
        }
        if self.head.is_none()
            && let Resources::All(_, encoded) = &self.reply.resources
        {
            let at = self.next.min(encoded.len());
            let end = encoded.len().min(at + CHUNK);
            self.next = end;
            return (at < end).then(|| encoded.slice(at..end));
        }
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
            resources: Resources::List(names.iter().map(|n| cache.get("t", n).unwrap()).collect()),
            type_url: "t".into(),
            nonce: "1-2".into(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A cache of one resource per size, named `r0`, `r1`, ...
    fn cache_of(sizes: &[usize]) -> Cache {
        let cache = Cache::new();
        let upserts = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let any = Any {
                    type_url: "t".into(),
                    value: vec![i as u8; *n],
                };
                (format!("r{i:03}"), any)
            })
            .collect();
        cache.apply("t", upserts, vec![]).unwrap();
        cache
    }

    fn chunks(reply: Reply) -> Vec<Bytes> {
        let mut frames = Frames::new(reply);
        let mut chunks = Vec::new();
        while let Some(c) = frames.next_chunk() {
            chunks.push(c);
        }
        chunks
    }

    /// The response a gRPC message's chunks carry, checking its prefix.
    fn decode(chunks: &[Bytes]) -> DeltaDiscoveryResponse {
        let frame: Vec<u8> = chunks.concat();
        assert_eq!(frame[0], 0, "not compressed");
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 5);
        DeltaDiscoveryResponse::decode(&frame[5..]).unwrap()
    }

    #[test]
    fn a_whole_snapshot_is_sent_from_one_shared_buffer_in_chunks() {
        // 300 resources of 1 kB: more than four chunks.
        let cache = cache_of(&[1000; 300]);
        let snapshot = cache.sorted_entries("t");
        let encoded = cache.encoded("t", &snapshot);
        let all = Reply {
            resources: Resources::All(snapshot.clone(), encoded.clone()),
            ..reply(&cache, &[], &["gone"])
        };
        let names: Vec<&str> = snapshot.iter().map(|e| &*e.name).collect();
        let some = reply(&cache, &names, &["gone"]);
        assert_eq!(all, some);
        assert_eq!(all.encoded_len(), some.encoded_len());
        // Queued, it counts its buffer; the list of the same entries, its pointers.
        let removed = "gone".len() + std::mem::size_of::<String>();
        assert_eq!(all.queued_bytes(), removed + encoded.len());
        assert_eq!(
            some.queued_bytes(),
            removed + 300 * std::mem::size_of::<Arc<Entry>>()
        );
        let sent = chunks(all.clone());
        assert!(sent[1..].iter().all(|c| c.len() <= CHUNK), "{sent:?}");
        assert_eq!(
            sent.len(),
            2 + encoded.len() / CHUNK,
            "the head, then the body"
        );
        // The body's chunks are slices of the shared buffer, not copies.
        assert_eq!(sent[1].as_ptr(), encoded.as_ptr());
        assert_eq!(decode(&sent), some.to_proto());
        // The newest snapshot's buffer is joined once.
        assert_eq!(cache.encoded("t", &snapshot).as_ptr(), encoded.as_ptr());
    }

    #[test]
    fn the_grpc_frame_decodes_to_the_same_response_whatever_the_chunking() {
        // Small resources (gathered into chunks) and big ones (sent as they are).
        let sizes = [10usize, 3, 40_000, 1, 70_000, 5, 5];
        let cache = cache_of(&sizes);
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("r{i:03}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for (names, removed) in [(&names[..], &["gone", "x"][..]), (&[][..], &[][..])] {
            let r = reply(&cache, names, removed);
            let chunks = chunks(r.clone());
            // Small pieces are gathered, big ones (the 40 and 70 kB resources) go alone.
            let expected = if names.is_empty() { 1 } else { 5 };
            assert_eq!(
                chunks.len(),
                expected,
                "{:?}",
                chunks.iter().map(Bytes::len).collect::<Vec<_>>()
            );
            let len: usize = chunks.iter().map(Bytes::len).sum();
            assert_eq!(len - 5, r.encoded_len());
            assert_eq!(decode(&chunks), r.to_proto());
        }
    }

    /// A long removal list (the reply's own bytes) goes out a chunk at a time, like a
    /// snapshot's buffer, and its last piece follows (here alone: it is over a quarter chunk).
    #[test]
    fn a_long_removal_list_is_sent_a_chunk_at_a_time() {
        let cache = cache_of(&[10, 20]);
        let removed: Vec<String> = (0..300)
            .map(|i| format!("{i:03}{}", "x".repeat(997)))
            .collect();
        let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
        let r = reply(&cache, &["r000", "r001"], &removed);
        let sent = chunks(r.clone());
        let lens: Vec<usize> = sent.iter().map(Bytes::len).collect();
        assert!(lens.iter().all(|&n| n <= CHUNK), "{lens:?}");
        let head = GRPC_PREFIX + r.head().len();
        assert!(head > 4 * CHUNK);
        assert!(lens[..head / CHUNK].iter().all(|&n| n == CHUNK), "{lens:?}");
        assert_eq!(decode(&sent), r.to_proto());
    }
}
