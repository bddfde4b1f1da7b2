//! A `proxy_protocol = true` listener behind an L4 tier: the client a trusted peer's PROXY v1 or
//! v2 header names is the client for `X-Forwarded-For` and `ip_hash`; a connection from anyone
//! else, or without a valid header, is closed without a byte of answer and counted in
//! `fulcrum_proxy_protocol_refused_total`. Raw headers over real sockets, a TLS listener, and a
//! real HAProxy in TCP mode with `send-proxy-v2`.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use fulcrum::Running;
use fulcrum::balance::{Pick, client_key};
use http::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use support::haproxy::Haproxy;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The L4 hop the listeners trust; clients elsewhere on loopback are not it.
const PROXY: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// What follows a PROXY header: a request whose answer ends with the connection.
const REQUEST: &[u8] = b"GET /echo HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n";

/// The listener lines that turn PROXY protocol on, trusting [`PROXY`] only.
fn proxied(extra: &str) -> String {
    format!("proxy_protocol = true\ntrusted_proxies = [\"{PROXY}/32\"]\n{extra}")
}

/// A balancer over `nodes` whose listener, named like the pool (metrics are per process, so
/// each test counts on a listener of its own), takes PROXY headers from [`PROXY`].
async fn balancer_behind_l4(
    pool: &str,
    strategy: &str,
    nodes: &[fulcrum::webnode::WebNode],
    extra: &str,
) -> Running {
    let toml = single_pool(pool, strategy, &nodes_as_backends(nodes), "").replace(
        "name = \"http\"\n",
        &format!("name = \"{pool}\"\n{}", proxied(extra)),
    );
    balancer(&toml).await
}

/// The destination a header names: fulcrum ignores it, but it is of the source's family.
fn dst_for(src: SocketAddr) -> SocketAddr {
    if src.is_ipv4() {
        sock("127.0.0.1:80")
    } else {
        sock("[::1]:80")
    }
}

fn v1(src: SocketAddr) -> Vec<u8> {
    let dst = dst_for(src);
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    let (s, d) = (src.ip(), dst.ip());
    format!("PROXY {family} {s} {d} {} {}\r\n", src.port(), dst.port()).into_bytes()
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 header: `command` 0 is LOCAL, 1 is PROXY; `tlvs` go after the addresses.
fn v2(command: u8, src: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let dst = dst_for(src);
    let mut addresses = Vec::new();
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addresses.extend(s.octets());
            addresses.extend(d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            addresses.extend(s.octets());
            addresses.extend(d.octets());
            0x21
        }
        _ => panic!("one family per header"),
    };
    addresses.extend(src.port().to_be_bytes());
    addresses.extend(dst.port().to_be_bytes());
    let mut out = V2_SIGNATURE.to_vec();
    out.extend([0x20 | command, family]);
    let len = u16::try_from(addresses.len() + tlvs.len()).unwrap();
    out.extend(len.to_be_bytes());
    out.extend(addresses);
    out.extend(tlvs);
    out
}

fn sock(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A connection to `addr` from the loopback address `source`.
async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Writes each chunk as its own TCP segment: with Nagle off, a pause between writes lets each
/// leave alone, so the server's reads see the header in pieces.
async fn write_in_pieces(stream: &mut TcpStream, chunks: &[&[u8]]) {
    stream.set_nodelay(true).unwrap();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        stream.write_all(chunk).await.unwrap();
        stream.flush().await.unwrap();
    }
}

/// Everything the server sent until it closed (a reset counts as a close), or an error when it
/// kept the connection open past `DEADLINE`.
async fn until_closed(stream: &mut TcpStream) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    match tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Ok(out),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(out),
        Ok(Err(_)) => Err("read failed"),
        Err(_) => Err("still open at the deadline"),
    }
}

/// `GET /echo` on `stream` (its PROXY header already sent); returns the node that served it
/// and the `X-Forwarded-For` it received.
async fn echo_over<IO>(stream: IO, spoofed_xff: Option<&str>) -> (String, String)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut request = Request::get("/echo").header("host", "shop.example");
    if let Some(xff) = spoofed_xff {
        request = request.header("x-forwarded-for", xff);
    }
    let response = sender
        .send_request(request.body(empty()).unwrap())
        .await
        .unwrap();
    let reply = collect(response).await;
    (reply.served_by(), forwarded_for(&reply.body))
}

