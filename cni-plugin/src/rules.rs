//! The redirection rules that the node agent installs inside an enrolled pod's network
//! namespace, so that the pod's TCP goes through the ztunnel listening in that namespace, and
//! the host-side rules that let the kubelet's probes bypass it.
//!
//! The values are Istio ambient's (istio/istio @ `86c9f01f`, `cni/pkg/config/config.go`
//! and `cni/pkg/iptables/testdata/default.golden`), so pods and tools move
//! between the two meshes unchanged: ztunnel marks its own sockets `0x539/0xfff`; ztunnel
//! listens in the pod on 15001 (outbound), 15006 (inbound plaintext), 15008 (HBONE, never
//! redirected) and 15053 (DNS); probes arrive from 169.254.7.127.
//!
//! # The rules
//!
//! Built as data by [`ruleset`] ([`model`]), written by one of two backends ([`Backend`]):
//!
//! | table / hook | rule, in order |
//! |---|---|
//! | mangle prerouting | packet mark 0x539/0xfff (ztunnel's own packets, seen again on `lo`) → set connmark 0x111/0xfff |
//! | mangle output | connmark 0x111/0xfff → copy the connmark into the packet mark (routes via table 100) |
//! | nat prerouting | tcp from the probe address → accept |
//! | | tcp, dst ≠ 127.0.0.1, dport ≠ 15008, mark ≠ 0x539 → redirect to 15006 |
//! | nat output | tcp to the probe address → accept (probe replies) |
//! | | DNS capture only: udp dport 53, out ≠ `lo`, mark ≠ 0x539 → redirect to 15053; tcp dport 53, dst ≠ 127.0.0.1, mark ≠ 0x539 → redirect to 15053 |
//! | | tcp with mark 0x111/0xfff (ztunnel's connection, reply side) → accept |
//! | | out `lo`, dst ≠ 127.0.0.1 (the app calling its own pod IP) → accept |
//! | | tcp, dst ≠ 127.0.0.1, mark ≠ 0x539 → redirect to 15001 |
//! | raw (DNS capture only) | prerouting: udp sport 53, mark ≠ 0x539 → conntrack zone 1; output: udp dport 53, mark 0x539 → zone 1 (ztunnel's upstream DNS never collides with the app's redirected queries) |
//!
//! IPv6 (with [`RuleConfig::ipv6`]) mirrors every rule with `::1` and the IPv6 probe address;
//! without it, no IPv6 packet is touched. Policy routing ([`routing`]): `ip rule fwmark
//! 0x111/0xfff lookup 100 pref 32764` and `local 0.0.0.0/0 dev lo table 100` (`::/0` too).
//!
//! Only REDIRECT, no TPROXY: ztunnel reads the original destination with `SO_ORIGINAL_DST`.
//!
//! # Backends
//!
//! - [`Backend::Nftables`] (default): tables `inet zmesh-mangle`, `inet zmesh-nat` and, with
//!   DNS capture, `inet zmesh-raw`, replaced in one atomic `nft -f -` transaction ([`nft`]).
//! - [`Backend::IptablesLegacy`] / [`Backend::IptablesNft`]: chains `ZMESH_PRERT` /
//!   `ZMESH_OUTPUT` in each table, through `iptables-restore --noflush` ([`iptables`]).
//!
//! Both are idempotent: applying twice leaves what applying once does, and applying a
//! changed [`RuleConfig`] (e.g. DNS capture turned off) replaces the old rules, without a
//! moment where the pod has none. [`remove`] deletes our tables or chains, the policy rule
//! and the route; it succeeds when they are already gone. A failed [`apply`] may leave part of
//! the work done (e.g. the routes but not the rules); retrying it, or [`remove`], converges.
//!
//! # Host side
//!
//! [`apply_host`], [`add_probe_pod`], [`remove_probe_pod`], [`remove_host`]: see [`host`]
//! for how node-local (kubelet) traffic is told apart.
//!
//! Every function that changes rules takes the target network namespace as a path
//! (`/proc/<pid>/ns/net`, `/var/run/netns/<name>`), or `None` for the caller's own, and
//! runs the tools on a dedicated thread inside it ([`exec`]); they need `CAP_NET_ADMIN`
//! there, and `CAP_SYS_ADMIN` to enter it.

pub mod exec;
pub mod host;
pub mod iptables;
pub mod model;
pub mod nft;
pub mod routing;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use host::HostConfig;
pub use model::{Family, Ruleset};

