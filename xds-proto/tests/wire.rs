//! Wire-compatibility tests.
//!
//! Every field is encoded on its own and the protobuf key on the wire
//! (`field_number << 3 | wire_type`) is checked against the numbers Istio and
//! Envoy use (istio/ztunnel @ `62d82653` `proto/workload.proto`,
//! `proto/authorization.proto`, `proto/zds.proto`, `proto/citadel.proto`, and Envoy's
//! discovery.proto / base.proto). A wrong field number here would make zmesh
//! silently unable to talk to istiod, the Istio CNI agent or ztunnel.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use prost::Message;

use xds_proto::envoy::config::core::v3 as envoy_core;
use xds_proto::envoy::service::discovery::v3 as disco;
use xds_proto::google::rpc;
use xds_proto::istio::security as sec;
use xds_proto::istio::v1::auth as ca;
use xds_proto::istio::workload as wl;
use xds_proto::istio::workload::zds;

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// Reads one base-128 varint, returning (value, rest).
fn read_varint(buf: &[u8]) -> (u64, &[u8]) {
    let mut value = 0u64;
    for (i, b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (value, &buf[i + 1..]);
        }
    }
    panic!("truncated or overlong varint in {buf:02x?}");
}

/// Walks the top level of an encoded message and returns every
/// (field number, wire type) in encounter order.
fn tags(mut buf: &[u8]) -> Vec<(u32, u8)> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (key, rest) = read_varint(buf);
        let field = u32::try_from(key >> 3).expect("field number fits u32");
        let wire_type = (key & 7) as u8;
        buf = match wire_type {
            VARINT => read_varint(rest).1,
            I64 => &rest[8..],
            LEN => {
                let (len, rest) = read_varint(rest);
                &rest[usize::try_from(len).unwrap()..]
            }
            I32 => &rest[4..],
            other => panic!("unexpected wire type {other}"),
        };
        out.push((field, wire_type));
    }
    out
}

/// Encodes `msg` and asserts it contains exactly one key, `(field, wire_type)`.
#[track_caller]
fn assert_single<M: Message + std::fmt::Debug>(msg: &M, field: u32, wire_type: u8) {
    let bytes = msg.encode_to_vec();
    assert_eq!(
        tags(&bytes),
        vec![(field, wire_type)],
        "{msg:?} encoded as {bytes:02x?}"
    );
}

/// Shorthand: `one!(Type { field: value } => number, wire_type)`, with the
/// remaining fields defaulted.
macro_rules! one {
    ($($ty:ident)::+ { $($body:tt)* } => $field:expr, $wt:expr) => {
        {
            // Single-field messages have nothing left to default.
            #[allow(clippy::needless_update)]
            let msg = $($ty)::+ {
                $($body)*
                ..Default::default()
            };
            assert_single(&msg, $field, $wt)
        }
    };
}

fn s(v: &str) -> String {
    v.to_string()
}

fn any_msg() -> prost_types::Any {
    prost_types::Any {
        type_url: s("type.googleapis.com/x"),
        value: vec![1],
    }
}

fn strukt() -> prost_types::Struct {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        s("k"),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(s("v"))),
        },
    );
    prost_types::Struct { fields }
}

fn gw() -> wl::GatewayAddress {
    wl::GatewayAddress {
        hbone_mtls_port: 15008,
        ..Default::default()
    }
}

fn ext() -> wl::Extension {
    wl::Extension {
        name: s("e"),
        config: None,
    }
}

fn field_numbers<M: Message>(msg: &M) -> BTreeSet<u32> {
    tags(&msg.encode_to_vec())
        .into_iter()
        .map(|(f, _)| f)
        .collect()
}

// ---------------------------------------------------------------- istio.workload

