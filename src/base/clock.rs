//! The process's cheap monotonic clock: milliseconds in a `u64`, so that deadlines and
//! timestamps fit in an atomic that the request path reads without a lock.

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since the first call in this process: a cheap clock for atomics.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Starts at 1 so that 0 can mean "not set" in atomics that hold a time.
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
