//! `PolicySet::check` against a plain reference: a loop over every policy, with matching
//! written out independently (strings built with `format!`, CIDRs compared bit by bit).

use std::net::IpAddr;

use proptest::prelude::*;

use crate::identity::SpiffeId;
use crate::policy::*;

fn string_match() -> impl Strategy<Value = StringMatch> {
    prop_oneof![
        prop::sample::select(vec![
            "a",
            "b",
            "",
            "cluster.local/ns/a/sa/x",
            "spiffe://cluster.local/ns/b/sa/y",
            "other.td/ns/a/sa/x",
        ])
        .prop_map(|s| StringMatch::Exact(s.into())),
        prop::sample::select(vec![
            "a",
            "",
            "cluster.local/ns/a",
            "cluster.local/ns/a/",
            "spiffe://",
            "spiffe://cluster.local/ns/c/",
            "other.td/",
        ])
        .prop_map(|s| StringMatch::Prefix(s.into())),
        prop::sample::select(vec!["b", "", "sa/x", "/y", "a/sa/x", "c"])
            .prop_map(|s| StringMatch::Suffix(s.into())),
        Just(StringMatch::Presence),
    ]
}

fn net() -> impl Strategy<Value = IpNet> {
    prop::sample::select(vec![
        "10.0.0.0/8",
        "10.0.0.0/24",
        "10.0.0.1/32",
        "10.0.1.0/31",
        "0.0.0.0/0",
        "192.168.0.0/16",
        "::/0",
        "fd00::/8",
        "fd00::1/128",
        "::ffff:10.0.0.0/104",
    ])
    .prop_map(|s| s.parse().unwrap())
}

fn service_account() -> impl Strategy<Value = ServiceAccountMatch> {
    (
        prop::sample::select(vec!["a", "b", "c"]),
        prop::sample::select(vec!["x", "y"]),
    )
        .prop_map(|(ns, sa)| ServiceAccountMatch {
            namespace: ns.into(),
            service_account: sa.into(),
        })
}

/// Mostly empty, sometimes one or two values: matches stay satisfiable.
fn some<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        4 => Just(Vec::new()),
        1 => prop::collection::vec(s, 1..=2),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop::sample::select(vec![80u16, 8080, 9090])
}

fn a_match() -> impl Strategy<Value = Match> {
    (
        (
            some(string_match()),
            some(string_match()),
            some(string_match()),
            some(string_match()),
        ),
        (some(net()), some(net()), some(net()), some(net())),
        (
            some(port()),
            some(port()),
            some(service_account()),
            some(service_account()),
        ),
    )
        .prop_map(
            |((ns, nns, pr, npr), (si, nsi, di, ndi), (dp, ndp, sa, nsa))| Match {
                namespaces: ns,
                not_namespaces: nns,
                principals: pr,
                not_principals: npr,
                source_ips: si,
                not_source_ips: nsi,
                destination_ips: di,
                not_destination_ips: ndi,
                destination_ports: dp,
                not_destination_ports: ndp,
                service_accounts: sa,
                not_service_accounts: nsa,
            },
        )
}

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    let clause = prop::collection::vec(a_match(), 0..3).prop_map(|matches| Clause { matches });
    let rule = prop::collection::vec(clause, 0..3).prop_map(|clauses| Rule { clauses });
    prop::collection::vec(rule, 0..3)
}

