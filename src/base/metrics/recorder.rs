//! fulcrum's Prometheus recorder: the series `counter!`, `gauge!` and `histogram!` register, the
//! explicit removal of a node's series when it leaves its pool, and the text format `/metrics`
//! serves.
//!
//! Written by hand rather than taken from metrics-exporter-prometheus, because that exporter
//! (0.18) forgets a series only through its idle timeout and keeps its registry private: "this
//! node left the pool, drop its series now" cannot be said to it. An idle timeout is no
//! substitute either: it would keep a removed node's `fulcrum_backend_up` for the whole timeout,
//! and drop the `fulcrum_backend_up` of a healthy node, whose value never changes. metrics-util's
//! `Registry` can delete a key, but its histograms buffer samples for a later drain and it
//! brings no renderer, which is most of this file.
//!
//! The request path never reaches the map: a handle, once resolved, is an `Arc<AtomicU64>` for
//! counters and gauges (`metrics` implements the handle traits on it) or a fixed array of atomic
//! buckets for histograms, so recording is an atomic add with no lock and no lookup. The map
//! behind the mutex is touched only to register (when a snapshot is built, or a status code is
//! seen for the first time), to remove, and to render a scrape.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};

/// Upper bounds of histograms registered without a bucket list: Prometheus' own defaults.
const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process's series, their help text, and how to render them.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// Bucket upper bounds by histogram name; others get [`DEFAULT_BUCKETS`].
    buckets: &'static [(&'static str, &'static [f64])],
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// By metric name, so a scrape comes out in a stable order.
    families: BTreeMap<String, Family>,
    help: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    series: BTreeMap<Labels, Series>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Clone)]
enum Series {
    Counter(Arc<AtomicU64>),
    /// The `f64` value's bits.
    Gauge(Arc<AtomicU64>),
    Histogram(Arc<Buckets>),
}

/// A series' label pairs, in the order the code registered them (which is the order a scrape
/// shows them in).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Labels(Vec<(String, String)>);

impl Labels {
    /// The value of label `name`, if the series has it.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// The series something (a node, a pool) may still create after it was built: a counter per
/// status code, made when that code is first answered. [`Recorder::remove_series`] closes it
/// under the lock that removes the series, so a request still in flight on an old snapshot
/// cannot bring a removed series back; its handles keep working on series nobody renders.
#[derive(Debug, Default)]
pub(crate) struct Scope {
    closed: AtomicBool,
}

/// A histogram with fixed buckets: one atomic count per bucket (not cumulative; the renderer
/// sums them) and the sum of the values as `f64` bits.
#[derive(Debug)]
struct Buckets {
    bounds: &'static [f64],
    /// `bounds.len() + 1` counts; the last holds values above every bound (`le="+Inf"`).
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        // A NaN would poison the sum for good; nothing fulcrum measures can be one.
        if value.is_nan() {
            return;
        }
        // The first bound >= value: Prometheus buckets are "less than or equal".
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        // Cannot fail: the closure always returns `Some`.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }
}

/// A read-only view of one histogram's buckets, for the status page's p99: the counts the
/// request path already keeps, read by the control plane with no lock and no lookup.
#[derive(Debug, Clone, Default)]
pub(crate) struct HistogramReader(Option<Arc<Buckets>>);

impl HistogramReader {
    /// The buckets' upper bounds, ascending (empty for a histogram that records nowhere).
    pub(crate) fn bounds(&self) -> &'static [f64] {
        self.0.as_ref().map_or(&[], |buckets| buckets.bounds)
    }

    /// The per-bucket counts (not cumulative) into `counts`, one per bound and then the count
    /// above every bound.
    pub(crate) fn read_into(&self, counts: &mut Vec<u64>) {
        counts.clear();
        if let Some(buckets) = &self.0 {
            counts.extend(buckets.counts.iter().map(|c| c.load(Ordering::Relaxed)));
        }
    }
}

impl Recorder {
    /// A recorder with no series; `buckets` gives the histograms that want their own bounds
    /// (each list sorted ascending).
    pub(crate) const fn new(buckets: &'static [(&'static str, &'static [f64])]) -> Self {
        Self {
            buckets,
            inner: Mutex::new(Inner {
                families: BTreeMap::new(),
                help: BTreeMap::new(),
            }),
        }
    }

    /// A counter created on first use by something that may leave (see [`Scope`]); a closed
    /// scope gets a handle that counts nowhere.
    pub(crate) fn counter_in(&self, scope: &Scope, key: &Key) -> Counter {
        let mut inner = self.lock();
        if scope.closed.load(Ordering::Relaxed) {
            return Counter::noop();
        }
        match self.series(&mut inner, Kind::Counter, key) {
            Some(Series::Counter(value)) => Counter::from_arc(value),
            _ => Counter::noop(),
        }
    }

