//! The gRPC connection to the controller (`XDS_ADDRESS`, `CA_ADDRESS`): TLS verified against
//! the mesh root, HTTP/2 keepalive, and `authorization: Bearer <token>` + `clusterid` on every
//! call, as upstream ztunnel talks to istiod (and as zmesh's controller authenticates callers:
//! the waypoint's token names its Gateway's service account).

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// A controller endpoint that cannot be used; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{var}={address:?} is not a URL like https://istiod.istio-system.svc:15012: {reason}")]
    Address {
        var: &'static str,
        address: String,
        reason: String,
    },
    #[error("cannot read the mesh root {path}: {reason} (set {var} to the root certificate PEM)")]
    Root {
        var: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// One controller endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The variable it came from (`XDS_ADDRESS`, `CA_ADDRESS`), for messages.
    pub var: &'static str,
    /// `https://host:port`.
    pub address: String,
    /// The root the server's certificate must chain to, and its variable.
    pub root_ca: PathBuf,
    pub root_var: &'static str,
}

/// A lazily connecting channel (dialled on first use, re-dialled after a failure).
pub fn channel(t: &Target) -> Result<Channel, ControlError> {
    let bad = |reason: String| ControlError::Address {
        var: t.var,
        address: t.address.clone(),
        reason,
    };
    let uri: http::Uri = t.address.parse().map_err(|e| bad(format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad(
            "the controller is reached over TLS only: use https://".into()
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad("it names no host".into()))?
        .trim_matches(['[', ']'])
        .to_owned();
    if uri.port_u16().is_none() {
        return Err(bad(
            "it names no port (the controller listens on 15012)".into()
        ));
    }
    let pem = std::fs::read(&t.root_ca).map_err(|e| ControlError::Root {
        var: t.root_var,
        path: t.root_ca.clone(),
        reason: e.to_string(),
    })?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(ControlError::Root {
            var: t.root_var,
            path: t.root_ca.clone(),
            reason: "no PEM certificate in it".into(),
        });
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(host)
        .assume_http2(true);
    Ok(Endpoint::from(uri)
        .tls_config(tls)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// The bearer token (`AUTH_TOKEN`): a file, re-read per call (projected tokens rotate), or
/// the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    File(PathBuf),
    Literal(String),
}

impl Token {
    /// `AUTH_TOKEN`'s value: a path (absolute, `./`, or existing) or a literal token.
    pub fn from_env_value(v: &str) -> Token {
        if v.starts_with('/') || v.starts_with("./") || std::path::Path::new(v).exists() {
            Token::File(v.into())
        } else {
            Token::Literal(v.to_owned())
        }
    }

    fn read(&self) -> Result<String, Status> {
        match self {
            Token::Literal(t) => Ok(t.clone()),
            Token::File(p) => std::fs::read_to_string(p)
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

/// Adds the credential and cluster headers to every call.
#[derive(Debug, Clone)]
pub struct Auth {
    pub token: Token,
    pub cluster_id: String,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let bearer: MetadataValue<_> = format!("Bearer {}", self.token.read()?)
            .parse()
            .map_err(|_| Status::unauthenticated("the token cannot be a header value"))?;
        req.metadata_mut().insert("authorization", bearer);
        if !self.cluster_id.is_empty() {
            let c: MetadataValue<_> = self
                .cluster_id
                .parse()
                .map_err(|_| Status::invalid_argument("CLUSTER_ID cannot be a header value"))?;
            req.metadata_mut().insert("clusterid", c);
        }
        Ok(req)
    }
}

/// A gRPC status with the causes a transport error hides (TLS, refused, DNS).
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

    #[tokio::test]
    async fn bad_targets_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.pem");
        std::fs::write(&root, "junk").unwrap();
        let t = |address: &str, root_ca: PathBuf| Target {
            var: "XDS_ADDRESS",
            address: address.into(),
            root_ca,
            root_var: "XDS_ROOT_CA",
        };
        for (addr, want) in [
            ("http://istiod:15012", "https://"),
            ("https://istiod", "no port"),
        ] {
            let e = channel(&t(addr, root.clone())).unwrap_err().to_string();
            assert!(e.contains(want), "{addr}: {e}");
        }
        let e = channel(&t("https://istiod:15012", root))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no PEM certificate") && e.contains("XDS_ROOT_CA"),
            "{e}"
        );
    }

    #[test]
    fn headers() {
        use tonic::service::Interceptor;
        let mut a = Auth {
            token: Token::from_env_value("tok"),
            cluster_id: "Kubernetes".into(),
        };
        let r = a.call(Request::new(())).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer tok");
        assert_eq!(r.metadata().get("clusterid").unwrap(), "Kubernetes");
    }
}
