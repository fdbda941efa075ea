//! Where the proxies' log lines (access-log lines included) go: appended to one shared buffer
//! by the thread that logs, written out in batches by a writer thread of their own.
//!
//! Appending is a lock, a copy and an unlock: no system call, no allocation once the buffer
//! has grown, and no wake-up of the writer per line. The writer is woken by the first line
//! after it went idle, waits [`FLUSH_DELAY`] (or until [`EARLY_FLUSH`] bytes are waiting) so
//! the lines of that time go out in one `write(2)`, and sleeps again once the buffer is empty:
//! an idle proxy's writer does not wake at all. tracing-appender's non-blocking writer, used
//! before, sent each line through a channel as a vector of its own and woke its thread for
//! nearly every line; under `zmesh-bench-waypoint` that thread and the wake-ups took about a
//! fifth of the waypoint's CPU.
//!
//! The buffer is bounded ([`LOG_QUEUE_BYTES`]): while stdout is slow or stalled, lines that do
//! not fit are dropped and counted ([`DropCount`], `zmesh_log_lines_dropped_total`), never
//! stalling traffic.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The most bytes of log lines waiting for the writer; a line that does not fit is dropped.
/// 4 MiB hold about 16,000 access-log lines: a burst of 160 ms at 100,000 lines/s.
pub const LOG_QUEUE_BYTES: usize = 4 << 20;

/// How long the writer gathers lines after the first one before writing them out: the most a
/// line waits while the writer keeps up.
pub const FLUSH_DELAY: Duration = Duration::from_millis(10);

/// Waiting bytes that start a write at once, without waiting for [`FLUSH_DELAY`].
pub const EARLY_FLUSH: usize = 256 << 10;

/// A write buffer larger than this is given back after its batch went out (a burst's memory is
/// not kept).
const KEEP_CAPACITY: usize = 1 << 20;

/// How long dropping the [`LogGuard`] waits for the last lines to be written: a stalled stdout
/// must not keep the process from exiting.
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// No more lines are taken: the guard was dropped.
    closed: bool,
    /// The writer has written what was waiting at close and returned.
    done: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: AtomicU64,
    cap: usize,
    /// Batches the writer took (tests: an idle writer stays asleep).
    #[cfg(test)]
    batches: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves whole lines behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let mut s = self.lock();
        let was = s.buf.len();
        // After close nothing would write the line: count it as dropped.
        if s.closed || was + line.len() > self.cap {
            drop(s);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.buf.extend_from_slice(line);
        let now = s.buf.len();
        drop(s);
        // The writer sleeps only on an empty buffer, or waits out the delay below EARLY_FLUSH.
        if was == 0 || (was < EARLY_FLUSH && now >= EARLY_FLUSH) {
            self.wake.notify_one();
        }
    }
}

/// Appends log lines to the sink ([`tracing_subscriber::fmt::MakeWriter`]: the formatter
/// writes each event's whole line in one `write`). Cheap to clone.
#[derive(Clone)]
pub struct LogWriter(Arc<Shared>);

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter").finish_non_exhaustive()
    }
}

impl Write for &LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = &'a LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl LogWriter {
    /// Its count of dropped lines.
    pub fn drop_count(&self) -> DropCount {
        DropCount(self.0.clone())
    }
}

/// Reads how many lines a sink dropped because they did not fit.
#[derive(Clone)]
pub struct DropCount(Arc<Shared>);

impl std::fmt::Debug for DropCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DropCount").field(&self.dropped()).finish()
    }
}

impl DropCount {
    /// Lines dropped since the sink was made.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

/// Writes out what is waiting and stops the writer thread when dropped (keep it for the
/// process's life).
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard").finish_non_exhaustive()
    }
}

impl Drop for LogGuard {
    /// Stops taking lines and waits (at most [`CLOSE_WAIT`]) for those waiting to be written.
    fn drop(&mut self) {
        let s = {
            let mut s = self.shared.lock();
            s.closed = true;
            s
        };
        self.shared.wake.notify_all();
        let (s, _) = self
            .shared
            .wake
            .wait_timeout_while(s, CLOSE_WAIT, |s| !s.done)
            .unwrap_or_else(|e| e.into_inner());
        let done = s.done;
        drop(s);
        if let Some(t) = self.thread.take()
            && done
        {
            let _ = t.join();
        }
    }
}

