use super::*;

mod prop;
mod proto_tests;

/// A connection, written briefly: `(src, dst, port)` plus an identity `(td, ns, sa)`.
#[derive(Clone, Copy)]
struct C {
    src: &'static str,
    dst: &'static str,
    port: u16,
    id: Option<(&'static str, &'static str, &'static str)>,
}

/// A client `cluster.local/ns/a/sa/client` at 10.0.0.1 to 10.1.0.2:8080.
const BASE: C = C {
    src: "10.0.0.1",
    dst: "10.1.0.2",
    port: 8080,
    id: Some(("cluster.local", "a", "client")),
};
const PLAIN: C = C { id: None, ..BASE };

impl C {
    fn identity(&self) -> Option<SpiffeId> {
        self.id
            .map(|(td, ns, sa)| SpiffeId::new(td, ns, sa).unwrap())
    }
    fn with<'a>(&self, id: Option<&'a SpiffeId>) -> Connection<'a> {
        Connection {
            src_ip: self.src.parse().unwrap(),
            src_identity: id,
            dst_ip: self.dst.parse().unwrap(),
            dst_port: self.port,
        }
    }
}

fn policy(yaml: &str) -> Policy {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

/// A GLOBAL DENY holding one rule of one clause of the match written in `yaml`.
fn deny_with(match_yaml: &str) -> Policy {
    let m: Match = serde_yaml::from_str(match_yaml).unwrap_or_else(|e| panic!("{match_yaml}: {e}"));
    Policy {
        name: "p".into(),
        namespace: "istio-system".into(),
        scope: Scope::Global,
        action: Action::Deny,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
    }
}

/// Whether the policy matches `c` (through a whole `PolicySet::check`).
fn matched(p: Policy, c: C) -> bool {
    let id = c.identity();
    let set = PolicySet::new([p.clone()]);
    let d = set.check("b", &[], &c.with(id.as_ref()));
    // The evaluator and the policy's own `matches` agree.
    let direct = {
        let mut p = p;
        p.normalize();
        p.matches(&c.with(id.as_ref()))
    };
    match p_action(&set) {
        Action::Deny => assert_eq!(!d.allowed, direct),
        Action::Allow => assert_eq!(d.allowed, direct),
    }
    direct
}

fn p_action(set: &PolicySet) -> Action {
    set.policies().next().unwrap().action
}

#[test]
fn every_field_and_its_negation() {
    let other_td = C {
        id: Some(("corp.example", "a", "client")),
        ..BASE
    };
    let v6 = C {
        src: "fd00::1",
        dst: "fd01::2",
        ..BASE
    };
    let mapped = C {
        src: "::ffff:10.0.0.1",
        ..BASE
    };
    #[rustfmt::skip]
    let table: &[(&str, C, bool)] = &[
        // A match with no field set never matches.
        ("{}", BASE, false),
        ("{}", PLAIN, false),
        // namespaces: the source identity's namespace.
        ("namespaces: [!Exact a]", BASE, true),
        ("namespaces: [!Exact b]", BASE, false),
        ("namespaces: [!Exact b, !Exact a]", BASE, true),
        ("namespaces: [!Prefix '']", BASE, true),
        ("namespaces: [!Suffix a]", BASE, true),
        ("namespaces: [!Presence ]", BASE, true),
        ("namespaces: [!Presence ]", PLAIN, false),
        ("namespaces: [!Exact a]", PLAIN, false),
        ("notNamespaces: [!Exact a]", BASE, false),
        ("notNamespaces: [!Exact b]", BASE, true),
        ("notNamespaces: [!Exact b, !Prefix a]", BASE, false),
        ("notNamespaces: [!Exact a]", PLAIN, true),
        ("notNamespaces: [!Presence ]", PLAIN, true),
        // principals: without spiffe://.
        ("principals: [!Exact cluster.local/ns/a/sa/client]", BASE, true),
        ("principals: [!Exact 'spiffe://cluster.local/ns/a/sa/client']", BASE, true),
        ("principals: [!Exact cluster.local/ns/a/sa/clien]", BASE, false),
        ("principals: [!Exact cluster.local/ns/a/sa/client2]", BASE, false),
        ("principals: [!Exact cluster.local/ns/a/sa/client]", other_td, false),
        ("principals: [!Prefix cluster.local/ns/a/]", BASE, true),
        ("principals: [!Prefix 'cluster.local/ns/a/sa/client']", BASE, true),
        ("principals: [!Prefix 'cluster.local/ns/a/sa/client/']", BASE, false),
        ("principals: [!Prefix 'spiffe://cluster.local/ns/a/']", BASE, true),
        ("principals: [!Prefix cluster.local/ns/b/]", BASE, false),
        ("principals: [!Suffix /sa/client]", BASE, true),
        ("principals: [!Suffix 'ocal/ns/a/sa/client']", other_td, false),
        ("principals: [!Suffix xcluster.local/ns/a/sa/client]", BASE, false),
        ("principals: [!Suffix /sa/other]", BASE, false),
        ("principals: [!Presence ]", BASE, true),
        ("principals: [!Presence []]", BASE, true),
        ("principals: [!Presence ]", PLAIN, false),
        ("principals: [!Prefix '']", PLAIN, false),
        ("notPrincipals: [!Exact cluster.local/ns/a/sa/client]", BASE, false),
        ("notPrincipals: [!Exact cluster.local/ns/a/sa/other]", BASE, true),
        ("notPrincipals: [!Presence ]", BASE, false),
        // Istio's documented way to deny plaintext: DENY notPrincipals ["*"].
        ("notPrincipals: [!Presence ]", PLAIN, true),
        // service accounts: (namespace, name) of the source identity.
        ("serviceAccounts: [{namespace: a, serviceAccount: client}]", BASE, true),
        ("serviceAccounts: [{namespace: b, serviceAccount: client}]", BASE, false),
        ("serviceAccounts: [{namespace: a, serviceAccount: other}, {namespace: a, serviceAccount: client}]", BASE, true),
        ("serviceAccounts: [{namespace: a, serviceAccount: client}]", other_td, true),
        ("serviceAccounts: [{namespace: a, serviceAccount: client}]", PLAIN, false),
        ("notServiceAccounts: [{namespace: a, serviceAccount: client}]", BASE, false),
        ("notServiceAccounts: [{namespace: a, serviceAccount: x}]", BASE, true),
        ("notServiceAccounts: [{namespace: a, serviceAccount: client}]", PLAIN, true),
        // source IPs: CIDRs.
        ("sourceIps: [10.0.0.0/8]", BASE, true),
        ("sourceIps: [10.0.0.1/32]", BASE, true),
        ("sourceIps: [10.0.0.1]", BASE, true),
        ("sourceIps: [10.0.0.2]", BASE, false),
        ("sourceIps: [10.0.1.0/24]", BASE, false),
        ("sourceIps: [192.168.0.0/16, 10.0.0.0/31]", BASE, true),
        ("sourceIps: [0.0.0.0/0]", BASE, true),
        ("sourceIps: [0.0.0.0/0]", v6, false),
        ("sourceIps: ['::/0']", BASE, false),
        ("sourceIps: ['fd00::/8']", v6, true),
        ("sourceIps: ['fd00::2/127']", v6, false),
        ("sourceIps: [10.0.0.0/8]", mapped, true),
        ("sourceIps: [10.0.0.1]", PLAIN, true),
        ("notSourceIps: [10.0.0.0/8]", BASE, false),
        ("notSourceIps: [10.0.0.0/8]", mapped, false),
        ("notSourceIps: [11.0.0.0/8]", BASE, true),
        ("sourceIps: [10.0.0.0/8]\nnotSourceIps: [10.0.0.1/32]", BASE, false),
        ("sourceIps: [10.0.0.0/8]\nnotSourceIps: [10.0.0.2/32]", BASE, true),
        // destination IPs.
        ("destinationIps: [10.1.0.0/16]", BASE, true),
        ("destinationIps: [10.2.0.0/16]", BASE, false),
        ("destinationIps: ['fd01::2']", v6, true),
        ("notDestinationIps: [10.1.0.2]", BASE, false),
        ("notDestinationIps: [10.1.0.3]", BASE, true),
        // ports.
        ("destinationPorts: [8080]", BASE, true),
        ("destinationPorts: [80]", BASE, false),
        ("destinationPorts: [80, 8080]", BASE, true),
        ("destinationPorts: [8080]", PLAIN, true),
        ("notDestinationPorts: [8080]", BASE, false),
        ("notDestinationPorts: [80, 443]", BASE, true),
        ("destinationPorts: [8080]\nnotDestinationPorts: [8080]", BASE, false),
        // Fields AND-ed.
        ("destinationPorts: [8080]\nnamespaces: [!Exact a]", BASE, true),
        ("destinationPorts: [8080]\nnamespaces: [!Exact b]", BASE, false),
        ("destinationPorts: [80]\nnamespaces: [!Exact a]", BASE, false),
        ("destinationPorts: [8080]\nnamespaces: [!Exact a]", PLAIN, false),
        ("destinationPorts: [8080]\nnotNamespaces: [!Exact a]", PLAIN, true),
        ("sourceIps: [10.0.0.0/8]\ndestinationIps: [10.1.0.0/16]\ndestinationPorts: [8080]\nprincipals: [!Suffix /client]\nserviceAccounts: [{namespace: a, serviceAccount: client}]\nnamespaces: [!Exact a]", BASE, true),
        ("sourceIps: [10.0.0.0/8]\ndestinationIps: [10.1.0.0/16]\ndestinationPorts: [8080]\nprincipals: [!Suffix /client]\nserviceAccounts: [{namespace: a, serviceAccount: client}]\nnamespaces: [!Exact a]\nnotDestinationIps: [10.1.0.2]", BASE, false),
    ];
    for (yaml, c, want) in table {
        assert_eq!(matched(deny_with(yaml), *c), *want, "{yaml} on {c:?}");
    }
}

impl std::fmt::Debug for C {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {}:{} as {:?}",
            self.src, self.dst, self.port, self.id
        )
    }
}

