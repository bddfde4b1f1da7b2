//! The PROXY protocol (v1 text, v2 binary) on a `proxy_protocol = true` listener: who may send
//! the header (peers in `trusted_proxies`), reading it off the front of a connection within
//! bounds, the client address it carries, and the refusals, counted in
//! `fulcrum_proxy_protocol_refused_total{listener,reason}`.
//!
//! Parsing is the `ppp` crate's: it is small (its one dependency is `thiserror` 1), parses
//! both versions from a byte slice without I/O or panics, and tells "need more bytes" apart
//! from "never valid", which is what a header arriving in several segments needs (but for one
//! cut in its v1 parser, worked around in [`parse`]). The I/O around it is ours: the header is
//! read into a buffer that grows only as far as the header needs ([`V1_MAX_HEADER`],
//! [`V2_MAX_HEADER`]), and whatever the same reads brought past it (the request, or the TLS
//! ClientHello) is handed back in front of the stream by [`Rewind`].
//!
//! The header is read in the connection's own task (never the accept loop), bounded by the
//! listener's `header_read_timeout` from accept. A connection without a client address it can
//! vouch for is closed without a byte written, rather than served as if the L4 hop were the
//! client (which would put every client behind it on one `ip_hash` node and one
//! `X-Forwarded-For`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ipnet::IpNet;
use metrics::{Counter, counter};
use pin_project_lite::pin_project;
use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::base::metrics::PROXY_PROTOCOL_REFUSED_TOTAL;

/// The longest v1 header the protocol allows, `PROXY TCP6 <39> <39> <5> <5>\r\n`.
const V1_MAX_HEADER: usize = 107;
/// The longest v2 header fulcrum accepts: the 16 fixed bytes, the addresses and the TLVs.
/// The protocol allows 16 + 65535; HAProxy reads a received header into one buffer of
/// `tune.bufsize` (16 KiB by default), so no sender built to talk to HAProxy sends more, and a
/// header that says it is longer is refused as malformed rather than buffered.
const V2_MAX_HEADER: usize = 16 * 1024;
/// The first read's room: a v1 header, or a v2 header with its addresses and a few TLVs,
/// arrive in one read; a longer v2 header grows the buffer to its announced length.
const FIRST_READ: usize = 256;
/// The v2 signature (12 bytes) and the v1 prefix, to tell a broken header from none at all.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";

/// Why a connection was closed before it was served: the `reason` label of
/// `fulcrum_proxy_protocol_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer is not in the listener's `trusted_proxies`.
    Untrusted = 0,
    /// The connection did not start with a PROXY header (a plain request, a TLS hello).
    Missing = 1,
    /// It started like one but is not valid, is too long, or was cut short by the peer.
    Malformed = 2,
    /// The header was not complete within `header_read_timeout` of accept.
    Timeout = 3,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::Untrusted,
        Refusal::Missing,
        Refusal::Malformed,
        Refusal::Timeout,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::Untrusted => "untrusted",
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Timeout => "timeout",
        }
    }
}

/// What a header read came to, short of a client address.
#[derive(Debug, PartialEq, Eq)]
enum Failed {
    Refused(Refusal),
    /// The peer closed (or reset) before sending a byte: an L4 tier's TCP health check does
    /// this all day, so it is neither served nor counted.
    Silent,
}

/// One `proxy_protocol` listener's rule: whom it takes headers from, and its refusal counters.
#[derive(Debug)]
pub(crate) struct ProxyProtocol {
    listener: String,
    trusted: Box<[IpNet]>,
    refused: [Counter; Refusal::ALL.len()],
}

impl ProxyProtocol {
    /// The rule of listener `listener`, taking headers from peers in `trusted`.
    pub(crate) fn new(listener: &str, trusted: &[IpNet]) -> Self {
        Self {
            listener: listener.to_owned(),
            trusted: trusted.into(),
            refused: Refusal::ALL.map(|reason| {
                counter!(PROXY_PROTOCOL_REFUSED_TOTAL, "listener" => listener.to_owned(), "reason" => reason.as_str())
            }),
        }
    }

    /// Reads the PROXY header a connection from `peer` must start with, within `timeout`.
    /// Returns the stream (replaying what was read past the header) and the client the header
    /// names; `None` when the connection is to be closed unanswered (counted when refused).
    pub(crate) async fn accept<IO>(
        &self,
        mut io: IO,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Option<(Rewind<IO>, SocketAddr)>
    where
        IO: AsyncRead + Unpin,
    {
        let outcome = if self.trusts(peer.ip()) {
            match tokio::time::timeout(timeout, read_header(&mut io)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Failed::Refused(Refusal::Timeout)),
            }
        } else {
            Err(Failed::Refused(Refusal::Untrusted))
        };
        match outcome {
            Ok((source, rest)) => {
                let client = source.unwrap_or(peer);
                debug!(listener = %self.listener, %peer, %client, "PROXY header read");
                Some((Rewind::with_prefix(io, rest), client))
            }
            Err(Failed::Refused(reason)) => {
                self.refused[reason as usize].increment(1);
                debug!(listener = %self.listener, %peer, reason = reason.as_str(), "PROXY protocol: connection refused");
                None
            }
            Err(Failed::Silent) => {
                debug!(listener = %self.listener, %peer, "closed before sending a PROXY header");
                None
            }
        }
    }

    fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted.iter().any(|net| net.contains(&peer))
    }
}

/// Reads one header off `io`: the source address it carries (`None`: keep the peer's) and the
/// bytes read past it.
async fn read_header<IO: AsyncRead + Unpin>(
    io: &mut IO,
) -> Result<(Option<SocketAddr>, Bytes), Failed> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    loop {
        let read = io.read_buf(&mut buf).await;
        if matches!(read, Ok(0) | Err(_)) {
            return Err(if buf.is_empty() {
                Failed::Silent
            } else {
                Failed::Refused(Refusal::Malformed)
            });
        }
        match parse(&buf) {
            Parsed::Header { len, source } => {
                buf.advance(len);
                return Ok((source, buf.freeze()));
            }
            Parsed::NeedMore(total) if total > V2_MAX_HEADER => {
                return Err(Failed::Refused(Refusal::Malformed));
            }
            Parsed::NeedMore(total) => buf.reserve(total.saturating_sub(buf.len()).max(1)),
            Parsed::Refused(reason) => return Err(Failed::Refused(reason)),
        }
    }
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A complete header of `len` bytes naming `source` (`None`: keep the peer's address).
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    /// Not yet decided: at least this many bytes in all are needed (a guess until a v2
    /// header's length is known).
    NeedMore(usize),
    Refused(Refusal),
}

fn parse(buf: &[u8]) -> Parsed {
    // ppp takes a v1 line cut right after the space before its last field for a broken one
    // (an empty port), so a v1 header is parsed only once its line is complete (or can no
    // longer be).
    if buf.starts_with(V1_PREFIX) && !buf.contains(&b'\n') && buf.len() < V1_MAX_HEADER {
        return Parsed::NeedMore(buf.len() + 1);
    }
    match HeaderResult::parse(buf) {
        HeaderResult::V2(Ok(header)) => Parsed::Header {
            len: header.len(),
            source: v2_source(&header),
        },
        HeaderResult::V1(Ok(header)) => Parsed::Header {
            len: header.header.len(),
            source: v1_source(&header.addresses),
        },
        result if result.is_incomplete() => Parsed::NeedMore(needed(buf)),
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => {
            Parsed::Refused(if looks_like_header(buf) {
                Refusal::Malformed
            } else {
                Refusal::Missing
            })
        }
    }
}

/// How many bytes the header needs in all, as far as the bytes so far tell: a v2 header's
/// announced length once its fixed part is in, otherwise one more byte than there is (a v1
/// header is decided by [`V1_MAX_HEADER`] bytes, which the buffer already has room for).
fn needed(buf: &[u8]) -> usize {
    match buf.get(14..16) {
        Some(&[hi, lo]) if buf.starts_with(V2_SIGNATURE) => {
            16 + usize::from(u16::from_be_bytes([hi, lo]))
        }
        _ => (buf.len() + 1).min(V1_MAX_HEADER),
    }
}

/// Whether the bytes begin as a PROXY header would (so a failure is a broken header, not a
/// missing one).
fn looks_like_header(buf: &[u8]) -> bool {
    buf.starts_with(V2_SIGNATURE) || buf.starts_with(V1_PREFIX)
}

/// A v1 header's source; `UNKNOWN` keeps the peer's address, as the protocol asks.
fn v1_source(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v1::Addresses::Tcp6(a) => Some(canonical(a.source_address.into(), a.source_port)),
        v1::Addresses::Unknown => None,
    }
}

/// A v2 header's source. `LOCAL` (the L4 tier's own connections, its health checks) and the
/// unspecified and unix families keep the peer's address; TLVs are skipped.
fn v2_source(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match &header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        v2::Addresses::IPv6(a) => Some(canonical(a.source_address.into(), a.source_port)),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

/// A v4-mapped IPv6 source is its IPv4 client (as a v4-mapped peer is elsewhere).
fn canonical(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.to_canonical(), port)
}

pin_project! {
    /// A stream that first yields bytes already read off it (what came in past a PROXY
    /// header), then reads on. Without such bytes it is the stream itself, at the cost of one
    /// length check per read.
    pub(crate) struct Rewind<IO> {
        prefix: Bytes,
        #[pin]
        inner: IO,
    }
}

impl<IO> Rewind<IO> {
    /// `inner` with nothing to replay.
    pub(crate) fn new(inner: IO) -> Self {
        Self::with_prefix(inner, Bytes::new())
    }

    /// `inner`, with `prefix` read first.
    pub(crate) fn with_prefix(inner: IO, prefix: Bytes) -> Self {
        Self { prefix, inner }
    }

    /// The stream, and what of the prefix has not been read.
    pub(crate) fn into_parts(self) -> (IO, Bytes) {
        (self.inner, self.prefix)
    }

    /// Whether bytes of the prefix are still to be read.
    pub(crate) fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    pub(crate) fn get_ref(&self) -> &IO {
        &self.inner
    }

