//! Unit tests: YAML errors name their document, and translation never panics.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;
use xds_proto::istio::workload::TunnelProtocol;

use super::*;

#[test]
fn bad_yaml_names_the_document() {
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n";
    let err = Objects::from_yaml(text).unwrap_err();
    assert!(
        matches!(err, TranslateError::Yaml { index: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("document 1"), "{err}");
}

#[test]
fn schema_error_names_document_and_kind() {
    let text = "apiVersion: v1\nkind: ConfigMap\n---\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n";
    let err = Objects::from_yaml(text).unwrap_err();
    assert!(
        matches!(&err, TranslateError::Object { index: 2, kind, .. } if kind == "Pod"),
        "{err}"
    );
    assert!(err.to_string().contains("document 2 (kind Pod)"), "{err}");
}

#[test]
fn document_without_kind_is_an_error() {
    let err = Objects::from_yaml("apiVersion: v1\nmetadata: {}\n").unwrap_err();
    assert!(
        matches!(err, TranslateError::MissingKind { index: 0 }),
        "{err}"
    );
}

#[test]
fn unknown_kinds_and_foreign_api_versions_are_skipped() {
    let text = "apiVersion: v1\nkind: ConfigMap\ndata: {a: b}\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nspec: {template: 1}\n";
    let objects = Objects::from_yaml(text).unwrap();
    assert!(objects.services.is_empty());
}

#[test]
fn list_items_and_default_namespace() {
    let text = "\
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: s}
    spec: {selector: {app: a}, clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: web}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: p, namespace: default, labels: {app: a}}
    spec: {containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
    status: {podIP: 10.0.0.1}
";
    let objects = Objects::from_yaml(text).unwrap();
    let out = translate(&objects, &MeshConfig::default());
    let key = "default/s.default.svc.cluster.local";
    assert!(out.services.contains_key(key));
    let pod = &out.workloads["Kubernetes//Pod/default/p"];
    assert_eq!(pod.services[key].ports[0].target_port, 8080);
    assert_eq!(pod.tunnel_protocol, TunnelProtocol::None as i32);
}

fn labels_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    let keys = prop::sample::select(vec![
        "app",
        "version",
        "app.kubernetes.io/name",
        "service.istio.io/canonical-name",
        DATAPLANE_MODE_LABEL,
        USE_WAYPOINT_LABEL,
        USE_WAYPOINT_NAMESPACE_LABEL,
    ]);
    let values = prop::sample::select(vec!["", "ambient", "none", "a", "wp", "x.y"]);
    prop::collection::btree_map(
        keys.prop_map(String::from),
        values.prop_map(String::from),
        0..5,
    )
}

fn target_strategy() -> impl Strategy<Value = Option<IntOrString>> {
    prop_oneof![
        Just(None),
        any::<i32>().prop_map(|p| Some(IntOrString::Int(p))),
        prop::sample::select(vec!["http", "grpc", ""])
            .prop_map(|n| Some(IntOrString::String(n.to_owned()))),
    ]
}

fn meta(name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some("ns".to_owned()),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

proptest! {
    #[test]
    fn translate_never_panics(
        ns_labels in labels_strategy(),
        pod_labels in prop::collection::vec(labels_strategy(), 0..4),
        selector in labels_strategy(),
        svc_labels in labels_strategy(),
        ports in prop::collection::vec((any::<i32>(), target_strategy()), 0..4),
        container_ports in prop::collection::vec((any::<i32>(), prop::sample::select(vec!["http", "grpc"])), 0..3),
        ips in prop::collection::vec(prop::sample::select(vec!["10.0.0.1", "fd00::1", "bogus", ""]), 0..3),
        cluster_ips in prop::collection::vec(prop::sample::select(vec!["10.96.0.1", "None", "", "::1"]), 0..3),
    ) {
        let pods: Vec<Pod> = pod_labels.into_iter().enumerate().map(|(i, labels)| Pod {
            metadata: meta(&format!("p{i}"), labels),
            spec: Some(PodSpec {
                containers: vec![Container {
                    ports: Some(container_ports.iter().map(|(p, n)| ContainerPort {
                        container_port: *p,
                        name: Some((*n).to_owned()),
                        ..ContainerPort::default()
                    }).collect()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: (*ip).to_owned() }).collect()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: "True".to_owned(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }).collect();
        let mut objects = Objects::default();
        objects.upsert(KubeObject::Namespace(Namespace { metadata: meta("ns", ns_labels), ..Namespace::default() }));
        for pod in pods {
            objects.upsert(KubeObject::Pod(pod));
        }
        objects.upsert(KubeObject::Service(Service {
                metadata: meta("svc", svc_labels),
                spec: Some(ServiceSpec {
                    selector: Some(selector),
                    cluster_ips: Some(cluster_ips.iter().map(|s| (*s).to_owned()).collect()),
                    ports: Some(ports.iter().map(|(p, t)| ServicePort {
                        port: *p,
                        target_port: t.clone(),
                        ..ServicePort::default()
                    }).collect()),
                    ..ServiceSpec::default()
                }),
                ..Service::default()
            }));
        objects.upsert(KubeObject::EndpointSlice(EndpointSlice {
                metadata: meta("svc-1", BTreeMap::from([(
                    "kubernetes.io/service-name".to_owned(),
                    "svc".to_owned(),
                )])),
                address_type: "IPv4".to_owned(),
                ports: Some(ports.iter().map(|(p, _)| EndpointPort {
                    port: Some(*p),
                    ..EndpointPort::default()
                }).collect()),
                endpoints: (0..3).map(|i| Endpoint {
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".to_owned()),
                        name: Some(format!("p{i}")),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                }).collect(),
            }));
        let out = translate(&objects, &MeshConfig::default());
        for (key, w) in &out.workloads {
            prop_assert_eq!(key, &w.uid);
            prop_assert!(!w.addresses.is_empty());
            prop_assert!(w.addresses.iter().all(|a| a.len() == 4 || a.len() == 16));
        }
        for (key, s) in &out.services {
            prop_assert_eq!(key, &format!("{}/{}", s.namespace, s.hostname));
            prop_assert!(s.addresses.iter().all(|a| a.address.len() == 4 || a.address.len() == 16));
        }
        let _ = to_json(&out);
    }
}

/// Issue 11: a `istio.io/use-waypoint` label naming a Gateway that does not exist (or is not a
/// valid waypoint) must not publish a binding; one naming a valid waypoint does.
#[test]
fn a_binding_is_published_only_for_an_existing_waypoint_gateway() {
    let text = "\
apiVersion: v1
kind: Service
metadata: {name: ghosted, namespace: app, labels: {istio.io/use-waypoint: ghost}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bound, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
";
    let out = translate(&Objects::from_yaml(text).unwrap(), &MeshConfig::default());
    let ghosted = &out.services["app/ghosted.app.svc.cluster.local"];
    assert_eq!(
        ghosted.waypoint, None,
        "bound to a Gateway that does not exist"
    );
    let bound = &out.services["app/bound.app.svc.cluster.local"];
    assert!(bound.waypoint.is_some(), "bound to the existing waypoint");
}