#[test]
fn rules_clauses_and_matches_combine() {
    let p = |rules: &str| {
        policy(&format!(
            "{{name: p, namespace: n, scope: Global, action: Deny, rules: {rules}}}"
        ))
    };
    let hit = "{destinationPorts: [8080]}";
    let miss = "{destinationPorts: [80]}";
    #[rustfmt::skip]
    let table: &[(String, bool)] = &[
        // No rules: never matches.
        ("[]".into(), false),
        // A rule without clauses: everything.
        ("[[]]".into(), true),
        // A clause without matches: true.
        ("[[[]]]".into(), true),
        // A clause whose only match is empty: false.
        ("[[[{}]]]".into(), false),
        (format!("[[[{{}}, {hit}]]]"), true),
        // Matches OR-ed.
        (format!("[[[{hit}]]]"), true),
        (format!("[[[{miss}]]]"), false),
        (format!("[[[{miss}, {hit}]]]"), true),
        // Clauses AND-ed.
        (format!("[[[{hit}], [{hit}]]]"), true),
        (format!("[[[{hit}], [{miss}]]]"), false),
        (format!("[[[{hit}], []]]"), true),
        // Rules OR-ed.
        (format!("[[[{miss}]], [[{hit}]]]"), true),
        (format!("[[[{miss}]], [[{miss}]]]"), false),
        (format!("[[[{miss}]], []]"), true),
    ];
    for (rules, want) in table {
        assert_eq!(matched(p(rules), BASE), *want, "rules {rules}");
    }
}

