//! The in-pod redirection rules as data: which chains exist, and which rules, in which order,
//! they hold. [`pod_ruleset`] builds the model from a [`RuleConfig`]; the backends
//! ([`super::nft`], [`super::iptables`]) only translate it, so both install the same logic.
//!
//! Families: a rule that matches an address (`ip daddr != 127.0.0.1`) belongs to that
//! address's family and is generated once per enabled family. A rule without one is
//! family-independent ([`Rule::family`] `None`) when IPv6 is enabled, and restricted to IPv4
//! (`Some(V4)`) when it is not, so that with `ipv6: false` no IPv6 packet is ever touched —
//! the same outcome as iptables without ip6tables rules.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    CONNMARK, DNS_CT_ZONE, DNS_PORT, HBONE_PORT, INBOUND_PORT, MARK_MASK, OUTBOUND_PORT,
    RuleConfig, ZTUNNEL_MARK,
};

/// An IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The loopback address that the rules leave alone (`127.0.0.1`, `::1`). Only this
    /// address, not all of `127.0.0.0/8`, as in Istio.
    pub fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }

    /// The family of an address.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The families enabled by a configuration: IPv4 always, IPv6 with `ipv6`.
    pub fn enabled(ipv6: bool) -> &'static [Family] {
        if ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        }
    }
}

/// The tables the rules live in, named after iptables' tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// Marks: connmark for ztunnel's connections, restored on replies.
    Mangle,
    /// The redirections themselves.
    Nat,
    /// A separate conntrack zone for ztunnel's upstream DNS (only with DNS capture).
    Raw,
}

impl Table {
    /// Every table, in the order the backends write them.
    pub const ALL: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];

    /// The iptables table name.
    pub fn iptables_name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }
}

/// The netfilter hooks the rules attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Packets arriving on an interface (including `lo`).
    Prerouting,
    /// Packets sent by local sockets.
    Output,
}

impl Hook {
    /// Both hooks, in the order the backends write them.
    pub const ALL: [Hook; 2] = [Hook::Prerouting, Hook::Output];
}

/// A transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The protocol's name in both iptables and nft syntax.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A mark value under a mask: matches when `mark & mask == value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mark {
    /// The value (within `mask`).
    pub value: u32,
    /// The bits that count.
    pub mask: u32,
}

/// ztunnel's socket mark, `0x539/0xfff`.
pub const ZTUNNEL: Mark = Mark {
    value: ZTUNNEL_MARK,
    mask: MARK_MASK,
};

/// The connmark of connections ztunnel took part in, `0x111/0xfff`.
pub const ZTUNNEL_CONN: Mark = Mark {
    value: CONNMARK,
    mask: MARK_MASK,
};

/// One condition of a rule. All conditions of a rule must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    /// The transport protocol; port matches refer to it.
    Proto(Proto),
    /// Source address is exactly this one.
    Saddr(IpAddr),
    /// Destination address is exactly this one.
    Daddr(IpAddr),
    /// Destination address is not this one.
    NotDaddr(IpAddr),
    /// The output interface is `lo` (`true`) or is not (`false`).
    OutLoopback(bool),
    /// Source port (of the rule's [`Match::Proto`]).
    Sport(u16),
    /// Destination port.
    Dport(u16),
    /// Destination port is not this one.
    NotDport(u16),
    /// The packet mark matches.
    Mark(Mark),
    /// The packet mark does not match.
    NotMark(Mark),
    /// The connection mark matches.
    ConnMark(Mark),
}

impl Match {
    /// The address this match compares with, if any.
    pub fn addr(&self) -> Option<IpAddr> {
        match *self {
            Match::Saddr(a) | Match::Daddr(a) | Match::NotDaddr(a) => Some(a),
            _ => None,
        }
    }
}

/// What a rule does with a packet that matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Stop traversing our chain; the packet goes on unchanged (not redirected).
    Accept,
    /// Redirect to this port on the pod itself (the original destination stays readable
    /// through `SO_ORIGINAL_DST`).
    Redirect(u16),
    /// Set these bits of the connection mark, keeping the others.
    SetConnMark(Mark),
    /// Copy the connection mark into the packet mark (all 32 bits), so that the
    /// `fwmark` policy rule sees it.
    RestoreMark,
    /// Put the connection into this conntrack zone.
    CtZone(u16),
}

/// One rule: conditions and an action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `Some(f)`: only for packets of family `f`; `None`: for both.
    pub family: Option<Family>,
    /// Conditions, in the order the backends write them.
    pub matches: Vec<Match>,
    /// The action.
    pub action: Action,
}

