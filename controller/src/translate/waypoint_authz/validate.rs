//! The checks the waypoint applies when it compiles a `WaypointPolicy` (zmesh-waypoint's
//! `authz` module), made here first so a bad value is reported on the policy and resolved
//! towards denying more instead of making the waypoint refuse the whole resource.

use std::net::IpAddr;

use super::super::authorization_policy::Rule;

/// Condition keys a waypoint evaluates (Istio's conditions reference, minus
/// `experimental.*`).
const KEYS: [&str; 10] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
];

fn string(v: &str) -> Result<(), String> {
    if v.is_empty() {
        Err("an empty string is not a valid value".into())
    } else {
        Ok(())
    }
}

fn ip_block(v: &str) -> Result<(), String> {
    let (addr, len) = v.split_once('/').map_or((v, None), |(a, l)| (a, Some(l)));
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{v:?} is not an IP address or CIDR block"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match len.map(str::parse::<u8>) {
        None => Ok(()),
        Some(Ok(l)) if l <= max => Ok(()),
        Some(_) => Err(format!("{v:?}: bad prefix length")),
    }
}

fn port(v: &str) -> Result<(), String> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && v.parse::<u16>().is_ok() {
        Ok(())
    } else {
        Err(format!("{v:?} is not a port number (0-65535)"))
    }
}

/// Istio's `{*}` / `{**}` templates: whole segments, `{**}` the last operator.
fn path(v: &str) -> Result<(), String> {
    if !v.contains(['{', '}']) {
        return string(v);
    }
    let Some(rest) = v.strip_prefix('/') else {
        return Err(format!("path template {v:?} must start with '/'"));
    };
    let mut after_rest = false;
    for seg in rest.split('/') {
        match seg {
            "{*}" | "{**}" if after_rest => {
                return Err(format!(
                    "path template {v:?}: {{**}} must be the last operator"
                ));
            }
            "{*}" => {}
            "{**}" => after_rest = true,
            s if s.contains(['{', '}', '*']) => {
                return Err(format!(
                    "path template {v:?}: segment {s:?} mixes an operator with text"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn service_account(v: &str) -> Result<(), String> {
    let ok = match v.split_once('/') {
        Some((ns, sa)) => !ns.is_empty() && !sa.is_empty() && !sa.contains('/'),
        None => !v.is_empty(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not <namespace>/<service account> or <service account>"
        ))
    }
}

/// A value check.
type Check = fn(&str) -> Result<(), String>;

fn key(k: &str) -> Result<Check, String> {
    if matches!(k, "source.ip" | "remote.ip" | "destination.ip") {
        return Ok(ip_block);
    }
    if k == "destination.port" {
        return Ok(port);
    }
    let header = k
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|h| http::HeaderName::try_from(h).is_ok());
    let claim = k
        .strip_prefix("request.auth.claims[")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|c| {
            c.split("][")
                .all(|p| !p.is_empty() && !p.contains(['[', ']']))
        });
    if header || claim || KEYS.contains(&k) {
        Ok(string)
    } else {
        Err(format!(
            "condition key {k:?} is not supported at the waypoint"
        ))
    }
}

/// Every problem of one rule, each naming its field (relative to the rule).
pub fn rule(r: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    let check = |out: &mut Vec<String>, field: String, vs: &[String], f: Check| {
        for (i, v) in vs.iter().enumerate() {
            if let Err(e) = f(v) {
                out.push(format!("{field}[{i}]: {e}"));
            }
        }
    };
    let mut unknown = Vec::new();
    unknown.extend(r.unknown.keys().cloned());
    for (i, f) in r.from.iter().enumerate() {
        let s = &f.source;
        let p = |n: &str| format!("from[{i}].source.{n}");
        unknown.extend(f.unknown.keys().map(|k| format!("from[{i}].{k}")));
        unknown.extend(s.unknown.keys().map(|k| p(k)));
        for (n, vs, fun) in [
            ("principals", &s.principals, string as Check),
            ("notPrincipals", &s.not_principals, string),
            ("requestPrincipals", &s.request_principals, string),
            ("notRequestPrincipals", &s.not_request_principals, string),
            ("namespaces", &s.namespaces, string),
            ("notNamespaces", &s.not_namespaces, string),
            ("ipBlocks", &s.ip_blocks, ip_block),
            ("notIpBlocks", &s.not_ip_blocks, ip_block),
            ("remoteIpBlocks", &s.remote_ip_blocks, ip_block),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks, ip_block),
            ("serviceAccounts", &s.service_accounts, service_account),
            (
                "notServiceAccounts",
                &s.not_service_accounts,
                service_account,
            ),
        ] {
            check(&mut out, p(n), vs, fun);
        }
        let empty = [
            &s.principals,
            &s.not_principals,
            &s.request_principals,
            &s.not_request_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            &s.service_accounts,
            &s.not_service_accounts,
        ]
        .iter()
        .all(|v| v.is_empty());
        if empty && s.unknown.is_empty() {
            out.push(format!("from[{i}].source: an empty source is not valid"));
        }
    }
    for (i, t) in r.to.iter().enumerate() {
        let o = &t.operation;
        let p = |n: &str| format!("to[{i}].operation.{n}");
        unknown.extend(t.unknown.keys().map(|k| format!("to[{i}].{k}")));
        unknown.extend(o.unknown.keys().map(|k| p(k)));
        for (n, vs, fun) in [
            ("hosts", &o.hosts, string as Check),
            ("notHosts", &o.not_hosts, string),
            ("ports", &o.ports, port),
            ("notPorts", &o.not_ports, port),
            ("methods", &o.methods, string),
            ("notMethods", &o.not_methods, string),
            ("paths", &o.paths, path),
            ("notPaths", &o.not_paths, path),
        ] {
            check(&mut out, p(n), vs, fun);
        }
        let empty = [
            &o.hosts,
            &o.not_hosts,
            &o.ports,
            &o.not_ports,
            &o.methods,
            &o.not_methods,
            &o.paths,
            &o.not_paths,
        ]
        .iter()
        .all(|v| v.is_empty());
        if empty && o.unknown.is_empty() {
            out.push(format!(
                "to[{i}].operation: an empty operation is not valid"
            ));
        }
    }
    for (i, c) in r.when.iter().enumerate() {
        unknown.extend(c.unknown.keys().map(|k| format!("when[{i}].{k}")));
        match key(&c.key) {
            Err(e) => out.push(format!("when[{i}].key: {e}")),
            Ok(f) => {
                check(&mut out, format!("when[{i}].values"), &c.values, f);
                check(&mut out, format!("when[{i}].notValues"), &c.not_values, f);
            }
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            out.push(format!("when[{i}]: a condition needs values or notValues"));
        }
    }
    for u in unknown {
        out.push(format!("{u}: not a field of AuthorizationPolicy"));
    }
    out
}
