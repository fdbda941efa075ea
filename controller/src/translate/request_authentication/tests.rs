use super::*;
use crate::translate::Objects;

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"a","y":"b","kid":"k"}]}"#;

fn bound(ns: &str, name: &str, waypoint: &str) -> (String, pb::BoundService) {
    let hostname = format!("{name}.{ns}.svc.cluster.local");
    (
        format!("{ns}/{hostname}"),
        pb::BoundService {
            name: name.into(),
            namespace: ns.into(),
            hostname,
            waypoint: Some(pb::GatewayRef {
                namespace: ns.into(),
                name: waypoint.into(),
            }),
            ..Default::default()
        },
    )
}

fn services() -> BTreeMap<String, pb::BoundService> {
    [
        bound("foo", "httpbin", "waypoint"),
        bound("foo", "echo", "waypoint"),
        bound("foo", "other", "second"),
        bound("bar", "httpbin", "waypoint"),
    ]
    .into()
}

fn run(yaml: &str) -> RequestAuthn {
    let objects = Objects::from_yaml(yaml).unwrap();
    translate_request_authn(&objects.request_authentications, &services())
}

fn policy(name: &str, target: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: {name}\n  namespace: foo\nspec:\n{target}\n  jwtRules:\n{rules}\n---\n"
    )
}

const TO_WAYPOINT: &str =
    "  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: waypoint";
const TO_HTTPBIN: &str = "  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: httpbin";

fn rule(issuer: &str) -> String {
    format!("  - issuer: {issuer}\n    jwks: '{JWKS}'\n")
}

#[test]
fn targets_attach_to_the_bound_services_of_the_waypoint_or_the_service() {
    let out = run(&format!(
        "{}{}",
        policy("a", TO_WAYPOINT, &rule("one@example.com")),
        policy(
            "b",
            TO_HTTPBIN,
            "  - issuer: two@example.com\n    jwksUri: https://idp.example.com/jwks.json\n    \
             audiences: [httpbin]\n    fromHeaders:\n    - name: x-jwt\n      prefix: 'Token '\n    \
             fromParams: [tok]\n    outputPayloadToHeader: x-jwt-payload\n    \
             forwardOriginalToken: true\n    outputClaimToHeaders:\n    - header: x-sub\n      \
             claim: sub\n    timeout: 1.5s\n"
        )
    ));
    assert!(out.issues.is_empty(), "{:?}", out.issues);
    let keys: Vec<_> = out.services.keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "foo/echo.foo.svc.cluster.local",
            "foo/httpbin.foo.svc.cluster.local"
        ]
    );
    let echo = &out.services["foo/echo.foo.svc.cluster.local"];
    assert_eq!(echo.rules.len(), 1);
    assert_eq!(echo.rules[0].issuer, "one@example.com");
    assert_eq!(echo.rules[0].jwks, JWKS);
    let httpbin = &out.services["foo/httpbin.foo.svc.cluster.local"];
    let issuers: Vec<_> = httpbin.rules.iter().map(|r| r.issuer.as_str()).collect();
    assert_eq!(issuers, ["one@example.com", "two@example.com"]);
    let r = &httpbin.rules[1];
    assert_eq!(r.policy, "foo/b");
    assert_eq!(r.jwks_uri, "https://idp.example.com/jwks.json");
    assert_eq!(r.audiences, ["httpbin"]);
    assert_eq!(r.from_headers[0].name, "x-jwt");
    assert_eq!(r.from_headers[0].prefix, "Token ");
    assert_eq!(r.from_params, ["tok"]);
    assert!(r.forward_original_token);
    assert_eq!(r.output_payload_to_header, "x-jwt-payload");
    assert_eq!(r.output_claim_to_headers[0].claim, "sub");
    assert_eq!(
        r.timeout,
        Some(prost_types::Duration {
            seconds: 1,
            nanos: 500_000_000
        })
    );
}

#[test]
fn selector_policies_do_not_apply_in_ambient_and_say_so() {
    let out = run(&policy(
        "sel",
        "  selector:\n    matchLabels:\n      app: httpbin",
        &rule("one@example.com"),
    ));
    assert!(out.services.is_empty());
    assert_eq!(out.issues.len(), 1);
    assert!(
        out.issues[0]
            .message
            .contains("ztunnel, which cannot validate JWTs"),
        "{}",
        out.issues[0]
    );
}