#[test]
fn address_oneof() {
    use wl::address::Type;
    one!(wl::Address { r#type: Some(Type::Workload(wl::Workload::default())), } => 1, LEN);
    one!(wl::Address { r#type: Some(Type::Service(wl::Service::default())), } => 2, LEN);
}

#[test]
fn workload_fields() {
    let ports = wl::PortList {
        ports: vec![wl::Port {
            service_port: 80,
            ..Default::default()
        }],
    };
    one!(wl::Workload { uid: s("u"), } => 20, LEN);
    one!(wl::Workload { name: s("n"), } => 1, LEN);
    one!(wl::Workload { namespace: s("ns"), } => 2, LEN);
    one!(wl::Workload { addresses: vec![vec![10, 0, 0, 1]], } => 3, LEN);
    one!(wl::Workload { hostname: s("h"), } => 21, LEN);
    one!(wl::Workload { network: s("net"), } => 4, LEN);
    one!(wl::Workload { tunnel_protocol: wl::TunnelProtocol::Hbone as i32, } => 5, VARINT);
    one!(wl::Workload { trust_domain: s("td"), } => 6, LEN);
    one!(wl::Workload { service_account: s("sa"), } => 7, LEN);
    one!(wl::Workload { waypoint: Some(gw()), } => 8, LEN);
    one!(wl::Workload { network_gateway: Some(gw()), } => 19, LEN);
    one!(wl::Workload { node: s("node"), } => 9, LEN);
    one!(wl::Workload { canonical_name: s("cn"), } => 10, LEN);
    one!(wl::Workload { canonical_revision: s("cr"), } => 11, LEN);
    one!(wl::Workload { workload_type: wl::WorkloadType::Pod as i32, } => 12, VARINT);
    one!(wl::Workload { workload_name: s("wn"), } => 13, LEN);
    one!(wl::Workload { native_tunnel: true, } => 14, VARINT);
    one!(wl::Workload { application_tunnel: Some(wl::ApplicationTunnel::default()), } => 23, LEN);
    one!(wl::Workload { services: HashMap::from([(s("ns/h"), ports)]), } => 22, LEN);
    one!(wl::Workload { authorization_policies: vec![s("ns/p")], } => 16, LEN);
    one!(wl::Workload { status: wl::WorkloadStatus::Unhealthy as i32, } => 17, VARINT);
    one!(wl::Workload { cluster_id: s("c"), } => 18, LEN);
    one!(wl::Workload { locality: Some(wl::Locality::default()), } => 24, LEN);
    one!(wl::Workload { network_mode: wl::NetworkMode::HostNetwork as i32, } => 25, VARINT);
    one!(wl::Workload { extensions: vec![ext()], } => 26, LEN);
    // A wrapper type: present even when the wrapped value is 0.
    one!(wl::Workload { capacity: Some(0), } => 27, LEN);
}

#[test]
fn workload_all_fields_cover_the_documented_numbers() {
    let w = wl::Workload {
        uid: s("u"),
        name: s("n"),
        namespace: s("ns"),
        addresses: vec![vec![10, 0, 0, 1]],
        hostname: s("h"),
        network: s("net"),
        tunnel_protocol: 1,
        trust_domain: s("td"),
        service_account: s("sa"),
        waypoint: Some(gw()),
        network_gateway: Some(gw()),
        node: s("node"),
        canonical_name: s("cn"),
        canonical_revision: s("cr"),
        workload_type: 2,
        workload_name: s("wn"),
        native_tunnel: true,
        application_tunnel: Some(wl::ApplicationTunnel::default()),
        services: HashMap::from([(s("ns/h"), wl::PortList::default())]),
        authorization_policies: vec![s("p")],
        status: 1,
        cluster_id: s("c"),
        locality: Some(wl::Locality::default()),
        network_mode: 1,
        extensions: vec![ext()],
        capacity: Some(3),
    };
    let expected: BTreeSet<u32> = (1..=27).filter(|n| *n != 15).collect();
    assert_eq!(
        field_numbers(&w),
        expected,
        "15 is reserved, 1..=27 otherwise"
    );
}

#[test]
fn service_fields() {
    one!(wl::Service { name: s("n"), } => 1, LEN);
    one!(wl::Service { namespace: s("ns"), } => 2, LEN);
    one!(wl::Service { hostname: s("h"), } => 3, LEN);
    one!(wl::Service { addresses: vec![wl::NetworkAddress::default()], } => 4, LEN);
    one!(wl::Service { ports: vec![wl::Port::default()], } => 5, LEN);
    one!(wl::Service { subject_alt_names: vec![s("san")], } => 6, LEN);
    one!(wl::Service { waypoint: Some(gw()), } => 7, LEN);
    one!(wl::Service { load_balancing: Some(wl::LoadBalancing::default()), } => 8, LEN);
    one!(wl::Service { ip_families: wl::IpFamilies::Dual as i32, } => 9, VARINT);
    one!(wl::Service { extensions: vec![ext()], } => 10, LEN);
    one!(wl::Service { canonical: true, } => 11, VARINT);
    one!(wl::Service { ingress_use_waypoint: true, } => 12, VARINT);
    one!(wl::Service { weighted_waypoints: vec![wl::WeightedWaypoint::default()], } => 13, LEN);
    one!(wl::Service { visibility: wl::Visibility::Namespace as i32, } => 14, VARINT);
}

#[test]
fn port_and_port_list_fields() {
    one!(wl::Port { service_port: 80, } => 1, VARINT);
    one!(wl::Port { target_port: 8080, } => 2, VARINT);
    one!(wl::Port { app_protocol: wl::AppProtocol::Http2 as i32, } => 3, VARINT);
    one!(wl::PortList { ports: vec![wl::Port::default()], } => 1, LEN);
}

#[test]
fn gateway_network_and_hostname_fields() {
    use wl::gateway_address::Destination;
    one!(wl::GatewayAddress {
        destination: Some(Destination::Hostname(wl::NamespacedHostname::default())),
    } => 1, LEN);
    one!(wl::GatewayAddress {
        destination: Some(Destination::Address(wl::NetworkAddress::default())),
    } => 2, LEN);
    one!(wl::GatewayAddress { hbone_mtls_port: 15008, } => 3, VARINT);

    one!(wl::NetworkAddress { network: s("net"), } => 1, LEN);
    one!(wl::NetworkAddress { address: vec![10, 0, 0, 1], } => 2, LEN);
    // proto3 `optional`: explicit presence, so Some(0) is still encoded.
    one!(wl::NetworkAddress { length: Some(0), } => 3, VARINT);

    one!(wl::NamespacedHostname { namespace: s("ns"), } => 1, LEN);
    one!(wl::NamespacedHostname { hostname: s("h"), } => 2, LEN);
}

#[test]
fn load_balancing_and_small_messages() {
    use wl::load_balancing::{DnsConnectStrategy, HealthPolicy, Mode, Scope};
    // Repeated enums are packed in proto3.
    one!(wl::LoadBalancing { routing_preference: vec![Scope::Node as i32, Scope::Zone as i32], } => 1, LEN);
    one!(wl::LoadBalancing { mode: Mode::Failover as i32, } => 2, VARINT);
    one!(wl::LoadBalancing { health_policy: HealthPolicy::AllowAll as i32, } => 3, VARINT);
    one!(wl::LoadBalancing { dns_connect_strategy: DnsConnectStrategy::FirstHealthyRace as i32, } => 4, VARINT);

    one!(wl::ApplicationTunnel { protocol: wl::application_tunnel::Protocol::Proxy as i32, } => 1, VARINT);
    one!(wl::ApplicationTunnel { port: 15088, } => 2, VARINT);

    one!(wl::WeightedWaypoint { destination: Some(gw()), } => 1, LEN);
    one!(wl::WeightedWaypoint { weight: 10, } => 2, VARINT);

    one!(wl::Locality { region: s("r"), } => 1, LEN);
    one!(wl::Locality { zone: s("z"), } => 2, LEN);
    one!(wl::Locality { subzone: s("sz"), } => 3, LEN);

    one!(wl::Extension { name: s("e"), } => 1, LEN);
    one!(wl::Extension { config: Some(any_msg()), } => 2, LEN);
}

#[test]
fn workload_enum_values() {
    use wl::load_balancing::{HealthPolicy, Mode, Scope};
    assert_eq!(wl::TunnelProtocol::None as i32, 0);
    assert_eq!(wl::TunnelProtocol::Hbone as i32, 1);
    assert_eq!(wl::TunnelProtocol::LegacyIstioMtls as i32, 2);
    assert_eq!(wl::WorkloadStatus::Healthy as i32, 0);
    assert_eq!(wl::WorkloadStatus::Unhealthy as i32, 1);
    assert_eq!(wl::WorkloadType::Deployment as i32, 0);
    assert_eq!(wl::WorkloadType::Cronjob as i32, 1);
    assert_eq!(wl::WorkloadType::Pod as i32, 2);
    assert_eq!(wl::WorkloadType::Job as i32, 3);
    assert_eq!(wl::NetworkMode::Standard as i32, 0);
    assert_eq!(wl::NetworkMode::HostNetwork as i32, 1);
    assert_eq!(wl::IpFamilies::Automatic as i32, 0);
    assert_eq!(wl::IpFamilies::Ipv4Only as i32, 1);
    assert_eq!(wl::IpFamilies::Ipv6Only as i32, 2);
    assert_eq!(wl::IpFamilies::Dual as i32, 3);
    assert_eq!(wl::AppProtocol::Unknown as i32, 0);
    assert_eq!(wl::AppProtocol::Http11 as i32, 1);
    assert_eq!(wl::AppProtocol::Http2 as i32, 2);
    assert_eq!(wl::AppProtocol::Grpc as i32, 3);
    assert_eq!(wl::AppProtocol::Tcp as i32, 4);
    assert_eq!(wl::AppProtocol::Tls as i32, 5);
    assert_eq!(wl::Visibility::Public as i32, 0);
    assert_eq!(wl::Visibility::Namespace as i32, 1);
    assert_eq!(Scope::Region as i32, 1);
    assert_eq!(Scope::Zone as i32, 2);
    assert_eq!(Scope::Subzone as i32, 3);
    assert_eq!(Scope::Node as i32, 4);
    assert_eq!(Scope::Cluster as i32, 5);
    assert_eq!(Scope::Network as i32, 6);
    assert_eq!(Mode::Strict as i32, 1);
    assert_eq!(Mode::Failover as i32, 2);
    assert_eq!(Mode::Passthrough as i32, 3);
    assert_eq!(HealthPolicy::OnlyHealthy as i32, 0);
    assert_eq!(HealthPolicy::AllowAll as i32, 1);
    assert_eq!(wl::application_tunnel::Protocol::None as i32, 0);
    assert_eq!(wl::application_tunnel::Protocol::Proxy as i32, 1);
}

// ---------------------------------------------------------------- istio.security

#[test]
fn authorization_fields() {
    one!(sec::Authorization { name: s("p"), } => 1, LEN);
    one!(sec::Authorization { namespace: s("ns"), } => 2, LEN);
    one!(sec::Authorization { scope: sec::Scope::WorkloadSelector as i32, } => 3, VARINT);
    one!(sec::Authorization { action: sec::Action::Deny as i32, } => 4, VARINT);
    one!(sec::Authorization { rules: vec![sec::Rule::default()], } => 5, LEN);
    one!(sec::Authorization { dry_run: true, } => 6, VARINT);
    one!(sec::Authorization { extensions: vec![ext()], } => 7, LEN);

    one!(sec::Rule { clauses: vec![sec::Clause::default()], } => 1, LEN);
    one!(sec::Clause { matches: vec![sec::Match::default()], } => 2, LEN);
}

#[test]
fn match_fields() {
    let sm = || vec![sec::StringMatch::default()];
    let ip = || vec![sec::Address::default()];
    let sa = || vec![sec::ServiceAccountMatch::default()];
    one!(sec::Match { namespaces: sm(), } => 1, LEN);
    one!(sec::Match { not_namespaces: sm(), } => 2, LEN);
    one!(sec::Match { principals: sm(), } => 3, LEN);
    one!(sec::Match { not_principals: sm(), } => 4, LEN);
    one!(sec::Match { source_ips: ip(), } => 5, LEN);
    one!(sec::Match { not_source_ips: ip(), } => 6, LEN);
    one!(sec::Match { destination_ips: ip(), } => 7, LEN);
    one!(sec::Match { not_destination_ips: ip(), } => 8, LEN);
    // Packed repeated uint32.
    one!(sec::Match { destination_ports: vec![80, 443], } => 9, LEN);
    one!(sec::Match { not_destination_ports: vec![22], } => 10, LEN);
    one!(sec::Match { service_accounts: sa(), } => 11, LEN);
    one!(sec::Match { not_service_accounts: sa(), } => 12, LEN);
    one!(sec::Match { extensions: vec![ext()], } => 13, LEN);
}

#[test]
fn security_leaf_messages() {
    use sec::string_match::MatchType;
    one!(sec::Address { address: vec![10, 0, 0, 0], } => 1, LEN);
    one!(sec::Address { length: 8, } => 2, VARINT);

    one!(sec::StringMatch { match_type: Some(MatchType::Exact(s("a"))), } => 1, LEN);
    one!(sec::StringMatch { match_type: Some(MatchType::Prefix(s("a"))), } => 2, LEN);
    one!(sec::StringMatch { match_type: Some(MatchType::Suffix(s("a"))), } => 3, LEN);
    one!(sec::StringMatch { match_type: Some(MatchType::Presence(())), } => 4, LEN);
    // Oneof members are encoded even when empty/default.
    one!(sec::StringMatch { match_type: Some(MatchType::Exact(String::new())), } => 1, LEN);

    one!(sec::ServiceAccountMatch { namespace: s("ns"), } => 1, LEN);
    one!(sec::ServiceAccountMatch { service_account: s("sa"), } => 2, LEN);

    assert_eq!(sec::Scope::Global as i32, 0);
    assert_eq!(sec::Scope::Namespace as i32, 1);
    assert_eq!(sec::Scope::WorkloadSelector as i32, 2);
    assert_eq!(sec::Action::Allow as i32, 0);
    assert_eq!(sec::Action::Deny as i32, 1);
}

// ---------------------------------------------------------------- istio.workload.zds

#[test]
fn zds_fields() {
    use zds::workload_request::Payload as Req;
    use zds::workload_response::Payload as Resp;

    one!(zds::ZdsHello { version: zds::Version::V1 as i32, } => 1, VARINT);
    assert_eq!(zds::Version::NotUsed as i32, 0);
    assert_eq!(zds::Version::V1 as i32, 1);

    one!(zds::WorkloadInfo { name: s("p"), } => 1, LEN);
    one!(zds::WorkloadInfo { namespace: s("ns"), } => 2, LEN);
    one!(zds::WorkloadInfo { service_account: s("sa"), } => 3, LEN);

    one!(zds::AddWorkload { uid: s("u"), } => 1, LEN);
    one!(zds::AddWorkload { workload_info: Some(zds::WorkloadInfo::default()), } => 2, LEN);
    one!(zds::KeepWorkload { uid: s("u"), } => 1, LEN);
    one!(zds::DelWorkload { uid: s("u"), } => 2, LEN);
    assert!(zds::SnapshotSent {}.encode_to_vec().is_empty());
    one!(zds::Ack { error: s("boom"), } => 1, LEN);

    one!(zds::WorkloadRequest { payload: Some(Req::Add(zds::AddWorkload::default())), } => 1, LEN);
    one!(zds::WorkloadRequest { payload: Some(Req::Del(zds::DelWorkload::default())), } => 2, LEN);
    one!(zds::WorkloadRequest { payload: Some(Req::SnapshotSent(zds::SnapshotSent {})), } => 3, LEN);
    one!(zds::WorkloadRequest { payload: Some(Req::Keep(zds::KeepWorkload::default())), } => 5, LEN);
    one!(zds::WorkloadResponse { payload: Some(Resp::Ack(zds::Ack::default())), } => 1, LEN);
}

#[test]
fn zds_exact_bytes() {
    use zds::workload_request::Payload as Req;
    // SnapshotSent: key (3 << 3 | 2) = 0x1a, length 0.
    let snap = zds::WorkloadRequest {
        payload: Some(Req::SnapshotSent(zds::SnapshotSent {})),
    };
    assert_eq!(snap.encode_to_vec(), [0x1a, 0x00]);
    // An empty ACK is still a present oneof member: key 0x0a, length 0.
    let ack = zds::WorkloadResponse {
        payload: Some(zds::workload_response::Payload::Ack(zds::Ack::default())),
    };
    assert_eq!(ack.encode_to_vec(), [0x0a, 0x00]);
    // Del { uid: "x" }: outer key 0x12, inner key (2 << 3 | 2) = 0x12.
    let del = zds::WorkloadRequest {
        payload: Some(Req::Del(zds::DelWorkload { uid: s("x") })),
    };
    assert_eq!(del.encode_to_vec(), [0x12, 0x03, 0x12, 0x01, b'x']);
    // Hello V1: key 0x08, value 1.
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
    };
    assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);
}

// ---------------------------------------------------------------- istio.v1.auth

#[test]
fn ca_fields() {
    one!(ca::IstioCertificateRequest { csr: s("-----BEGIN"), } => 1, LEN);
    one!(ca::IstioCertificateRequest { validity_duration: 86400, } => 3, VARINT);
    one!(ca::IstioCertificateRequest { metadata: Some(strukt()), } => 4, LEN);
    one!(ca::IstioCertificateResponse { cert_chain: vec![s("leaf")], } => 1, LEN);
    one!(ca::IstioCertificateResponse { root_cert: Some(ca::Roots::default()), } => 2, LEN);
    one!(ca::Roots { ca_cert: vec![s("root")], } => 1, LEN);

    let resp = ca::IstioCertificateResponse {
        cert_chain: vec![s("a"), s("b")],
        ..Default::default()
    };
    assert_eq!(tags(&resp.encode_to_vec()), vec![(1, LEN), (1, LEN)]);
}

// ---------------------------------------------------------------- envoy / google.rpc

#[test]
fn node_fields() {
    use envoy_core::node::UserAgentVersionType;
    one!(envoy_core::Node { id: s("ztunnel~1.1.1.1~p.ns~ns.svc.cluster.local"), } => 1, LEN);
    one!(envoy_core::Node { cluster: s("c"), } => 2, LEN);
    one!(envoy_core::Node { metadata: Some(strukt()), } => 3, LEN);
    one!(envoy_core::Node { locality: Some(envoy_core::Locality::default()), } => 4, LEN);
    one!(envoy_core::Node { user_agent_name: s("zmesh"), } => 6, LEN);
    one!(envoy_core::Node {
        user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(s("0.1"))),
    } => 7, LEN);
    one!(envoy_core::Node { client_features: vec![s("f")], } => 10, LEN);

    one!(envoy_core::Locality { region: s("r"), } => 1, LEN);
    one!(envoy_core::Locality { zone: s("z"), } => 2, LEN);
    one!(envoy_core::Locality { sub_zone: s("sz"), } => 3, LEN);
    one!(envoy_core::ControlPlane { identifier: s("istiod-1"), } => 1, LEN);
}

#[test]
fn node_skips_fields_we_do_not_model() {
    // Field 12 (dynamic_parameters) and 9 (extensions) exist upstream but not
    // here; decoding must skip them and keep the rest.
    let mut bytes = envoy_core::Node {
        id: s("n"),
        ..Default::default()
    }
    .encode_to_vec();
    bytes.extend_from_slice(&[0x62, 0x02, 0x0a, 0x00]); // 12, LEN
    bytes.extend_from_slice(&[0x4a, 0x00]); // 9, LEN
    let node = envoy_core::Node::decode(&bytes[..]).unwrap();
    assert_eq!(node.id, "n");
}

#[test]
fn delta_discovery_request_fields() {
    one!(disco::DeltaDiscoveryRequest { node: Some(envoy_core::Node::default()), } => 1, LEN);
    one!(disco::DeltaDiscoveryRequest { type_url: s(xds_proto::ADDRESS_TYPE_URL), } => 2, LEN);
    one!(disco::DeltaDiscoveryRequest { resource_names_subscribe: vec![s("*")], } => 3, LEN);
    one!(disco::DeltaDiscoveryRequest { resource_names_unsubscribe: vec![s("*")], } => 4, LEN);
    one!(disco::DeltaDiscoveryRequest {
        initial_resource_versions: HashMap::from([(s("a"), s("1"))]),
    } => 5, LEN);
    one!(disco::DeltaDiscoveryRequest { response_nonce: s("n"), } => 6, LEN);
    one!(disco::DeltaDiscoveryRequest { error_detail: Some(rpc::Status::default()), } => 7, LEN);
}

#[test]
fn delta_discovery_response_fields() {
    one!(disco::DeltaDiscoveryResponse { system_version_info: s("v"), } => 1, LEN);
    one!(disco::DeltaDiscoveryResponse { resources: vec![disco::Resource::default()], } => 2, LEN);
    one!(disco::DeltaDiscoveryResponse { type_url: s(xds_proto::AUTHORIZATION_TYPE_URL), } => 4, LEN);
    one!(disco::DeltaDiscoveryResponse { nonce: s("n"), } => 5, LEN);
    one!(disco::DeltaDiscoveryResponse { removed_resources: vec![s("r")], } => 6, LEN);
    one!(disco::DeltaDiscoveryResponse { control_plane: Some(envoy_core::ControlPlane::default()), } => 7, LEN);
}

#[test]
fn resource_fields() {
    one!(disco::Resource { version: s("1"), } => 1, LEN);
    one!(disco::Resource { resource: Some(any_msg()), } => 2, LEN);
    one!(disco::Resource { name: s("n"), } => 3, LEN);
    one!(disco::Resource { aliases: vec![s("/10.0.0.1")], } => 4, LEN);
    one!(disco::Resource { ttl: Some(prost_types::Duration { seconds: 1, nanos: 0 }), } => 6, LEN);
    one!(disco::Resource { cache_control: Some(disco::resource::CacheControl::default()), } => 7, LEN);
    one!(disco::resource::CacheControl { do_not_cache: true, } => 1, VARINT);
}

#[test]
fn sotw_discovery_fields() {
    one!(disco::DiscoveryRequest { version_info: s("v"), } => 1, LEN);
    one!(disco::DiscoveryRequest { node: Some(envoy_core::Node::default()), } => 2, LEN);
    one!(disco::DiscoveryRequest { resource_names: vec![s("r")], } => 3, LEN);
    one!(disco::DiscoveryRequest { type_url: s("t"), } => 4, LEN);
    one!(disco::DiscoveryRequest { response_nonce: s("n"), } => 5, LEN);
    one!(disco::DiscoveryRequest { error_detail: Some(rpc::Status::default()), } => 6, LEN);

    one!(disco::DiscoveryResponse { version_info: s("v"), } => 1, LEN);
    one!(disco::DiscoveryResponse { resources: vec![any_msg()], } => 2, LEN);
    one!(disco::DiscoveryResponse { canary: true, } => 3, VARINT);
    one!(disco::DiscoveryResponse { type_url: s("t"), } => 4, LEN);
    one!(disco::DiscoveryResponse { nonce: s("n"), } => 5, LEN);
    one!(disco::DiscoveryResponse { control_plane: Some(envoy_core::ControlPlane::default()), } => 6, LEN);
}

#[test]
fn rpc_status_fields() {
    one!(rpc::Status { code: 3, } => 1, VARINT);
    one!(rpc::Status { message: s("bad"), } => 2, LEN);
    one!(rpc::Status { details: vec![any_msg()], } => 3, LEN);
}

// ---------------------------------------------------------------- services & constants

#[test]
fn type_urls() {
    assert_eq!(
        xds_proto::ADDRESS_TYPE_URL,
        "type.googleapis.com/istio.workload.Address"
    );
    assert_eq!(
        xds_proto::AUTHORIZATION_TYPE_URL,
        "type.googleapis.com/istio.security.Authorization"
    );
}

// The services are generated with the `grpc` feature (on in any workspace build: ztunnel and
// the controller enable it).
#[cfg(feature = "grpc")]
#[test]
fn grpc_service_names_and_paths() {
    assert_eq!(
        disco::aggregated_discovery_service_server::SERVICE_NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
    assert_eq!(
        ca::istio_certificate_service_server::SERVICE_NAME,
        "istio.v1.auth.IstioCertificateService"
    );
    // The method paths are only visible in the generated source.
    let ads = include_str!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
    assert!(ads.contains(
        "\"/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources\""
    ));
    assert!(ads.contains(
        "\"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources\""
    ));
    let ca_src = include_str!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
    assert!(ca_src.contains("\"/istio.v1.auth.IstioCertificateService/CreateCertificate\""));
}

// ---------------------------------------------------------------- decoding

/// A hand-assembled `Address { workload: Workload { addresses: [10.0.0.5],
/// tunnel_protocol: HBONE, uid: "uid1", services: {"ns/h": [80 -> 8080]} } }`.
const HAND_ASSEMBLED_ADDRESS: &[u8] = &[
    0x0a, 33, // Address.workload (1, LEN), 33 bytes
    0x1a, 0x04, 10, 0, 0, 5, // Workload.addresses (3, LEN)
    0x28, 0x01, // Workload.tunnel_protocol (5, VARINT) = HBONE
    0xa2, 0x01, 0x04, b'u', b'i', b'd', b'1', // Workload.uid (20, LEN)
    0xb2, 0x01, 0x0f, // Workload.services (22, LEN), one map entry of 15 bytes
    0x0a, 0x04, b'n', b's', b'/', b'h', // entry key (1, LEN)
    0x12, 0x07, // entry value (2, LEN): PortList
    0x0a, 0x05, // PortList.ports (1, LEN)
    0x08, 0x50, // Port.service_port (1) = 80
    0x10, 0x90, 0x3f, // Port.target_port (2) = 8080
];

#[test]
fn decode_hand_assembled_address() {
    let addr = wl::Address::decode(HAND_ASSEMBLED_ADDRESS).expect("valid bytes");
    let Some(wl::address::Type::Workload(w)) = addr.r#type.clone() else {
        panic!("expected a workload, got {addr:?}");
    };
    assert_eq!(w.uid, "uid1");
    assert_eq!(w.addresses, vec![vec![10, 0, 0, 5]]);
    assert_eq!(w.tunnel_protocol(), wl::TunnelProtocol::Hbone);
    let ports = &w.services["ns/h"].ports;
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));
    assert_eq!(ports[0].app_protocol(), wl::AppProtocol::Unknown);
    assert!(w.name.is_empty() && w.waypoint.is_none() && w.capacity.is_none());

    // prost writes fields in ascending field-number order, which is how the
    // bytes above were assembled, so re-encoding is byte-identical.
    assert_eq!(addr.encode_to_vec(), HAND_ASSEMBLED_ADDRESS);
}

