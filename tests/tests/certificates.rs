//! Workload certificates from the controller's CA, end to end on the lab [`Cluster`]:
//! a dedicated-mode ztunnel (as README's "by hand" sections run it) gets its workload's
//! certificate with its node's credential, and only for a pod on that node; refused, it stays
//! up (xDS, admin, metrics), not ready, retrying, and serves once the CA grants. With the CA
//! away past a certificate's half life, the old certificate keeps working until it expires,
//! then connections fail closed with a clear error, and recover when the CA is back.
//! Needs root, containernetworking-plugins and `cargo build --workspace --bins`.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use zmesh_tests::apps::{connect, identify};
use zmesh_tests::cluster::{Cluster, Pod};
use zmesh_tests::mesh::TRUST_DOMAIN;
use zmesh_tests::probe::{echo_line, shop};
use zmesh_tests::ztunnel::Ztunnel;
use zmesh_tests::{Sandbox, bin_path, poll, poll_some};

const ECHO_PORT: u16 = 8080;
/// Generous: the machine is shared and loaded.
const CONVERGE: Duration = Duration::from_secs(60);

/// The environment README's "Running ztunnel by hand" and "Running the controller by hand"
/// give a dedicated ztunnel pointed at the controller, with `node`'s credential.
fn dedicated_env(cluster: &Cluster<'_>, pod: &Pod, node: &str) -> Vec<(String, String)> {
    let access = cluster.controller_access();
    let p = |p: &std::path::Path| p.display().to_string();
    [
        ("PROXY_MODE", "dedicated".to_owned()),
        (
            "PROXY_WORKLOAD_INFO",
            format!("{}/{}/{}", pod.namespace, pod.name, pod.service_account),
        ),
        ("XDS_ADDRESS", access.address.clone()),
        ("CA_ADDRESS", access.address.clone()),
        ("XDS_ROOT_CA", p(&access.root)),
        ("CA_ROOT_CA", p(&access.root)),
        ("AUTH_TOKEN", p(cluster.node_token(node).unwrap())),
        ("NODE_NAME", node.to_owned()),
        ("TRUST_DOMAIN", TRUST_DOMAIN.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The certificate a ztunnel holds for `identity` in `/config_dump`.
fn certificate(zt: &Ztunnel, identity: &str) -> Option<serde_json::Value> {
    let dump: serde_json::Value = serde_json::from_str(&zt.config_dump().ok()?).ok()?;
    dump["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == identity)
        .cloned()
}

fn time_of(cert: &serde_json::Value, field: &str) -> SystemTime {
    let text = cert[field].as_str().expect("an RFC 3339 time");
    humantime::parse_rfc3339_weak(text).expect("an RFC 3339 time")
}

fn wait_until(t: SystemTime) {
    if let Ok(d) = t.duration_since(SystemTime::now()) {
        std::thread::sleep(d);
    }
}

#[test]
fn a_dedicated_ztunnel_gets_its_pods_certificate_and_stays_up_while_refused() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    // Namespace `dm` is not enrolled: these pods are served by their own dedicated ztunnels.
    let app1 = cluster.create_pod("n1", "dm", "app1", "app1", &[]).unwrap();
    let app2 = cluster.create_pod("n2", "dm", "app2", "app2", &[]).unwrap();

    // n1's credential, for a pod on n1: granted, ready.
    let zt1 = Ztunnel::spawn(
        &sb,
        &app1.netns,
        &dedicated_env(&cluster, &app1, "n1"),
        &bin_path("ztunnel"),
    )
    .unwrap();
    assert!(certificate(&zt1, &app1.spiffe_id()).is_some());

    // n1's credential, for a pod on n2: refused with the CA's reason, retried; ztunnel stays
    // up, serves admin and metrics, and is not ready.
    let zt2 = Ztunnel::start(
        &sb,
        &app2.netns,
        &dedicated_env(&cluster, &app2, "n1"),
        &bin_path("ztunnel"),
    )
    .unwrap();
    poll("two refusals naming the reason", CONVERGE, || {
        assert!(
            zt2.process().is_running(),
            "ztunnel exited when its certificate was refused:\n{}",
            zt2.log()
        );
        zt2.log()
            .matches("no pod with that identity runs on n1")
            .count()
            >= 2
    });
    assert!(zt2.process().is_running(), "ztunnel exited:\n{}", zt2.log());
    assert_eq!(zt2.ready_status().unwrap(), 503);
    assert!(zt2.metrics().is_ok());
    assert!(certificate(&zt2, &app2.spiffe_id()).is_none());

    // A pod with app2's identity starts on n1: the CA now grants, and ztunnel becomes ready.
    let _also = cluster
        .create_pod("n1", "dm", "app2-b", "app2", &[])
        .unwrap();
    poll("the granted certificate", CONVERGE, || {
        zt2.ready_status().is_ok_and(|s| s == 200)
    });
    assert!(certificate(&zt2, &app2.spiffe_id()).is_some());
    assert!(zt2.process().is_running());
}

#[test]
fn with_the_ca_away_the_old_certificate_serves_until_expiry_then_fails_closed_then_recovers() {
    let sb = Sandbox::new().unwrap();
    // 20 s certificates: refreshed at 10 s, so the test takes about half a minute.
    let mut cluster = Cluster::up_with(&sb, &["n1", "n2"], &[("SECRET_TTL", "20s")]).unwrap();
    let (client, web, app) = shop(&cluster);
    let dst: SocketAddr = web.addr(ECHO_PORT);
    let who = || identify(&sb, &client.netns, dst).map_err(|e| format!("{e:#}"));
    assert_eq!(who().as_deref(), Ok("web-a"));
    let mut open = connect(&sb, &client.netns, dst).unwrap();
    assert_eq!(echo_line(&mut open, "before\n"), "before\n");

    cluster.stop_controller().unwrap();
    let (zt1, zt2) = (
        cluster.ztunnel("n1").unwrap(),
        cluster.ztunnel("n2").unwrap(),
    );
    let certs = [
        certificate(zt1, &client.spiffe_id()).expect("n1 holds the client's certificate"),
        certificate(zt2, &web.spiffe_id()).expect("n2 holds web-a's certificate"),
    ];
    let refresh = certs
        .iter()
        .map(|c| time_of(c, "refresh_at"))
        .max()
        .unwrap();
    let first_expiry = certs.iter().map(|c| time_of(c, "not_after")).min().unwrap();
    let last_expiry = certs.iter().map(|c| time_of(c, "not_after")).max().unwrap();

    // Past half life, the refresh fails; the old certificates keep serving.
    wait_until(refresh + Duration::from_secs(1));
    assert!(
        SystemTime::now() + Duration::from_secs(2) < first_expiry,
        "the machine is too slow for this timeline"
    );
    poll("a failed refresh", CONVERGE, || {
        zt1.log().contains("certificate refresh failed")
    });
    assert_eq!(who().as_deref(), Ok("web-a"));
    assert_eq!(
        echo_line(&mut open, "after half life\n"),
        "after half life\n"
    );

    // Expired: a new connection fails, promptly, and never reaches the app in plaintext.
    wait_until(last_expiry + Duration::from_secs(1));
    let accepted = app.accepted();
    let started = Instant::now();
    let failed = who();
    assert!(
        failed.is_err(),
        "a connection worked with expired certificates"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the failure took {:?} (a hang, not a refusal)",
        started.elapsed()
    );
    assert_eq!(app.accepted(), accepted, "the app saw a connection");
    // The refusal is logged when ztunnel closes the connection, which may be just after the
    // client has seen it fail.
    poll(
        "a clear error about the expired certificate in the logs",
        CONVERGE,
        || {
            let logs = format!("{}{}", zt1.log(), zt2.log());
            logs.contains("expired at") && logs.contains("has not renewed it")
        },
    );

    // The CA returns: certificates are renewed and traffic flows again.
    cluster.start_controller().unwrap();
    poll_some("traffic after the CA is back", CONVERGE, || {
        (who().as_deref() == Ok("web-a")).then_some(())
    });
    let zt1 = cluster.ztunnel("n1").unwrap();
    let renewed = certificate(zt1, &client.spiffe_id()).expect("a renewed certificate");
    assert!(time_of(&renewed, "not_after") > last_expiry);
}