/// The mark ztunnel sets on its own sockets (`SO_MARK`); the rules never redirect it.
pub const ZTUNNEL_MARK: u32 = 0x539;
/// The bits of the packet and connection marks that the rules use.
pub const MARK_MASK: u32 = 0xfff;
/// The connmark of connections ztunnel took part in.
pub const CONNMARK: u32 = 0x111;
/// The routing table of the `lo` catch-all route.
pub const ROUTE_TABLE: u32 = 100;
/// The priority of the policy rule that uses [`ROUTE_TABLE`].
pub const RULE_PRIORITY: u32 = 32764;
/// ztunnel's outbound listener in the pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's inbound plaintext listener in the pod.
pub const INBOUND_PORT: u16 = 15006;
/// ztunnel's HBONE listener in the pod; never redirected.
pub const HBONE_PORT: u16 = 15008;
/// ztunnel's DNS proxy in the pod (UDP and TCP).
pub const DNS_PORT: u16 = 15053;
/// The conntrack zone of ztunnel's upstream DNS.
pub const DNS_CT_ZONE: u16 = 1;
/// The source of the kubelet's probes after the host-side SNAT (IPv4).
pub const PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The source of the kubelet's probes after the host-side SNAT (IPv6).
pub const PROBE_SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// How the rules are written into the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// `nft` (nftables), one atomic transaction.
    #[default]
    Nftables,
    /// `iptables-legacy-restore` (x_tables), for nodes whose other rules are legacy.
    IptablesLegacy,
    /// `iptables-nft-restore` (iptables rules stored in nf_tables).
    IptablesNft,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 3] = [
        Backend::Nftables,
        Backend::IptablesLegacy,
        Backend::IptablesNft,
    ];

    /// The name used in configuration (`nftables`, `iptables-legacy`, `iptables-nft`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::IptablesLegacy => "iptables-legacy",
            Backend::IptablesNft => "iptables-nft",
        }
    }

    /// The iptables variant, or `None` for nftables.
    pub fn iptables_variant(self) -> Option<iptables::Variant> {
        match self {
            Backend::Nftables => None,
            Backend::IptablesLegacy => Some(iptables::Variant::Legacy),
            Backend::IptablesNft => Some(iptables::Variant::Nft),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = RulesError;

    fn from_str(s: &str) -> Result<Backend, RulesError> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                RulesError::InvalidConfig(format!(
                    "unknown rules backend {s:?}: use nftables, iptables-legacy or iptables-nft"
                ))
            })
    }
}

/// What the in-pod rules capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// Redirect the pod's DNS (UDP and TCP port 53) to ztunnel's DNS proxy on 15053.
    pub dns_capture: bool,
    /// Also capture IPv6 (and install the IPv6 policy route). Turn on for pods with an IPv6
    /// address; without it, IPv6 traffic is left alone. A pod's addresses do not change in
    /// its life, so neither should this: applying with it off does not remove IPv6 rules an
    /// earlier apply installed with the iptables backends, nor the IPv6 policy route (to
    /// switch it off on a live pod, [`remove`] with it on, then [`apply`]).
    pub ipv6: bool,
    /// The probe source that the in-pod rules let through (IPv4).
    pub probe_snat_v4: Ipv4Addr,
    /// The probe source that the in-pod rules let through (IPv6).
    pub probe_snat_v6: Ipv6Addr,
}

impl Default for RuleConfig {
    fn default() -> RuleConfig {
        RuleConfig {
            dns_capture: false,
            ipv6: false,
            probe_snat_v4: PROBE_SNAT_V4,
            probe_snat_v6: PROBE_SNAT_V6,
        }
    }
}

impl RuleConfig {
    /// The families the rules cover.
    pub fn families(&self) -> &'static [Family] {
        Family::enabled(self.ipv6)
    }
}

/// Why installing or removing rules failed. The messages name the command and what it said.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The netns file could not be opened.
    #[error("cannot open network namespace {}: {source} (is the pod still running?)", path.display())]
    OpenNetns {
        /// The netns file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `setns` into the netns failed.
    #[error(
        "cannot enter network namespace {}: {source} (the node agent needs CAP_SYS_ADMIN)",
        path.display()
    )]
    EnterNetns {
        /// The netns file.
        path: PathBuf,
        /// Why.
        source: nix::Error,
    },
    /// The thread that enters the netns could not be started.
    #[error("cannot start a thread to enter the network namespace: {0}")]
    Thread(#[source] std::io::Error),
    /// A tool could not be started.
    #[error("cannot run `{command}`: {source} (is it installed and on PATH?)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line (its stdin is what [`render`] shows).
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote on stderr.
        stderr: String,
    },
    /// A pod IP was given to the host rules before they were installed.
    #[error(
        "the host probe SNAT rules are not installed in this network namespace: apply_host first"
    )]
    HostRulesMissing,
    /// The configuration cannot be applied.
    #[error("invalid rules configuration: {0}")]
    InvalidConfig(String),
}

/// The in-pod rules for `cfg`, as data.
pub fn ruleset(cfg: &RuleConfig) -> Ruleset {
    model::pod_ruleset(cfg)
}

/// The commands [`apply`] runs in a pod netns without our rules, as a shell script with the
/// tools' input inline: for golden tests and logs. (For iptables, [`apply`] leaves out the
/// jumps that already exist.)
pub fn render(backend: Backend, cfg: &RuleConfig) -> String {
    let header = [
        format!(
            "zmesh in-pod redirection: backend {backend}, DNS capture {}, {}",
            if cfg.dns_capture { "on" } else { "off" },
            if cfg.ipv6 { "IPv4 + IPv6" } else { "IPv4 only" }
        ),
        "generated by zmesh_cni::rules::render; do not edit".to_owned(),
    ];
    exec::transcript(&header, &apply_steps_fresh(backend, cfg))
}

