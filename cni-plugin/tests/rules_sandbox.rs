//! The rules in a real network namespace (a private `zmesh_tests::Sandbox`; needs root), per
//! backend: applying twice leaves exactly what applying once does, a changed configuration
//! replaces the old rules, the kernel holds exactly the rendered rules, and removal leaves
//! no table, chain, policy rule or route of ours. The same for the host-side probe SNAT.

use std::path::PathBuf;

use zmesh_cni::rules::{self, Backend, HostConfig, RuleConfig, RulesError};
use zmesh_tests::Sandbox;
use zmesh_tests::lab::Topology;

/// Every listing where rules of ours could show, each under a `== heading`, with comments
/// and counters taken out (they change with time and stray packets). `ip route show table
/// 100` fails while the table does not exist, so the routes come from `table all`.
fn snapshot(sb: &Sandbox, netns: Option<&str>) -> String {
    let listings: [(&str, &[&str]); 9] = [
        ("nft list ruleset", &["nft", "list", "ruleset"]),
        ("iptables-legacy-save", &["iptables-legacy-save"]),
        ("ip6tables-legacy-save", &["ip6tables-legacy-save"]),
        ("iptables-nft-save", &["iptables-nft-save"]),
        ("ip6tables-nft-save", &["ip6tables-nft-save"]),
        ("ip -4 rule show", &["ip", "-4", "rule", "show"]),
        ("ip -6 rule show", &["ip", "-6", "rule", "show"]),
        (
            "ip -4 route table 100",
            &["ip", "-4", "route", "show", "table", "all"],
        ),
        (
            "ip -6 route table 100",
            &["ip", "-6", "route", "show", "table", "all"],
        ),
    ];
    let mut out = String::new();
    for (heading, args) in listings {
        let text = sb
            .run_stdin(netns, args, None)
            .unwrap_or_else(|e| panic!("listing failed: {e:#}"));
        out.push_str(&format!("== {heading}\n"));
        let routes = heading.ends_with("table 100");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if routes && !line.contains(" table 100") {
                continue;
            }
            out.push_str(&without_counters(line));
            out.push('\n');
        }
    }
    out
}

/// A listing line without packet counters: `:OUTPUT ACCEPT [12:720]` -> `:OUTPUT ACCEPT`
/// (iptables-save), `counter packets 1 bytes 72 jump X` -> `counter jump X` (the rules of
/// iptables-nft as `nft list ruleset` shows them).
fn without_counters(line: &str) -> String {
    if line.starts_with(':') {
        return line.split(" [").next().unwrap_or(line).to_owned();
    }
    let mut out = Vec::new();
    let mut tokens = line.split(' ').peekable();
    while let Some(t) = tokens.next() {
        out.push(t);
        if t.ends_with("counter") && tokens.peek() == Some(&"packets") {
            tokens.nth(3);
        }
    }
    out.join(" ")
}

/// For iptables-nft, the snapshot without `nft list ruleset`: nft lists chains in creation
/// order, so chains that were deleted and created again (the raw chains, when DNS capture
/// goes off and on) move after the built-in ones; `iptables-nft-save` shows the same rules.
fn without_nft_listing(backend: Backend, snap: &str) -> String {
    if backend != Backend::IptablesNft {
        return snap.to_owned();
    }
    let nft = section(snap, "nft list ruleset");
    snap.replacen(&nft, "", 1)
}

