//! [`decide`] table-tested: one config per policy set, one row per connection.

use super::*;
use zmesh_core::identity::SpiffeId;
use zmesh_core::state::LocalConfig;

/// `server` (10.0.0.2) and `bound` (10.0.0.5, behind the waypoint at 10.0.0.50), both in
/// `default`; `bound` also names the selector policy `default/only-client-on-8080`.
const WORKLOADS: &str = r#"workloads:
- {name: server, namespace: default, serviceAccount: server, workloadIps: [10.0.0.2]}
- name: bound
  namespace: default
  serviceAccount: bound
  workloadIps: [10.0.0.5]
  authorizationPolicies: [default/only-client-on-8080]
  waypoint: {destination: "/10.0.0.50", hboneMtlsPort: 15008}
"#;
const SERVER: &str = "default/server/server";
const BOUND: &str = "default/bound/bound";

/// Policies of the rows, by name.
fn policies(name: &str) -> &'static str {
    match name {
        "none" => "",
        "deny-client" => {
            "- {name: deny-client, namespace: default, scope: Namespace, action: Deny, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]}\n"
        }
        "allow-client" => {
            "- {name: allow-client, namespace: default, scope: Namespace, action: Allow, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]}\n"
        }
        "allow-and-deny-client" => {
            "- {name: allow-client, namespace: default, scope: Namespace, action: Allow, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]}\n\
             - {name: deny-client, namespace: default, scope: Namespace, action: Deny, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]}\n"
        }
        "allow-other-namespace" => {
            "- {name: allow-client, namespace: elsewhere, scope: Namespace, action: Allow, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]}\n"
        }
        "allow-plaintext-ips" => {
            "- {name: from-lan, namespace: default, scope: Namespace, action: Allow, rules: [[[{sourceIps: [10.0.0.0/24]}]]]}\n"
        }
        "dry-run-deny-client" => {
            "- {name: audit-client, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]}\n"
        }
        "selector" => {
            "- {name: only-client-on-8080, namespace: default, scope: WorkloadSelector, action: Allow, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client], destinationPorts: [8080]}]]]}\n"
        }
        other => panic!("no policy set {other}"),
    }
}

fn state(policy_set: &str) -> State {
    let p = policies(policy_set);
    let yaml = if p.is_empty() {
        WORKLOADS.to_owned()
    } else {
        format!("{WORKLOADS}policies:\n{p}")
    };
    State::from_local(LocalConfig::parse(&yaml).unwrap()).unwrap()
}

