//! What a backend receives and what a client gets back: hop-by-hop headers stripped both ways
//! (including those named in `Connection`), `X-Forwarded-*` set, Host preserved.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use http::{Request, Response};
use serde_json::Value;
use support::*;

/// The headers the web node's `/echo` saw, as (name, value) pairs.
fn echoed_headers(reply: &Reply) -> Vec<(String, String)> {
    let json: Value = serde_json::from_slice(&reply.body).expect("echo answers JSON");
    json["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_owned(),
                pair[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[tokio::test]
async fn request_headers_are_rewritten_as_a_proxy_must() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "hdr_req",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let addr = running.addr("http").unwrap();

    let request = "GET /echo?x=1 HTTP/1.1\r\n\
        Host: shop.example:8080\r\n\
        Connection: close, X-Session-Hop\r\n\
        X-Session-Hop: secret\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Connection: keep-alive\r\n\
        Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
        TE: trailers, deflate\r\n\
        Upgrade: h2c\r\n\
        X-Forwarded-For: 203.0.113.9\r\n\
        X-Forwarded-Proto: https\r\n\
        X-End-To-End: kept\r\n\
        \r\n";
    let response = raw(addr, request.as_bytes()).await;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let json: Value = serde_json::from_str(body).expect("echo JSON");
    let headers: Vec<(String, String)> = json["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_owned(),
                p[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();

    for hop in [
        "connection",
        "x-session-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(
            header(&headers, hop).is_empty(),
            "{hop} reached the backend: {headers:?}"
        );
    }
    assert_eq!(
        header(&headers, "te"),
        ["trailers"],
        "TE: trailers is the one TE that passes"
    );
    assert_eq!(
        header(&headers, "host"),
        ["shop.example:8080"],
        "Host is preserved"
    );
    assert_eq!(
        header(&headers, "x-forwarded-for"),
        ["203.0.113.9, 127.0.0.1"],
        "the peer is appended"
    );
    assert_eq!(
        header(&headers, "x-forwarded-proto"),
        ["http"],
        "the listener's scheme, not the client's claim"
    );
    assert_eq!(header(&headers, "x-forwarded-host"), ["shop.example:8080"]);
    assert_eq!(header(&headers, "x-end-to-end"), ["kept"]);
    assert_eq!(json["path"], "/echo?x=1");
}

#[tokio::test]
async fn rfc7239_forwarded_is_added_when_enabled() {
    let nodes = webnodes(1).await;
    let toml = single_pool("hdr_fwd", "round_robin", &nodes_as_backends(&nodes), "").replace(
        "bind = \"127.0.0.1:0\"\n[admin]",
        "bind = \"127.0.0.1:0\"\nforwarded = true\n[admin]",
    );
    let running = balancer(&toml).await;
    let req = Request::get(url(&running, "/echo"))
        .header("host", "shop.example")
        .body(empty())
        .unwrap();
    let reply = send(&client(), req).await;
    let headers = echoed_headers(&reply);
    assert_eq!(
        header(&headers, "forwarded"),
        ["for=127.0.0.1;proto=http;host=\"shop.example\""]
    );
}

#[tokio::test]
async fn response_hop_by_hop_headers_do_not_reach_the_client() {
    let backend = backend(|_req| async {
        Response::builder()
            .header("connection", "x-backend-internal")
            .header("x-backend-internal", "do not leak")
            .header("keep-alive", "timeout=99")
            .header("x-visible", "yes")
            .body(full("hello"))
            .unwrap()
    })
    .await;
    let running = balancer(&single_pool(
        "hdr_resp",
        "round_robin",
        &[("b", backend.addr, 1)],
        "",
    ))
    .await;
    let reply = get(&client(), &url(&running, "/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "hello");
    assert!(
        reply.headers.get("x-backend-internal").is_none(),
        "{:?}",
        reply.headers
    );
    assert!(
        reply.headers.get("keep-alive").is_none(),
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.headers["x-visible"], "yes");
}

#[tokio::test]
async fn http2_prior_knowledge_client_reaches_an_http1_backend() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "hdr_h2",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let req = Request::get(url(&running, "/echo"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(empty())
        .unwrap();
    let reply = send(&client, req).await;
    assert_eq!(reply.status, 200);
    let json: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(
        json["version"], "HTTP/1.1",
        "the backend is spoken to over HTTP/1.1"
    );
    let headers = echoed_headers(&reply);
    let addr = running.addr("http").unwrap().to_string();
    assert_eq!(
        header(&headers, "host"),
        [addr.as_str()],
        "Host comes from :authority"
    );
    assert_eq!(
        header(&headers, "cookie"),
        ["a=1; b=2"],
        "HTTP/2 cookie crumbs are joined"
    );
}
