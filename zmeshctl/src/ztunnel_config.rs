//! `ztunnel-config workloads|services|policies|certificates [POD | --node N]`: one ztunnel's
//! view, read from its admin port (15000, `/config_dump`) through a port-forward, printed as
//! `istioctl ztunnel-config` prints it (the same columns) or as JSON.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use serde_json::Value;

use crate::error::Error;
use crate::forward;
use crate::manifests::NAMESPACE;
use crate::table::Table;

/// The label of ztunnel's pods (its DaemonSet's selector in the manifests).
pub const ZTUNNEL_SELECTOR: &str = "app=ztunnel";
/// ztunnel's admin port (localhost only, inside its pod).
pub const ADMIN_PORT: u16 = 15000;

/// Which part of the dump to show.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Workloads (pods) ztunnel knows, with address, node and protocol.
    Workloads,
    /// Services, their VIPs and endpoints.
    Services,
    /// AuthorizationPolicies in force.
    Policies,
    /// The workload certificates ztunnel holds.
    Certificates,
}

impl Section {
    fn key(self) -> &'static str {
        match self {
            Section::Workloads => "workloads",
            Section::Services => "services",
            Section::Policies => "policies",
            Section::Certificates => "certificates",
        }
    }
}

/// The ztunnel pods (in [`NAMESPACE`]), sorted by name; only the one on `node` if given.
pub async fn ztunnel_pods(client: &Client, node: Option<&str>) -> Result<Vec<Pod>, Error> {
    let mut params = ListParams::default().labels(ZTUNNEL_SELECTOR);
    if let Some(node) = node {
        params = params.fields(&format!("spec.nodeName={node}"));
    }
    let mut pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&params)
        .await
        .map_err(Error::api("listing ztunnel pods"))?
        .items;
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(pods)
}

/// The pod to read: `pod` by name (`name` or `name.namespace`, as istioctl takes it), else
/// the ztunnel on `node`, else the first running ztunnel.
async fn pick(client: &Client, pod: Option<&str>, node: Option<&str>) -> Result<String, Error> {
    if let Some(pod) = pod {
        let (name, ns) = pod.split_once('.').unwrap_or((pod, NAMESPACE));
        if ns != NAMESPACE {
            return Err(Error::NoZtunnel(format!(
                "ztunnel runs in {NAMESPACE}, not {ns}; give its pod name \
                 (kubectl -n {NAMESPACE} get pods -l {ZTUNNEL_SELECTOR})"
            )));
        }
        return Ok(name.to_owned());
    }
    let running: Vec<String> = ztunnel_pods(client, node)
        .await?
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|ph| ph == "Running")
        })
        .filter_map(|p| p.metadata.name)
        .collect();
    match (running.first(), node) {
        (Some(name), _) => Ok(name.clone()),
        (None, Some(node)) => Err(Error::NoZtunnel(format!(
            "no running ztunnel pod on node {node}: check the node name (kubectl get nodes) \
             and kubectl -n {NAMESPACE} get pods -l {ZTUNNEL_SELECTOR} -o wide"
        ))),
        (None, None) => Err(Error::NoZtunnel(format!(
            "no running ztunnel pod in {NAMESPACE}: run `zmeshctl check`"
        ))),
    }
}

/// Reads ztunnel `pod`'s `/config_dump`.
pub async fn config_dump(client: &Client, pod: &str) -> Result<Value, Error> {
    forward::get_json(client, NAMESPACE, pod, ADMIN_PORT, "/config_dump").await
}

/// Runs the command: prints the section as a table or JSON.
pub async fn run(
    client: &Client,
    section: Section,
    pod: Option<&str>,
    node: Option<&str>,
    json: bool,
) -> Result<(), Error> {
    let name = pick(client, pod, node).await?;
    let dump = config_dump(client, &name).await?;
    if json {
        let part = dump.get(section.key()).cloned().unwrap_or(Value::Null);
        println!(
            "{}",
            serde_json::to_string_pretty(&part).unwrap_or_default()
        );
    } else {
        print!("{}", render(section, &dump, SystemTime::now()));
    }
    Ok(())
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or("").to_owned()
}

