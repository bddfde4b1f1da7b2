//! TLS termination on loopback with certificates made in the test: SNI picks the certificate,
//! ALPN h2 carries requests to HTTP/1.1 backends intact (bodies, headers, trailers), and clients
//! that never finish a handshake are dropped without holding anyone else up.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::client::conn::http1;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::tls::{self, CertDir};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const H2: &[u8] = b"h2";
const H1: &[u8] = b"http/1.1";

#[tokio::test]
async fn sni_picks_the_certificate_for_each_name_and_the_default_for_the_rest() {
    let dir = CertDir::new("sni");
    let default = dir.cert("default", &["default.test"]);
    let a = dir.cert("a", &["a.test"]);
    let b = dir.rsa_cert("b", &["*.b.test"]);
    let nodes = webnodes(1).await;
    let mut toml = single_pool("tls_sni", "round_robin", &nodes_as_backends(&nodes), "");
    toml += &tls::tls_listener("sni", &default.cert, &default.key, "");
    toml += &tls::sni_entry(&["a.test"], &a);
    toml += &tls::sni_entry(&["*.b.test"], &b);
    let running = balancer(&toml).await;
    let addr = running.addr("sni").unwrap();

    for (sni, want, which) in [
        (Some("a.test"), &a, "a"),
        (Some("A.Test"), &a, "a (case-insensitive)"),
        (Some("www.b.test"), &b, "b (wildcard, RSA)"),
        (
            Some("b.test"),
            &default,
            "default (a wildcard covers one label only)",
        ),
        (Some("unknown.test"), &default, "default (unknown name)"),
        (None, &default, "default (no SNI)"),
    ] {
        let stream = tls::connect(addr, sni, &[H1]).await;
        assert!(
            tls::peer_leaf(&stream) == want.der,
            "{sni:?} should get {which}"
        );
    }
}

/// The web node's `/echo` report.
fn echo(reply: &Reply) -> Value {
    serde_json::from_slice(&reply.body).expect("echo answers JSON")
}

fn echoed_header(json: &Value, name: &str) -> Vec<String> {
    json["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap().to_owned())
        .collect()
}

async fn reply(response: Response<hyper::body::Incoming>) -> Reply {
    collect(response).await
}

#[tokio::test]
async fn alpn_h2_carries_10_mib_each_way_to_an_http1_backend_with_headers_intact() {
    let dir = CertDir::new("h2");
    let cert = dir.cert("site", &["shop.test"]);
    let nodes = webnodes(1).await;
    let mut toml = single_pool("tls_h2", "round_robin", &nodes_as_backends(&nodes), "");
    toml += &tls::tls_listener("h2", &cert.cert, &cert.key, "forwarded = true");
    let running = balancer(&toml).await;
    let addr = running.addr("h2").unwrap();

    let stream = tls::connect(addr, Some("shop.test"), &[H2, H1]).await;
    assert_eq!(tls::alpn(&stream).as_deref(), Some(H2));
    let mut h2 = tls::h2(stream).await;

    // 10 MiB up: the backend hashes what it received.
    let upload: Vec<u8> = (0..10 << 20).map(|i: u32| (i % 251) as u8).collect();
    let want_sha = format!("{:x}", Sha256::digest(&upload));
    let request = Request::post("https://shop.test/echo?big=1")
        .version(Version::HTTP_2)
        .header("x-end-to-end", "kept")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(full(upload))
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, h2.send_request(request))
        .await
        .expect("answer within the deadline")
        .expect("request succeeds");
    assert_eq!(response.version(), Version::HTTP_2);
    let got = reply(response).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let json = echo(&got);
    assert_eq!(json["version"], "HTTP/1.1", "the backend hop is HTTP/1.1");
    assert_eq!(json["body_bytes"], 10 << 20);
    assert_eq!(json["body_sha256"], want_sha.as_str());
    assert_eq!(json["path"], "/echo?big=1");
    assert_eq!(echoed_header(&json, "host"), ["shop.test"]);
    assert_eq!(echoed_header(&json, "x-forwarded-proto"), ["https"]);
    assert_eq!(echoed_header(&json, "x-forwarded-host"), ["shop.test"]);
    assert_eq!(echoed_header(&json, "x-end-to-end"), ["kept"]);
    assert_eq!(echoed_header(&json, "cookie"), ["a=1; b=2"]);
    let forwarded = echoed_header(&json, "forwarded");
    assert!(
        forwarded.len() == 1 && forwarded[0].contains("proto=https"),
        "{forwarded:?}"
    );

    // 10 MiB down, streamed in 64 KiB chunks by the web node.
    let request = Request::get("https://shop.test/bytes?n=10485760")
        .version(Version::HTTP_2)
        .body(empty())
        .unwrap();
    let got = reply(h2.send_request(request).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.len(), 10 << 20);
    assert_eq!(got.served_by(), "web-1");

    // HTTP/1.1 over TLS works on the same listener and is told https too.
    let stream = tls::connect(addr, Some("shop.test"), &[H1]).await;
    assert_eq!(tls::alpn(&stream).as_deref(), Some(H1));
    let mut h1 = tls::h1(stream).await;
    let request = Request::get("/echo")
        .header("host", "shop.test")
        .body(empty())
        .unwrap();
    let json = echo(&reply(h1.send_request(request).await.unwrap()).await);
    assert_eq!(echoed_header(&json, "x-forwarded-proto"), ["https"]);

    // Quiet long enough to sleep in the idle set, TLS state and all, then served again on the
    // same connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let request = Request::get("/echo?again=1")
        .header("host", "shop.test")
        .body(empty())
        .unwrap();
    let json = echo(&reply(h1.send_request(request).await.unwrap()).await);
    assert_eq!(json["path"], "/echo?again=1");
}