fn policies() -> impl Strategy<Value = Vec<Policy>> {
    let one = (
        prop::sample::select(vec!["a", "b", "c", "istio-system"]),
        prop::sample::select(vec![
            Scope::Global,
            Scope::Namespace,
            Scope::WorkloadSelector,
        ]),
        prop::sample::select(vec![Action::Allow, Action::Deny]),
        prop::bool::weighted(0.2),
        rules(),
    );
    prop::collection::vec(one, 0..8).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (ns, scope, action, dry_run, rules))| Policy {
                // Unique keys (a repeated key replaces; tested on its own).
                name: format!("p{i}"),
                namespace: ns.into(),
                scope,
                action,
                dry_run,
                rules,
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
struct Conn {
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    id: Option<SpiffeId>,
}

fn conn() -> impl Strategy<Value = Conn> {
    let ip = || {
        prop::sample::select(vec![
            "10.0.0.1",
            "10.0.1.1",
            "192.168.1.1",
            "::1",
            "::ffff:10.0.0.1",
            "fd00::1",
        ])
        .prop_map(|s| s.parse::<IpAddr>().unwrap())
    };
    let id = prop::option::weighted(
        0.8,
        (
            prop::sample::select(vec!["cluster.local", "other.td"]),
            prop::sample::select(vec!["a", "b", "c"]),
            prop::sample::select(vec!["x", "y"]),
        )
            .prop_map(|(td, ns, sa)| SpiffeId::new(td, ns, sa).unwrap()),
    );
    (ip(), ip(), port(), id).prop_map(|(src, dst, port, id)| Conn { src, dst, port, id })
}

// ---- The reference: everything spelled out, nothing shared with the evaluator. ----

fn ref_string(m: &StringMatch, s: &str, principal: bool) -> bool {
    let strip = |v: &str| -> String {
        if principal {
            v.strip_prefix("spiffe://").unwrap_or(v).to_string()
        } else {
            v.to_string()
        }
    };
    match m {
        StringMatch::Exact(v) => strip(v) == s,
        StringMatch::Prefix(v) => s.starts_with(&strip(v)),
        StringMatch::Suffix(v) => s.ends_with(v.as_str()),
        StringMatch::Presence => !s.is_empty(),
    }
}

fn bits(ip: IpAddr) -> Vec<bool> {
    let bytes = match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    };
    bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1))
        .collect()
}

fn ref_in(n: &IpNet, ip: IpAddr) -> bool {
    let one = |ip: IpAddr| {
        n.addr.is_ipv4() == ip.is_ipv4()
            && bits(n.addr)[..n.prefix_len as usize] == bits(ip)[..n.prefix_len as usize]
    };
    let v4 = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    one(ip) || v4.is_some_and(one)
}

/// A field: `positive` empty or any value holds; no value of `negative` holds.
fn ref_field<T>(positive: &[T], negative: &[T], holds: impl Fn(&T) -> bool) -> bool {
    let mut ok = positive.is_empty();
    for v in positive {
        if holds(v) {
            ok = true;
        }
    }
    for v in negative {
        if holds(v) {
            ok = false;
        }
    }
    ok
}

fn ref_match(m: &Match, c: &Conn) -> bool {
    let any_set = !(m.namespaces.is_empty()
        && m.not_namespaces.is_empty()
        && m.principals.is_empty()
        && m.not_principals.is_empty()
        && m.source_ips.is_empty()
        && m.not_source_ips.is_empty()
        && m.destination_ips.is_empty()
        && m.not_destination_ips.is_empty()
        && m.destination_ports.is_empty()
        && m.not_destination_ports.is_empty()
        && m.service_accounts.is_empty()
        && m.not_service_accounts.is_empty());
    let principal = c.id.as_ref().map(|id| id.principal());
    let ns = c.id.as_ref().map(|id| id.namespace().to_string());
    let sa =
        c.id.as_ref()
            .map(|id| (id.namespace().to_string(), id.service_account().to_string()));
    any_set
        && ref_field(&m.namespaces, &m.not_namespaces, |v| {
            ns.as_ref().is_some_and(|ns| ref_string(v, ns, false))
        })
        && ref_field(&m.principals, &m.not_principals, |v| {
            principal.as_ref().is_some_and(|p| ref_string(v, p, true))
        })
        && ref_field(&m.service_accounts, &m.not_service_accounts, |v| {
            sa.as_ref()
                .is_some_and(|(ns, sa)| v.namespace == *ns && v.service_account == *sa)
        })
        && ref_field(&m.source_ips, &m.not_source_ips, |n| ref_in(n, c.src))
        && ref_field(&m.destination_ips, &m.not_destination_ips, |n| {
            ref_in(n, c.dst)
        })
        && ref_field(&m.destination_ports, &m.not_destination_ports, |p| {
            *p == c.port
        })
}

