//! Mesh configuration for lab tests: upstream ztunnel's local-config YAML (`LOCAL_XDS_PATH`)
//! rendered from small builder structs, the local CA's PEM files, and the environment of a
//! dedicated-mode ztunnel.
//!
//! These structs are written from the upstream format, not borrowed from `zmesh-core`, so that
//! a lab test checks the contract rather than restating the implementation.
//!
//! ```
//! use zmesh_tests::mesh::{LocalConfig, ServiceSpec, WorkloadSpec};
//! let yaml = LocalConfig::default()
//!     .workload(WorkloadSpec::new("client", "10.200.0.2"))
//!     .workload(WorkloadSpec::new("echo", "10.200.0.3").backs("echo", &[(80, 8080)]))
//!     .service(ServiceSpec::new("echo", "10.96.0.10").port(80, 8080))
//!     .to_yaml();
//! assert!(yaml.contains("workloadIps:"));
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

/// The trust domain of the lab's identities.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// How a workload accepts mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// In the mesh: HBONE on 15008.
    #[default]
    #[serde(rename = "HBONE")]
    Hbone,
    /// Outside the mesh: plain TCP.
    #[serde(rename = "TCP")]
    Tcp,
}

/// A workload entry (`workloads:`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_ips: Vec<String>,
    pub protocol: Protocol,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// `"<namespace>/<hostname>"` -> service port -> target port.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// `<namespace>/<name>` of the `WorkloadSelector` policies that select this workload.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    /// The waypoint of traffic addressed to this workload's IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointSpec>,
    /// `Unhealthy` to take it out of load balancing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
}

/// A waypoint's address (`waypoint:`): `{destination: "<network>/<ip>", hboneMtlsPort}`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointSpec {
    pub destination: String,
    pub hbone_mtls_port: u16,
}

impl WaypointSpec {
    /// The waypoint whose Service VIP is `vip`, on HBONE port 15008.
    pub fn vip(vip: impl ToString) -> WaypointSpec {
        WaypointSpec {
            destination: format!("/{}", vip.to_string()),
            hbone_mtls_port: 15008,
        }
    }
}

impl WorkloadSpec {
    /// A workload `name` in namespace `default`, service account = name, HBONE, one IP.
    pub fn new(name: &str, ip: impl ToString) -> WorkloadSpec {
        WorkloadSpec {
            uid: format!("Kubernetes//Pod/default/{name}"),
            name: name.to_owned(),
            namespace: "default".to_owned(),
            service_account: name.to_owned(),
            workload_ips: vec![ip.to_string()],
            protocol: Protocol::Hbone,
            node: String::new(),
            services: BTreeMap::new(),
            authorization_policies: Vec::new(),
            waypoint: None,
            status: None,
        }
    }

    /// Sends traffic addressed to this workload's IP through `waypoint`.
    pub fn waypoint(mut self, waypoint: WaypointSpec) -> Self {
        self.waypoint = Some(waypoint);
        self
    }

    /// Marks the workload unhealthy (no load balancing picks it).
    pub fn unhealthy(mut self) -> Self {
        self.status = Some("Unhealthy");
        self
    }

    /// Lists policy `<namespace>/<name>` as selecting this workload (`WorkloadSelector` scope).
    pub fn selected_by(mut self, policy: &str) -> Self {
        self.authorization_policies.push(policy.to_owned());
        self
    }

    /// Sets the namespace (and the uid that follows from it).
    pub fn namespace(mut self, ns: &str) -> Self {
        self.uid = format!("Kubernetes//Pod/{ns}/{}", self.name);
        self.namespace = ns.to_owned();
        self
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.to_owned();
        self
    }

    pub fn protocol(mut self, p: Protocol) -> Self {
        self.protocol = p;
        self
    }

    pub fn node(mut self, node: &str) -> Self {
        self.node = node.to_owned();
        self
    }