#[test]
fn a_policy_with_one_bad_rule_is_refused_whole_with_the_field_named() {
    let cases = [
        ("  - issuer: ''\n    jwks: '{}'\n", "jwtRules[1].issuer"),
        (
            "  - issuer: x\n    jwks: '{}'\n    jwksUri: https://a/b\n",
            "exactly one of jwks and jwksUri",
        ),
        ("  - issuer: x\n", "OpenID discovery"),
        (
            "  - issuer: x\n    jwksUri: ftp://a/b\n",
            "jwtRules[1].jwksUri",
        ),
        ("  - issuer: x\n    jwks: '{\"keys\": []}'\n", "has no key"),
        (
            "  - issuer: x\n    jwks: 'nope'\n",
            "jwtRules[1].jwks: not JSON",
        ),
        (
            "  - issuer: x\n    jwksUri: https://a/b\n    fromCookies: [session]\n",
            "fromCookies",
        ),
        (
            "  - issuer: x\n    jwksUri: https://a/b\n    fromHeaders:\n    - name: 'bad name'\n",
            "fromHeaders[0].name",
        ),
        (
            "  - issuer: x\n    jwksUri: https://a/b\n    timeout: 5m\n",
            "jwtRules[1].timeout",
        ),
        (
            "  - issuer: x\n    jwksUri: https://a/b\n    jwksURI: https://a/b\n",
            "unknown field `jwksURI`",
        ),
    ];
    for (bad, expect) in cases {
        let out = run(&policy(
            "p",
            TO_WAYPOINT,
            &format!("{}{bad}", rule("good@example.com")),
        ));
        assert!(
            out.services.is_empty(),
            "{bad}: nothing of the policy applies"
        );
        assert_eq!(out.issues.len(), 1, "{bad}: {:?}", out.issues);
        let m = &out.issues[0].message;
        assert!(m.starts_with("refused") && m.contains(expect), "{bad}: {m}");
    }
}

/// A rule with its token in `header` and the given extra lines.
fn rule_in(issuer: &str, header: Option<&str>, more: &str) -> String {
    let from = header.map_or(String::new(), |h| {
        format!("    fromHeaders:\n    - name: {h}\n")
    });
    format!("{}{from}{more}", rule(issuer))
}

#[test]
fn an_output_header_that_a_rule_reads_its_token_from_refuses_the_policy() {
    let cases = [
        // Another rule's header, named in other letters' case.
        (
            format!(
                "{}{}",
                rule_in("a", None, "    outputPayloadToHeader: X-Token\n"),
                rule_in("b", Some("x-token"), "")
            ),
            "jwtRules[0].outputPayloadToHeader: \"X-Token\" is the header jwtRules[1] reads",
        ),
        // Its own default header, `Authorization`.
        (
            rule_in(
                "a",
                None,
                "    outputClaimToHeaders:\n    - header: authorization\n      claim: sub\n",
            ),
            "jwtRules[0].outputClaimToHeaders[0].header: \"authorization\" is the header \
             jwtRules[0] reads",
        ),
    ];
    for (rules, expect) in cases {
        let out = run(&policy("p", TO_WAYPOINT, &rules));
        assert!(
            out.services.is_empty(),
            "{rules}: nothing of the policy applies"
        );
        assert_eq!(out.issues.len(), 1, "{rules}: {:?}", out.issues);
        let m = &out.issues[0].message;
        assert!(
            m.starts_with("refused: ") && m.contains(expect) && m.ends_with("different headers"),
            "{rules}: {m}"
        );
    }
    // Parameters only: no header is read, so an output to `Authorization` is the rule's own.
    let params_only = rule_in(
        "a",
        None,
        "    fromParams: [tok]\n    outputPayloadToHeader: authorization\n",
    );
    let out = run(&policy("p", TO_WAYPOINT, &params_only));
    assert!(out.issues.is_empty(), "{:?}", out.issues);
    assert_eq!(out.services.len(), 2);
}

/// `policy` created at `created` (RFC 3339).
fn policy_created(name: &str, created: &str, target: &str, rules: &str) -> String {
    policy(name, target, rules).replacen(
        "  namespace: foo\n",
        &format!("  namespace: foo\n  creationTimestamp: \"{created}\"\n"),
        1,
    )
}