/// A policy with a given scope/action whose one rule matches port `port`.
fn on_port(ns: &str, name: &str, scope: Scope, action: Action, port: u16) -> Policy {
    Policy {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    destination_ports: vec![port],
                    ..Match::default()
                }],
            }],
        }],
    }
}

fn decide(set: &PolicySet, ns: &str, listed: &[&str], c: C) -> Decision {
    let id = c.identity();
    let listed: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    set.check(ns, &listed, &c.with(id.as_ref()))
}

fn verdict(d: &Decision) -> (bool, Option<&str>) {
    (d.allowed, d.policy.as_deref())
}

#[test]
fn no_applicable_policy_allows() {
    let d = decide(&PolicySet::default(), "b", &[], BASE);
    assert_eq!(
        d,
        Decision {
            allowed: true,
            policy: None,
            dry_run: vec![]
        }
    );
    // Policies elsewhere change nothing.
    let set = PolicySet::new([
        on_port("c", "deny", Scope::Namespace, Action::Deny, 8080),
        on_port("c", "allow", Scope::Namespace, Action::Allow, 1),
        on_port("b", "sel", Scope::WorkloadSelector, Action::Allow, 1),
    ]);
    assert_eq!(verdict(&decide(&set, "b", &[], BASE)), (true, None));
}