fn ref_policy(p: &Policy, c: &Conn) -> bool {
    let mut any_rule = false;
    for r in &p.rules {
        let mut all_clauses = true;
        for cl in &r.clauses {
            let mut any_match = cl.matches.is_empty();
            for m in &cl.matches {
                any_match |= ref_match(m, c);
            }
            all_clauses &= any_match;
        }
        any_rule |= all_clauses;
    }
    any_rule
}

struct RefDecision {
    allowed: bool,
    /// Every policy that could be named (any matching DENY, or any matching ALLOW).
    nameable: Vec<String>,
    dry_run: Vec<(String, Action, bool)>,
}

fn reference(policies: &[Policy], ns: &str, listed: &[String], c: &Conn) -> RefDecision {
    let mut denies = Vec::new();
    let mut allows = Vec::new();
    let mut any_allow = false;
    let mut dry_run = Vec::new();
    for p in policies {
        let key = format!("{}/{}", p.namespace, p.name);
        let applies = match p.scope {
            Scope::Global => true,
            Scope::Namespace => p.namespace == ns,
            Scope::WorkloadSelector => listed.contains(&key),
        };
        if !applies {
            continue;
        }
        let m = ref_policy(p, c);
        if p.dry_run {
            dry_run.push((key, p.action, m));
            continue;
        }
        match p.action {
            Action::Deny if m => denies.push(key),
            Action::Deny => {}
            Action::Allow => {
                any_allow = true;
                if m {
                    allows.push(key);
                }
            }
        }
    }
    if !denies.is_empty() {
        RefDecision {
            allowed: false,
            nameable: denies,
            dry_run,
        }
    } else if !any_allow {
        RefDecision {
            allowed: true,
            nameable: vec![],
            dry_run,
        }
    } else if !allows.is_empty() {
        RefDecision {
            allowed: true,
            nameable: allows,
            dry_run,
        }
    } else {
        RefDecision {
            allowed: false,
            nameable: vec![],
            dry_run,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn check_agrees_with_the_reference(
        policies in policies(),
        c in conn(),
        ns in prop::sample::select(vec!["a", "b", "c", "d"]),
        listed in prop::collection::vec((0usize..10, prop::sample::select(vec!["a", "b", "c"])), 0..4),
    ) {
        let listed: Vec<String> = listed.iter().map(|(i, ns)| format!("{ns}/p{i}")).collect();
        let set = PolicySet::new(policies.clone());
        let conn = Connection { src_ip: c.src, src_identity: c.id.as_ref(), dst_ip: c.dst, dst_port: c.port };
        let got = set.check(ns, &listed, &conn);
        let want = reference(&policies, ns, &listed, &c);
        prop_assert_eq!(got.allowed, want.allowed);
        match &got.policy {
            None => prop_assert!(want.nameable.is_empty(), "named none of {:?}", want.nameable),
            Some(k) => prop_assert!(want.nameable.contains(k), "{} not in {:?}", k, want.nameable),
        }
        let mut got_dry: Vec<_> = got.dry_run.iter().map(|v| (v.policy.clone(), v.action, v.matched)).collect();
        let mut want_dry = want.dry_run;
        got_dry.sort_by(|a, b| a.0.cmp(&b.0));
        want_dry.sort_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(got_dry, want_dry);
    }

    /// What `/config_dump` prints reads back as the same policies (local-config shape).
    #[test]
    fn yaml_round_trip(policies in policies()) {
        let yaml = serde_yaml::to_string(&policies).unwrap();
        let back: Vec<Policy> = serde_yaml::from_str(&yaml).unwrap();
        prop_assert_eq!(back, policies);
    }

    /// Outside input: any text as a policy document never panics.
    #[test]
    fn arbitrary_yaml_never_panics(s in "\\PC{0,300}") {
        if let Ok(p) = serde_yaml::from_str::<Policy>(&s) {
            let set = PolicySet::new([p]);
            let id = SpiffeId::new("cluster.local", "a", "x").unwrap();
            let conn = Connection {
                src_ip: "10.0.0.1".parse().unwrap(),
                src_identity: Some(&id),
                dst_ip: "10.0.0.2".parse().unwrap(),
                dst_port: 80,
            };
            let _ = set.check("a", &[], &conn);
        }
    }
}
