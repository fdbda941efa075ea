//! Authorization in the API-server double: the RBAC rules of the install (`manifests/`, read
//! through [`crate::manifests`]) for requests authenticated as a service account, as the real
//! API server's RBAC authorizer decides them, so a rule missing from the YAML fails a test.
//!
//! - Who: the `Authorization: Bearer` token, looked up among the tokens the test registered
//!   ([`super::ApiServer::add_token`]). A token of a service account
//!   (`system:serviceaccount:<ns>:<name>`) is authorized by RBAC; any other known token, and a
//!   request without one, keeps full access (the tests' admin); an unknown token is `401`.
//! - What: the request's attributes as upstream's request-info resolver derives them from
//!   the method and path (`k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`): verb
//!   `get`/`list`/`watch` (`?watch=true`)/`create`/`update`/`patch`/`delete`/
//!   `deletecollection`, API group, resource, subresource, namespace, name.
//! - Rules as `k8s.io/kubernetes/pkg/apis/rbac/v1/evaluation_helpers.go` matches them: `*`
//!   for verbs, groups and resources; `resource/subresource` and `*/subresource`;
//!   `resourceNames` only for a named request; a RoleBinding grants only in its namespace.
//! - A refusal is `403` with a `Status` whose message is the real server's
//!   (`k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go`, `forbiddenMessage`):
//!   `pods is forbidden: User "system:serviceaccount:ns:sa" cannot list resource "pods" in API
//!   group "" at the cluster scope`.

use std::collections::HashMap;

use http::{Method, StatusCode, request::Parts};
use serde_json::{Value, json};

use super::{ApiServer, Body, State, TokenInfo, status};
use crate::manifests::{Component, Manifests};

/// One `rules[]` entry of a Role or ClusterRole.
#[derive(Debug, Clone, Default)]
struct Rule {
    verbs: Vec<String>,
    api_groups: Vec<String>,
    resources: Vec<String>,
    resource_names: Vec<String>,
}

/// A Role (`namespace: Some`) or ClusterRole.
#[derive(Debug, Clone)]
struct Role {
    namespace: Option<String>,
    name: String,
    rules: Vec<Rule>,
}

/// A RoleBinding (`namespace: Some`) or ClusterRoleBinding.
#[derive(Debug, Clone)]
struct Binding {
    namespace: Option<String>,
    /// (`Role` or `ClusterRole`, name).
    role: (String, String),
    subjects: Vec<Value>,
}

/// The RBAC objects the double authorizes with.
#[derive(Debug, Clone, Default)]
pub struct Rbac {
    roles: Vec<Role>,
    bindings: Vec<Binding>,
}

/// What a request asks for (upstream's `authorizer.Attributes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: String,
    /// API group (`""` for the core group).
    pub group: String,
    /// Resource (plural); empty for a non-resource path.
    pub resource: String,
    /// Subresource (`status`...), or empty.
    pub subresource: String,
    /// Namespace, or empty (cluster scope).
    pub namespace: String,
    /// Object name, or empty.
    pub name: String,
    /// The path (for non-resource requests).
    pub path: String,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