    pub(crate) fn get_mut(&mut self) -> &mut IO {
        &mut self.inner
    }
}

impl<IO: AsyncRead> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.is_empty() {
            return this.inner.poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix.split_to(n));
        if this.prefix.is_empty() {
            // An empty view still holds the buffer it was cut from.
            *this.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        let len = u16::try_from(addresses.len() + tlvs.len()).unwrap();
        out.extend(len.to_be_bytes());
        out.extend(addresses);
        out.extend(tlvs);
        out
    }

    const V4_ADDRS: [u8; 12] = [203, 0, 113, 7, 10, 0, 0, 1, 0xC3, 0x50, 0, 80];

    #[test]
    fn v1_tcp4_names_its_source_and_leaves_the_request() {
        let input = b"PROXY TCP4 203.0.113.7 10.0.0.1 50000 80\r\nGET / HTTP/1.1\r\n";
        let Parsed::Header { len, source } = parse(input) else {
            panic!("{:?}", parse(input));
        };
        assert_eq!(source, Some("203.0.113.7:50000".parse().unwrap()));
        assert_eq!(&input[len..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn v1_tcp6_v4_mapped_source_is_its_v4_address() {
        let input = b"PROXY TCP6 ::ffff:203.0.113.7 ::1 50000 80\r\n";
        assert_eq!(
            parse(input),
            Parsed::Header {
                len: input.len(),
                source: Some("203.0.113.7:50000".parse().unwrap())
            }
        );
    }

    #[test]
    fn v1_unknown_keeps_the_peer() {
        let input = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            parse(input),
            Parsed::Header {
                len: input.len(),
                source: None
            }
        );
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let v1 = b"PROXY TCP6 2001:db8::1 2001:db8::2 50000 443\r\n".to_vec();
        let v2 = v2(1, 0x11, &V4_ADDRS, &[]);
        for header in [v1, v2] {
            for end in 1..header.len() {
                assert!(
                    matches!(parse(&header[..end]), Parsed::NeedMore(n) if n > end),
                    "{:?} -> {:?}",
                    &header[..end],
                    parse(&header[..end])
                );
            }
        }
    }

    #[test]
    fn v2_local_keeps_the_peer_and_tlvs_are_skipped() {
        let tlvs = [0x04, 0, 3, b'a', b'b', b'c'];
        let local = v2(0, 0x11, &V4_ADDRS, &tlvs);
        assert_eq!(
            parse(&local),
            Parsed::Header {
                len: local.len(),
                source: None
            }
        );
        let mut proxied = v2(1, 0x11, &V4_ADDRS, &tlvs);
        proxied.extend(b"GET");
        assert_eq!(
            parse(&proxied),
            Parsed::Header {
                len: proxied.len() - 3,
                source: Some("203.0.113.7:50000".parse().unwrap())
            }
        );
    }

    #[test]
    fn v2_unspecified_and_unix_families_keep_the_peer() {
        let unspec = v2(1, 0x00, &[], &[]);
        assert_eq!(
            parse(&unspec),
            Parsed::Header {
                len: 16,
                source: None
            }
        );
        let unix = v2(1, 0x31, &[0; 216], &[]);
        assert_eq!(
            parse(&unix),
            Parsed::Header {
                len: unix.len(),
                source: None
            }
        );
    }

    #[test]
    fn a_v2_length_past_the_cap_is_known_from_the_fixed_part() {
        let mut header = v2(1, 0x11, &V4_ADDRS, &[]);
        header[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&header), Parsed::NeedMore(16 + 65535));
    }

    #[test]
    fn broken_headers_are_malformed_and_anything_else_is_missing() {
        let malformed: [&[u8]; 4] = [
            b"PROXY TCP4 203.0.113.300 10.0.0.1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\n",
            &[V2_SIGNATURE, &[0x31, 0x11, 0, 12]].concat(),
        ];
        for input in malformed {
            assert_eq!(
                parse(input),
                Parsed::Refused(Refusal::Malformed),
                "{input:?}"
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Parsed::Refused(Refusal::Malformed));
        for input in [
            b"GET / HTTP/1.1\r\n".as_slice(),
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
        ] {
            assert_eq!(parse(input), Parsed::Refused(Refusal::Missing), "{input:?}");
        }
    }

    #[tokio::test]
    async fn bytes_past_the_header_are_replayed_before_the_stream() {
        let (mut client, server) = tokio::io::duplex(1024);
        let rule = ProxyProtocol::new("t", &["127.0.0.1/32".parse().unwrap()]);
        tokio::io::AsyncWriteExt::write_all(
            &mut client,
            b"PROXY TCP4 203.0.113.7 10.0.0.1 50000 80\r\nGET",
        )
        .await
        .unwrap();
        let peer = "127.0.0.1:9".parse().unwrap();
        let (mut stream, from) = rule
            .accept(server, peer, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(from, "203.0.113.7:50000".parse().unwrap());
        tokio::io::AsyncWriteExt::write_all(&mut client, b" /")
            .await
            .unwrap();
        drop(client);
        let mut rest = String::new();
        stream.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "GET /");
    }
}