fn trailers(name: &'static str, value: &'static str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(name, HeaderValue::from_static(value));
    map
}

/// A body of unknown length (so HTTP/1.1 sends it chunked) that ends in trailers.
fn chunked_with_trailers(data: &'static str, trailer: HeaderMap) -> TestBody {
    let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
        Ok(Frame::data(Bytes::from(data))),
        Ok(Frame::trailers(trailer)),
    ];
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

#[tokio::test]
async fn trailers_survive_between_an_h2_client_and_an_http1_backend() {
    // The backend reports the request trailer it got and answers with a chunked body whose
    // trailer it declares (hyper sends only declared trailer fields on HTTP/1.1).
    let backend = backend(|req: Request<hyper::body::Incoming>| async move {
        let declared = req
            .headers()
            .get("trailer")
            .map(|v| v.to_str().unwrap().to_owned());
        let collected = req.into_body().collect().await.unwrap();
        let got = collected
            .trailers()
            .and_then(|t| t.get("x-request-sum"))
            .map(|v| v.to_str().unwrap().to_owned());
        let body = format!("declared={declared:?} trailer={got:?}");
        let body: &'static str = Box::leak(body.into_boxed_str());
        Response::builder()
            .header("trailer", "x-response-sum")
            .body(chunked_with_trailers(
                body,
                trailers("x-response-sum", "abc123"),
            ))
            .unwrap()
    })
    .await;
    let dir = CertDir::new("trailers");
    let cert = dir.cert("site", &["t.test"]);
    let mut toml = single_pool("tls_trailers", "round_robin", &[("b", backend.addr, 1)], "");
    toml += &tls::tls_listener("trailers", &cert.cert, &cert.key, "");
    let running = balancer(&toml).await;

    let stream = tls::connect(running.addr("trailers").unwrap(), Some("t.test"), &[H2]).await;
    let mut h2 = tls::h2(stream).await;
    let request = Request::post("https://t.test/upload")
        .version(Version::HTTP_2)
        .header("te", "trailers")
        .header("trailer", "x-request-sum")
        .body(chunked_with_trailers(
            "payload",
            trailers("x-request-sum", "42"),
        ))
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let response_trailers = collected.trailers().cloned();
    let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
    assert_eq!(
        body, "declared=Some(\"x-request-sum\") trailer=Some(\"42\")",
        "request trailer reaches the HTTP/1.1 backend"
    );
    assert_eq!(
        response_trailers
            .as_ref()
            .and_then(|t| t.get("x-response-sum")),
        Some(&HeaderValue::from_static("abc123")),
        "response trailer reaches the h2 client: {response_trailers:?}"
    );
}

