//! ztunnel's local config (`LOCAL_XDS_PATH`, upstream ztunnel's YAML shape): the file is parsed
//! and indexed exactly as a reload does (`LocalConfig::parse`, then `State::from_local`).
//!
//! Input: YAML text; or, when the first byte is `0x00` (which YAML text never holds), a tree
//! read by `arbitrary` and printed as flow-style YAML. The tree reaches structure that byte
//! mutations rarely build, such as collections nested thousands of levels deep (`Nest`).
//!
//! Invariant: an accepted file, printed back as YAML, parses to the same config (what
//! `/config_dump` shows can be fed back in).
//!
//! Also the target that finds slow inputs: run it with a `-timeout` (see README.md, "Slow
//! inputs").
#![no_main]

use std::fmt::Write;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use zmesh_core::state::{LocalConfig, State};

/// A YAML value, printed in flow style.
#[derive(Debug, Arbitrary)]
enum Node {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<(Scalar, Node)>),
    /// `depth` one-item collections (sequences, or maps with key `map_key`) around `inner`.
    Nest {
        depth: u16,
        map_key: Option<Key>,
        inner: Box<Node>,
    },
}

/// The keys of the local-config shape, so that trees look like configs.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Key {
    Workloads,
    Services,
    Policies,
    Uid,
    Name,
    Namespace,
    ServiceAccount,
    WorkloadIps,
    Protocol,
    Hostname,
    Vips,
    Ports,
    SubjectAltNames,
    AuthorizationPolicies,
    Scope,
    Action,
    Rules,
    Principals,
    SourceIps,
    DestinationPorts,
}

#[derive(Debug, Arbitrary)]
enum Scalar {
    Key(Key),
    Text(String),
    Int(i64),
    Ip([u8; 4]),
    Tagged(Tag, String),
}

/// The tags of a `StringMatch`.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Tag {
    Exact,
    Prefix,
    Suffix,
    Presence,
}

fn key_name(k: Key) -> String {
    let debug = format!("{k:?}");
    let mut chars = debug.chars();
    let first = chars.next().map(|c| c.to_ascii_lowercase());
    first.into_iter().chain(chars).collect()
}

fn scalar(out: &mut String, s: &Scalar) {
    match s {
        Scalar::Key(k) => out.push_str(&key_name(*k)),
        // A JSON string is a YAML double-quoted scalar.
        Scalar::Text(t) => out.push_str(&serde_json::to_string(t).unwrap_or_default()),
        Scalar::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Scalar::Ip([a, b, c, d]) => {
            let _ = write!(out, "\"{a}.{b}.{c}.{d}\"");
        }
        Scalar::Tagged(tag, t) => {
            let _ = write!(
                out,
                "!{tag:?} {}",
                serde_json::to_string(t).unwrap_or_default()
            );
        }
    }
}

/// The most text a tree prints (1 MiB). Nested `Nest`s add up their depths, and printing
/// tens of megabytes in an instrumented build takes longer than the run's `-timeout`; the
/// parser's limits refuse a document far smaller than this (128 levels).
const MAX_PRINTED: usize = 1 << 20;

fn node(out: &mut String, n: &Node) {
    if out.len() > MAX_PRINTED {
        return;
    }
    match n {
        Node::Scalar(s) => scalar(out, s),
        Node::Seq(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                node(out, item);
            }
            out.push(']');
        }
        Node::Map(entries) => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                scalar(out, k);
                out.push_str(": ");
                node(out, v);
            }
            out.push('}');
        }
        Node::Nest {
            depth,
            map_key,
            inner,
        } => {
            let (open, close) = match map_key {
                Some(k) => (format!("{{{}: ", key_name(*k)), "}"),
                None => ("[".to_owned(), "]"),
            };
            let room = MAX_PRINTED.saturating_sub(out.len()) / (open.len() + close.len());
            let depth = usize::from(*depth).min(room);
            for _ in 0..depth {
                out.push_str(&open);
            }
            node(out, inner);
            for _ in 0..depth {
                out.push_str(close);
            }
        }
    }
}

fn check(yaml: &str) {
    let Ok(cfg) = LocalConfig::parse(yaml) else {
        return;
    };
    let printed = serde_yaml::to_string(&cfg).expect("a parsed config prints");
    let again = LocalConfig::parse(&printed)
        .unwrap_or_else(|e| panic!("printed config does not parse: {e}\n{printed}"));
    assert_eq!(again, cfg, "print -> parse changed the config:\n{printed}");
    if let Ok(state) = State::from_local(cfg) {
        for w in state.workloads() {
            assert!(
                w.identity().is_ok(),
                "accepted workload {} has no identity",
                w.key()
            );
            for ip in &w.workload_ips {
                assert!(state.workload_by_ip(*ip).is_some());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => {
            // Recursion in `node` is bounded by what `arbitrary` can build from the input;
            // `Nest` makes depth without recursion.
            let Ok(tree) = Node::arbitrary(&mut Unstructured::new(rest)) else {
                return;
            };
            let mut yaml = String::new();
            node(&mut yaml, &tree);
            check(&yaml);
        }
        _ => {
            if let Ok(yaml) = std::str::from_utf8(data) {
                check(yaml);
            }
        }
    }
});