    /// A histogram handle for the request path and a reader of the same buckets.
    pub(crate) fn histogram_with_reader(&self, key: &Key) -> (Histogram, HistogramReader) {
        match self.register(Kind::Histogram, key) {
            Some(Series::Histogram(buckets)) => (
                Histogram::from_arc(buckets.clone()),
                HistogramReader(Some(buckets)),
            ),
            _ => (Histogram::noop(), HistogramReader::default()),
        }
    }

    /// The value of the gauge `name` whose labels `matches`, if one is registered. Takes the
    /// registry's lock: for the control plane, never the request path.
    pub(crate) fn gauge_value(&self, name: &str, matches: impl Fn(&Labels) -> bool) -> Option<f64> {
        let inner = self.lock();
        let family = inner.families.get(name)?;
        family
            .series
            .iter()
            .find_map(|(labels, series)| match series {
                Series::Gauge(bits) if matches(labels) => {
                    Some(f64::from_bits(bits.load(Ordering::Relaxed)))
                }
                _ => None,
            })
    }

    /// Takes every series whose labels `matches` out of the scrape, at once, and closes
    /// `scopes` so nothing registers under them again. Handles already held keep working and
    /// are simply no longer rendered; a later registration with the same labels starts a fresh
    /// series. Returns how many series were removed.
    pub(crate) fn remove_series(
        &self,
        scopes: &[&Scope],
        matches: impl Fn(&Labels) -> bool,
    ) -> usize {
        let mut inner = self.lock();
        for scope in scopes {
            scope.closed.store(true, Ordering::Relaxed);
        }
        let mut removed = 0;
        inner.families.retain(|_, family| {
            let before = family.series.len();
            family.series.retain(|labels, _| !matches(labels));
            removed += before - family.series.len();
            !family.series.is_empty()
        });
        removed
    }

    /// Takes the series of metric `name` whose labels `matches` out of the scrape: for series
    /// that belong to no [`Scope`] (a listener's certificates, set and replaced as a whole).
    pub(crate) fn remove_series_of(&self, name: &str, matches: impl Fn(&Labels) -> bool) -> usize {
        let mut inner = self.lock();
        let Some(family) = inner.families.get_mut(name) else {
            return 0;
        };
        let before = family.series.len();
        family.series.retain(|labels, _| !matches(labels));
        let removed = before - family.series.len();
        if family.series.is_empty() {
            inner.families.remove(name);
        }
        removed
    }

