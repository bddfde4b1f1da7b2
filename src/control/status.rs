//! `GET /status`: one self-contained HTML page for a person. The listeners with their open
//! connections; per pool a table of today's numbers (state, in flight, totals, current rates,
//! p99, last check), a card per node with its last five minutes as small charts (requests/s,
//! errors/s, p99 latency) and its last health check, and a timeline of state changes.
//!
//! The charts are hand-written SVG polylines, one point a second, rather than `plotters`'
//! output: a sparkline is a few hundred bytes of `<polyline points=...>`, where a plotting
//! backend writes a full chart with axes and text for each. No script, no external assets; the
//! page refreshes itself with `<meta http-equiv=refresh>` and reflows to one column on a phone.
//! Every name (pool, node, listener, check reason) is escaped: they come from config, the API,
//! the registry and backends.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::base::metrics::{DOWNSTREAM_CONNECTIONS, recorder};
use crate::control::history::{Inner, NodeHistory, Point, SAMPLES, quantile};
use crate::control::{Control, state_name};
use crate::model::pool::{Backend, Pool};

/// The table's rates run over this much of the newest history, up to the moment of the render.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Shorter than this, a rate divides by too small an interval to mean anything: a dash.
const MIN_RATE_WINDOW: Duration = Duration::from_millis(500);

/// State changes listed per pool, newest first.
const EVENTS_SHOWN: usize = 20;

/// Seconds between the page's own refreshes.
const REFRESH_SECS: u32 = 5;

/// Chart size in SVG units: one unit a second across, so a sample is a point.
const CHART_W: usize = SAMPLES;
const CHART_H: f64 = 36.0;

