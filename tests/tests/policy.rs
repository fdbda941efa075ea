//! L4 AuthorizationPolicy end to end, with real ztunnels in dedicated mode and policies in the
//! local config: a principal denied (401 on the CONNECT, `response_flags="DENY"`, the policy in
//! the access log), an ALLOW for one namespace, port rules, ipBlocks on plaintext traffic
//! from outside the mesh (15006), a live policy edit closing connections already open, and a
//! dry-run policy that only logs. And on the lab cluster (shared mode, config from the
//! controller over xDS): a Kubernetes AuthorizationPolicy with a selector is enforced in the
//! selected pods, closes their open connections it denies, and its removal lifts it. Needs
//! root, containernetworking-plugins and `cargo build --workspace --bins`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use zmesh_tests::Sandbox;
use zmesh_tests::apps::{EchoServer, connect, identify};
use zmesh_tests::cluster::Cluster;
use zmesh_tests::lab::{Topology, redirect_inbound, redirect_outbound};
use zmesh_tests::mesh::{
    self, Action, CaFiles, LocalConfig, MatchSpec, PolicySpec, Protocol, WorkloadSpec,
};
use zmesh_tests::probe;
use zmesh_tests::ztunnel::{Ztunnel, metric_value};
use zmesh_tests::{bin_path, poll_some};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
/// Principals in policies carry no `spiffe://`.
const CLIENT_PRINCIPAL: &str = "cluster.local/ns/default/sa/client";
const OTHER_PRINCIPAL: &str = "cluster.local/ns/other/sa/other";

/// Meshed `client` (namespace default) and `other` (namespace other) call the meshed server
/// `s1` (namespace default), each host with its own ztunnel; `ext` and `ext2` are outside the
/// mesh (no ztunnel).
struct Mesh<'s> {
    sb: &'s Sandbox,
    topo: Topology<'s>,
    ca: CaFiles,
    xds: PathBuf,
    workloads: Vec<WorkloadSpec>,
    /// client, other, s1.
    zt: Vec<Ztunnel>,
}

impl<'s> Mesh<'s> {
    fn up(sb: &'s Sandbox, policies: Vec<PolicySpec>) -> Mesh<'s> {
        let topo = Topology::build(sb, &["client", "other", "s1", "ext", "ext2"]).unwrap();
        let ca = mesh::write_ca(sb.dir(), "lab-root").unwrap();
        let workloads = vec![
            WorkloadSpec::new("client", topo.host_ip("client")).service_account("client"),
            WorkloadSpec::new("other", topo.host_ip("other"))
                .namespace("other")
                .service_account("other"),
            WorkloadSpec::new("s1", topo.host_ip("s1")).service_account("server"),
            WorkloadSpec::new("ext", topo.host_ip("ext")).protocol(Protocol::Tcp),
        ];
        let xds = sb.dir().join("mesh.yaml");
        let mut m = Mesh {
            sb,
            topo,
            ca,
            xds,
            workloads,
            zt: Vec::new(),
        };
        m.write_config(policies);
        for (i, host) in ["client", "other", "s1"].iter().enumerate() {
            let w = m.workloads[i].clone();
            let mut env = mesh::dedicated_env(&w, &m.xds, &m.ca);
            env.push(("RUST_LOG".into(), "info".into()));
            m.zt.push(Ztunnel::spawn(sb, host, &env, &bin_path("ztunnel")).unwrap());
        }
        redirect_outbound(sb, "client").unwrap();
        redirect_outbound(sb, "other").unwrap();
        m
    }

    fn write_config(&self, policies: Vec<PolicySpec>) {
        let mut cfg = LocalConfig::default();
        for w in &self.workloads {
            cfg = cfg.workload(w.clone());
        }
        for p in policies {
            cfg = cfg.policy(p);
        }
        cfg.write(&self.xds).unwrap();
    }

    fn ip(&self, host: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.host_ip(host).into(), port)
    }

    fn s1(&self) -> &Ztunnel {
        &self.zt[2]
    }

    /// s1 captures inbound TCP to 15006, except HBONE and ztunnel's own (marked) traffic.
    fn capture_plaintext_inbound(&self) {
        redirect_inbound(self.sb, "s1").unwrap();
    }
}

/// Waits for `needle` in a ztunnel's log (written by a background thread) and returns the log.
fn log_with(zt: &Ztunnel, needle: &str) -> String {
    poll_some(
        &format!("{needle:?} in the log of ztunnel {}", zt.host()),
        Duration::from_secs(20),
        || {
            let l = zt.log();
            l.contains(needle).then_some(l)
        },
    )
}

