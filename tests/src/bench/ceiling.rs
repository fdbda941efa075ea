//! The throughput ceiling of HBONE on this machine, computed from measured rates rather than
//! guessed: what a byte costs to cross one TCP hop (a socket write and a socket read, with the
//! kernel's TCP work in between) and what one AES-GCM pass costs.
//!
//! Direct TCP moves each byte over one hop. Through two ztunnels it crosses three (client →
//! its ztunnel, ztunnel → ztunnel, ztunnel → server) and is sealed once and opened once.
//! Nothing else is unavoidable: HTTP/2 framing adds 9 bytes per frame and TLS 22 per record
//! (0.2% at 16 KiB records). So with `C` cores and `H` CPU-seconds per byte per hop, the
//! best any pair of proxies can do is
//!
//! ```text
//! ceiling = min( C / (3H + seal + open),  1 / (H + max(seal, open)) )
//! ```
//!
//! The second term is one ztunnel worker, which must receive, encrypt (or decrypt) and send
//! every byte of a stream on one thread: it binds when a ztunnel runs a single worker.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, Algorithm, LessSafeKey, Nonce, UnboundKey};

/// Plaintext per TLS record: the TLS 1.3 maximum (RFC 8446 §5.1), what bulk transfer uses.
pub const RECORD: usize = 16 << 10;

/// Busy time of all CPUs so far (user, nice, system, irq, softirq, steal), from `/proc/stat`.
pub fn cpu_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    anyhow::ensure!(f.len() >= 8, "/proc/stat: unexpected first line {line:?}");
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    Ok(Duration::from_micros(
        busy * 1_000_000 / super::clock_ticks(),
    ))
}

/// Nanoseconds of one core per byte to seal and to open `RECORD`-sized records with `alg`,
/// measured for about `dur` each.
pub fn aead_ns_per_byte(alg: &'static Algorithm, dur: Duration) -> Result<(f64, f64)> {
    let key_bytes = vec![0x42u8; alg.key_len()];
    let key = LessSafeKey::new(
        UnboundKey::new(alg, &key_bytes).map_err(|_| anyhow::anyhow!("aead key"))?,
    );
    let nonce = |i: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let mut buf = vec![0x5au8; RECORD];
    // Seal: in place, tag apart, like a TLS record.
    let (mut n, t) = (0u64, Instant::now());
    while t.elapsed() < dur {
        let tag = key
            .seal_in_place_separate_tag(nonce(n), Aad::empty(), &mut buf)
            .map_err(|_| anyhow::anyhow!("seal"))?;
        let _ = std::hint::black_box(tag);
        n += 1;
    }
    let seal = t.elapsed().as_nanos() as f64 / (n as f64 * RECORD as f64);
    // Open: one sealed record, opened again and again (a copy restores it each time, and the
    // copy is timed apart and taken off).
    let mut sealed = vec![0x5au8; RECORD];
    let tag = key
        .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut sealed)
        .map_err(|_| anyhow::anyhow!("seal"))?;
    sealed.extend_from_slice(tag.as_ref());
    let mut work = sealed.clone();
    let (mut m, t) = (0u64, Instant::now());
    while t.elapsed() < dur {
        work.copy_from_slice(&sealed);
        key.open_in_place(nonce(0), Aad::empty(), &mut work)
            .map_err(|_| anyhow::anyhow!("open"))?;
        m += 1;
    }
    let open_and_copy = t.elapsed().as_nanos() as f64 / (m as f64 * RECORD as f64);
    let (mut k, t) = (0u64, Instant::now());
    while t.elapsed() < dur {
        work.copy_from_slice(std::hint::black_box(&sealed));
        std::hint::black_box(&mut work);
        k += 1;
    }
    let copy = t.elapsed().as_nanos() as f64 / (k as f64 * RECORD as f64);
    Ok((seal, (open_and_copy - copy).max(0.0)))
}

/// The AEADs HBONE may negotiate, by TLS 1.3 suite name, in zmesh's order (the first is what
/// two zmesh ztunnels use).
pub fn suites() -> [(&'static str, &'static Algorithm); 2] {
    [
        ("TLS13_AES_128_GCM_SHA256", &AES_128_GCM),
        ("TLS13_AES_256_GCM_SHA384", &AES_256_GCM),
    ]
}

/// The inputs of the ceiling and what follows from them.
#[derive(Clone, Copy, Debug)]
pub struct Ceiling {
    pub cores: f64,
    /// CPU nanoseconds per byte for one TCP hop (measured on the direct run).
    pub hop: f64,
    pub seal: f64,
    pub open: f64,
}

impl Ceiling {
    /// CPU nanoseconds per byte through two proxies: three hops, one seal, one open.
    pub fn mesh_cost(&self) -> f64 {
        3.0 * self.hop + self.seal + self.open
    }

    /// Bytes per second that all cores could move through two proxies.
    pub fn all_cores(&self) -> f64 {
        self.cores / self.mesh_cost() * 1e9
    }

    /// Bytes per second one single-threaded proxy could move (receive, crypto, send).
    pub fn one_worker(&self) -> f64 {
        1e9 / (self.hop + self.seal.max(self.open))
    }

    /// The ceiling, in bytes per second, for proxies with `workers` threads each.
    pub fn bytes_per_sec(&self, workers: usize) -> f64 {
        if workers <= 1 {
            self.all_cores().min(self.one_worker())
        } else {
            self.all_cores()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_follows_the_cost_model() {
        let c = Ceiling {
            cores: 2.0,
            hop: 1.0,
            seal: 0.25,
            open: 0.5,
        };
        assert_eq!(c.mesh_cost(), 3.75);
        assert!((c.all_cores() - 2.0 / 3.75 * 1e9).abs() < 1.0);
        assert!((c.one_worker() - 1e9 / 1.5).abs() < 1.0);
        // Cheap crypto: the cores bind before one worker does.
        assert_eq!(c.bytes_per_sec(1), c.all_cores());
        // Crypto as dear as a hop: one single-threaded proxy binds first (1/3 < 2/5.25).
        let slow = Ceiling { open: 2.0, ..c };
        assert!((slow.one_worker() - 1e9 / 3.0).abs() < 1.0);
        assert_eq!(slow.bytes_per_sec(1), slow.one_worker());
        assert_eq!(slow.bytes_per_sec(2), slow.all_cores());
    }

    #[test]
    fn aead_rates_are_measured_and_positive() {
        let (seal, open) = aead_ns_per_byte(&AES_128_GCM, Duration::from_millis(20)).unwrap();
        assert!(seal > 0.0 && seal.is_finite(), "seal {seal}");
        assert!(open >= 0.0 && open.is_finite(), "open {open}");
        assert!(cpu_busy().unwrap() > Duration::ZERO);
    }
}