/// A sink writing to `out` from a thread named `thread_name`, holding at most `cap` bytes.
pub fn sink<W: Write + Send + 'static>(
    thread_name: &str,
    cap: usize,
    out: W,
) -> std::io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::default(),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        cap,
        #[cfg(test)]
        batches: AtomicU64::new(0),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || writer(&s, out))?;
    Ok((
        LogWriter(shared.clone()),
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn writer<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let s = shared.lock();
        let s = shared
            .wake
            .wait_while(s, |s| s.buf.is_empty() && !s.closed)
            .unwrap_or_else(|e| e.into_inner());
        // Gather the lines of the next moments into this write.
        let mut s = shared
            .wake
            .wait_timeout_while(s, FLUSH_DELAY, |s| s.buf.len() < EARLY_FLUSH && !s.closed)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        std::mem::swap(&mut s.buf, &mut batch);
        let closed = s.closed;
        drop(s);
        #[cfg(test)]
        shared.batches.fetch_add(1, Ordering::Relaxed);
        if !batch.is_empty() {
            // Nowhere to report a failed write of the log: the lines are lost, as a write to
            // a closed stdout loses them.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
        }
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
        if closed {
            // Lines are refused once closed: what was waiting is written.
            shared.lock().done = true;
            shared.wake.notify_all();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink target that records each write, and can be stalled.
    #[derive(Clone, Default)]
    struct Target {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Target {
        fn stalled() -> Target {
            let t = Target::default();
            *t.gate.0.lock().unwrap() = true;
            t
        }
        fn open(&self) {
            *self.gate.0.lock().unwrap() = false;
            self.gate.1.notify_all();
        }
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
        }
    }

    impl Write for Target {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (stalled, cv) = &*self.gate;
            drop(cv.wait_while(stalled.lock().unwrap(), |s| *s).unwrap());
            self.writes.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Waits (at most 20 s) until `f` holds.
    fn until(what: &str, f: impl Fn() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(std::time::Instant::now() < end, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_go_out_in_order_and_in_batches_and_all_by_the_guard() {
        let target = Target::default();
        let (w, guard) = sink("test-log", LOG_QUEUE_BYTES, target.clone()).unwrap();
        let mut expected = String::new();
        for i in 0..1000 {
            let line = format!("line {i}\n");
            (&w).write_all(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        drop(guard);
        assert_eq!(target.text(), expected);
        let writes = target.writes.lock().unwrap().len();
        // One write per line would be 1000; the lines of each FLUSH_DELAY share one.
        assert!(writes < 100, "{writes} writes for 1000 lines");
        assert_eq!(w.drop_count().dropped(), 0);
    }

    #[test]
    fn lines_from_many_threads_stay_whole() {
        let target = Target::default();
        let (w, guard) = sink("test-log", LOG_QUEUE_BYTES, target.clone()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let w = w.clone();
                s.spawn(move || {
                    for i in 0..500 {
                        (&w).write_all(format!("thread {t} line {i} end\n").as_bytes())
                            .unwrap();
                    }
                });
            }
        });
        drop(guard);
        let text = target.text();
        assert_eq!(text.lines().count(), 2000);
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let want: Vec<String> = (0..500)
                .map(|i| format!("thread {t} line {i} end"))
                .collect();
            assert_eq!(mine, want, "thread {t}'s lines, whole and in order");
        }
    }

    #[test]
    fn a_stalled_target_drops_what_does_not_fit_without_blocking() {
        let target = Target::stalled();
        // Room for three 10-byte lines.
        let (w, guard) = sink("test-log", 30, target.clone()).unwrap();
        (&w).write_all(b"line 0000\n").unwrap();
        // The writer takes that line and stalls writing it.
        until("the writer never took the line", || {
            w.0.lock().buf.is_empty()
        });
        for i in 1..=20 {
            (&w).write_all(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        // Three fit beside the one being written; seventeen are dropped.
        assert_eq!(w.drop_count().dropped(), 17);
        target.open();
        drop(guard);
        assert_eq!(
            target.text(),
            "line 0000\nline 0001\nline 0002\nline 0003\n"
        );
    }

    #[test]
    fn a_stalled_target_does_not_hold_up_exit_and_later_lines_are_counted() {
        let target = Target::stalled();
        let (w, guard) = sink("test-log", LOG_QUEUE_BYTES, target.clone()).unwrap();
        (&w).write_all(b"stuck\n").unwrap();
        until("the writer never took the line", || {
            w.0.lock().buf.is_empty()
        });
        // The writer is stuck in its write: dropping the guard gives up after CLOSE_WAIT.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(guard);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("dropping the guard hung on a stalled target");
        // Closed: a line now has nowhere to go and is counted.
        (&w).write_all(b"late\n").unwrap();
        assert_eq!(w.drop_count().dropped(), 1);
        target.open();
    }

    #[test]
    fn an_idle_writer_is_not_woken() {
        let target = Target::default();
        let (w, guard) = sink("test-log", LOG_QUEUE_BYTES, target.clone()).unwrap();
        (&w).write_all(b"one\n").unwrap();
        until("the line was never written", || {
            !target.writes.lock().unwrap().is_empty()
        });
        // Many flush delays later, still that one batch: the writer slept on the empty buffer.
        let batches = w.0.batches.load(Ordering::Relaxed);
        std::thread::sleep(FLUSH_DELAY * 10);
        assert_eq!(w.0.batches.load(Ordering::Relaxed), batches);
        assert_eq!(target.writes.lock().unwrap().len(), 1);
        drop(guard);
        assert_eq!(target.text(), "one\n");
    }
}
