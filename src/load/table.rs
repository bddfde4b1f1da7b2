//! The report as a person reads it in a terminal: a heading, the answers per node, one line per
//! figure (statuses, errors, latency, evenness, sessions) and the timeline, each section one
//! function below, in the order they print. `golden.rs` pins the output byte for byte.

use std::collections::BTreeMap;
use std::fmt::{self, Display, Formatter};
use std::time::{Duration, SystemTime};

use super::continuity::Sessions;
use super::distribution::Distribution;
use super::report::{Failover, Mode, NodeCount, Report, Second};

impl Report {
    /// The report as a person reads it in a terminal.
    pub fn to_table(&self) -> String {
        self.to_string()
    }
}

/// The table of [`Report::to_table`].
impl Display for Report {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        heading(f, self)?;
        node_table(f, &self.nodes)?;
        outcomes(f, self)?;
        evenness(f, &self.distribution)?;
        sessions(f, &self.sessions, self.users, self.mode)?;
        if let Some(failover) = &self.failover {
            balancers(f, failover)?;
        }
        timeline(f, &self.nodes, &self.timeline)
    }
}

/// What ran against what and when, and how much got done.
fn heading(f: &mut Formatter<'_>, report: &Report) -> fmt::Result {
    let mode = match (report.mode, report.target_rate) {
        (Mode::Open, Some(rate)) => format!("open loop at {rate} req/s"),
        _ => "closed loop".to_owned(),
    };
    let started = SystemTime::UNIX_EPOCH + Duration::from_millis(report.started_unix_ms);
    write!(f, "fulcrum load  {}", report.url)?;
    if !report.paths.is_empty() {
        write!(f, "  paths {}", report.paths.join(", "))?;
    }
    writeln!(f)?;
    writeln!(
        f,
        "  {} users, {mode}, started {} (unix ms {})",
        report.users,
        humantime::format_rfc3339_millis(started),
        report.started_unix_ms
    )?;
    write!(
        f,
        "  {:.2} s, {} requests, {:.1} req/s",
        report.duration_s, report.requests, report.achieved_rate
    )?;
    if report.unfinished > 0 {
        write!(f, ", {} unfinished at the end", report.unfinished)?;
    }
    writeln!(f)
}

/// Answers and share per node, the name column as wide as the longest name.
fn node_table(f: &mut Formatter<'_>, nodes: &BTreeMap<String, NodeCount>) -> fmt::Result {
    let width = nodes
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
    for (name, count) in nodes {
        writeln!(
            f,
            "  {name:<width$}  {:>10}  {:>6.1}%",
            count.responses, count.share_pct
        )?;
    }
    if nodes.is_empty() {
        writeln!(f, "  (no answers)")?;
    }
    Ok(())
}

/// Statuses, errors by kind and latency percentiles, a line each.
fn outcomes(f: &mut Formatter<'_>, report: &Report) -> fmt::Result {
    write!(f, "\n  statuses  ")?;
    if report.statuses.is_empty() {
        write!(f, "-")?;
    }
    for (i, (code, n)) in report.statuses.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        write!(f, "{sep}{code}: {n}")?;
    }
    writeln!(f)?;
    let e = &report.errors;
    writeln!(
        f,
        "  errors    {} (connect {}, timeout {}, reset {}, status {}, other {})",
        e.total, e.connect, e.timeout, e.reset, e.status, e.other
    )?;
    let l = &report.latency_ms;
    writeln!(
        f,
        "  latency   p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms ({} samples)",
        l.p50, l.p99, l.p999, l.max, l.samples
    )
}

/// How evenly the nodes that named themselves shared the answers.
fn evenness(f: &mut Formatter<'_>, d: &Distribution) -> fmt::Result {
    let (Some(cv), Some(ratio)) = (d.cv, d.max_min_ratio) else {
        return writeln!(f, "  evenness  - (no answer named a node)");
    };
    writeln!(
        f,
        "  evenness  cv {cv:.4}, max/min {ratio:.3} over {} node{}; shares {}",
        d.shares.len(),
        if d.shares.len() == 1 { "" } else { "s" },
        d.shares
            .iter()
            .map(|(name, share)| format!("{name} {:.1}%", share * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Node switches of all `users`, then whether their sessions kept counting.
fn sessions(f: &mut Formatter<'_>, s: &Sessions, users: usize, mode: Mode) -> fmt::Result {
    writeln!(
        f,
        "  sessions  {} node switches, {} of {users} users switched at least once",
        s.switches, s.users_switched
    )?;
    let Some(continuity) = s.continuity else {
        return writeln!(
            f,
            "            continuity -: no answer carried x-session-visits (try --path /session)"
        );
    };
    write!(
        f,
        "            continuity {:.1}%: {} of {} users saw their visit count reset ({} resets)",
        continuity * 100.0,
        s.users_reset,
        s.users_tracked,
        s.resets
    )?;
    if mode == Mode::Open {
        write!(
            f,
            "; open loop: a user's overlapping requests can read as resets"
        )?;
    }
    writeln!(f)
}

/// With several `--url`s: what each answered, and how the users that moved fared.
fn balancers(f: &mut Formatter<'_>, failover: &Failover) -> fmt::Result {
    let width = failover
        .balancers
        .iter()
        .map(|b| b.url.chars().count())
        .max()
        .unwrap_or(0)
        .max("balancer".len());
    writeln!(
        f,
        "\n  {:<width$}  {:>6}  {:>9}  {:>10}  {:>7}  {:>7}  {:>10}",
        "balancer", "users", "requests", "responses", "errors", "reset", "moves away"
    )?;
    for b in &failover.balancers {
        writeln!(
            f,
            "  {:<width$}  {:>6}  {:>9}  {:>10}  {:>7}  {:>7}  {:>10}",
            b.url,
            b.users_started,
            b.requests,
            b.responses,
            b.errors.total,
            b.errors.reset,
            b.moves_away
        )?;
    }
    write!(
        f,
        "  moves     {} ({} users moved to the next --url)",
        failover.moves, failover.users_moved
    )?;
    match failover.sticky_kept {
        Some(kept) => writeln!(
            f,
            "; {:.1}% kept their node ({} kept, {} changed)",
            kept * 100.0,
            failover.kept_node,
            failover.changed_node
        ),
        None => writeln!(f),
    }
}

/// Answers per node and errors, a row per second, a column per node.
fn timeline(
    f: &mut Formatter<'_>,
    nodes: &BTreeMap<String, NodeCount>,
    seconds: &[Second],
) -> fmt::Result {
    writeln!(f, "\n  timeline (answers per node and errors, per second)")?;
    let heading = nodes.keys().map(|name| (name.as_str(), name.as_str()));
    timeline_row(f, "s", heading, "errors")?;
    for s in seconds {
        let answers = nodes
            .keys()
            .map(|name| (name.as_str(), s.nodes.get(name).copied().unwrap_or(0)));
        timeline_row(f, s.second, answers, s.errors.total)?;
    }
    Ok(())
}

/// One line of the timeline, its heading included. `cells` pairs each node's name with what
/// its column shows; the column is as wide as the name (at least 6), so heading and rows line
/// up.
fn timeline_row<'a, C: Display>(
    f: &mut Formatter<'_>,
    second: impl Display,
    cells: impl Iterator<Item = (&'a str, C)>,
    errors: impl Display,
) -> fmt::Result {
    write!(f, "  {second:>5}")?;
    for (name, cell) in cells {
        let width = name.chars().count().max(6);
        write!(f, "  {cell:>width$}")?;
    }
    writeln!(f, "  {errors:>6}")
}
