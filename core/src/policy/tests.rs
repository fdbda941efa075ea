use super::*;

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

fn conn<'a>(id: Option<&'a SpiffeId>) -> Connection<'a> {
    Connection {
        src_ip: "10.0.0.1".parse().unwrap(),
        src_identity: id,
        dst_ip: "10.0.0.2".parse().unwrap(),
        dst_port: 8080,
    }
}

#[test]
fn no_policy_allows_and_allow_without_match_denies() {
    let client = id("a", "client");
    let set = PolicySet::default();
    let d = set.check("b", &[], &conn(Some(&client)));
    assert_eq!((d.allowed, d.policy), (true, None));
    let allow = Policy {
        name: "p".into(),
        namespace: "b".into(),
        scope: Scope::Namespace,
        action: Action::Allow,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    namespaces: vec![StringMatch::Exact("x".into())],
                    ..Match::default()
                }],
            }],
        }],
    };
    let set = PolicySet::new([allow]);
    let d = set.check("b", &[], &conn(Some(&client)));
    assert_eq!((d.allowed, d.policy), (false, None));
    let d = set.check("c", &[], &conn(Some(&client)));
    assert_eq!((d.allowed, d.policy), (true, None));
}
