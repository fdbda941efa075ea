//! Bulk buffers a thread keeps for its next bulk read: ztunnel's copy loops (`Reads`) and the
//! reads under TLS ([`crate::socket::BufferedStream`]) give theirs back here when they go
//! quiet, so an idle connection holds no buffer while a busy one reads into warm memory.
//!
//! A bulk transfer alternates between reading and waiting thousands of times a second;
//! allocating its buffer afresh each time would map new memory (a page fault per 4 KiB) or go
//! through colder blocks, and the allocator would give it back to the OS again, each time.

use bytes::BytesMut;

/// Bulk buffers a thread keeps, at most.
pub const SPARES: usize = 4;

/// Buffers smaller than this are not worth keeping.
pub const SMALLEST: usize = 16 << 10;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer with room for at least `size` bytes: a spare one if this thread has it.
pub fn take(size: usize) -> BytesMut {
    SPARE
        .with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().position(|b| b.capacity() >= size)?;
            Some(s.swap_remove(i))
        })
        .unwrap_or_else(|| BytesMut::with_capacity(size))
}

/// Gives a buffer back (`full` bytes of room when it was taken): kept for the thread's next
/// bulk read if it is large enough, there is room among the spares, and nothing else points
/// into it any more (a tunnel's h2 may still hold chunks of one it was handed).
pub fn give_back(mut buf: BytesMut, full: usize) {
    buf.clear();
    // Back to the start of its whole allocation, which only an unshared buffer can do.
    if full < SMALLEST || !buf.try_reclaim(full) {
        return;
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES {
            s.push(buf);
        }
    });
}

/// Lets go of this thread's spare buffers (run when the thread goes quiet, so a load's buffers
/// do not stay resident after it).
pub fn release() {
    SPARE.with(|s| s.borrow_mut().clear());
}

/// The room of each of this thread's spare buffers (for tests and diagnostics).
pub fn sizes() -> Vec<usize> {
    SPARE.with(|s| s.borrow().iter().map(BytesMut::capacity).collect())
}
