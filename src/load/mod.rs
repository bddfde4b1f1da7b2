//! `fulcrum load`: a session-aware traffic simulator for drills against a balancer.
//!
//! Virtual users each own a cookie jar and a keep-alive HTTP/1.1 connection pool (optionally
//! bound to their own source address), so a balancer sees them as distinct clients with
//! distinct sessions. A run is bounded by `--duration` and optionally `--requests`, and stops
//! by itself: requests still in flight at the deadline are cut off and counted as unfinished.
//!
//! - Closed loop (default): each user sends its next request when the previous one finished.
//! - Open loop (`--rate R`): request `k` leaves at `start + k/R` from user `k % users`, whether
//!   or not that user's earlier requests were answered, so a dead or slow backend cannot lower
//!   the offered load (no coordinated omission).
//!
//! With `--visits M` each user makes exactly M requests and stops, so a run compares like
//! with like: the same users, the same number of visits, whatever the strategy in front.
//!
//! `--url` may be repeated: user `i` starts on URL `i % n` and moves to the next when its
//! balancer refuses or resets its connection (`failover.rs`).
//!
//! Each virtual user is a `User` (`user.rs`); this file checks the flags, paces the users and
//! records how each request ended. What the run saw becomes a [`Report`] (see `report.rs`):
//! per-node counts, shares and evenness (`distribution.rs`), node switches and session
//! continuity from the web node's `x-session-visits` (`continuity.rs`). `table.rs` prints it
//! for people and `chart.rs` draws its timeline.

mod chart;
mod continuity;
mod distribution;
mod failover;
#[cfg(test)]
mod golden;
mod jar;
mod report;
mod round;
mod source_ips;
mod table;
mod user;

use std::error::Error as StdError;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use http::Uri;
use http::uri::{PathAndQuery, Scheme};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::info;

pub use continuity::Sessions;
pub use distribution::Distribution;
pub use report::{BalancerCount, ErrorCounts, Failover, Latency, Mode, NodeCount, Report, Second};
pub use source_ips::{SourceIps, SourceIpsError};

use chart::write_svg;
use report::{ErrorKind, Recorder, RunInfo};
use user::{Ending, User, classify, served_by};

/// One scheduler task spawns at most a few million requests per second on any machine, and
/// each waiting request holds memory; past this a typo (`--rate 1e9`) would only exhaust RAM.
const MAX_RATE: f64 = 1_000_000.0;

/// `fulcrum load`: what to send, for how long, and how to report it.
#[derive(Debug, Clone, PartialEq, clap::Args)]
#[command(after_help = "\
Examples:
  fulcrum load --url http://127.0.0.1:8080/ --users 50 --duration 30s
  fulcrum load --url http://127.0.0.1:8080/ --rate 500 --duration 60s --svg drill.svg --json
  fulcrum load --url http://127.0.0.1:8080/ --source-ips 127.0.0.2-127.0.1.250 --users 500
  fulcrum load --url http://127.0.0.1:8080/session --users 200 --visits 20 --json
  fulcrum load --url http://127.0.0.1:8080/ --url http://127.0.0.1:8081/ --users 20

