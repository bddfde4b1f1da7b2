//! The seed's health schema (`/healthz` of web nodes and of fulcrum's admin listener) and the
//! process figures it reports, read from procfs.
//!
//! Off Linux the files are absent and the figures read 0 rather than failing the check.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

/// USER_HZ is 100 on every Linux ABI fulcrum targets; reading sysconf would need libc.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// CPU time moves in 10 ms ticks, so windows shorter than this are mostly rounding noise; a
/// reading sooner than this after the last sample repeats the last figure.
const MIN_CPU_WINDOW: Duration = Duration::from_secs(1);

/// The seed's `/healthz` body; field order is the seed's.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HealthReport<'a> {
    pub instance_id: &'a str,
    /// `UP`, `DOWN` or `DRAINING`.
    pub status: &'a str,
    pub system_metrics: SystemMetrics,
    pub dependency_status: DependencyStatus,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SystemMetrics {
    pub cpu_utilization_percent: f64,
    pub free_memory_bytes: u64,
    pub active_connections: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DependencyStatus {
    pub database_connection: &'static str,
    pub redis_session_cache: &'static str,
}

impl<'a> HealthReport<'a> {
    /// A report with this process's real figures and no configured dependencies.
    pub(crate) fn new(
        instance_id: &'a str,
        status: &'a str,
        cpu: &CpuMeter,
        active_connections: u64,
    ) -> Self {
        Self {
            instance_id,
            status,
            system_metrics: SystemMetrics {
                cpu_utilization_percent: cpu.percent(),
                free_memory_bytes: read_mem_available().unwrap_or(0),
                active_connections,
            },
            dependency_status: DependencyStatus {
                database_connection: "NOT_CONFIGURED",
                redis_session_cache: "NOT_CONFIGURED",
            },
        }
    }
}

/// This process's CPU use in percent of one core, between successive readings.
#[derive(Debug)]
pub(crate) struct CpuMeter {
    // Only health endpoints read it, never the request path.
    sample: Mutex<CpuSample>,
}

#[derive(Debug)]
struct CpuSample {
    ticks: u64,
    at: Instant,
    percent: f64,
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuMeter {
    pub(crate) fn new() -> Self {
        Self {
            sample: Mutex::new(CpuSample {
                ticks: read_cpu_ticks().unwrap_or(0),
                at: Instant::now(),
                percent: 0.0,
            }),
        }
    }

    pub(crate) fn percent(&self) -> f64 {
        let Some(ticks) = read_cpu_ticks() else {
            return 0.0;
        };
        let now = Instant::now();
        let mut sample = self.sample.lock().unwrap_or_else(PoisonError::into_inner);
        let wall = now.duration_since(sample.at);
        if wall >= MIN_CPU_WINDOW {
            let used = ticks.saturating_sub(sample.ticks) as f64 / CLOCK_TICKS_PER_SEC;
            let percent = used / wall.as_secs_f64() * 100.0;
            *sample = CpuSample {
                ticks,
                at: now,
                percent: (percent * 10.0).round() / 10.0,
            };
        }
        sample.percent
    }
}

/// `utime + stime` in clock ticks from `/proc/self/stat` text.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and ')', so count fields after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')' come field 3 (state) onwards; utime is field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `MemAvailable` in bytes from `/proc/meminfo` text.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line["MemAvailable:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

// Tiny procfs files: a blocking read costs microseconds.
fn read_cpu_ticks() -> Option<u64> {
    parse_stat_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn read_mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_survive_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (we ird) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    123 45 0 0 20 0 8 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(168));
        assert_eq!(parse_stat_cpu_ticks("4242 (short) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo = "MemTotal:       16303316 kB\nMemFree:         1234567 kB\n\
                       MemAvailable:    8388608 kB\nBuffers:          100 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(8_589_934_592));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
    }
}
