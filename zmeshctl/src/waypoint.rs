//! `waypoint apply|list|delete`, as `istioctl waypoint` does it: a waypoint is a Gateway API
//! `Gateway` of class `istio-waypoint` with one listener `mesh` (port 15008, protocol HBONE)
//! and the label `istio.io/waypoint-for` (which traffic it handles); a namespace, Service or
//! pod uses it through the label `istio.io/use-waypoint` (Istio's "Configuring waypoint
//! proxies" page).

use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde::Serialize;
use serde_json::json;

use crate::error::{Error, is_not_found};
use crate::install::FIELD_MANAGER;
use crate::table::Table;

/// The GatewayClass of waypoints.
pub const CLASS: &str = "istio-waypoint";
/// The label naming the traffic a waypoint handles.
pub const FOR_LABEL: &str = "istio.io/waypoint-for";
/// The label that binds a namespace, Service or pod to a waypoint.
pub const USE_LABEL: &str = "istio.io/use-waypoint";
/// The label naming the waypoint's namespace when it is elsewhere.
pub const USE_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";

/// Which traffic a waypoint handles (`istio.io/waypoint-for`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrafficType {
    /// Traffic addressed to Services (the default).
    #[default]
    Service,
    /// Traffic addressed to pods directly.
    Workload,
    /// Both.
    All,
    /// Neither (the waypoint is deployed but unused).
    None,
}

impl TrafficType {
    fn as_str(self) -> &'static str {
        match self {
            TrafficType::Service => "service",
            TrafficType::Workload => "workload",
            TrafficType::All => "all",
            TrafficType::None => "none",
        }
    }
}

/// `gateway.networking.k8s.io/v1` Gateway.
pub fn gateway_resource() -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

/// A name Kubernetes accepts for a Gateway (a DNS-1123 label: the controller names
/// Services and Deployments after it).
fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadWaypoint(format!(
            "waypoint name {name:?} is not a DNS-1123 label: use up to 63 lower-case letters, \
             digits and `-`, starting and ending with a letter or digit (e.g. `waypoint`)"
        )))
    }
}

/// The Gateway `apply` sends.
pub fn gateway(namespace: &str, name: &str, traffic: TrafficType) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {FOR_LABEL: traffic.as_str()}},
        "spec": {"gatewayClassName": CLASS,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

/// Creates or updates the waypoint `namespace/name` (server-side apply); with `enroll`, also
/// labels the namespace to use it.
pub async fn apply(
    client: &Client,
    namespace: &str,
    name: &str,
    traffic: TrafficType,
    enroll: bool,
) -> Result<(), Error> {
    check_name(name)?;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = match namespaces.get(namespace).await {
        Ok(ns) => ns,
        Err(e) if is_not_found(&e) => return Err(Error::NamespaceNotFound(namespace.to_owned())),
        Err(e) => return Err(Error::api(format!("reading namespace {namespace}"))(e)),
    };
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &gateway_resource());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(
        name,
        &params,
        &Patch::Apply(gateway(namespace, name, traffic)),
    )
    .await
    .map_err(|e| {
        if is_not_found(&e) {
            Error::GatewayApiMissing
        } else {
            Error::api(format!("applying Gateway {namespace}/{name}"))(e)
        }
    })?;
    println!(
        "waypoint {namespace}/{name} applied (for {} traffic)",
        traffic.as_str()
    );
    if enroll {
        let patch = json!({"metadata": {"labels": {USE_LABEL: name}}});
        namespaces
            .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(Error::api(format!("labelling namespace {namespace}")))?;
        println!("namespace {namespace} labelled {USE_LABEL}={name}");
    }
    let ambient = ns
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::enrol::LABEL))
        .is_some_and(|v| v == crate::enrol::AMBIENT);
    if !ambient {
        eprintln!(
            "note: namespace {namespace} is not enrolled in the mesh: its pods' traffic reaches \
             the waypoint only once it is (`zmeshctl enrol {namespace}`)"
        );
    }
    Ok(())
}

/// One waypoint, as `list` shows it.
#[derive(Debug, Serialize)]
pub struct Waypoint {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `istio.io/waypoint-for` (`service` when unset, Istio's default).
    pub traffic_type: String,
    /// Its `Programmed` condition (`True`, `False`, or `Unknown` when not reported).
    pub programmed: String,
}

/// The waypoints (Gateways of class [`CLASS`]) in `namespace`, or everywhere.
pub async fn waypoints(client: &Client, namespace: Option<&str>) -> Result<Vec<Waypoint>, Error> {
    let ar = gateway_resource();
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let list = match api.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) if is_not_found(&e) => return Err(Error::GatewayApiMissing),
        Err(e) => return Err(Error::api("listing Gateways")(e)),
    };
    let mut out: Vec<Waypoint> = list
        .into_iter()
        .filter(|g| g.data["spec"]["gatewayClassName"] == CLASS)
        .map(|g| {
            let programmed = g.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Programmed")
                .and_then(|c| c["status"].as_str())
                .unwrap_or("Unknown")
                .to_owned();
            Waypoint {
                namespace: g.metadata.namespace.clone().unwrap_or_default(),
                name: g.metadata.name.clone().unwrap_or_default(),
                traffic_type: g
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(FOR_LABEL))
                    .cloned()
                    .unwrap_or_else(|| "service".into()),
                programmed,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

/// Prints the waypoints as a table or JSON.
pub async fn list(client: &Client, namespace: Option<&str>, json: bool) -> Result<(), Error> {
    let wps = waypoints(client, namespace).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&wps).unwrap_or_default());
        return Ok(());
    }
    if wps.is_empty() {
        match namespace {
            Some(ns) => println!("no waypoints in namespace {ns}"),
            None => println!("no waypoints"),
        }
        return Ok(());
    }
    let mut t = Table::new(&["NAMESPACE", "NAME", "TRAFFIC TYPE", "PROGRAMMED"]);
    for w in wps {
        t.row(vec![w.namespace, w.name, w.traffic_type, w.programmed]);
    }
    print!("{}", t.render());
    Ok(())
}

/// Deletes the waypoints `names` in `namespace` (every waypoint there with `all`). A name
/// that is not a waypoint (absent, or a Gateway of another class) is an error, and nothing
/// is deleted then.
pub async fn delete(
    client: &Client,
    namespace: &str,
    names: &[String],
    all: bool,
) -> Result<(), Error> {
    let present = waypoints(client, Some(namespace)).await?;
    let targets: Vec<String> = if all {
        present.iter().map(|w| w.name.clone()).collect()
    } else {
        if names.is_empty() {
            return Err(Error::BadWaypoint(
                "name the waypoints to delete, or give --all".into(),
            ));
        }
        if let Some(missing) = names
            .iter()
            .find(|n| !present.iter().any(|w| &&w.name == n))
        {
            return Err(Error::WaypointNotFound {
                namespace: namespace.to_owned(),
                name: missing.clone(),
            });
        }
        names.to_vec()
    };
    if targets.is_empty() {
        println!("no waypoints in namespace {namespace}");
    }
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &gateway_resource());
    for name in targets {
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => println!("waypoint {namespace}/{name} deleted"),
            Err(e) if is_not_found(&e) => println!("waypoint {namespace}/{name} already gone"),
            Err(e) => {
                return Err(Error::api(format!("deleting Gateway {namespace}/{name}"))(
                    e,
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_dns_labels() {
        assert!(check_name("waypoint").is_ok());
        assert!(check_name("wp-1").is_ok());
        for bad in ["", "Waypoint", "-wp", "wp-", "a.b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
