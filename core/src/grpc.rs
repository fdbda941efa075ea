//! The gRPC connection to the controller, shared by ztunnel's and the waypoint's xDS and CA
//! clients (feature `grpc`): TLS verified against the mesh root (`XDS_ROOT_CA` /
//! `CA_ROOT_CA`), HTTP/2 keepalive, and the `authorization: Bearer <token>` + `clusterid`
//! headers on every call, the way upstream ztunnel talks to istiod.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// Errors setting up a connection to the controller. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("{var}={address:?} is not a URL like https://istiod.istio-system.svc:15012: {reason}")]
    Address {
        var: &'static str,
        address: String,
        reason: String,
    },
    #[error("cannot read the root certificate {path}: {source} (set {var} to the mesh root PEM)")]
    Root {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{var} {path}: no PEM certificate in it")]
    EmptyRoot { var: &'static str, path: PathBuf },
}

/// Where and how to reach one controller endpoint (xDS or CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The environment variable the address came from, for error messages.
    pub var: &'static str,
    /// `https://host:port`.
    pub address: String,
    /// The root certificate(s) PEM file the server's certificate must chain to.
    pub root_ca: PathBuf,
    /// The name to verify in the server's certificate instead of the address's host
    /// (`ALT_XDS_HOSTNAME` / `ALT_CA_HOSTNAME`).
    pub alt_hostname: Option<String>,
    /// The environment variable of the root, for error messages.
    pub root_var: &'static str,
}

/// Builds a lazily connecting channel: nothing is dialled until the first call, and a broken
/// connection is re-dialled on the next call.
pub fn channel(target: &Target) -> Result<Channel, GrpcError> {
    let addr_err = |reason: String| GrpcError::Address {
        var: target.var,
        address: target.address.clone(),
        reason,
    };
    let uri: http::Uri = target
        .address
        .parse()
        .map_err(|e: http::uri::InvalidUri| addr_err(e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(addr_err(
            "the controller is only reached over TLS: use an https:// URL".into(),
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| addr_err("no host in it".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if uri.port_u16().is_none() {
        return Err(addr_err(
            "no port in it (the controller listens on 15012)".into(),
        ));
    }
    let pem = std::fs::read(&target.root_ca).map_err(|source| GrpcError::Root {
        var: target.root_var,
        path: target.root_ca.clone(),
        source,
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(GrpcError::EmptyRoot {
            var: target.root_var,
            path: target.root_ca.clone(),
        });
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(target.alt_hostname.clone().unwrap_or(host))
        .assume_http2(true);
    let endpoint = Endpoint::from(uri)
        .tls_config(tls)
        .map_err(|e| addr_err(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// The credential presented to the controller (`AUTH_TOKEN`): a file re-read on every call
/// (projected tokens rotate), or a literal token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthToken {
    /// Read the token from this file on every call.
    File(PathBuf),
    /// This token.
    Literal(String),
}

impl AuthToken {
    /// `AUTH_TOKEN`'s value: an existing file's path, else the token itself.
    pub fn from_env_value(v: &str) -> AuthToken {
        let p = PathBuf::from(v);
        if v.starts_with('/') || v.starts_with("./") || p.exists() {
            AuthToken::File(p)
        } else {
            AuthToken::Literal(v.to_owned())
        }
    }

    fn read(&self) -> Result<String, Status> {
        match self {
            AuthToken::Literal(t) => Ok(t.clone()),
            AuthToken::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_owned())
                .map_err(|e| {
                    Status::unauthenticated(format!(
                        "cannot read the token {}: {e} (AUTH_TOKEN)",
                        p.display()
                    ))
                }),
        }
    }
}

/// Adds `authorization: Bearer <token>` and `clusterid: <cluster>` to every request.
#[derive(Debug, Clone)]
pub struct AuthHeaders {
    pub token: AuthToken,
    pub cluster_id: String,
}

impl tonic::service::Interceptor for AuthHeaders {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let token = self.token.read()?;
        let bearer: MetadataValue<_> = format!("Bearer {token}").parse().map_err(|_| {
            Status::unauthenticated("the token has characters a header cannot carry")
        })?;
        req.metadata_mut().insert("authorization", bearer);
        if !self.cluster_id.is_empty() {
            let cluster: MetadataValue<_> = self
                .cluster_id
                .parse()
                .map_err(|_| Status::invalid_argument("CLUSTER_ID cannot be a header value"))?;
            req.metadata_mut().insert("clusterid", cluster);
        }
        Ok(req)
    }
}

/// The longest NACK detail (`error_detail.message`) a client sends. A NACK names every refused
/// resource with its reason, and the controller refuses requests over 16 MiB: past that, a
/// client refusing a large push would reconnect and be refused again, for ever.
pub const NACK_DETAIL_MAX: usize = 64 * 1024;

/// A NACK's `error_detail.message`: the reasons, `; `-joined (as upstream ztunnel does), cut
/// at [`NACK_DETAIL_MAX`] bytes with `...[truncated, N bytes]`.
pub fn nack_detail(errors: &[String]) -> String {
    crate::peer_text::bounded(&errors.join("; "), NACK_DETAIL_MAX).into_owned()
}

/// A gRPC status with the causes a transport error hides (TLS, refused, DNS), for logs.
pub fn describe(s: &Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(address: &str, root: PathBuf) -> Target {
        Target {
            var: "XDS_ADDRESS",
            address: address.into(),
            root_ca: root,
            alt_hostname: None,
            root_var: "XDS_ROOT_CA",
        }
    }

    #[tokio::test]
    async fn addresses_are_checked_with_a_useful_message() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.pem");
        std::fs::write(&root, "not a cert").unwrap();
        for (addr, want) in [
            ("http://istiod:15012", "https://"),
            ("https://istiod", "no port"),
            ("::::", "XDS_ADDRESS"),
        ] {
            let err = channel(&target(addr, root.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{addr}: {err}");
        }
        let err = channel(&target("https://istiod:15012", root.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = channel(&target("https://istiod:15012", dir.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("XDS_ROOT_CA"), "{err}");
    }

    #[test]
    fn headers_carry_token_and_cluster() {
        use tonic::service::Interceptor;
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("token");
        std::fs::write(&tok, "abc\n").unwrap();
        let mut h = AuthHeaders {
            token: AuthToken::from_env_value(tok.to_str().unwrap()),
            cluster_id: "Kubernetes".into(),
        };
        let req = h.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer abc");
        assert_eq!(req.metadata().get("clusterid").unwrap(), "Kubernetes");
        // The file is re-read: a rotated token is used by the next call.
        std::fs::write(&tok, "def").unwrap();
        let req = h.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer def");
        std::fs::remove_file(&tok).unwrap();
        let err = h.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            AuthToken::from_env_value("literal-token"),
            AuthToken::Literal("literal-token".into())
        );
    }

    #[test]
    fn a_nack_detail_names_the_reasons_and_is_bounded() {
        let few = vec![
            "resource \"a\": bad".to_owned(),
            "resource \"b\": worse".to_owned(),
        ];
        assert_eq!(
            nack_detail(&few),
            "resource \"a\": bad; resource \"b\": worse"
        );
        let many = vec!["x".repeat(1000); 200];
        let detail = nack_detail(&many);
        assert!(detail.len() < NACK_DETAIL_MAX + 40, "{}", detail.len());
        assert!(
            detail.ends_with("...[truncated, 200398 bytes]"),
            "{}",
            &detail[detail.len() - 60..]
        );
    }
}