    /// Declares that this workload backs service `name` (in the workload's namespace) with
    /// these service port -> target port pairs.
    pub fn backs(mut self, service: &str, ports: &[(u16, u16)]) -> Self {
        let key = format!(
            "{}/{}",
            self.namespace,
            service_hostname(service, &self.namespace)
        );
        self.services
            .entry(key)
            .or_default()
            .extend(ports.iter().copied());
        self
    }

    /// `<namespace>/<name>/<service account>`, the value of `PROXY_WORKLOAD_INFO`.
    pub fn workload_info(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.name, self.service_account)
    }

    /// The workload's SPIFFE identity.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// `<name>.<namespace>.svc.cluster.local`.
pub fn service_hostname(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.cluster.local")
}

/// A service entry (`services:`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `<network>/<ip>`.
    pub vips: Vec<String>,
    /// Service port -> target port.
    pub ports: BTreeMap<u16, u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// The waypoint of traffic addressed to this service's VIP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointSpec>,
}

impl ServiceSpec {
    /// Service `name` in namespace `default` with one VIP on the default network.
    pub fn new(name: &str, vip: impl ToString) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            hostname: service_hostname(name, "default"),
            vips: vec![format!("/{}", vip.to_string())],
            ports: BTreeMap::new(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        }
    }

    /// Sends traffic addressed to this service's VIP through `waypoint`.
    pub fn waypoint(mut self, waypoint: WaypointSpec) -> Self {
        self.waypoint = Some(waypoint);
        self
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.hostname = service_hostname(&self.name, ns);
        self.namespace = ns.to_owned();
        self
    }

    /// Adds a service port and its target port (0: each workload's own mapping).
    pub fn port(mut self, port: u16, target: u16) -> Self {
        self.ports.insert(port, target);
        self
    }
}

/// Which workloads a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// Every workload in the mesh (a policy in the root namespace).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// The workloads that list it (see [`WorkloadSpec::selected_by`]).
    WorkloadSelector,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// A string match, rendered as upstream's YAML tags (`!Exact value`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

/// One match of a clause: every field given must match (upstream's `RbacMatch`, camelCase).
/// Principals are SPIFFE ids without `spiffe://`; IPs are CIDRs (`10.0.0.1/32`).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchSpec {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl MatchSpec {
    /// Matches the exact principal `<td>/ns/<ns>/sa/<sa>` (no `spiffe://`).
    pub fn principal(mut self, principal: &str) -> Self {
        self.principals
            .push(StringMatch::Exact(principal.to_owned()));
        self
    }

    pub fn not_principal(mut self, principal: &str) -> Self {
        self.not_principals
            .push(StringMatch::Exact(principal.to_owned()));
        self
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespaces.push(StringMatch::Exact(ns.to_owned()));
        self
    }

    pub fn not_namespace(mut self, ns: &str) -> Self {
        self.not_namespaces.push(StringMatch::Exact(ns.to_owned()));
        self
    }

    /// A source CIDR, such as `10.0.0.0/8` or `10.0.0.5/32`.
    pub fn source_ip(mut self, cidr: &str) -> Self {
        self.source_ips.push(cidr.to_owned());
        self
    }

    pub fn not_source_ip(mut self, cidr: &str) -> Self {
        self.not_source_ips.push(cidr.to_owned());
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.destination_ports.push(port);
        self
    }

    pub fn not_port(mut self, port: u16) -> Self {
        self.not_destination_ports.push(port);
        self
    }
}

/// An AuthorizationPolicy in upstream's local-config shape (`policies:`): `rules` is a list of
/// rules, each a list of clauses (all must match), each a list of matches (any may match).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    pub rules: Vec<Vec<Vec<MatchSpec>>>,
}