#[test]
fn scopes_select_the_policies_that_apply() {
    use Action::*;
    use Scope::*;
    let set = PolicySet::new([
        on_port("istio-system", "g-deny", Global, Deny, 1001),
        on_port("istio-system", "g-allow", Global, Allow, 1002),
        on_port("b", "ns-deny", Namespace, Deny, 1003),
        on_port("b", "ns-allow", Namespace, Allow, 1004),
        on_port("b", "sel-deny", WorkloadSelector, Deny, 1005),
        on_port("b", "sel-allow", WorkloadSelector, Allow, 1006),
        on_port("c", "c-deny", Namespace, Deny, 1007),
    ]);
    let at = |port| C { port, ..BASE };
    let sel = ["b/sel-deny", "b/sel-allow"];
    // Destination in b, selected.
    type Case<'a> = (&'a str, &'a [&'a str], u16, (bool, Option<&'a str>));
    let cases: &[Case<'_>] = &[
        ("b", &sel, 1001, (false, Some("istio-system/g-deny"))),
        ("b", &sel, 1002, (true, Some("istio-system/g-allow"))),
        ("b", &sel, 1003, (false, Some("b/ns-deny"))),
        ("b", &sel, 1004, (true, Some("b/ns-allow"))),
        ("b", &sel, 1005, (false, Some("b/sel-deny"))),
        ("b", &sel, 1006, (true, Some("b/sel-allow"))),
        // Other namespace's policies do not apply; ALLOWs apply, so unmatched is denied.
        ("b", &sel, 1007, (false, None)),
        // Not selected: the selector policies do not apply.
        ("b", &[], 1005, (false, None)),
        ("b", &[], 1006, (false, None)),
        // Unknown keys are skipped.
        (
            "b",
            &["b/nope", "b/sel-allow"],
            1006,
            (true, Some("b/sel-allow")),
        ),
        // A listed key of another scope does not count as selected (nor twice).
        ("d", &["c/c-deny"], 1007, (false, None)),
        (
            "d",
            &["c/c-deny"],
            1002,
            (true, Some("istio-system/g-allow")),
        ),
        // Namespace c: its DENY and the globals apply.
        ("c", &[], 1007, (false, Some("c/c-deny"))),
        ("c", &[], 1001, (false, Some("istio-system/g-deny"))),
        ("c", &[], 1002, (true, Some("istio-system/g-allow"))),
        ("c", &[], 1004, (false, None)),
    ];
    for (ns, listed, port, want) in cases {
        let d = decide(&set, ns, listed, at(*port));
        assert_eq!(verdict(&d), *want, "{ns} {listed:?} port {port}");
        assert!(d.dry_run.is_empty());
    }
    // Only selector policies: no ALLOW applies without the selection.
    let only_sel = PolicySet::new([on_port("b", "s", WorkloadSelector, Allow, 1)]);
    assert_eq!(verdict(&decide(&only_sel, "b", &[], BASE)), (true, None));
    assert_eq!(
        verdict(&decide(&only_sel, "b", &["b/s"], BASE)),
        (false, None)
    );
}

#[test]
fn deny_wins_over_allow_and_any_allow_allows() {
    use Action::*;
    use Scope::*;
    let set = PolicySet::new([
        on_port("b", "allow", Namespace, Allow, 8080),
        on_port("b", "allow-other", Namespace, Allow, 9090),
        on_port("b", "deny", WorkloadSelector, Deny, 8080),
    ]);
    assert_eq!(
        verdict(&decide(&set, "b", &["b/deny"], BASE)),
        (false, Some("b/deny"))
    );
    assert_eq!(
        verdict(&decide(&set, "b", &[], BASE)),
        (true, Some("b/allow"))
    );
    let c9090 = C { port: 9090, ..BASE };
    assert_eq!(
        verdict(&decide(&set, "b", &["b/deny"], c9090)),
        (true, Some("b/allow-other"))
    );
    let c1 = C { port: 1, ..BASE };
    assert_eq!(verdict(&decide(&set, "b", &["b/deny"], c1)), (false, None));
}

