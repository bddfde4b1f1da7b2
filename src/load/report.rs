//! What a load run saw: the [`Recorder`] every request reports to while the run lasts, and the
//! [`Report`] it becomes (serde for `--json` and scripts; `table.rs` prints it for people).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::continuity::Sessions;
use super::distribution::Distribution;
use super::failover::Moves;
use super::round::round;

/// The node name counted for answers without an `x-served-by` header (e.g. the balancer's own
/// 502/503 answers).
pub(super) const NO_NODE: &str = "(none)";

/// Latencies are recorded in microseconds up to an hour, with 3 significant digits: 0.1 %
/// error at any magnitude, which is finer than anything a person reads off a table.
const HIST_MAX_US: u64 = 3_600_000_000;
const HIST_SIGFIG: u8 = 3;

/// How a request failed. 4xx answers are not errors: the server answered as designed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ErrorKind {
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
    /// All failed requests.
    pub total: u64,
    /// The connection could not be made (refused, unreachable, source address unusable).
    pub connect: u64,
    /// No complete answer (head and body) within `--timeout`.
    pub timeout: u64,
    /// The connection was closed or reset while the request was in flight.
    pub reset: u64,
    /// 5xx answers (also counted as answers, in `nodes` and `statuses`).
    pub status: u64,
    /// Anything else the client reported (e.g. a malformed response).
    pub other: u64,
}

impl ErrorCounts {
    pub(super) fn add(&mut self, kind: ErrorKind) {
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
    /// Each user waits for its answer before the next request.
    Closed,
    /// Requests leave on the `--rate` schedule.
    Open,
}

/// The outcome of a whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The `--url` requests went to; several are joined by `, `.
    pub url: String,
    /// The `--path`s requests rotated through on the URL's host (empty: the URL's own path).
    pub paths: Vec<String>,
    /// How requests were paced.
    pub mode: Mode,
    /// The `--rate` asked for (open loop only), requests per second.
    pub target_rate: Option<f64>,
    /// Virtual users (`--users`).
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
    /// Answers (any status) per `x-served-by` value; `(none)` for answers without one.
    pub nodes: BTreeMap<String, NodeCount>,
    /// Shares and evenness over the answers that named a node.
    pub distribution: Distribution,
    /// Answers per status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Failed requests by kind; 5xx answers included.
    pub errors: ErrorCounts,
    /// Over every answer (any status), from sending the request to the end of the body.
    pub latency_ms: Latency,
    /// Node switches and session continuity, over all users.
    pub sessions: Sessions,
    /// One entry per whole second since the start, by when each request finished.
    pub timeline: Vec<Second>,
    /// Per balancer counts and user moves between them; only with several `--url`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
}

/// One node's answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NodeCount {
    /// Answers (any status) that named this node.
    pub responses: u64,
    /// Percentage of all answers, to two decimals.
    pub share_pct: f64,
}

/// Latency percentiles in milliseconds; all 0 without answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Answers measured.
    pub samples: u64,
    /// The median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// The slowest answer.
    pub max: f64,
}

/// What ended in one second of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    /// Whole seconds since the start: this entry covers `[second, second + 1)`.
    pub second: u64,
    /// Answers (any status) that arrived in this second.
    pub responses: u64,
    /// Those answers per node; a node that gave none is left out.
    pub nodes: BTreeMap<String, u64>,
    /// Requests that failed in this second.
    pub errors: ErrorCounts,
    /// With several `--url`s: answers in this second through each, in `--url` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub balancers: Vec<u64>,
}

/// Collects outcomes while a run lasts. Shared behind one mutex: each update is a few map
/// look-ups, far below the cost of the request it records.
pub(super) struct Recorder {
    start: Instant,
    histogram: Histogram<u64>,
    nodes: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
    errors: ErrorCounts,
    timeline: Vec<Second>,
    unfinished: u64,
    /// One per `--url`, by its index.
    sites: Vec<BalancerCount>,
}

