//! The L4 scenarios of Istio's published security tasks (ambient "secure application access",
//! "explicit deny", "authorization on TCP traffic", IP-based allow, mesh-wide "allow-nothing"),
//! written as our own AuthorizationPolicies and applied the way a user does: as YAML objects the
//! controller watches, translated and pushed over delta xDS, enforced by each node's ztunnel.
//! Each test checks the behaviour those docs describe: a denied client's connection is closed,
//! an allowed one works. Needs root, containernetworking-plugins and the binaries.

use std::net::SocketAddr;
use std::time::Duration;

use zmesh_tests::apps::{EchoServer, identify};
use zmesh_tests::cluster::{Cluster, Pod};
use zmesh_tests::{Sandbox, poll};

const WEB_PORT: u16 = 8080;
const TCP_PORT: u16 = 9000;
/// A push crosses a file watch, a debounce, gRPC and a config swap: be generous.
const CONVERGE: Duration = Duration::from_secs(30);

struct Mesh<'s> {
    cluster: Cluster<'s>,
    web: Pod,
    front: Pod,
    other: Pod,
    legacy: Pod,
    _apps: Vec<EchoServer>,
}

impl Mesh<'_> {
    /// Whether `client` reaches web's app on `port` (and it answers as itself).
    fn reaches(&self, client: &Pod, port: u16) -> bool {
        let dst = SocketAddr::new(self.web.ip, port);
        identify(self.cluster.sandbox(), &client.netns, dst).is_ok_and(|who| who == "web")
    }

    /// Waits until every (client, port, expected) holds at once.
    fn expect(&self, what: &str, cases: &[(&Pod, u16, bool)]) {
        poll(what, CONVERGE, || {
            cases
                .iter()
                .all(|(client, port, want)| self.reaches(client, *port) == *want)
        });
    }
}

/// shop/web (n2; app=web; 8080 and 9000) and three clients on n1: front/front and
/// other/other (enrolled), legacy/plain (not enrolled).
fn mesh(sb: &Sandbox) -> Mesh<'_> {
    let cluster = Cluster::up(sb, &["n1", "n2"]).unwrap();
    for ns in ["shop", "front", "other"] {
        cluster.set_namespace_label(ns, Some("ambient")).unwrap();
    }
    let web = cluster
        .create_pod("n2", "shop", "web", "web", &[("app", "web")])
        .unwrap();
    let apps = vec![
        EchoServer::start(sb, &web.netns, WEB_PORT, "web").unwrap(),
        EchoServer::start(sb, &web.netns, TCP_PORT, "web").unwrap(),
    ];
    let front = cluster
        .create_pod("n1", "front", "front", "front", &[])
        .unwrap();
    let other = cluster
        .create_pod("n1", "other", "other", "other", &[])
        .unwrap();
    let legacy = cluster
        .create_pod("n1", "legacy", "plain", "default", &[])
        .unwrap();
    assert!(web.enrolled && front.enrolled && other.enrolled && !legacy.enrolled);
    let m = Mesh {
        cluster,
        web,
        front,
        other,
        legacy,
        _apps: apps,
    };
    m.expect(
        "everyone to reach web with no policy",
        &[
            (&m.front, WEB_PORT, true),
            (&m.other, WEB_PORT, true),
            (&m.legacy, WEB_PORT, true),
        ],
    );
    m
}

#[test]
fn deny_by_principal_allow_a_namespace_and_ports() {
    let sb = Sandbox::new().unwrap();
    let m = mesh(&sb);

    // "Explicit deny": DENY the other namespace's service account; the rest is unaffected.
    m.cluster
        .apply_yaml(
            "policy-deny-other",
            "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/other/sa/other]}
",
        )
        .unwrap();
    m.expect(
        "other denied by principal, front and legacy still allowed",
        &[
            (&m.other, WEB_PORT, false),
            (&m.front, WEB_PORT, true),
            (&m.legacy, WEB_PORT, true),
        ],
    );
    m.cluster.delete_yaml("policy-deny-other").unwrap();

    // "Allow a namespace": once an ALLOW applies, only what it matches gets in; a plaintext
    // client has no namespace and is denied too.
    m.cluster
        .apply_yaml(
            "policy-allow-front",
            "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-front, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {namespaces: [front]}
",
        )
        .unwrap();
    m.expect(
        "only the front namespace allowed",
        &[
            (&m.front, WEB_PORT, true),
            (&m.other, WEB_PORT, false),
            (&m.legacy, WEB_PORT, false),
        ],
    );
    m.cluster.delete_yaml("policy-allow-front").unwrap();

    // "Authorization on TCP traffic": allow one port only.
    m.cluster
        .apply_yaml(
            "policy-tcp",
            "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-policy, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to:
    - operation: {ports: ['9000']}
",
        )
        .unwrap();
    m.expect(
        "only port 9000 allowed",
        &[
            (&m.front, TCP_PORT, true),
            (&m.front, WEB_PORT, false),
            (&m.other, TCP_PORT, true),
        ],
    );
    m.cluster.delete_yaml("policy-tcp").unwrap();
    m.expect(
        "everything allowed again once the policies are gone",
        &[(&m.front, WEB_PORT, true), (&m.other, WEB_PORT, true)],
    );
}

#[test]
fn ip_blocks_on_plaintext_and_mesh_wide_default_deny() {
    let sb = Sandbox::new().unwrap();
    let m = mesh(&sb);
    let second = m
        .cluster
        .create_pod("n1", "legacy", "plain-2", "default", &[])
        .unwrap();

    // An IP-based allow, enforced on plaintext traffic from unenrolled pods.
    m.cluster
        .apply_yaml(
            "policy-ip",
            &format!(
                "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-legacy-ip, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{ipBlocks: ['{}/32']}}
",
                m.legacy.ip
            ),
        )
        .unwrap();
    m.expect(
        "only the listed IP allowed",
        &[
            (&m.legacy, WEB_PORT, true),
            (&second, WEB_PORT, false),
            (&m.front, WEB_PORT, false),
        ],
    );
    m.cluster.delete_yaml("policy-ip").unwrap();

    // Mesh-wide default deny: an ALLOW with no rules in the root namespace ("allow-nothing")
    // denies everything...
    m.cluster
        .apply_yaml(
            "policy-allow-nothing",
            "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: istio-system}
spec: {}
",
        )
        .unwrap();
    m.expect(
        "everything denied",
        &[
            (&m.front, WEB_PORT, false),
            (&m.other, WEB_PORT, false),
            (&m.legacy, WEB_PORT, false),
        ],
    );
    // ...until an ALLOW opens exactly what it names.
    m.cluster
        .apply_yaml(
            "policy-allow-front",
            "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-front, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/front/sa/front]}
",
        )
        .unwrap();
    m.expect(
        "front allowed through the default deny, the others still denied",
        &[
            (&m.front, WEB_PORT, true),
            (&m.other, WEB_PORT, false),
            (&m.legacy, WEB_PORT, false),
        ],
    );
}
