//! Attachment, validation and the no-waypoint rule, through the whole translation.

use xds_proto::istio::security::Scope;

use super::super::{Objects, translate};
use super::*;

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: app}
spec: {clusterIP: 10.96.0.11, selector: {app: plain}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-1, namespace: app, labels: {app: plain}}
spec: {nodeName: n1, serviceAccountName: plain, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.0.0.5, conditions: [{type: Ready, status: "True"}]}
"#;

fn policy(ns: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec: {body}\n"
    )
}

const ECHO: &str = "app/echo.app.svc.cluster.local";

fn run(policies: &str) -> crate::translate::Translated {
    let objects = Objects::from_yaml(&format!("{WORLD}{policies}")).unwrap();
    translate(&objects, &MeshConfig::default())
}

fn place<'a>(t: &'a crate::translate::Translated, name: &str) -> &'a Placement {
    let ns = if name == "root" {
        "istio-system"
    } else {
        "app"
    };
    &t.waypoint_authz.placements[&(ns.to_owned(), name.to_owned())]
}

#[test]
fn gateway_service_and_gateway_class_attachment() {
    let t = run(&[
        policy(
            "app",
            "gw",
            "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}], \
             rules: [{to: [{operation: {methods: [GET]}}]}]}",
        ),
        policy(
            "app",
            "svc",
            "{action: DENY, targetRefs: [{kind: Service, group: \"\", name: echo}], \
             rules: [{from: [{source: {serviceAccounts: [sleep]}}], to: [{operation: {paths: [\"/admin/{**}\"]}}]}]}",
        ),
        policy(
            "istio-system",
            "root",
            "{action: AUDIT, targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}], rules: [{}]}",
        ),
        policy("app", "sel", "{selector: {matchLabels: {app: echo}}, rules: [{}]}"),
    ]
    .concat());
    let r = &t.waypoint_authz.resources;
    let gw = &r["app/waypoint/app/gw"];
    assert!(gw.all_services && gw.services.is_empty());
    assert_eq!(gw.action, pb::PolicyAction::Allow as i32);
    assert_eq!(gw.rules[0].to[0].methods, ["GET"]);
    assert_eq!(gw.waypoint.as_ref().unwrap().name, "waypoint");
    let svc = &r["app/waypoint/app/svc"];
    assert!(!svc.all_services);
    assert_eq!(svc.services, [ECHO]);
    assert_eq!(
        svc.rules[0].from[0].service_accounts,
        ["app/sleep"],
        "a plain service account is the policy's namespace"
    );
    assert!(r["app/waypoint/istio-system/root"].all_services);
    assert!(
        !r.keys().any(|k| k.ends_with("/sel")),
        "selector policies stay at ztunnel"
    );
    assert!(t.authorizations.contains_key("app/sel"));
    assert!(!t.authorizations.contains_key("app/gw"));
    assert_eq!(place(&t, "gw").waypoints, ["app/waypoint"]);
    assert!(place(&t, "gw").messages.is_empty());

    let conds = crate::status::conditions(
        &Objects::from_yaml(&format!(
            "{WORLD}{}",
            policy(
                "app",
                "gw",
                "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]}"
            )
        ))
        .unwrap(),
        &run(&policy(
            "app",
            "gw",
            "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]}",
        )),
    );
    let c = &conds[&("app".to_owned(), "gw".to_owned())];
    assert_eq!(
        (c.kind, c.status, c.reason, c.message.as_str()),
        (
            "WaypointAccepted",
            "True",
            "Accepted",
            "enforced at: waypoint (app/waypoint)"
        )
    );
}

