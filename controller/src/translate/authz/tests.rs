//! Unit tests of the AuthorizationPolicy translation: value forms, workload selection, and
//! the invariants ztunnel relies on (no empty Match, DENY rules never dropped).

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;

use super::super::{
    AuthorizationPolicySpec, Condition, KubeObject, Operation, PolicyTargetReference, Rule,
    RuleFrom, RuleTo, Source, WorkloadSelector,
};
use super::*;

fn exact(s: &str) -> xds::StringMatch {
    xds::StringMatch {
        match_type: Some(MatchType::Exact(s.to_owned())),
    }
}

#[test]
fn string_forms() {
    let kind = |v: &str| pattern(v).unwrap().match_type.unwrap();
    assert_eq!(kind("*"), MatchType::Presence(()));
    assert_eq!(kind("*.local"), MatchType::Suffix(".local".into()));
    assert_eq!(kind("prod-*"), MatchType::Prefix("prod-".into()));
    assert_eq!(kind("prod"), MatchType::Exact("prod".into()));
    assert!(pattern("").is_err());
}

#[test]
fn principals_lose_the_spiffe_scheme() {
    let p = |v: &str| principal(v).unwrap().match_type.unwrap();
    assert_eq!(
        p("spiffe://cluster.local/ns/a/sa/b"),
        MatchType::Exact("cluster.local/ns/a/sa/b".into())
    );
    assert_eq!(
        p("spiffe://cluster.local/ns/a/*"),
        MatchType::Prefix("cluster.local/ns/a/".into())
    );
    assert_eq!(
        p("cluster.local/ns/a/sa/b"),
        MatchType::Exact("cluster.local/ns/a/sa/b".into())
    );
    assert_eq!(p("*/sa/b"), MatchType::Suffix("/sa/b".into()));
}