#[test]
fn allow_without_rules_denies_everything_it_applies_to() {
    let mut p = on_port("b", "nothing", Scope::Namespace, Action::Allow, 8080);
    p.rules.clear();
    let set = PolicySet::new([p]);
    assert_eq!(verdict(&decide(&set, "b", &[], BASE)), (false, None));
    assert_eq!(verdict(&decide(&set, "b", &[], PLAIN)), (false, None));
    assert_eq!(verdict(&decide(&set, "c", &[], BASE)), (true, None));
    // A DENY without rules denies nothing.
    let mut p = on_port("b", "nothing", Scope::Namespace, Action::Deny, 8080);
    p.rules.clear();
    let set = PolicySet::new([p]);
    assert_eq!(verdict(&decide(&set, "b", &[], BASE)), (true, None));
}

#[test]
fn dry_run_policies_report_and_never_decide() {
    use Action::*;
    use Scope::*;
    let dry = |mut p: Policy| {
        p.dry_run = true;
        p
    };
    let set = PolicySet::new([
        dry(on_port("b", "dry-deny", Namespace, Deny, 8080)),
        dry(on_port("istio-system", "dry-allow", Global, Allow, 9090)),
        dry(on_port("b", "dry-sel", WorkloadSelector, Deny, 8080)),
    ]);
    let d = decide(&set, "b", &["b/dry-sel", "b/dry-sel"], BASE);
    assert_eq!(
        verdict(&d),
        (true, None),
        "dry-run DENY matched but does not deny, dry-run ALLOW does not count"
    );
    let mut got = d.dry_run.clone();
    got.sort_by(|a, b| a.policy.cmp(&b.policy));
    assert_eq!(
        got,
        vec![
            DryRunVerdict {
                policy: "b/dry-deny".into(),
                action: Deny,
                matched: true
            },
            DryRunVerdict {
                policy: "b/dry-sel".into(),
                action: Deny,
                matched: true
            },
            DryRunVerdict {
                policy: "istio-system/dry-allow".into(),
                action: Allow,
                matched: false
            },
        ],
        "each applicable dry-run policy once, the selector listed twice reported once"
    );
    // Not applicable: not reported.
    let d = decide(&set, "c", &[], BASE);
    assert_eq!(d.dry_run.len(), 1);
    assert_eq!(d.dry_run[0].policy, "istio-system/dry-allow");

    // Next to enforced policies, reported whatever decides.
    let set = PolicySet::new([
        dry(on_port("b", "dry-allow", Namespace, Allow, 8080)),
        on_port("b", "deny", Namespace, Deny, 8080),
        on_port("b", "allow", Namespace, Allow, 9090),
    ]);
    let d = decide(&set, "b", &[], BASE);
    assert_eq!(verdict(&d), (false, Some("b/deny")));
    assert_eq!(
        d.dry_run,
        vec![DryRunVerdict {
            policy: "b/dry-allow".into(),
            action: Allow,
            matched: true
        }]
    );
    let d = decide(&set, "b", &[], C { port: 7, ..BASE });
    assert_eq!(verdict(&d), (false, None));
    assert!(!d.dry_run[0].matched);
}

#[test]
fn plaintext_inbound_has_no_identity() {
    use Action::*;
    use Scope::*;
    let from_ns_a = policy(
        "{name: from-a, namespace: b, scope: Namespace, action: Allow, rules: [[[{namespaces: [!Exact a]}]]]}",
    );
    let deny_plaintext = policy(
        "{name: mtls-only, namespace: istio-system, scope: Global, action: Deny, rules: [[[{notPrincipals: [!Presence ]}]]]}",
    );
    let set = PolicySet::new([from_ns_a.clone()]);
    assert_eq!(
        verdict(&decide(&set, "b", &[], BASE)),
        (true, Some("b/from-a"))
    );
    assert_eq!(verdict(&decide(&set, "b", &[], PLAIN)), (false, None));
    let set = PolicySet::new([
        from_ns_a,
        deny_plaintext,
        on_port("b", "p", Namespace, Allow, 8080),
    ]);
    assert_eq!(
        verdict(&decide(&set, "b", &[], BASE)),
        (true, Some("b/from-a"))
    );
    assert_eq!(
        verdict(&decide(&set, "b", &[], PLAIN)),
        (false, Some("istio-system/mtls-only"))
    );
}

