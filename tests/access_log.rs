//! The access log and request ids, black-box: real balancers with `access_log` to a file in a
//! temporary directory, real web nodes, real clients, and the file read back line by line.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Request;
use serde_json::Value;
use support::tls::{self, CertDir};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The settled JSON fields, in order.
const FIELDS: [&str; 21] = [
    "time",
    "listener",
    "client",
    "method",
    "host",
    "path",
    "protocol",
    "status",
    "bytes_in",
    "bytes_out",
    "pool",
    "backend",
    "attempts",
    "sticky",
    "connect_ms",
    "ttfb_ms",
    "duration_ms",
    "request_id",
    "tls_version",
    "sni",
    "termination",
];

/// A directory of its own per test, removed at the end.
struct LogDir(PathBuf);

impl LogDir {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("fulcrum-log-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `toml` (a [`single_pool`] config) with `access_log` (and `extra`) on its `http` listener.
fn with_log(toml: &str, log: &Path, options: &str, extra: &str) -> String {
    toml.replacen(
        "name = \"http\"\n",
        &format!(
            "name = \"http\"\naccess_log = {{ path = \"{}\"{options} }}\n{extra}\n",
            log.display()
        ),
        1,
    )
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until `path` holds at least `n` lines, and returns them.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    wait_until(&format!("{} has {n} lines", path.display()), || async {
        read_lines(path).len() >= n
    })
    .await;
    read_lines(path)
}

/// The `n` JSON lines of `path` (waiting for them), parsed.
async fn json_lines(path: &Path, n: usize) -> Vec<Value> {
    lines(path, n)
        .await
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

async fn logged_balancer(
    test: &str,
    nodes: &[fulcrum::webnode::WebNode],
    pool_extra: &str,
    options: &str,
    listener_extra: &str,
) -> (fulcrum::Running, LogDir, PathBuf) {
    let dir = LogDir::new(test);
    let log = dir.file("access.log");
    let toml = single_pool("web", "round_robin", &nodes_as_backends(nodes), pool_extra);
    let running = balancer(&with_log(&toml, &log, options, listener_extra)).await;
    (running, dir, log)
}

#[tokio::test]
async fn a_normal_request_logs_every_settled_field() {
    let nodes = webnodes(1).await;
    let (running, _dir, log) = logged_balancer("normal", &nodes, "", "", "").await;
    let addr = running.addr("http").unwrap();
    let client = client();
    let reply = send(
        &client,
        Request::post(format!("http://{addr}/echo?token=secret"))
            .header("x-request-id", "req-42")
            .body(full("hello"))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);

    let line = json_lines(&log, 1).await.remove(0);
    let keys: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = FIELDS.to_vec();
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want, "{line}");

    let time = line["time"].as_str().unwrap();
    // `2026-11-29T22:16:27.123Z`: RFC 3339, UTC, milliseconds.
    assert_eq!(time.len(), 24, "{time}");
    assert!(
        time.ends_with('Z') && time.as_bytes()[10] == b'T' && time.as_bytes()[19] == b'.',
        "{time}"
    );
    let logged = humantime::parse_rfc3339(time).unwrap();
    let age = std::time::SystemTime::now().duration_since(logged).unwrap();
    assert!(age < Duration::from_secs(60), "{time} is {age:?} old");

    assert_eq!(line["listener"], "http");
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["host"], addr.to_string());
    assert_eq!(line["path"], "/echo", "the query is dropped by default");
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_in"], 5);
    assert_eq!(line["bytes_out"], reply.body.len() as u64);
    assert_eq!(line["pool"], "web");
    assert_eq!(line["backend"], "web-1");
    assert_eq!(line["attempts"], 1);
    assert_eq!(
        line["sticky"],
        Value::Null,
        "round robin has no sticky outcome"
    );
    let connect = line["connect_ms"].as_f64().unwrap();
    let ttfb = line["ttfb_ms"].as_f64().unwrap();
    let duration = line["duration_ms"].as_f64().unwrap();
    assert!(
        0.0 <= connect && connect <= ttfb && ttfb <= duration,
        "{line}"
    );
    assert!(duration < 10_000.0, "{line}");
    assert_eq!(line["request_id"], "req-42");
    assert_eq!(line["tls_version"], Value::Null);
    assert_eq!(line["sni"], Value::Null);
    assert_eq!(line["termination"], "completed");

    // A second request on the kept-alive backend connection connects in no time.
    get(&client, &format!("http://{addr}/")).await;
    let second = json_lines(&log, 2).await.remove(1);
    assert_eq!(second["connect_ms"], 0.0, "{second}");
    assert_eq!(second["method"], "GET");
    assert_eq!(second["bytes_in"], 0);
}

#[tokio::test]
async fn the_query_is_logged_only_with_include_query() {
    let nodes = webnodes(1).await;
    let (running, _dir, log) =
        logged_balancer("query", &nodes, "", ", include_query = true", "").await;
    get(&client(), &url(&running, "/echo?a=1&b=%22x%22")).await;
    let line = json_lines(&log, 1).await.remove(0);
    assert_eq!(line["path"], "/echo?a=1&b=%22x%22");
}

#[tokio::test]
async fn a_retried_request_logs_two_attempts_and_the_node_that_answered() {
    let nodes = webnodes(1).await;
    let dead = free_port().await;
    let backends = [("dead", dead, 1), ("web-1", nodes[0].local_addr(), 1)];
    let dir = LogDir::new("retried");
    let log = dir.file("access.log");
    let toml = single_pool("web", "round_robin", &backends, "");
    let running = balancer(&with_log(&toml, &log, "", "")).await;
    let client = client();
    // Round robin starts with one of the two; two requests make sure one starts on `dead`.
    for _ in 0..2 {
        assert_eq!(get(&client, &url(&running, "/")).await.status, 200);
    }
    let lines = json_lines(&log, 2).await;
    let retried = lines
        .iter()
        .find(|l| l["attempts"] == 2)
        .unwrap_or_else(|| panic!("no retried request in {lines:?}"));
    assert_eq!(retried["backend"], "web-1", "{retried}");
    assert_eq!(retried["status"], 200);
    assert_eq!(retried["termination"], "completed");
}

#[tokio::test]
async fn a_client_that_leaves_mid_response_is_logged_as_aborted() {
    let nodes = webnodes(1).await;
    let (running, _dir, log) = logged_balancer("abort", &nodes, "", "", "").await;
    let addr = running.addr("http").unwrap();
    let total: u64 = 200 << 20;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET /bytes?n={total} HTTP/1.1\r\nconnection: close\r\nhost: x\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = vec![0; 64 * 1024];
    let mut read = 0;
    while read < 256 * 1024 {
        read += stream.read(&mut buf).await.unwrap();
    }
    drop(stream);
    let line = json_lines(&log, 1).await.remove(0);
    assert_eq!(line["termination"], "client_aborted", "{line}");
    assert_eq!(line["status"], 200);
    let out = line["bytes_out"].as_u64().unwrap();
    assert!(out > 0 && out < total, "{line}");
    assert_eq!(line["backend"], "web-1");
}

#[tokio::test]
async fn requests_fulcrum_answers_itself_name_their_termination() {
    let nodes = webnodes(1).await;
    let dir = LogDir::new("local");
    let log = dir.file("access.log");
    let toml = format!(
        r#"
[[listeners]]
name = "http"
bind = "127.0.0.1:0"
max_body_bytes = 10
[pools.web]
response_timeout = "200ms"
backends = [{{ name = "web-1", address = "{}" }}]
[pools.empty]
backends = []
[pools.dead]
backends = [{{ name = "dead", address = "{}" }}]
[[routes]]
path_prefix = "/empty"
pool = "empty"
[[routes]]
path_prefix = "/dead"
pool = "dead"
[[routes]]
host = "known.test"
pool = "web"
"#,
        nodes[0].local_addr(),
        free_port().await
    );
    let running = balancer(&with_log(&toml, &log, ", format = \"json\"", "")).await;
    let addr = running.addr("http").unwrap();
    let cases: [(&[u8], u16, &str); 6] = [
        (b"GET / HTTP/1.1\r\nconnection: close\r\nhost: unknown.test\r\n\r\n", 404, "no_route"),
        (b"GET /empty HTTP/1.1\r\nconnection: close\r\nhost: known.test\r\n\r\n", 503, "no_backend"),
        (b"GET /dead HTTP/1.1\r\nconnection: close\r\nhost: known.test\r\n\r\n", 502, "refused"),
        (b"GET /slow?ms=3000 HTTP/1.1\r\nconnection: close\r\nhost: known.test\r\n\r\n", 504, "backend_timeout"),
        (
            b"POST /echo HTTP/1.1\r\nconnection: close\r\nhost: known.test\r\ncontent-length: 100\r\n\r\n",
            413,
            "too_large",
        ),
        (
            b"POST /echo HTTP/1.1\r\nconnection: close\r\nhost: known.test\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            400,
            "malformed",
        ),
    ];
    for (i, (request, status, termination)) in cases.iter().enumerate() {
        let answer = raw(addr, request).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        let line = json_lines(&log, i + 1).await.remove(i);
        assert_eq!(line["status"], *status, "{line}");
        assert_eq!(line["termination"], *termination, "{line}");
        match *termination {
            "no_route" => {
                assert_eq!(line["pool"], Value::Null);
                assert_eq!(line["backend"], Value::Null);
                assert_eq!(line["attempts"], 0);
            }
            "refused" => {
                assert_eq!(line["backend"], "dead");
                assert_eq!(line["attempts"], 1);
                assert_eq!(line["connect_ms"], Value::Null);
            }
            "no_backend" => {
                assert_eq!(line["pool"], "empty");
                assert_eq!(line["backend"], Value::Null);
            }
            "backend_timeout" => {
                assert_eq!(line["backend"], "web-1");
                assert_eq!(line["ttfb_ms"], Value::Null, "no response head came");
                assert!(line["duration_ms"].as_f64().unwrap() >= 200.0, "{line}");
            }
            _ => {}
        }
    }
}

/// One combined line, split into its fields the way log analysers read it:
/// `client - - [time] "method target protocol" status bytes "referer" "user agent"`.
fn parse_combined(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        rest = rest.trim_start_matches(' ');
        let (field, tail) = match rest.as_bytes()[0] {
            b'"' => {
                let end = rest[1..].find('"').expect("closing quote") + 1;
                (&rest[1..end], &rest[end + 1..])
            }
            b'[' => {
                let end = rest.find(']').expect("closing bracket");
                (&rest[1..end], &rest[end + 1..])
            }
            _ => {
                let end = rest.find(' ').unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            }
        };
        fields.push(field.to_owned());
        rest = tail;
    }
    fields
}