#[test]
fn addresses() {
    let a = |v: &str| address(v).map(|a| (a.address, a.length));
    assert_eq!(a("10.1.2.3"), Ok((vec![10, 1, 2, 3], 32)));
    assert_eq!(a("10.1.2.3/8"), Ok((vec![10, 0, 0, 0], 8)));
    assert_eq!(a("10.1.255.3/20"), Ok((vec![10, 1, 240, 0], 20)));
    assert_eq!(a("0.0.0.0/0"), Ok((vec![0, 0, 0, 0], 0)));
    let v6 = a("fd00::1:2/112").unwrap();
    assert_eq!(v6.1, 112);
    assert_eq!(v6.0[14..], [0, 0]);
    assert_eq!(v6.0[12..14], [0, 1]);
    assert_eq!(a("::1").unwrap().1, 128);
    for bad in [
        "",
        "10.0.0.0/33",
        "fd00::/129",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "10.0.0/8",
        "host.example",
        "10.0.0.0/8/8",
    ] {
        assert!(address(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn ports() {
    assert_eq!(port("80"), Ok(80));
    assert_eq!(port("0"), Ok(0));
    assert_eq!(port("65535"), Ok(65535));
    for bad in ["", "65536", "+80", "-1", "8o", "http", "123456", " 80"] {
        assert!(port(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn service_accounts() {
    let sa = |v: &str| service_account(v, "own").map(|m| (m.namespace, m.service_account));
    assert_eq!(sa("ns/name"), Ok(("ns".into(), "name".into())));
    assert_eq!(sa("name"), Ok(("own".into(), "name".into())));
    for bad in ["", "/name", "ns/", "a/b/c", "ns/*", "*"] {
        assert!(sa(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn dry_run_values_parse_like_go() {
    assert_eq!(parse_bool("true"), Some(true));
    assert_eq!(parse_bool("True"), Some(true));
    assert_eq!(parse_bool("1"), Some(true));
    assert_eq!(parse_bool("false"), Some(false));
    assert_eq!(parse_bool("yes"), None);
}

fn policy(ns: &str, name: &str, spec: AuthorizationPolicySpec) -> KubeObject {
    let mut p = AuthorizationPolicy {
        spec,
        ..AuthorizationPolicy::default()
    };
    p.metadata.namespace = Some(ns.to_owned());
    p.metadata.name = Some(name.to_owned());
    KubeObject::AuthorizationPolicy(p)
}

fn selector(labels: &[(&str, &str)]) -> Option<WorkloadSelector> {
    Some(WorkloadSelector {
        match_labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        unknown: Default::default(),
    })
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn selection_fixture() -> Objects {
    let sel = |l: &[(&str, &str)]| AuthorizationPolicySpec {
        selector: selector(l),
        ..AuthorizationPolicySpec::default()
    };
    let mut objects = Objects::default();
    for object in [
        policy("app", "match", sel(&[("app", "web")])),
        policy(
            "app",
            "match-two",
            sel(&[("app", "web"), ("tier", "front")]),
        ),
        policy("app", "other-labels", sel(&[("app", "db")])),
        policy("app", "all-pods", sel(&[])),
        policy("app", "namespace-wide", AuthorizationPolicySpec::default()),
        policy(
            "app",
            "audit",
            AuthorizationPolicySpec {
                action: Some("AUDIT".into()),
                ..sel(&[("app", "web")])
            },
        ),
        policy(
            "app",
            "waypoint",
            AuthorizationPolicySpec {
                target_refs: vec![PolicyTargetReference {
                    group: "gateway.networking.k8s.io".into(),
                    kind: "Gateway".into(),
                    name: "wp".into(),
                    namespace: None,
                }],
                ..sel(&[("app", "web")])
            },
        ),
        policy("other", "match", sel(&[("app", "web")])),
        policy("istio-system", "mesh-selector", sel(&[("app", "web")])),
        policy(
            "istio-system",
            "mesh-wide",
            AuthorizationPolicySpec::default(),
        ),
        // Sorts right after "app": must not leak into "app"'s range scan.
        policy("app-2", "match", sel(&[("app", "web")])),
    ] {
        objects.upsert(object);
    }
    objects
}

#[test]
fn selected_policies_are_own_and_root_namespace_selector_policies() {
    let objects = selection_fixture();
    let mesh = MeshConfig::default();
    let pod = labels(&[("app", "web"), ("tier", "front"), ("x", "y")]);
    assert_eq!(
        selected_policies(Some(&pod), "app", &objects, &mesh),
        [
            "app/all-pods",
            "app/match",
            "app/match-two",
            "istio-system/mesh-selector"
        ]
    );
    let partial = labels(&[("app", "web")]);
    assert_eq!(
        selected_policies(Some(&partial), "app", &objects, &mesh),
        ["app/all-pods", "app/match", "istio-system/mesh-selector"]
    );
    assert_eq!(
        selected_policies(None, "app", &objects, &mesh),
        ["app/all-pods"]
    );
    assert_eq!(
        selected_policies(Some(&pod), "istio-system", &objects, &mesh),
        ["istio-system/mesh-selector"]
    );
    let custom_root = MeshConfig {
        root_namespace: "mesh-root".into(),
        ..MeshConfig::default()
    };
    assert_eq!(
        selected_policies(Some(&pod), "app", &objects, &custom_root),
        ["app/all-pods", "app/match", "app/match-two"]
    );
}

#[test]
fn every_selected_policy_is_translated_with_selector_scope() {
    let objects = selection_fixture();
    let mesh = MeshConfig::default();
    let (translated, _) = translate_policies(&objects, &mesh);
    let pod = labels(&[("app", "web"), ("tier", "front")]);
    for ns in ["app", "other", "istio-system", "app-2"] {
        for key in selected_policies(Some(&pod), ns, &objects, &mesh) {
            let auth = translated
                .get(&key)
                .unwrap_or_else(|| panic!("{key} not sent"));
            assert_eq!(auth.scope, xds::Scope::WorkloadSelector as i32, "{key}");
        }
    }
    assert_eq!(
        translated["istio-system/mesh-wide"].scope,
        xds::Scope::Global as i32
    );
    assert_eq!(
        translated["istio-system/mesh-wide"].namespace,
        "istio-system"
    );
    assert_eq!(
        translated["app/namespace-wide"].scope,
        xds::Scope::Namespace as i32
    );
    assert!(!translated.contains_key("app/audit"));
    assert!(!translated.contains_key("app/waypoint"));
}

fn translate_one(spec: AuthorizationPolicySpec) -> (Option<xds::Authorization>, Vec<String>) {
    let mut objects = Objects::default();
    objects.upsert(policy("app", "p", spec));
    let (mut out, issues) = translate_policies(&objects, &MeshConfig::default());
    (
        out.remove("app/p"),
        issues.into_iter().map(|i| i.message).collect(),
    )
}

fn from(source: Source) -> RuleFrom {
    RuleFrom {
        source,
        unknown: Default::default(),
    }
}

#[test]
fn deny_with_only_l7_entry_matches_everything_instead_of_nothing() {
    // A Match with no field set never matches in ztunnel; the translation must leave the
    // clause out instead, so that the DENY still applies.
    let spec = AuthorizationPolicySpec {
        action: Some("DENY".into()),
        rules: vec![Rule {
            from: vec![from(Source {
                namespaces: vec!["bad".into()],
                ..Source::default()
            })],
            to: vec![
                RuleTo {
                    operation: Operation {
                        ports: vec!["80".into()],
                        ..Operation::default()
                    },
                    unknown: Default::default(),
                },
                RuleTo {
                    operation: Operation {
                        methods: vec!["POST".into()],
                        ..Operation::default()
                    },
                    unknown: Default::default(),
                },
            ],
            when: vec![],
            unknown: Default::default(),
        }],
        ..AuthorizationPolicySpec::default()
    };
    let (auth, issues) = translate_one(spec);
    let auth = auth.unwrap();
    assert_eq!(auth.rules.len(), 1);
    assert_eq!(auth.rules[0].clauses.len(), 1, "{:?}", auth.rules[0]);
    assert_eq!(
        auth.rules[0].clauses[0].matches[0].namespaces,
        [exact("bad")]
    );
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(
        issues[0].contains("rules[0].to[1].operation.methods"),
        "{issues:?}"
    );
}

#[test]
fn allow_rule_with_bad_negative_value_is_dropped_not_widened() {
    let spec = AuthorizationPolicySpec {
        rules: vec![
            Rule {
                from: vec![from(Source {
                    not_ip_blocks: vec!["10.0.0.0/8".into(), "10.300.0.0/16".into()],
                    ..Source::default()
                })],
                ..Rule::default()
            },
            Rule {
                when: vec![Condition {
                    key: "destination.port".into(),
                    values: vec!["8080".into()],
                    not_values: vec![],
                    unknown: Default::default(),
                }],
                ..Rule::default()
            },
        ],
        ..AuthorizationPolicySpec::default()
    };
    let (auth, issues) = translate_one(spec);
    let auth = auth.unwrap();
    assert_eq!(auth.rules.len(), 1);
    assert_eq!(
        auth.rules[0].clauses[0].matches[0].destination_ports,
        [8080]
    );
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(
        issues[0].contains("notIpBlocks: \"10.300.0.0/16\""),
        "{issues:?}"
    );
}

// Values a generated policy draws from: valid, invalid and wildcard forms, chosen to hit the
// connections of `connections()`.
fn values() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(vec![
            "10.0.0.0/8",
            "10.0.0.1",
            "fd00::/8",
            "192.168.0.0/16",
            "80",
            "8080",
            "22",
            "65536",
            "a",
            "prod-*",
            "*-x",
            "web",
            "a/sa",
            "sa",
            "b",
            "cluster.local/ns/a/sa/sa",
            "spiffe://cluster.local/ns/prod-x/*",
            "*/sa/b",
            "*",
            "",
            "not/an/ip",
            "ns/*",
        ])
        .prop_map(str::to_owned),
        0..3,
    )
}

fn source() -> impl Strategy<Value = Source> {
    (
        (values(), values(), values(), values()),
        (values(), values(), values(), values()),
        (values(), values()),
    )
        .prop_map(|((p, np, ns, nns), (sa, nsa, ip, nip), (rp, rip))| Source {
            principals: p,
            not_principals: np,
            namespaces: ns,
            not_namespaces: nns,
            service_accounts: sa,
            not_service_accounts: nsa,
            ip_blocks: ip,
            not_ip_blocks: nip,
            request_principals: rp,
            not_remote_ip_blocks: rip,
            ..Source::default()
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    (values(), values(), values(), values()).prop_map(|(ports, not_ports, methods, not_paths)| {
        Operation {
            ports,
            not_ports,
            methods,
            not_paths,
            ..Operation::default()
        }
    })
}

fn condition() -> impl Strategy<Value = Condition> {
    (
        prop::sample::select(vec![
            "source.ip",
            "destination.ip",
            "source.namespace",
            "source.principal",
            "destination.port",
            "request.headers[x]",
            "source.nonsense",
        ]),
        values(),
        values(),
    )
        .prop_map(|(key, values, not_values)| Condition {
            key: key.to_owned(),
            values,
            not_values,
            unknown: Default::default(),
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(source().prop_map(from), 0..3),
        prop::collection::vec(
            operation().prop_map(|operation| RuleTo {
                operation,
                unknown: Default::default(),
            }),
            0..3,
        ),
        prop::collection::vec(condition(), 0..3),
    )
        .prop_map(|(from, to, when)| Rule {
            from,
            to,
            when,
            unknown: Default::default(),
        })
}

/// One connection as ztunnel sees it: addresses, port, and the peer's `(namespace, sa)`.
#[derive(Debug)]
struct Conn {
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    peer: Option<(&'static str, &'static str)>,
}

impl Conn {
    fn principal(&self) -> Option<String> {
        self.peer
            .map(|(ns, sa)| format!("cluster.local/ns/{ns}/sa/{sa}"))
    }
}

fn connections() -> Vec<Conn> {
    let mut out = Vec::new();
    for src in ["10.0.0.1", "10.1.2.3", "192.168.0.1", "fd00::1"] {
        for dst in ["10.0.0.1", "10.96.0.1", "fd00::2"] {
            for port in [80, 8080, 22, 0] {
                for peer in [
                    None,
                    Some(("a", "sa")),
                    Some(("prod-x", "b")),
                    Some(("web", "sa")),
                ] {
                    out.push(Conn {
                        src: src.parse().unwrap(),
                        dst: dst.parse().unwrap(),
                        port,
                        peer,
                    });
                }
            }
        }
    }
    out
}

// Kleene logic for the reference: `None` is "unknown" (an L7 attribute or an invalid value,
// which the written policy may or may not match).
type Tri = Option<bool>;

fn all(it: impl IntoIterator<Item = Tri>) -> Tri {
    let mut unknown = false;
    for t in it {
        match t {
            Some(false) => return Some(false),
            None => unknown = true,
            Some(true) => {}
        }
    }
    if unknown { None } else { Some(true) }
}

fn any_of(it: impl IntoIterator<Item = Tri>) -> Tri {
    let mut unknown = false;
    for t in it {
        match t {
            Some(true) => return Some(true),
            None => unknown = true,
            Some(false) => {}
        }
    }
    if unknown { None } else { Some(false) }
}

/// A written list: `None` when not set (no constraint), else its OR (negated for `not*`).
fn field(values: &[String], negative: bool, test: impl Fn(&str) -> Tri) -> Option<Tri> {
    if values.is_empty() {
        return None;
    }
    let any = any_of(values.iter().map(|v| test(v)));
    Some(if negative { any.map(|b| !b) } else { any })
}

/// Istio's string forms, written out independently of `pattern`.
fn glob(value: &str, check: &str) -> Tri {
    Some(if value.is_empty() {
        return None;
    } else if value == "*" {
        !check.is_empty()
    } else if let Some(suffix) = value.strip_prefix('*') {
        check.ends_with(suffix)
    } else if let Some(prefix) = value.strip_suffix('*') {
        check.starts_with(prefix)
    } else {
        value == check
    })
}

fn ip_in(value: &str, ip: IpAddr) -> Tri {
    let net = address(value).ok()?;
    Some(contains(&net, ip))
}

fn contains(net: &xds::Address, ip: IpAddr) -> bool {
    let bytes = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    if bytes.len() != net.address.len() {
        return false;
    }
    (0..net.length as usize).all(|bit| {
        let mask = 0x80u8 >> (bit % 8);
        bytes[bit / 8] & mask == net.address[bit / 8] & mask
    })
}

fn written_principal(value: &str, c: &Conn) -> Tri {
    let value = value.strip_prefix("spiffe://").unwrap_or(value);
    if value.is_empty() {
        return None;
    }
    match c.principal() {
        Some(p) => glob(value, &p),
        None => Some(false),
    }
}

fn written_namespace(value: &str, c: &Conn) -> Tri {
    glob(value, c.peer.map_or("", |p| p.0))
}

fn written_sa(value: &str, c: &Conn) -> Tri {
    let (ns, sa) = value.split_once('/').unwrap_or(("app", value));
    if ns.is_empty() || sa.is_empty() || sa.contains('/') || value.contains('*') {
        return None;
    }
    Some(c.peer == Some((ns, sa)))
}

fn written_port(value: &str, c: &Conn) -> Tri {
    port(value).ok().map(|p| p == u32::from(c.port))
}

/// The written policy's verdict on `c` (Istio semantics, L7 parts unknown).
fn written(rules: &[Rule], c: &Conn) -> Tri {
    any_of(rules.iter().map(|rule| {
        let mut parts = Vec::new();
        if !rule.from.is_empty() {
            parts.push(any_of(
                rule.from.iter().map(|f| written_source(&f.source, c)),
            ));
        }
        if !rule.to.is_empty() {
            parts.push(any_of(
                rule.to.iter().map(|t| written_operation(&t.operation, c)),
            ));
        }
        parts.extend(rule.when.iter().map(|w| written_condition(w, c)));
        all(parts)
    }))
}

fn written_source(s: &Source, c: &Conn) -> Tri {
    if *s == Source::default() {
        return None;
    }
    let l7 = [
        &s.request_principals,
        &s.not_request_principals,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
    ];
    let mut parts: Vec<Tri> = l7.iter().filter(|v| !v.is_empty()).map(|_| None).collect();
    parts.extend(field(&s.principals, false, |v| written_principal(v, c)));
    parts.extend(field(&s.not_principals, true, |v| written_principal(v, c)));
    parts.extend(field(&s.namespaces, false, |v| written_namespace(v, c)));
    parts.extend(field(&s.not_namespaces, true, |v| written_namespace(v, c)));
    parts.extend(field(&s.service_accounts, false, |v| written_sa(v, c)));
    parts.extend(field(&s.not_service_accounts, true, |v| written_sa(v, c)));
    parts.extend(field(&s.ip_blocks, false, |v| ip_in(v, c.src)));
    parts.extend(field(&s.not_ip_blocks, true, |v| ip_in(v, c.src)));
    all(parts)
}

fn written_operation(o: &Operation, c: &Conn) -> Tri {
    if *o == Operation::default() {
        return None;
    }
    let l7 = [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ];
    let mut parts: Vec<Tri> = l7.iter().filter(|v| !v.is_empty()).map(|_| None).collect();
    parts.extend(field(&o.ports, false, |v| written_port(v, c)));
    parts.extend(field(&o.not_ports, true, |v| written_port(v, c)));
    all(parts)
}

fn written_condition(w: &Condition, c: &Conn) -> Tri {
    if w.values.is_empty() && w.not_values.is_empty() {
        return None;
    }
    let test: Box<dyn Fn(&str) -> Tri> = match w.key.as_str() {
        "source.ip" => Box::new(|v| ip_in(v, c.src)),
        "destination.ip" => Box::new(|v| ip_in(v, c.dst)),
        "source.namespace" => Box::new(|v| written_namespace(v, c)),
        "source.principal" => Box::new(|v| written_principal(v, c)),
        "destination.port" => Box::new(|v| written_port(v, c)),
        _ => return None,
    };
    all(field(&w.values, false, &test)
        .into_iter()
        .chain(field(&w.not_values, true, &test)))
}

/// ztunnel's verdict (its `rbac.rs` semantics): no rules never match; a clause without
/// matches is true; a Match with no field set is skipped.
fn ztunnel_matches(a: &xds::Authorization, c: &Conn) -> bool {
    !a.rules.is_empty()
        && a.rules.iter().any(|rule| {
            rule.clauses.iter().all(|clause| {
                clause.matches.is_empty()
                    || clause
                        .matches
                        .iter()
                        .any(|m| !is_empty(m) && match_matches(m, c))
            })
        })
}

fn match_matches(m: &xds::Match, c: &Conn) -> bool {
    fn pair<T>(pos: &[T], neg: &[T], test: impl Fn(&T) -> bool) -> bool {
        (pos.is_empty() || pos.iter().any(&test)) && !neg.iter().any(&test)
    }
    let string = |s: &xds::StringMatch, check: &str| match s.match_type.as_ref().unwrap() {
        MatchType::Exact(e) => check == e,
        MatchType::Prefix(p) => check.starts_with(p.as_str()),
        MatchType::Suffix(x) => check.ends_with(x.as_str()),
        MatchType::Presence(()) => !check.is_empty(),
    };
    let principal = c.principal();
    let ns = c.peer.map_or("", |p| p.0);
    pair(&m.principals, &m.not_principals, |s| {
        principal.as_deref().is_some_and(|p| string(s, p))
    }) && pair(&m.namespaces, &m.not_namespaces, |s| string(s, ns))
        && pair(&m.service_accounts, &m.not_service_accounts, |s| {
            c.peer == Some((s.namespace.as_str(), s.service_account.as_str()))
        })
        && pair(&m.source_ips, &m.not_source_ips, |a| contains(a, c.src))
        && pair(&m.destination_ips, &m.not_destination_ips, |a| {
            contains(a, c.dst)
        })
        && pair(&m.destination_ports, &m.not_destination_ports, |p| {
            *p == u32::from(c.port)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The safety property: an ALLOW only allows what the written policy surely allows; a
    /// DENY denies everything the written policy might deny. Plus the wire invariants.
    #[test]
    fn never_wider_than_written(
        deny in any::<bool>(),
        rules in prop::collection::vec(rule(), 0..4),
    ) {
        let spec = AuthorizationPolicySpec {
            action: deny.then(|| "DENY".to_owned()),
            rules: rules.clone(),
            ..AuthorizationPolicySpec::default()
        };
        let (auth, issues) = translate_one(spec);
        let auth = auth.expect("ALLOW and DENY are always sent");
        for rule in &auth.rules {
            for clause in &rule.clauses {
                prop_assert!(!clause.matches.is_empty());
                for m in &clause.matches {
                    prop_assert!(!is_empty(m), "empty Match in {:?}", auth);
                }
            }
        }
        if deny {
            prop_assert_eq!(auth.rules.len(), rules.len());
        } else if auth.rules.len() < rules.len() {
            prop_assert!(!issues.is_empty(), "rule dropped silently");
        }
        for c in connections() {
            let written = written(&rules, &c);
            let enforced = ztunnel_matches(&auth, &c);
            if deny {
                prop_assert!(
                    written == Some(false) || enforced,
                    "DENY misses {:?} (written {:?})", c, written
                );
            } else {
                prop_assert!(
                    !enforced || written == Some(true),
                    "ALLOW lets {:?} through (written {:?})", c, written
                );
            }
            if issues.is_empty() {
                // Nothing reported: the translation is exact.
                prop_assert_eq!(Some(enforced), written, "{:?}", c);
            }
        }
    }
}