Exits 0 once the run ended (failed requests are in the report), 1 if it could not start.")]
pub struct LoadArgs {
    /// Target URL, path included (http only), e.g. http://127.0.0.1:8080/; repeat it for
    /// several balancers: user i starts on URL i % n and moves to the next when its balancer
    /// refuses or resets the connection.
    #[arg(long = "url", value_name = "URL", required = true)]
    pub urls: Vec<String>,
    /// Rotate through these paths (and queries) on the URL's host instead of its own path;
    /// repeat the flag for several.
    #[arg(long = "path", value_name = "PATH")]
    pub paths: Vec<String>,
    /// Virtual users: each has its own cookie jar and keep-alive connection pool.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub users: u32,
    /// Stop after this long (e.g. 500ms, 30s, 2m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop after this many requests, if that comes before --duration.
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// Each user makes exactly this many requests, then stops (still within --duration and
    /// --requests). Against /session, this is how many visits each session gets.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
    pub visits: Option<u64>,
    /// Open loop: send this many requests per second in total, on a fixed schedule, whatever
    /// the answers take. Without it, each user waits for an answer before its next request.
    #[arg(long, value_name = "REQ_PER_S")]
    pub rate: Option<f64>,
    /// Per request, until the whole body arrived; counted as a `timeout` error.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Bind user i's connections to the i-th address of this range, wrapping around
    /// (e.g. 127.0.0.2-127.0.1.250; all of 127/8 is loopback on Linux).
    #[arg(long, value_name = "FIRST-LAST")]
    pub source_ips: Option<SourceIps>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the timeline as an SVG line chart to this file.
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
    /// The chart's title.
    #[arg(long, default_value = "fulcrum load")]
    pub title: String,
}

impl LoadArgs {
    /// The defaults of the command line, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        LoadArgs {
            urls: vec![url.into()],
            paths: Vec::new(),
            users: 10,
            duration: Duration::from_secs(10),
            requests: None,
            visits: None,
            rate: None,
            timeout: Duration::from_secs(5),
            source_ips: None,
            json: false,
            svg: None,
            title: "fulcrum load".to_owned(),
        }
    }
}