#[tokio::test]
async fn the_combined_format_is_what_log_analysers_parse() {
    let nodes = webnodes(1).await;
    let (running, _dir, log) =
        logged_balancer("combined", &nodes, "", ", format = \"combined\"", "").await;
    let reply = send(
        &client(),
        Request::get(url(&running, "/echo?q=1"))
            .header("user-agent", "curl/8 \"quoted\" \\ x")
            .header("referer", "http://ref.test/")
            .body(empty())
            .unwrap(),
    )
    .await;
    let line = lines(&log, 1).await.remove(0);
    let fields = parse_combined(&line);
    assert_eq!(fields.len(), 9, "{line} -> {fields:?}");
    assert_eq!(fields[0], "127.0.0.1");
    assert_eq!((fields[1].as_str(), fields[2].as_str()), ("-", "-"));
    // `29/Nov/2026:22:16:27 +0000`
    let time = &fields[3];
    assert_eq!(time.len(), 26, "{time}");
    assert!(
        time.ends_with(" +0000") && &time[2..3] == "/" && &time[6..7] == "/",
        "{time}"
    );
    assert_eq!(
        fields[4], "GET /echo HTTP/1.1",
        "the query is dropped here too"
    );
    assert_eq!(fields[5], "200");
    assert_eq!(fields[6], reply.body.len().to_string());
    assert_eq!(fields[7], "http://ref.test/");
    assert_eq!(
        fields[8], "curl/8 \\x22quoted\\x22 \\x5C x",
        "nginx's escaping"
    );
}

