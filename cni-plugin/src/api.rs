//! The plugin → node agent API (docs/CNI.md "Plugin -> agent API"): HTTP/1.1 over the
//! agent's unix socket. The request and answer bodies are shared with the agent; the
//! client is a small blocking one, because the plugin is a short-lived process that
//! makes at most one request.
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /v1/cni/add` | [`AddRequest`] | `200` [`AddResponse`], `503`/`400` [`ErrorResponse`] |
//! | `POST /v1/cni/del` | [`DelRequest`] | `200` [`DelResponse`] |
//! | `GET /v1/ready` | - | `200` ready, `503` not ready |

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

/// Path of the enrol request.
pub const ADD_PATH: &str = "/v1/cni/add";
/// Path of the release request.
pub const DEL_PATH: &str = "/v1/cni/del";
/// Path of the readiness probe.
pub const READY_PATH: &str = "/v1/ready";
/// How long the plugin waits for an ADD (enrolment waits for ztunnel's ack).
pub const ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the plugin waits for any other request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer the client accepts.
const MAX_RESPONSE: usize = 1 << 20;

/// `POST /v1/cni/add`: enrol this pod if it belongs to the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    /// `CNI_CONTAINERID` (the sandbox id).
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace.
    pub netns: String,
    /// `CNI_IFNAME`.
    #[serde(default)]
    pub ifname: String,
    /// `K8S_POD_NAME`.
    pub pod_name: String,
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `K8S_POD_UID` (empty when the runtime passed none).
    #[serde(default)]
    pub pod_uid: String,
    /// The pod's addresses from `prevResult`, CIDR notation (`10.244.1.5/24`).
    #[serde(default)]
    pub ips: Vec<String>,
}

/// `200` answer to [`AddRequest`]. The plugin reads it strictly (unknown fields,
/// duplicate keys and trailing bytes are refused): the agent installs the plugin binary
/// it ships, so the two speak the same contract, and an answer that is not exactly this
/// one does not confirm the enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddResponse {
    /// `true`: rules in place and ztunnel acknowledged the pod; `false`: not a mesh pod.
    pub enrolled: bool,
}

/// `POST /v1/cni/del`: forget this pod (idempotent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`; empty when the runtime passed none (the netns may be gone).
    #[serde(default)]
    pub netns: String,
    /// `K8S_POD_NAME`.
    #[serde(default)]
    pub pod_name: String,
    /// `K8S_POD_NAMESPACE`.
    #[serde(default)]
    pub pod_namespace: String,
    /// `K8S_POD_UID`.
    #[serde(default)]
    pub pod_uid: String,
}

/// `200` answer to [`DelRequest`]: `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelResponse {}

/// Body of a `400`/`503` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong, for the operator.
    pub error: String,
}

/// Why a request to the agent got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected (agent not running, wrong path, backlog full).
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// No complete answer within the timeout.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed mid-exchange.
    #[error("connection to the agent failed: {0}")]
    Io(#[source] io::Error),
    /// The answer is not HTTP/1.x as we speak it.
    #[error("malformed HTTP answer from the agent: {0}")]
    Malformed(String),
}

/// The most of a peer's text the plugin repeats in an error result or a log line.
pub const MAX_ECHO: usize = 256;

/// `text` cut to at most [`MAX_ECHO`] bytes (on a character boundary), marked when cut:
/// whatever the agent sends, the plugin's answer and log line stay small.
pub fn excerpt(text: &str) -> String {
    if text.len() <= MAX_ECHO {
        return text.to_owned();
    }
    let mut end = MAX_ECHO;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// An HTTP answer: status, `Content-Type` and (de-chunked) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// The `Content-Type` header, if the answer had one.
    pub content_type: Option<String>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The `error` text of an [`ErrorResponse`] body, or the body itself as text; at most
    /// [`MAX_ECHO`] bytes of it.
    pub fn error_text(&self) -> String {
        match serde_json::from_slice::<ErrorResponse>(&self.body) {
            Ok(e) => excerpt(&e.error),
            Err(_) => self.body_text(),
        }
    }

    /// The body as text (lossy), trimmed and at most [`MAX_ECHO`] bytes of it.
    pub fn body_text(&self) -> String {
        excerpt(String::from_utf8_lossy(&self.body).trim())
    }

    /// Whether the answer is labelled `application/json` (parameters such as `charset`
    /// allowed, media type case-insensitive, RFC 9110 §8.3.1).
    pub fn is_json(&self) -> bool {
        self.content_type.as_deref().is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
        })
    }

    /// The body decoded strictly as a JSON `T`, or why not (for the operator): the
    /// answer must be labelled `application/json` and hold exactly one `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        if !self.is_json() {
            return Err(match &self.content_type {
                Some(ct) => format!(
                    "Content-Type is {:?}, expected application/json",
                    excerpt(ct)
                ),
                None => "no Content-Type, expected application/json".to_owned(),
            });
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            if self.body.is_empty() {
                "empty body".to_owned()
            } else {
                format!("{e} in body {:?}", self.body_text())
            }
        })
    }
}

