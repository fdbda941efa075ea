//! Consumer and producer routes end to end (GEP-1426 "Namespace boundaries": a route whose
//! Service parent is in another namespace is a consumer route, for clients of the route's
//! namespace only; a route in the Service's namespace is a producer route, for everyone else;
//! a client with consumer routes uses those, not the producer's). Two client namespaces: the
//! consumer namespace and the mesh namespace itself (one of its echo pods as the client), both
//! calling the `echo` Service through the real controller, ztunnels and waypoint.

use super::*;

/// The consumer route: in the consumer namespace, parent `echo` of the mesh namespace, its
/// answers tagged `x-route: consumer`; the ReferenceGrant that lets it send to `echo` there.
fn consumer_route() -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: consumer\n  \
         namespace: {CONSUMER}\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    \
         name: echo\n    namespace: {MESH}\n    port: 80\n  rules:\n  - filters:\n    \
         - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set:\n        \
         - name: x-route\n          value: consumer\n    backendRefs:\n    - name: echo\n      \
         namespace: {MESH}\n      port: 80\n---\napiVersion: gateway.networking.k8s.io/v1beta1\n\
         kind: ReferenceGrant\nmetadata:\n  name: consumer-to-echo\n  namespace: {MESH}\nspec:\n  \
         from:\n  - group: gateway.networking.k8s.io\n    kind: HTTPRoute\n    namespace: \
         {CONSUMER}\n  to:\n  - group: \"\"\n    kind: Service\n    name: echo\n"
    )
}

/// The producer route: in the mesh namespace, parent `echo`, answers tagged
/// `x-route: producer`.
fn producer_route() -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: producer\n  \
         namespace: {MESH}\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    \
         name: echo\n    port: 80\n  rules:\n  - filters:\n    - type: ResponseHeaderModifier\n      \
         responseHeaderModifier:\n        set:\n        - name: x-route\n          \
         value: producer\n    backendRefs:\n    - name: echo\n      port: 80\n"
    )
}

/// The `x-route` header of `pod`'s answer from `echo` ("" without one), or `None` when the
/// request failed.
fn route_seen(w: &World, pod: &str, path: &str) -> Option<String> {
    let out = w.lab.exec(
        pod,
        &[
            "curl",
            "-sS",
            "-m",
            "30",
            "-o",
            "/dev/null",
            "-D",
            "-",
            &http(path),
        ],
    );
    if !out.status.success() {
        return None;
    }
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    head.lines().next().filter(|l| l.contains(" 200"))?;
    Some(
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("x-route")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_default(),
    )
}

/// Polls until the consumer's pod sees `consumer` and `producer_pod` sees `producer` (each
/// `x-route` value, "" for none), then checks it holds for a few more requests.
fn expect(w: &World, producer_pod: &str, what: &str, consumer: &str, producer: &str) {
    let seen = || {
        (
            route_seen(w, &w.from, "/route"),
            route_seen(w, producer_pod, "/route"),
        )
    };
    let want = (Some(consumer.to_owned()), Some(producer.to_owned()));
    let deadline = Instant::now() + PUSH_DEADLINE;
    loop {
        let got = seen();
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: (consumer namespace, mesh namespace) saw {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for _ in 0..3 {
        assert_eq!(seen(), want, "{what}: not stable");
    }
}

/// The steps: a consumer route alone, then with a producer route, then the producer's alone.
pub fn consumer_and_producer_routes(w: &World, producer_pod: &str) {
    expect(w, producer_pod, "no route yet", "", "");
    w.lab.ok(&["apply", "-f", "-"], Some(&consumer_route()));
    expect(
        w,
        producer_pod,
        "a consumer route applies to its own namespace only",
        "consumer",
        "",
    );
    w.lab.ok(&["apply", "-f", "-"], Some(&producer_route()));
    expect(
        w,
        producer_pod,
        "the consumer route takes precedence over the producer's for its namespace",
        "consumer",
        "producer",
    );
    w.lab.ok(&["delete", "-f", "-"], Some(&consumer_route()));
    expect(
        w,
        producer_pod,
        "without the consumer route, the producer's applies to everyone",
        "producer",
        "producer",
    );
    w.lab.ok(&["delete", "-f", "-"], Some(&producer_route()));
    expect(w, producer_pod, "both routes deleted", "", "");
}