#[tokio::test]
async fn tls_requests_log_their_version_and_sni_name() {
    let certs = CertDir::new("access-log");
    let cert = certs.cert("site", &["site.test"]);
    let nodes = webnodes(1).await;
    let dir = LogDir::new("tls");
    let log = dir.file("access.log");
    let mut toml = single_pool("web", "round_robin", &nodes_as_backends(&nodes), "");
    let options = format!("access_log = {{ path = \"{}\" }}", log.display());
    toml += &tls::tls_listener("https", &cert.cert, &cert.key, &options);
    let running = balancer(&toml).await;
    let stream = tls::connect(running.addr("https").unwrap(), Some("site.test"), &[b"h2"]).await;
    let mut h2 = tls::h2(stream).await;
    let response = h2
        .send_request(Request::get("https://site.test/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    collect(response).await;
    let line = json_lines(&log, 1).await.remove(0);
    assert_eq!(line["listener"], "https");
    assert_eq!(line["protocol"], "HTTP/2");
    assert_eq!(line["tls_version"], "TLSv1.3");
    assert_eq!(line["sni"], "site.test");
    assert_eq!(line["host"], "site.test");
}

/// The `x-request-id` values the web node's `/echo` received.
fn echoed_ids(reply: &Reply) -> Vec<String> {
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "x-request-id")
        .map(|h| h[1].as_str().unwrap().to_owned())
        .collect()
}

async fn echo_with_id(client: &TestClient, addr: SocketAddr, id: Option<&[u8]>) -> Reply {
    let mut req = Request::get(format!("http://{addr}/echo"));
    if let Some(id) = id {
        req = req.header("x-request-id", http::HeaderValue::from_bytes(id).unwrap());
    }
    send(client, req.body(empty()).unwrap()).await
}

type TestClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    TestBody,
>;

#[tokio::test]
async fn a_sane_request_id_is_kept_and_any_other_replaced_for_backend_and_log() {
    let nodes = webnodes(1).await;
    let (running, _dir, log) = logged_balancer("ids", &nodes, "", "", "").await;
    let addr = running.addr("http").unwrap();
    let client = client();
    let longest = "x".repeat(200);
    let too_long = "x".repeat(201);
    let cases: [(Option<&[u8]>, bool); 6] = [
        (Some(b"abc-123"), true),
        (Some(longest.as_bytes()), true),
        (Some(too_long.as_bytes()), false),
        (Some(b"has space"), false),
        (Some(b"caf\xc3\xa9"), false),
        (None, false),
    ];
    let mut generated = Vec::new();
    for (i, (sent, kept)) in cases.iter().enumerate() {
        let reply = echo_with_id(&client, addr, *sent).await;
        let seen = echoed_ids(&reply);
        assert_eq!(seen.len(), 1, "the backend gets exactly one id: {seen:?}");
        let line = json_lines(&log, i + 1).await.remove(i);
        assert_eq!(
            line["request_id"], seen[0],
            "the log records what the backend got"
        );
        if *kept {
            assert_eq!(seen[0].as_bytes(), sent.unwrap());
        } else {
            assert_eq!(seen[0].len(), 32, "{seen:?}");
            assert!(seen[0].bytes().all(|b| b.is_ascii_hexdigit()), "{seen:?}");
            generated.push(seen[0].clone());
        }
    }
    generated.sort();
    generated.dedup();
    assert_eq!(generated.len(), 4, "generated ids are unique");
}

#[tokio::test]
async fn request_id_false_passes_the_header_through_untouched() {
    let nodes = webnodes(1).await;
    let (running, _dir, log) =
        logged_balancer("ids-off", &nodes, "", "", "request_id = false").await;
    let addr = running.addr("http").unwrap();
    let client = client();
    let reply = echo_with_id(&client, addr, Some(b"has space")).await;
    assert_eq!(echoed_ids(&reply), ["has space"]);
    let reply = echo_with_id(&client, addr, None).await;
    assert!(echoed_ids(&reply).is_empty(), "none is generated");
    let lines = json_lines(&log, 2).await;
    assert_eq!(lines[0]["request_id"], "has space");
    assert_eq!(lines[1]["request_id"], Value::Null);
}

#[tokio::test]
async fn a_reload_moves_the_log_to_its_new_file() {
    let nodes = webnodes(1).await;
    let dir = LogDir::new("reload");
    let (first, second) = (dir.file("first.log"), dir.file("second.log"));
    let toml = single_pool("web", "round_robin", &nodes_as_backends(&nodes), "");
    let config = dir.file("fulcrum.toml");
    std::fs::write(&config, with_log(&toml, &first, "", "")).unwrap();
    let running = fulcrum::start_file(&config).await.unwrap();
    let client = client();
    get(&client, &url(&running, "/")).await;
    lines(&first, 1).await;

    std::fs::write(
        &config,
        with_log(&toml, &second, ", format = \"combined\"", ""),
    )
    .unwrap();
    running.control().reload().await.unwrap();
    get(&client, &url(&running, "/")).await;
    let line = lines(&second, 1).await.remove(0);
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");

    std::fs::write(&config, &toml).unwrap();
    running.control().reload().await.unwrap();
    get(&client, &url(&running, "/")).await;
    // The request above is answered; give a writer that should not exist time to show up.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(read_lines(&first).len(), 1);
    assert_eq!(read_lines(&second).len(), 1, "logging is off again");
}

#[tokio::test]
async fn the_dropped_lines_counter_is_exported() {
    let nodes = webnodes(1).await;
    let (running, _dir, log) = logged_balancer("dropped", &nodes, "", "", "").await;
    get(&client(), &url(&running, "/")).await;
    lines(&log, 1).await;
    let scrape = scrape(&running).await;
    assert!(
        scrape.contains("# HELP fulcrum_access_log_dropped_total "),
        "{scrape}"
    );
    assert_eq!(
        series(&scrape, "fulcrum_access_log_dropped_total"),
        Some(0.0)
    );
}

#[tokio::test]
async fn sigusr1_reopens_the_file_after_logrotate_renamed_it() {
    let nodes = webnodes(1).await;
    let dir = LogDir::new("sigusr1");
    let log = dir.file("access.log");
    let bind = free_port().await;
    let toml = single_pool("web", "round_robin", &nodes_as_backends(&nodes), "").replace(
        "bind = \"127.0.0.1:0\"\n[admin]",
        &format!("bind = \"{bind}\"\n[admin]"),
    );
    let config = dir.file("fulcrum.toml");
    std::fs::write(&config, with_log(&toml, &log, "", "")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    let client = client();
    let url = format!("http://{bind}/");
    wait_until("fulcrum answers", || async {
        tokio::time::timeout(Duration::from_secs(1), client.get(url.parse().unwrap()))
            .await
            .is_ok_and(|r| r.is_ok())
    })
    .await;
    lines(&log, 1).await;
    let rotated = dir.file("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-USR1", &process.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Until the writer has reopened, lines still go to the renamed file: keep asking.
    wait_until("a new access.log appears", || async {
        get(&client, &url).await;
        log.exists()
    })
    .await;
    let before = read_lines(&rotated).len();
    get(&client, &url).await;
    lines(&log, 1).await;
    assert_eq!(
        read_lines(&rotated).len(),
        before,
        "nothing more goes to the rotated file"
    );
}
