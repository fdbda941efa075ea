//! `status`: what is in the mesh. The enrolled namespaces (label
//! `istio.io/dataplane-mode=ambient`) and their pods (a pod's own `istio.io/dataplane-mode=none`
//! opts it out; `ambient.istio.io/redirection`, the annotation Istio's node agent writes once
//! a pod's traffic is redirected, is shown when present: zmesh's agent does not write it yet),
//! and the waypoints with what binds to them through `istio.io/use-waypoint` (namespaces,
//! Services, pods).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta};
use serde::Serialize;

use crate::enrol::{AMBIENT, LABEL};
use crate::error::Error;
use crate::table::Table;
use crate::waypoint::{self, USE_LABEL, USE_NAMESPACE_LABEL};

/// The annotation Istio's CNI agent sets on a pod whose traffic it redirected.
pub const REDIRECTION: &str = "ambient.istio.io/redirection";

/// A pod of an enrolled namespace.
#[derive(Debug, Serialize)]
pub struct MeshPod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// `enrolled`, or `opted out` (its own label `istio.io/dataplane-mode=none`).
    pub mode: String,
    /// The redirection annotation's value, if the node agent wrote one.
    pub redirection: Option<String>,
}

/// A waypoint and what uses it.
#[derive(Debug, Serialize)]
pub struct BoundWaypoint {
    /// The waypoint.
    #[serde(flatten)]
    pub waypoint: waypoint::Waypoint,
    /// `namespace/<ns>`, `service/<ns>/<name>`, `pod/<ns>/<name>`.
    pub bound: Vec<String>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Enrolled namespaces.
    pub namespaces: Vec<String>,
    /// Their pods.
    pub pods: Vec<MeshPod>,
    /// Waypoints (`None` when the Gateway API is not installed).
    pub waypoints: Option<Vec<BoundWaypoint>>,
}

fn label<'a>(m: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    m.labels.as_ref()?.get(key).map(String::as_str)
}

/// The waypoint `(namespace, name)` an object in namespace `ns` uses, if it has the label.
fn uses(m: &ObjectMeta, ns: &str) -> Option<(String, String)> {
    let name = label(m, USE_LABEL)?;
    let wp_ns = label(m, USE_NAMESPACE_LABEL).unwrap_or(ns);
    Some((wp_ns.to_owned(), name.to_owned()))
}

/// Reads the report.
pub async fn read(client: &Client) -> Result<Status, Error> {
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::api("listing namespaces"))?
        .items;
    let enrolled: Vec<String> = namespaces
        .iter()
        .filter(|n| label(&n.metadata, LABEL) == Some(AMBIENT))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let all_pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::api("listing pods"))?
        .items;
    let mut pods = Vec::new();
    for p in &all_pods {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        if !enrolled.contains(&ns) {
            continue;
        }
        let opted_out = label(&p.metadata, LABEL) == Some("none");
        pods.push(MeshPod {
            namespace: ns,
            name: p.metadata.name.clone().unwrap_or_default(),
            node: p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            mode: if opted_out { "opted out" } else { "enrolled" }.into(),
            redirection: p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION))
                .cloned(),
        });
    }
    let waypoints = match waypoint::waypoints(client, None).await {
        Ok(w) => w,
        Err(Error::GatewayApiMissing) => {
            return Ok(Status {
                namespaces: enrolled,
                pods,
                waypoints: None,
            });
        }
        Err(e) => return Err(e),
    };
    // (waypoint namespace, name) -> what binds to it
    let mut bound: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for n in &namespaces {
        let ns = n.metadata.name.clone().unwrap_or_default();
        if let Some(wp) = uses(&n.metadata, &ns) {
            bound.entry(wp).or_default().push(format!("namespace/{ns}"));
        }
    }
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default().labels(USE_LABEL))
        .await
        .map_err(Error::api("listing Services"))?
        .items;
    for s in &services {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        if let Some(wp) = uses(&s.metadata, &ns) {
            let name = s.metadata.name.clone().unwrap_or_default();
            bound
                .entry(wp)
                .or_default()
                .push(format!("service/{ns}/{name}"));
        }
    }
    for p in &all_pods {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        if let Some(wp) = uses(&p.metadata, &ns) {
            let name = p.metadata.name.clone().unwrap_or_default();
            bound
                .entry(wp)
                .or_default()
                .push(format!("pod/{ns}/{name}"));
        }
    }
    let waypoints = waypoints
        .into_iter()
        .map(|w| {
            let b = bound
                .remove(&(w.namespace.clone(), w.name.clone()))
                .unwrap_or_default();
            BoundWaypoint {
                waypoint: w,
                bound: b,
            }
        })
        .collect();
    Ok(Status {
        namespaces: enrolled,
        pods,
        waypoints: Some(waypoints),
    })
}

/// Prints the report as tables or JSON.
pub fn print(s: &Status, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
        return;
    }
    if s.namespaces.is_empty() {
        println!("Enrolled namespaces: none (`zmeshctl enrol NAMESPACE` adds one)");
    } else {
        println!("Enrolled namespaces: {}", s.namespaces.join(", "));
    }
    println!();
    if s.pods.is_empty() {
        println!("Pods in the mesh: none");
    } else {
        println!("Pods in the mesh:");
        let mut t = Table::new(&["NAMESPACE", "NAME", "NODE", "MODE", "REDIRECTION"]);
        for p in &s.pods {
            t.row(vec![
                p.namespace.clone(),
                p.name.clone(),
                p.node.clone(),
                p.mode.clone(),
                p.redirection.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        print!("{}", t.render());
    }
    println!();
    match &s.waypoints {
        None => println!("Waypoints: the Gateway API CRDs are not installed"),
        Some(w) if w.is_empty() => {
            println!("Waypoints: none (`zmeshctl waypoint apply -n NAMESPACE` adds one)")
        }
        Some(w) => {
            println!("Waypoints:");
            let mut t = Table::new(&["NAMESPACE", "NAME", "TRAFFIC TYPE", "PROGRAMMED", "USED BY"]);
            for b in w {
                let used = if b.bound.is_empty() {
                    "-".to_owned()
                } else {
                    b.bound.join(", ")
                };
                t.row(vec![
                    b.waypoint.namespace.clone(),
                    b.waypoint.name.clone(),
                    b.waypoint.traffic_type.clone(),
                    b.waypoint.programmed.clone(),
                    used,
                ]);
            }
            print!("{}", t.render());
        }
    }
}
