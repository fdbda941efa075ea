//! ztunnel's xDS node identity, as upstream ztunnel presents it to istiod.

use prost_types::value::Kind;
use xds_proto::envoy::config::core::v3::Node;

use crate::config::Config;

/// `ztunnel~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`, and
/// metadata `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID` plus every
/// `ISTIO_META_<KEY>` as `<KEY>` (the named ones win over an `ISTIO_META_` of the same key).
pub fn node(cfg: &Config) -> Node {
    // Upstream's placeholder when the pod IP is not known.
    let ip = if cfg.instance_ip.is_empty() {
        "1.1.1.1"
    } else {
        cfg.instance_ip.as_str()
    };
    let (pod, ns) = (&cfg.pod_name, &cfg.pod_namespace);
    let mut md = prost_types::Struct::default();
    let mut put = |k: &str, v: &str| {
        md.fields.insert(
            k.to_owned(),
            prost_types::Value {
                kind: Some(Kind::StringValue(v.to_owned())),
            },
        );
    };
    for (k, v) in &cfg.node_metadata {
        put(k, v);
    }
    for (k, v) in [
        ("NAME", pod),
        ("NAMESPACE", ns),
        ("INSTANCE_IPS", &cfg.instance_ip),
        ("NODE_NAME", &cfg.node_name),
        ("CLUSTER_ID", &cfg.cluster_id),
    ] {
        if !v.is_empty() {
            put(k, v);
        }
    }
    Node {
        id: format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
        metadata: Some(md),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_and_metadata() {
        let mut cfg = Config {
            pod_name: "ztunnel-abc".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: "10.0.0.1".into(),
            node_name: "node-a".into(),
            ..Config::default()
        };
        cfg.node_metadata
            .insert("DNS_CAPTURE".into(), "true".into());
        cfg.node_metadata
            .insert("NODE_NAME".into(), "spoofed".into());
        let n = node(&cfg);
        assert_eq!(
            n.id,
            "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
        let md = n.metadata.unwrap().fields;
        let s = |k: &str| match md[k].kind.as_ref().unwrap() {
            Kind::StringValue(s) => s.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(s("NAME"), "ztunnel-abc");
        assert_eq!(s("NAMESPACE"), "istio-system");
        assert_eq!(s("INSTANCE_IPS"), "10.0.0.1");
        assert_eq!(s("NODE_NAME"), "node-a");
        assert_eq!(s("CLUSTER_ID"), "Kubernetes");
        assert_eq!(s("DNS_CAPTURE"), "true");
        assert!(node(&Config::default()).id.starts_with("ztunnel~1.1.1.1~"));
    }
}
