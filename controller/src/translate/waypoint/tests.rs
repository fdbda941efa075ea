//! Table tests of every binding rule and of Gateway validation.

use super::*;

const MESH: &str = "{name: mesh, port: 15008, protocol: HBONE}";

fn gateway(
    ns: &str,
    name: &str,
    waypoint_for: Option<&str>,
    class: &str,
    listeners: &str,
) -> String {
    let labels = waypoint_for.map_or_else(String::new, |f| {
        format!("labels: {{{WAYPOINT_FOR_LABEL}: {f}}}, ")
    });
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: {name}, namespace: {ns}, {labels}}}\n\
         spec: {{gatewayClassName: {class}, listeners: [{listeners}]}}\n"
    )
}

/// Gateways: `app/svc` (default: service), `app/wl` (workload), `app/all`, `app/off` (none),
/// `other/shared` (all), `app/bad` (two listeners), `app/foreign` (another class), and the
/// Service of `app/all` (a VIP).
fn world() -> (Objects, Waypoints) {
    let mut y = String::new();
    y += &gateway("app", "svc", None, WAYPOINT_CLASS, MESH);
    y += &gateway("app", "wl", Some("workload"), WAYPOINT_CLASS, MESH);
    y += &gateway("app", "all", Some("all"), WAYPOINT_CLASS, MESH);
    y += &gateway("app", "off", Some("none"), WAYPOINT_CLASS, MESH);
    y += &gateway("other", "shared", Some("all"), WAYPOINT_CLASS, MESH);
    y += &gateway(
        "app",
        "bad",
        None,
        WAYPOINT_CLASS,
        &format!("{MESH}, {MESH}"),
    );
    y += &gateway("app", "foreign", None, "istio", MESH);
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: all, namespace: app}\n\
          spec: {clusterIP: 10.96.9.9, ports: [{port: 15008}]}\n";
    let objects = Objects::from_yaml(&y).unwrap();
    let waypoints = Waypoints::new(&objects, &MeshConfig::default());
    (objects, waypoints)
}

fn labels(pairs: &[(&str, &str)]) -> Option<Labels> {
    (!pairs.is_empty()).then(|| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    })
}

const UW: &str = USE_WAYPOINT_LABEL;
const UWN: &str = USE_WAYPOINT_NAMESPACE_LABEL;

/// (what the row checks, namespace labels, object labels, target, expected `ns/name`).
type Row<'a> = (
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a [(&'a str, &'a str)],
    Target,
    Option<&'a str>,
);

#[test]
fn binding_rules() {
    use Target::{Service as S, Workload as W};
    let (_, waypoints) = world();
    let rows: &[Row<'_>] = &[
        (
            "namespace label binds a Service",
            &[(UW, "svc")],
            &[],
            S,
            Some("app/svc"),
        ),
        (
            "object label binds",
            &[],
            &[(UW, "svc")],
            S,
            Some("app/svc"),
        ),
        (
            "object label wins over the namespace's",
            &[(UW, "svc")],
            &[(UW, "all")],
            S,
            Some("app/all"),
        ),
        (
            "`none` on the object opts out",
            &[(UW, "svc")],
            &[(UW, "none")],
            S,
            None,
        ),
        (
            "an empty value opts out",
            &[(UW, "svc")],
            &[(UW, "")],
            S,
            None,
        ),
        (
            "`none` on the namespace binds nothing",
            &[(UW, "none")],
            &[],
            S,
            None,
        ),
        ("no label: no waypoint", &[], &[], S, None),
        (
            "a missing Gateway binds nothing",
            &[],
            &[(UW, "ghost")],
            S,
            None,
        ),
        (
            "a rejected Gateway binds nothing",
            &[],
            &[(UW, "bad")],
            S,
            None,
        ),
        (
            "a Gateway of another class binds nothing",
            &[],
            &[(UW, "foreign")],
            S,
            None,
        ),
        (
            "waypoint-for default (service) takes Services",
            &[],
            &[(UW, "svc")],
            S,
            Some("app/svc"),
        ),
        (
            "waypoint-for default (service) refuses workloads",
            &[],
            &[(UW, "svc")],
            W,
            None,
        ),
        (
            "waypoint-for workload takes workloads",
            &[],
            &[(UW, "wl")],
            W,
            Some("app/wl"),
        ),
        (
            "waypoint-for workload refuses Services",
            &[],
            &[(UW, "wl")],
            S,
            None,
        ),
        (
            "waypoint-for all takes Services",
            &[],
            &[(UW, "all")],
            S,
            Some("app/all"),
        ),
        (
            "waypoint-for all takes workloads",
            &[],
            &[(UW, "all")],
            W,
            Some("app/all"),
        ),
        (
            "waypoint-for none takes nothing",
            &[],
            &[(UW, "off")],
            S,
            None,
        ),
        (
            "waypoint-for none takes no workload",
            &[],
            &[(UW, "off")],
            W,
            None,
        ),
        (
            "no fallback to the namespace when the object's waypoint refuses",
            &[(UW, "all")],
            &[(UW, "svc")],
            W,
            None,
        ),
        (
            "use-waypoint-namespace on the object",
            &[],
            &[(UW, "shared"), (UWN, "other")],
            S,
            Some("other/shared"),
        ),
        (
            "use-waypoint-namespace on the namespace",
            &[(UW, "shared"), (UWN, "other")],
            &[],
            W,
            Some("other/shared"),
        ),
        (
            "the namespace's use-waypoint-namespace does not apply to the object's name",
            &[(UWN, "other")],
            &[(UW, "shared")],
            S,
            None,
        ),
        (
            "the object's use-waypoint-namespace alone binds nothing",
            &[],
            &[(UWN, "other")],
            S,
            None,
        ),
        (
            "a waypoint itself is never bound",
            &[(UW, "all")],
            &[(GATEWAY_MANAGED_LABEL, WAYPOINT_MANAGED_VALUE)],
            S,
            None,
        ),
    ];
    for (what, ns, own, target, want) in rows {
        let got = waypoints
            .bind(labels(own).as_ref(), "app", labels(ns).as_ref(), *target)
            .map(|((ns, name), _)| format!("{ns}/{name}"));
        assert_eq!(got.as_deref(), *want, "{what}");
    }
}