#[test]
fn later_policy_with_the_same_key_replaces_the_earlier() {
    let set = PolicySet::new([
        on_port("b", "p", Scope::Namespace, Action::Deny, 8080),
        on_port("b", "p", Scope::Namespace, Action::Allow, 8080),
    ]);
    assert_eq!(set.len(), 1);
    assert!(!set.is_empty());
    assert_eq!(set.get("b/p").unwrap().action, Action::Allow);
    assert_eq!(verdict(&decide(&set, "b", &[], BASE)), (true, Some("b/p")));
    assert!(PolicySet::default().is_empty());
    assert!(set.get("b/q").is_none());
}

#[test]
fn index_skips_unrelated_policies() {
    use Action::*;
    use Scope::*;
    let relevant = || {
        vec![
            on_port("istio-system", "g1", Global, Deny, 1),
            on_port("istio-system", "g2", Global, Allow, 1),
            on_port("b", "n1", Namespace, Deny, 1),
            on_port("b", "n2", Namespace, Allow, 1),
            on_port("b", "s1", WorkloadSelector, Deny, 1),
            on_port("b", "s2", WorkloadSelector, Allow, 1),
            on_port("b", "s3", WorkloadSelector, Allow, 8080),
        ]
    };
    let unrelated = (0..10_000).map(|i| {
        let ns = format!("ns{}", i % 100);
        match i % 3 {
            0 => on_port(&ns, &format!("n{i}"), Namespace, Deny, 8080),
            1 => on_port(&ns, &format!("n{i}"), Namespace, Allow, 8080),
            // Selector policies in b that this workload does not name.
            _ => on_port("b", &format!("u{i}"), WorkloadSelector, Deny, 8080),
        }
    });
    let small = PolicySet::new(relevant());
    let big = PolicySet::new(relevant().into_iter().chain(unrelated));
    assert_eq!(big.len(), 10_007);
    let listed: Vec<String> = ["b/s1", "b/s2", "b/s3", "b/unknown"]
        .map(String::from)
        .into();
    let id = BASE.identity();
    let conn = BASE.with(id.as_ref());
    let (mut n_small, mut n_big) = (0, 0);
    let d_small = small
        .check_counted("b", &listed, &conn, &mut n_small)
        .to_decision();
    let d_big = big
        .check_counted("b", &listed, &conn, &mut n_big)
        .to_decision();
    assert_eq!(d_small, d_big);
    assert_eq!(verdict(&d_big), (true, Some("b/s3")));
    // All 3 DENYs, then the ALLOWs up to the matching one (the last).
    assert_eq!((n_small, n_big), (7, 7));
    // A namespace without policies of its own: only the globals.
    let (mut n_small, mut n_big) = (0, 0);
    small.check_counted("zz", &[], &conn, &mut n_small);
    big.check_counted("zz", &[], &conn, &mut n_big);
    assert_eq!((n_small, n_big), (2, 2));
}

/// Counts this thread's allocations (the whole test binary runs on it; one thread-local
/// increment per allocation).
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCS: Cell<usize> = const { Cell::new(0) };
    }

    struct Counting;

    // SAFETY: every call is forwarded to `System` unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: the caller's contract is `System`'s.
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            // SAFETY: as above.
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: as above.
            unsafe { System.realloc(p, l, n) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// How many allocations `f` made on this thread.
    pub fn allocations<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let before = ALLOCS.with(Cell::get);
        let out = f();
        (out, ALLOCS.with(Cell::get) - before)
    }
}