/// The `X-Forwarded-For` the web node's `/echo` reports.
fn forwarded_for(body: &[u8]) -> String {
    let json: Value = serde_json::from_slice(body).expect("echo answers JSON");
    json["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|pair| pair[0] == "x-forwarded-for")
        .map(|pair| pair[1].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The client `header` carries, as the node behind the `http` listener saw it.
async fn seen_client(running: &Running, listener: &str, header: &[u8]) -> String {
    let mut stream = connect_from(PROXY, running.addr(listener).unwrap()).await;
    stream.write_all(header).await.unwrap();
    echo_over(stream, None).await.1
}

/// `fulcrum_proxy_protocol_refused_total` of `listener` for each reason.
async fn refusals(running: &Running, listener: &str) -> [f64; 4] {
    let scrape = scrape(running).await;
    ["untrusted", "missing", "malformed", "timeout"].map(|reason| {
        let name = format!(
            "fulcrum_proxy_protocol_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        );
        series(&scrape, &name).unwrap_or_else(|| panic!("no {name} in:\n{scrape}"))
    })
}

#[tokio::test]
async fn a_v1_header_names_the_client_the_backend_sees_over_tcp4_and_tcp6() {
    let nodes = webnodes(1).await;
    let running = balancer_behind_l4("pp_v1", "round_robin", &nodes, "").await;

    let tcp4 = v1(sock("203.0.113.7:50000"));
    assert_eq!(seen_client(&running, "pp_v1", &tcp4).await, "203.0.113.7");
    let tcp6 = v1(sock("[2001:db8::7]:50000"));
    assert_eq!(seen_client(&running, "pp_v1", &tcp6).await, "2001:db8::7");
    assert_eq!(
        seen_client(&running, "pp_v1", b"PROXY UNKNOWN\r\n").await,
        PROXY.to_string(),
        "UNKNOWN keeps the peer's address"
    );
    assert_eq!(refusals(&running, "pp_v1").await, [0.0; 4]);
}

#[tokio::test]
async fn a_v2_header_names_the_client_its_tlvs_are_skipped_and_local_keeps_the_peer() {
    let nodes = webnodes(1).await;
    let running = balancer_behind_l4("pp_v2", "round_robin", &nodes, "").await;
    // A NOOP TLV and a unique id, as an L4 tier may add.
    let tlvs = [
        &[0x04, 0, 2, 0, 0][..],
        &[0x05, 0, 4, b'i', b'd', b'-', b'1'],
    ]
    .concat();

    let ipv4 = v2(1, sock("198.51.100.20:41000"), &tlvs);
    assert_eq!(seen_client(&running, "pp_v2", &ipv4).await, "198.51.100.20");
    let ipv6 = v2(1, sock("[2001:db8::20]:41000"), &tlvs);
    assert_eq!(seen_client(&running, "pp_v2", &ipv6).await, "2001:db8::20");
    let local = v2(0, sock("198.51.100.20:41000"), &[]);
    assert_eq!(
        seen_client(&running, "pp_v2", &local).await,
        PROXY.to_string(),
        "LOCAL (the L4 tier's own connection) keeps the peer's address"
    );
    assert_eq!(refusals(&running, "pp_v2").await, [0.0; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_places_each_client_by_the_address_its_header_carries_not_by_its_xff() {
    let nodes = webnodes(3).await;
    let running = balancer_behind_l4("pp_hash", "ip_hash", &nodes, "").await;
    let addr = running.addr("pp_hash").unwrap();
    let clients: Vec<SocketAddr> = (1..=30u16)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, i as u8)), 40_000 + i))
        .chain((1..=30u16).map(|i| {
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 7, i)),
                40_000 + i,
            )
        }))
        .collect();

    let mut homes = std::collections::HashSet::new();
    for (i, client) in clients.iter().enumerate() {
        let header = if i % 2 == 0 {
            v1(*client)
        } else {
            v2(1, *client, &[])
        };
        let mut stream = connect_from(PROXY, addr).await;
        stream.write_all(&header).await.unwrap();
        // The carried client is no trusted proxy, so what it claims in X-Forwarded-For is
        // passed on but not believed.
        let (home, xff) = echo_over(stream, Some("192.0.2.99")).await;
        assert_eq!(xff, format!("192.0.2.99, {}", client.ip()));
        let expected = {
            let snapshot = running.router().pools()[0].snapshot();
            let pick = Pick {
                client: client_key(client.ip()),
                ..Pick::plain(None)
            };
            let index = snapshot.pick_for(&pick).expect("a routable node");
            snapshot.backends[index].node.name.to_string()
        };
        assert_eq!(
            home, expected,
            "{client} placed by another address than its own"
        );
        homes.insert(home);
    }
    assert!(
        homes.len() > 1,
        "60 clients all on {homes:?}: placed by the L4 hop, not the clients"
    );
}

