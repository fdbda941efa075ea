//! A round of requests as one shell script for a client pod: curl for HTTP (`-i`, no redirect
//! following, the suite's Host kept by `--resolve` to the Service's cluster IP), and
//! `zmesh-echo-client grpc` for gRPC; each answer framed by `@@case <i>` and `@@rc <i> <exit>`
//! lines so [`super::check::split`] can cut the output apart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

use super::{Case, Protocol, Request};

/// What the script needs to know of the world.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// (namespace, name) -> cluster IP of every Service.
    pub services: BTreeMap<(String, String), String>,
    /// Mesh Deployment name -> its first pod's IP.
    pub pods: BTreeMap<String, String>,
    /// The `zmesh-echo-client` binary.
    pub grpc_client: String,
}

/// Where a request goes: the host as the client names it, the port and the IP it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host name (or IP) in the URL and Host header.
    pub name: String,
    /// The port.
    pub port: u16,
    /// The IP dialled.
    pub ip: String,
    /// The Service's namespace (empty for a pod IP).
    pub namespace: String,
}

/// A rendered request: what [`super::check`] needs to judge its answer.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The target.
    pub target: Target,
    /// The path and query sent (`{uuid}` filled in).
    pub path: String,
    /// The id the backends log when asked (`x-echo-log`), for mirrors.
    pub log_id: Option<String>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A fresh id, unique in this process and unlikely to repeat across runs.
pub fn fresh_id() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("c{t:x}-{n}")
}

/// `s` quoted for `sh`.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Resolves `host` (`name[.ns][:port]` or `{pod:<deployment>}[:port]`) for a client in
/// `client_ns`.
pub fn target(env: &Env, host: &str, client_ns: &str, protocol: Protocol) -> Result<Target> {
    let default_port = match protocol {
        Protocol::Http => 80,
        Protocol::Grpc => 7070,
    };
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !host.ends_with('}') => (
            n,
            p.parse::<u16>()
                .with_context(|| format!("host {host:?}: {p:?} is not a port"))?,
        ),
        _ => (host, default_port),
    };
    if let Some(dep) = name.strip_prefix("{pod:").and_then(|r| r.strip_suffix('}')) {
        let ip = env
            .pods
            .get(dep)
            .with_context(|| format!("host {host:?}: no pod of Deployment {dep:?}"))?;
        return Ok(Target {
            name: ip.clone(),
            port,
            ip: ip.clone(),
            namespace: String::new(),
        });
    }
    let (svc, ns) = match name.split_once('.') {
        Some((s, rest)) => (s, rest.split('.').next().unwrap_or(client_ns)),
        None => (name, client_ns),
    };
    let Some(ip) = env.services.get(&(ns.to_owned(), svc.to_owned())) else {
        bail!("host {host:?}: no Service {ns}/{svc} in the lab");
    };
    Ok(Target {
        name: name.to_owned(),
        port,
        ip: ip.clone(),
        namespace: ns.to_owned(),
    })
}

/// The command for one request, and what was sent.
pub fn command(
    env: &Env,
    req: &Request,
    client_ns: &str,
    log: bool,
    timeout_secs: u32,
) -> Result<(String, Sent)> {
    let target = target(env, &req.host, client_ns, req.protocol)?;
    let path = req.path.replace("{uuid}", &fresh_id());
    let log_id = log.then(fresh_id);
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(id) = &log_id {
        headers.push((crate::echo::simulate::LOG_HEADER.into(), id.clone()));
    }
    let cmd = match req.protocol {
        Protocol::Http => {
            let mut c = format!("curl -sS -i --path-as-is --max-time {timeout_secs}");
            match req.method.as_deref() {
                None | Some("GET") => {}
                Some("HEAD") => c.push_str(" --head"),
                Some(m) => c.push_str(&format!(" -X {}", quote(m))),
            }
            for (k, v) in &headers {
                c.push_str(&format!(" -H {}", quote(&format!("{k}: {v}"))));
            }
            let authority = if req.host.contains(':') {
                format!("{}:{}", target.name, target.port)
            } else {
                target.name.clone()
            };
            if target.name != target.ip {
                c.push_str(&format!(
                    " --resolve {}",
                    quote(&format!("{}:{}:{}", target.name, target.port, target.ip))
                ));
            }
            c.push_str(&format!(" {}", quote(&format!("http://{authority}{path}"))));
            c
        }
        Protocol::Grpc => {
            let host = if target.namespace.is_empty() {
                target.ip.clone()
            } else {
                format!(
                    "{}.{}",
                    target.name.split('.').next().unwrap_or_default(),
                    target.namespace
                )
            };
            let mut c = format!(
                "timeout {timeout_secs} {} grpc {} -m conformance",
                quote(&env.grpc_client),
                quote(&format!("http://{host}:{}", target.port))
            );
            for (k, v) in &headers {
                c.push_str(&format!(" -H {}", quote(&format!("{k}:{v}"))));
            }
            c
        }
    };
    Ok((
        cmd,
        Sent {
            target,
            path,
            log_id,
        },
    ))
}