/// Why a run could not start, or its report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `--url` did not parse as a URI.
    #[error("--url `{url}` is not a URL")]
    Url {
        /// The `--url` given.
        url: String,
        /// Why it did not parse.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// `--url` is relative or not `http://`.
    #[error("--url `{0}` must be an absolute http:// URL (https is not supported yet)")]
    NotHttp(String),
    /// No `--url` at all.
    #[error("at least one --url is needed")]
    NoUrl,
    /// `--path` did not parse as a URI path.
    #[error("--path `{path}` is not a valid path")]
    Path {
        /// The `--path` given.
        path: String,
        /// Why it did not parse.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// `--rate` is not in (0, 1000000].
    #[error("--rate must be a number of requests per second above 0 and at most 1000000 (got {0})")]
    Rate(f64),
    /// `--users 0`: nobody would send anything.
    #[error("--users must be at least 1")]
    NoUsers,
    /// `--duration 0`: the run would end before it starts.
    #[error("--duration must be longer than 0")]
    NoDuration,
    /// `--duration` overflows the run's clock.
    #[error("--duration {0:?} is longer than this clock can count")]
    LongDuration(Duration),
    /// `--source-ips` cannot reach the target: users bind one IP version, the target is the other.
    #[error("--source-ips {ips} and the target {target} are different IP versions")]
    SourceFamily {
        /// The `--source-ips` range.
        ips: SourceIps,
        /// The IP address in `--url`.
        target: IpAddr,
    },
    /// The chart could not be written.
    #[error("writing the chart to {path}")]
    Chart {
        /// The `--svg` file.
        path: PathBuf,
        /// Why writing it failed.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The report could not be serialized for `--json`.
    #[error("writing the report as JSON")]
    Json(#[from] serde_json::Error),
}

/// Runs the simulation described by `args` until its duration or request count is reached.
/// Errors are returned only when the run cannot start; failed requests are in the report.
pub async fn run(args: &LoadArgs) -> Result<Report, LoadError> {
    let target = check(args)?;
    let users = usize::try_from(args.users).unwrap_or(usize::MAX);
    let mode = if args.rate.is_some() {
        Mode::Open
    } else {
        Mode::Closed
    };
    let url = args.urls.join(", ");
    info!(%url, users, ?mode, rate = ?args.rate, duration = ?args.duration,
        requests = ?args.requests, visits = ?args.visits, "load run starting");
    let sites = target.sites();
    let users: Vec<Arc<User>> = (0..users)
        .map(|i| Arc::new(User::new(args.source_ips.map(|ips| ips.nth(i)), i % sites)))
        .collect();
    let started_at = SystemTime::now();
    let start = Instant::now();
    let shared = Arc::new(Shared::new(target, args, users.len(), start)?);

    match args.rate {
        None => closed_loop(&shared, &users, args.visits).await,
        Some(rate) => open_loop(&shared, &users, rate, start).await,
    }
    let ended = Instant::now();

    let report = shared.into_recorder().finish(RunInfo {
        url,
        paths: args.paths.clone(),
        mode,
        target_rate: args.rate,
        users: users.len(),
        started_at,
        ended: ended.into_std(),
        sessions: sessions(&users),
        failover: moves(&users),
    });
    info!(
        requests = report.requests,
        errors = report.errors.total,
        unfinished = report.unfinished,
        "load run finished"
    );
    Ok(report)
}

/// The target, once every flag that could keep the run from starting has been checked; the
/// first mistake found is the one reported.
fn check(args: &LoadArgs) -> Result<Target, LoadError> {
    let target = Target::new(&args.urls, &args.paths)?;
    if args.users == 0 {
        return Err(LoadError::NoUsers);
    }
    if args.duration.is_zero() {
        return Err(LoadError::NoDuration);
    }
    if let Some(rate) = args.rate
        && !(rate > 0.0 && rate <= MAX_RATE)
    {
        return Err(LoadError::Rate(rate));
    }
    if let Some(ips) = args.source_ips
        && let Some(host) = target.ip_hosts().find(|h| ips.is_ipv4() != h.is_ipv4())
    {
        return Err(LoadError::SourceFamily { ips, target: host });
    }
    Ok(target)
}

/// How many requests the run may issue: `--requests`, or `--visits` for every one of `users`,
/// whichever is fewer.
fn request_limit(args: &LoadArgs, users: usize) -> Option<u64> {
    // In the open loop request k goes to user k % users, so the first users × visits requests
    // are exactly `visits` per user; the closed loop also counts per user (`closed_loop`).
    let per_user_total = args
        .visits
        .map(|visits| visits.saturating_mul(users as u64));
    match (args.requests, per_user_total) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Closed loop: each user sends its next request when its previous one finished, until it made
/// `visits`, the run's requests ran out or the deadline passed.
async fn closed_loop(shared: &Arc<Shared>, users: &[Arc<User>], visits: Option<u64>) {
    let visits = visits.unwrap_or(u64::MAX);
    let mut tasks = JoinSet::new();
    for user in users {
        let (shared, user) = (shared.clone(), user.clone());
        tasks.spawn(async move {
            let mut made = 0;
            while made < visits && Instant::now() < shared.deadline {
                let Some(k) = shared.ticket() else { break };
                request(&shared, &user, k).await;
                made += 1;
            }
        });
    }
    join_all(tasks).await;
}

/// Open loop: request `k` leaves at `start + k / rate` from user `k % users`, whether or not
/// that user's earlier requests were answered.
async fn open_loop(shared: &Arc<Shared>, users: &[Arc<User>], rate: f64, start: Instant) {
    let mut tasks = JoinSet::new();
    // Scheduling from `start` rather than from the previous send keeps the rate exact: a late
    // wake-up is caught up at once instead of shifting every later request.
    while let Some(k) = shared.ticket() {
        let at = Duration::try_from_secs_f64(k as f64 / rate)
            .ok()
            .and_then(|offset| start.checked_add(offset));
        let Some(at) = at.filter(|at| *at < shared.deadline) else {
            break;
        };
        if Instant::now() >= shared.deadline {
            break;
        }
        tokio::time::sleep_until(at).await;
        let (shared, user) = (shared.clone(), users[k as usize % users.len()].clone());
        tasks.spawn(async move { request(&shared, &user, k).await });
        // Reap what finished so a long run does not keep a handle per request.
        while let Some(done) = tasks.try_join_next() {
            propagate_panic(done);
        }
    }
    join_all(tasks).await;
}

/// Waits until every request task has ended.
async fn join_all(mut tasks: JoinSet<()>) {
    while let Some(done) = tasks.join_next().await {
        propagate_panic(done);
    }
}

/// Every user's node switches and visit counts, summed up once the run is over.
fn sessions(users: &[Arc<User>]) -> Sessions {
    let mut sessions = Sessions::default();
    for user in users {
        user.add_to(&mut sessions);
    }
    sessions
}

/// Every user's moves between URLs, summed up once the run is over.
fn moves(users: &[Arc<User>]) -> Failover {
    let mut failover = Failover::default();
    for user in users {
        user.add_moves_to(&mut failover);
    }
    failover
}

/// Request tasks are never cancelled, so a task error is a panic: a bug, raised again here.
/// Until then the other tasks go on: `Shared::recorder` and `User::state` take no notice of
/// the poison it left on their locks.
fn propagate_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// What the command line prints: writes the `--svg` chart if asked, then returns the report as
/// a table, or as JSON with `--json`.
pub fn render(report: &Report, args: &LoadArgs) -> Result<String, LoadError> {
    if let Some(path) = &args.svg {
        write_svg(report, path, &args.title)?;
    }
    if args.json {
        Ok(serde_json::to_string_pretty(report)?)
    } else {
        Ok(report.to_table())
    }
}

/// The URLs requests go to: per `--url`, one per `--path`, or the URL itself.
struct Target {
    sites: Vec<Vec<Uri>>,
}

impl Target {
    fn new(urls: &[String], paths: &[String]) -> Result<Self, LoadError> {
        if urls.is_empty() {
            return Err(LoadError::NoUrl);
        }
        let sites = urls
            .iter()
            .map(|url| Self::site(url, paths))
            .collect::<Result<_, _>>()?;
        Ok(Target { sites })
    }

    /// One `--url` with each `--path` on its host.
    #[expect(clippy::expect_used, reason = "scheme, authority and path were valid")]
    fn site(url: &str, paths: &[String]) -> Result<Vec<Uri>, LoadError> {
        let base: Uri = url.parse().map_err(|source| LoadError::Url {
            url: url.to_owned(),
            source,
        })?;
        if base.scheme() != Some(&Scheme::HTTP) || base.host().is_none_or(str::is_empty) {
            return Err(LoadError::NotHttp(url.to_owned()));
        }
        if paths.is_empty() {
            return Ok(vec![base]);
        }
        let mut uris = Vec::with_capacity(paths.len());
        for path in paths {
            let path_and_query: PathAndQuery = path.parse().map_err(|source| LoadError::Path {
                path: path.clone(),
                source,
            })?;
            let mut parts = base.clone().into_parts();
            parts.path_and_query = Some(path_and_query);
            uris.push(Uri::from_parts(parts).expect("scheme, authority and path were valid"));
        }
        Ok(uris)
    }

    /// How many `--url`s there are.
    fn sites(&self) -> usize {
        self.sites.len()
    }

    /// Request `k`'s URI on `--url` number `site`.
    fn uri(&self, site: usize, k: u64) -> &Uri {
        let uris = &self.sites[site % self.sites.len()];
        &uris[k as usize % uris.len()]
    }

    /// Each target host that is an IP literal (`[::1]` included).
    fn ip_hosts(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.sites.iter().filter_map(|uris| {
            uris[0]
                .host()?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()
        })
    }
}

/// What every request of a run shares.
struct Shared {
    target: Target,
    timeout: Duration,
    deadline: Instant,
    limit: Option<u64>,
    issued: AtomicU64,
    recorder: Mutex<Recorder>,
}

impl Shared {
    /// A run of `users` that starts at `start`.
    fn new(
        target: Target,
        args: &LoadArgs,
        users: usize,
        start: Instant,
    ) -> Result<Self, LoadError> {
        Ok(Shared {
            target,
            timeout: args.timeout,
            deadline: start
                .checked_add(args.duration)
                .ok_or(LoadError::LongDuration(args.duration))?,
            limit: request_limit(args, users),
            issued: AtomicU64::new(0),
            recorder: Mutex::new(Recorder::new(start.into_std(), &args.urls, users)),
        })
    }

    /// The number of the next request, or `None` once `--requests` have been issued.
    fn ticket(&self) -> Option<u64> {
        let k = self.issued.fetch_add(1, Ordering::Relaxed);
        self.limit.is_none_or(|limit| k < limit).then_some(k)
    }

    fn recorder(&self) -> MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was recorded, once every request task has ended and let go of its `Shared`.
    #[expect(clippy::expect_used, reason = "every request task has finished")]
    fn into_recorder(self: Arc<Self>) -> Recorder {
        let shared = Arc::into_inner(self).expect("every request task has finished");
        shared
            .recorder
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sends request `k` as `user` and records how it ended. A refused connection is tried again
/// at once on the next `--url` (nobody saw the request), at most once per URL; a reset one
/// fails, and the user's next request goes to the next URL.
async fn request(shared: &Shared, user: &User, k: u64) {
    let sites = shared.target.sites();
    let sent = Instant::now();
    let mut tries = 0;
    let (site, ending) = loop {
        let site = user.site();
        let req = user.get(shared.target.uri(site, k));
        let ending = user.exchange(req, shared.timeout, shared.deadline).await;
        tries += 1;
        let gone = match &ending {
            Ending::Failed(error) => classify(error.as_ref()),
            _ => break (site, ending),
        };
        if sites > 1 && matches!(gone, ErrorKind::Connect | ErrorKind::Reset) {
            if user.move_on(site, sites) {
                shared.recorder().moved(site);
            }
            if gone == ErrorKind::Connect && tries < sites {
                continue;
            }
        }
        break (site, ending);
    };
    let now = Instant::now();
    let failure = match ending {
        Ending::Answered(parts) => {
            let node = served_by(&parts.headers);
            user.answered(&parts.headers, &node, now.into_std());
            let status = parts.status.as_u16();
            shared
                .recorder()
                .answer(now.into_std(), site, &node, status, now - sent);
            return;
        }
        Ending::Unfinished => None,
        Ending::TimedOut => Some(ErrorKind::Timeout),
        Ending::Failed(error) => Some(classify(error.as_ref())),
    };
    user.unanswered();
    match failure {
        Some(kind) => shared.recorder().error(now.into_std(), site, kind),
        None => shared.recorder().unfinished(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_and_paths_rotate() {
        let urls = |list: &[&str]| list.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        let t = Target::new(&urls(&["http://127.0.0.1:8080/a?x=1"]), &[]).unwrap();
        assert_eq!(t.uri(0, 5).to_string(), "http://127.0.0.1:8080/a?x=1");
        let hosts: Vec<IpAddr> = t.ip_hosts().collect();
        assert_eq!(hosts, ["127.0.0.1".parse::<IpAddr>().unwrap()]);
        let t = Target::new(
            &urls(&["http://[::1]:80/", "http://localhost:81/"]),
            &["/x".into(), "/y?z".into()],
        )
        .unwrap();
        assert_eq!(t.sites(), 2);
        assert_eq!(t.uri(0, 0).to_string(), "http://[::1]:80/x");
        assert_eq!(t.uri(0, 3).to_string(), "http://[::1]:80/y?z");
        assert_eq!(t.uri(1, 3).to_string(), "http://localhost:81/y?z");
        let hosts: Vec<IpAddr> = t.ip_hosts().collect();
        assert_eq!(hosts, ["::1".parse::<IpAddr>().unwrap()]);
        assert!(matches!(Target::new(&[], &[]), Err(LoadError::NoUrl)));

        let err = |url: &str| Target::new(&urls(&[url]), &[]).err().unwrap().to_string();
        assert!(err("https://127.0.0.1/").contains("must be an absolute http:// URL"));
        assert!(err("/just/a/path").contains("must be an absolute http:// URL"));
        assert!(err("http://exa mple/").contains("is not a URL"));
    }
}