/// The steps of [`apply`] on a netns without our rules.
fn apply_steps_fresh(backend: Backend, cfg: &RuleConfig) -> Vec<exec::Step> {
    let rs = ruleset(cfg);
    let mut steps = routing::apply_steps(cfg.families());
    match backend.iptables_variant() {
        None => steps.push(nft::step(nft::apply_script(&rs))),
        Some(v) => steps.extend(iptables::render_steps(v, &rs, cfg.families())),
    }
    steps
}

/// Installs (or refreshes) the in-pod rules in `netns` (`None`: the caller's netns): the
/// policy route first, so that replies have their way home before anything is redirected,
/// then the packet rules.
pub fn apply(netns: Option<&Path>, backend: Backend, cfg: &RuleConfig) -> Result<(), RulesError> {
    exec::in_netns(netns, || {
        exec::run_all(&routing::apply_steps(cfg.families()))?;
        let rs = ruleset(cfg);
        match backend.iptables_variant() {
            None => nft::step(nft::apply_script(&rs)).run().map(drop),
            Some(v) => iptables::apply(v, &rs, cfg.families()),
        }
    })
}

/// Removes the in-pod rules from `netns` (`None`: the caller's netns): packet rules first,
/// then the policy rule and route. Anything already gone is fine. With `cfg.ipv6` off, IPv6
/// leftovers (iptables backends, policy routing) are left alone.
pub fn remove(netns: Option<&Path>, backend: Backend, cfg: &RuleConfig) -> Result<(), RulesError> {
    exec::in_netns(netns, || {
        match backend.iptables_variant() {
            None => nft::step(nft::remove_script()).run().map(drop)?,
            Some(v) => iptables::remove(v, cfg.families())?,
        }
        exec::run_all(&routing::remove_steps(cfg.families()))
    })
}

/// The commands [`apply_host`] runs on a node without our host rules, as a shell script.
pub fn render_host(backend: Backend, cfg: &HostConfig) -> String {
    let header = [
        format!(
            "zmesh host probe SNAT: backend {backend}, {}, {}",
            if cfg.ipv6 { "IPv4 + IPv6" } else { "IPv4 only" },
            match cfg.kubelet_uid {
                Some(uid) => format!("sockets of uid {uid}"),
                None => "any node-local socket".to_owned(),
            }
        ),
        "generated by zmesh_cni::rules::render_host; do not edit".to_owned(),
    ];
    exec::transcript(&header, &host::render_steps(backend, cfg))
}

/// Installs (or refreshes) the host-side probe SNAT in `netns` (the node's; `None`: the
/// caller's), keeping the pod IPs already in it.
pub fn apply_host(
    netns: Option<&Path>,
    backend: Backend,
    cfg: &HostConfig,
) -> Result<(), RulesError> {
    exec::in_netns(netns, || host::apply(backend, cfg))
}

/// Removes the host-side probe SNAT, with every pod IP in it.
pub fn remove_host(
    netns: Option<&Path>,
    backend: Backend,
    cfg: &HostConfig,
) -> Result<(), RulesError> {
    exec::in_netns(netns, || host::remove(backend, cfg))
}

/// SNATs node-local TCP to `pod_ip` to the probe address (no-op when already so). Fails with
/// [`RulesError::HostRulesMissing`] before [`apply_host`].
pub fn add_probe_pod(
    netns: Option<&Path>,
    backend: Backend,
    cfg: &HostConfig,
    pod_ip: IpAddr,
) -> Result<(), RulesError> {
    exec::in_netns(netns, || host::add_pod(backend, cfg, pod_ip))
}

/// Stops SNATing node-local TCP to `pod_ip` (no-op when it was not).
pub fn remove_probe_pod(
    netns: Option<&Path>,
    backend: Backend,
    cfg: &HostConfig,
    pod_ip: IpAddr,
) -> Result<(), RulesError> {
    exec::in_netns(netns, || host::remove_pod(backend, cfg, pod_ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>().unwrap(), b);
            let json = serde_json::to_string(&b).unwrap();
            assert_eq!(json, format!("\"{}\"", b.name()));
        }
        assert!("ipfw".parse::<Backend>().is_err());
        assert_eq!(Backend::default(), Backend::Nftables);
    }

    #[test]
    fn config_defaults_are_istio_values() {
        let cfg: RuleConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, RuleConfig::default());
        assert!(!cfg.dns_capture && !cfg.ipv6);
        assert_eq!(cfg.probe_snat_v4.to_string(), "169.254.7.127");
        assert_eq!(
            cfg.probe_snat_v6.to_string(),
            "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
        );
        assert!(serde_json::from_str::<RuleConfig>(r#"{"dnsCapture": true}"#).is_err());
    }

    #[test]
    fn render_routes_before_rules() {
        let text = render(Backend::Nftables, &RuleConfig::default());
        let route = text.find("ip -4 route replace").unwrap();
        let nft = text.find("nft -f -").unwrap();
        assert!(route < nft, "{text}");
    }
}
