//! Header rules of the proxy path, as pure functions over `http` types.
//!
//! Hop-by-hop headers describe one connection and must not cross the proxy (RFC 9110 §7.6.1);
//! the `X-Forwarded-*` family (and RFC 7239 `Forwarded` when enabled) tells the backend who the
//! client was.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Version, request};
use ipnet::IpNet;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection (RFC 9110 §7.6.1), plus the legacy ones still seen.
static HOP_BY_HOP: [&HeaderName; 8] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TE,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
///
/// `TE: trailers` survives on requests when `keep_te_trailers` is set: it is end-to-end in
/// practice (gRPC needs it to reach the server). `Trailer` is end-to-end (RFC 9110 §6.6.2; only
/// RFC 2616 listed it as hop-by-hop) and stays: hyper sends an HTTP/1.1 trailer field only if
/// `Trailer` declares it. `Upgrade` goes; [`keep_upgrade`] puts it back for a passed-through
/// upgrade.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // One pass over the few names finds which are present: most heads carry none, HTTP/1.1
    // browsers just `Connection: keep-alive`, and removing an absent name still costs a hash.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let has = |name: &HeaderName| {
        HOP_BY_HOP
            .iter()
            .position(|h| *h == name)
            .is_some_and(|i| present & (1 << i) != 0)
    };
    if has(&header::CONNECTION) {
        // Collected first: the names borrow from the Connection values about to go. Tokens
        // that are hop-by-hop anyway (`keep-alive`, `upgrade`) or not headers (`close`) are
        // skipped, so the usual `Connection` value allocates nothing.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|token| {
                !token.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| h.as_str().eq_ignore_ascii_case(token))
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let te_trailers = keep_te_trailers
        && has(&header::TE)
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade`, listed in `Connection` as
/// RFC 9110 §7.8 requires), if fulcrum passes it through to the backend. `h2c` is not: it is
/// about the client's hop only, and fulcrum already speaks HTTP/2 to clients.
pub fn upgrade_protocol(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let any_token = |name: &HeaderName, pred: fn(&str) -> bool| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(pred)
    };
    if !any_token(&header::CONNECTION, |t| t.eq_ignore_ascii_case("upgrade"))
        || !headers.contains_key(header::UPGRADE)
        || any_token(&header::UPGRADE, |p| {
            p.is_empty() || p.eq_ignore_ascii_case("h2c")
        })
    {
        return None;
    }
    headers.get(header::UPGRADE).cloned()
}

/// Marks a head as a protocol switch to `protocol`, after [`remove_hop_by_hop`] took the
/// client's (or backend's) `Connection` and `Upgrade` away.
pub fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Who is asking, as the backend should be told.
#[derive(Debug, Clone, Copy)]
pub struct ForwardedFor {
    /// The peer of the client connection (what `X-Forwarded-For` appends).
    pub peer: IpAddr,
    /// `"http"` or `"https"`.
    pub proto: &'static str,
    /// Also write an RFC 7239 `Forwarded` element.
    pub rfc7239: bool,
}

/// Turns a client request head into the head sent upstream: HTTP/1.1 with the client's Host
/// preserved, hop-by-hop headers removed and forwarding headers set. The URI is left alone;
/// [`upstream_uri`] makes one per attempt.
pub fn upstream_head(parts: &mut request::Parts, fwd: ForwardedFor) {
    // HTTP/2's :authority and an absolute-form request target name the host; Host must agree
    // (RFC 9112 §3.2.2, RFC 9113 §8.3.1), and HTTP/1.1 backends read Host.
    if let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    remove_hop_by_hop(&mut parts.headers, true);
    // fulcrum already answered `100 Continue` when it started reading the body.
    parts.headers.remove(header::EXPECT);
    set_forwarding(&mut parts.headers, fwd);
    parts.version = Version::HTTP_11;
}

/// `http://BACKEND/path?query`: the absolute URI the pooled client needs to pick a connection;
/// it sends the origin form on the wire.
#[expect(
    clippy::expect_used,
    reason = "scheme, authority and path make a valid URI"
)]
pub fn upstream_uri(backend: &Authority, client_uri: &Uri) -> Uri {
    let path = client_uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(backend.clone());
    uri.path_and_query = Some(path);
    Uri::from_parts(uri).expect("scheme, authority and path make a valid URI")
}

/// `/path?query`: the request target sent over a backend connection of our own.
pub fn origin_form(client_uri: &Uri) -> Uri {
    if client_uri.scheme().is_none() && client_uri.authority().is_none() {
        return client_uri.clone();
    }
    let path = client_uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
}