#[test]
fn evaluation_without_dry_run_does_not_allocate() {
    use Action::*;
    use Scope::*;
    let set = PolicySet::new([
        on_port("istio-system", "g", Global, Deny, 1),
        on_port("b", "allow", Namespace, Allow, 8080),
        on_port("b", "deny", Namespace, Deny, 9090),
        policy(
            "{name: s, namespace: b, scope: WorkloadSelector, action: Allow, rules: [[[{principals: [!Prefix cluster.local/ns/a/], sourceIps: [10.0.0.0/8]}]]]}",
        ),
    ]);
    let listed = vec!["b/s".to_string()];
    let id = BASE.identity();
    let conn = BASE.with(id.as_ref());
    let at = |port| Connection {
        dst_port: port,
        ..conn
    };
    // Allowed by a matching ALLOW, by the selector's principal match, denied by a DENY, denied
    // with none matching, allowed with no ALLOW applying.
    type Case<'a> = (&'a str, &'a [String], Connection<'a>, bool, Option<&'a str>);
    let cases: [Case<'_>; 5] = [
        ("b", &[], at(8080), true, Some("b/allow")),
        ("b", &listed, at(7000), true, Some("b/s")),
        ("b", &listed, at(9090), false, Some("b/deny")),
        ("b", &[], at(7000), false, None),
        ("c", &[], at(7000), true, None),
    ];
    for (ns, listed, conn, allowed, key) in cases {
        let (v, n) = counting::allocations(|| set.evaluate(ns, listed, &conn));
        assert_eq!(n, 0, "{ns} {listed:?} port {}", conn.dst_port);
        assert_eq!(
            (v.allowed, v.policy.map(Policy::key).as_deref()),
            (allowed, key)
        );
        // `check` allocates at most the deciding policy's key.
        let (d, n) = counting::allocations(|| set.check(ns, listed, &conn));
        assert_eq!(n, usize::from(key.is_some()), "{d:?}");
        assert_eq!(d, v.to_decision());
    }
    // The counter does count.
    let (_, n) = counting::allocations(|| set.check("b", &[], &at(8080)).policy.unwrap().len());
    assert_eq!(n, 1);
}

#[test]
fn yaml_forms() {
    // Upstream ztunnel's local-config shape, all fields.
    let p = policy(
        r#"
name: p
namespace: b
scope: WorkloadSelector
action: Allow
dryRun: true
rules:
- - - namespaces: [!Exact a, !Prefix x, !Suffix y, !Presence ]
      notNamespaces: [!Exact z]
      principals: [!Exact cluster.local/ns/a/sa/client]
      notPrincipals: [!Presence ""]
      sourceIps: [10.0.0.0/8, "fd00::/8", 10.0.0.1]
      notSourceIps: [10.0.0.2/32]
      destinationIps: [10.1.0.0/16]
      notDestinationIps: [10.1.0.3/32]
      destinationPorts: [8080]
      notDestinationPorts: [9090]
      serviceAccounts: [{namespace: a, serviceAccount: client}]
      notServiceAccounts: [{namespace: a, serviceAccount: evil}]
"#,
    );
    assert!(p.dry_run);
    assert_eq!(
        (p.scope, p.action),
        (Scope::WorkloadSelector, Action::Allow)
    );
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(
        m.namespaces,
        vec![
            StringMatch::Exact("a".into()),
            StringMatch::Prefix("x".into()),
            StringMatch::Suffix("y".into()),
            StringMatch::Presence
        ]
    );
    assert_eq!(m.not_principals, vec![StringMatch::Presence]);
    assert_eq!(
        m.source_ips,
        vec![
            IpNet::new("10.0.0.0".parse().unwrap(), 8).unwrap(),
            IpNet::new("fd00::".parse().unwrap(), 8).unwrap(),
            IpNet::new("10.0.0.1".parse().unwrap(), 32).unwrap(),
        ]
    );
    assert_eq!(m.not_service_accounts[0].service_account, "evil");
    // Block style, and `!Presence` followed by nothing.
    let m: Match = serde_yaml::from_str("principals:\n- !Presence\n- !Exact x\n").unwrap();
    assert_eq!(
        m.principals,
        vec![StringMatch::Presence, StringMatch::Exact("x".into())]
    );
    // Written back and read again: the same policy.
    let yaml = serde_yaml::to_string(&p).unwrap();
    assert_eq!(policy(&yaml), p, "{yaml}");
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p, "{json}");

    // Refused, naming what is wrong.
    let base = "{name: p, namespace: b, scope: Global, action: Deny, rules: RULES}";
    for (rules, needle) in [
        ("[[[{notDestinationPort: [1]}]]]", "notDestinationPort"),
        ("[[[{principals: [{Exact: a}]}]]]", "principals"),
        ("[[[{principals: [a]}]]]", "principals"),
        ("[[[{principals: [!Regex a]}]]]", "Regex"),
        ("[[[{principals: [!Presence x]}]]]", "Presence"),
        ("[[[{sourceIps: [10.0.0.0/33]}]]]", "prefix length 33"),
        ("[[[{sourceIps: [10.0.0.0/x]}]]]", "not a CIDR"),
        ("[[[{destinationPorts: [65536]}]]]", "65536"),
        (
            "[[[{serviceAccounts: [{namespace: a}]}]]]",
            "serviceAccount",
        ),
    ] {
        let yaml = base.replace("RULES", rules);
        let e = serde_yaml::from_str::<Policy>(&yaml)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{rules}: {e}");
    }
    for (yaml, needle) in [
        (
            "{name: p, namespace: b, scope: Global, action: Deny}",
            "rules",
        ),
        ("{name: p, namespace: b, action: Deny, rules: []}", "scope"),
        (
            "{name: p, namespace: b, scope: Cluster, action: Deny, rules: []}",
            "Cluster",
        ),
        (
            "{name: p, namespace: b, scope: Global, action: Audit, rules: []}",
            "Audit",
        ),
        (
            "{name: p, namespace: b, scope: Global, action: Deny, rules: [], dry_run: true}",
            "dry_run",
        ),
    ] {
        let e = serde_yaml::from_str::<Policy>(yaml)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{yaml}: {e}");
    }
}