#[tokio::test]
async fn a_header_split_across_segments_and_a_request_in_the_headers_segment_are_both_served() {
    let nodes = webnodes(1).await;
    let running = balancer_behind_l4("pp_split", "round_robin", &nodes, "").await;
    let addr = running.addr("pp_split").unwrap();

    let header = v1(sock("203.0.113.8:50000"));
    let mut stream = connect_from(PROXY, addr).await;
    write_in_pieces(&mut stream, &[&header[..6], &header[6..20], &header[20..]]).await;
    assert_eq!(echo_over(stream, None).await.1, "203.0.113.8");

    let header = v2(1, sock("203.0.113.9:50000"), &[0x04, 0, 1, 0]);
    let mut stream = connect_from(PROXY, addr).await;
    write_in_pieces(&mut stream, &[&header[..5], &header[5..15], &header[15..]]).await;
    assert_eq!(echo_over(stream, None).await.1, "203.0.113.9");

    // The header, the request and its end in one write: what the reader took past the header
    // reaches the request parser.
    for header in [
        v1(sock("203.0.113.10:50000")),
        v2(1, sock("203.0.113.10:50000"), &[]),
    ] {
        let mut stream = connect_from(PROXY, addr).await;
        stream
            .write_all(&[&header[..], REQUEST].concat())
            .await
            .unwrap();
        let response =
            String::from_utf8_lossy(&until_closed(&mut stream).await.unwrap()).into_owned();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(forwarded_for(body.as_bytes()), "203.0.113.10", "{response}");
    }
    assert_eq!(refusals(&running, "pp_split").await, [0.0; 4]);
}

#[tokio::test]
async fn connections_without_a_valid_header_are_closed_unanswered_and_counted_by_reason() {
    let nodes = webnodes(1).await;
    let running = balancer_behind_l4(
        "pp_bad",
        "round_robin",
        &nodes,
        "header_read_timeout = \"300ms\"\n",
    )
    .await;
    let addr = running.addr("pp_bad").unwrap();

    // A TCP health check of the L4 tier: connects and leaves without a byte. Not a refusal.
    drop(connect_from(PROXY, addr).await);

    let mut oversized = v2(1, sock("203.0.113.1:1"), &[]);
    oversized[14..16].copy_from_slice(&60_000u16.to_be_bytes());
    let cases: [(&str, Vec<u8>, usize); 6] = [
        ("missing: a plain request", REQUEST.to_vec(), 1),
        (
            "malformed v1: no such address",
            [
                b"PROXY TCP4 203.0.113.300 127.0.0.1 1 80\r\n".as_slice(),
                REQUEST,
            ]
            .concat(),
            2,
        ),
        (
            "malformed v1: no CRLF within 107 bytes",
            [b"PROXY TCP4 ".as_slice(), &[b'7'; 120]].concat(),
            2,
        ),
        (
            "malformed v2: version 3",
            [V2_SIGNATURE, &[0x31, 0x11, 0, 12], &[0; 12], REQUEST].concat(),
            2,
        ),
        ("malformed v2: longer than the cap", oversized, 2),
        (
            "timeout: half a header, then silence",
            b"PROXY TCP4 203.0.113.1 ".to_vec(),
            3,
        ),
    ];
    let mut expected = [0.0; 4];
    for (what, bytes, reason) in cases {
        let mut stream = connect_from(PROXY, addr).await;
        stream.write_all(&bytes).await.unwrap();
        let answer = until_closed(&mut stream)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            answer.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&answer)
        );
        expected[reason] += 1.0;
        assert_eq!(refusals(&running, "pp_bad").await, expected, "{what}");
    }

    // The header cut short by the peer is as broken as a bad one.
    let mut stream = connect_from(PROXY, addr).await;
    stream.write_all(b"PROXY TCP4 203.0.113.1").await.unwrap();
    stream.shutdown().await.unwrap();
    assert!(until_closed(&mut stream).await.unwrap().is_empty());
    expected[2] += 1.0;
    wait_until("the cut-short header is counted", || async {
        refusals(&running, "pp_bad").await == expected
    })
    .await;
    // The refusal series carry HELP and TYPE like every other.
    promtool_check(&scrape(&running).await);
}

