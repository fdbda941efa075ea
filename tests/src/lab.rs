//! The lab's network: hosts (one netns each) on one bridge, and the redirection rules that
//! send a host's outbound TCP to its ztunnel.
//!
//! ```text
//!  sandbox root netns:   br0 10.200.0.1/24
//!                         ├── v-client ══ eth0 10.200.0.2/24   netns "client"
//!                         └── v-server ══ eth0 10.200.0.3/24   netns "server"
//! ```
//! Each host also has `lo` up and `default dev eth0`, so that a connection to a service VIP
//! (which nothing answers on the wire) is routable and reaches the nat OUTPUT hook, where
//! [`redirect_outbound`] turns it to the local ztunnel.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, bail};

use crate::sandbox::Sandbox;

/// The lab's subnet; the bridge is `.1`, hosts get `.2`, `.3`, ... in order.
pub const SUBNET_PREFIX: [u8; 3] = [10, 200, 0];

/// The bridge joining the hosts, in the sandbox's root netns.
pub const BRIDGE: &str = "br0";

/// The mark ztunnel puts on its own sockets; redirection skips marked packets.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// ztunnel's outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;

/// Hosts on a bridge, built inside a [`Sandbox`]. Everything vanishes with the sandbox.
#[derive(Debug)]
pub struct Topology<'s> {
    sandbox: &'s Sandbox,
    hosts: Vec<(String, Ipv4Addr)>,
}

/// The bridge-side interface name of a host's veth pair.
pub fn veth_name(host: &str) -> String {
    format!("v-{host}")
}

impl<'s> Topology<'s> {
    /// Creates `br0` (10.200.0.1/24) in the sandbox's root netns and, per host in order, a
    /// netns named after it with `eth0` at 10.200.0.<2+i>/24 plugged into the bridge.
    /// Host names must be short (the bridge side `v-<host>` is an interface name: 15 bytes).
    pub fn build(sandbox: &'s Sandbox, hosts: &[&str]) -> Result<Topology<'s>> {
        if hosts.len() > 250 {
            bail!("at most 250 hosts fit the lab's /24");
        }
        for (i, h) in hosts.iter().enumerate() {
            let valid = !h.is_empty()
                && h.len() <= 13
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                bail!("host name {h:?}: use 1-13 characters of [A-Za-z0-9_-]");
            }
            if hosts[..i].contains(h) {
                bail!("host {h:?} given twice");
            }
        }
        let [a, b, c] = SUBNET_PREFIX;
        let sb = sandbox;
        sb.run(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        sb.run(&[
            "ip",
            "addr",
            "add",
            &format!("{a}.{b}.{c}.1/24"),
            "dev",
            BRIDGE,
        ])?;
        sb.run(&["ip", "link", "set", BRIDGE, "up"])?;
        let mut topo = Topology {
            sandbox,
            hosts: Vec::new(),
        };
        for (i, host) in hosts.iter().enumerate() {
            let ip = Ipv4Addr::new(a, b, c, 2 + i as u8);
            let veth = veth_name(host);
            sb.run(&["ip", "netns", "add", host])?;
            sb.run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", host,
            ])?;
            sb.run(&["ip", "link", "set", &veth, "master", BRIDGE, "up"])?;
            sb.run(&["ip", "-n", host, "link", "set", "lo", "up"])?;
            sb.run(&[
                "ip",
                "-n",
                host,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            sb.run(&["ip", "-n", host, "link", "set", "eth0", "up"])?;
            sb.run(&["ip", "-n", host, "route", "add", "default", "dev", "eth0"])?;
            topo.hosts.push((host.to_string(), ip));
        }
        Ok(topo)
    }

    /// The sandbox this topology lives in.
    pub fn sandbox(&self) -> &'s Sandbox {
        self.sandbox
    }

    /// Host names, in the order given to [`Topology::build`].
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts.iter().map(|(h, _)| h.as_str())
    }

    /// A host's `eth0` address. Panics on an unknown host (a bug in the test).
    pub fn host_ip(&self, host: &str) -> Ipv4Addr {
        self.hosts
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, ip)| *ip)
            .unwrap_or_else(|| panic!("no host {host:?} in this topology"))
    }

    /// The bridge-side interface of a host's veth pair, where captures of its traffic run.
    /// Panics on an unknown host.
    pub fn veth(&self, host: &str) -> String {
        self.host_ip(host);
        veth_name(host)
    }

    /// The bridge's address, in the sandbox's root netns.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        let [a, b, c] = SUBNET_PREFIX;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Adds another address (as a /32) to a host's `eth0`, e.g. for a second workload IP.
    /// Other hosts reach it by ARP on the bridge through their default route.
    pub fn add_ip(&self, host: &str, ip: IpAddr) -> Result<()> {
        self.host_ip(host);
        let cidr = match ip {
            IpAddr::V4(v4) => format!("{v4}/32"),
            IpAddr::V6(v6) => format!("{v6}/128"),
        };
        self.sandbox
            .run(&["ip", "-n", host, "addr", "add", &cidr, "dev", "eth0"])
            .map(drop)
    }
}

/// The nftables ruleset of dedicated-mode client-side capture: every TCP connection the host
/// opens goes to ztunnel's outbound listener, except ztunnel's own (mark 0x539) and loopback.
pub fn redirect_outbound_rules() -> String {
    format!(
        "table inet zmesh
delete table inet zmesh
table inet zmesh {{
    chain output {{
        type nat hook output priority -100; policy accept;
        meta mark {ZTUNNEL_MARK:#x} return
        oifname \"lo\" return
        ip daddr 127.0.0.0/8 return
        ip6 daddr ::1 return
        meta l4proto tcp redirect to :{OUTBOUND_PORT}
    }}
}}
"
    )
}

/// Installs [`redirect_outbound_rules`] in a host's netns (replacing an earlier copy) and
/// returns the ruleset text, for the test to show.
pub fn redirect_outbound(sandbox: &Sandbox, host: &str) -> Result<String> {
    let rules = redirect_outbound_rules();
    sandbox
        .run_stdin(Some(host), &["nft", "-f", "-"], Some(&rules))
        .with_context(|| {
            format!("installing outbound redirection in {host} (is nftables installed?)")
        })?;
    Ok(rules)
}

/// Dedicated-mode server-side capture in a host's netns: inbound TCP goes to ztunnel's
/// plaintext listener (15006), except HBONE (15008) and ztunnel's own (marked) traffic.
pub fn redirect_inbound(sandbox: &Sandbox, host: &str) -> Result<()> {
    let rules = format!(
        "table inet zmesh-in {{
    chain prerouting {{
        type nat hook prerouting priority -100;
        meta l4proto tcp tcp dport != 15008 meta mark != {ZTUNNEL_MARK:#x} redirect to :15006
    }}
}}
"
    );
    sandbox
        .run_stdin(Some(host), &["nft", "-f", "-"], Some(&rules))
        .with_context(|| format!("installing inbound redirection in {host}"))
        .map(drop)
}
