//! Golden tests of the rendered rules: every backend × {DNS capture off, on} × {IPv4, IPv4 +
//! IPv6} for the in-pod rules, every backend × {IPv4, IPv4 + IPv6} for the host rules,
//! compared with `tests/golden/*.golden`. A change to the rules shows up as a diff here, to
//! be read as carefully as the first version was.
//!
//! `ZMESH_UPDATE_GOLDEN=1 cargo test -p zmesh-cni --test rules_golden` rewrites the files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use zmesh_cni::rules::{self, Backend, HostConfig, RuleConfig};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn updating() -> bool {
    std::env::var("ZMESH_UPDATE_GOLDEN").is_ok_and(|v| v == "1")
}

fn family_tag(ipv6: bool) -> &'static str {
    if ipv6 { "dual" } else { "v4" }
}

/// Every golden file this test owns, by name, with its expected content.
fn expected_files() -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for backend in Backend::ALL {
        for dns_capture in [false, true] {
            for ipv6 in [false, true] {
                let cfg = RuleConfig {
                    dns_capture,
                    ipv6,
                    ..RuleConfig::default()
                };
                let dns = if dns_capture { "-dns" } else { "" };
                let name = format!("pod-{backend}-{}{dns}.golden", family_tag(ipv6));
                files.insert(name, rules::render(backend, &cfg));
            }
        }
        for ipv6 in [false, true] {
            let cfg = HostConfig {
                ipv6,
                ..HostConfig::default()
            };
            let name = format!("host-{backend}-{}.golden", family_tag(ipv6));
            files.insert(name, rules::render_host(backend, &cfg));
        }
    }
    files
}

/// The first line where `a` and `b` differ, for the failure message.
fn first_difference(expected: &str, actual: &str) -> String {
    let (mut e, mut a) = (expected.lines(), actual.lines());
    for n in 1.. {
        match (e.next(), a.next()) {
            (None, None) => return "only in line endings".to_owned(),
            (x, y) if x == y => continue,
            (x, y) => return format!("line {n}:\n  golden: {x:?}\n  actual: {y:?}"),
        }
    }
    unreachable!("the loop returns")
}

#[test]
fn rendered_rules_match_golden_files() {
    let dir = golden_dir();
    let mut failures = Vec::new();
    for (name, actual) in expected_files() {
        let path = dir.join(&name);
        if updating() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &actual).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(golden) if golden == actual => {}
            Ok(golden) => failures.push(format!(
                "{name} differs at {}",
                first_difference(&golden, &actual)
            )),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "rendered rules differ from tests/golden (review, then regenerate with \
         ZMESH_UPDATE_GOLDEN=1):\n{}",
        failures.join("\n")
    );
}

#[test]
fn no_stale_golden_files() {
    let expected = expected_files();
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if updating() && !expected.contains_key(&name) {
            std::fs::remove_file(golden_dir().join(&name)).unwrap();
            continue;
        }
        assert!(
            expected.contains_key(&name),
            "tests/golden/{name} is not produced by any configuration; remove it"
        );
    }
}

/// The same semantics in every backend: each backend's rendering has as many rules per
/// family as the model (a cheap guard against a backend silently dropping a rule).
#[test]
fn every_backend_writes_every_rule() {
    for (dns_capture, ipv6) in [(false, false), (true, true)] {
        let cfg = RuleConfig {
            dns_capture,
            ipv6,
            ..RuleConfig::default()
        };
        let model = rules::ruleset(&cfg);
        let per_family = |f: rules::Family| {
            model
                .chains
                .iter()
                .flat_map(|c| &c.rules)
                .filter(|r| r.applies_to(f))
                .count()
        };
        let total_rules: usize = model.chains.iter().map(|c| c.rules.len()).sum();

        let nft = rules::render(Backend::Nftables, &cfg);
        let nft_rules = nft
            .lines()
            .filter(|l| l.starts_with("\t\t") && !l.contains(" hook "))
            .count();
        assert_eq!(nft_rules, total_rules, "{nft}");

        let ipt = rules::render(Backend::IptablesLegacy, &cfg);
        let ipt_rules = ipt.lines().filter(|l| l.starts_with("-A ZMESH_")).count();
        let expected: usize = cfg.families().iter().map(|&f| per_family(f)).sum();
        assert_eq!(ipt_rules, expected, "{ipt}");
        let ipt_nft = rules::render(Backend::IptablesNft, &cfg);
        assert_eq!(
            ipt.replace("-legacy-", "-X-")
                .replace("backend iptables-legacy", "backend X"),
            ipt_nft
                .replace("-nft-", "-X-")
                .replace("backend iptables-nft", "backend X"),
            "the two iptables variants differ beyond the program names"
        );
    }
}
