//! The two line formats, written by the writer thread. JSON goes through `serde_json`, which
//! escapes every string; `combined` escapes as nginx does (`"`, `\`, control and non-ASCII
//! bytes as `\xHH`), so a header cannot forge a field or a line.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Version};
use serde::Serialize;

use super::{Record, Termination};
use crate::base::config::AccessLogFormat;

/// A reusable line buffer.
#[derive(Debug, Default)]
pub(super) struct Line(Vec<u8>);

impl Line {
    /// Formats `record` (which started at `time`) as its log asks, newline included.
    pub(super) fn write(&mut self, record: &Record, time: SystemTime) {
        self.0.clear();
        match record.log.format {
            AccessLogFormat::Json => self.json(record, time),
            AccessLogFormat::Combined => self.combined(record, time),
        }
        self.0.push(b'\n');
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn json(&mut self, r: &Record, time: SystemTime) {
        let line = Json {
            time: humantime::format_rfc3339_millis(time),
            listener: &r.listener,
            client: r.client,
            method: r.method.as_str(),
            host: r.host.as_ref().map(lossy),
            path: target(r),
            protocol: protocol(r.version),
            status: r.status,
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            pool: r.pool.as_deref(),
            backend: r.backend.as_deref(),
            attempts: r.attempts,
            sticky: r.sticky.map(|s| s.as_str()),
            connect_ms: r.connect.map(ms),
            ttfb_ms: r.ttfb.map(ms),
            duration_ms: ms(r.duration),
            request_id: r.request_id.as_ref().map(lossy),
            tls_version: r.tls.as_ref().map(|t| t.version),
            sni: r.tls.as_ref().and_then(|t| t.sni.as_deref()),
            termination: r.termination.unwrap_or(Termination::ClientAborted).as_str(),
        };
        // Writing into a Vec cannot fail, and every field is a plain string or number.
        let _ = serde_json::to_writer(&mut self.0, &line);
    }

    /// `client - - [time] "request" status bytes "referer" "user agent"`.
    fn combined(&mut self, r: &Record, time: SystemTime) {
        let mut text = String::with_capacity(256);
        let _ = write!(text, "{} - - [{}] \"", r.client, common_log_time(time));
        escape(&mut text, r.method.as_str().as_bytes());
        text.push(' ');
        escape(&mut text, target(r).as_bytes());
        let _ = write!(
            text,
            " {}\" {} {} \"",
            protocol(r.version),
            r.status,
            r.bytes_out
        );
        quoted_or_dash(&mut text, r.referer.as_ref());
        text.push_str("\" \"");
        quoted_or_dash(&mut text, r.user_agent.as_ref());
        text.push('"');
        self.0.extend_from_slice(text.as_bytes());
    }
}

/// Borrowed wherever it can be: the writer formats a line without allocating.
#[derive(Serialize)]
struct Json<'a> {
    #[serde(serialize_with = "display")]
    time: humantime::Rfc3339Timestamp,
    listener: &'a str,
    #[serde(serialize_with = "display")]
    client: IpAddr,
    method: &'a str,
    host: Option<Cow<'a, str>>,
    path: &'a str,
    protocol: &'static str,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    pool: Option<&'a str>,
    backend: Option<&'a str>,
    attempts: u32,
    sticky: Option<&'static str>,
    connect_ms: Option<f64>,
    ttfb_ms: Option<f64>,
    duration_ms: f64,
    request_id: Option<Cow<'a, str>>,
    tls_version: Option<&'static str>,
    sni: Option<&'a str>,
    termination: &'static str,
}

/// Milliseconds with microsecond resolution: loopback requests take well under one.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A value written as its `Display` form, straight into the line (escaped as a JSON string).
fn display<T: std::fmt::Display, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn lossy(value: &HeaderValue) -> Cow<'_, str> {
    String::from_utf8_lossy(value.as_bytes())
}

/// The path, with its query only when the log asks for it (queries often carry tokens).
fn target(r: &Record) -> &str {
    match r.uri.path_and_query() {
        Some(pq) if r.log.include_query => pq.as_str(),
        Some(pq) => pq.path(),
        None => "/",
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// `29/Nov/2026:22:16:27 +0000`, from the RFC 3339 form humantime writes (always UTC).
fn common_log_time(time: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // `YYYY-MM-DDTHH:MM:SSZ`
    let rfc = humantime::format_rfc3339_seconds(time).to_string();
    let part = |range: std::ops::Range<usize>| rfc.get(range).unwrap_or("00");
    let month = part(5..7)
        .parse::<usize>()
        .ok()
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{}/{}/{}:{} +0000",
        part(8..10),
        month,
        part(0..4),
        part(11..19)
    )
}

fn quoted_or_dash(out: &mut String, value: Option<&HeaderValue>) {
    match value {
        Some(v) if !v.is_empty() => escape(out, v.as_bytes()),
        _ => out.push('-'),
    }
}

/// nginx's access-log escaping: `"`, `\`, control bytes and bytes above 0x7e as `\xHH`.
fn escape(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_time_is_day_month_year_in_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_990_587);
        assert_eq!(common_log_time(t), "29/Nov/2026:22:16:27 +0000");
    }

    #[test]
    fn escaping_leaves_no_quote_backslash_or_control_byte() {
        let mut out = String::new();
        escape(&mut out, b"a\"b\\c\nd\x7f\xc3\xa9 e");
        assert_eq!(out, "a\\x22b\\x5Cc\\x0Ad\\x7F\\xC3\\xA9 e");
    }
}
