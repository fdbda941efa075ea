//! The post-install checks that look inside the mesh through port-forwards: every ztunnel's
//! workload certificates valid and not near expiry (admin `/config_dump`, `certificates`),
//! and every ztunnel's xDS view in sync with the controller's (its `xds` status against the
//! controller's `/debug/status` on 15014: connected, first config applied, the same number of
//! Address and Authorization resources).

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::Check;
use crate::forward;
use crate::manifests::NAMESPACE;
use crate::ztunnel_config::{self, cert_valid, time};

/// The controller's pods (its Deployment's selector in the manifests).
pub const CONTROLLER_SELECTOR: &str = "app=zmesh-controller";
/// The controller's monitoring port (`/ready`, `/metrics`, `/debug/status`).
pub const CONTROLLER_MONITOR_PORT: u16 = 15014;
/// A certificate with less than this share of its life left is near expiry: ztunnel renews at
/// half-life, so one this old means renewals are failing.
pub const NEAR_EXPIRY_FRACTION: f64 = 0.25;
/// How long the xDS check waits for the views to agree (a change may be in flight).
pub const SYNC_WAIT: Duration = Duration::from_secs(10);

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The running ztunnel pods' names.
async fn ztunnels(client: &Client) -> Result<Vec<String>, String> {
    Ok(ztunnel_config::ztunnel_pods(client, None)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|ph| ph == "Running")
        })
        .filter_map(|p| p.metadata.name)
        .collect())
}

/// Each running ztunnel's `/config_dump` (or why it could not be read).
async fn dumps(client: &Client, pods: &[String]) -> Vec<(String, Result<Value, String>)> {
    let mut out = Vec::new();
    for pod in pods {
        let d = ztunnel_config::config_dump(client, pod)
            .await
            .map_err(|e| e.to_string());
        out.push((pod.clone(), d));
    }
    out
}

/// The certificate check over `dumps` at `now`.
pub fn certificates(dumps: &[(String, Result<Value, String>)], now: SystemTime) -> Check {
    let name = "workload certificates valid";
    if dumps.is_empty() {
        return Check::fail(
            name,
            "no running ztunnel pod to ask",
            format!(
                "kubectl -n {NAMESPACE} get pods -l {}",
                ztunnel_config::ZTUNNEL_SELECTOR
            ),
        );
    }
    let (mut total, mut problems) = (0usize, Vec::new());
    for (pod, dump) in dumps {
        let dump = match dump {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("{pod}: {e}"));
                continue;
            }
        };
        for c in dump["certificates"].as_array().into_iter().flatten() {
            total += 1;
            let id = c["identity"].as_str().unwrap_or("?");
            let (Some(nb), Some(na)) = (time(&c["not_before"]), time(&c["not_after"])) else {
                problems.push(format!("{pod}: {id} has unreadable validity times"));
                continue;
            };
            if !cert_valid(c, now) {
                let when = c["not_after"].as_str().unwrap_or("?");
                problems.push(format!("{pod}: {id} not valid now (not after {when})"));
                continue;
            }
            let life = na.duration_since(nb).unwrap_or_default().as_secs_f64();
            let left = na.duration_since(now).unwrap_or_default().as_secs_f64();
            if life > 0.0 && left / life < NEAR_EXPIRY_FRACTION {
                problems.push(format!(
                    "{pod}: {id} expires in {}s ({:.0}% of its life left)",
                    left as u64,
                    100.0 * left / life
                ));
            }
        }
    }
    if problems.is_empty() {
        Check::pass(
            name,
            format!(
                "{total} certificates on {} ztunnels, none near expiry",
                dumps.len()
            ),
        )
    } else {
        Check::fail(
            name,
            problems.join("; "),
            format!(
                "ztunnel renews at half-life: read its log for CA errors \
                 (kubectl -n {NAMESPACE} logs <pod>) and the controller's \
                 (kubectl -n {NAMESPACE} logs deployment/zmesh-controller); \
                 `zmeshctl ztunnel-config certificates <pod>` lists them"
            ),
        )
    }
}

/// The controller's view: (addresses, authorizations) from a ready controller pod.
async fn controller_view(client: &Client) -> Result<(String, u64, u64), String> {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(CONTROLLER_SELECTOR))
        .await
        .map_err(|e| format!("listing controller pods: {e}"))?
        .items;
    let Some(pod) = pods
        .iter()
        .filter(|p| is_ready(p))
        .find_map(|p| p.metadata.name.clone())
    else {
        return Err("no ready controller pod".into());
    };
    let status = forward::get_json(
        client,
        NAMESPACE,
        &pod,
        CONTROLLER_MONITOR_PORT,
        "/debug/status",
    )
    .await
    .map_err(|e| e.to_string())?;
    let n = |k: &str| {
        status[k]
            .as_u64()
            .ok_or(format!("/debug/status has no {k}"))
    };
    Ok((pod, n("addresses")?, n("authorizations")?))
}