#[tokio::test]
async fn plaintext_and_silent_clients_are_dropped_without_stalling_a_tls_client() {
    let dir = CertDir::new("slow");
    let cert = dir.cert("site", &["slow.test"]);
    let nodes = webnodes(1).await;
    let mut toml = single_pool("tls_slow", "round_robin", &nodes_as_backends(&nodes), "");
    toml += &tls::tls_listener(
        "tls-slow",
        &cert.cert,
        &cert.key,
        "tls_handshake_timeout = \"500ms\"",
    );
    let running = balancer(&toml).await;
    let addr = running.addr("tls-slow").unwrap();

    // Twenty clients that connect and say nothing, and one that speaks plaintext HTTP.
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut plaintext = TcpStream::connect(addr).await.unwrap();
    plaintext
        .write_all(b"GET / HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        .await
        .unwrap();

    // Meanwhile a TLS client handshakes and gets answers at once.
    let stream = tls::connect(addr, Some("slow.test"), &[H2]).await;
    let mut h2 = tls::h2(stream).await;
    for _ in 0..10 {
        let request = Request::get("https://slow.test/")
            .version(Version::HTTP_2)
            .body(empty())
            .unwrap();
        let got = reply(h2.send_request(request).await.unwrap()).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    // Handshakes in the accept loop would queue the TLS client behind 20 timeouts (10 s);
    // the bound leaves room for a slow machine.
    let served = opened.elapsed();
    assert!(
        served < Duration::from_secs(2),
        "the TLS client waited {served:?} behind silent clients"
    );

    // The plaintext client is refused right away (a TLS alert at most), not left hanging.
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, plaintext.read_to_end(&mut out))
        .await
        .expect("plaintext client is closed")
        .ok();
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1 200"),
        "plaintext got an HTTP answer"
    );

    // Every silent client is closed once the handshake timeout has passed.
    for mut stream in silent {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("silent client is closed within the deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "silent client got {read:?}");
    }
    let closed = opened.elapsed();
    assert!(
        closed >= Duration::from_millis(500),
        "closed after {closed:?}, before the handshake timeout"
    );

    let metric = |result: &str| {
        format!("fulcrum_tls_handshakes_total{{listener=\"tls-slow\",result=\"{result}\"}}")
    };
    // The last timeouts may be counted a moment after their sockets closed.
    let deadline = Instant::now() + DEADLINE;
    let text = loop {
        let text = scrape(&running).await;
        if series(&text, &metric("timeout")) == Some(20.0) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(series(&text, &metric("timeout")), Some(20.0), "{text}");
    assert_eq!(series(&text, &metric("error")), Some(1.0), "{text}");
    assert_eq!(series(&text, &metric("ok")), Some(1.0), "{text}");
    assert!(
        text.contains("# HELP fulcrum_tls_handshakes_total"),
        "{text}"
    );
}

#[tokio::test]
async fn clients_that_stall_after_their_client_hello_hold_up_no_other_handshake() {
    let dir = CertDir::new("stall");
    // RSA, so each answer to a ClientHello costs a real signature.
    let cert = dir.rsa_cert("site", &["stall.test"]);
    let nodes = webnodes(1).await;
    let mut toml = single_pool("tls_stall", "round_robin", &nodes_as_backends(&nodes), "");
    toml += &tls::tls_listener(
        "tls-stall",
        &cert.cert,
        &cert.key,
        "tls_handshake_timeout = \"60s\"",
    );
    let running = balancer(&toml).await;
    let addr = running.addr("tls-stall").unwrap();

    // Twenty clients send a real ClientHello and then never answer the server's flight.
    // Handshakes take turns at their signature; a turn held until the client answers would
    // leave all but the first of these without an answer for the handshake timeout.
    let hello = tls::client_hello("stall.test");
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&hello).await.unwrap();
        stalled.push(stream);
    }
    for stream in &mut stalled {
        let mut first = [0u8; 1];
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut first))
            .await
            .expect("every stalled client gets the server's answer");
        assert_eq!(read.unwrap(), 1);
        assert_eq!(first[0], 0x16, "a TLS handshake record");
    }

    // A client that does finish its handshake is served at once.
    let started = Instant::now();
    let stream = tls::connect(addr, Some("stall.test"), &[H2]).await;
    let mut h2 = tls::h2(stream).await;
    let request = Request::get("https://stall.test/")
        .version(Version::HTTP_2)
        .body(empty())
        .unwrap();
    let got = reply(h2.send_request(request).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "the TLS client waited {waited:?} behind stalled handshakes"
    );
    drop(stalled);
}