/// The page for `control`'s router, history and listeners as they are now.
pub(crate) fn render(control: &Control) -> String {
    let router = control.router();
    let history = control.history().lock();
    let now = Instant::now();
    let mut html = String::with_capacity(32 * 1024);
    html.push_str(HEAD);
    let _ = write!(
        html,
        "<p class=meta>fulcrum {} · {} · charts: last 5 minutes, one point a second · refreshes every {REFRESH_SECS} s</p>",
        env!("CARGO_PKG_VERSION"),
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    listeners(&mut html, &control.listeners());
    for (index, pool) in router.pools().iter().enumerate() {
        pool_section(&mut html, pool, index, &history, now);
    }
    html.push_str("</body></html>\n");
    html
}

/// The traffic listeners and the client connections open on each.
fn listeners(html: &mut String, listeners: &[(String, SocketAddr, bool)]) {
    html.push_str(
        "<h2>listeners</h2><div class=scroll><table class=listeners><tr><th>listener</th><th>address</th><th>protocol</th><th>open connections</th></tr>",
    );
    for (name, addr, tls) in listeners {
        // The gauge the accept loop keeps: read under the recorder's lock, never on the path.
        // Balancers in one process (tests) with a listener of the same name share it.
        let open = recorder()
            .gauge_value(DOWNSTREAM_CONNECTIONS, |labels| {
                labels.get("listener") == Some(name)
            })
            .unwrap_or(0.0);
        let _ = write!(
            html,
            "<tr class=listener><td>{}</td><td>{addr}</td><td>{}</td><td>{open}</td></tr>",
            escape(name),
            if *tls { "https" } else { "http" },
        );
    }
    html.push_str("</table></div>");
}

fn pool_section(html: &mut String, pool: &Arc<Pool>, index: usize, history: &Inner, now: Instant) {
    let snapshot = pool.snapshot();
    let up = snapshot
        .backends
        .iter()
        .filter(|b| b.node.is_routable())
        .count();
    let _ = write!(
        html,
        "<section class=pool><h2>pool {} <small>{} · {up} of {} nodes take traffic</small></h2>",
        escape(&pool.name),
        snapshot.settings.strategy.as_str(),
        snapshot.backends.len()
    );
    let nodes: Vec<(&Backend, Option<&NodeHistory>)> = snapshot
        .backends
        .iter()
        .map(|b| (b, history.node(&pool.name, &b.node)))
        .collect();
    table(html, &nodes, now);
    html.push_str("<div class=cards>");
    for (i, (backend, node_history)) in nodes.iter().enumerate() {
        card(html, backend, *node_history, (index, i), now);
    }
    html.push_str("</div>");
    timeline(html, pool, &nodes, now);
    html.push_str("</section>");
}

/// Today's numbers, one row per node.
fn table(html: &mut String, nodes: &[(&Backend, Option<&NodeHistory>)], now: Instant) {
    html.push_str(
        "<div class=scroll><table><tr><th>node</th><th>address</th><th>weight</th><th>state</th>\
         <th>in flight</th><th>requests</th><th>req/s</th><th>errors</th><th>err/s</th>\
         <th>p99</th><th>last check</th></tr>",
    );
    for (backend, history) in nodes {
        let node = &backend.node;
        let state = state_name(node);
        let (requests, failures) = (node.requests(), node.failures());
        let (rate, error_rate) = match history
            .and_then(|h| h.recent_rates(now, (requests, failures), RATE_WINDOW, MIN_RATE_WINDOW))
        {
            Some((r, e)) => (format!("{r:.1}"), format!("{e:.1}")),
            None => ("–".into(), "–".into()),
        };
        let in_flight = match backend.max_connections {
            Some(cap) => format!("{} / {cap}", node.in_flight()),
            None => node.in_flight().to_string(),
        };
        let _ = write!(
            html,
            "<tr class=node><td>{}</td><td>{}</td><td>{}</td><td><span class='state {state}'>{state}</span></td>\
             <td>{in_flight}</td><td>{requests}</td><td>{rate}</td><td>{failures}</td><td>{error_rate}</td>\
             <td>{}</td><td>",
            escape(&node.name),
            backend.address,
            backend.weight,
            p99_since_start(backend).map_or_else(|| "–".to_owned(), millis),
        );
        match history.and_then(|h| h.check.as_ref()) {
            Some(check) => {
                let (class, word) = if check.passed {
                    ("pass", "pass")
                } else {
                    ("fail", "fail")
                };
                let _ = write!(
                    html,
                    "<span class='check {class}'>{word}</span> {}",
                    millis(check.took.as_secs_f64())
                );
            }
            None => html.push('–'),
        }
        html.push_str("</td></tr>");
    }
    html.push_str("</table></div>");
}

/// p99 of every request the node has served, from its latency histogram.
fn p99_since_start(backend: &Backend) -> Option<f64> {
    let latency = &backend.node.metrics.latency;
    let mut counts = Vec::new();
    latency.read_into(&mut counts);
    quantile(0.99, latency.bounds(), &counts)
}

/// One node: its charts next to its numbers and its last check.
fn card(
    html: &mut String,
    backend: &Backend,
    history: Option<&NodeHistory>,
    (pool, node): (usize, usize),
    now: Instant,
) {
    let n = &backend.node;
    let state = state_name(n);
    let _ = write!(
        html,
        "<article class=card id=node-{pool}-{node}><h3>{}</h3> <span class='state {state}'>{state}</span>\
         <p class=sub>{} · weight {} · {} in flight{}</p><div class=charts>",
        escape(&n.name),
        backend.address,
        backend.weight,
        n.in_flight(),
        backend
            .max_connections
            .map(|cap| format!(" of {cap}"))
            .unwrap_or_default(),
    );
    let points = history.map(NodeHistory::points).unwrap_or_default();
    let at = |p: &Point| now.saturating_duration_since(p.at);
    let requests: Vec<_> = points.iter().map(|p| (at(p), Some(p.requests))).collect();
    let failures: Vec<_> = points.iter().map(|p| (at(p), Some(p.failures))).collect();
    let p99: Vec<_> = points
        .iter()
        .map(|p| (at(p), p.p99.map(|s| f64::from(s) * 1000.0)))
        .collect();
    chart(html, "requests/s", "req", &requests, |v| format!("{v:.1}"));
    chart(html, "errors/s", "err", &failures, |v| format!("{v:.1}"));
    chart(html, "p99 latency", "p99", &p99, |v| millis(v / 1000.0));
    let _ = write!(
        html,
        "</div><dl><dt>requests</dt><dd>{}</dd><dt>errors</dt><dd>{}</dd><dt>p99 since added</dt><dd>{}</dd>",
        n.requests(),
        n.failures(),
        p99_since_start(backend).map_or_else(|| "–".to_owned(), millis),
    );
    html.push_str("<dt>last check</dt><dd class=check-detail>");
    match history.and_then(|h| h.check.as_ref()) {
        Some(check) => {
            let ago = SystemTime::now()
                .duration_since(check.at)
                .unwrap_or_default()
                .as_secs();
            let (class, word) = if check.passed {
                ("pass", "pass")
            } else {
                ("fail", "fail")
            };
            let _ = write!(
                html,
                "<span class='check {class}'>{word}</span> in {}, {ago} s ago",
                millis(check.took.as_secs_f64())
            );
            if !check.reason.is_empty() {
                let _ = write!(html, "<br><q class=reason>{}</q>", escape(&check.reason));
            }
        }
        None => html.push_str("none yet"),
    }
    html.push_str("</dd></dl></article>");
}

/// A sparkline of `values` (age of the point, value or a gap) over the last [`SAMPLES`]
/// seconds, with the newest value and the highest one next to it.
fn chart(
    html: &mut String,
    title: &str,
    class: &str,
    values: &[(Duration, Option<f64>)],
    format: impl Fn(f64) -> String,
) {
    let visible = |age: &Duration| age.as_secs_f64() <= CHART_W as f64;
    let highest = values
        .iter()
        .filter(|(age, _)| visible(age))
        .filter_map(|(_, v)| *v)
        .fold(0.0_f64, f64::max);
    let newest = values
        .last()
        .and_then(|(_, v)| *v)
        .map_or_else(|| "–".to_owned(), &format);
    let _ = write!(
        html,
        "<figure class='chart {class}'><figcaption>{title} <b>{newest}</b> <small>max {}</small></figcaption>\
         <svg viewBox='0 0 {CHART_W} {CHART_H}' preserveAspectRatio=none role=img>\
         <title>{title}, last 5 minutes, max {}</title>",
        format(highest),
        format(highest),
    );
    // Points a chart-width old or older fall off the left; a gap (no request ended, for the
    // p99) or a missed tick breaks the line rather than joining across it.
    let mut line: Vec<(f64, f64)> = Vec::new();
    let mut flush = |line: &mut Vec<(f64, f64)>| {
        if let [(x, y)] = line.as_slice() {
            // A lone point: a dash one second wide, so it shows.
            let _ = write!(
                html,
                "<polyline points='{:.1},{y:.1} {:.1},{y:.1}'/>",
                x - 0.5,
                x + 0.5
            );
        } else if !line.is_empty() {
            html.push_str("<polyline points='");
            for (i, (x, y)) in line.iter().enumerate() {
                let _ = write!(html, "{}{x:.0},{y:.1}", if i == 0 { "" } else { " " });
            }
            html.push_str("'/>");
        }
        line.clear();
    };
    for (age, value) in values {
        let x = CHART_W as f64 - age.as_secs_f64();
        let Some(value) = value.filter(|_| visible(age)) else {
            flush(&mut line);
            continue;
        };
        if line.last().is_some_and(|(p, _)| x - p > 2.5) {
            flush(&mut line);
        }
        let y = if highest > 0.0 {
            CHART_H - 1.0 - (CHART_H - 2.0) * value / highest
        } else {
            CHART_H - 1.0
        };
        line.push((x, y));
    }
    flush(&mut line);
    html.push_str("</svg></figure>");
}

/// Each node's state over the last five minutes as a coloured lane, then the pool's newest
/// state changes with their times and reasons.
fn timeline(
    html: &mut String,
    pool: &Pool,
    nodes: &[(&Backend, Option<&NodeHistory>)],
    now: Instant,
) {
    html.push_str("<h3>timeline</h3><div class=lanes>");
    for (backend, history) in nodes {
        let _ = write!(
            html,
            "<div class=lane><span>{}</span><svg viewBox='0 0 {CHART_W} 10' preserveAspectRatio=none role=img><title>state of {} over the last 5 minutes</title>",
            escape(&backend.node.name),
            escape(&backend.node.name),
        );
        // Runs of one state as one rectangle each.
        let mut run: Option<(f64, f64, &str)> = None;
        let samples = history.iter().flat_map(|h| h.samples.iter());
        for sample in samples {
            let x =
                (CHART_W as f64 - now.saturating_duration_since(sample.at).as_secs_f64()).max(0.0);
            run = match run {
                Some((from, _, state)) if state == sample.state => Some((from, x + 1.0, state)),
                Some(done) => {
                    state_rect(html, done);
                    Some((x, x + 1.0, sample.state))
                }
                None => Some((x, x + 1.0, sample.state)),
            };
        }
        if let Some(done) = run {
            state_rect(html, done);
        }
        html.push_str("</svg></div>");
    }
    html.push_str("<div class='lane axis'><span></span><p><i>−5 min</i><i>now</i></p></div></div>");
    let events = pool.journal.recent();
    if events.is_empty() {
        return;
    }
    html.push_str(
        "<div class=scroll><table class=events><tr><th>time (UTC)</th><th>node</th><th>change</th><th>detail</th></tr>",
    );
    for event in events.iter().take(EVENTS_SHOWN) {
        let _ = write!(
            html,
            "<tr class=event><td>{}</td><td>{}</td><td><span class='state {}'>{}</span></td><td>{}</td></tr>",
            humantime::format_rfc3339_seconds(event.at),
            escape(&event.backend),
            event.what,
            event.what,
            escape(&event.detail)
        );
    }
    html.push_str("</table></div>");
}

fn state_rect(html: &mut String, (from, to, state): (f64, f64, &str)) {
    let _ = write!(
        html,
        "<rect class='s-{state}' x='{from:.0}' width='{:.0}' height='10'/>",
        (to.min(CHART_W as f64) - from).max(1.0)
    );
}

/// Seconds as milliseconds, with the precision a reader can use.
fn millis(secs: f64) -> String {
    let ms = secs * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{secs:.2} s")
    }
}