impl PolicySpec {
    /// A `Namespace`-scoped policy `name` in `namespace` with no rules (an ALLOW without rules
    /// admits nothing; a DENY without rules denies nothing).
    pub fn new(name: &str, namespace: &str, action: Action) -> PolicySpec {
        PolicySpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            scope: Scope::Namespace,
            action,
            dry_run: false,
            rules: Vec::new(),
        }
    }

    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// Evaluated and logged, never enforced.
    pub fn dry_run(mut self) -> Self {
        self.dry_run = true;
        self
    }

    /// Adds a rule of one clause holding one match.
    pub fn when(self, m: MatchSpec) -> Self {
        self.rule(vec![vec![m]])
    }

    /// Adds a rule: every clause must match; a clause matches when any of its matches does.
    pub fn rule(mut self, clauses: Vec<Vec<MatchSpec>>) -> Self {
        self.rules.push(clauses);
        self
    }

    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The whole local config file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LocalConfig {
    pub workloads: Vec<WorkloadSpec>,
    pub services: Vec<ServiceSpec>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicySpec>,
}

impl LocalConfig {
    pub fn policy(mut self, p: PolicySpec) -> Self {
        self.policies.push(p);
        self
    }

    pub fn workload(mut self, w: WorkloadSpec) -> Self {
        self.workloads.push(w);
        self
    }

    pub fn service(mut self, s: ServiceSpec) -> Self {
        self.services.push(s);
        self
    }

    /// The YAML ztunnel reads.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("the local config always serialises")
    }

    /// Writes the YAML to `path` (atomically: a temporary file renamed over it, so a watching
    /// ztunnel never reads half a file).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::write_atomic(path, &self.to_yaml())
    }
}

