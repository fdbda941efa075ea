use super::*;
use xds_proto::istio::security as pb;
use xds_proto::istio::security::string_match::MatchType;

fn sm(t: MatchType) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(t),
    }
}

fn addr(bytes: &[u8], length: u32) -> pb::Address {
    pb::Address {
        address: bytes.to_vec(),
        length,
    }
}

fn full_match() -> pb::Match {
    pb::Match {
        namespaces: vec![sm(MatchType::Exact("a".into()))],
        not_namespaces: vec![sm(MatchType::Prefix("kube-".into()))],
        principals: vec![sm(MatchType::Suffix("/sa/client".into()))],
        not_principals: vec![sm(MatchType::Presence(()))],
        source_ips: vec![addr(&[10, 0, 0, 0], 8)],
        not_source_ips: vec![addr(&[10, 0, 0, 1], 32)],
        destination_ips: vec![addr(
            &"fd00::".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            8,
        )],
        not_destination_ips: vec![addr(&[0, 0, 0, 0], 0)],
        destination_ports: vec![8080, 0],
        not_destination_ports: vec![65535],
        service_accounts: vec![pb::ServiceAccountMatch {
            namespace: "a".into(),
            service_account: "client".into(),
        }],
        not_service_accounts: vec![pb::ServiceAccountMatch {
            namespace: "a".into(),
            service_account: "evil".into(),
        }],
        extensions: vec![],
    }
}

fn authz(m: pb::Match) -> pb::Authorization {
    pb::Authorization {
        name: "p".into(),
        namespace: "b".into(),
        scope: pb::Scope::WorkloadSelector as i32,
        action: pb::Action::Deny as i32,
        dry_run: true,
        rules: vec![
            pb::Rule {
                clauses: vec![
                    pb::Clause { matches: vec![] },
                    pb::Clause { matches: vec![m] },
                ],
            },
            pb::Rule { clauses: vec![] },
        ],
        extensions: vec![],
    }
}

#[test]
fn every_field_converts() {
    let p = Policy::from_proto(&authz(full_match())).unwrap();
    let want: Policy = serde_yaml::from_str(
        r#"
name: p
namespace: b
scope: WorkloadSelector
action: Deny
dryRun: true
rules:
- - []
  - - namespaces: [!Exact a]
      notNamespaces: [!Prefix kube-]
      principals: [!Suffix /sa/client]
      notPrincipals: [!Presence ]
      sourceIps: [10.0.0.0/8]
      notSourceIps: [10.0.0.1/32]
      destinationIps: ["fd00::/8"]
      notDestinationIps: [0.0.0.0/0]
      destinationPorts: [8080, 0]
      notDestinationPorts: [65535]
      serviceAccounts: [{namespace: a, serviceAccount: client}]
      notServiceAccounts: [{namespace: a, serviceAccount: evil}]
- []
"#,
    )
    .unwrap();
    assert_eq!(p, want);
    assert_eq!(p.key(), "b/p");
    // Defaults: GLOBAL, ALLOW, enforced, no rules.
    let p = Policy::from_proto(&pb::Authorization {
        name: "g".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        (p.scope, p.action, p.dry_run, p.rules.len(), p.key()),
        (Scope::Global, Action::Allow, false, 0, "/g".to_string())
    );
    let p = Policy::from_proto(&pb::Authorization {
        name: "n".into(),
        scope: pb::Scope::Namespace as i32,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(p.scope, Scope::Namespace);
}

#[test]
fn refusals_name_the_field() {
    let at = "rules[0].clauses[1].matches[0]";
    type Edit = fn(&mut pb::Authorization);
    let cases: &[(Edit, String, &str)] = &[
        (|a| a.name.clear(), "name".into(), "empty"),
        (|a| a.scope = 3, "scope".into(), "unknown value 3"),
        (|a| a.action = 2, "action".into(), "unknown value 2"),
        (|a| a.action = -1, "action".into(), "unknown value -1"),
        (
            |a| {
                a.extensions.push(Default::default());
            },
            "extensions".into(),
            "not supported",
        ),
        (
            |a| {
                a.rules[0].clauses[1].matches[0]
                    .extensions
                    .push(Default::default())
            },
            format!("{at}.extensions"),
            "not supported",
        ),
        (
            |a| {
                a.rules[0].clauses[1].matches[0]
                    .source_ips
                    .push(addr(&[1, 2, 3, 4, 5], 8))
            },
            format!("{at}.source_ips[1].address"),
            "5 bytes",
        ),
        (
            |a| {
                a.rules[0].clauses[1].matches[0].not_destination_ips[0]
                    .address
                    .clear()
            },
            format!("{at}.not_destination_ips[0].address"),
            "0 bytes",
        ),
        (
            |a| a.rules[0].clauses[1].matches[0].not_source_ips[0].length = 33,
            format!("{at}.not_source_ips[0].length"),
            "33",
        ),
        (
            |a| a.rules[0].clauses[1].matches[0].destination_ips[0].length = 129,
            format!("{at}.destination_ips[0].length"),
            "129",
        ),
        (
            |a| a.rules[0].clauses[1].matches[0].destination_ips[0].length = 300,
            format!("{at}.destination_ips[0].length"),
            "300",
        ),
        (
            |a| a.rules[0].clauses[1].matches[0].destination_ports[1] = 65536,
            format!("{at}.destination_ports[1]"),
            "65536 is not a port",
        ),
        (
            |a| a.rules[0].clauses[1].matches[0].not_destination_ports[0] = u32::MAX,
            format!("{at}.not_destination_ports[0]"),
            "4294967295",
        ),
        (
            |a| a.rules[0].clauses[1].matches[0].not_principals[0].match_type = None,
            format!("{at}.not_principals[0]"),
            "no match type",
        ),
        (
            |a| {
                a.rules[0].clauses[1].matches[0]
                    .namespaces
                    .push(pb::StringMatch::default())
            },
            format!("{at}.namespaces[1]"),
            "no match type",
        ),
    ];
    for (edit, field, reason) in cases {
        let mut a = authz(full_match());
        edit(&mut a);
        let e = Policy::try_from_proto(&a).unwrap_err();
        assert_eq!(&e.field, field, "{e}");
        assert!(e.reason.contains(reason), "{e}");
        let s = Policy::from_proto(&a).unwrap_err();
        assert_eq!(s, format!("{field}: {}", e.reason));
    }
}

#[test]
fn spiffe_prefix_in_principals_is_dropped_when_indexed() {
    let m = pb::Match {
        principals: vec![sm(MatchType::Exact(
            "spiffe://cluster.local/ns/a/sa/client".into(),
        ))],
        ..Default::default()
    };
    let mut a = authz(m);
    a.rules.truncate(1);
    a.dry_run = false;
    a.scope = pb::Scope::Global as i32;
    let set = PolicySet::new([Policy::from_proto(&a).unwrap()]);
    assert_eq!(
        set.get("b/p").unwrap().rules[0].clauses[1].matches[0].principals,
        vec![StringMatch::Exact("cluster.local/ns/a/sa/client".into())]
    );
    let d = decide(&set, "x", &[], BASE);
    assert_eq!(verdict(&d), (false, Some("b/p")));
}