/// Appends the peer to `X-Forwarded-For`, sets `X-Forwarded-Proto` and `X-Forwarded-Host`, and
/// appends a `Forwarded` element when enabled.
pub fn set_forwarding(headers: &mut HeaderMap, fwd: ForwardedFor) {
    // hyper sizes a parsed head's map to its headers: growing it once here beats the rehash
    // the third new name would otherwise trigger.
    headers.reserve(4);
    let host = headers.get(header::HOST).cloned();
    // An IPv6 address is at most 39 characters.
    append_element(headers, &X_FORWARDED_FOR, 39, |buf| write_ip(buf, fwd.peer));
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(fwd.proto),
    );
    match &host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    if fwd.rfc7239 {
        let element = Rfc7239Element {
            fwd,
            host: host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .filter(|h| !h.contains('"')),
        };
        append_element(headers, &header::FORWARDED, 64, |buf| {
            // Writing into a BytesMut cannot fail.
            let _ = write!(buf, "{element}");
        });
    }
}

/// Joins a header's existing values and one new element into a single comma-separated value;
/// `write_element` writes the element (at most about `element_len` bytes) straight into the
/// header's buffer.
fn append_element(
    headers: &mut HeaderMap,
    name: &HeaderName,
    element_len: usize,
    write_element: impl FnOnce(&mut BytesMut),
) {
    let existing: usize = headers.get_all(name).iter().map(|v| v.len() + 2).sum();
    let mut joined = BytesMut::with_capacity(existing + element_len);
    for value in headers.get_all(name) {
        joined.put_slice(value.as_bytes());
        joined.put_slice(b", ");
    }
    write_element(&mut joined);
    headers.insert(name.clone(), header_value(joined));
}

/// An address as `X-Forwarded-For` lists it. IPv4 is written by hand: `core::fmt` spent more
/// instructions on those four numbers than the rest of the head rewrite.
fn write_ip(buf: &mut BytesMut, ip: IpAddr) {
    let IpAddr::V4(ip) = ip else {
        // Writing into a BytesMut cannot fail.
        let _ = write!(buf, "{ip}");
        return;
    };
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf.put_u8(b'.');
        }
        if octet >= 100 {
            buf.put_u8(b'0' + octet / 100);
        }
        if octet >= 10 {
            buf.put_u8(b'0' + octet / 10 % 10);
        }
        buf.put_u8(b'0' + octet % 10);
    }
}

/// `for=...;proto=...;host="..."` (RFC 7239 §4).
struct Rfc7239Element<'a> {
    fwd: ForwardedFor,
    host: Option<&'a str>,
}

impl fmt::Display for Rfc7239Element<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fwd.peer {
            IpAddr::V4(ip) => write!(f, "for={ip}")?,
            // IPv6 contains ':' and must be a quoted, bracketed string (RFC 7239 §6).
            IpAddr::V6(ip) => write!(f, "for=\"[{ip}]\"")?,
        }
        write!(f, ";proto={}", self.fwd.proto)?;
        if let Some(host) = self.host {
            write!(f, ";host=\"{host}\"")?;
        }
        Ok(())
    }
}

/// HTTP/2 may split `Cookie` into several fields; HTTP/1.1 wants one joined by "; "
/// (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = BytesMut::new();
    for (i, value) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.put_slice(b"; ");
        }
        joined.put_slice(value.as_bytes());
    }
    headers.insert(header::COOKIE, header_value(joined));
}

/// Built only from bytes of existing header values plus ASCII, so always valid.
#[expect(clippy::expect_used, reason = "joined header values stay valid")]
fn header_value(bytes: BytesMut) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes.freeze()).expect("joined header values stay valid")
}

/// The client a request is from: the peer, unless the peer is a trusted proxy; then the
/// `X-Forwarded-For` hops are walked from the right, past every trusted address, to the first
/// untrusted one (the leftmost if all are trusted). An unparseable hop ends the walk at the
/// last address that could be read: what lies beyond it cannot be vouched for.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(&client) {
        return client;
    }
    // Later header lines are further right: walk them in reverse too.
    let hops = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .flat_map(|line| line.as_bytes().rsplit(|&b| b == b','));
    for hop in hops {
        let Some(ip) = std::str::from_utf8(hop.trim_ascii())
            .ok()
            .and_then(|text| text.parse::<IpAddr>().ok())
        else {
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            break;
        }
    }
    client
}

/// The request id header, sent to the backend and written to the access log.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client `X-Request-Id` kept: room for any UUID, trace id or a composite of
/// them, short enough that a log line stays a line.
pub const MAX_REQUEST_ID: usize = 200;

/// The request's id: the client's `X-Request-Id` when there is exactly one and it is 1 to
/// [`MAX_REQUEST_ID`] visible ASCII characters, else a generated one that replaces whatever
/// the client sent. A value with spaces, control or non-ASCII bytes could forge log fields in
/// systems that log it less carefully than fulcrum, so it is not passed on.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(value), None) = (values.next(), values.next())
        && is_sane_request_id(value.as_bytes())
    {
        return value.clone();
    }
    let id = generate_request_id();
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