/// A lab CA: the core's local CA and its PEM files on disk.
#[derive(Debug)]
pub struct CaFiles {
    pub ca: zmesh_core::tls::LocalCa,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Generates a CA named `name` and writes `<name>-ca.pem` and `<name>-ca.key` into `dir`
/// (usually [`crate::Sandbox::dir`]).
pub fn write_ca(dir: &Path, name: &str) -> Result<CaFiles> {
    let ca = zmesh_core::tls::LocalCa::generate(name).context("generating the lab CA")?;
    let cert = dir.join(format!("{name}-ca.pem"));
    let key = dir.join(format!("{name}-ca.key"));
    std::fs::write(&cert, ca.cert_pem())?;
    std::fs::write(&key, ca.key_pem())?;
    Ok(CaFiles { ca, cert, key })
}

/// The environment every lab ztunnel shares: config from a local file, certificates from the
/// local CA, no controller.
fn base_env(xds: &Path, ca: &CaFiles) -> Vec<(String, String)> {
    let p = |p: &Path| p.display().to_string();
    [
        ("LOCAL_XDS_PATH", p(xds)),
        ("XDS_ADDRESS", String::new()),
        ("CA_ADDRESS", String::new()),
        ("LOCAL_CA_CERT", p(&ca.cert)),
        ("LOCAL_CA_KEY", p(&ca.key)),
        ("TRUST_DOMAIN", TRUST_DOMAIN.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The environment of a dedicated-mode ztunnel serving `workload`. Add `RUST_LOG` and friends.
pub fn dedicated_env(workload: &WorkloadSpec, xds: &Path, ca: &CaFiles) -> Vec<(String, String)> {
    let mut env = vec![
        ("PROXY_MODE".to_owned(), "dedicated".to_owned()),
        ("PROXY_WORKLOAD_INFO".to_owned(), workload.workload_info()),
    ];
    env.extend(base_env(xds, ca));
    env
}

/// The environment of a shared-mode ztunnel fed over ZDS by the agent listening on `zds`.
pub fn shared_env(zds: &Path, xds: &Path, ca: &CaFiles) -> Vec<(String, String)> {
    let mut env = vec![
        ("PROXY_MODE".to_owned(), "shared".to_owned()),
        ("INPOD_UDS".to_owned(), zds.display().to_string()),
    ];
    env.extend(base_env(xds, ca));
    env
}

/// Who a ztunnel pod is, for the controller (its node id and the CA's node check).
#[derive(Clone, Debug)]
pub struct ZtunnelPod<'a> {
    /// The node it runs on (`NODE_NAME`).
    pub node: &'a str,
    /// `POD_NAMESPACE`.
    pub namespace: &'a str,
    /// `POD_NAME`.
    pub name: &'a str,
    /// `INSTANCE_IP`.
    pub ip: std::net::IpAddr,
    /// The file holding the node's credential (`AUTH_TOKEN`).
    pub token: &'a Path,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LocalConfig {
        LocalConfig::default()
            .workload(WorkloadSpec::new("client", "10.200.0.2"))
            .workload(
                WorkloadSpec::new("echo-a", "10.200.0.3")
                    .service_account("echo")
                    .backs("echo", &[(80, 8080)]),
            )
            .service(ServiceSpec::new("echo", "10.96.0.10").port(80, 8080))
    }

    #[test]
    fn renders_upstream_shape() {
        let y: serde_yaml::Value = serde_yaml::from_str(&sample().to_yaml()).unwrap();
        let w = &y["workloads"][1];
        assert_eq!(w["serviceAccount"], "echo");
        assert_eq!(w["workloadIps"][0], "10.200.0.3");
        assert_eq!(w["protocol"], "HBONE");
        assert_eq!(
            w["services"]["default/echo.default.svc.cluster.local"][80],
            8080
        );
        let s = &y["services"][0];
        assert_eq!(s["vips"][0], "/10.96.0.10");
        assert_eq!(s["hostname"], "echo.default.svc.cluster.local");
        assert_eq!(s["ports"][80], 8080);
    }

    /// The contract check: what the lab writes, the core's parser accepts.
    #[test]
    fn core_parses_what_we_render() {
        let cfg = zmesh_core::state::LocalConfig::parse(&sample().to_yaml()).unwrap();
        assert_eq!(cfg.workloads.len(), 2);
        assert_eq!(cfg.services.len(), 1);
    }

    /// Policies in upstream's shape (YAML tags, triple-nested rules) parse in the core, keys
    /// and selector lists included.
    #[test]
    fn core_parses_the_policies_we_render() {
        let cfg = sample()
            .workload(WorkloadSpec::new("sel", "10.200.0.9").selected_by("default/p2"))
            .policy(
                PolicySpec::new("p1", "default", Action::Deny)
                    .when(MatchSpec::default().principal("cluster.local/ns/default/sa/client"))
                    .when(MatchSpec::default().source_ip("10.200.0.0/24").not_port(22)),
            )
            .policy(
                PolicySpec::new("p2", "default", Action::Allow)
                    .scope(Scope::WorkloadSelector)
                    .dry_run()
                    .rule(vec![
                        vec![MatchSpec::default().namespace("other")],
                        vec![MatchSpec::default().port(8080)],
                    ]),
            );
        let yaml = cfg.to_yaml();
        assert!(
            yaml.contains("!Exact cluster.local/ns/default/sa/client"),
            "{yaml}"
        );
        let parsed = zmesh_core::state::LocalConfig::parse(&yaml).unwrap();
        assert_eq!(parsed.policies.len(), 2);
        assert_eq!(parsed.policies[0].key(), "default/p1");
        assert_eq!(parsed.policies[0].rules.len(), 2);
        assert!(parsed.policies[1].dry_run);
        assert_eq!(parsed.policies[1].rules[0].clauses.len(), 2);
        let sel = parsed.workloads.iter().find(|w| w.name == "sel").unwrap();
        assert_eq!(*sel.authorization_policies, ["default/p2"]);
        zmesh_core::state::State::from_local(parsed).unwrap();
    }

    #[test]
    fn ca_files_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write_ca(dir.path(), "lab").unwrap();
        assert!(
            std::fs::read_to_string(&ca.cert)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        let env = dedicated_env(
            &WorkloadSpec::new("client", "10.200.0.2"),
            Path::new("/x.yaml"),
            &ca,
        );
        assert!(env.contains(&("PROXY_WORKLOAD_INFO".into(), "default/client/client".into())));
    }
}
