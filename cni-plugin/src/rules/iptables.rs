//! The iptables backend: the [`Ruleset`] as `iptables-restore --noflush` input, for the
//! legacy or the nf_tables variant of iptables (and ip6tables with IPv6).
//!
//! Our rules live in our own chains, `ZMESH_PRERT` and `ZMESH_OUTPUT`, in each table the
//! ruleset uses, reached by one jump from the built-in `PREROUTING` / `OUTPUT`. In restore
//! input, declaring a user chain (`:ZMESH_PRERT - [0:0]`) creates it, or flushes it when it
//! exists (both variants, with `--noflush`), so one restore replaces our chains' contents;
//! each table's part commits atomically (the nft variant commits the whole input at once).
//! The jumps must not be added twice, and restore input cannot say "unless present": so
//! [`apply`] first reads the tables with `iptables-save`, and writes only the missing jumps.
//! [`render_steps`] shows the input for a netns without our rules (every jump included).
//! Removal deletes every rule that jumps to our chains, then flushes and deletes the chains.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::RulesError;
use super::exec::Step;
use super::model::{Action, Family, Hook, Match, Rule, Ruleset, Table};

/// Which iptables implementation to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `iptables-legacy-*` (x_tables).
    Legacy,
    /// `iptables-nft-*` (nf_tables, tables `ip nat`, `ip mangle`, ... in `nft list ruleset`).
    Nft,
}

/// `iptables-legacy-save`, `ip6tables-nft-restore`, ...
fn program(variant: Variant, family: Family, what: &str) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let v = match variant {
        Variant::Legacy => "legacy",
        Variant::Nft => "nft",
    };
    format!("{base}-{v}-{what}")
}

/// The step that lists the current tables.
pub fn save_step(variant: Variant, family: Family) -> Step {
    Step::new(&program(variant, family, "save"), Vec::<String>::new())
}

/// The step that feeds `input` to `iptables-restore --noflush`, waiting up to 5 s for the
/// xtables lock that other iptables users on the node may hold.
pub fn restore_step(variant: Variant, family: Family, input: String) -> Step {
    Step::new(
        &program(variant, family, "restore"),
        ["-w", "5", "--noflush"],
    )
    .stdin(input)
}

/// Our chain for `hook`.
pub fn chain_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Prerouting => "ZMESH_PRERT",
        Hook::Output => "ZMESH_OUTPUT",
    }
}

/// The built-in chain for `hook`.
fn builtin(hook: Hook) -> &'static str {
    match hook {
        Hook::Prerouting => "PREROUTING",
        Hook::Output => "OUTPUT",
    }
}

/// The jump rule from the built-in chain to ours, as `iptables-save` prints it.
fn jump(hook: Hook) -> String {
    format!("-A {} -j {}", builtin(hook), chain_name(hook))
}

/// An address as a host prefix (`10.0.0.1/32`, `::1/128`).
pub fn host_prefix(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// One rule appended to `chain`, written in the order `iptables-save` prints options (so a
/// rendered rule and the saved one are the same line).
pub fn rule_line(chain: &str, r: &Rule) -> String {
    let mut head = Vec::new();
    for m in &r.matches {
        match *m {
            Match::Saddr(a) => head.push((0, format!("-s {}", host_prefix(a)))),
            Match::Daddr(a) => head.push((1, format!("-d {}", host_prefix(a)))),
            Match::NotDaddr(a) => head.push((1, format!("! -d {}", host_prefix(a)))),
            Match::OutLoopback(true) => head.push((2, "-o lo".to_owned())),
            Match::OutLoopback(false) => head.push((2, "! -o lo".to_owned())),
            Match::Proto(p) => head.push((3, format!("-p {}", p.name()))),
            _ => {}
        }
    }
    head.sort_by_key(|(order, _)| *order);
    let mut parts: Vec<String> = vec![format!("-A {chain}")];
    parts.extend(head.into_iter().map(|(_, s)| s));
    let proto = r.proto().map_or("tcp", |p| p.name());
    for m in &r.matches {
        parts.push(match *m {
            Match::Sport(p) => format!("-m {proto} --sport {p}"),
            Match::Dport(p) => format!("-m {proto} --dport {p}"),
            Match::NotDport(p) => format!("-m {proto} ! --dport {p}"),
            Match::Mark(m) => format!("-m mark --mark {:#x}/{:#x}", m.value, m.mask),
            Match::NotMark(m) => format!("-m mark ! --mark {:#x}/{:#x}", m.value, m.mask),
            Match::ConnMark(m) => format!("-m connmark --mark {:#x}/{:#x}", m.value, m.mask),
            _ => continue,
        });
    }
    parts.push(match r.action {
        Action::Accept => "-j ACCEPT".to_owned(),
        Action::Redirect(port) => format!("-j REDIRECT --to-ports {port}"),
        Action::SetConnMark(m) => format!("-j CONNMARK --set-xmark {:#x}/{:#x}", m.value, m.mask),
        Action::RestoreMark => {
            "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff".to_owned()
        }
        Action::CtZone(zone) => format!("-j CT --zone {zone}"),
    });
    parts.join(" ")
}

/// The tables as `iptables-save` printed them: per table, the chains and the `-A` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    tables: Vec<SavedTable>,
}