fn is_sane_request_id(value: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&value.len()) && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new id: 32 hex digits, a random 64-bit prefix drawn once per process followed by a
/// 64-bit counter. One atomic add per id, no system call and no lock, yet unique across
/// balancers and restarts (two processes share a prefix with odds of 1 in 2^64) and, within
/// one process, sortable in arrival order, which helps more when reading logs than a fully
/// random id would. It is an id, not a secret: nothing trusts it.
fn generate_request_id() -> HeaderValue {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        getrandom::u64().unwrap_or_else(|_| {
            // No entropy source: the time and the pid still differ between processes.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 32)
        })
    });
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // By hand: `write!` with `{:016x}` cost ~1,100 instructions per request, this ~100.
    let id = (u128::from(prefix) << 64) | u128::from(count);
    let mut hex = [0u8; 32];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    header_value(BytesMut::from(&hex[..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn head(raw: &[(&str, &str)]) -> request::Parts {
        let mut builder = http::Request::builder().uri("/path?q=1");
        for (k, v) in raw {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    const FWD: ForwardedFor = ForwardedFor {
        peer: IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7)),
        proto: "http",
        rfc7239: false,
    };

    #[test]
    fn client_ip_walks_forwarded_for_only_through_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = |lines: &[&str]| {
            let raw: Vec<(&str, &str)> = lines.iter().map(|l| ("x-forwarded-for", *l)).collect();
            head(&raw).headers
        };
        let spoofed = xff(&["1.1.1.1"]);
        assert_eq!(
            client_ip(ip("192.0.2.9"), &spoofed, &trusted),
            ip("192.0.2.9"),
            "an untrusted peer's XFF is ignored"
        );
        assert_eq!(client_ip(ip("10.0.0.1"), &spoofed, &trusted), ip("1.1.1.1"));
        // Right to left past trusted hops, across header lines; the client's own claim
        // (leftmost) is not believed over the hop a trusted proxy recorded.
        let chain = xff(&["6.6.6.6, 2.2.2.2", "10.1.1.1 ,10.2.2.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &chain, &trusted), ip("2.2.2.2"));
        let all_trusted = xff(&["10.9.9.9, 10.1.1.1"]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &all_trusted, &trusted),
            ip("10.9.9.9")
        );
        let garbled = xff(&["2.2.2.2, nonsense, 10.1.1.1"]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &garbled, &trusted),
            ip("10.1.1.1")
        );
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.1"), &spoofed, &trusted),
            ip("1.1.1.1"),
            "a v4-mapped peer is its v4 address"
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn forwarded_for_writes_every_ipv4_octet_width_and_joins_earlier_hops() {
        for peer in ["0.0.0.0", "255.255.255.255", "10.1.100.9", "192.0.2.60"] {
            let mut headers = HeaderMap::new();
            let fwd = ForwardedFor {
                peer: peer.parse().unwrap(),
                ..FWD
            };
            set_forwarding(&mut headers, fwd);
            assert_eq!(headers[&X_FORWARDED_FOR], peer);
        }
        let mut headers = head(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
        ])
        .headers;
        set_forwarding(&mut headers, FWD);
        assert_eq!(headers[&X_FORWARDED_FOR], "1.2.3.4, 5.6.7.8, 10.0.0.7");
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut parts = head(&[
            ("host", "example.com:8080"),
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
            ("te", "gzip, trailers"),
            ("trailer", "x-checksum"),
            ("x-kept", "yes"),
        ]);
        upstream_head(&mut parts, FWD);
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(
                !parts.headers.contains_key(gone),
                "{gone} should be removed"
            );
        }
        assert_eq!(parts.headers["te"], "trailers");
        assert_eq!(parts.headers["trailer"], "x-checksum", "end-to-end");
        assert_eq!(parts.headers["x-kept"], "yes");
        assert_eq!(parts.headers["host"], "example.com:8080");
        assert_eq!(parts.headers["x-forwarded-host"], "example.com:8080");
        assert_eq!(
            upstream_uri(&Authority::from_static("127.0.0.1:9001"), &parts.uri),
            "http://127.0.0.1:9001/path?q=1"
        );
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn absolute_form_target_overrides_host() {
        let mut parts = http::Request::get("http://real.example/x")
            .header("host", "spoofed")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        upstream_head(&mut parts, FWD);
        assert_eq!(parts.headers["host"], "real.example");
        assert_eq!(
            upstream_uri(&Authority::from_static("127.0.0.1:9001"), &parts.uri),
            "http://127.0.0.1:9001/x"
        );
    }

    #[test]
    fn only_http11_upgrades_listed_in_connection_pass_and_never_h2c() {
        let upgrade = |version, raw: &[(&str, &str)]| {
            upgrade_protocol(version, &head(raw).headers).map(|v| v.to_str().unwrap().to_owned())
        };
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert_eq!(upgrade(Version::HTTP_11, &ws).as_deref(), Some("websocket"));
        assert_eq!(upgrade(Version::HTTP_2, &ws), None);
        assert_eq!(upgrade(Version::HTTP_10, &ws), None);
        assert_eq!(upgrade(Version::HTTP_11, &[("upgrade", "websocket")]), None);
        assert_eq!(
            upgrade(
                Version::HTTP_11,
                &[("connection", "upgrade"), ("upgrade", "h2c")]
            ),
            None
        );

        let mut headers = head(&ws).headers;
        remove_hop_by_hop(&mut headers, false);
        keep_upgrade(&mut headers, HeaderValue::from_static("websocket"));
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
    }

    #[test]
    fn sane_request_ids_are_kept_and_others_replaced() {
        let ok = "a".repeat(MAX_REQUEST_ID);
        for (sent, kept) in [
            (ok.as_str(), true),
            ("abc-123_~!", true),
            ("", false),
            ("has space", false),
            ("tab\tx", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(&X_REQUEST_ID, HeaderValue::from_str(sent).unwrap());
            let id = request_id(&mut headers);
            assert_eq!(id == sent, kept, "{sent:?} -> {id:?}");
            assert_eq!(headers.get_all(&X_REQUEST_ID).iter().count(), 1);
            assert_eq!(headers[&X_REQUEST_ID], id);
        }
        let mut too_long = HeaderMap::new();
        too_long.insert(
            &X_REQUEST_ID,
            HeaderValue::from_str(&format!("{ok}a")).unwrap(),
        );
        assert_eq!(request_id(&mut too_long).len(), 32);
        let mut non_ascii = HeaderMap::new();
        non_ascii.insert(
            &X_REQUEST_ID,
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert_eq!(request_id(&mut non_ascii).len(), 32);
        let mut two = HeaderMap::new();
        two.append(&X_REQUEST_ID, HeaderValue::from_static("a"));
        two.append(&X_REQUEST_ID, HeaderValue::from_static("b"));
        assert_eq!(request_id(&mut two).len(), 32);
        let (a, b) = (
            request_id(&mut HeaderMap::new()),
            request_id(&mut HeaderMap::new()),
        );
        assert_ne!(a, b);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit), "{a:?}");
        // One prefix per process, then the count: ids sort in the order they were made.
        let hex = |id: &HeaderValue| u128::from_str_radix(id.to_str().unwrap(), 16).unwrap();
        assert_eq!(hex(&a) >> 64, hex(&b) >> 64, "{a:?} {b:?}");
        assert!(hex(&a) < hex(&b), "{a:?} {b:?}");
        assert_eq!(
            a.to_str().unwrap(),
            a.to_str().unwrap().to_ascii_lowercase()
        );
    }

    #[test]
    fn te_without_trailers_is_removed() {
        let mut headers = head(&[("te", "gzip")]).headers;
        remove_hop_by_hop(&mut headers, true);
        assert!(!headers.contains_key("te"));
    }

    #[test]
    fn appends_to_existing_forwarded_for() {
        let mut parts = head(&[
            ("host", "a"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        upstream_head(&mut parts, FWD);
        assert_eq!(
            parts.headers["x-forwarded-for"],
            "1.1.1.1, 2.2.2.2, 10.0.0.7"
        );
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
    }

    #[test]
    fn rfc7239_quotes_ipv6() {
        let mut headers = head(&[("host", "example.com")]).headers;
        let fwd = ForwardedFor {
            peer: IpAddr::V6(Ipv6Addr::LOCALHOST),
            proto: "https",
            rfc7239: true,
        };
        set_forwarding(&mut headers, fwd);
        assert_eq!(
            headers["forwarded"],
            "for=\"[::1]\";proto=https;host=\"example.com\""
        );
    }

    #[test]
    fn http2_cookies_are_joined_and_host_comes_from_authority() {
        let mut parts = http::Request::builder()
            .version(Version::HTTP_2)
            .uri("https://shop.example/cart")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        upstream_head(&mut parts, FWD);
        assert_eq!(parts.headers["cookie"], "a=1; b=2");
        assert_eq!(parts.headers["host"], "shop.example");
        assert_eq!(
            upstream_uri(&Authority::from_static("127.0.0.1:9001"), &parts.uri),
            "http://127.0.0.1:9001/cart"
        );
    }
}
