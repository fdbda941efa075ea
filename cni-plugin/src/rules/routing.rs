//! Policy routing for connections ztunnel took part in: packets carrying the connmark
//! `0x111/0xfff` (restored into the packet mark by the mangle output chain) are looked up in
//! table 100, whose only route delivers everything locally through `lo`. ztunnel's inbound
//! side connects to the app with the client's address as source; the app's replies to that
//! (non-local) address would otherwise leave through `eth0`, and instead come back to
//! ztunnel.
//!
//! Idempotent without a gap: `ip route replace` is; `ip rule add` of an identical rule fails
//! with `File exists` (the kernel refuses duplicates when asked for an exclusive add, which
//! iproute2 does), which counts as success. Removal tolerates "not there".

use super::exec::Step;
use super::model::Family;
use super::{CONNMARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY};

/// `-4` / `-6`.
fn flag(f: Family) -> &'static str {
    match f {
        Family::V4 => "-4",
        Family::V6 => "-6",
    }
}

/// The destination of the catch-all local route.
fn any(f: Family) -> &'static str {
    match f {
        Family::V4 => "0.0.0.0/0",
        Family::V6 => "::/0",
    }
}

/// `fwmark 0x111/0xfff lookup 100 pref 32764`.
fn rule_selector() -> Vec<String> {
    vec![
        "fwmark".to_owned(),
        format!("{CONNMARK:#x}/{MARK_MASK:#x}"),
        "lookup".to_owned(),
        ROUTE_TABLE.to_string(),
        "pref".to_owned(),
        RULE_PRIORITY.to_string(),
    ]
}

/// `local <any> dev lo table 100`.
fn route_selector(f: Family) -> Vec<String> {
    ["local", any(f), "dev", "lo", "table"]
        .map(str::to_owned)
        .into_iter()
        .chain([ROUTE_TABLE.to_string()])
        .collect()
}

fn ip(f: Family, object: &str, verb: &str, selector: Vec<String>) -> Step {
    let mut args = vec![flag(f).to_owned(), object.to_owned(), verb.to_owned()];
    args.extend(selector);
    Step::new("ip", args)
}

/// Installs the route, then the rule that uses it, per family.
pub fn apply_steps(families: &[Family]) -> Vec<Step> {
    families
        .iter()
        .flat_map(|&f| {
            [
                ip(f, "route", "replace", route_selector(f)),
                ip(f, "rule", "add", rule_selector()).tolerate(&["File exists"]),
            ]
        })
        .collect()
}

/// Removes the rule, then the route, per family; either may already be gone.
pub fn remove_steps(families: &[Family]) -> Vec<Step> {
    const GONE: &[&str] = &[
        "No such file or directory",
        "No such process",
        // `ip route del ... table 100` when the table never existed.
        "FIB table does not exist",
    ];
    families
        .iter()
        .flat_map(|&f| {
            [
                ip(f, "rule", "del", rule_selector()).tolerate(GONE),
                ip(f, "route", "del", route_selector(f)).tolerate(GONE),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_match_istio_values() {
        let steps = apply_steps(&[Family::V4, Family::V6]);
        let lines: Vec<String> = steps.iter().map(Step::command_line).collect();
        assert_eq!(
            lines,
            [
                "ip -4 route replace local 0.0.0.0/0 dev lo table 100",
                "ip -4 rule add fwmark 0x111/0xfff lookup 100 pref 32764",
                "ip -6 route replace local ::/0 dev lo table 100",
                "ip -6 rule add fwmark 0x111/0xfff lookup 100 pref 32764",
            ]
        );
        let removal: Vec<String> = remove_steps(&[Family::V4])
            .iter()
            .map(Step::command_line)
            .collect();
        assert_eq!(
            removal,
            [
                "ip -4 rule del fwmark 0x111/0xfff lookup 100 pref 32764",
                "ip -4 route del local 0.0.0.0/0 dev lo table 100",
            ]
        );
    }
}
