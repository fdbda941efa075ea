//! Host-side probe SNAT, in the node's network namespace: TCP from node-local sockets (the
//! kubelet's probes) to an enrolled pod's IP leaves with source 169.254.7.127, which the
//! in-pod rules let through to the app instead of redirecting it to ztunnel.
//!
//! **What counts as node-local.** A packet that a socket on the node sent carries that
//! socket; a forwarded packet (another pod, another node, kube-proxy DNAT from outside)
//! carries none. So the match is "has a local socket": nftables `meta skuid >= 0` (the `meta
//! skuid` load fails, and the rule does not match, when the packet has no full socket), and
//! iptables `-m owner --socket-exists` — the test Istio's iptables backend uses. With
//! [`HostConfig::kubelet_uid`] set, only that user's sockets match (`meta skuid <uid>` /
//! `--uid-owner <uid>`), as Istio's nftables backend does; the default is any local socket,
//! because the kubelet's uid varies (kubelet, k3s, microk8s' kubelite) and hostNetwork probers
//! are node-local too. We did not use `fib saddr type local`: it decides by address, not
//! by sender, so a forwarded packet that already carries a node address (a datapath that
//! rewrote it before netfilter, e.g. eBPF NodePort SNAT) would match as well.
//!
//! **Where.** nftables: table `inet zmesh-host`, sets `probe-pods-v4` / `probe-pods-v6` of
//! enrolled pod IPs, one rule per family in a nat postrouting chain at priority `srcnat - 5`,
//! just before the usual masquerade chains (kube-proxy, the primary CNI) at `srcnat`, so that
//! none of those takes the connection first. iptables (no ipset needed): chain
//! `ZMESH_POSTRT` in nat, first in `POSTROUTING`, one SNAT rule per pod IP.
//!
//! Re-applying the host rules keeps the enrolled pods (nftables: the sets are only declared,
//! the chain flushed and refilled; iptables: the chain is refilled with the pod IPs it held).
//! Adding a pod IP twice, or removing one that is not there, does nothing.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::exec::Step;
use super::iptables::{self, Saved, host_prefix};
use super::model::{Family, Table};
use super::{Backend, PROBE_SNAT_V4, PROBE_SNAT_V6, RulesError};

/// The nftables table of the host rules.
pub const NFT_TABLE: &str = "zmesh-host";

/// The iptables chain (nat table) of the host rules.
pub const IPTABLES_CHAIN: &str = "ZMESH_POSTRT";

/// Configuration of the host-side probe SNAT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Also SNAT probes to IPv6 pod addresses.
    pub ipv6: bool,
    /// The IPv4 probe source (169.254.7.127); must equal the pods' [`super::RuleConfig`].
    pub probe_snat_v4: Ipv4Addr,
    /// The IPv6 probe source (`fd16:9254:7127:1337:ffff:ffff:ffff:ffff`).
    pub probe_snat_v6: Ipv6Addr,
    /// Only SNAT sockets of this user (the kubelet's); `None`: any node-local socket.
    pub kubelet_uid: Option<u32>,
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            ipv6: false,
            probe_snat_v4: PROBE_SNAT_V4,
            probe_snat_v6: PROBE_SNAT_V6,
            kubelet_uid: None,
        }
    }
}

impl HostConfig {
    fn snat_to(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.probe_snat_v4),
            Family::V6 => IpAddr::V6(self.probe_snat_v6),
        }
    }

    /// Fails for an IPv6 pod IP when IPv6 is off (there is no set or rule for it).
    fn check_ip(&self, ip: IpAddr) -> Result<Family, RulesError> {
        let family = Family::of(ip);
        if family == Family::V6 && !self.ipv6 {
            return Err(RulesError::InvalidConfig(format!(
                "pod IP {ip} is IPv6, but the host probe rules were configured without IPv6"
            )));
        }
        Ok(family)
    }
}

/// The nft set of a family's pod IPs.
fn nft_set(family: Family) -> &'static str {
    match family {
        Family::V4 => "probe-pods-v4",
        Family::V6 => "probe-pods-v6",
    }
}

/// The nft `add element` / `delete element` target for one IP.
fn nft_element(ip: IpAddr) -> String {
    format!("inet {NFT_TABLE} {} {{ {ip} }}", nft_set(Family::of(ip)))
}

