//! What one 16 KiB `memcpy` (a TLS record's plaintext) costs with the source and destination
//! at given offsets in their pages, with this process's C library as it is configured: run it
//! as is and with `GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=0x40000000` (what the
//! proxies start over with on AMD CPUs, `zmesh_core::process::prefer_vector_copies`) to see
//! `rep movsb` against glibc's vector loop. The data stays in the CPU's caches: this measures
//! the copy itself, not memory.
//!
//! `cargo build --profile bench-lto -p zmesh-tests --bins && target/bench-lto/zmesh-bench-copy`

use std::hint::black_box;
use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
#[command(about = "16 KiB memcpy rate by source and destination offset within a page")]
struct Args {
    /// Bytes per copy.
    #[arg(long, default_value_t = 16 << 10)]
    size: usize,
    /// Copies per timed run.
    #[arg(long, default_value_t = 200_000)]
    copies: u32,
    /// Timed runs per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Cases, `SOURCE_OFFSET:DESTINATION_OFFSET` within a 4 KiB page. The defaults: rustls's
    /// record copy (the destination 5 bytes into a record buffer, the source 9 bytes before a
    /// page boundary after an HTTP/2 frame header), the destination just past the source,
    /// both aligned, and the destination half a page away.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4087:5,0:5,0:0,4087:2053"
    )]
    cases: Vec<String>,
}

const PAGE: usize = 4096;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One page-aligned region each, with room for the offsets.
    let region = args.size + 2 * PAGE;
    let mut src = vec![0u8; region + PAGE];
    let mut dst = vec![0u8; region + PAGE];
    let align = |v: &[u8]| v.as_ptr().align_offset(PAGE);
    let (src_base, dst_base) = (align(&src), align(&dst));
    src.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    println!(
        "GLIBC_TUNABLES={}",
        std::env::var("GLIBC_TUNABLES").unwrap_or_default()
    );
    println!(
        "| source offset | destination offset | GB/s (median of {}) |",
        args.repeat
    );
    println!("|---|---|---|");
    for case in &args.cases {
        let (s, d) = case
            .split_once(':')
            .and_then(|(s, d)| Some((s.parse::<usize>().ok()?, d.parse::<usize>().ok()?)))
            .filter(|(s, d)| *s < PAGE && *d < PAGE)
            .ok_or_else(|| anyhow::anyhow!("{case:?}: want SOURCE:DESTINATION, each below 4096"))?;
        let from = src_base + s;
        let to = dst_base + d;
        let mut rates = Vec::with_capacity(args.repeat);
        for _ in 0..args.repeat {
            let t = Instant::now();
            for _ in 0..args.copies {
                let (a, b) = (&src[from..from + args.size], &mut dst[to..to + args.size]);
                b.copy_from_slice(black_box(a));
                black_box(&mut dst);
            }
            let secs = t.elapsed().as_secs_f64();
            rates.push(args.size as f64 * args.copies as f64 / secs / 1e9);
        }
        rates.sort_by(f64::total_cmp);
        println!("| {s} | {d} | {:.1} |", rates[rates.len() / 2]);
    }
    Ok(())
}
