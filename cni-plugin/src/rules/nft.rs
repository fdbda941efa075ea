//! The nftables backend: the [`Ruleset`] as one `nft -f -` transaction.
//!
//! Each of our tables (`inet zmesh-mangle`, `inet zmesh-nat`, `inet zmesh-raw`) is first
//! declared (`add table`, a no-op when it exists) and deleted, then recreated with its chains
//! and rules, all in one transaction: the kernel applies all of it or nothing, so applying
//! twice leaves the same ruleset as applying once, and there is no moment without rules.
//! nft 1.0.6 (Debian bookworm) has no `destroy table` (it came with nft 1.0.8 and Linux
//! 6.3), hence the `add` + `delete` pair. The raw table is always deleted, and recreated only
//! with DNS capture, so that turning DNS capture off on a live pod removes it.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::exec::Step;
use super::model::{Action, Family, Hook, Mark, Match, Rule, Ruleset, Table};

/// The nftables table holding the chains of `table` (all in the `inet` family).
pub fn table_name(table: Table) -> &'static str {
    match table {
        Table::Mangle => "zmesh-mangle",
        Table::Nat => "zmesh-nat",
        Table::Raw => "zmesh-raw",
    }
}

/// The base chain's name.
fn chain_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Prerouting => "prerouting",
        Hook::Output => "output",
    }
}

/// The base chain's `type`, hook and priority, as iptables' tables would have them.
fn chain_spec(table: Table, hook: Hook) -> String {
    let (ty, prio) = match (table, hook) {
        (Table::Nat, _) => ("nat", -100),
        // The output chain must be of type `route`: a changed mark re-routes the packet.
        (Table::Mangle, Hook::Prerouting) => ("filter", -150),
        (Table::Mangle, Hook::Output) => ("route", -150),
        // Before conntrack (-200), so that the zone applies to the lookup.
        (Table::Raw, _) => ("filter", -300),
    };
    format!(
        "type {ty} hook {} priority {prio}; policy accept;",
        chain_name(hook)
    )
}

/// `0x00000539`, as `nft list` prints marks.
fn hex(v: u32) -> String {
    format!("{v:#010x}")
}

fn mark_expr(key: &str, m: Mark, op: &str) -> String {
    format!("{key} & {} {op} {}", hex(m.mask), hex(m.value))
}

fn addr_key(a: IpAddr) -> &'static str {
    match a {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

/// One rule in nft syntax.
pub fn rule(r: &Rule) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let (Some(f), false) = (r.family, r.has_addr()) {
        // An address match implies its family; without one, say it.
        parts.push(
            match f {
                Family::V4 => "meta nfproto ipv4",
                Family::V6 => "meta nfproto ipv6",
            }
            .to_owned(),
        );
    }
    let proto = r.proto().map_or("tcp", |p| p.name());
    for m in &r.matches {
        parts.push(match *m {
            // A port match implies the protocol.
            Match::Proto(_) if r.has_port() => continue,
            Match::Proto(p) => format!("meta l4proto {}", p.name()),
            Match::Saddr(a) => format!("{} saddr {a}", addr_key(a)),
            Match::Daddr(a) => format!("{} daddr {a}", addr_key(a)),
            Match::NotDaddr(a) => format!("{} daddr != {a}", addr_key(a)),
            Match::OutLoopback(true) => "oifname \"lo\"".to_owned(),
            Match::OutLoopback(false) => "oifname != \"lo\"".to_owned(),
            Match::Sport(p) => format!("{proto} sport {p}"),
            Match::Dport(p) => format!("{proto} dport {p}"),
            Match::NotDport(p) => format!("{proto} dport != {p}"),
            Match::Mark(m) => mark_expr("meta mark", m, "=="),
            Match::NotMark(m) => mark_expr("meta mark", m, "!="),
            Match::ConnMark(m) => mark_expr("ct mark", m, "=="),
        });
    }
    parts.push(match r.action {
        Action::Accept => "accept".to_owned(),
        Action::Redirect(port) => format!("redirect to :{port}"),
        Action::SetConnMark(m) => {
            format!("ct mark set ct mark & {} | {}", hex(!m.mask), hex(m.value))
        }
        Action::RestoreMark => "meta mark set ct mark".to_owned(),
        Action::CtZone(zone) => format!("ct zone set {zone}"),
    });
    parts.join(" ")
}

/// Lines that delete our tables whether or not they exist.
fn delete_tables(out: &mut String) {
    for t in Table::ALL {
        let name = table_name(t);
        let _ = writeln!(out, "add table inet {name}");
        let _ = writeln!(out, "delete table inet {name}");
    }
}

/// The `nft -f -` input that (re)creates the in-pod tables.
pub fn apply_script(rs: &Ruleset) -> String {
    let mut out = String::from("# zmesh in-pod redirection: replaces our tables atomically\n");
    delete_tables(&mut out);
    for t in Table::ALL.into_iter().filter(|&t| rs.has_table(t)) {
        let _ = writeln!(out, "table inet {} {{", table_name(t));
        let chains: Vec<_> = rs.chains.iter().filter(|c| c.table == t).collect();
        for (i, c) in chains.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let _ = writeln!(out, "\tchain {} {{", chain_name(c.hook));
            let _ = writeln!(out, "\t\t{}", chain_spec(t, c.hook));
            for r in &c.rules {
                let _ = writeln!(out, "\t\t{}", rule(r));
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
    }
    out
}

/// The `nft -f -` input that deletes the in-pod tables (none of them need exist).
pub fn remove_script() -> String {
    let mut out = String::from("# zmesh in-pod redirection: removes our tables\n");
    delete_tables(&mut out);
    out
}

/// `nft -f -` fed `script`.
pub fn step(script: String) -> Step {
    Step::new("nft", ["-f", "-"]).stdin(script)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleConfig;
    use crate::rules::model::pod_ruleset;

    #[test]
    fn rules_read_like_nft_list_prints_them() {
        let rs = pod_ruleset(&RuleConfig {
            ipv6: true,
            dns_capture: true,
            ..RuleConfig::default()
        });
        let nat_pre = rs.chain(Table::Nat, Hook::Prerouting).unwrap();
        assert_eq!(
            rule(&nat_pre.rules[2]),
            "ip daddr != 127.0.0.1 tcp dport != 15008 meta mark & 0x00000fff != 0x00000539 \
             redirect to :15006"
        );
        let mangle_pre = rs.chain(Table::Mangle, Hook::Prerouting).unwrap();
        assert_eq!(
            rule(&mangle_pre.rules[0]),
            "meta mark & 0x00000fff == 0x00000539 ct mark set ct mark & 0xfffff000 | 0x00000111"
        );
    }

    #[test]
    fn ipv4_only_rules_without_addresses_name_their_family() {
        let rs = pod_ruleset(&RuleConfig::default());
        let mangle_out = rs.chain(Table::Mangle, Hook::Output).unwrap();
        assert_eq!(
            rule(&mangle_out.rules[0]),
            "meta nfproto ipv4 ct mark & 0x00000fff == 0x00000111 meta mark set ct mark"
        );
    }

    #[test]
    fn removal_deletes_every_table() {
        let s = remove_script();
        for t in Table::ALL {
            assert!(s.contains(&format!("delete table inet {}\n", table_name(t))));
        }
    }
}