/// Node names and check reasons come from config, the API and backends: escape them.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const HEAD: &str = r#"<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv=refresh content=5>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>fulcrum status</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em; color: #222; background: #fafafa; }
h1 { margin: 0 0 .2em; } h2 { margin: 1.4em 0 .4em; } h3 { margin: .2em 0; display: inline; font-size: 1.05em; overflow-wrap: anywhere; }
small { color: #666; font-weight: normal; } .meta { color: #666; margin: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; min-width: 60%; background: white; }
th, td { padding: .3em .7em; border-bottom: 1px solid #ddd; text-align: left; white-space: nowrap; }
td:nth-child(n+3) { font-variant-numeric: tabular-nums; }
.events td:last-child { white-space: normal; }
tr.node td:first-child, tr.event td:nth-child(2) { max-width: 16em; overflow: hidden; text-overflow: ellipsis; }
.state, .check { padding: .1em .5em; border-radius: .8em; color: white; background: #868e96; font-size: .9em; }
.up, .pass { background: #2b8a3e; } .down, .fail { background: #c92a2a; } .pending, .added, .moved { background: #1971c2; }
.draining, .removed { background: #e67700; } .cooling { background: #9c36b5; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 330px), 1fr)); gap: .8em; margin: .8em 0; }
.card { background: white; border: 1px solid #ddd; border-radius: .5em; padding: .7em .8em; min-width: 0; }
.sub { color: #555; margin: .2em 0 .5em; overflow-wrap: anywhere; }
.charts { display: grid; gap: .3em; }
figure { margin: 0; } figcaption { font-size: .85em; color: #444; } figcaption b { color: #222; }
.chart svg { display: block; width: 100%; height: 36px; background: #f4f6f8; border-radius: 3px; }
polyline { fill: none; stroke-width: 1.5; vector-effect: non-scaling-stroke; stroke-linejoin: round; }
.req polyline { stroke: #1971c2; } .err polyline { stroke: #c92a2a; } .p99 polyline { stroke: #7048e8; }
dl { display: grid; grid-template-columns: auto 1fr; gap: .1em .8em; margin: .6em 0 0; font-size: .92em; }
dt { color: #666; } dd { margin: 0; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
q.reason { color: #a61e4d; }
.lanes { background: white; border: 1px solid #ddd; border-radius: .5em; padding: .5em .8em; margin: .4em 0 .8em; }
.lane { display: grid; grid-template-columns: minmax(4em, 12em) 1fr; gap: .6em; align-items: center; }
.lane span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-size: .9em; }
.lane svg { width: 100%; height: 10px; background: #f1f3f5; }
.lane.axis p { display: flex; justify-content: space-between; margin: 0; color: #666; font-size: .8em; }
.s-up { fill: #2b8a3e; } .s-down { fill: #c92a2a; } .s-pending { fill: #1971c2; } .s-draining { fill: #e67700; } .s-cooling { fill: #9c36b5; }
@media (max-width: 600px) { body { margin: .6em; } .lane { grid-template-columns: 6em 1fr; } }
</style></head><body>
<h1>fulcrum</h1>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_names_is_escaped() {
        assert_eq!(escape("<b>&'\""), "&lt;b&gt;&amp;&#39;&quot;");
    }

    #[test]
    fn a_chart_breaks_its_line_at_gaps_and_drops_points_older_than_five_minutes() {
        let mut html = String::new();
        let secs = Duration::from_secs;
        let values = [
            (secs(400), Some(9.0)),
            (secs(3), Some(1.0)),
            (secs(2), Some(2.0)),
            (secs(1), None),
            (secs(0), Some(4.0)),
        ];
        chart(&mut html, "requests/s", "req", &values, |v| {
            format!("{v:.1}")
        });
        // Two lines: 1.0 and 2.0 three and two seconds ago, then 4.0 alone after the gap.
        assert_eq!(html.matches("<polyline").count(), 2, "{html}");
        assert!(html.contains("points='297,26.5 298,18.0'"), "{html}");
        assert!(html.contains("points='299.5,1.0 300.5,1.0'"), "{html}");
        assert!(html.contains("<b>4.0</b> <small>max 4.0</small>"), "{html}");
    }
}