#[tokio::test]
async fn a_valid_header_from_a_peer_outside_trusted_proxies_is_closed_unanswered_and_counted() {
    let nodes = webnodes(1).await;
    let running = balancer_behind_l4("pp_stranger", "round_robin", &nodes, "").await;
    let addr = running.addr("pp_stranger").unwrap();

    let header = v2(1, sock("203.0.113.7:50000"), &[]);
    let mut stream = connect_from(STRANGER, addr).await;
    // The write may meet the close already; what matters is what comes back.
    let _ = stream.write_all(&[&header[..], REQUEST].concat()).await;
    let answer = until_closed(&mut stream).await.unwrap();
    assert!(
        answer.is_empty(),
        "answered {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        refusals(&running, "pp_stranger").await,
        [1.0, 0.0, 0.0, 0.0]
    );
}

#[tokio::test]
async fn a_tls_listener_reads_the_header_before_the_handshake() {
    let certs = tls::CertDir::new("proxy_protocol");
    let cert = certs.cert("shop", &["shop.example"]);
    let nodes = webnodes(1).await;
    let (name, addr) = (nodes[0].id(), nodes[0].local_addr());
    let toml = tls::tls_listener(
        "pp_tls",
        &cert.cert,
        &cert.key,
        &proxied("").replace("name = \"http\"\n", ""),
    ) + &format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[pools.pp_tls]\nbackends = [{{ name = \"{name}\", address = \"{addr}\" }}]\n"
    );
    let running = balancer(&toml).await;
    let listener = running.addr("pp_tls").unwrap();

    let mut tcp = connect_from(PROXY, listener).await;
    tcp.write_all(&v2(1, sock("[2001:db8::44]:50000"), &[]))
        .await
        .unwrap();
    let server = ServerName::try_from("shop.example").unwrap();
    let stream = tls::connect_over(tcp, server, &[b"http/1.1"]).await;
    assert_eq!(echo_over(stream, None).await.1, "2001:db8::44");

    // A TLS hello where the header should be is a missing header, not a handshake.
    let tcp = connect_from(PROXY, listener).await;
    let server = ServerName::try_from("shop.example").unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let handshake =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(server, tcp);
    let result = tokio::time::timeout(DEADLINE, handshake)
        .await
        .expect("closed before the deadline");
    assert!(
        result.is_err(),
        "a handshake without a PROXY header must not complete"
    );
    assert_eq!(refusals(&running, "pp_tls").await, [0.0, 1.0, 0.0, 0.0]);
}

#[tokio::test]
async fn behind_haproxy_with_send_proxy_v2_the_backend_sees_the_real_client() {
    let nodes = webnodes(1).await;
    let running = balancer_behind_l4("pp_haproxy", "round_robin", &nodes, "").await;
    let Some(haproxy) = Haproxy::start(
        "send-proxy-v2",
        running.addr("pp_haproxy").unwrap(),
        "send-proxy-v2",
    ) else {
        return;
    };
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

    for _ in 0..3 {
        let stream = connect_from(client, haproxy.addr).await;
        let (served_by, xff) = echo_over(stream, None).await;
        assert_eq!(served_by, nodes[0].id());
        assert_eq!(
            xff,
            client.to_string(),
            "the backend sees the client, not HAProxy"
        );
    }
    // HAProxy's own health checks (a v2 LOCAL header, then a close) are not refusals.
    assert_eq!(refusals(&running, "pp_haproxy").await, [0.0; 4]);
}

/// `fulcrum check` on a listener that would refuse everyone.
#[test]
fn check_refuses_proxy_protocol_without_trusted_proxies_naming_file_line_and_key() {
    let path: PathBuf =
        std::env::temp_dir().join(format!("fulcrum-pp-check-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\nproxy_protocol = true\n\n[pools.web]\nbackends = [{ address = \"127.0.0.1:9001\" }]\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "{}:3:18: listeners[0].proxy_protocol: needs `trusted_proxies`",
        path.display()
    );
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in:\n{stderr}"
    );
}

/// `promtool check metrics` on a scrape (see `metric_series.rs`, whose scrapes have no
/// `proxy_protocol` listener); `FULCRUM_SKIP_PROMTOOL=1` skips it where promtool is missing.
fn promtool_check(text: &str) {
    use std::process::{Command, Stdio};
    if !tool_available(
        "promtool",
        "FULCRUM_SKIP_PROMTOOL",
        "Debian/Ubuntu: `apt-get install prometheus`",
    ) {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