impl Recorder {
    /// A run of `users` spread over `urls` (user `i` starting on URL `i % n`) that starts at
    /// `start`.
    #[expect(clippy::expect_used, reason = "constant histogram bounds are valid")]
    pub(super) fn new(start: Instant, urls: &[String], users: usize) -> Self {
        let n = urls.len().max(1);
        let sites = urls
            .iter()
            .enumerate()
            .map(|(i, url)| BalancerCount {
                url: url.clone(),
                users_started: users / n + usize::from(i < users % n),
                ..BalancerCount::default()
            })
            .collect();
        Recorder {
            start,
            histogram: Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG)
                .expect("constant histogram bounds are valid"),
            nodes: BTreeMap::new(),
            statuses: BTreeMap::new(),
            errors: ErrorCounts::default(),
            timeline: Vec::new(),
            unfinished: 0,
            sites,
        }
    }

    /// An answer through URL `site` from `node` with `status`, taking `latency`, arriving at
    /// `at`.
    pub(super) fn answer(
        &mut self,
        at: Instant,
        site: usize,
        node: &str,
        status: u16,
        latency: Duration,
    ) {
        if let Some(count) = self.sites.get_mut(site) {
            count.answer(status);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(us.clamp(1, HIST_MAX_US));
        bump(&mut self.nodes, node);
        *self.statuses.entry(status).or_default() += 1;
        let sites = self.sites.len();
        let second = self.second(at);
        second.responses += 1;
        bump(&mut second.nodes, node);
        if sites > 1 {
            second.balancers.resize(sites, 0);
            second.balancers[site.min(sites - 1)] += 1;
        }
        if status >= 500 {
            self.errors.add(ErrorKind::Status);
            self.second(at).errors.add(ErrorKind::Status);
        }
    }

    /// A request through URL `site` that failed at `at`.
    pub(super) fn error(&mut self, at: Instant, site: usize, kind: ErrorKind) {
        if let Some(count) = self.sites.get_mut(site) {
            count.error(kind);
        }
        self.errors.add(kind);
        self.second(at).errors.add(kind);
    }

    /// A user left URL `site` for the next.
    pub(super) fn moved(&mut self, site: usize) {
        if let Some(count) = self.sites.get_mut(site) {
            count.moves_away += 1;
        }
    }

    pub(super) fn unfinished(&mut self) {
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

    /// The report of a run that ended at `run.ended`, with what only the run knows.
    pub(super) fn finish(mut self, run: RunInfo) -> Report {
        let elapsed = run.ended.saturating_duration_since(self.start);
        // Whole seconds that passed get an entry even if nothing finished in them (a stalled
        // backend shows as a gap); a last partial second appears only if something ended in it.
        self.pad_timeline(elapsed.as_secs());
        let answers: u64 = self.nodes.values().sum();
        // A 5xx is an answer and an error at once: counted among the answers only.
        let transport_errors = self.errors.total - self.errors.status;
        let requests = answers + transport_errors;
        let duration_s = elapsed.as_secs_f64();
        Report {
            url: run.url,
            paths: run.paths,
            mode: run.mode,
            target_rate: run.target_rate,
            users: run.users,
            started_unix_ms: unix_ms(run.started_at),
            duration_s: round(duration_s, 3),
            requests,
            unfinished: self.unfinished,
            achieved_rate: if duration_s > 0.0 {
                round(requests as f64 / duration_s, 2)
            } else {
                0.0
            },
            distribution: Distribution::from_counts(&self.nodes, NO_NODE),
            nodes: node_counts(self.nodes, answers),
            statuses: self.statuses,
            errors: self.errors,
            latency_ms: latency(&self.histogram),
            sessions: run.sessions,
            timeline: self.timeline,
            failover: (self.sites.len() > 1).then_some(Failover {
                balancers: self.sites,
                ..run.failover
            }),
        }
    }
}

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970.
fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Each node's answers with its share of all `answers`.
fn node_counts(nodes: BTreeMap<String, u64>, answers: u64) -> BTreeMap<String, NodeCount> {
    nodes
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
        .collect()
}

/// The percentiles a person reads, in milliseconds; all zero when nothing was answered.
fn latency(histogram: &Histogram<u64>) -> Latency {
    if histogram.is_empty() {
        return Latency::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        samples: histogram.len(),
        p50: ms(histogram.value_at_quantile(0.5)),
        p99: ms(histogram.value_at_quantile(0.99)),
        p999: ms(histogram.value_at_quantile(0.999)),
        max: ms(histogram.max()),
    }
}

/// Per balancer counts and user moves; present in a report only with several `--url`s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    /// One entry per `--url`, in the order given.
    pub balancers: Vec<BalancerCount>,
    /// Times a user moved to the next URL because its balancer was gone.
    pub moves: u64,
    /// Users that moved at least once.
    pub users_moved: usize,
    /// Moves after which the user's next answer came from the node it had before the move.
    pub kept_node: u64,
    /// Moves after which the user's next answer came from another node (or none).
    pub changed_node: u64,
    /// `kept_node / (kept_node + changed_node)`, to four decimals; `null` when no moved user
    /// was answered on both sides of its move.
    pub sticky_kept: Option<f64>,
}