/// One script for `cases` (index, case) from one client namespace: each answer framed by
/// `@@case <i>` / `@@rc <i> <exit code>`.
pub fn round(
    env: &Env,
    cases: &[(usize, &Case)],
    client_ns: &str,
    timeout_secs: u32,
) -> Result<(String, BTreeMap<usize, Sent>)> {
    let mut script = String::new();
    let mut sent = BTreeMap::new();
    for (i, c) in cases {
        let (cmd, s) = command(
            env,
            &c.request,
            client_ns,
            c.expect.mirrored_to.is_some(),
            timeout_secs,
        )?;
        script.push_str(&format!(
            "echo '@@case {i}'; {cmd}; rc=$?; echo; echo \"@@rc {i} $rc\"\n"
        ));
        sent.insert(*i, s);
    }
    Ok((script, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        let mut e = Env {
            grpc_client: "/bin/client".into(),
            ..Env::default()
        };
        e.services.insert(
            ("gateway-conformance-mesh".into(), "echo".into()),
            "10.96.100.10".into(),
        );
        e.services.insert(
            ("gateway-conformance-mesh".into(), "echo-v1".into()),
            "10.96.100.11".into(),
        );
        e.pods.insert("echo-v2".into(), "10.0.0.7".into());
        e
    }

    #[test]
    fn hosts_resolve_like_the_suite_names_them() {
        let e = env();
        let ns = "gateway-conformance-mesh";
        let t = target(&e, "echo", ns, Protocol::Http).unwrap();
        assert_eq!(
            (t.name.as_str(), t.port, t.ip.as_str()),
            ("echo", 80, "10.96.100.10")
        );
        let t = target(&e, "echo:7070", ns, Protocol::Grpc).unwrap();
        assert_eq!(t.port, 7070);
        let t = target(&e, "echo", ns, Protocol::Grpc).unwrap();
        assert_eq!(t.port, 7070);
        let t = target(
            &e,
            "echo-v1.gateway-conformance-mesh",
            "gateway-conformance-mesh-consumer",
            Protocol::Http,
        )
        .unwrap();
        assert_eq!(t.ip, "10.96.100.11");
        let t = target(&e, "{pod:echo-v2}:8080", ns, Protocol::Http).unwrap();
        assert_eq!((t.ip.as_str(), t.port), ("10.0.0.7", 8080));
        assert!(target(&e, "nope", ns, Protocol::Http).is_err());
        assert!(target(&e, "{pod:echo-v9}", ns, Protocol::Http).is_err());
    }

    #[test]
    fn commands_keep_the_suite_host_and_quote_everything() {
        let e = env();
        let req: Request = serde_yaml::from_str(
            "path: /a?x=1&u={uuid}\nmethod: PATCH\nheaders: {Version: \"it's\"}\n",
        )
        .unwrap();
        let (cmd, sent) = command(&e, &req, "gateway-conformance-mesh", true, 10).unwrap();
        assert!(cmd.contains("-X 'PATCH'"), "{cmd}");
        assert!(cmd.contains(r"-H 'Version: it'\''s'"), "{cmd}");
        assert!(cmd.contains("--resolve 'echo:80:10.96.100.10'"), "{cmd}");
        assert!(!sent.path.contains("{uuid}"), "{}", sent.path);
        assert!(
            cmd.contains(&format!("'http://echo{}'", sent.path)),
            "{cmd}"
        );
        let id = sent.log_id.unwrap();
        assert!(cmd.contains(&format!("x-echo-log: {id}")), "{cmd}");
        let head: Request = serde_yaml::from_str("method: HEAD\n").unwrap();
        let (cmd, _) = command(&e, &head, "gateway-conformance-mesh", false, 10).unwrap();
        assert!(
            cmd.contains(" --head") && !cmd.contains("x-echo-log"),
            "{cmd}"
        );
        let grpc: Request =
            serde_yaml::from_str("host: echo:7070\nprotocol: grpc\nheaders: {x-a: b}\n").unwrap();
        let (cmd, _) = command(&e, &grpc, "gateway-conformance-mesh", false, 10).unwrap();
        assert!(
            cmd.contains("'/bin/client' grpc 'http://echo.gateway-conformance-mesh:7070'")
                && cmd.contains("-H 'x-a:b'"),
            "{cmd}"
        );
    }
}
