//! Gives the memory glibc's allocator holds free back to the system.
//!
//! glibc returns freed memory only from the top of each arena. After a burst (thousands of
//! connections each lent 16 KiB of buffers for a moment, then gone to sleep holding a few
//! hundred bytes), the freed buffers sit in pages between live allocations and stay resident:
//! the process keeps its peak. `malloc_trim(0)` walks the arenas and hands every free page back
//! with `madvise`, as HAProxy does after releasing its pools. The call is fulcrum's only use of
//! `unsafe`, so it lives here rather than in the crate that forbids it.

/// Returns the allocator's free pages to the system; whether any were returned. Walks and locks
/// each arena in turn: call it when traffic is quiet, off the threads that serve it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[must_use]
pub fn release_free_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and has no precondition; glibc serializes it
    // with every other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Elsewhere (musl, other systems) there is no such call, and nothing is returned.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
#[must_use]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_freed_burst_below_a_live_allocation_goes_back() {
        // Many mid-sized blocks (under the mmap threshold, so from the heap), then one small
        // live allocation above them, then the blocks freed: only a trim can return them.
        let burst: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 16 * 1024]).collect();
        let pinned = Box::new([2u8; 64]);
        drop(burst);
        let resident_before = resident_kib();
        assert!(super::release_free_memory());
        let resident_after = resident_kib();
        assert!(
            resident_after + 16 * 1024 < resident_before,
            "RSS {resident_before} -> {resident_after} KiB"
        );
        assert_eq!(pinned[0], 2);
    }

    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}