/// The `nft -f -` input that installs the host rules (keeping the sets' elements).
pub fn nft_apply_script(cfg: &HostConfig) -> String {
    let mut out = format!(
        "# zmesh host probe SNAT: keeps the pod sets, replaces the rules\nadd table inet \
         {NFT_TABLE}\n"
    );
    let families = Family::enabled(cfg.ipv6);
    for &f in families {
        let ty = match f {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        };
        let _ = writeln!(
            out,
            "add set inet {NFT_TABLE} {} {{ type {ty}; }}",
            nft_set(f)
        );
    }
    let _ = writeln!(
        out,
        "add chain inet {NFT_TABLE} postrouting {{ type nat hook postrouting priority srcnat - \
         5; policy accept; }}\nflush chain inet {NFT_TABLE} postrouting"
    );
    let owner = match cfg.kubelet_uid {
        Some(uid) => format!("meta skuid {uid}"),
        None => "meta skuid >= 0".to_owned(),
    };
    for &f in families {
        let key = match f {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        };
        let _ = writeln!(
            out,
            "add rule inet {NFT_TABLE} postrouting {key} daddr @{} meta l4proto tcp {owner} \
             snat {key} to {}",
            nft_set(f),
            cfg.snat_to(f)
        );
    }
    out
}

/// The iptables SNAT rule for one pod IP, as `iptables-save` prints it.
pub fn iptables_rule(cfg: &HostConfig, ip: IpAddr) -> String {
    let owner = match cfg.kubelet_uid {
        Some(uid) => format!("--uid-owner {uid}"),
        None => "--socket-exists".to_owned(),
    };
    format!(
        "-A {IPTABLES_CHAIN} -d {} -p tcp -m owner {owner} -j SNAT --to-source {}",
        host_prefix(ip),
        cfg.snat_to(Family::of(ip))
    )
}

/// The pod IPs that the saved `ZMESH_POSTRT` chain SNATs.
fn iptables_pods(saved: &Saved) -> Vec<IpAddr> {
    let Some(nat) = saved.table("nat") else {
        return Vec::new();
    };
    nat.rules_in(IPTABLES_CHAIN)
        .filter_map(|r| {
            let mut tokens = r.split_whitespace();
            tokens.find(|t| *t == "-d")?;
            let prefix = tokens.next()?;
            prefix.split('/').next()?.parse().ok()
        })
        .collect()
}

/// The restore input that installs the host rules for `family`, keeping the pods `saved`
/// shows.
pub fn iptables_apply_input(cfg: &HostConfig, family: Family, saved: &Saved) -> String {
    let mut lines = vec![format!(":{IPTABLES_CHAIN} - [0:0]")];
    let pods = iptables_pods(saved);
    lines.extend(pods.into_iter().map(|ip| iptables_rule(cfg, ip)));
    let jump = format!("-A POSTROUTING -j {IPTABLES_CHAIN}");
    if !saved.table("nat").is_some_and(|t| t.has_rule(&jump)) {
        lines.push(format!("-I POSTROUTING 1 -j {IPTABLES_CHAIN}"));
    }
    let mut out = format!(
        "# zmesh host probe SNAT ({}): refills our chain with its pods, adds a missing jump\n",
        iptables::family_name(family)
    );
    iptables::write_table(&mut out, Table::Nat, &lines);
    out
}

/// The steps that [`super::render_host`] shows (for a node without our rules).
pub fn render_steps(backend: Backend, cfg: &HostConfig) -> Vec<Step> {
    match backend.iptables_variant() {
        None => vec![super::nft::step(nft_apply_script(cfg))],
        Some(v) => Family::enabled(cfg.ipv6)
            .iter()
            .map(|&f| iptables::restore_step(v, f, iptables_apply_input(cfg, f, &Saved::default())))
            .collect(),
    }
}

/// Installs (or refreshes) the host rules in the current netns.
pub fn apply(backend: Backend, cfg: &HostConfig) -> Result<(), RulesError> {
    let Some(v) = backend.iptables_variant() else {
        return super::nft::step(nft_apply_script(cfg)).run().map(drop);
    };
    for &f in Family::enabled(cfg.ipv6) {
        let saved = iptables::read(v, f)?;
        iptables::restore_step(v, f, iptables_apply_input(cfg, f, &saved)).run()?;
    }
    Ok(())
}