fn any_matches(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

impl Rule {
    fn allows(&self, a: &Attributes) -> bool {
        any_matches(&self.verbs, &a.verb)
            && any_matches(&self.api_groups, &a.group)
            && self.resources.iter().any(|r| {
                if r == "*" {
                    return true;
                }
                if a.subresource.is_empty() {
                    return *r == a.resource;
                }
                *r == format!("{}/{}", a.resource, a.subresource)
                    || *r == format!("*/{}", a.subresource)
            })
            && (self.resource_names.is_empty()
                || (!a.name.is_empty() && self.resource_names.contains(&a.name)))
    }
}

impl Rbac {
    /// The RBAC objects (Role, ClusterRole, RoleBinding, ClusterRoleBinding) among `objects`.
    pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Value>) -> Rbac {
        let mut rbac = Rbac::default();
        for o in objects {
            let namespace = o["metadata"]["namespace"].as_str().map(str::to_owned);
            let name = o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match o["kind"].as_str() {
                Some(kind @ ("Role" | "ClusterRole")) => rbac.roles.push(Role {
                    namespace: (kind == "Role").then(|| namespace.unwrap_or_default()),
                    name,
                    rules: o["rules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| Rule {
                            verbs: strings(&r["verbs"]),
                            api_groups: strings(&r["apiGroups"]),
                            resources: strings(&r["resources"]),
                            resource_names: strings(&r["resourceNames"]),
                        })
                        .collect(),
                }),
                Some(kind @ ("RoleBinding" | "ClusterRoleBinding")) => {
                    rbac.bindings.push(Binding {
                        namespace: (kind == "RoleBinding").then(|| namespace.unwrap_or_default()),
                        role: (
                            o["roleRef"]["kind"].as_str().unwrap_or_default().to_owned(),
                            o["roleRef"]["name"].as_str().unwrap_or_default().to_owned(),
                        ),
                        subjects: o["subjects"].as_array().cloned().unwrap_or_default(),
                    })
                }
                _ => {}
            }
        }
        rbac
    }

    /// The RBAC of an install.
    pub fn from_manifests(manifests: &Manifests) -> Rbac {
        Self::from_objects(manifests.objects())
    }

    /// The RBAC of the checked-in install (`manifests/rendered/zmesh.yaml`).
    pub fn install() -> Rbac {
        Self::from_manifests(&Manifests::rendered().expect("manifests/rendered/zmesh.yaml parses"))
    }

    fn subject_is(subject: &Value, user: &str, groups: &[String]) -> bool {
        let name = subject["name"].as_str().unwrap_or_default();
        match subject["kind"].as_str() {
            Some("ServiceAccount") => {
                let ns = subject["namespace"].as_str().unwrap_or_default();
                user == format!("system:serviceaccount:{ns}:{name}")
            }
            Some("User") => user == name,
            Some("Group") => groups.iter().any(|g| g == name),
            _ => false,
        }
    }

    /// Whether a binding of `user` (in `groups`) grants `a`.
    pub fn allows(&self, user: &str, groups: &[String], a: &Attributes) -> bool {
        self.bindings.iter().any(|b| {
            // A RoleBinding grants in its own namespace only.
            if let Some(ns) = &b.namespace
                && *ns != a.namespace
            {
                return false;
            }
            if !b.subjects.iter().any(|s| Self::subject_is(s, user, groups)) {
                return false;
            }
            let role = self.roles.iter().find(|r| {
                r.name == b.role.1
                    && match b.role.0.as_str() {
                        "ClusterRole" => r.namespace.is_none(),
                        // A RoleBinding's Role is in the binding's namespace.
                        "Role" => r.namespace.is_some() && r.namespace == b.namespace,
                        _ => false,
                    }
            });
            role.is_some_and(|r| r.rules.iter().any(|rule| rule.allows(a)))
        })
    }
}

/// The request's attributes, as upstream's request-info resolver derives them; `None` for a
/// non-resource request (`/version`, discovery), which every authenticated user may make (the
/// `system:discovery` role).
pub fn attributes(
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
) -> Option<Attributes> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    if rest.is_empty() {
        return None;
    }
    let mut namespace = "";
    let mut rest = rest;
    if rest[0] == "namespaces" && rest.len() > 1 {
        namespace = rest[1];
        // `/namespaces/<name>` and `/namespaces/<name>/status` are the Namespace itself.
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    }
    let resource = rest[0];
    let name = rest.get(1).copied().unwrap_or_default();
    let subresource = rest.get(2).copied().unwrap_or_default();
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if name.is_empty() => "list",
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if name.is_empty() => "deletecollection",
        Method::DELETE => "delete",
        _ => "",
    };
    Some(Attributes {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource: resource.to_owned(),
        subresource: subresource.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        path: path.to_owned(),
    })
}

