//! The web node's own `GET /metrics`: how fast a session is found, by the store that answered
//! (`webnode_session_lookup_seconds{source=…}`), and how many expired `user_sessions` rows the
//! cleanup deleted.
//!
//! Written by hand rather than through the balancer's recorder: that one is process-wide, and
//! tests run balancers and several web nodes in one process, so each node keeps its own few
//! atomics and renders them itself (fixed buckets, lock-free to observe).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The lookup latency histogram.
pub(super) const LOOKUP_SECONDS: &str = "webnode_session_lookup_seconds";
/// Rows the periodic cleanup deleted from `user_sessions`.
pub(super) const EXPIRED_DELETED: &str = "webnode_session_expired_deleted_total";

/// Upper bounds in seconds: fine below 10 ms (the seed's "sub-10 ms session retrieval"), coarse
/// above, up to the stores' one-second timeouts.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025,
    0.05, 0.1, 0.25, 1.0,
];

/// The store that answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Memory = 0,
    Redis = 1,
    Postgres = 2,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Memory => "memory",
            Source::Redis => "redis",
            Source::Postgres => "postgres",
        }
    }
}

/// Per source: a count per bucket (not cumulative; summed when rendered), the total, the sum.
#[derive(Default)]
struct Series {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// Session lookup latencies of one node, by source.
pub(crate) struct LookupHistogram {
    series: [Series; 3],
    /// The sources this node can be answered by, in render order.
    sources: Vec<Source>,
}

impl LookupHistogram {
    pub(super) fn new(sources: &[Source]) -> Self {
        LookupHistogram {
            series: Default::default(),
            sources: sources.to_vec(),
        }
    }

    /// Counts one lookup that `source` answered after `took`.
    pub(super) fn observe(&self, source: Source, took: Duration) {
        let series = &self.series[source as usize];
        let seconds = took.as_secs_f64();
        if let Some(bucket) = BUCKETS.iter().position(|&le| seconds <= le) {
            series.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        series.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        series.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Appends the histogram in the Prometheus text format.
    pub(super) fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {LOOKUP_SECONDS} Session lookups (a visit or a verify of a presented id), \
             from the first store asked to the answer, by the store that answered."
        );
        let _ = writeln!(out, "# TYPE {LOOKUP_SECONDS} histogram");
        for &source in &self.sources {
            let series = &self.series[source as usize];
            let label = source.label();
            let mut cumulative = 0;
            for (le, bucket) in BUCKETS.iter().zip(&series.buckets) {
                cumulative += bucket.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{LOOKUP_SECONDS}_bucket{{source=\"{label}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let count = series.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{LOOKUP_SECONDS}_bucket{{source=\"{label}\",le=\"+Inf\"}} {count}"
            );
            let sum = Duration::from_nanos(series.sum_nanos.load(Ordering::Relaxed));
            let _ = writeln!(
                out,
                "{LOOKUP_SECONDS}_sum{{source=\"{label}\"}} {}",
                sum.as_secs_f64()
            );
            let _ = writeln!(out, "{LOOKUP_SECONDS}_count{{source=\"{label}\"}} {count}");
        }
    }
}

/// Appends the cleanup counter in the Prometheus text format.
pub(super) fn render_expired_deleted(out: &mut String, deleted: u64) {
    let _ = writeln!(
        out,
        "# HELP {EXPIRED_DELETED} Expired user_sessions rows this node's cleanup deleted."
    );
    let _ = writeln!(out, "# TYPE {EXPIRED_DELETED} counter");
    let _ = writeln!(out, "{EXPIRED_DELETED} {deleted}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_land_in_cumulative_buckets_of_their_source() {
        let histogram = LookupHistogram::new(&[Source::Redis, Source::Postgres]);
        histogram.observe(Source::Redis, Duration::from_micros(300));
        histogram.observe(Source::Redis, Duration::from_millis(4));
        histogram.observe(Source::Postgres, Duration::from_secs(3));
        let mut out = String::new();
        histogram.render(&mut out);
        let line = |needle: &str| {
            out.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("{needle} in\n{out}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let redis = "webnode_session_lookup_seconds_bucket{source=\"redis\",";
        assert_eq!(line(&format!("{redis}le=\"0.00025\"}}")), "0");
        assert_eq!(line(&format!("{redis}le=\"0.0005\"}}")), "1");
        assert_eq!(line(&format!("{redis}le=\"0.005\"}}")), "2");
        assert_eq!(line(&format!("{redis}le=\"+Inf\"}}")), "2");
        let pg = "webnode_session_lookup_seconds_bucket{source=\"postgres\",";
        assert_eq!(line(&format!("{pg}le=\"1\"}}")), "0");
        assert_eq!(line(&format!("{pg}le=\"+Inf\"}}")), "1");
        assert_eq!(
            line("webnode_session_lookup_seconds_count{source=\"postgres\"}"),
            "1"
        );
        assert!(!out.contains("source=\"memory\""), "{out}");
    }
}
