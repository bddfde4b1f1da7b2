//! Returning a burst's memory to the system once traffic quiets.
//!
//! A connection lends hyper ~16 KiB of buffers while it is awake and an upstream connection
//! ~40 KiB while it is warm; both are freed when they go to sleep (see
//! `datapath::server::idle_set` and `upstream`). After a burst the freed memory lies in pages
//! between the few hundred bytes each sleeping connection keeps, and glibc keeps it resident:
//! 10,000 idle clients left ~22 MB where ~12 MB is in use. Once at least [`BURST`] connections
//! have slept or cooled since the last time and fewer than [`QUIET`] woke in the last
//! [`CHECK_EVERY`], the allocator's free pages are returned (`malloc_trim`, on a blocking
//! thread: it locks each arena while it walks it). Steady traffic never triggers it: a server
//! under load reuses that memory, and one whose connections never sleep frees none.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Connections that went to sleep, and upstream connections that cooled, so far.
static RELEASED: AtomicU64 = AtomicU64::new(0);
/// Connections that woke (or started) and took buffers again, so far.
static WOKEN: AtomicU64 = AtomicU64::new(0);

/// Connections released since the last trim that make a burst worth returning.
const BURST: u64 = 1024;
/// At most this many wake-ups per check and traffic counts as quiet.
const QUIET: u64 = 64;
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// A connection gave its buffers back.
pub(crate) fn released() {
    RELEASED.fetch_add(1, Ordering::Relaxed);
}

/// A connection took buffers.
pub(crate) fn woken() {
    WOKEN.fetch_add(1, Ordering::Relaxed);
}

/// Returns the allocator's free memory after each burst, until `stop`.
pub(crate) async fn trim_after_bursts(stop: CancellationToken) {
    let mut ticker = tokio::time::interval(CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut released_at_trim = RELEASED.load(Ordering::Relaxed);
    let mut woken_before = WOKEN.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let (released, woken) = (
            RELEASED.load(Ordering::Relaxed),
            WOKEN.load(Ordering::Relaxed),
        );
        let quiet = woken.wrapping_sub(woken_before) <= QUIET;
        woken_before = woken;
        if !quiet || released.wrapping_sub(released_at_trim) < BURST {
            continue;
        }
        released_at_trim = released;
        match tokio::task::spawn_blocking(fulcrum_heap::release_free_memory).await {
            Ok(returned) => debug!(returned, "returned free memory after a burst"),
            Err(e) => debug!(error = %e, "returning free memory failed"),
        }
    }
}
