//! `GET /status`: one self-contained HTML page for a person: every pool, every node with its
//! state, in-flight requests, request and error rates, and the recent state changes. It
//! refreshes itself every two seconds; no script, no external assets.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::control::state_name;
use crate::datapath::proxy::Router;

/// Rates are taken between two renders at least this far apart; closer renders (two viewers)
/// reuse the last figures instead of dividing by a tiny interval.
const MIN_WINDOW: Duration = Duration::from_millis(500);

/// Request and failure counts at the previous render, to turn counters into rates.
#[derive(Debug, Default)]
pub(crate) struct RateSampler(Mutex<Sampled>);

#[derive(Debug, Default)]
struct Sampled {
    at: Option<Instant>,
    /// (pool, node) → (requests, failures) at `at`.
    counts: HashMap<(String, String), (u64, u64)>,
    /// (pool, node) → (requests/s, failures/s) over the last window.
    rates: HashMap<(String, String), (f64, f64)>,
}

impl RateSampler {
    fn rates(&self, router: &Router) -> HashMap<(String, String), (f64, f64)> {
        let mut sampled = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let elapsed = sampled.at.map(|at| now - at);
        if elapsed.is_some_and(|e| e < MIN_WINDOW) {
            return sampled.rates.clone();
        }
        let mut counts = HashMap::new();
        let mut rates = HashMap::new();
        for pool in router.pools() {
            for backend in pool.snapshot().backends.iter() {
                let key = (pool.name.to_string(), backend.node.name.to_string());
                let now_counts = (backend.node.requests(), backend.node.failures());
                if let (Some(elapsed), Some(before)) = (elapsed, sampled.counts.get(&key)) {
                    let secs = elapsed.as_secs_f64();
                    rates.insert(
                        key.clone(),
                        (
                            now_counts.0.saturating_sub(before.0) as f64 / secs,
                            now_counts.1.saturating_sub(before.1) as f64 / secs,
                        ),
                    );
                }
                counts.insert(key, now_counts);
            }
        }
        *sampled = Sampled {
            at: Some(now),
            counts,
            rates: rates.clone(),
        };
        rates
    }
}

pub(crate) fn render(router: &Router, sampler: &RateSampler) -> String {
    let rates = sampler.rates(router);
    let mut html = String::with_capacity(16 * 1024);
    html.push_str(HEAD);
    let _ = write!(
        html,
        "<p class=meta>fulcrum {} · {} · refreshes every 2 s</p>",
        env!("CARGO_PKG_VERSION"),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    for pool in router.pools() {
        let snapshot = pool.snapshot();
        let _ = write!(
            html,
            "<h2>pool {} <small>{} · {} nodes</small></h2>\
             <table><tr><th>node</th><th>address</th><th>weight</th><th>state</th>\
             <th>in flight</th><th>requests</th><th>req/s</th><th>errors</th><th>err/s</th></tr>",
            escape(&pool.name),
            snapshot.settings.strategy.as_str(),
            snapshot.backends.len()
        );
        for backend in snapshot.backends.iter() {
            let node = &backend.node;
            let state = state_name(node);
            let key = (pool.name.to_string(), node.name.to_string());
            let (rate, error_rate) = match rates.get(&key) {
                Some((r, e)) => (format!("{r:.1}"), format!("{e:.1}")),
                None => ("–".into(), "–".into()),
            };
            let _ = write!(
                html,
                "<tr class=node><td>{}</td><td>{}</td><td>{}</td><td><span class='state {state}'>{state}</span></td>\
                 <td>{}</td><td>{}</td><td>{rate}</td><td>{}</td><td>{error_rate}</td></tr>",
                escape(&node.name),
                backend.address,
                backend.weight,
                node.in_flight(),
                node.requests(),
                node.failures(),
            );
        }
        html.push_str("</table>");
        let events = pool.journal.recent();
        if !events.is_empty() {
            html.push_str(
                "<h3>recent changes</h3><table class=events><tr><th>time (UTC)</th><th>node</th><th>change</th><th>detail</th></tr>",
            );
            for event in events.iter().take(20) {
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
            html.push_str("</table>");
        }
    }
    html.push_str("</body></html>\n");
    html
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
<meta http-equiv=refresh content=2>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>fulcrum status</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin: 0 0 .2em; } h2 { margin: 1.4em 0 .4em; } small { color: #666; font-weight: normal; }
.meta { color: #666; margin: 0; }
table { border-collapse: collapse; min-width: 60%; }
th, td { padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; }
td:nth-child(n+3) { font-variant-numeric: tabular-nums; }
.state { padding: .1em .5em; border-radius: .8em; color: white; background: #868e96; }
.up { background: #2b8a3e; } .down { background: #c92a2a; } .pending, .added { background: #1971c2; }
.draining, .removed { background: #e67700; } .cooling { background: #9c36b5; }
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
}