#[test]
fn ip_net_contains() {
    let n = |s: &str| s.parse::<IpNet>().unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(n("10.0.0.0/8").contains(ip("10.255.255.255")));
    assert!(!n("10.0.0.0/8").contains(ip("11.0.0.0")));
    // Host bits in the block are ignored.
    assert!(n("10.0.0.7/24").contains(ip("10.0.0.200")));
    assert!(n("0.0.0.0/0").contains(ip("1.2.3.4")));
    assert!(!n("0.0.0.0/0").contains(ip("::1")));
    assert!(n("::/0").contains(ip("::1")));
    assert!(n("fd00::/8").contains(ip("fdff::1")));
    assert!(!n("fd00::/9").contains(ip("fdff::1")));
    assert!(n("::1/128").contains(ip("::1")));
    assert!(n("10.0.0.1/32").contains(ip("::ffff:10.0.0.1")));
    assert!(n("::ffff:10.0.0.0/104").contains(ip("::ffff:10.0.0.1")));
    assert!(!n("::ffff:10.0.0.0/104").contains(ip("10.0.0.1")));
    assert_eq!(n("fd00::1").prefix_len, 128);
    assert_eq!(n("10.0.0.0/8").to_string(), "10.0.0.0/8");
    assert!(IpNet::new(ip("10.0.0.0"), 33).is_err());
    assert!(IpNet::new(ip("::"), 129).is_err());
    assert!("10.0.0.0/".parse::<IpNet>().is_err());
    assert!("/8".parse::<IpNet>().is_err());
}

#[test]
fn string_match_on_parts() {
    use StringMatch::*;
    let parts = ["ab", "", "cd"];
    for (m, want) in [
        (Exact("abcd".into()), true),
        (Exact("abc".into()), false),
        (Exact("abcde".into()), false),
        (Prefix("".into()), true),
        (Prefix("abc".into()), true),
        (Prefix("abcd".into()), true),
        (Prefix("abcde".into()), false),
        (Prefix("ac".into()), false),
        (Suffix("bcd".into()), true),
        (Suffix("abcd".into()), true),
        (Suffix("xabcd".into()), false),
        (Suffix("".into()), true),
        (Suffix("bd".into()), false),
        (Presence, true),
    ] {
        assert_eq!(m.matches_parts(&parts), want, "{m:?}");
        assert_eq!(m.matches("abcd"), want, "{m:?}");
    }
    assert!(!Presence.matches(""));
    assert!(!Presence.matches_parts(&["", ""]));
    assert!(Exact("".into()).matches(""));
    // Multi-byte characters compare as bytes, never split.
    assert!(Prefix("é".into()).matches_parts(&["\u{e9}x"]));
    assert!(!Suffix("é".into()).matches_parts(&["xe"]));
}
