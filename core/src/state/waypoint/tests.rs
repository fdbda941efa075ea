use super::*;
use crate::state::LocalConfig;

/// `echo` (VIP 10.96.0.10) is bound to waypoint `wp` (Service VIP 10.96.0.99, one pod
/// 10.0.0.9); `plain` (10.96.0.11) is not; pod `bound` (10.0.0.3) has a workload waypoint;
/// `ghost` (10.96.0.12) names a waypoint Service that does not exist; `sick` (10.96.0.13)
/// one whose only pod is unhealthy.
const CFG: &str = r#"
workloads:
- name: client
  namespace: app
  serviceAccount: client
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
- name: server
  namespace: app
  serviceAccount: server
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  services:
    "app/echo.app.svc.cluster.local": {80: 8080}
    "app/plain.app.svc.cluster.local": {80: 8080}
    "app/ghost.app.svc.cluster.local": {80: 8080}
    "app/sick.app.svc.cluster.local": {80: 8080}
- name: bound
  namespace: app
  serviceAccount: bound
  workloadIps: ["10.0.0.3"]
  protocol: HBONE
  waypoint: {destination: "/10.96.0.99", hboneMtlsPort: 15008}
  services:
    "app/plain.app.svc.cluster.local": {80: 8080}
- uid: wp-uid
  name: wp-0
  namespace: app
  serviceAccount: wp
  workloadIps: ["10.0.0.9"]
  protocol: HBONE
  services:
    "app/wp.app.svc.cluster.local": {15008: 15008}
- name: sick-wp-0
  namespace: app
  serviceAccount: sick-wp
  workloadIps: ["10.0.0.10"]
  protocol: HBONE
  status: Unhealthy
  services:
    "app/sick-wp.app.svc.cluster.local": {15008: 15008}
services:
- {name: echo, namespace: app, hostname: echo.app.svc.cluster.local, vips: ["/10.96.0.10"], ports: {80: 0},
   waypoint: {destination: "/10.96.0.99", hboneMtlsPort: 15008}}
- {name: plain, namespace: app, hostname: plain.app.svc.cluster.local, vips: ["/10.96.0.11"], ports: {80: 0}}
- {name: ghost, namespace: app, hostname: ghost.app.svc.cluster.local, vips: ["/10.96.0.12"], ports: {80: 0},
   waypoint: {destination: {namespace: app, hostname: nowhere.app.svc.cluster.local}}}
- {name: sick, namespace: app, hostname: sick.app.svc.cluster.local, vips: ["/10.96.0.13"], ports: {80: 0},
   waypoint: {destination: {namespace: app, hostname: sick-wp.app.svc.cluster.local}}}
- {name: wp, namespace: app, hostname: wp.app.svc.cluster.local, vips: ["/10.96.0.99"], ports: {15008: 15008}}
- {name: sick-wp, namespace: app, hostname: sick-wp.app.svc.cluster.local, vips: ["/10.96.0.98"], ports: {15008: 15008}}
"#;

fn state() -> State {
    State::from_local(LocalConfig::parse(CFG).unwrap()).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn service_traffic_goes_to_the_waypoint_with_the_original_vip() {
    let st = state();
    let client = st.find_workload("app", "client", "client").cloned();
    match st.route(addr("10.96.0.10:80"), client.as_deref(), |_| 0) {
        Resolved::Waypoint(w) => {
            assert_eq!(w.hbone, addr("10.0.0.9:15008"));
            assert_eq!(w.target, addr("10.96.0.10:80"));
            assert_eq!(w.workload.name, "wp-0");
            assert_eq!(
                w.identities,
                ["spiffe://cluster.local/ns/app/sa/wp"
                    .parse::<SpiffeId>()
                    .unwrap()]
            );
            assert_eq!(w.service.unwrap().name, "echo");
        }
        other => panic!("{other:?}"),
    }
    // A port the Service does not declare still goes to the waypoint (it decides).
    assert!(matches!(
        st.route(addr("10.96.0.10:81"), client.as_deref(), |_| 0),
        Resolved::Waypoint(_)
    ));
    // A Service without a waypoint: straight to a pod, even one with a workload waypoint
    // (that waypoint takes only traffic addressed to the pod).
    match st.route(addr("10.96.0.11:80"), client.as_deref(), |n| n - 1) {
        Resolved::Upstream(u) => assert_eq!(u.address, addr("10.0.0.3:8080")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn workload_traffic_goes_to_the_workloads_waypoint() {
    let st = state();
    match st.route(addr("10.0.0.3:8080"), None, |_| 0) {
        Resolved::Waypoint(w) => {
            assert_eq!(w.hbone, addr("10.0.0.9:15008"));
            assert_eq!(w.target, addr("10.0.0.3:8080"));
            assert!(w.service.is_none());
        }
        other => panic!("{other:?}"),
    }
    // A pod without a waypoint: direct.
    assert!(matches!(
        st.route(addr("10.0.0.2:8080"), None, |_| 0),
        Resolved::Upstream(_)
    ));
}

#[test]
fn the_waypoints_own_traffic_is_not_sent_back_to_it() {
    let st = state();
    let wp = st.find_workload("app", "wp-0", "wp").cloned();
    match st.route(addr("10.96.0.10:80"), wp.as_deref(), |_| 0) {
        Resolved::Upstream(u) => assert_eq!(u.address, addr("10.0.0.2:8080")),
        other => panic!("{other:?}"),
    }
    match st.route(addr("10.0.0.3:8080"), wp.as_deref(), |_| 0) {
        Resolved::Upstream(u) => assert_eq!(u.address, addr("10.0.0.3:8080")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unreachable_waypoint_refuses_never_bypasses() {
    let st = state();
    match st.route(addr("10.96.0.12:80"), None, |_| 0) {
        Resolved::WaypointNotReady {
            destination,
            waypoint,
            reason,
        } => {
            assert_eq!(destination, "app/ghost.app.svc.cluster.local");
            assert_eq!(waypoint, "app/nowhere.app.svc.cluster.local:15008");
            assert!(reason.contains("unknown"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    match st.route(addr("10.96.0.13:80"), None, |_| 0) {
        Resolved::WaypointNotReady { reason, .. } => {
            assert!(reason.contains("no healthy endpoint"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn from_waypoint_needs_the_waypoints_identity_and_address() {
    let st = state();
    let bound = st.find_workload("app", "bound", "bound").unwrap();
    let wp: SpiffeId = "spiffe://cluster.local/ns/app/sa/wp".parse().unwrap();
    let other: SpiffeId = "spiffe://cluster.local/ns/app/sa/client".parse().unwrap();
    assert!(st.from_waypoint(bound, &wp, "10.0.0.9".parse().unwrap()));
    assert!(!st.from_waypoint(bound, &other, "10.0.0.9".parse().unwrap()));
    assert!(!st.from_waypoint(bound, &wp, "10.0.0.1".parse().unwrap()));
    let server = st.find_workload("app", "server", "server").unwrap();
    assert!(!st.from_waypoint(server, &wp, "10.0.0.9".parse().unwrap()));
}
