//! A minimal HTTP/1.1 GET/POST over a plain TCP socket opened inside a netns, for the admin,
//! metrics and readiness endpoints of the proxies under test. No HTTP client crate: the
//! request is `Connection: close`, the body is read to EOF and de-chunked if needed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::sandbox::Netns;

/// A response: status code, headers (names lowercased) and body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first header of that (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` from inside `netns` (e.g. `sandbox.netns(Some("client"))`), with a
/// 5 s timeout for connect and each read.
pub fn get(netns: &Netns, addr: SocketAddr, path: &str) -> Result<Response> {
    request(netns, "GET", addr, path)
}

/// `POST path` (empty body) on `addr` from inside `netns`.
pub fn post(netns: &Netns, addr: SocketAddr, path: &str) -> Result<Response> {
    request(netns, "POST", addr, path)
}

fn request(netns: &Netns, method: &str, addr: SocketAddr, path: &str) -> Result<Response> {
    let timeout = Duration::from_secs(5);
    let ns = netns.name().unwrap_or("the sandbox root netns");
    let mut stream = netns
        .run(|| TcpStream::connect_timeout(&addr, timeout))?
        .with_context(|| format!("connecting to {addr} in {ns}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: zmesh-lab\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response of {method} {path} from {addr}"))?;
    parse(&raw).with_context(|| format!("{method} http://{addr}{path} in {ns}"))
}

/// Parses a complete `Connection: close` response.
pub fn parse(raw: &[u8]) -> Result<Response> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!(
            "incomplete response head: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        );
    };
    let head = std::str::from_utf8(&raw[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    } else if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.parse().context("bad content-length")?;
        if body.len() < len {
            bail!("body cut short: {} of {len} bytes", body.len());
        }
        body.truncate(len);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line without CRLF")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("chunk cut short");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        let r = parse(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.text().as_str()), (503, "abcde"));
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