/// Why one ztunnel's view differs from the controller's, if it does.
pub fn out_of_sync(dump: &Value, addresses: u64, authorizations: u64) -> Option<String> {
    let x = &dump["xds"];
    if x.is_null() {
        return Some("takes no config from the controller (local config)".into());
    }
    if x["connected"].as_bool() != Some(true) {
        let err = x["last_error"].as_str().unwrap_or("no error recorded");
        return Some(format!("not connected to the controller ({err})"));
    }
    if x["first_config_applied"].as_bool() != Some(true) {
        return Some("has not applied a first config".into());
    }
    let n = |k: &str| x[k].as_u64().unwrap_or(0);
    let have = n("workloads") + n("services");
    if have != addresses || n("policies") != authorizations {
        return Some(format!(
            "has {have} addresses and {} policies, the controller serves {addresses} and \
             {authorizations}",
            n("policies")
        ));
    }
    None
}

/// Runs the certificate and xDS checks.
pub async fn run(client: &Client, progress: &dyn Fn(&str)) -> Vec<Check> {
    let pods = match ztunnels(client).await {
        Ok(p) => p,
        Err(e) => {
            let hint = "check the API access";
            return vec![
                Check::fail("workload certificates valid", e.clone(), hint),
                Check::fail("ztunnel xDS in sync with the controller", e, hint),
            ];
        }
    };
    progress("reading each ztunnel's config through a port-forward");
    let mut dumps = dumps(client, &pods).await;
    let mut checks = vec![certificates(&dumps, SystemTime::now())];
    let name = "ztunnel xDS in sync with the controller";
    let hint = format!(
        "read the named ztunnels' logs (kubectl -n {NAMESPACE} logs <pod>) for xDS errors and \
         NACKs, and the controller's; `zmeshctl ztunnel-config workloads <pod>` shows its view"
    );
    let deadline = Instant::now() + SYNC_WAIT;
    loop {
        let view = controller_view(client).await;
        let problems: Vec<String> = match &view {
            Err(e) => vec![format!("the controller's view: {e}")],
            Ok((_, addresses, authorizations)) => dumps
                .iter()
                .filter_map(|(pod, d)| match d {
                    Err(e) => Some(format!("{pod}: {e}")),
                    Ok(d) => out_of_sync(d, *addresses, *authorizations)
                        .map(|why| format!("{pod} {why}")),
                })
                .collect(),
        };
        if problems.is_empty()
            && let Ok((controller, addresses, authorizations)) = &view
        {
            checks.push(Check::pass(
                name,
                format!(
                    "{} ztunnels hold the {addresses} addresses and {authorizations} policies \
                     {controller} serves",
                    dumps.len()
                ),
            ));
            return checks;
        }
        if pods.is_empty() || Instant::now() >= deadline {
            let detail = if pods.is_empty() {
                "no running ztunnel pod".to_owned()
            } else {
                problems.join("; ")
            };
            checks.push(Check::fail(name, detail, hint));
            return checks;
        }
        progress("waiting for the ztunnels' xDS views to converge");
        tokio::time::sleep(Duration::from_secs(1)).await;
        dumps = self::dumps(client, &pods).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn near_expiry_and_expired_certificates_fail_with_the_pod_named() {
        let now = humantime::parse_rfc3339("2026-01-01T20:00:00Z").unwrap();
        let cert = |nb: &str, na: &str| {
            json!({"identity": "spiffe://td/ns/a/sa/b",
                                              "not_before": nb, "not_after": na})
        };
        let ok = json!({"certificates": [cert("2026-01-01T12:00:00Z", "2026-01-02T12:00:00Z")]});
        let near = json!({"certificates": [cert("2026-01-01T00:00:00Z", "2026-01-01T21:00:00Z")]});
        let gone = json!({"certificates": [cert("2026-01-01T00:00:00Z", "2026-01-01T19:00:00Z")]});
        assert!(certificates(&[("z1".into(), Ok(ok.clone()))], now).ok);
        let c = certificates(&[("z1".into(), Ok(ok)), ("z2".into(), Ok(near))], now);
        assert!(!c.ok && c.detail.contains("z2") && c.detail.contains("expires in 3600s"));
        let c = certificates(&[("z3".into(), Ok(gone))], now);
        assert!(!c.ok && c.detail.contains("z3") && c.detail.contains("not valid now"));
        let c = certificates(&[("z4".into(), Err("refused".into()))], now);
        assert!(!c.ok && c.detail.contains("z4: refused"));
    }

    #[test]
    fn xds_views_compare_connection_and_counts() {
        let dump = |connected: bool, w: u64, p: u64| {
            json!({"xds": {"connected": connected, "first_config_applied": true,
                           "workloads": w, "services": 1, "policies": p}})
        };
        assert_eq!(out_of_sync(&dump(true, 3, 2), 4, 2), None);
        assert!(
            out_of_sync(&dump(true, 2, 2), 4, 2)
                .unwrap()
                .contains("has 3 addresses")
        );
        assert!(
            out_of_sync(&dump(false, 3, 2), 4, 2)
                .unwrap()
                .contains("not connected")
        );
        assert!(out_of_sync(&json!({"xds": null}), 4, 2).is_some());
    }
}
