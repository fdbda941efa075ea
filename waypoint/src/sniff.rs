//! Protocol detection on a tunnel whose port declares none: the HTTP/2 client preface, an
//! HTTP/1 request line, else opaque TCP. The bytes read are put back in front of the stream.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use zmesh_core::serve::{PREFACE, Prefixed};

/// What the first bytes look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tcp,
}

/// HTTP/1 methods recognised in a request line (RFC 9110 §9 and WebDAV's common ones).
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
];

/// Longest method + the space after it.
const LONGEST: usize = 10;

/// Classifies `buf`, or `None` when more bytes are needed to tell.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(PREFACE.len());
    if buf[..n] == PREFACE[..n] {
        return (n == PREFACE.len()).then_some(Detected::Http2);
    }
    let mut undecided = false;
    for m in METHODS {
        let want = m.len() + 1;
        let have = buf.len().min(want);
        let mut line = m.to_vec();
        line.push(b' ');
        if buf[..have] == line[..have] {
            if have == want {
                return Some(Detected::Http1);
            }
            undecided = true;
        }
    }
    (!undecided).then_some(Detected::Tcp)
}

/// Reads until the protocol is known. A client that sends nothing within `wait` (a
/// server-first protocol) is opaque TCP; so is one that closes early.
pub async fn detect<S: AsyncRead + Unpin>(
    mut io: S,
    wait: Duration,
) -> std::io::Result<(Detected, Prefixed<S>)> {
    let mut buf = BytesMut::with_capacity(PREFACE.len().max(LONGEST));
    let deadline = tokio::time::Instant::now() + wait;
    let detected = loop {
        if let Some(d) = classify(&buf) {
            break d;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break Detected::Tcp,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((detected, Prefixed::new(buf.freeze(), io)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&PREFACE[..10]), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST "), Some(Detected::Http1));
        assert_eq!(classify(b"PO"), None);
        // "P" could be POST, PUT, PATCH or the preface.
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp));
        assert_eq!(classify(b"GETX"), Some(Detected::Tcp));
        assert_eq!(classify(b"hello"), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn replays_what_it_read() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET /x HTTP/1.1\r\n")
            .await
            .unwrap();
        let (d, mut s) = detect(b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        drop(a);
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET /x HTTP/1.1\r\n");
        let (_a, b) = tokio::io::duplex(64);
        let (d, _) = detect(b, Duration::from_millis(50)).await.unwrap();
        assert_eq!(d, Detected::Tcp);
    }
}