/// Polls the metrics until the sum of `name` over series with `labels` reaches `at_least`.
fn metric_at_least(zt: &Ztunnel, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let mut last = String::new();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = zt.metrics() {
            if metric_value(&text, name, labels) >= at_least {
                return;
            }
            last = text;
        }
        assert!(
            Instant::now() < end,
            "{name}{labels:?} never reached {at_least} on ztunnel {}:\n{last}",
            zt.host()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A connection was refused: an error, or an answer with nothing in it.
fn refused(res: &anyhow::Result<String>) -> bool {
    res.as_ref().map_or(true, |s| s.is_empty())
}

/// Writes a line on an open echo connection and reads it back.
fn echo_line(s: &mut TcpStream, line: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(line)?;
    let mut buf = vec![0u8; line.len()];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Whether the peer has closed `s`: a read ends (EOF or reset) within 20 s.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The write may already fail; the read tells.
    let _ = s.write_all(b"anyone?\n");
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An echo of what was in flight before the close.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn deny_by_principal_answers_401_counts_deny_and_logs_the_policy() {
    let sb = Sandbox::new().unwrap();
    let deny = PolicySpec::new("deny-client", "default", Action::Deny)
        .when(MatchSpec::default().principal(CLIENT_PRINCIPAL));
    let m = Mesh::up(&sb, vec![deny]);
    let app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();

    let res = identify(&sb, "client", m.ip("s1", 8080));
    assert!(refused(&res), "the denied client got an answer: {res:?}");
    // Another identity is not concerned.
    assert_eq!(identify(&sb, "other", m.ip("s1", 8080)).unwrap(), "s1");
    assert_eq!(app.accepted(), 1, "the app saw only the allowed connection");

    // The client's ztunnel was answered 401 and counts the connection's close as denied (it
    // opened before the answer).
    log_with(&m.zt[0], "401 Unauthorized");
    metric_at_least(
        &m.zt[0],
        "istio_tcp_connections_closed_total",
        &[("reporter", "source"), ("response_flags", "DENY")],
        1.0,
    );
    // The server's ztunnel counts it opened and closed with DENY, with the client's identity.
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
    ] {
        metric_at_least(
            m.s1(),
            name,
            &[
                ("reporter", "destination"),
                ("response_flags", "DENY"),
                ("source_principal", CLIENT_ID),
                ("destination_workload", "s1"),
            ],
            1.0,
        );
    }
    let text = m.s1().metrics().unwrap();
    assert_eq!(
        metric_value(
            &text,
            "istio_tcp_connections_opened_total",
            &[("response_flags", "DENY"), ("source_workload", "other")]
        ),
        0.0,
        "{text}"
    );
    // The access log names the policy.
    let log = log_with(m.s1(), "policy=default/deny-client");
    let line = log
        .lines()
        .find(|l| l.contains("policy=default/deny-client"))
        .unwrap();
    assert!(
        line.contains(&format!("src.identity={CLIENT_ID}")),
        "{line}"
    );
}

#[test]
fn allow_only_from_one_namespace() {
    let sb = Sandbox::new().unwrap();
    let allow = PolicySpec::new("allow-other", "default", Action::Allow)
        .when(MatchSpec::default().namespace("other"));
    let m = Mesh::up(&sb, vec![allow]);
    let app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();

    assert_eq!(identify(&sb, "other", m.ip("s1", 8080)).unwrap(), "s1");
    let res = identify(&sb, "client", m.ip("s1", 8080));
    assert!(refused(&res), "default's client got an answer: {res:?}");
    assert_eq!(app.accepted(), 1);
    metric_at_least(
        m.s1(),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("response_flags", "DENY"),
            ("source_principal", CLIENT_ID),
        ],
        1.0,
    );
    // The allowed connection's access-log line names the ALLOW that admitted it.
    let log = log_with(m.s1(), "policy=default/allow-other");
    let line = log
        .lines()
        .find(|l| l.contains("policy=default/allow-other"))
        .unwrap();
    assert!(
        line.contains("src.identity=spiffe://cluster.local/ns/other/sa/other"),
        "{line}"
    );
}

#[test]
fn port_rules() {
    let sb = Sandbox::new().unwrap();
    let policies = vec![
        // Only ports 8080 and 9000 are open at all...
        PolicySpec::new("allow-ports", "default", Action::Allow)
            .when(MatchSpec::default().port(8080).port(9000)),
        // ...and 9000 not to `other`.
        PolicySpec::new("deny-other-9000", "default", Action::Deny)
            .when(MatchSpec::default().principal(OTHER_PRINCIPAL).port(9000)),
    ];
    let m = Mesh::up(&sb, policies);
    let _a = EchoServer::start(&sb, "s1", 8080, "s1-8080").unwrap();
    let b = EchoServer::start(&sb, "s1", 9000, "s1-9000").unwrap();
    let c = EchoServer::start(&sb, "s1", 9100, "s1-9100").unwrap();

    assert_eq!(
        identify(&sb, "client", m.ip("s1", 8080)).unwrap(),
        "s1-8080"
    );
    assert_eq!(
        identify(&sb, "client", m.ip("s1", 9000)).unwrap(),
        "s1-9000"
    );
    assert_eq!(identify(&sb, "other", m.ip("s1", 8080)).unwrap(), "s1-8080");
    let res = identify(&sb, "other", m.ip("s1", 9000));
    assert!(refused(&res), "other reached 9000: {res:?}");
    let res = identify(&sb, "client", m.ip("s1", 9100));
    assert!(refused(&res), "a port no ALLOW names was reached: {res:?}");
    assert_eq!(b.accepted(), 1, "9000 saw only the client");
    assert_eq!(c.accepted(), 0, "9100 saw a connection");
    log_with(m.s1(), "policy=default/deny-other-9000");
}

#[test]
fn ip_blocks_on_plaintext_from_an_unmeshed_client() {
    let sb = Sandbox::new().unwrap();
    // Started without policies; the policy (it needs ext's address) arrives by a reload.
    let m = Mesh::up(&sb, vec![]);
    let deny = PolicySpec::new("deny-ext", "default", Action::Deny)
        .when(MatchSpec::default().source_ip(&format!("{}/32", m.topo.host_ip("ext"))));
    m.write_config(vec![deny]);
    poll_some("the policy in s1's config", Duration::from_secs(20), || {
        m.s1().config_dump().ok().filter(|d| d.contains("deny-ext"))
    });
    m.capture_plaintext_inbound();
    let app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();

    // ext is refused on 15006 before the app is connected; ext2 (outside the mesh too) and
    // the meshed client are not.
    let res = identify(&sb, "ext", m.ip("s1", 8080));
    assert!(refused(&res), "ext got an answer: {res:?}");
    assert_eq!(app.accepted(), 0, "the app saw the denied connection");
    assert_eq!(identify(&sb, "ext2", m.ip("s1", 8080)).unwrap(), "s1");
    assert_eq!(identify(&sb, "client", m.ip("s1", 8080)).unwrap(), "s1");
    assert_eq!(app.accepted(), 2);
    metric_at_least(
        m.s1(),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("response_flags", "DENY"),
            ("source_principal", "unknown"),
            ("destination_workload", "s1"),
        ],
        1.0,
    );
    let log = log_with(m.s1(), "policy=default/deny-ext");
    let ext_addr = format!("src.addr={}:", m.topo.host_ip("ext"));
    assert!(
        log.lines()
            .any(|l| l.contains("policy=default/deny-ext") && l.contains(&ext_addr)),
        "{log}"
    );
}