/// One table of [`Saved`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    name: String,
    chains: Vec<String>,
    rules: Vec<String>,
}

impl Saved {
    /// Parses `iptables-save` output. Lines it does not know (comments, `COMMIT`) are skipped.
    pub fn parse(text: &str) -> Saved {
        let mut saved = Saved::default();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                saved.tables.push(SavedTable {
                    name: name.to_owned(),
                    ..SavedTable::default()
                });
            } else if let Some(t) = saved.tables.last_mut() {
                if let Some(decl) = line.strip_prefix(':') {
                    if let Some(chain) = decl.split_whitespace().next() {
                        t.chains.push(chain.to_owned());
                    }
                } else if line.starts_with("-A ") {
                    t.rules.push(line.to_owned());
                }
            }
        }
        saved
    }

    /// The table called `name`, if it was listed.
    pub fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.iter().find(|t| t.name == name)
    }
}

impl SavedTable {
    /// Whether the chain exists.
    pub fn has_chain(&self, chain: &str) -> bool {
        self.chains.iter().any(|c| c == chain)
    }

    /// Whether this exact `-A` line exists.
    pub fn has_rule(&self, line: &str) -> bool {
        self.rules.iter().any(|r| r == line)
    }

    /// The `-A` lines of `chain`.
    pub fn rules_in<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.rules
            .iter()
            .map(String::as_str)
            .filter(move |r| r.split_whitespace().nth(1) == Some(chain))
    }

    /// The `-A` lines, in chains other than `targets`, that jump to one of `targets`.
    pub fn jumps_to<'a>(&'a self, targets: &'a [&'a str]) -> impl Iterator<Item = &'a str> + 'a {
        self.rules.iter().map(String::as_str).filter(move |r| {
            let tokens: Vec<&str> = r.split_whitespace().collect();
            let in_target = tokens.get(1).is_some_and(|c| targets.contains(c));
            let jumps = tokens
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && targets.contains(&w[1]));
            jumps && !in_target
        })
    }
}

/// The `-D` line that deletes a saved `-A` line.
pub fn delete_line(saved_rule: &str) -> String {
    format!("-D{}", &saved_rule[2..])
}

/// Restore lines that remove `chains` from `table`: jumps to them, then their contents, then
/// the chains. Empty when none of them exists.
pub fn remove_chains(table: &SavedTable, chains: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = table.jumps_to(chains).map(delete_line).collect();
    for c in chains.iter().filter(|c| table.has_chain(c)) {
        lines.push(format!("-F {c}"));
        lines.push(format!("-X {c}"));
    }
    lines
}

/// Our chains, for removal.
const OUR_CHAINS: [&str; 2] = ["ZMESH_PRERT", "ZMESH_OUTPUT"];

/// The restore input that installs the `family` part of `rs`, given the current tables.
pub fn apply_input(rs: &Ruleset, family: Family, saved: &Saved) -> String {
    let mut out = format!(
        "# zmesh in-pod redirection ({}): refills our chains, adds missing jumps\n",
        family_name(family)
    );
    for t in Table::ALL {
        let current = saved.table(t.iptables_name());
        if !rs.has_table(t) {
            // Not wanted (raw without DNS capture): remove what an earlier apply left.
            if let Some(current) = current {
                let lines = remove_chains(current, &OUR_CHAINS);
                if !lines.is_empty() {
                    write_table(&mut out, t, &lines);
                }
            }
            continue;
        }
        let chains: Vec<_> = rs.chains.iter().filter(|c| c.table == t).collect();
        let mut lines: Vec<String> = chains
            .iter()
            .map(|c| format!(":{} - [0:0]", chain_name(c.hook)))
            .collect();
        for c in &chains {
            let rules = c.rules.iter().filter(|r| r.applies_to(family));
            lines.extend(rules.map(|r| rule_line(chain_name(c.hook), r)));
        }
        for c in &chains {
            let jump = jump(c.hook);
            if !current.is_some_and(|cur| cur.has_rule(&jump)) {
                lines.push(jump);
            }
        }
        write_table(&mut out, t, &lines);
    }
    out
}

/// The restore input that removes our chains from every table, or `None` when there is
/// nothing to remove.
pub fn remove_input(family: Family, saved: &Saved) -> Option<String> {
    let mut out = format!(
        "# zmesh in-pod redirection ({}): removes our chains\n",
        family_name(family)
    );
    let mut any = false;
    for t in Table::ALL {
        if let Some(current) = saved.table(t.iptables_name()) {
            let lines = remove_chains(current, &OUR_CHAINS);
            if !lines.is_empty() {
                write_table(&mut out, t, &lines);
                any = true;
            }
        }
    }
    any.then_some(out)
}