/// Removes the host rules (and every pod IP in them) from the current netns.
pub fn remove(backend: Backend, cfg: &HostConfig) -> Result<(), RulesError> {
    let Some(v) = backend.iptables_variant() else {
        let script = format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
        return super::nft::step(script).run().map(drop);
    };
    for &f in Family::enabled(cfg.ipv6) {
        let saved = iptables::read(v, f)?;
        if let Some(nat) = saved.table("nat") {
            let lines = iptables::remove_chains(nat, &[IPTABLES_CHAIN]);
            if !lines.is_empty() {
                let mut input = String::new();
                iptables::write_table(&mut input, Table::Nat, &lines);
                iptables::restore_step(v, f, input).run()?;
            }
        }
    }
    Ok(())
}

/// Runs an nft element change, reporting a missing table or set as [`RulesError::HostRulesMissing`].
fn nft_element_change(script: String) -> Result<(), RulesError> {
    match super::nft::step(script).run() {
        Err(RulesError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
            Err(RulesError::HostRulesMissing)
        }
        other => other.map(drop),
    }
}

/// Adds one pod IP to the probe SNAT (no-op when present), in the current netns.
pub fn add_pod(backend: Backend, cfg: &HostConfig, ip: IpAddr) -> Result<(), RulesError> {
    let family = cfg.check_ip(ip)?;
    let Some(v) = backend.iptables_variant() else {
        return nft_element_change(format!("add element {}\n", nft_element(ip)));
    };
    let saved = iptables::read(v, family)?;
    let Some(nat) = saved.table("nat").filter(|t| t.has_chain(IPTABLES_CHAIN)) else {
        return Err(RulesError::HostRulesMissing);
    };
    let rule = iptables_rule(cfg, ip);
    if nat.has_rule(&rule) {
        return Ok(());
    }
    let mut input = String::new();
    iptables::write_table(&mut input, Table::Nat, &[rule]);
    iptables::restore_step(v, family, input).run().map(drop)
}

/// Removes one pod IP from the probe SNAT (no-op when absent, or when the host rules are
/// not installed), in the current netns.
pub fn remove_pod(backend: Backend, cfg: &HostConfig, ip: IpAddr) -> Result<(), RulesError> {
    let family = cfg.check_ip(ip)?;
    let Some(v) = backend.iptables_variant() else {
        // Adding first makes the delete succeed whether or not the IP was there.
        let element = nft_element(ip);
        let script = format!("add element {element}\ndelete element {element}\n");
        return match nft_element_change(script) {
            // No set, no element: nothing to remove.
            Err(RulesError::HostRulesMissing) => Ok(()),
            other => other,
        };
    };
    let saved = iptables::read(v, family)?;
    let Some(nat) = saved.table("nat") else {
        return Ok(());
    };
    let lines: Vec<String> = nat
        .rules_in(IPTABLES_CHAIN)
        .filter(|r| {
            let mut tokens = r.split_whitespace();
            tokens.any(|t| t == "-d") && tokens.next() == Some(host_prefix(ip).as_str())
        })
        .map(iptables::delete_line)
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut input = String::new();
    iptables::write_table(&mut input, Table::Nat, &lines);
    iptables::restore_step(v, family, input).run().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_reapply_keeps_the_pods() {
        let cfg = HostConfig::default();
        let saved = Saved::parse(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:ZMESH_POSTRT - [0:0]\n\
             -A POSTROUTING -j ZMESH_POSTRT\n\
             -A ZMESH_POSTRT -d 10.0.0.5/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
             COMMIT\n",
        );
        let input = iptables_apply_input(&cfg, Family::V4, &saved);
        assert!(input.ends_with(
            "*nat\n:ZMESH_POSTRT - [0:0]\n\
             -A ZMESH_POSTRT -d 10.0.0.5/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
             COMMIT\n"
        ), "{input}");
        let fresh = iptables_apply_input(&cfg, Family::V4, &Saved::default());
        assert!(
            fresh.contains("-I POSTROUTING 1 -j ZMESH_POSTRT\n"),
            "{fresh}"
        );
    }

    #[test]
    fn kubelet_uid_narrows_the_match() {
        let cfg = HostConfig {
            kubelet_uid: Some(0),
            ipv6: true,
            ..HostConfig::default()
        };
        assert!(nft_apply_script(&cfg).contains("meta skuid 0 snat ip6 to fd16:"));
        let ip: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(
            iptables_rule(&cfg, ip),
            "-A ZMESH_POSTRT -d fd00::5/128 -p tcp -m owner --uid-owner 0 -j SNAT --to-source \
             fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
        );
    }

    #[test]
    fn ipv6_pods_need_ipv6() {
        let err = HostConfig::default()
            .check_ip("fd00::5".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, RulesError::InvalidConfig(_)), "{err}");
    }
}