/// The real server's refusal message for `user` asking `a`.
pub fn forbidden_message(user: &str, a: &Attributes) -> String {
    let mut resource = a.resource.clone();
    if !a.subresource.is_empty() {
        resource = format!("{resource}/{}", a.subresource);
    }
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace {:?}", a.namespace)
    };
    let why = format!(
        "User {user:?} cannot {} resource {resource:?} in API group {:?} {scope}",
        a.verb, a.group
    );
    // The qualified resource: `pods`, `endpointslices.discovery.k8s.io`.
    let qualified = if a.group.is_empty() {
        a.resource.clone()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    if a.name.is_empty() {
        format!("{qualified} is forbidden: {why}")
    } else {
        format!("{qualified} {:?} is forbidden: {why}", a.name)
    }
}

/// The answer to a request its caller may not make (`401` for an unknown token, `403` for a
/// service account RBAC does not allow), recorded in [`State::denied`]; `None` to go on.
pub(super) fn check(
    st: &mut State,
    parts: &Parts,
    query: &HashMap<String, String>,
) -> Option<http::Response<Body>> {
    let token = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?;
    let Some(info) = st.tokens.get(token) else {
        st.denied
            .push(format!("401 {} {}", parts.method, parts.uri.path()));
        return Some(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            json!({}),
        ));
    };
    if !info.username.starts_with("system:serviceaccount:") {
        return None;
    }
    let mut a = attributes(&parts.method, parts.uri.path(), query)?;
    if st.rbac.allows(&info.username, &info.groups, &a) {
        // An apply that would create its object must be allowed to `create` too (upstream's
        // `k8s.io/apiserver/pkg/endpoints/handlers/patch.go` authorizes the create).
        let apply = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/apply-patch"));
        if !(a.verb == "patch" && apply && st.exists_at(parts.uri.path()) == Some(false)) {
            return None;
        }
        a.verb = "create".into();
        if st.rbac.allows(&info.username, &info.groups, &a) {
            return None;
        }
    }
    let message = forbidden_message(&info.username, &a);
    st.denied.push(message.clone());
    Some(status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &message,
        json!({"name": a.name, "group": a.group, "kind": a.resource}),
    ))
}

impl ApiServer {
    /// Authorizes service accounts with `rbac` from now on (the double starts with the
    /// checked-in install's, [`Rbac::install`]).
    pub fn set_rbac(&self, rbac: Rbac) {
        self.shared.lock().rbac = rbac;
    }

    /// The refusals so far: each `403`'s message, and `401 <method> <path>` for unknown
    /// tokens.
    pub fn denied(&self) -> Vec<String> {
        self.shared.lock().denied.clone()
    }

    /// A kube client authenticated as the service account `namespace/name` (a token
    /// registered for it, audience the API server's), so RBAC applies to it.
    pub fn client_as(&self, namespace: &str, name: &str) -> kube::Client {
        let token = self.service_account_token(namespace, name);
        let url = self.url().parse().expect("a valid URL");
        let mut config = kube::Config::new(url);
        config.default_namespace = namespace.into();
        config.auth_info.token = Some(token.into());
        kube::Client::try_from(config).expect("a kube client for the double")
    }

    /// [`ApiServer::client_as`] the service account the install gives `component`.
    pub fn client_for(&self, component: Component) -> kube::Client {
        let (ns, sa) = service_account_of(component);
        self.client_as(&ns, &sa)
    }

    /// Registers and returns a token of the service account `namespace/name`, audience
    /// the API server's (for a kubeconfig).
    pub fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let token = format!("sa-token-{namespace}-{name}-{}", self.addr.port());
        self.add_token(
            &token,
            TokenInfo::service_account(
                namespace,
                name,
                &["https://kubernetes.default.svc.cluster.local"],
            ),
        );
        token
    }
}