/// The table of `section` from a `/config_dump` document, at time `now`.
pub fn render(section: Section, dump: &Value, now: SystemTime) -> String {
    let items = |k: &str| dump[k].as_array().cloned().unwrap_or_default();
    let mut t;
    match section {
        Section::Workloads => {
            t = Table::new(&[
                "NAMESPACE",
                "POD NAME",
                "ADDRESS",
                "NODE",
                "WAYPOINT",
                "PROTOCOL",
            ]);
            for w in items("workloads") {
                let ips: Vec<String> = w["workloadIps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                t.row(vec![
                    s(&w["namespace"]),
                    s(&w["name"]),
                    ips.join(","),
                    s(&w["node"]),
                    "None".into(),
                    s(&w["protocol"]),
                ]);
            }
        }
        Section::Services => {
            t = Table::new(&[
                "NAMESPACE",
                "SERVICE NAME",
                "SERVICE VIP",
                "WAYPOINT",
                "ENDPOINTS",
            ]);
            let workloads = items("workloads");
            for svc in items("services") {
                let key = format!("{}/{}", s(&svc["namespace"]), s(&svc["hostname"]));
                let backing: Vec<&Value> = workloads
                    .iter()
                    .filter(|w| w["services"].get(&key).is_some())
                    .collect();
                let healthy = backing
                    .iter()
                    .filter(|w| w["status"].as_str().is_none_or(|h| h == "Healthy"))
                    .count();
                let vips: Vec<String> = svc["vips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        let v = s(v);
                        v.rsplit_once('/')
                            .map_or(v.clone(), |(_, ip)| ip.to_owned())
                    })
                    .collect();
                t.row(vec![
                    s(&svc["namespace"]),
                    s(&svc["name"]),
                    vips.join(","),
                    "None".into(),
                    format!("{healthy}/{}", backing.len()),
                ]);
            }
        }
        Section::Policies => {
            t = Table::new(&["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"]);
            for p in items("policies") {
                let mut action = s(&p["action"]);
                if p["dry_run"].as_bool() == Some(true) {
                    action.push_str(" (dry run)");
                }
                t.row(vec![
                    s(&p["namespace"]),
                    s(&p["name"]),
                    action,
                    s(&p["scope"]),
                ]);
            }
        }
        Section::Certificates => {
            t = Table::new(&[
                "CERTIFICATE NAME",
                "TYPE",
                "STATUS",
                "VALID CERT",
                "SERIAL NUMBER",
                "NOT AFTER",
                "NOT BEFORE",
            ]);
            for c in items("certificates") {
                let valid = cert_valid(&c, now);
                t.row(vec![
                    s(&c["identity"]),
                    "Leaf".into(),
                    if valid { "Available" } else { "Unavailable" }.into(),
                    valid.to_string(),
                    c["serial"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .unwrap_or("-")
                        .to_owned(),
                    s(&c["not_after"]),
                    s(&c["not_before"]),
                ]);
            }
        }
    }
    t.render()
}

/// An RFC 3339 time of the dump.
pub fn time(v: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(v.as_str()?).ok()
}

/// Whether a certificate of the dump is within its validity at `now`.
pub fn cert_valid(c: &Value, now: SystemTime) -> bool {
    matches!((time(&c["not_before"]), time(&c["not_after"])),
        (Some(nb), Some(na)) if nb <= now && now < na)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    #[test]
    fn sections_render_as_istioctl_columns() {
        let dump = json!({
            "workloads": [
                {"namespace": "shop", "name": "a", "workloadIps": ["10.244.1.3"], "node": "n1",
                 "protocol": "HBONE", "status": "Healthy",
                 "services": {"shop/web.shop.svc.cluster.local": {"80": 8080}}},
                {"namespace": "shop", "name": "b", "workloadIps": ["10.244.2.3"], "node": "n2",
                 "protocol": "TCP", "status": "Unhealthy",
                 "services": {"shop/web.shop.svc.cluster.local": {"80": 8080}}}],
            "services": [{"namespace": "shop", "name": "web",
                          "hostname": "web.shop.svc.cluster.local", "vips": ["/10.96.0.10"]}],
            "policies": [{"namespace": "shop", "name": "deny-all", "action": "Deny",
                          "scope": "Namespace", "dry_run": false}],
            "certificates": [{"identity": "spiffe://cluster.local/ns/shop/sa/a", "serial": "0a1b",
                              "not_before": "2026-01-01T00:00:00Z",
                              "not_after": "2026-01-02T00:00:00Z"}],
        });
        let w = render(Section::Workloads, &dump, SystemTime::now());
        let lines: Vec<&str> = w.lines().collect();
        assert!(
            lines[0].starts_with("NAMESPACE   POD NAME   ADDRESS"),
            "{w}"
        );
        assert!(
            lines[1].contains("10.244.1.3") && lines[1].ends_with("HBONE"),
            "{w}"
        );
        let svc = render(Section::Services, &dump, SystemTime::now());
        assert!(svc.lines().nth(1).unwrap().contains("10.96.0.10"), "{svc}");
        assert!(svc.lines().nth(1).unwrap().ends_with("1/2"), "{svc}");
        let p = render(Section::Policies, &dump, SystemTime::now());
        assert!(p.lines().nth(1).unwrap().contains("deny-all"), "{p}");
        let inside = humantime::parse_rfc3339("2026-01-01T12:00:00Z").unwrap();
        let c = render(Section::Certificates, &dump, inside);
        assert!(
            c.lines().nth(1).unwrap().contains("Available   true"),
            "{c}"
        );
        let after = inside + Duration::from_secs(86_400);
        let c = render(Section::Certificates, &dump, after);
        assert!(
            c.lines().nth(1).unwrap().contains("Unavailable   false"),
            "{c}"
        );
    }
}