impl Rule {
    /// Whether the rule has a condition on an address (which implies its family).
    pub fn has_addr(&self) -> bool {
        self.matches.iter().any(|m| m.addr().is_some())
    }

    /// Whether the rule applies to packets of `family`.
    pub fn applies_to(&self, family: Family) -> bool {
        self.family.is_none_or(|f| f == family)
    }

    /// The protocol a port match refers to (the rule's [`Match::Proto`]).
    pub fn proto(&self) -> Option<Proto> {
        self.matches.iter().find_map(|m| match m {
            Match::Proto(p) => Some(*p),
            _ => None,
        })
    }

    /// Whether the rule matches a port (so the protocol is implied by the port match).
    pub fn has_port(&self) -> bool {
        self.matches
            .iter()
            .any(|m| matches!(m, Match::Sport(_) | Match::Dport(_) | Match::NotDport(_)))
    }
}

/// One of our chains: attached to `hook` in `table`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The table.
    pub table: Table,
    /// The hook it is attached to (nftables base chain; iptables jump from the built-in
    /// chain of that name).
    pub hook: Hook,
    /// The rules, in order; the first matching [`Action::Accept`] or
    /// [`Action::Redirect`] ends the traversal.
    pub rules: Vec<Rule>,
}

/// Every chain of the in-pod rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// The chains, tables in [`Table::ALL`] order, hooks in [`Hook::ALL`] order.
    pub chains: Vec<Chain>,
}

impl Ruleset {
    /// The chain at `hook` in `table`, if the ruleset has one.
    pub fn chain(&self, table: Table, hook: Hook) -> Option<&Chain> {
        self.chains
            .iter()
            .find(|c| c.table == table && c.hook == hook)
    }

    /// Whether the ruleset uses `table` at all.
    pub fn has_table(&self, table: Table) -> bool {
        self.chains.iter().any(|c| c.table == table)
    }
}

/// Builds rules for the enabled families.
struct Gen {
    families: &'static [Family],
    /// The family of a family-independent rule: `None` (both) with IPv6 on.
    any: Option<Family>,
}

impl Gen {
    /// A rule without an address match.
    fn any(&self, matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            family: self.any,
            matches,
            action,
        }
    }

    /// One rule per enabled family, from a rule that compares with that family's addresses.
    fn each(&self, mut f: impl FnMut(Family) -> (Vec<Match>, Action)) -> Vec<Rule> {
        self.families
            .iter()
            .map(|&family| {
                let (matches, action) = f(family);
                Rule {
                    family: Some(family),
                    matches,
                    action,
                }
            })
            .collect()
    }
}

