//! Per-connection L4 authorization cost: `PolicySet::check` (what ztunnel runs on every inbound
//! connection) with no policies, 10 and 10,000 policies in the mesh, timed in process. The
//! policies are parsed from the same local-config YAML ztunnel reads (`bench::policy_mix`).
//!
//! `cargo build --profile bench-lto -p zmesh-tests --bins && target/bench-lto/zmesh-bench-policy`

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context, Result};

use clap::Parser;
use zmesh_core::identity::SpiffeId;
use zmesh_core::policy::{Connection, PolicySet};
use zmesh_tests::bench::{self, MIX_SELECTOR_POLICY};
use zmesh_tests::mesh::LocalConfig;

#[derive(Parser)]
#[command(about = "Per-connection L4 policy decision cost with 0, 10 and 10k policies")]
struct Args {
    /// Decisions per timed run.
    #[arg(long, default_value_t = 2_000_000)]
    iterations: u64,
    /// Timed runs per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Policy counts to compare.
    #[arg(long, value_delimiter = ',', default_value = "0,10,10000")]
    sizes: Vec<usize>,
}

fn policies(n: usize) -> Result<PolicySet> {
    if n == 0 {
        return Ok(PolicySet::default());
    }
    let mut cfg = LocalConfig::default();
    for p in bench::policy_mix(n, &[5001, 5002]) {
        cfg = cfg.policy(p);
    }
    let parsed = zmesh_core::state::LocalConfig::parse(&cfg.to_yaml())
        .context("the generated policies must parse")?;
    Ok(PolicySet::new(parsed.policies))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let client = SpiffeId::new("cluster.local", "default", "client")?;
    let src: IpAddr = "10.200.0.3".parse()?;
    let dst: IpAddr = "10.200.0.2".parse()?;
    let selected = vec![MIX_SELECTOR_POLICY.to_owned()];
    let conn = Connection {
        src_ip: src,
        src_identity: Some(&client),
        dst_ip: dst,
        dst_port: 5002,
    };
    let denied = Connection {
        dst_port: 6000,
        ..conn
    };
    println!("| policies in the mesh | allowed: ns/decision | denied: ns/decision | decision |");
    println!("|---|---|---|---|");
    let mut base = None;
    for &n in &args.sizes {
        let set = policies(n)?;
        anyhow::ensure!(
            set.check("default", &selected, &conn).allowed,
            "the benchmark's allowed connection is denied with {n} policies"
        );
        anyhow::ensure!(
            set.len() == n,
            "{n} policies generated, {} parsed",
            set.len()
        );
        let time = |c: &Connection<'_>| {
            let mut xs = Vec::new();
            for _ in 0..args.repeat {
                let start = Instant::now();
                for _ in 0..args.iterations {
                    black_box(set.check(black_box("default"), black_box(&selected), black_box(c)));
                }
                xs.push(start.elapsed().as_nanos() as f64 / args.iterations as f64);
            }
            bench::median(xs)
        };
        let (a, d) = (time(&conn), time(&denied));
        let decision = set.check("default", &selected, &denied);
        let verdict = if n == 0 {
            "allow (no policy)".to_owned()
        } else {
            format!(
                "{} ({})",
                if decision.allowed { "allow" } else { "deny" },
                decision.policy.unwrap_or_else(|| "no ALLOW matched".into())
            )
        };
        let ratio = match (n, base) {
            (10, _) => {
                base = Some(a);
                String::new()
            }
            (_, Some(b)) if n > 10 => format!(" ({:.2}x of 10)", a / b),
            _ => String::new(),
        };
        println!("| {n} | {a:.1}{ratio} | {d:.1} | port 6000: {verdict} |");
    }
    Ok(())
}
