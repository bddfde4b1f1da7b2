//! Which worker thread the running code is on.
//!
//! `fulcrum run` serves on one single-threaded runtime per core, each with its own listening
//! sockets (see `crate::Workers`). State that only makes sense on one thread, such as a
//! backend's idle connections (whose I/O runs on the thread that opened them), is kept per
//! worker and found by [`index`]. Threads that are not workers (a test's runtime) count as
//! worker 0.
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// How many workers serve traffic; set once, before any listener serves.
static COUNT: AtomicUsize = AtomicUsize::new(1);

/// The number of worker threads (at least 1).
pub(crate) fn count() -> usize {
    COUNT.load(Ordering::Relaxed).max(1)
}

/// This thread's worker index, below [`count`].
pub(crate) fn index() -> usize {
    INDEX.with(Cell::get).min(count() - 1)
}

/// Records that `count` workers serve traffic (the process-wide figure only grows: a second
/// balancer in one process with fewer workers leaves slots unused, never out of range).
pub(crate) fn set_count(count: usize) {
    COUNT.fetch_max(count, Ordering::Relaxed);
}

/// Marks the calling thread as worker `index`.
pub(crate) fn enter(index: usize) {
    INDEX.with(|cell| cell.set(index));
}