/// What a row expects; workloads by name.
#[derive(Debug, PartialEq, Eq)]
enum Want {
    Admit(&'static str, Option<String>),
    NotLocal,
    Deny(Option<&'static str>, Denial),
}

fn got(o: &Outcome<'_>) -> Want {
    let name = |w: &Arc<Workload>| -> &'static str {
        match w.name.as_str() {
            "server" => "server",
            "bound" => "bound",
            other => panic!("unexpected workload {other}"),
        }
    };
    match o {
        Outcome::Admit { workload, policy } => Want::Admit(name(workload), policy.clone()),
        Outcome::NotLocal => Want::NotLocal,
        Outcome::Deny { workload, denial } => Want::Deny(workload.map(name), denial.clone()),
    }
}

/// A connection: `identity` is the peer's service account in `default` (HBONE with a SPIFFE
/// id), `None` for plaintext or HBONE without one.
struct Row {
    what: &'static str,
    policy_set: &'static str,
    workload_key: &'static str,
    arrived_on: Option<&'static str>,
    identity: Option<&'static str>,
    dst: &'static str,
    want: Want,
}

fn deny_policy(p: &str) -> Denial {
    Denial::Policy(p.to_owned())
}

fn by(p: &str) -> Option<String> {
    Some(p.to_owned())
}

#[test]
fn inbound_decisions() {
    use Want::*;
    let row = |what, policy_set, workload_key, arrived_on, identity, dst, want| Row {
        what,
        policy_set,
        workload_key,
        arrived_on,
        identity,
        dst,
        want,
    };
    let here = Some("10.0.0.2");
    #[rustfmt::skip]
    let rows = [
        // The proxied workload and the destination address.
        row("unknown workload, at the arrival address", "none", "default/gone/gone", here, Some("client"), "10.0.0.2:8080", Deny(None, Denial::UnknownDestination)),
        row("unknown workload, plaintext", "none", "default/gone/gone", here, None, "10.0.0.2:8080", Deny(None, Denial::UnknownDestination)),
        row("unknown workload, elsewhere", "none", "default/gone/gone", here, Some("client"), "10.0.0.9:8080", NotLocal),
        row("another address (a relay)", "none", SERVER, here, Some("client"), "10.0.0.9:8080", NotLocal),
        row("another workload's address (plaintext relay)", "none", SERVER, here, None, "10.0.0.5:8080", NotLocal),
        row("a workload IP, arrived elsewhere", "none", SERVER, Some("10.9.9.9"), Some("client"), "10.0.0.2:8080", Admit("server", None)),
        row("a workload IP, arrival address unknown", "none", SERVER, None, None, "10.0.0.2:8080", Admit("server", None)),
        row("the arrival address, not in the config", "none", SERVER, Some("10.0.0.7"), None, "10.0.0.7:8080", Admit("server", None)),
        row("nothing known", "none", SERVER, None, None, "10.0.0.9:8080", NotLocal),
        // No policy: every peer, with or without identity.
        row("no policy, HBONE", "none", SERVER, here, Some("client"), "10.0.0.2:8080", Admit("server", None)),
        row("no policy, plaintext", "none", SERVER, here, None, "10.0.0.2:8080", Admit("server", None)),
        // DENY.
        row("DENY matches", "deny-client", SERVER, here, Some("client"), "10.0.0.2:8080", Deny(Some("server"), deny_policy("default/deny-client"))),
        row("DENY does not match", "deny-client", SERVER, here, Some("other"), "10.0.0.2:8080", Admit("server", None)),
        row("DENY on principals, plaintext", "deny-client", SERVER, here, None, "10.0.0.2:8080", Admit("server", None)),
        // ALLOW.
        row("ALLOW matches", "allow-client", SERVER, here, Some("client"), "10.0.0.2:8080", Admit("server", by("default/allow-client"))),
        row("ALLOW does not match", "allow-client", SERVER, here, Some("other"), "10.0.0.2:8080", Deny(Some("server"), Denial::NoAllowMatched)),
        row("ALLOW needs an identity: plaintext fails closed", "allow-client", SERVER, here, None, "10.0.0.2:8080", Deny(Some("server"), Denial::NoAllowMatched)),
        row("DENY before ALLOW", "allow-and-deny-client", SERVER, here, Some("client"), "10.0.0.2:8080", Deny(Some("server"), deny_policy("default/deny-client"))),
        row("ALLOW of another namespace does not apply", "allow-other-namespace", SERVER, here, Some("other"), "10.0.0.2:8080", Admit("server", None)),
        row("ALLOW on source IPs admits plaintext", "allow-plaintext-ips", SERVER, here, None, "10.0.0.2:8080", Admit("server", by("default/from-lan"))),
        // Dry-run never decides.
        row("dry-run DENY matches", "dry-run-deny-client", SERVER, here, Some("client"), "10.0.0.2:8080", Admit("server", None)),
        // Selector policy, port condition, waypoint-bound workload.
        row("selector ALLOW, its port", "selector", BOUND, Some("10.0.0.5"), Some("client"), "10.0.0.5:8080", Admit("bound", by("default/only-client-on-8080"))),
        row("selector ALLOW, another port", "selector", BOUND, Some("10.0.0.5"), Some("client"), "10.0.0.5:9090", Deny(Some("bound"), Denial::NoAllowMatched)),
        row("selector ALLOW, not the workload it selects", "selector", SERVER, here, Some("other"), "10.0.0.2:9090", Admit("server", None)),
        row("waypoint-bound, not via its waypoint", "none", BOUND, Some("10.0.0.5"), Some("client"), "10.0.0.5:8080", Admit("bound", None)),
    ];
    let mut failures = Vec::new();
    for r in rows {
        let st = state(r.policy_set);
        let peer = Peer {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: r
                .identity
                .map(|sa| SpiffeId::new("cluster.local", "default", sa).unwrap()),
            dst: r.dst.parse().unwrap(),
        };
        let facts = InboundFacts {
            workload_key: r.workload_key,
            arrived_on: r.arrived_on.map(|a| a.parse().unwrap()),
            peer: &peer,
        };
        let decision = decide(&facts, &st);
        let g = got(&decision.outcome);
        if g != r.want {
            failures.push(format!("{}: want {:?}, got {g:?}", r.what, r.want));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Dry-run verdicts come back to be logged, whether the connection is admitted or not, and
/// only when the policy evaluation ran.
#[test]
fn dry_run_verdicts_are_returned_not_enforced() {
    let st = state("dry-run-deny-client");
    let peer = Peer {
        src_ip: "10.0.0.1".parse().unwrap(),
        src_identity: Some(SpiffeId::new("cluster.local", "default", "client").unwrap()),
        dst: "10.0.0.2:8080".parse().unwrap(),
    };
    let facts = InboundFacts {
        workload_key: SERVER,
        arrived_on: None,
        peer: &peer,
    };
    let d = decide(&facts, &st);
    assert!(matches!(d.outcome, Outcome::Admit { policy: None, .. }));
    assert_eq!(d.dry_run.len(), 1);
    assert!(d.dry_run[0].matched);
    assert_eq!(d.dry_run[0].policy, "default/audit-client");
    let elsewhere = Peer {
        dst: "10.0.0.9:8080".parse().unwrap(),
        ..peer.clone()
    };
    let d = decide(
        &InboundFacts {
            peer: &elsewhere,
            ..facts
        },
        &st,
    );
    assert_eq!(d.outcome, Outcome::NotLocal);
    assert!(d.dry_run.is_empty());
}