/// `IPv4` / `IPv6`, for comments.
pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// Appends `*table`, the lines and `COMMIT`.
pub fn write_table(out: &mut String, table: Table, lines: &[String]) {
    let _ = writeln!(out, "*{}", table.iptables_name());
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    out.push_str("COMMIT\n");
}

/// Reads the current tables of `family`.
pub fn read(variant: Variant, family: Family) -> Result<Saved, RulesError> {
    Ok(Saved::parse(&save_step(variant, family).run()?))
}

/// Installs `rs` for every family in `families` (inside the current netns).
pub fn apply(variant: Variant, rs: &Ruleset, families: &[Family]) -> Result<(), RulesError> {
    for &family in families {
        let saved = read(variant, family)?;
        restore_step(variant, family, apply_input(rs, family, &saved)).run()?;
    }
    Ok(())
}

/// Removes our chains for every family in `families` (inside the current netns).
pub fn remove(variant: Variant, families: &[Family]) -> Result<(), RulesError> {
    for &family in families {
        if let Some(input) = remove_input(family, &read(variant, family)?) {
            restore_step(variant, family, input).run()?;
        }
    }
    Ok(())
}

/// The restore steps for a netns without our rules, for [`super::render`].
pub fn render_steps(variant: Variant, rs: &Ruleset, families: &[Family]) -> Vec<Step> {
    families
        .iter()
        .map(|&f| restore_step(variant, f, apply_input(rs, f, &Saved::default())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleConfig;
    use crate::rules::model::pod_ruleset;

    const SAVED: &str = "# Generated by iptables-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:ZMESH_OUTPUT - [0:0]
:ZMESH_PRERT - [0:0]
-A PREROUTING -j ZMESH_PRERT
-A OUTPUT -p tcp -j ZMESH_OUTPUT
-A ZMESH_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:ZMESH_PRERT - [0:0]
-A PREROUTING -j ZMESH_PRERT
COMMIT
";

    #[test]
    fn save_output_is_parsed() {
        let s = Saved::parse(SAVED);
        let nat = s.table("nat").unwrap();
        assert!(nat.has_chain("ZMESH_PRERT") && nat.has_chain("OUTPUT"));
        assert!(nat.has_rule("-A PREROUTING -j ZMESH_PRERT"));
        assert_eq!(nat.rules_in("ZMESH_OUTPUT").count(), 1);
        let jumps: Vec<_> = nat.jumps_to(&OUR_CHAINS).collect();
        assert_eq!(
            jumps,
            [
                "-A PREROUTING -j ZMESH_PRERT",
                "-A OUTPUT -p tcp -j ZMESH_OUTPUT"
            ]
        );
        assert!(s.table("mangle").is_none());
    }

    #[test]
    fn existing_jumps_are_not_added_again_and_stale_raw_is_removed() {
        let rs = pod_ruleset(&RuleConfig::default());
        let input = apply_input(&rs, Family::V4, &Saved::parse(SAVED));
        let nat = input.split("*nat\n").nth(1).unwrap();
        let nat = nat.split("COMMIT").next().unwrap();
        assert!(!nat.contains("-A PREROUTING -j ZMESH_PRERT"), "{input}");
        // Not the same rule as ours (`-p tcp`): ours is added.
        assert!(nat.contains("-A OUTPUT -j ZMESH_OUTPUT"), "{input}");
        assert!(
            input.contains(
                "*raw\n-D PREROUTING -j ZMESH_PRERT\n-F ZMESH_PRERT\n-X ZMESH_PRERT\nCOMMIT\n"
            ),
            "{input}"
        );
        assert!(input.contains("*mangle\n:ZMESH_PRERT - [0:0]\n"), "{input}");
    }

    #[test]
    fn removal_deletes_every_jump_then_the_chains() {
        let input = remove_input(Family::V4, &Saved::parse(SAVED)).unwrap();
        assert!(input.contains(
            "*nat\n-D PREROUTING -j ZMESH_PRERT\n-D OUTPUT -p tcp -j ZMESH_OUTPUT\n\
             -F ZMESH_PRERT\n-X ZMESH_PRERT\n-F ZMESH_OUTPUT\n-X ZMESH_OUTPUT\nCOMMIT\n"
        ));
        assert_eq!(remove_input(Family::V4, &Saved::default()), None);
    }

    #[test]
    fn rules_are_written_in_save_order() {
        let rs = pod_ruleset(&RuleConfig {
            dns_capture: true,
            ipv6: true,
            ..RuleConfig::default()
        });
        let out = rs.chain(Table::Nat, Hook::Output).unwrap();
        let lines: Vec<String> = out
            .rules
            .iter()
            .map(|r| rule_line("ZMESH_OUTPUT", r))
            .collect();
        assert!(
            lines.contains(
                &"-A ZMESH_OUTPUT ! -o lo -p udp -m udp --dport 53 -m mark ! --mark 0x539/0xfff \
              -j REDIRECT --to-ports 15053"
                    .to_owned()
            )
        );
        assert!(lines.contains(&"-A ZMESH_OUTPUT ! -d ::1/128 -o lo -j ACCEPT".to_owned()));
    }
}