#[test]
fn a_policy_whose_headers_clash_with_another_on_a_service_is_refused_there_only() {
    // `a` (httpbin) reads the default `Authorization`, which `b` (every Service of the
    // waypoint: echo and httpbin; its own token in a parameter) writes. Then `a` writes the
    // header `b` reads. With neither created before the other, the later by name is refused.
    let writes_authorization = rule_in(
        "two",
        None,
        "    fromParams: [tok]\n    outputPayloadToHeader: Authorization\n",
    );
    let cases = [
        (
            policy("a", TO_HTTPBIN, &rule("one")),
            policy("b", TO_WAYPOINT, &writes_authorization),
            "b",
            "RequestAuthentication foo/b's jwtRules[0].outputPayloadToHeader (\"Authorization\") \
             is the header RequestAuthentication foo/a's jwtRules[0] reads its token from by \
             default",
            ["foo/b"],
        ),
        (
            policy(
                "a",
                TO_HTTPBIN,
                &rule_in("one", None, "    outputPayloadToHeader: x-two\n"),
            ),
            policy("b", TO_WAYPOINT, &rule_in("two", Some("x-two"), "")),
            "b",
            "RequestAuthentication foo/a's jwtRules[0].outputPayloadToHeader (\"x-two\") is the \
             header RequestAuthentication foo/b's jwtRules[0] reads its token from;",
            ["foo/b"],
        ),
        // `b` created first: it stays, and `a`, created later, is refused on httpbin.
        (
            policy_created("a", "2026-12-02T00:00:00Z", TO_HTTPBIN, &rule("one")),
            policy_created(
                "b",
                "2026-12-01T00:00:00Z",
                TO_WAYPOINT,
                &writes_authorization,
            ),
            "a",
            "RequestAuthentication foo/b's jwtRules[0].outputPayloadToHeader (\"Authorization\") \
             is the header RequestAuthentication foo/a's jwtRules[0] reads its token from by \
             default",
            ["foo/b"],
        ),
    ];
    for (a, b, refused, expect, on_echo) in cases {
        let out = run(&format!("{a}{b}"));
        assert_eq!(out.issues.len(), 1, "{b}: {:?}", out.issues);
        let issue = &out.issues[0];
        assert_eq!(issue.name, refused);
        assert!(
            issue
                .message
                .starts_with("refused for Service foo/httpbin: ")
                && issue.message.contains(expect),
            "{}",
            issue.message
        );
        let policies = |service: &str| -> Vec<String> {
            out.services[&format!("foo/{service}.foo.svc.cluster.local")]
                .rules
                .iter()
                .map(|r| r.policy.clone())
                .collect()
        };
        // Refused on httpbin only: each Service keeps the other policy's rules.
        assert_eq!(policies("echo"), on_echo);
        let kept = if refused == "a" { "foo/b" } else { "foo/a" };
        assert_eq!(policies("httpbin"), [kept]);
    }
}

#[test]
fn a_policy_whose_targets_name_a_service_twice_applies_there_once() {
    let both = format!("{TO_WAYPOINT}\n  - kind: Service\n    group: \"\"\n    name: httpbin");
    let out = run(&policy("a", &both, &rule("one")));
    assert!(out.issues.is_empty(), "{:?}", out.issues);
    let rules = &out.services["foo/httpbin.foo.svc.cluster.local"].rules;
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        out.services["foo/echo.foo.svc.cluster.local"].rules.len(),
        1
    );
}

#[test]
fn unsupported_or_empty_targets_are_reported() {
    let out = run(&format!(
        "{}{}",
        policy(
            "class",
            "  targetRefs:\n  - kind: GatewayClass\n    group: gateway.networking.k8s.io\n    name: istio-waypoint",
            &rule("one@example.com"),
        ),
        policy(
            "nobody",
            "  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: unbound",
            &rule("one@example.com"),
        )
    ));
    assert!(out.services.is_empty());
    let messages: Vec<_> = out.issues.iter().map(|i| i.message.as_str()).collect();
    assert!(messages[0].contains("GatewayClass"), "{messages:?}");
    assert!(messages[1].contains("no Service bound"), "{messages:?}");
}

/// A targetRef's kind is the tenant's text until it is matched: the issue that reports it
/// (in the controller's log) keeps it on one line, escaped.
#[test]
fn a_targetref_kind_cannot_break_an_issue_into_lines() {
    let out = run(&policy(
        "forged",
        "  targetRefs:\n  - kind: \"Service\\nFORGED line\"\n    group: \"\"\n    name: httpbin\n    namespace: bar",
        &rule("one@example.com"),
    ));
    let messages: Vec<_> = out.issues.iter().map(|i| i.message.as_str()).collect();
    assert!(
        messages.iter().any(|m| m.contains("Service\\nFORGED line"))
            && messages.iter().all(|m| !m.contains('\n')),
        "{messages:?}"
    );
}