#[test]
fn gateway_validation() {
    let bad_listeners: &[(&str, &str)] = &[
        ("", "it has 0"),
        (
            "{name: mesh, port: 15008, protocol: HTTP}",
            "protocol \"HTTP\"",
        ),
        ("{name: mesh, port: 15009, protocol: HBONE}", "port 15009"),
        ("{name: mesh, protocol: HBONE}", "port (none)"),
        (
            &format!("{MESH}, {{name: b, port: 80, protocol: HTTP}}"),
            "it has 2",
        ),
    ];
    for (listeners, says) in bad_listeners {
        let y = gateway("app", "wp", None, WAYPOINT_CLASS, listeners);
        let w = Waypoints::new(&Objects::from_yaml(&y).unwrap(), &MeshConfig::default());
        let reason = &w.rejected[&("app".to_owned(), "wp".to_owned())];
        assert!(
            reason.contains("exactly one listener"),
            "{listeners}: {reason}"
        );
        assert!(reason.contains(says), "{listeners}: {reason}");
        assert!(w.valid.is_empty());
    }
    let y = gateway("app", "wp", Some("services"), WAYPOINT_CLASS, MESH);
    let w = Waypoints::new(&Objects::from_yaml(&y).unwrap(), &MeshConfig::default());
    let reason = &w.rejected[&("app".to_owned(), "wp".to_owned())];
    assert!(
        reason.contains("istio.io/waypoint-for=\"services\""),
        "{reason}"
    );

    let (_, w) = world();
    assert_eq!(w.rejected.len(), 1, "{:?}", w.rejected);
    assert!(
        !w.valid
            .contains_key(&("app".to_owned(), "foreign".to_owned()))
    );
}

#[test]
fn the_address_is_the_services_vip_else_its_hostname() {
    let (_, w) = world();
    let all = &w.valid[&("app".to_owned(), "all".to_owned())];
    assert_eq!(all.vips, ["10.96.9.9".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        all.address.destination,
        Some(Destination::Address(NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 9, 9],
            length: None,
        }))
    );
    assert_eq!(all.address.hbone_mtls_port, 15008);
    let svc = &w.valid[&("app".to_owned(), "svc".to_owned())];
    assert!(svc.vips.is_empty());
    assert_eq!(
        svc.address.destination,
        Some(Destination::Hostname(NamespacedHostname {
            namespace: "app".to_owned(),
            hostname: "svc.app.svc.cluster.local".to_owned(),
        }))
    );
}

#[test]
fn protocol_selection() {
    use Protocol::*;
    let rows: &[(&str, &str, Protocol)] = &[
        ("", "http", Http),
        ("", "http-web", Http),
        ("", "HTTP-web", Http),
        ("", "http2", Http2),
        ("", "grpc", Grpc),
        ("", "grpc-api", Grpc),
        ("", "grpc-web", Http),
        ("", "grpc-web-x", Http),
        ("", "tcp-db", Tcp),
        ("", "tls", Tcp),
        ("", "https", Tcp),
        ("", "mongo", Tcp),
        ("", "web", Unspecified),
        ("", "", Unspecified),
        ("http", "tcp", Http),
        ("kubernetes.io/h2c", "", Http2),
        ("grpc", "http", Grpc),
        ("tcp", "http", Tcp),
        ("something", "http", Unspecified),
    ];
    for (app_protocol, name, want) in rows {
        assert_eq!(
            select_protocol(app_protocol, name),
            *want,
            "appProtocol {app_protocol:?} name {name:?}"
        );
    }
}
