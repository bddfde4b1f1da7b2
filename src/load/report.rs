//! What a load run saw: the [`Recorder`] every request reports to while the run lasts, and the
//! [`Report`] it becomes (serde for `--json` and scripts, [`Report::to_table`] for people).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::continuity::Sessions;
use super::distribution::Distribution;

/// The node name counted for answers without an `x-served-by` header (e.g. the balancer's own
/// 502/503 answers).
pub const NO_NODE: &str = "(none)";

/// Latencies are recorded in microseconds up to an hour, with 3 significant digits: 0.1 %
/// error at any magnitude, which is finer than anything a person reads off a table.
const HIST_MAX_US: u64 = 3_600_000_000;
const HIST_SIGFIG: u8 = 3;

/// How a request failed. 4xx answers are not errors: the server answered as designed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection could not be made (refused, unreachable, source address unusable).
    Connect,
    /// No complete answer (head and body) within `--timeout`.
    Timeout,
    /// The connection was closed or reset while the request was in flight.
    Reset,
    /// A 5xx answer.
    Status,
    /// Anything else the client reported (e.g. a malformed response).
    Other,
}

/// Error counts by kind; `total` is their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    pub total: u64,
    pub connect: u64,
    pub timeout: u64,
    pub reset: u64,
    pub status: u64,
    pub other: u64,
}

impl ErrorCounts {
    fn add(&mut self, kind: ErrorKind) {
        self.total += 1;
        *match kind {
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Reset => &mut self.reset,
            ErrorKind::Status => &mut self.status,
            ErrorKind::Other => &mut self.other,
        } += 1;
    }
}

/// Closed loop: each user waits for its answer before the next request. Open loop: requests
/// leave on a fixed schedule (`--rate`) whether or not earlier ones were answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Closed,
    Open,
}

/// The outcome of a whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub url: String,
    /// The `--path`s requests rotated through on the URL's host (empty: the URL's own path).
    pub paths: Vec<String>,
    pub mode: Mode,
    /// The `--rate` asked for (open loop only), requests per second.
    pub target_rate: Option<f64>,
    pub users: usize,
    /// Wall-clock start, for lining the timeline up with a drill script's own timestamps:
    /// timeline second `s` covers `[started_unix_ms + 1000 s, started_unix_ms + 1000 (s + 1))`.
    pub started_unix_ms: u64,
    /// Seconds, to the millisecond.
    pub duration_s: f64,
    /// Requests that finished: answered (any status) or failed.
    pub requests: u64,
    /// Requests still in flight when the run ended; they are in no other count.
    pub unfinished: u64,
    /// `requests / duration_s`, to two decimals.
    pub achieved_rate: f64,
    /// Answers (any status) per `x-served-by` value.
    pub nodes: BTreeMap<String, NodeCount>,
    /// Shares and evenness over the answers that named a node.
    pub distribution: Distribution,
    /// Answers per status code.
    pub statuses: BTreeMap<u16, u64>,
    pub errors: ErrorCounts,
    /// Over every answer (any status), from sending the request to the end of the body.
    pub latency_ms: Latency,
    pub sessions: Sessions,
    /// One entry per whole second since the start, by when each request finished.
    pub timeline: Vec<Second>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NodeCount {
    pub responses: u64,
    /// Percentage of all answers, to two decimals.
    pub share_pct: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    pub second: u64,
    /// Answers (any status) that arrived in this second.
    pub responses: u64,
    pub nodes: BTreeMap<String, u64>,
    pub errors: ErrorCounts,
}

/// Collects outcomes while a run lasts. Shared behind one mutex: each update is a few map
/// look-ups, far below the cost of the request it records.
pub(crate) struct Recorder {
    start: Instant,
    histogram: Histogram<u64>,
    nodes: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
    errors: ErrorCounts,
    timeline: Vec<Second>,
    unfinished: u64,
}