/// (namespace, service account) of `component` in the checked-in install.
pub fn service_account_of(component: Component) -> (String, String) {
    let c = Manifests::rendered()
        .and_then(|m| m.container(component))
        .expect("the install has the component");
    (c.namespace, c.service_account)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(watch: bool) -> HashMap<String, String> {
        let mut m = HashMap::new();
        if watch {
            m.insert("watch".to_owned(), "true".to_owned());
        }
        m
    }

    fn at(method: Method, path: &str, watch: bool) -> Attributes {
        attributes(&method, path, &q(watch)).unwrap()
    }

    const CONTROLLER: &str = "system:serviceaccount:istio-system:zmesh-controller";
    const AGENT: &str = "system:serviceaccount:istio-system:zmesh-cni-agent";

    #[test]
    fn maps_methods_and_paths_to_verbs_like_the_real_server() {
        let a = at(Method::GET, "/api/v1/pods", false);
        assert_eq!(
            (a.verb.as_str(), a.group.as_str(), a.resource.as_str()),
            ("list", "", "pods")
        );
        assert_eq!(at(Method::GET, "/api/v1/pods", true).verb, "watch");
        let a = at(Method::GET, "/api/v1/namespaces/shop/pods/a", false);
        assert_eq!(
            (a.verb.as_str(), a.namespace.as_str(), a.name.as_str()),
            ("get", "shop", "a")
        );
        let a = at(
            Method::PATCH,
            "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/p/status",
            false,
        );
        assert_eq!(
            (
                a.verb.as_str(),
                a.group.as_str(),
                a.resource.as_str(),
                a.subresource.as_str()
            ),
            (
                "patch",
                "security.istio.io",
                "authorizationpolicies",
                "status"
            )
        );
        assert_eq!(
            at(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                false
            )
            .verb,
            "create"
        );
        assert_eq!(
            at(Method::PUT, "/api/v1/namespaces/shop/pods/a", false).verb,
            "update"
        );
        assert_eq!(
            at(Method::DELETE, "/api/v1/namespaces/shop/pods/a", false).verb,
            "delete"
        );
        assert_eq!(
            at(Method::DELETE, "/api/v1/namespaces/shop/pods", false).verb,
            "deletecollection"
        );
        // A Namespace by name is in its own namespace, as upstream resolves it.
        let a = at(Method::GET, "/api/v1/namespaces/shop", false);
        assert_eq!(
            (a.resource.as_str(), a.name.as_str(), a.namespace.as_str()),
            ("namespaces", "shop", "shop")
        );
        assert!(attributes(&Method::GET, "/version", &q(false)).is_none());
        assert!(attributes(&Method::GET, "/apis", &q(false)).is_none());
    }

    #[test]
    fn the_installs_rules_grant_what_each_component_needs_and_nothing_else() {
        let rbac = Rbac::install();
        let g: Vec<String> = vec![];
        let ok = |user: &str, m: Method, path: &str, watch: bool| {
            rbac.allows(user, &g, &at(m, path, watch))
        };
        assert!(ok(CONTROLLER, Method::GET, "/api/v1/pods", true));
        assert!(ok(
            CONTROLLER,
            Method::GET,
            "/api/v1/namespaces/shop/pods/a",
            false
        ));
        assert!(ok(
            CONTROLLER,
            Method::POST,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            false
        ));
        assert!(ok(
            CONTROLLER,
            Method::PATCH,
            "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/p/status",
            false
        ));
        // The rule names the subresource: the object itself is not patchable.
        assert!(!ok(
            CONTROLLER,
            Method::PATCH,
            "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/p",
            false
        ));
        assert!(!ok(CONTROLLER, Method::GET, "/api/v1/secrets", false));
        // A waypoint's objects, and of ConfigMaps only the mesh root's.
        assert!(ok(
            CONTROLLER,
            Method::PATCH,
            "/apis/apps/v1/namespaces/shop/deployments/wp",
            false
        ));
        assert!(ok(
            CONTROLLER,
            Method::PATCH,
            "/api/v1/namespaces/shop/configmaps/istio-ca-root-cert",
            false
        ));
        assert!(!ok(
            CONTROLLER,
            Method::PATCH,
            "/api/v1/namespaces/shop/configmaps/other",
            false
        ));
        assert!(!ok(
            CONTROLLER,
            Method::DELETE,
            "/apis/apps/v1/namespaces/shop/deployments/wp",
            false
        ));
        assert!(!ok(
            CONTROLLER,
            Method::GET,
            "/api/v1/namespaces/shop/services/a",
            false
        ));
        assert!(ok(AGENT, Method::GET, "/api/v1/pods", true));
        assert!(!ok(
            AGENT,
            Method::GET,
            "/api/v1/namespaces/shop/pods/a",
            false
        ));
        assert!(!ok(AGENT, Method::GET, "/api/v1/services", false));
        // Another service account, with the same name elsewhere, gets nothing.
        assert!(!ok(
            "system:serviceaccount:shop:zmesh-controller",
            Method::GET,
            "/api/v1/pods",
            false
        ));
    }

    fn rbac(objects: Value) -> Rbac {
        Rbac::from_objects(objects.as_array().unwrap())
    }

    #[test]
    fn roles_grant_in_their_namespace_resource_names_and_wildcards() {
        let sa = json!({"kind": "ServiceAccount", "name": "app", "namespace": "shop"});
        let user = "system:serviceaccount:shop:app";
        let r = rbac(json!([
            {"kind": "Role", "metadata": {"name": "read", "namespace": "shop"},
             "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                        "resourceNames": ["settings"]},
                       {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]}]},
            {"kind": "RoleBinding", "metadata": {"name": "read", "namespace": "shop"},
             "roleRef": {"kind": "Role", "name": "read"}, "subjects": [sa]},
            {"kind": "ClusterRole", "metadata": {"name": "svc"},
             "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["list"]}]},
            {"kind": "RoleBinding", "metadata": {"name": "svc", "namespace": "other"},
             "roleRef": {"kind": "ClusterRole", "name": "svc"},
             "subjects": [{"kind": "Group", "name": "system:serviceaccounts:shop"}]},
        ]));
        let g = vec!["system:serviceaccounts:shop".to_owned()];
        let ok = |m: Method, path: &str| r.allows(user, &g, &at(m, path, false));
        assert!(ok(
            Method::GET,
            "/api/v1/namespaces/shop/configmaps/settings"
        ));
        // resourceNames: another name, or a list (no name), is not granted.
        assert!(!ok(Method::GET, "/api/v1/namespaces/shop/configmaps/other"));
        assert!(!ok(Method::GET, "/api/v1/namespaces/shop/configmaps"));
        // A Role grants in its namespace only.
        assert!(!ok(
            Method::GET,
            "/api/v1/namespaces/other/configmaps/settings"
        ));
        // `*/status` is any status subresource, not the object.
        assert!(ok(Method::PATCH, "/api/v1/namespaces/shop/pods/a/status"));
        assert!(!ok(Method::PATCH, "/api/v1/namespaces/shop/pods/a"));
        // A ClusterRole bound by a RoleBinding grants in that binding's namespace only, here
        // through a group.
        assert!(ok(Method::GET, "/api/v1/namespaces/other/services"));
        assert!(!ok(Method::GET, "/api/v1/namespaces/shop/services"));
        assert!(!ok(Method::GET, "/api/v1/services"));
    }

    #[test]
    fn refusals_read_like_the_real_servers() {
        let a = at(Method::GET, "/api/v1/pods", false);
        assert_eq!(
            forbidden_message(CONTROLLER, &a),
            "pods is forbidden: User \"system:serviceaccount:istio-system:zmesh-controller\" \
             cannot list resource \"pods\" in API group \"\" at the cluster scope"
        );
        let a = at(
            Method::PATCH,
            "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/p/status",
            false,
        );
        assert_eq!(
            forbidden_message(AGENT, &a),
            "authorizationpolicies.security.istio.io \"p\" is forbidden: User \
             \"system:serviceaccount:istio-system:zmesh-cni-agent\" cannot patch resource \
             \"authorizationpolicies/status\" in API group \"security.istio.io\" in the \
             namespace \"shop\""
        );
    }
}