#[test]
fn a_policy_edit_closes_open_connections_it_now_denies() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, vec![]);
    m.capture_plaintext_inbound();
    let _app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();
    let dst = m.ip("s1", 8080);

    // Three open connections: HBONE from client and from other, plaintext from ext.
    let mut from_client = connect(&sb, "client", dst).unwrap();
    let mut from_other = connect(&sb, "other", dst).unwrap();
    let mut from_ext = connect(&sb, "ext", dst).unwrap();
    for s in [&mut from_client, &mut from_other, &mut from_ext] {
        assert_eq!(echo_line(s, b"hello\n").unwrap(), b"hello\n");
    }

    // Deny the client's identity and ext's address.
    m.write_config(vec![
        PolicySpec::new("deny-client", "default", Action::Deny)
            .when(MatchSpec::default().principal(CLIENT_PRINCIPAL)),
        PolicySpec::new("deny-ext", "default", Action::Deny)
            .when(MatchSpec::default().source_ip(&format!("{}/32", m.topo.host_ip("ext")))),
    ]);
    log_with(m.s1(), "policy change: closing");
    assert!(
        closed_by_peer(&mut from_client),
        "the client's connection stayed open"
    );
    assert!(
        closed_by_peer(&mut from_ext),
        "ext's connection stayed open"
    );
    // The connection the new policies allow carries on.
    assert_eq!(echo_line(&mut from_other, b"still\n").unwrap(), b"still\n");

    let log = poll_some("both closures in the log", Duration::from_secs(20), || {
        let l = m.s1().log();
        (l.contains("policy=default/deny-client") && l.contains("policy=default/deny-ext"))
            .then_some(l)
    });
    assert!(log.contains("policy change: closing"), "{log}");
    metric_at_least(
        m.s1(),
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("response_flags", "DENY"),
            ("source_principal", CLIENT_ID),
        ],
        1.0,
    );
    // And new connections follow the new policies.
    let res = identify(&sb, "client", dst);
    assert!(refused(&res), "{res:?}");
    assert_eq!(identify(&sb, "other", dst).unwrap(), "s1");
    let dump: serde_json::Value = serde_json::from_str(&m.s1().config_dump().unwrap()).unwrap();
    assert_eq!(dump["policies"].as_array().unwrap().len(), 2, "{dump}");
}