impl Recorder {
    pub(crate) fn new(start: Instant) -> Self {
        Recorder {
            start,
            histogram: Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG)
                .expect("constant histogram bounds are valid"),
            nodes: BTreeMap::new(),
            statuses: BTreeMap::new(),
            errors: ErrorCounts::default(),
            timeline: Vec::new(),
            unfinished: 0,
        }
    }

    /// An answer from `node` with `status`, taking `latency`, arriving at `at`.
    pub(crate) fn answer(&mut self, at: Instant, node: &str, status: u16, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(us.clamp(1, HIST_MAX_US));
        bump(&mut self.nodes, node);
        *self.statuses.entry(status).or_default() += 1;
        let second = self.second(at);
        second.responses += 1;
        bump(&mut second.nodes, node);
        if status >= 500 {
            self.error(at, ErrorKind::Status);
        }
    }

    pub(crate) fn error(&mut self, at: Instant, kind: ErrorKind) {
        self.errors.add(kind);
        self.second(at).errors.add(kind);
    }

    pub(crate) fn unfinished(&mut self) {
        self.unfinished += 1;
    }

    fn second(&mut self, at: Instant) -> &mut Second {
        let index = at.saturating_duration_since(self.start).as_secs();
        self.pad_timeline(index + 1);
        &mut self.timeline[index as usize]
    }

    /// Makes the timeline at least `len` seconds long, with empty seconds where nothing ended.
    fn pad_timeline(&mut self, len: u64) {
        while (self.timeline.len() as u64) < len {
            let second = self.timeline.len() as u64;
            self.timeline.push(Second {
                second,
                ..Second::default()
            });
        }
    }

    pub(crate) fn finish(mut self, run: RunInfo) -> Report {
        let elapsed = run.ended.saturating_duration_since(self.start);
        // Whole seconds that passed get an entry even if nothing finished in them (a stalled
        // backend shows as a gap); a last partial second appears only if something ended in it.
        self.pad_timeline(elapsed.as_secs());
        let answers: u64 = self.nodes.values().sum();
        let transport_errors = self.errors.total - self.errors.status;
        let requests = answers + transport_errors;
        let duration_s = elapsed.as_secs_f64();
        let ms = |us: u64| us as f64 / 1000.0;
        let latency = if self.histogram.is_empty() {
            Latency::default()
        } else {
            Latency {
                samples: self.histogram.len(),
                p50: ms(self.histogram.value_at_quantile(0.5)),
                p99: ms(self.histogram.value_at_quantile(0.99)),
                p999: ms(self.histogram.value_at_quantile(0.999)),
                max: ms(self.histogram.max()),
            }
        };
        Report {
            url: run.url,
            paths: run.paths,
            mode: run.mode,
            target_rate: run.target_rate,
            users: run.users,
            started_unix_ms: run
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            duration_s: round(duration_s, 3),
            requests,
            unfinished: self.unfinished,
            achieved_rate: if duration_s > 0.0 {
                round(requests as f64 / duration_s, 2)
            } else {
                0.0
            },
            distribution: Distribution::from_counts(&self.nodes, NO_NODE),
            nodes: self
                .nodes
                .into_iter()
                .map(|(name, responses)| {
                    let share_pct = round(100.0 * responses as f64 / answers as f64, 2);
                    (
                        name,
                        NodeCount {
                            responses,
                            share_pct,
                        },
                    )
                })
                .collect(),
            statuses: self.statuses,
            errors: self.errors,
            latency_ms: latency,
            sessions: run.sessions,
            timeline: self.timeline,
        }
    }
}

/// What the recorder cannot know by itself.
pub(crate) struct RunInfo {
    pub url: String,
    pub paths: Vec<String>,
    pub mode: Mode,
    pub target_rate: Option<f64>,
    pub users: usize,
    pub started_at: SystemTime,
    pub ended: Instant,
    pub sessions: Sessions,
}

/// Figures a person or a script reads, without the noise of float division.
fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn bump(counts: &mut BTreeMap<String, u64>, key: &str) {
    match counts.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            counts.insert(key.to_owned(), 1);
        }
    }
}

impl Report {
    /// The report as a person reads it in a terminal.
    pub fn to_table(&self) -> String {
        self.to_string()
    }
}

