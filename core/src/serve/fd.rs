//! Descriptor headroom: a listener stops taking connections before the process runs out of
//! file descriptors, so that what the process itself must open (outbound connects, the CA,
//! config reads) keeps working while an attacker holds connections open.
//!
//! The number of open descriptors is counted from `/proc/self/fd` at most once a second, or
//! at most every 50 ms while the estimate is at the threshold; between counts every accepted
//! connection is assumed to cost `per_connection` descriptors (the accepted socket, and the
//! upstream one a proxy opens for it), and closes are not credited until the next count, so
//! the estimate errs on the safe side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the count is refreshed while the estimate is under the threshold.
const RECOUNT: Duration = Duration::from_secs(1);
/// How often the count may be refreshed while the estimate is at the threshold.
const RECOUNT_FULL: Duration = Duration::from_millis(50);

/// The process-wide descriptor budget listeners share. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct FdHeadroom {
    /// Accepts stop at this many open descriptors.
    threshold: u64,
    /// Descriptors one accepted connection is assumed to cost until the next count.
    per_connection: u64,
    /// The last count of open descriptors.
    counted: AtomicU64,
    /// Connections admitted since that count.
    since: AtomicU64,
    /// When the last count was taken, in milliseconds since `epoch`.
    counted_at: AtomicU64,
    epoch: Instant,
    /// Counts the open descriptors (`open_fds`; a fake in unit tests).
    counter: fn() -> Option<u64>,
}

impl FdHeadroom {
    /// A budget of `fraction` (0 < fraction <= 1) of the soft `RLIMIT_NOFILE` as it is now
    /// (raise the limit before calling this). An unreadable limit counts as 1024.
    pub fn new(fraction: f64) -> FdHeadroom {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let fraction = if fraction > 0.0 && fraction <= 1.0 {
            fraction
        } else {
            0.9
        };
        Self::with_threshold((limit as f64 * fraction) as u64)
    }

    /// The process's budget, shared by all its listeners: made on first use with `fraction`
    /// (later calls get the same budget, whatever fraction they pass).
    pub fn process(fraction: f64) -> std::sync::Arc<FdHeadroom> {
        static PROCESS: std::sync::OnceLock<std::sync::Arc<FdHeadroom>> =
            std::sync::OnceLock::new();
        PROCESS
            .get_or_init(|| std::sync::Arc::new(FdHeadroom::new(fraction)))
            .clone()
    }

    /// A budget that stops accepts at `threshold` open descriptors.
    pub fn with_threshold(threshold: u64) -> FdHeadroom {
        Self::with_counter(threshold, open_fds)
    }

    fn with_counter(threshold: u64, counter: fn() -> Option<u64>) -> FdHeadroom {
        let epoch = Instant::now();
        let h = FdHeadroom {
            threshold,
            per_connection: 2,
            counted: AtomicU64::new(0),
            since: AtomicU64::new(0),
            counted_at: AtomicU64::new(0),
            epoch,
            counter,
        };
        h.recount();
        h
    }

    /// The descriptor count at which accepts stop.
    pub fn threshold(&self) -> u64 {
        self.threshold
    }

    /// The open descriptors at the last count.
    pub fn last_count(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn recount(&self) {
        if let Some(n) = (self.counter)() {
            self.counted.store(n, Ordering::Relaxed);
            self.since.store(0, Ordering::Relaxed);
        }
        // Unreadable (no /proc): keep estimating from the accepts alone.
        self.counted_at.store(self.now_ms(), Ordering::Relaxed);
    }

    fn estimate(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
            + self.since.load(Ordering::Relaxed) * self.per_connection
    }

    /// Whether one more connection may be taken; counts it if so.
    pub fn admit(&self) -> bool {
        let age = self
            .now_ms()
            .saturating_sub(self.counted_at.load(Ordering::Relaxed));
        let full = self.estimate() + self.per_connection > self.threshold;
        let stale = if full { RECOUNT_FULL } else { RECOUNT };
        if age >= stale.as_millis() as u64 {
            self.recount();
        }
        if self.estimate() + self.per_connection > self.threshold {
            return false;
        }
        self.since.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// The number of descriptors this process has open (`/proc/self/fd`), if it can be read.
pub fn open_fds() -> Option<u64> {
    // The directory handle itself is one of the entries.
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    static OPEN: AtomicU64 = AtomicU64::new(100);

    fn fake() -> Option<u64> {
        Some(OPEN.load(Ordering::Relaxed))
    }

    #[test]
    fn stops_at_the_threshold_and_recounts() {
        OPEN.store(100, Ordering::Relaxed);
        // Room for two more connections at two descriptors each.
        let h = FdHeadroom::with_counter(105, fake);
        assert!(h.admit());
        assert!(h.admit());
        assert!(!h.admit(), "a third connection would pass the threshold");
        // The connections closed and something else freed descriptors: seen at the next
        // count (at most RECOUNT_FULL later while full).
        OPEN.store(90, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.admit() {
            assert!(
                Instant::now() < deadline,
                "freed descriptors were never credited"
            );
            std::thread::sleep(RECOUNT_FULL);
        }
        // Descriptors opened by something other than an accept are seen at a count too.
        OPEN.store(104, Ordering::Relaxed);
        std::thread::sleep(RECOUNT);
        assert!(!h.admit(), "the count saw descriptors opened elsewhere");
    }

    #[test]
    fn counts_this_process() {
        let before = open_fds().expect("/proc/self/fd is readable");
        let files: Vec<_> = (0..10)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        // Other tests run beside this one: at least the ten files are seen.
        assert!(open_fds().unwrap() >= before + 10 - 5);
        drop(files);
        let h = FdHeadroom::new(0.9);
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(h.threshold(), (soft as f64 * 0.9) as u64);
    }
}