#[test]
fn decode_hand_assembled_authorization() {
    // Authorization { name: "p", action: DENY, rules: [{ clauses: [{ matches:
    // [{ destination_ports: [22] }] }] }] }
    let bytes: &[u8] = &[
        0x0a, 0x01, b'p', // name (1)
        0x20, 0x01, // action (4) = DENY
        0x2a, 0x09, // rules (5), 9 bytes: Rule
        0x0a, 0x07, // Rule.clauses (1), 7 bytes: Clause
        0x12, 0x05, // Clause.matches (2), 5 bytes: Match
        0x4a, 0x01, 22, // Match.destination_ports (9, LEN, packed) = [22]
        0x50, 23, // Match.not_destination_ports (10, VARINT): unpacked form = [23]
    ];
    let a = sec::Authorization::decode(bytes).expect("valid bytes");
    assert_eq!(a.name, "p");
    assert_eq!(a.action(), sec::Action::Deny);
    let m = &a.rules[0].clauses[0].matches[0];
    assert_eq!(m.destination_ports, vec![22]);
    // Parsers must accept the unpacked form of packed repeated scalars too.
    assert_eq!(m.not_destination_ports, vec![23]);
}

#[test]
fn tag_decoder_sanity() {
    // Multi-byte keys (field >= 16) and all four wire types.
    let bytes = [
        0xa2, 0x01, 0x00, // 20, LEN, empty
        0x08, 0x96, 0x01, // 1, VARINT 150
        0x11, 0, 0, 0, 0, 0, 0, 0, 0, // 2, I64
        0x1d, 0, 0, 0, 0, // 3, I32
    ];
    assert_eq!(
        tags(&bytes),
        vec![(20, LEN), (1, VARINT), (2, I64), (3, I32)]
    );
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = wl::Workload::decode(&bytes[..]);
        let _ = wl::Address::decode(&bytes[..]);
        let _ = sec::Authorization::decode(&bytes[..]);
        let _ = zds::WorkloadRequest::decode(&bytes[..]);
        let _ = disco::DeltaDiscoveryResponse::decode(&bytes[..]);
    }

    #[test]
    fn decoding_mutated_valid_bytes_never_panics(
        pos in 0usize..HAND_ASSEMBLED_ADDRESS.len(),
        byte in any::<u8>(),
        cut in 0usize..=HAND_ASSEMBLED_ADDRESS.len(),
    ) {
        let mut bytes = HAND_ASSEMBLED_ADDRESS.to_vec();
        bytes[pos] = byte;
        bytes.truncate(cut);
        let _ = wl::Address::decode(&bytes[..]);
        let _ = wl::Workload::decode(bytes.get(2..).unwrap_or_default());
        let _ = sec::Authorization::decode(&bytes[..]);
        let _ = zds::WorkloadRequest::decode(&bytes[..]);
    }

    #[test]
    fn workload_round_trips(
        uid in "[a-z0-9/.-]{0,40}",
        addrs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 4), 0..3),
        port in any::<u32>(),
        capacity in proptest::option::of(any::<u32>()),
    ) {
        let w = wl::Workload {
            uid,
            addresses: addrs,
            services: HashMap::from([(s("ns/h"), wl::PortList {
                ports: vec![wl::Port { service_port: port, ..Default::default() }],
            })]),
            capacity,
            ..Default::default()
        };
        let back = wl::Workload::decode(&w.encode_to_vec()[..]).unwrap();
        prop_assert_eq!(back, w);
    }
}
