//! L4-only policies decide the same at the waypoint as at ztunnel: one random spec is
//! translated twice by the real controller, once as a namespace policy (to ztunnel's
//! `istio.security.Authorization`, decided by `zmesh_core::policy`, ztunnel's evaluator) and
//! once attached to the waypoint Gateway (to `WaypointPolicy`, decided by this module).

use std::net::IpAddr;

use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use serde_json::{Value, json};
use zmesh_controller::translate::{MeshConfig, Objects, translate};
use zmesh_core::identity::SpiffeId;
use zmesh_core::policy::{Connection, Policy as L4Policy, PolicySet};

use super::*;

const WORLD: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
    metadata: {name: waypoint, namespace: app}\n\
    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n";

/// Mostly nothing, else one or two values.
fn values(set: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    proptest::option::weighted(0.2, subsequence(set, 1..=2)).prop_map(Option::unwrap_or_default)
}

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "spiffe://cluster.local/ns/b/sa/y",
    "cluster.local/ns/a/*",
    "*/sa/y",
    "*",
];
const NAMESPACES: &[&str] = &["a", "b", "*", "a*"];
const BLOCKS: &[&str] = &["10.0.0.1", "10.0.0.0/24", "10.1.0.0/16", "0.0.0.0/0"];
const PORTS: &[&str] = &["80", "8080"];

fn field(obj: &mut serde_json::Map<String, Value>, name: &str, v: Vec<&str>) {
    if !v.is_empty() {
        obj.insert(name.into(), json!(v));
    }
}

fn source() -> impl Strategy<Value = Value> {
    (
        (values(PRINCIPALS), values(PRINCIPALS)),
        (values(NAMESPACES), values(NAMESPACES)),
        (values(BLOCKS), values(BLOCKS)),
    )
        .prop_map(|((p, np), (ns, nns), (ip, nip))| {
            let mut o = serde_json::Map::new();
            field(&mut o, "principals", p);
            field(&mut o, "notPrincipals", np);
            field(&mut o, "namespaces", ns);
            field(&mut o, "notNamespaces", nns);
            field(&mut o, "ipBlocks", ip);
            field(&mut o, "notIpBlocks", nip);
            if o.is_empty() {
                o.insert("namespaces".into(), json!(["a"]));
            }
            json!({"source": o})
        })
}

fn operation() -> impl Strategy<Value = Value> {
    (values(PORTS), values(PORTS)).prop_map(|(p, np)| {
        let mut o = serde_json::Map::new();
        field(&mut o, "ports", p);
        field(&mut o, "notPorts", np);
        if o.is_empty() {
            o.insert("ports".into(), json!(["80"]));
        }
        json!({"operation": o})
    })
}

fn condition() -> impl Strategy<Value = Value> {
    let keyed = |key: &'static str, set: &'static [&'static str]| {
        (values(set), values(set)).prop_map(move |(mut v, nv)| {
            if v.is_empty() && nv.is_empty() {
                v.push(set[0]);
            }
            let mut o = serde_json::Map::new();
            o.insert("key".into(), json!(key));
            field(&mut o, "values", v);
            field(&mut o, "notValues", nv);
            Value::Object(o)
        })
    };
    prop_oneof![
        keyed("source.ip", BLOCKS),
        keyed("source.namespace", NAMESPACES),
        keyed("source.principal", PRINCIPALS),
        keyed("destination.port", PORTS),
        keyed(
            "destination.ip",
            &["10.96.0.10", "10.96.0.0/16", "10.0.0.0/24"]
        ),
    ]
}

fn rule() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(source(), 0..3),
        proptest::collection::vec(operation(), 0..2),
        proptest::collection::vec(condition(), 0..2),
    )
        .prop_map(|(from, to, when)| {
            let mut o = serde_json::Map::new();
            if !from.is_empty() {
                o.insert("from".into(), json!(from));
            }
            if !to.is_empty() {
                o.insert("to".into(), json!(to));
            }
            if !when.is_empty() {
                o.insert("when".into(), json!(when));
            }
            Value::Object(o)
        })
}

/// `(action, rules)`.
fn spec() -> impl Strategy<Value = (&'static str, Vec<Value>)> {
    (
        select(&["ALLOW", "DENY"][..]),
        proptest::collection::vec(rule(), 0..3),
    )
}

/// The YAML of both forms of every spec: `z<i>` for ztunnel, `w<i>` on the waypoint.
fn objects(specs: &[(&str, Vec<Value>)]) -> Objects {
    let mut y = String::from(WORLD);
    for (i, (action, rules)) in specs.iter().enumerate() {
        for (name, target) in [
            (format!("z{i}"), None),
            (
                format!("w{i}"),
                Some(
                    json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}]),
                ),
            ),
        ] {
            let mut spec = json!({"action": action, "rules": rules});
            if let Some(t) = target {
                spec["targetRefs"] = t;
            }
            let doc = json!({
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "app"},
                "spec": spec,
            });
            y += "---\n";
            y += &serde_yaml::to_string(&doc).unwrap();
        }
    }
    Objects::from_yaml(&y).unwrap()
}

fn connection() -> impl Strategy<Value = (Option<SpiffeId>, IpAddr, IpAddr, u16)> {
    (
        select(&[None, Some(("a", "x")), Some(("b", "y")), Some(("c", "z"))][..]),
        select(&["10.0.0.1", "10.0.0.9", "10.1.2.3"][..]),
        select(&["10.96.0.10", "10.97.0.1"][..]),
        select(&[80u16, 8080][..]),
    )
        .prop_map(|(peer, src, dst, port)| {
            (
                peer.map(|(ns, sa)| SpiffeId::new("cluster.local", ns, sa).unwrap()),
                src.parse().unwrap(),
                dst.parse().unwrap(),
                port,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn l4_only_policies_decide_the_same_at_the_waypoint_and_at_ztunnel(
        specs in proptest::collection::vec(spec(), 1..4),
        conns in proptest::collection::vec(connection(), 8),
    ) {
        let t = translate(&objects(&specs), &MeshConfig::default());
        let ztunnel = PolicySet::new(
            t.authorizations
                .values()
                .map(|a| L4Policy::from_proto(a).expect("the controller's output converts")),
        );
        prop_assert_eq!(ztunnel.len(), specs.len());
        let waypoint = Policies::new(t.waypoint_authz.resources.iter().map(|(name, p)| {
            Arc::new(Policy::compile(name, p).expect("the controller's output compiles"))
        }));
        prop_assert_eq!(waypoint.len(), specs.len());
        for (peer, src, dst, port) in conns {
            let at_ztunnel = ztunnel
                .evaluate(
                    "app",
                    &[],
                    &Connection {
                        src_ip: src,
                        src_identity: peer.as_ref(),
                        dst_ip: dst,
                        dst_port: port,
                    },
                )
                .allowed;
            let req = Req {
                peer: peer.clone(),
                source_ip: src,
                destination_ip: dst,
                destination_port: port,
                ..Default::default()
            };
            let at_waypoint = waypoint.evaluate(SVC, &req.attrs()).allowed;
            prop_assert_eq!(
                at_ztunnel,
                at_waypoint,
                "specs {:#?}\nconnection {:?} {} {} {}",
                specs,
                peer,
                src,
                dst,
                port
            );
        }
    }
}
