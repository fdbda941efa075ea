//! The node agent (`zmesh-cni-agent`): decides which pods join the mesh, installs their
//! redirection rules and hands them to the local ztunnel (docs/CNI.md).
//!
//! The pieces, in the order data flows through them:
//!
//! - [`cluster`]: the pod and namespace facts ([`Cluster`]), read from Kubernetes YAML;
//! - [`source`]: where snapshots come from ([`PodSource`]: a watched directory today, the
//!   Kubernetes API later);
//! - [`decision`]: whether a pod is enrolled ([`enrolment`]);
//! - [`state`]: the pods seen through CNI ADD, persisted so that a restarted agent gives
//!   ztunnel the same pods ([`StateStore`]), and the source of the ZDS snapshot;
//! - [`dataplane`]: rules + ZDS hand-over behind a trait ([`Dataplane`], real: [`RulesAndZds`]);
//! - [`service`]: what ADD, DEL and a source change do ([`Agent`]);
//! - [`server`]: the plugin API over the unix socket ([`ApiServer`]);
//! - [`health`]: `GET /readyz` on TCP (default 8000) for the readiness probe and
//!   `zmeshctl check`: the plugin chained in the conflist the runtime loads, a ztunnel connected;
//! - [`fault`]: fault injection for the lab's fault tests (off unless asked for).
//!
//! Pods and namespaces come from a YAML directory (`--pods-dir`) or from the Kubernetes API
//! (`--kube`, [`kube_source`]: the controller's watchers, this node's pods only).
//!
//! The binary wires them: source → state → ZDS server (snapshot from the state) → agent →
//! API server, plus the reconciler that follows label changes.
//!
//! # Not yet
//!
//! - The host-side probe SNAT ([`crate::rules::apply_host`], [`crate::rules::add_probe_pod`])
//!   is not wired in: kubelet probes to enrolled pods reach ztunnel's inbound listener.
//! - Running pods the agent never saw a CNI ADD for (started before it) are not enrolled when
//!   their namespace gains the label: the agent has no netns for them (logged); a `/proc`
//!   scan or the lab's netns paths will supply it.
//! - No `ambient.istio.io/redirection` status annotation (needs the API).
//! - Enrolment changes are serialised by one lock, so ADDs wait for each other's ztunnel
//!   acknowledgement (ZDS handles one request per connection at a time anyway).

pub mod cluster;
pub mod dataplane;
pub mod decision;
pub mod fault;
pub mod health;
pub mod kube_source;
pub mod server;
pub mod service;
pub mod source;
pub mod state;

pub use cluster::{Cluster, LoadError, Namespace, Pod};
pub use dataplane::{Dataplane, DataplaneError, RulesAndZds};
pub use decision::{Decision, SkipReason, enrolment};
pub use health::{HealthServer, HealthSource};
pub use kube_source::KubePodSource;
pub use server::{ApiServer, ServerError};
pub use service::{Agent, AgentConfig, AgentError};
pub use source::{DirSource, PodSource, SourceError, StaticSource};
pub use state::{PodRecord, StateError, StateStore};