#[test]
fn a_service_without_waypoint_is_enforced_by_ztunnel() {
    let deny = policy(
        "app",
        "plain-deny",
        "{action: DENY, targetRefs: [{kind: Service, name: plain}], \
         rules: [{from: [{source: {namespaces: [evil]}}], to: [{operation: {paths: [/admin]}}]}]}",
    );
    let both = policy(
        "app",
        "both",
        "{targetRefs: [{kind: Service, name: plain}, {kind: Service, name: echo}], \
         rules: [{from: [{source: {namespaces: [good]}}]}]}",
    );
    let t = run(&format!("{deny}{both}"));
    let auth = &t.authorizations["app/plain-deny"];
    assert_eq!(auth.scope, Scope::WorkloadSelector as i32);
    assert_eq!(auth.action, xds_proto::istio::security::Action::Deny as i32);
    assert_eq!(
        auth.rules[0].clauses.len(),
        1,
        "the DENY keeps its L4 part (namespaces) and loses the path: it denies more"
    );
    let pod = t
        .workloads
        .values()
        .find(|w| w.name == "plain-1")
        .expect("the pod is translated");
    assert_eq!(pod.authorization_policies, ["app/both", "app/plain-deny"]);
    assert!(place(&t, "plain-deny").ztunnel);
    assert!(place(&t, "plain-deny").waypoints.is_empty());
    let b = place(&t, "both");
    assert!(b.ztunnel && b.waypoints == ["app/waypoint"]);
    assert_eq!(
        t.waypoint_authz.resources["app/waypoint/app/both"].services,
        [ECHO]
    );

    let objects = Objects::from_yaml(&format!("{WORLD}{deny}{both}")).unwrap();
    let conds = crate::status::conditions(&objects, &t);
    let c = &conds[&("app".to_owned(), "plain-deny".to_owned())];
    assert!(
        c.message.starts_with("enforced at: ztunnel (no waypoint)")
            && c.message.contains("denies at least as much"),
        "{c:?}"
    );
    let c = &conds[&("app".to_owned(), "both".to_owned())];
    assert!(c.message.starts_with("enforced at: both"), "{c:?}");
}

#[test]
fn refusals_never_widen_access() {
    let t = run(&[
        policy(
            "app",
            "custom",
            "{action: CUSTOM, provider: {name: x}, targetRefs: [{kind: Service, name: echo}], rules: [{}]}",
        ),
        policy(
            "app",
            "bad-allow",
            "{targetRefs: [{kind: Service, name: echo}], rules: [\
             {from: [{source: {ipBlocks: [\"10.0.0.0/99\"]}}]}, {to: [{operation: {methods: [GET]}}]}]}",
        ),
        policy(
            "app",
            "bad-deny",
            "{action: DENY, targetRefs: [{kind: Service, name: echo}], rules: [\
             {to: [{operation: {paths: [\"/a{*}\"]}}]}]}",
        ),
        policy(
            "app",
            "bad-key",
            "{action: DENY, targetRefs: [{kind: Service, name: echo}], rules: [\
             {when: [{key: experimental.envoy.filters.x, values: [\"1\"]}]}]}",
        ),
        policy(
            "app",
            "elsewhere",
            "{targetRefs: [{kind: Service, name: echo, namespace: other}, {kind: Pod, name: x}]}",
        ),
    ]
    .concat());
    let r = &t.waypoint_authz.resources;
    assert!(!r.keys().any(|k| k.ends_with("/custom")));
    assert!(!t.authorizations.contains_key("app/custom"));
    assert!(place(&t, "custom").messages[0].contains("CUSTOM is not supported"));
    let allow = &r["app/waypoint/app/bad-allow"];
    assert_eq!(allow.rules.len(), 1, "the invalid ALLOW rule is left out");
    assert_eq!(allow.rules[0].to[0].methods, ["GET"]);
    assert!(
        place(&t, "bad-allow").messages[0].contains("rules[0].from[0].source.ipBlocks[0]"),
        "{:?}",
        place(&t, "bad-allow")
    );
    for name in ["bad-deny", "bad-key"] {
        let deny = &r[&format!("app/waypoint/app/{name}")];
        assert_eq!(
            deny.rules,
            [pb::PolicyRule::default()],
            "{name}: an invalid DENY rule matches every request"
        );
    }
    assert!(place(&t, "bad-key").messages[0].contains("when[0].key"));
    let e = place(&t, "elsewhere");
    assert!(e.waypoints.is_empty() && !e.ztunnel);
    assert_eq!(e.messages.len(), 2, "{e:?}");
}

/// A targetRef's kind is the tenant's text until it is matched: the message that reports it
/// (in the policy's status and the controller's log) keeps it on one line, escaped.
#[test]
fn a_targetref_kind_cannot_break_a_message_into_lines() {
    let t = run(&policy(
        "app",
        "forged",
        "{targetRefs: [{kind: \"Service\\nFORGED line\", group: \"\", name: echo, \
         namespace: other}], rules: [{}]}",
    ));
    let messages = &place(&t, "forged").messages;
    assert!(
        messages.iter().any(|m| m.contains("Service\\nFORGED line"))
            && messages.iter().all(|m| !m.contains('\n')),
        "{messages:?}"
    );
}
