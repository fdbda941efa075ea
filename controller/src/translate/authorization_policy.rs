//! Istio's `security.istio.io/v1` AuthorizationPolicy as a Kubernetes object (the CRD's
//! schema, camelCase), so both the YAML directory and the Kubernetes watch read the same type.
//!
//! Fields this type does not know (a misspelling, or a field of a newer Istio) are kept in
//! `unknown` at the level they appear, never dropped: the translation reports each one by
//! name and resolves it towards denying more (an ALLOW rule holding one is left out, a DENY
//! ignores it), exactly as for L7-only fields. One such policy therefore never stops the
//! others from loading, from a YAML file or from the Kubernetes watch.
//!
//! The same types generate the CustomResourceDefinition zmesh installs (kube's
//! `CustomResource` derive on [`AuthorizationPolicySpec`], schemas by schemars; see
//! [`crd`]): a cluster without Istio gets the kind with exactly the fields zmesh reads. The
//! `unknown` maps are left out of the schema, as Istio's CRD has no such fields either (the
//! API server prunes or, with strict field validation, refuses them).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod crd;

/// `security.istio.io/v1` `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// `apiVersion` as read (`security.istio.io/v1` or `v1beta1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// `kind` as read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Status as the API server has it (ignored by the translation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// Configuration for access control on workloads: the `spec` of an AuthorizationPolicy (see
/// <https://istio.io/latest/docs/reference/config/security/authorization-policy/>).
///
/// The derive also makes [`AuthorizationPolicyResource`], the typed root the CRD is generated
/// from (see [`crd`]); the controller reads [`AuthorizationPolicy`] instead, which has this
/// same spec and keeps the apiVersion and kind each object was read as.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, CustomResource, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    root = "AuthorizationPolicyResource",
    namespaced,
    status = "OpaqueStatus",
    shortname = "ap",
    category = "istio-io",
    category = "security-istio-io",
    printcolumn(
        name = "Action",
        type_ = "string",
        json_path = ".spec.action",
        description = "The operation to take."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp",
        description = "When the object was created."
    ),
    doc = "Istio's AuthorizationPolicy (security.istio.io), as zmesh reads it."
)]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to (absent: the whole namespace, or the mesh when the
    /// policy is in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The resource the policy attaches to (Gateway or Service): waypoint policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Several resources the policy attaches to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// The rules; absent or empty means "matches nothing" (an ALLOW without rules denies all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["ALLOW", "DENY", "AUDIT", "CUSTOM"]))]
    pub action: Option<String>,
    /// The external authorizer of a `CUSTOM` policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crd::provider_schema")]
    pub provider: Option<serde_json::Value>,
    /// Fields not in the schema, by name (see the module docs).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `spec.selector`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a pod must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Fields not in the schema, by name (see the module docs).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `spec.targetRef(s)`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// API group (`gateway.networking.k8s.io`, or empty for core).
    #[serde(default)]
    pub group: String,
    /// Kind (`Gateway`, `Service`, `ServiceEntry`, `GatewayClass`).
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace (must equal the policy's when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One rule: every present part must match (`from` OR-ed within, `to` OR-ed within, `when`
/// AND-ed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources; any may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    /// Operations; any may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    /// Extra conditions; all must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
    /// Fields not in the schema, by name (see the module docs).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `rules[].from[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: Source,
    /// Fields not in the schema, by name (see the module docs).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `rules[].to[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
    /// Fields not in the schema, by name (see the module docs).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `source` of a rule. L4 fields: principals, namespaces, serviceAccounts, ipBlocks (and their
/// negations). `requestPrincipals` and `remoteIpBlocks` are L7-only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
    /// Fields not in the schema, by name (see the module docs).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `operation` of a rule. L4 fields: ports (and notPorts). hosts, methods and paths are L7.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// Fields not in the schema, by name (see the module docs).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `rules[].when[]`: `key` (e.g. `source.ip`, `request.headers[x]`) with values / notValues.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
    /// Fields not in the schema, by name (see the module docs).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// The `status` of an AuthorizationPolicy: any object (Istio's CRD keeps unknown fields there;
/// zmesh writes its `ZtunnelAccepted` condition into it, see `crate::status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpaqueStatus(pub serde_json::Value);

impl JsonSchema for OpaqueStatus {
    fn schema_name() -> Cow<'static, str> {
        "OpaqueStatus".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }
}

impl kube::Resource for AuthorizationPolicy {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "AuthorizationPolicy".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "security.istio.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "authorizationpolicies".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