/// The table of [`Report::to_table`].
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match (self.mode, self.target_rate) {
            (Mode::Open, Some(rate)) => format!("open loop at {rate} req/s"),
            _ => "closed loop".to_owned(),
        };
        let started = SystemTime::UNIX_EPOCH + Duration::from_millis(self.started_unix_ms);
        write!(f, "fulcrum load  {}", self.url)?;
        if !self.paths.is_empty() {
            write!(f, "  paths {}", self.paths.join(", "))?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  {} users, {mode}, started {} (unix ms {})",
            self.users,
            humantime::format_rfc3339_millis(started),
            self.started_unix_ms
        )?;
        write!(
            f,
            "  {:.2} s, {} requests, {:.1} req/s",
            self.duration_s, self.requests, self.achieved_rate
        )?;
        if self.unfinished > 0 {
            write!(f, ", {} unfinished at the end", self.unfinished)?;
        }
        writeln!(f)?;

        let width = self
            .nodes
            .keys()
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(0)
            .max("node".len());
        writeln!(
            f,
            "\n  {:<width$}  {:>10}  {:>7}",
            "node", "responses", "share"
        )?;
        for (name, count) in &self.nodes {
            writeln!(
                f,
                "  {name:<width$}  {:>10}  {:>6.1}%",
                count.responses, count.share_pct
            )?;
        }
        if self.nodes.is_empty() {
            writeln!(f, "  (no answers)")?;
        }

        write!(f, "\n  statuses  ")?;
        if self.statuses.is_empty() {
            write!(f, "-")?;
        }
        for (i, (code, n)) in self.statuses.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{code}: {n}")?;
        }
        writeln!(f)?;
        let e = &self.errors;
        writeln!(
            f,
            "  errors    {} (connect {}, timeout {}, reset {}, status {}, other {})",
            e.total, e.connect, e.timeout, e.reset, e.status, e.other
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "  latency   p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms ({} samples)",
            l.p50, l.p99, l.p999, l.max, l.samples
        )?;
        let d = &self.distribution;
        match (d.cv, d.max_min_ratio) {
            (Some(cv), Some(ratio)) => writeln!(
                f,
                "  evenness  cv {cv:.4}, max/min {ratio:.3} over {} node{}; shares {}",
                d.shares.len(),
                if d.shares.len() == 1 { "" } else { "s" },
                d.shares
                    .iter()
                    .map(|(name, share)| format!("{name} {:.1}%", share * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?,
            _ => writeln!(f, "  evenness  - (no answer named a node)")?,
        }
        let s = &self.sessions;
        writeln!(
            f,
            "  sessions  {} node switches, {} of {} users switched at least once",
            s.switches, s.users_switched, self.users
        )?;
        match s.continuity {
            Some(continuity) => {
                write!(
                    f,
                    "            continuity {:.1}%: {} of {} users saw their visit count reset \
                     ({} resets)",
                    continuity * 100.0,
                    s.users_reset,
                    s.users_tracked,
                    s.resets
                )?;
                if self.mode == Mode::Open {
                    write!(
                        f,
                        "; open loop: a user's overlapping requests can read as resets"
                    )?;
                }
                writeln!(f)?;
            }
            None => writeln!(
                f,
                "            continuity -: no answer carried x-session-visits (try --path /session)"
            )?,
        }

        writeln!(f, "\n  timeline (answers per node and errors, per second)")?;
        let col = |name: &str| name.chars().count().max(6);
        write!(f, "  {:>5}", "s")?;
        for name in self.nodes.keys() {
            write!(f, "  {name:>w$}", w = col(name))?;
        }
        writeln!(f, "  {:>6}", "errors")?;
        for s in &self.timeline {
            write!(f, "  {:>5}", s.second)?;
            for name in self.nodes.keys() {
                let n = s.nodes.get(name).copied().unwrap_or(0);
                write!(f, "  {n:>w$}", w = col(name))?;
            }
            writeln!(f, "  {:>6}", s.errors.total)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ended: Instant) -> RunInfo {
        RunInfo {
            url: "http://127.0.0.1:1/".into(),
            paths: Vec::new(),
            mode: Mode::Closed,
            target_rate: None,
            users: 2,
            started_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            ended,
            sessions: Sessions::default(),
        }
    }

    #[test]
    fn answers_errors_and_seconds_add_up() {
        let start = Instant::now();
        let mut r = Recorder::new(start);
        let ms = Duration::from_millis;
        r.answer(start + ms(10), "web-1", 200, ms(2));
        r.answer(start + ms(20), "web-2", 200, ms(4));
        r.answer(start + ms(1500), "web-1", 503, ms(6));
        r.answer(start + ms(1600), NO_NODE, 404, ms(1));
        r.error(start + ms(3100), ErrorKind::Connect);
        r.unfinished();
        let report = r.finish(info(start + ms(4000)));

        assert_eq!(report.requests, 5);
        assert_eq!(report.unfinished, 1);
        assert_eq!(report.started_unix_ms, 1_700_000_000_123);
        assert_eq!(report.nodes["web-1"].responses, 2);
        assert_eq!(report.nodes["web-1"].share_pct, 50.0);
        assert_eq!(report.nodes[NO_NODE].responses, 1);
        assert_eq!(report.statuses[&503], 1);
        assert_eq!(report.statuses[&404], 1);
        assert_eq!(
            (
                report.errors.total,
                report.errors.status,
                report.errors.connect
            ),
            (2, 1, 1)
        );
        assert_eq!(report.latency_ms.samples, 4);
        assert!((report.latency_ms.max - 6.0).abs() < 0.01);
        // Seconds 0..=3, second 2 empty, each by when its request ended.
        let per_second: Vec<(u64, u64)> = report
            .timeline
            .iter()
            .map(|s| (s.responses, s.errors.total))
            .collect();
        assert_eq!(per_second, [(2, 0), (2, 1), (0, 0), (0, 1)]);
        assert_eq!(report.achieved_rate, 5.0 / 4.0);

        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        // Evenness leaves the node-less answer out: web-1 2, web-2 1.
        let d = &report.distribution;
        assert_eq!(d.shares["web-1"], 0.6667);
        assert_eq!(d.shares.len(), 2);
        assert_eq!((d.cv, d.max_min_ratio), (Some(0.3333), Some(2.0)));
        let table = report.to_table();
        assert!(table.contains("web-1"), "{table}");
        assert!(
            table
                .contains("cv 0.3333, max/min 2.000 over 2 nodes; shares web-1 66.7%, web-2 33.3%"),
            "{table}"
        );
        assert!(table.contains("continuity -: no answer carried"), "{table}");
        assert!(table.contains("2023-11-14T22:13:20.123Z"), "{table}");
    }

    #[test]
    fn an_empty_run_reports_zeros() {
        let start = Instant::now();
        let report = Recorder::new(start).finish(info(start));
        assert_eq!(report.requests, 0);
        assert_eq!(report.distribution, Distribution::default());
        assert_eq!(report.latency_ms, Latency::default());
        assert!(report.timeline.is_empty());
        let table = report.to_table();
        assert!(table.contains("(no answers)"), "{table}");
        assert!(
            table.contains("evenness  - (no answer named a node)"),
            "{table}"
        );
    }
}
