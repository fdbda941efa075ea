//! The local config file's `authorizationPolicies:` (running without a controller): the model
//! of `zmesh.waypoint.v1.WaypointPolicy` in YAML with the AuthorizationPolicy's camelCase
//! names, converted to the proto and compiled like a resource from xDS. Example:
//!
//! ```yaml
//! authorizationPolicies:
//! - namespace: default
//!   name: deny-admin
//!   services: [default/echo.default.svc.cluster.local]   # or allServices: true
//!   action: DENY                                         # ALLOW (default), DENY, AUDIT
//!   dryRun: false
//!   rules:
//!   - from: [{source: {namespaces: [evil]}}]
//!     to: [{operation: {paths: ["/admin/{**}"]}}]
//!     when: [{key: "request.headers[x-debug]", values: ["1"]}]
//! ```

use serde::Deserialize;
use xds_proto::zmesh::waypoint::v1 as pb;

/// One policy of the local file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPolicy {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    all_services: bool,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Vec<LocalRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalRule {
    #[serde(default)]
    from: Vec<LocalFrom>,
    #[serde(default)]
    to: Vec<LocalTo>,
    #[serde(default)]
    when: Vec<LocalCondition>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalFrom {
    source: LocalSource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalTo {
    operation: LocalOperation,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct LocalSource {
    principals: Vec<String>,
    not_principals: Vec<String>,
    request_principals: Vec<String>,
    not_request_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip_blocks: Vec<String>,
    not_ip_blocks: Vec<String>,
    remote_ip_blocks: Vec<String>,
    not_remote_ip_blocks: Vec<String>,
    /// `ns/sa`.
    service_accounts: Vec<String>,
    not_service_accounts: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct LocalOperation {
    hosts: Vec<String>,
    not_hosts: Vec<String>,
    ports: Vec<String>,
    not_ports: Vec<String>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalCondition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

impl LocalPolicy {
    /// `<namespace>/<name>`: how errors name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The wire form; the error names a bad action (CUSTOM has no local meaning either).
    pub fn into_proto(self) -> Result<pb::WaypointPolicy, String> {
        let action = match self.action.as_deref() {
            None | Some("ALLOW") => pb::PolicyAction::Allow,
            Some("DENY") => pb::PolicyAction::Deny,
            Some("AUDIT") => pb::PolicyAction::Audit,
            Some(other) => {
                return Err(format!(
                    "action {other:?}: expected ALLOW, DENY or AUDIT (CUSTOM is not supported)"
                ));
            }
        };
        Ok(pb::WaypointPolicy {
            waypoint: None,
            namespace: self.namespace,
            name: self.name,
            all_services: self.all_services,
            services: self.services,
            action: action as i32,
            dry_run: self.dry_run,
            rules: self.rules.into_iter().map(LocalRule::into_proto).collect(),
        })
    }
}

impl LocalRule {
    fn into_proto(self) -> pb::PolicyRule {
        pb::PolicyRule {
            from: self
                .from
                .into_iter()
                .map(|f| {
                    let s = f.source;
                    pb::PolicySource {
                        principals: s.principals,
                        not_principals: s.not_principals,
                        request_principals: s.request_principals,
                        not_request_principals: s.not_request_principals,
                        namespaces: s.namespaces,
                        not_namespaces: s.not_namespaces,
                        ip_blocks: s.ip_blocks,
                        not_ip_blocks: s.not_ip_blocks,
                        remote_ip_blocks: s.remote_ip_blocks,
                        not_remote_ip_blocks: s.not_remote_ip_blocks,
                        service_accounts: s.service_accounts,
                        not_service_accounts: s.not_service_accounts,
                    }
                })
                .collect(),
            to: self
                .to
                .into_iter()
                .map(|t| {
                    let o = t.operation;
                    pb::PolicyOperation {
                        hosts: o.hosts,
                        not_hosts: o.not_hosts,
                        ports: o.ports,
                        not_ports: o.not_ports,
                        methods: o.methods,
                        not_methods: o.not_methods,
                        paths: o.paths,
                        not_paths: o.not_paths,
                    }
                })
                .collect(),
            when: self
                .when
                .into_iter()
                .map(|c| pb::PolicyCondition {
                    key: c.key,
                    values: c.values,
                    not_values: c.not_values,
                })
                .collect(),
        }
    }
}