/// The in-pod rules for `cfg` (see the module docs of [`super`] for what each does).
pub fn pod_ruleset(cfg: &RuleConfig) -> Ruleset {
    let g = Gen {
        families: Family::enabled(cfg.ipv6),
        any: if cfg.ipv6 { None } else { Some(Family::V4) },
    };
    let probe = |f: Family| match f {
        Family::V4 => IpAddr::V4(cfg.probe_snat_v4),
        Family::V6 => IpAddr::V6(cfg.probe_snat_v6),
    };
    let tcp = Match::Proto(Proto::Tcp);
    let udp = Match::Proto(Proto::Udp);

    let mut chains = vec![
        Chain {
            table: Table::Mangle,
            hook: Hook::Prerouting,
            rules: vec![g.any(
                vec![Match::Mark(ZTUNNEL)],
                Action::SetConnMark(ZTUNNEL_CONN),
            )],
        },
        Chain {
            table: Table::Mangle,
            hook: Hook::Output,
            rules: vec![g.any(vec![Match::ConnMark(ZTUNNEL_CONN)], Action::RestoreMark)],
        },
    ];

    let mut nat_pre = g.each(|f| (vec![tcp, Match::Saddr(probe(f))], Action::Accept));
    nat_pre.extend(g.each(|f| {
        let m = vec![
            tcp,
            Match::NotDaddr(f.loopback()),
            Match::NotDport(HBONE_PORT),
            Match::NotMark(ZTUNNEL),
        ];
        (m, Action::Redirect(INBOUND_PORT))
    }));
    chains.push(Chain {
        table: Table::Nat,
        hook: Hook::Prerouting,
        rules: nat_pre,
    });

    let mut nat_out = g.each(|f| (vec![tcp, Match::Daddr(probe(f))], Action::Accept));
    if cfg.dns_capture {
        nat_out.push(g.any(
            vec![
                udp,
                Match::OutLoopback(false),
                Match::Dport(53),
                Match::NotMark(ZTUNNEL),
            ],
            Action::Redirect(DNS_PORT),
        ));
        nat_out.extend(g.each(|f| {
            let m = vec![
                tcp,
                Match::NotDaddr(f.loopback()),
                Match::Dport(53),
                Match::NotMark(ZTUNNEL),
            ];
            (m, Action::Redirect(DNS_PORT))
        }));
    }
    nat_out.push(g.any(vec![tcp, Match::Mark(ZTUNNEL_CONN)], Action::Accept));
    nat_out.extend(g.each(|f| {
        let m = vec![Match::NotDaddr(f.loopback()), Match::OutLoopback(true)];
        (m, Action::Accept)
    }));
    nat_out.extend(g.each(|f| {
        let m = vec![tcp, Match::NotDaddr(f.loopback()), Match::NotMark(ZTUNNEL)];
        (m, Action::Redirect(OUTBOUND_PORT))
    }));
    chains.push(Chain {
        table: Table::Nat,
        hook: Hook::Output,
        rules: nat_out,
    });

    if cfg.dns_capture {
        chains.push(Chain {
            table: Table::Raw,
            hook: Hook::Prerouting,
            rules: vec![g.any(
                vec![udp, Match::Sport(53), Match::NotMark(ZTUNNEL)],
                Action::CtZone(DNS_CT_ZONE),
            )],
        });
        chains.push(Chain {
            table: Table::Raw,
            hook: Hook::Output,
            rules: vec![g.any(
                vec![udp, Match::Dport(53), Match::Mark(ZTUNNEL)],
                Action::CtZone(DNS_CT_ZONE),
            )],
        });
    }
    Ruleset { chains }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dns_capture: bool, ipv6: bool) -> RuleConfig {
        RuleConfig {
            dns_capture,
            ipv6,
            ..RuleConfig::default()
        }
    }

    #[test]
    fn families_are_consistent_with_addresses() {
        for (dns, v6) in [(false, false), (true, false), (false, true), (true, true)] {
            for chain in pod_ruleset(&cfg(dns, v6)).chains {
                for rule in chain.rules {
                    for m in &rule.matches {
                        if let Some(a) = m.addr() {
                            assert_eq!(rule.family, Some(Family::of(a)), "{rule:?}");
                        }
                    }
                    if !v6 {
                        assert_eq!(rule.family, Some(Family::V4), "{rule:?}");
                    }
                    if rule.has_port() {
                        assert!(rule.proto().is_some(), "{rule:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn dns_capture_adds_raw_and_two_redirects_per_family() {
        let off = pod_ruleset(&cfg(false, true));
        let on = pod_ruleset(&cfg(true, true));
        assert!(!off.has_table(Table::Raw));
        assert!(on.has_table(Table::Raw));
        let dns = |r: &Ruleset| {
            r.chain(Table::Nat, Hook::Output)
                .unwrap()
                .rules
                .iter()
                .filter(|r| r.action == Action::Redirect(DNS_PORT))
                .count()
        };
        assert_eq!(dns(&off), 0);
        // udp (family-independent) + tcp per family.
        assert_eq!(dns(&on), 3);
    }

    #[test]
    fn hbone_is_never_redirected_and_ztunnel_is_skipped() {
        let rs = pod_ruleset(&cfg(true, true));
        for chain in &rs.chains {
            for rule in &chain.rules {
                if let Action::Redirect(port) = rule.action {
                    assert!(rule.matches.contains(&Match::NotMark(ZTUNNEL)), "{rule:?}");
                    assert_ne!(port, HBONE_PORT);
                    if chain.hook == Hook::Prerouting {
                        assert!(rule.matches.contains(&Match::NotDport(HBONE_PORT)));
                    }
                }
            }
        }
    }

    #[test]
    fn probe_exemptions_come_first() {
        let rs = pod_ruleset(&cfg(true, true));
        for hook in Hook::ALL {
            let rules = &rs.chain(Table::Nat, hook).unwrap().rules;
            assert_eq!(rules[0].action, Action::Accept);
            assert_eq!(rules[1].action, Action::Accept);
            assert_eq!(rules[0].family, Some(Family::V4));
            assert_eq!(rules[1].family, Some(Family::V6));
        }
    }
}