#[tokio::test]
async fn a_reload_swaps_certificates_and_open_connections_carry_on() {
    let dir = CertDir::new("reload");
    let old = dir.cert("old", &["reload.test"]);
    let new = dir.cert("new", &["reload.test"]);
    let nodes = webnodes(1).await;
    let config = |cert: &tls::Cert| {
        single_pool("tls_reload", "round_robin", &nodes_as_backends(&nodes), "")
            + &tls::tls_listener("reload", &cert.cert, &cert.key, "")
    };
    let path = dir.path.join("fulcrum.toml");
    std::fs::write(&path, config(&old)).unwrap();
    let running = fulcrum::start_file(&path).await.unwrap();
    let addr = running.addr("reload").unwrap();

    let open = tls::connect(addr, Some("reload.test"), &[H1]).await;
    assert!(tls::peer_leaf(&open) == old.der);
    let mut open = tls::h1(open).await;
    let get_on = |sender: &mut http1::SendRequest<TestBody>| {
        sender.send_request(
            Request::get("/")
                .header("host", "reload.test")
                .body(empty())
                .unwrap(),
        )
    };
    assert_eq!(get_on(&mut open).await.unwrap().status(), 200);

    std::fs::write(&path, config(&new)).unwrap();
    let admin = running.admin_addr().unwrap();
    let reload = send(
        &client(),
        Request::post(format!("http://{admin}/api/reload"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reload.status, 200, "{}", reload.text());

    let fresh = tls::connect(addr, Some("reload.test"), &[H1]).await;
    assert!(
        tls::peer_leaf(&fresh) == new.der,
        "new handshakes get the new certificate"
    );
    let response = get_on(&mut open)
        .await
        .expect("the open connection survives the reload");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn the_sticky_cookie_is_secure_on_a_tls_listener() {
    let dir = CertDir::new("sticky");
    let cert = dir.cert("sticky", &["sticky.test"]);
    let nodes = webnodes(2).await;
    let toml = single_pool(
        "tls_sticky",
        "sticky_cookie",
        &nodes_as_backends(&nodes),
        "[pools.tls_sticky.sticky]\nsecret = \"k\"\n",
    ) + &tls::tls_listener("sticky", &cert.cert, &cert.key, "");
    let running = balancer(&toml).await;
    let stream = tls::connect(running.addr("sticky").unwrap(), Some("sticky.test"), &[H1]).await;
    let mut sender = tls::h1(stream).await;
    let response = sender
        .send_request(
            Request::get("/")
                .header("host", "sticky.test")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        set_cookie.ends_with("; HttpOnly; SameSite=Lax; Secure"),
        "{set_cookie}"
    );
    // The plain-HTTP listener of the same pool does not mark it Secure.
    let plain = get(&client(), &url(&running, "/")).await;
    assert!(
        !plain.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Secure")
    );
}