/// What one `--url` saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalancerCount {
    /// The `--url`.
    pub url: String,
    /// Users that started on this URL.
    pub users_started: usize,
    /// Requests that finished here: answered (any status) or failed.
    pub requests: u64,
    /// Answers (any status).
    pub responses: u64,
    /// Failed requests by kind; 5xx answers included.
    pub errors: ErrorCounts,
    /// Users that moved away from this URL.
    pub moves_away: u64,
}

impl BalancerCount {
    pub(super) fn answer(&mut self, status: u16) {
        self.responses += 1;
        self.requests += 1;
        if status >= 500 {
            self.errors.add(ErrorKind::Status);
        }
    }

    pub(super) fn error(&mut self, kind: ErrorKind) {
        self.requests += 1;
        self.errors.add(kind);
    }
}

impl Failover {
    /// Adds one user's moves.
    pub(super) fn add_user(&mut self, moves: &Moves) {
        let (kept, changed) = moves.judged();
        self.moves += moves.moves();
        self.users_moved += usize::from(moves.moves() > 0);
        self.kept_node += kept;
        self.changed_node += changed;
        let judged = self.kept_node + self.changed_node;
        self.sticky_kept = (judged > 0).then(|| round(self.kept_node as f64 / judged as f64, 4));
    }
}

/// What the recorder cannot know by itself.
pub(super) struct RunInfo {
    pub(super) url: String,
    pub(super) paths: Vec<String>,
    pub(super) mode: Mode,
    pub(super) target_rate: Option<f64>,
    pub(super) users: usize,
    pub(super) started_at: SystemTime,
    pub(super) ended: Instant,
    pub(super) sessions: Sessions,
    /// Users' moves between URLs (`balancers` is the recorder's).
    pub(super) failover: Failover,
}

fn bump(counts: &mut BTreeMap<String, u64>, key: &str) {
    match counts.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            counts.insert(key.to_owned(), 1);
        }
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
            failover: Failover::default(),
        }
    }

    #[test]
    fn answers_errors_and_seconds_add_up() {
        let start = Instant::now();
        let mut r = Recorder::new(start, &["http://127.0.0.1:1/".to_owned()], 2);
        let ms = Duration::from_millis;
        r.answer(start + ms(10), 0, "web-1", 200, ms(2));
        r.answer(start + ms(20), 0, "web-2", 200, ms(4));
        r.answer(start + ms(1500), 0, "web-1", 503, ms(6));
        r.answer(start + ms(1600), 0, NO_NODE, 404, ms(1));
        r.error(start + ms(3100), 0, ErrorKind::Connect);
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
    fn moves_add_up_over_users() {
        let mut m = Moves::default();
        m.answered("web-1");
        m.moved(Some("web-1"));
        m.answered("web-1");
        let mut other = Moves::default();
        other.answered("web-1");
        other.moved(Some("web-1"));
        other.answered("web-2");
        let mut f = Failover::default();
        f.add_user(&m);
        f.add_user(&other);
        f.add_user(&Moves::default());
        assert_eq!(
            (f.moves, f.users_moved, f.kept_node, f.changed_node),
            (2, 2, 1, 1)
        );
        assert_eq!(f.sticky_kept, Some(0.5));
    }

    #[test]
    fn an_empty_run_reports_zeros() {
        let start = Instant::now();
        let report =
            Recorder::new(start, &["http://127.0.0.1:1/".to_owned()], 2).finish(info(start));
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