/// Blocking HTTP/1.1 client for the agent socket; one connection per request.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
}

impl AgentClient {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST path` with a JSON body.
    pub fn post_json<T: Serialize>(
        &self,
        path: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<HttpResponse, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Io(e.into()))?;
        self.request("POST", path, Some(&body), timeout)
    }

    /// `GET path`.
    pub fn get(&self, path: &str, timeout: Duration) -> Result<HttpResponse, ClientError> {
        self.request("GET", path, None, timeout)
    }

    /// One request on a fresh connection (`Connection: close`), bounded by `timeout`
    /// from connect to the last byte of the answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<HttpResponse, ClientError> {
        let deadline = Instant::now() + timeout;
        let connect_err = |source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        };
        let addr = SockAddr::unix(&self.socket).map_err(connect_err)?;
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(connect_err)?;
        socket
            .connect_timeout(&addr, timeout)
            .map_err(connect_err)?;
        let mut stream = UnixStream::from(socket);

        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: zmesh-cni/{}\r\n\
             Accept: application/json\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(body) = body {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        stream
            .set_write_timeout(Some(time_left(deadline, timeout)?))
            .map_err(ClientError::Io)?;
        stream
            .write_all(&request)
            .map_err(|e| io_or_timeout(e, timeout))?;

        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            stream
                .set_read_timeout(Some(time_left(deadline, timeout)?))
                .map_err(ClientError::Io)?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_or_timeout(e, timeout)),
            };
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE {
                return Err(ClientError::Malformed("answer larger than 1 MiB".into()));
            }
            if let Some(response) = parse_response(&buf, n == 0)? {
                return Ok(response);
            }
        }
    }
}

fn time_left(deadline: Instant, timeout: Duration) -> Result<Duration, ClientError> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(ClientError::Timeout(timeout)),
    }
}

fn io_or_timeout(e: io::Error, timeout: Duration) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(timeout),
        _ => ClientError::Io(e),
    }
}

fn malformed(what: impl Into<String>) -> ClientError {
    ClientError::Malformed(what.into())
}

/// Parses an HTTP/1.x answer from `buf`; `Ok(None)` while more bytes are needed.
/// `eof`: the peer closed, so the bytes are all there will be.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>, ClientError> {
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if eof {
            Err(malformed("connection closed before the end of the headers"))
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| malformed("non-UTF-8 head"))?;
    let rest = &buf[head_len + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next());
    let status = code
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| malformed(format!("bad status line {status_line:?}")))?;
    // Interim answers (100 Continue, ...) precede the real one.
    if (100..200).contains(&status) && status != 101 {
        return parse_response(rest, eof);
    }
    let mut content_length = None;
    let mut content_type = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed(format!("bad header line {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| malformed(format!("bad Content-Length {value:?}")))?;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    let body = if status == 204 || status == 304 {
        Some(Vec::new())
    } else if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = content_length {
        (rest.len() >= n).then(|| rest[..n].to_vec())
    } else {
        eof.then(|| rest.to_vec())
    };
    match body {
        Some(body) => Ok(Some(HttpResponse {
            status,
            content_type,
            body,
        })),
        None if eof => Err(malformed("connection closed before the end of the body")),
        None => Ok(None),
    }
}

/// Decodes a chunked body; `Ok(None)` while incomplete. Trailers are skipped.
fn decode_chunked(mut rest: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| malformed("chunk size"))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| malformed(format!("bad chunk size {size_text:?}")))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            return Ok(find_blank_line(rest).map(|_| body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err(malformed("chunk not followed by CRLF"));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Position after the empty line that ends the (possibly empty) trailer section.
fn find_blank_line(rest: &[u8]) -> Option<usize> {
    if rest.starts_with(b"\r\n") {
        return Some(2);
    }
    rest.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_answers_incrementally() {
        let full = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"enrolled\":true}";
        for cut in 0..full.len() {
            assert_eq!(
                parse_response(&full[..cut], false).unwrap(),
                None,
                "cut {cut}"
            );
        }
        let r = parse_response(full, false).unwrap().unwrap();
        assert_eq!(r.status, 200);
        let add: AddResponse = serde_json::from_slice(&r.body).unwrap();
        assert!(add.enrolled);
        assert!(parse_response(&full[..full.len() - 1], true).is_err());
    }

    #[test]
    fn parses_chunked_close_delimited_and_interim_answers() {
        let chunked = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
            a\r\n{\"error\":\"\r\n8;ext=1\r\nnot yet\"\r\n1\r\n}\r\n0\r\n\r\n";
        let r = parse_response(chunked, false).unwrap().unwrap();
        assert_eq!((r.status, r.error_text().as_str()), (503, "not yet"));
        assert_eq!(
            parse_response(&chunked[..chunked.len() - 2], false).unwrap(),
            None
        );
        let close = b"HTTP/1.0 400 Bad Request\r\n\r\nplain words\n";
        assert_eq!(parse_response(close, false).unwrap(), None);
        let r = parse_response(close, true).unwrap().unwrap();
        assert_eq!(r.error_text(), "plain words");
        let interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse_response(interim, false).unwrap().unwrap().status, 204);
        for bad in [
            &b"SMTP 220 hi\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n",
        ] {
            assert!(parse_response(bad, false).is_err());
        }
    }

    #[test]
    fn add_answers_are_read_strictly() {
        let answer = |ct: Option<&str>, body: &str| HttpResponse {
            status: 200,
            content_type: ct.map(str::to_owned),
            body: body.as_bytes().to_vec(),
        };
        for ct in ["application/json", "Application/JSON ; charset=utf-8"] {
            let r = answer(Some(ct), r#"{"enrolled":true}"#);
            assert_eq!(r.json::<AddResponse>(), Ok(AddResponse { enrolled: true }));
        }
        for (ct, body, why) in [
            (None, r#"{"enrolled":true}"#, "no Content-Type"),
            (Some("text/json"), r#"{"enrolled":true}"#, "text/json"),
            (Some("application/jsonx"), r#"{"enrolled":true}"#, "jsonx"),
            (Some("application/json"), "", "empty body"),
            (
                Some("application/json"),
                r#"{"enrolled":1}"#,
                "expected a boolean",
            ),
            (
                Some("application/json"),
                r#"{"enrolled":true,"x":1}"#,
                "unknown field",
            ),
            (
                Some("application/json"),
                r#"{"enrolled":true,"enrolled":true}"#,
                "duplicate",
            ),
            (
                Some("application/json"),
                r#"{"enrolled":true} x"#,
                "trailing",
            ),
        ] {
            let err = answer(ct, body).json::<AddResponse>().unwrap_err();
            assert!(err.contains(why), "{ct:?} {body}: {err}");
        }
        let long = "é".repeat(1000);
        let text = answer(Some("text/plain"), &long).error_text();
        assert!(
            text.len() < MAX_ECHO + 32 && text.ends_with("(2000 bytes)"),
            "{text}"
        );
        assert_eq!(excerpt("short"), "short");
    }

    #[test]
    fn wire_shapes_match_the_contract() {
        let add = AddRequest {
            container_id: "c1".into(),
            netns: "/var/run/netns/p".into(),
            ifname: "eth0".into(),
            pod_name: "web".into(),
            pod_namespace: "default".into(),
            pod_uid: "u".into(),
            ips: vec!["10.244.1.5/24".into()],
        };
        let v = serde_json::to_value(&add).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "container_id",
            "netns",
            "ifname",
            "pod_name",
            "pod_namespace",
            "pod_uid",
            "ips",
        ] {
            assert!(keys.contains(&k), "{k}");
        }
        assert_eq!(keys.len(), 7);
        assert_eq!(serde_json::to_string(&DelResponse {}).unwrap(), "{}");
        let del: DelRequest = serde_json::from_str(r#"{"container_id":"c1"}"#).unwrap();
        assert_eq!(del.netns, "");
    }

    #[test]
    fn unreachable_socket_is_a_connect_error() {
        let dir = std::env::temp_dir().join(format!("zmesh-cni-api-{}", std::process::id()));
        let client = AgentClient::new(dir.join("missing.sock"));
        let err = client
            .get(READY_PATH, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
