use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use serde_json::json;
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_core::identity::SpiffeId;

use super::*;

mod l4_parity;
mod reference;

const SVC: &str = "default/echo.default.svc.cluster.local";

fn policy(name: &str, action: pb::PolicyAction, rules: Vec<pb::PolicyRule>) -> pb::WaypointPolicy {
    pb::WaypointPolicy {
        waypoint: None,
        namespace: "default".into(),
        name: name.into(),
        all_services: true,
        services: Vec::new(),
        action: action as i32,
        dry_run: false,
        rules,
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A request as the tests describe it.
#[derive(Debug, Clone)]
struct Req {
    peer: Option<SpiffeId>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
    method: String,
    host: String,
    path: String,
    headers: HeaderMap,
    auth: Option<RequestAuth>,
}

impl Default for Req {
    fn default() -> Self {
        Req {
            peer: Some(SpiffeId::new("cluster.local", "client", "sleep").unwrap()),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "10.96.0.10".parse().unwrap(),
            destination_port: 80,
            method: "GET".into(),
            host: "echo.default.svc.cluster.local".into(),
            path: "/".into(),
            headers: HeaderMap::new(),
            auth: None,
        }
    }
}

impl Req {
    fn attrs(&self) -> Attributes<'_> {
        Attributes {
            source_ip: self.source_ip,
            peer: self.peer.as_ref(),
            destination_ip: self.destination_ip,
            destination_port: self.destination_port,
            method: &self.method,
            host: &self.host,
            path: &self.path,
            headers: &self.headers,
            auth: self.auth.as_ref(),
        }
    }
}

fn set(ps: &[pb::WaypointPolicy]) -> Policies {
    Policies::new(
        ps.iter()
            .map(|p| Arc::new(Policy::compile(&p.name, p).expect("compiles"))),
    )
}

fn to(op: pb::PolicyOperation) -> pb::PolicyRule {
    pb::PolicyRule {
        to: vec![op],
        ..Default::default()
    }
}

fn from(src: pb::PolicySource) -> pb::PolicyRule {
    pb::PolicyRule {
        from: vec![src],
        ..Default::default()
    }
}

fn alice() -> RequestAuth {
    RequestAuth {
        principal: "https://issuer.example/alice".into(),
        issuer: "https://issuer.example".into(),
        subject: "alice".into(),
        audiences: vec!["app".into()],
        presenter: Some("web".into()),
        claims: json!({"groups": ["dev", "admin"], "org": {"team": "blue"}})
            .as_object()
            .unwrap()
            .clone(),
    }
}

#[test]
fn deny_before_allow_and_the_deciding_policy() {
    let get = to(pb::PolicyOperation {
        methods: s(&["GET"]),
        ..Default::default()
    });
    let admin = to(pb::PolicyOperation {
        paths: s(&["/admin*"]),
        ..Default::default()
    });
    let ps = set(&[
        policy("allow-get", pb::PolicyAction::Allow, vec![get]),
        policy("deny-admin", pb::PolicyAction::Deny, vec![admin]),
    ]);
    let mut r = Req::default();
    let v = ps.evaluate(SVC, &r.attrs());
    assert!(v.allowed);
    assert_eq!(
        v.policy.map(|(p, i)| (p.key(), i)),
        Some(("default/allow-get".into(), 0))
    );
    r.path = "/admin/x".into();
    let v = ps.evaluate(SVC, &r.attrs());
    assert!(!v.allowed);
    assert_eq!(v.policy.unwrap().0.name, "deny-admin");
    r.path = "/".into();
    r.method = "POST".into();
    let v = ps.evaluate(SVC, &r.attrs());
    assert!(!v.allowed, "ALLOW policies apply and none matches");
    assert!(v.policy.is_none());
}

#[test]
fn no_allow_policy_allows_and_allow_without_rules_denies() {
    let ps = set(&[policy(
        "deny-nothing",
        pb::PolicyAction::Deny,
        vec![to(pb::PolicyOperation {
            methods: s(&["DELETE"]),
            ..Default::default()
        })],
    )]);
    assert!(ps.evaluate(SVC, &Req::default().attrs()).allowed);
    let ps = set(&[policy("allow-nothing", pb::PolicyAction::Allow, vec![])]);
    assert!(!ps.evaluate(SVC, &Req::default().attrs()).allowed);
    // An empty rule matches everything.
    let ps = set(&[policy(
        "allow-all",
        pb::PolicyAction::Allow,
        vec![Default::default()],
    )]);
    assert!(ps.evaluate(SVC, &Req::default().attrs()).allowed);
}

#[test]
fn audit_and_dry_run_never_decide() {
    let all = vec![pb::PolicyRule::default()];
    let mut dry = policy("dry-deny", pb::PolicyAction::Deny, all.clone());
    dry.dry_run = true;
    let ps = set(&[policy("audit-all", pb::PolicyAction::Audit, all), dry]);
    let v = ps.evaluate(SVC, &Req::default().attrs());
    assert!(v.allowed && v.policy.is_none(), "{v:?}");
    assert_eq!(v.audit.len(), 1);
    assert_eq!(v.dry_run.len(), 1);
    assert_eq!(v.dry_run[0].1, Some(0));
}

#[test]
fn service_scope() {
    let mut p = policy("deny-all", pb::PolicyAction::Deny, vec![Default::default()]);
    p.all_services = false;
    p.services = vec!["default/other.default.svc.cluster.local".into()];
    let ps = set(&[p]);
    assert!(!ps.any_for(SVC));
    assert!(ps.evaluate(SVC, &Req::default().attrs()).allowed);
    assert!(
        !ps.evaluate(
            "default/other.default.svc.cluster.local",
            &Req::default().attrs()
        )
        .allowed
    );
}

#[test]
fn sources() {
    let ps = |src: pb::PolicySource| set(&[policy("p", pb::PolicyAction::Allow, vec![from(src)])]);
    let ok = |p: &Policies, r: &Req| p.evaluate(SVC, &r.attrs()).allowed;
    let r = Req::default();
    let anon = Req {
        peer: None,
        ..Default::default()
    };
    let p = ps(pb::PolicySource {
        principals: s(&["spiffe://cluster.local/ns/client/sa/sleep"]),
        ..Default::default()
    });
    assert!(ok(&p, &r));
    assert!(!ok(&p, &anon));
    let p = ps(pb::PolicySource {
        not_principals: s(&["*"]),
        ..Default::default()
    });
    assert!(!ok(&p, &r));
    assert!(ok(&p, &anon), "no identity: a not-field excludes nothing");
    let p = ps(pb::PolicySource {
        namespaces: s(&["cli*"]),
        not_ip_blocks: s(&["10.0.0.0/30"]),
        ..Default::default()
    });
    assert!(!ok(&p, &r));
    let far = Req {
        source_ip: "10.0.0.9".parse().unwrap(),
        ..Default::default()
    };
    assert!(ok(&p, &far));
    let p = ps(pb::PolicySource {
        request_principals: s(&["https://issuer.example/*"]),
        ..Default::default()
    });
    assert!(!ok(&p, &r), "no JWT: no request principal");
    let jwt = Req {
        auth: Some(alice()),
        ..Default::default()
    };
    assert!(ok(&p, &jwt));
    let p = ps(pb::PolicySource {
        not_request_principals: s(&["*"]),
        ..Default::default()
    });
    assert!(ok(&p, &r) && !ok(&p, &jwt));
    let p = ps(pb::PolicySource {
        service_accounts: s(&["client/sleep"]),
        remote_ip_blocks: s(&["10.0.0.1"]),
        ..Default::default()
    });
    assert!(ok(&p, &r) && !ok(&p, &far));
}

#[test]
fn operations() {
    let ps = |op: pb::PolicyOperation| set(&[policy("p", pb::PolicyAction::Allow, vec![to(op)])]);
    let ok = |p: &Policies, r: &Req| p.evaluate(SVC, &r.attrs()).allowed;
    let mut r = Req::default();
    let p = ps(pb::PolicyOperation {
        hosts: s(&["ECHO.default.svc.cluster.local"]),
        ..Default::default()
    });
    r.host = "Echo.Default.svc.cluster.local".into();
    assert!(ok(&p, &r), "hosts compare case-insensitively");
    r.host = "echo.default.svc.cluster.local:80".into();
    assert!(!ok(&p, &r), "a port in the Host is part of the value");
    let p = ps(pb::PolicyOperation {
        hosts: s(&["echo.default.svc.cluster.local:*"]),
        ..Default::default()
    });
    assert!(ok(&p, &r));
    let p = ps(pb::PolicyOperation {
        ports: s(&["8080"]),
        ..Default::default()
    });
    assert!(!ok(&p, &r));
    r.destination_port = 8080;
    assert!(ok(&p, &r));
    let p = ps(pb::PolicyOperation {
        paths: s(&["/api/{*}/items"]),
        not_methods: s(&["DELETE"]),
        ..Default::default()
    });
    r.path = "/api/v1/items".into();
    assert!(ok(&p, &r));
    r.method = "DELETE".into();
    assert!(!ok(&p, &r));
}

#[test]
fn conditions() {
    let when = |key: &str, values: &[&str], not_values: &[&str]| {
        set(&[policy(
            "p",
            pb::PolicyAction::Allow,
            vec![pb::PolicyRule {
                when: vec![pb::PolicyCondition {
                    key: key.into(),
                    values: s(values),
                    not_values: s(not_values),
                }],
                ..Default::default()
            }],
        )])
    };
    let ok = |p: &Policies, r: &Req| p.evaluate(SVC, &r.attrs()).allowed;
    let mut r = Req::default();
    r.headers.append(
        HeaderName::from_static("x-token"),
        HeaderValue::from_static("a"),
    );
    r.headers.append(
        HeaderName::from_static("x-token"),
        HeaderValue::from_static("b"),
    );
    assert!(
        ok(&when("request.headers[X-Token]", &["a,b"], &[]), &r),
        "joined with ,"
    );
    assert!(!ok(&when("request.headers[x-token]", &["a"], &[]), &r));
    assert!(ok(&when("request.headers[x-none]", &[], &["x"]), &r));
    assert!(!ok(&when("request.headers[x-none]", &["*"], &[]), &r));
    assert!(ok(&when("source.ip", &["10.0.0.0/8"], &[]), &r));
    assert!(ok(&when("remote.ip", &[], &["192.168.0.0/16"]), &r));
    assert!(ok(&when("destination.ip", &["10.96.0.10"], &[]), &r));
    assert!(ok(&when("destination.port", &["80"], &[]), &r));
    assert!(ok(&when("source.namespace", &["client"], &[]), &r));
    assert!(ok(
        &when("source.principal", &["cluster.local/ns/client/*"], &[]),
        &r
    ));
    assert!(!ok(&when("connection.sni", &["*"], &[]), &r));
    assert!(!ok(
        &when("request.auth.claims[groups]", &["admin"], &[]),
        &r
    ));
    r.auth = Some(alice());
    assert!(ok(
        &when("request.auth.claims[groups]", &["admin"], &[]),
        &r
    ));
    assert!(ok(
        &when("request.auth.claims[org][team]", &["blue"], &[]),
        &r
    ));
    assert!(!ok(
        &when("request.auth.claims[org][team]", &[], &["bl*"]),
        &r
    ));
    assert!(ok(
        &when(
            "request.auth.principal",
            &["https://issuer.example/alice"],
            &[]
        ),
        &r
    ));
    assert!(ok(&when("request.auth.audiences", &["app"], &[]), &r));
    assert!(ok(&when("request.auth.presenter", &["web"], &[]), &r));
}

#[test]
fn refusals_name_the_field() {
    let bad = |rule: pb::PolicyRule| {
        Policy::compile("r", &policy("p", pb::PolicyAction::Allow, vec![rule]))
            .unwrap_err()
            .to_string()
    };
    let e = bad(from(pb::PolicySource::default()));
    assert!(
        e.contains("rules[0].from[0].source") && e.contains("empty source"),
        "{e}"
    );
    let e = bad(from(pb::PolicySource {
        ip_blocks: s(&["10.0.0.0/8", "nope"]),
        ..Default::default()
    }));
    assert!(e.contains("rules[0].from[0].source.ipBlocks[1]"), "{e}");
    let e = bad(to(pb::PolicyOperation {
        paths: s(&["/a/{**}/{*}"]),
        ..Default::default()
    }));
    assert!(
        e.contains("to[0].operation.paths[0]") && e.contains("last operator"),
        "{e}"
    );
    let e = bad(pb::PolicyRule {
        when: vec![pb::PolicyCondition {
            key: "experimental.envoy.filters.x".into(),
            values: s(&["1"]),
            not_values: vec![],
        }],
        ..Default::default()
    });
    assert!(
        e.contains("rules[0].when[0]") && e.contains("not supported"),
        "{e}"
    );
    let e = bad(pb::PolicyRule {
        when: vec![pb::PolicyCondition {
            key: "source.ip".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    assert!(e.contains("values or notValues"), "{e}");
    let mut p = policy("p", pb::PolicyAction::Allow, vec![]);
    p.all_services = false;
    assert!(Policy::compile("r", &p).is_err());
    p.all_services = true;
    p.action = 7;
    assert!(
        Policy::compile("r", &p)
            .unwrap_err()
            .to_string()
            .contains("action")
    );
}

#[test]
fn opaque_tcp_as_network_rbac() {
    let r = Req::default();
    let tcp = |ps: &Policies| ps.evaluate_tcp(SVC, &r.attrs()).allowed;
    // An ALLOW rule with an HTTP-only part allows nothing over TCP; one without does.
    let get = to(pb::PolicyOperation {
        methods: s(&["GET"]),
        ..Default::default()
    });
    let ps = set(&[policy(
        "allow-get",
        pb::PolicyAction::Allow,
        vec![get.clone()],
    )]);
    assert!(ps.evaluate(SVC, &r.attrs()).allowed);
    assert!(!tcp(&ps));
    let ns = from(pb::PolicySource {
        namespaces: s(&["client"]),
        ..Default::default()
    });
    let ps = set(&[policy(
        "allow",
        pb::PolicyAction::Allow,
        vec![get.clone(), ns],
    )]);
    let v = ps.evaluate_tcp(SVC, &r.attrs());
    assert!(v.allowed && v.policy.unwrap().1 == 1, "{v:?}");
    // A DENY rule is checked on its other parts: it denies at least as much.
    let deny = pb::PolicyRule {
        from: vec![pb::PolicySource {
            namespaces: s(&["client"]),
            request_principals: s(&["*"]),
            ..Default::default()
        }],
        to: vec![pb::PolicyOperation {
            paths: s(&["/admin"]),
            ..Default::default()
        }],
        when: vec![pb::PolicyCondition {
            key: "request.headers[x-a]".into(),
            values: s(&["1"]),
            not_values: vec![],
        }],
    };
    let ps = set(&[policy("deny", pb::PolicyAction::Deny, vec![deny])]);
    assert!(
        ps.evaluate(SVC, &r.attrs()).allowed,
        "no JWT, no header: no match"
    );
    assert!(!tcp(&ps));
    let other = Req {
        peer: Some(SpiffeId::new("cluster.local", "other", "x").unwrap()),
        ..Default::default()
    };
    assert!(
        ps.evaluate_tcp(SVC, &other.attrs()).allowed,
        "its L4 part still applies"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// For random policies and requests, the waypoint's decision is the reference
    /// evaluator's (written from the AuthorizationPolicy reference text, `reference.rs`).
    #[test]
    fn decision_equals_the_reference(
        policies in proptest::collection::vec(reference::policy(), 0..5),
        req in reference::request(),
    ) {
        let policies: Vec<_> = policies
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| {
                p.name = format!("p{i}");
                p
            })
            .collect();
        let compiled = Policies::new(policies.iter().map(|p| {
            Arc::new(Policy::compile(&p.name, p).expect("generated policies are valid"))
        }));
        let got = compiled.evaluate(SVC, &req.attrs());
        let want = reference::allowed(&policies, SVC, &req);
        prop_assert_eq!(got.allowed, want, "policies {:#?}\nrequest {:#?}", policies, req);
        if let Some((p, rule)) = got.policy {
            let src = policies.iter().find(|x| x.name == p.name).unwrap();
            prop_assert!(reference::rule_matches(&src.rules[rule], &req));
        }
    }
}