#[test]
fn dry_run_allows_and_logs_what_it_would_have_done() {
    let sb = Sandbox::new().unwrap();
    let dry = PolicySpec::new("deny-client-dry", "default", Action::Deny)
        .dry_run()
        .when(MatchSpec::default().principal(CLIENT_PRINCIPAL));
    let m = Mesh::up(&sb, vec![dry]);
    let app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();

    assert_eq!(identify(&sb, "client", m.ip("s1", 8080)).unwrap(), "s1");
    assert_eq!(app.accepted(), 1);
    log_with(m.s1(), "dry-run policy default/deny-client-dry would deny");
    let text = m.s1().metrics().unwrap();
    assert_eq!(
        metric_value(
            &text,
            "istio_tcp_connections_opened_total",
            &[("response_flags", "DENY")]
        ),
        0.0,
        "{text}"
    );
    let dump: serde_json::Value = serde_json::from_str(&m.s1().config_dump().unwrap()).unwrap();
    let p = &dump["policies"][0];
    assert_eq!(p["name"], "deny-client-dry");
    assert_eq!(p["namespace"], "default");
    assert_eq!(p["scope"], "Namespace");
    assert_eq!(p["action"], "Deny");
    assert_eq!(p["dry_run"], true);
    assert_eq!(p["rules"], 1);
}

#[test]
fn a_selector_policy_from_the_controller_is_enforced_in_the_selected_pods() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    let (client, web, _web_app) = probe::shop(&cluster);
    let db = cluster
        .create_pod("n2", "shop", "db-a", "db", &[("app", "db")])
        .unwrap();
    let _db_app = EchoServer::start(&sb, &db.netns, 8080, "db-a").unwrap();
    let who = |dst: SocketAddr| identify(&sb, &client.netns, dst);
    poll_some("the client to reach web-a", Duration::from_secs(30), || {
        (who(web.addr(8080)).ok().as_deref() == Some("web-a")).then_some(())
    });
    let mut open = connect(&sb, &client.netns, web.addr(8080)).unwrap();
    assert_eq!(echo_line(&mut open, b"hello\n").unwrap(), b"hello\n");

    // Only pods labelled app=web are selected; the client's identity is denied there.
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/client\"]\n";
    cluster.apply_yaml("deny-client", policy).unwrap();
    let zt = cluster.ztunnel("n2").unwrap();
    log_with(zt, "policy change: closing");
    assert!(closed_by_peer(&mut open), "the open connection stayed open");
    let res = who(web.addr(8080));
    assert!(refused(&res), "web-a still answers the client: {res:?}");
    assert_eq!(who(db.addr(8080)).unwrap(), "db-a", "db is not selected");
    metric_at_least(
        zt,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("response_flags", "DENY"),
            ("source_principal", &client.spiffe_id()),
            ("destination_workload", "web-a"),
        ],
        1.0,
    );
    log_with(zt, "policy=shop/deny-client");

    // Removed: web-a answers again.
    cluster.delete_yaml("deny-client").unwrap();
    poll_some("the policy's removal", Duration::from_secs(30), || {
        (who(web.addr(8080)).ok().as_deref() == Some("web-a")).then_some(())
    });
}