/// The lines of a snapshot under one heading.
fn section(snapshot: &str, heading: &str) -> String {
    let mut lines = snapshot
        .lines()
        .skip_while(|l| *l != format!("== {heading}"));
    assert!(lines.next().is_some(), "no {heading} in the snapshot");
    lines
        .take_while(|l| !l.starts_with("== "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Asserts that nothing of ours is left.
fn assert_clean(snap: &str) {
    let lower = snap.to_lowercase();
    assert!(!lower.contains("zmesh"), "rules left behind:\n{snap}");
    for heading in ["ip -4 rule show", "ip -6 rule show"] {
        assert!(
            !section(snap, heading).contains("lookup 100"),
            "policy rule left behind:\n{snap}"
        );
    }
    for heading in ["ip -4 route table 100", "ip -6 route table 100"] {
        assert_eq!(section(snap, heading), "", "route left behind:\n{snap}");
    }
}

/// The kernel holds exactly the rendered rules: every rule line of `render` appears in the
/// listing as often as in the rendering (iptables: `-A` lines; nftables: rule lines, with
/// the one constant nft folds when it stores `ct mark set`).
fn assert_listing_matches_render(backend: Backend, cfg: &RuleConfig, snap: &str) {
    let rendered = rules::render(backend, cfg);
    let (listing, lines): (String, Vec<String>) = match backend {
        Backend::Nftables => (
            section(snap, "nft list ruleset"),
            rendered
                .lines()
                .filter(|l| l.starts_with("\t\t") && !l.contains(" hook "))
                .map(|l| {
                    l.trim()
                        .replace("& 0xfffff000 | 0x00000111", "& 0xfffff111 | 0x00000111")
                })
                .collect(),
        ),
        _ => (
            snap.to_owned(),
            rendered
                .lines()
                .filter(|l| l.starts_with("-A "))
                .map(str::to_owned)
                .collect(),
        ),
    };
    let listed: Vec<&str> = listing.lines().map(str::trim).collect();
    for line in &lines {
        let want = lines.iter().filter(|l| *l == line).count();
        let got = listed.iter().filter(|l| *l == line).count();
        assert_eq!(
            got, want,
            "{line:?} listed {got} times, rendered {want} times:\n{snap}"
        );
    }
}

fn pod_lab() -> (Sandbox, PathBuf) {
    let sb = Sandbox::new().expect("sandbox (run the tests as root)");
    Topology::build(&sb, &["pod"]).unwrap();
    let netns = sb.netns_path(Some("pod"));
    (sb, netns)
}

fn pod_rules_are_idempotent_and_removable(backend: Backend) {
    let (sb, netns) = pod_lab();
    let netns = Some(netns.as_path());
    let pristine = snapshot(&sb, Some("pod"));
    assert_clean(&pristine);

    let full = RuleConfig {
        dns_capture: true,
        ipv6: true,
        ..RuleConfig::default()
    };
    rules::apply(netns, backend, &full).unwrap();
    let once = snapshot(&sb, Some("pod"));
    assert!(once.to_lowercase().contains("zmesh"), "{once}");
    assert!(
        section(&once, "ip -4 rule show")
            .contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100")
    );
    assert!(section(&once, "ip -6 rule show").contains("fwmark 0x111/0xfff lookup 100"));
    assert_eq!(
        section(&once, "ip -4 route table 100"),
        "local default dev lo table 100 scope host \n"
    );
    assert!(section(&once, "ip -6 route table 100").starts_with("local default dev lo table 100"));
    assert_listing_matches_render(backend, &full, &once);

    rules::apply(netns, backend, &full).unwrap();
    let twice = snapshot(&sb, Some("pod"));
    assert_eq!(once, twice, "applying twice differs from applying once");

    // A changed configuration replaces the rules: DNS capture off drops the raw rules and
    // the DNS redirects, and applying that twice is stable too.
    let no_dns = RuleConfig {
        dns_capture: false,
        ..full.clone()
    };
    rules::apply(netns, backend, &no_dns).unwrap();
    let without_dns = snapshot(&sb, Some("pod"));
    assert!(!without_dns.contains("15053"), "{without_dns}");
    assert!(!without_dns.contains("zmesh-raw"), "{without_dns}");
    assert!(!without_dns.contains("--zone"), "{without_dns}");
    assert_listing_matches_render(backend, &no_dns, &without_dns);
    rules::apply(netns, backend, &no_dns).unwrap();
    assert_eq!(without_dns, snapshot(&sb, Some("pod")));

    rules::apply(netns, backend, &full).unwrap();
    assert_eq!(
        without_nft_listing(backend, &once),
        without_nft_listing(backend, &snapshot(&sb, Some("pod"))),
        "back to the first rules"
    );

    rules::remove(netns, backend, &full).unwrap();
    assert_clean(&snapshot(&sb, Some("pod")));
    // Removing what is gone is fine.
    rules::remove(netns, backend, &full).unwrap();
    assert_clean(&snapshot(&sb, Some("pod")));
}

#[test]
fn nftables_pod_rules_are_idempotent_and_removable() {
    pod_rules_are_idempotent_and_removable(Backend::Nftables);
}

#[test]
fn iptables_legacy_pod_rules_are_idempotent_and_removable() {
    pod_rules_are_idempotent_and_removable(Backend::IptablesLegacy);
}

#[test]
fn iptables_nft_pod_rules_are_idempotent_and_removable() {
    pod_rules_are_idempotent_and_removable(Backend::IptablesNft);
}

fn host_rules_are_idempotent_and_removable(backend: Backend) {
    let sb = Sandbox::new().expect("sandbox (run the tests as root)");
    let node = sb.netns_path(None);
    let node = Some(node.as_path());
    let cfg = HostConfig {
        ipv6: true,
        ..HostConfig::default()
    };
    let (pod_a, pod_b, pod_v6) = (
        "10.200.0.2".parse().unwrap(),
        "10.200.0.3".parse().unwrap(),
        "fd00:200::2".parse().unwrap(),
    );

    let err = rules::add_probe_pod(node, backend, &cfg, pod_a).unwrap_err();
    assert!(matches!(err, RulesError::HostRulesMissing), "{err}");
    let v4_only = HostConfig::default();
    let err = rules::add_probe_pod(node, backend, &v4_only, pod_v6).unwrap_err();
    assert!(matches!(err, RulesError::InvalidConfig(_)), "{err}");

    rules::apply_host(node, backend, &cfg).unwrap();
    for ip in [pod_a, pod_b, pod_v6] {
        rules::add_probe_pod(node, backend, &cfg, ip).unwrap();
    }
    let once = snapshot(&sb, None);
    for ip in ["10.200.0.2", "10.200.0.3", "fd00:200::2"] {
        assert!(once.contains(ip), "{ip} missing:\n{once}");
    }
    if backend != Backend::Nftables {
        let rule = "-A ZMESH_POSTRT -d 10.200.0.2/32 -p tcp -m owner --socket-exists -j SNAT \
                    --to-source 169.254.7.127";
        assert_eq!(once.matches(rule).count(), 1, "{once}");
        assert_eq!(
            once.matches("-A POSTROUTING -j ZMESH_POSTRT").count(),
            2,
            "{once}"
        );
    }

    // Adding again and re-applying the host rules change nothing, and keep the pods.
    rules::add_probe_pod(node, backend, &cfg, pod_a).unwrap();
    rules::apply_host(node, backend, &cfg).unwrap();
    assert_eq!(once, snapshot(&sb, None));

    rules::remove_probe_pod(node, backend, &cfg, pod_a).unwrap();
    let removed = snapshot(&sb, None);
    assert!(!removed.contains("10.200.0.2"), "{removed}");
    assert!(removed.contains("10.200.0.3"), "{removed}");
    rules::remove_probe_pod(node, backend, &cfg, pod_a).unwrap();
    assert_eq!(removed, snapshot(&sb, None));

    rules::remove_host(node, backend, &cfg).unwrap();
    assert_clean(&snapshot(&sb, None));
    rules::remove_host(node, backend, &cfg).unwrap();
    // Without host rules there is nothing to remove a pod from: fine.
    rules::remove_probe_pod(node, backend, &cfg, pod_b).unwrap();
}

#[test]
fn nftables_host_rules_are_idempotent_and_removable() {
    host_rules_are_idempotent_and_removable(Backend::Nftables);
}

#[test]
fn iptables_legacy_host_rules_are_idempotent_and_removable() {
    host_rules_are_idempotent_and_removable(Backend::IptablesLegacy);
}

#[test]
fn iptables_nft_host_rules_are_idempotent_and_removable() {
    host_rules_are_idempotent_and_removable(Backend::IptablesNft);
}