    /// The Prometheus text format (0.0.4): metrics by name, each with `# HELP` (when described)
    /// and `# TYPE`, then its series ordered by their labels.
    pub(crate) fn render(&self) -> String {
        let inner = self.lock();
        let mut out = String::with_capacity(inner.families.len() * 256);
        for (name, family) in &inner.families {
            if let Some(help) = inner.help.get(name) {
                out.push_str("# HELP ");
                out.push_str(name);
                out.push(' ');
                escape_help(help, &mut out);
                out.push('\n');
            }
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
            for (labels, series) in &family.series {
                match series {
                    Series::Counter(value) => {
                        sample(
                            &mut out,
                            name,
                            "",
                            labels,
                            NO_LE,
                            value.load(Ordering::Relaxed),
                        );
                    }
                    Series::Gauge(bits) => {
                        let value = f64::from_bits(bits.load(Ordering::Relaxed));
                        sample(&mut out, name, "", labels, NO_LE, Float(value));
                    }
                    Series::Histogram(buckets) => render_histogram(&mut out, name, labels, buckets),
                }
            }
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent across a panic elsewhere: every change is one call.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn describe(&self, name: &str, help: SharedString) {
        let name = sanitize(name, true);
        self.lock()
            .help
            .entry(name)
            .or_insert_with(|| help.to_string());
    }

    fn register(&self, kind: Kind, key: &Key) -> Option<Series> {
        let mut inner = self.lock();
        self.series(&mut inner, kind, key)
    }

    /// The series of `key`, created if new. `None` when the name is already a metric of
    /// another kind (a programming error the scrape must not repeat as a second `# TYPE`).
    fn series(&self, inner: &mut Inner, kind: Kind, key: &Key) -> Option<Series> {
        let name = sanitize(key.name(), true);
        let labels = Labels(
            key.labels()
                .map(|l| (sanitize(l.key(), false), l.value().to_owned()))
                .collect(),
        );
        let bounds = self
            .buckets
            .iter()
            .find(|(histogram, _)| *histogram == name)
            .map_or(DEFAULT_BUCKETS, |(_, bounds)| bounds);
        let family = inner.families.entry(name).or_insert_with(|| Family {
            kind,
            series: BTreeMap::new(),
        });
        if family.kind != kind {
            return None;
        }
        let series = family.series.entry(labels).or_insert_with(|| match kind {
            Kind::Counter => Series::Counter(Arc::new(AtomicU64::new(0))),
            Kind::Gauge => Series::Gauge(Arc::new(AtomicU64::new(0f64.to_bits()))),
            Kind::Histogram => Series::Histogram(Arc::new(Buckets::new(bounds))),
        });
        Some(series.clone())
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key.as_str(), description);
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key.as_str(), description);
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key.as_str(), description);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        match self.register(Kind::Counter, key) {
            Some(Series::Counter(value)) => Counter::from_arc(value),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        match self.register(Kind::Gauge, key) {
            Some(Series::Gauge(value)) => Gauge::from_arc(value),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        match self.register(Kind::Histogram, key) {
            Some(Series::Histogram(buckets)) => Histogram::from_arc(buckets),
            _ => Histogram::noop(),
        }
    }
}

fn render_histogram(out: &mut String, name: &str, labels: &Labels, buckets: &Buckets) {
    // One read per bucket; `_count` is their total, so it always equals the `+Inf` bucket.
    let mut cumulative = 0u64;
    for (bound, count) in buckets.bounds.iter().zip(buckets.counts.iter()) {
        cumulative += count.load(Ordering::Relaxed);
        sample(
            out,
            name,
            "_bucket",
            labels,
            Some(Float(*bound)),
            cumulative,
        );
    }
    if let Some(above) = buckets.counts.last() {
        cumulative += above.load(Ordering::Relaxed);
    }
    sample(out, name, "_bucket", labels, Some("+Inf"), cumulative);
    let sum = f64::from_bits(buckets.sum.load(Ordering::Relaxed));
    sample(out, name, "_sum", labels, NO_LE, Float(sum));
    sample(out, name, "_count", labels, NO_LE, cumulative);
}

/// No `le` label: every sample but a histogram bucket.
const NO_LE: Option<&str> = None;

/// One line: `name{labels,le="..."} value`.
fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &Labels,
    le: Option<impl Display>,
    value: impl Display,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.0.is_empty() || le.is_some() {
        out.push('{');
        for (i, (key, value)) in labels.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            escape_label_value(value, out);
            out.push('"');
        }
        if let Some(le) = le {
            if !labels.0.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "le=\"{le}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A sample value as Prometheus spells it (`+Inf`, `-Inf`, `NaN`; Rust says `inf`).
struct Float(f64);

impl Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

/// Label values: backslash, double quote and newline are escaped.
fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text: backslash and newline are escaped (a quote is fine there).
fn escape_help(help: &str, out: &mut String) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or label name (the same without `:`):
/// anything else becomes `_`, so a stray character cannot break the whole scrape.
fn sanitize(name: &str, colon_allowed: bool) -> String {
    let mut out: String = name
        .chars()
        .enumerate()
        .map(|(i, c)| {
            let ok = c.is_ascii_alphabetic()
                || c == '_'
                || (colon_allowed && c == ':')
                || (i > 0 && c.is_ascii_digit());
            if ok { c } else { '_' }
        })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::{Label, counter, describe_counter, gauge, histogram, with_local_recorder};

    const BOUNDS: &[f64] = &[0.25, 0.5, 2.0];

    fn recorder() -> Recorder {
        Recorder::new(&[("test_seconds", BOUNDS)])
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let r = recorder();
        with_local_recorder(&r, || {
            describe_counter!("test_total", "a \\ backslash\nand a \"quote\"");
            counter!("test_total", "path" => "C:\\dir \"x\"\nnext").increment(2);
        });
        assert_eq!(
            r.render(),
            "# HELP test_total a \\\\ backslash\\nand a \"quote\"\n\
             # TYPE test_total counter\n\
             test_total{path=\"C:\\\\dir \\\"x\\\"\\nnext\"} 2\n"
        );
    }

    #[test]
    fn a_histogram_renders_cumulative_buckets_sum_and_count() {
        let r = recorder();
        with_local_recorder(&r, || {
            let h = histogram!("test_seconds", "pool" => "p");
            // On a bound counts in that bucket ("less than or equal").
            h.record(0.25);
            h.record(0.375);
            h.record(1.5);
            h.record(8.0);
            h.record(f64::NAN);
        });
        assert_eq!(
            r.render(),
            "# TYPE test_seconds histogram\n\
             test_seconds_bucket{pool=\"p\",le=\"0.25\"} 1\n\
             test_seconds_bucket{pool=\"p\",le=\"0.5\"} 2\n\
             test_seconds_bucket{pool=\"p\",le=\"2\"} 3\n\
             test_seconds_bucket{pool=\"p\",le=\"+Inf\"} 4\n\
             test_seconds_sum{pool=\"p\"} 10.125\n\
             test_seconds_count{pool=\"p\"} 4\n"
        );
    }

    #[test]
    fn histograms_without_their_own_bounds_get_the_prometheus_defaults() {
        let r = recorder();
        with_local_recorder(&r, || histogram!("other_seconds").record(20.0));
        let text = r.render();
        assert!(
            text.contains("other_seconds_bucket{le=\"0.005\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("other_seconds_bucket{le=\"10\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("other_seconds_bucket{le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("other_seconds_count 1\n"), "{text}");
    }

    #[test]
    fn gauges_print_prometheus_floats() {
        let r = recorder();
        with_local_recorder(&r, || {
            gauge!("g", "v" => "half").set(0.5);
            gauge!("g", "v" => "inf").set(f64::INFINITY);
            gauge!("g", "v" => "nan").set(f64::NAN);
            gauge!("g", "v" => "one").set(1.0);
        });
        assert_eq!(
            r.render(),
            "# TYPE g gauge\n\
             g{v=\"half\"} 0.5\n\
             g{v=\"inf\"} +Inf\n\
             g{v=\"nan\"} NaN\n\
             g{v=\"one\"} 1\n"
        );
    }

    #[test]
    fn metrics_come_out_sorted_and_a_name_keeps_its_first_kind() {
        let r = recorder();
        with_local_recorder(&r, || {
            counter!("b_total").increment(1);
            counter!("a_total", "x" => "2").increment(1);
            counter!("a_total", "x" => "1").increment(1);
            gauge!("b_total").set(5.0);
            counter!("bad-name.total").increment(1);
        });
        assert_eq!(
            r.render(),
            "# TYPE a_total counter\n\
             a_total{x=\"1\"} 1\n\
             a_total{x=\"2\"} 1\n\
             # TYPE b_total counter\n\
             b_total 1\n\
             # TYPE bad_name_total counter\n\
             bad_name_total 1\n"
        );
    }

    #[test]
    fn removed_series_leave_at_once_and_come_back_fresh() {
        let r = recorder();
        let (gone, kept) = with_local_recorder(&r, || {
            let gone = counter!("c_total", "pool" => "p", "backend" => "a");
            let kept = counter!("c_total", "pool" => "p", "backend" => "b");
            gauge!("up", "pool" => "p", "backend" => "a").set(1.0);
            (gone, kept)
        });
        gone.increment(5);
        kept.increment(1);
        let removed = r.remove_series(&[], |l| {
            l.get("pool") == Some("p") && l.get("backend") == Some("a")
        });
        assert_eq!(removed, 2);
        // The held handle still works; nobody renders it.
        gone.increment(1);
        assert_eq!(
            r.render(),
            "# TYPE c_total counter\nc_total{pool=\"p\",backend=\"b\"} 1\n",
            "an emptied metric loses its TYPE line too"
        );
        let again =
            with_local_recorder(&r, || counter!("c_total", "pool" => "p", "backend" => "a"));
        again.increment(1);
        assert!(
            r.render().contains("c_total{pool=\"p\",backend=\"a\"} 1\n"),
            "a new series starts at zero"
        );
    }

    #[test]
    fn a_closed_scope_registers_nothing_more() {
        let r = recorder();
        let scope = Scope::default();
        let key = |code: &str| {
            Key::from_parts(
                "r_total",
                vec![
                    Label::new("backend", "a"),
                    Label::new("code", code.to_owned()),
                ],
            )
        };
        r.counter_in(&scope, &key("200")).increment(1);
        r.remove_series(&[&scope], |l| l.get("backend") == Some("a"));
        // A request in flight on the old snapshot answers a status never seen before.
        r.counter_in(&scope, &key("502")).increment(1);
        assert_eq!(r.render(), "");
        let fresh = Scope::default();
        r.counter_in(&fresh, &key("502")).increment(1);
        assert_eq!(
            r.render(),
            "# TYPE r_total counter\nr_total{backend=\"a\",code=\"502\"} 1\n"
        );
    }
}
