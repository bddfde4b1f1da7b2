//! The status page in a real headless browser (Debian's `chromium`): after real traffic and a
//! real node failure, the rendered page has each node's charts, the failed check's reason, the
//! transition, the listeners, and a hostile node name shown as text, never run. A screenshot
//! goes to `target/status-page.png` (the README's picture).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fulcrum::pool::Health;
use support::*;

/// A backend name the config allows (any 1–255 bytes without control characters) that would
/// run a script and break the markup if the page did not escape it.
const HOSTILE: &str = "evil<script>document.title='pwned'</script>&co";
/// [`HOSTILE`] as a browser serializes it back as text.
const HOSTILE_TEXT: &str = "evil&lt;script&gt;document.title='pwned'&lt;/script&gt;&amp;co";

/// A headless chromium run gets this long; a hung one is killed by its PID.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `chromium --headless ... args url` with a private profile; returns its stdout.
fn chromium(args: &[&str], url: &str) -> String {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "status-page-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let out_path = scratch.join("stdout");
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            scratch.join("profile").display()
        ))
        .args(args)
        .arg(url)
        // A file, not a pipe: a DOM larger than the pipe's buffer must not stall it.
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > CHROMIUM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within {CHROMIUM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "chromium {args:?} failed: {status}");
    let out = std::fs::read_to_string(&out_path).unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    out
}

/// The number of points in each request chart's longest line, in page order.
fn request_chart_points(page: &str) -> Vec<usize> {
    page.split("<figure class='chart req'>")
        .skip(1)
        .map(|chart| {
            let chart = chart.split("</figure>").next().unwrap();
            chart
                .split("points='")
                .skip(1)
                .map(|points| points.split('\'').next().unwrap().split(' ').count())
                .max()
                .unwrap_or(0)
        })
        .collect()
}

/// The serialized DOM from the `<article>` whose id is `id` to its end.
fn card<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no card {id} in the DOM:\n{dom}"));
    let end = start + dom[start..].find("</article>").unwrap();
    &dom[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_charts_checks_and_transitions_in_chromium_with_names_escaped() {
    if !tool_available(
        "chromium",
        "FULCRUM_SKIP_CHROMIUM",
        "Debian/Ubuntu: `apt-get install chromium`",
    ) {
        return;
    }
    let mut nodes = webnodes(2).await;
    let toml = format!(
        r#"
shutdown_grace = "5s"
[[listeners]]
name = "status_http"
bind = "127.0.0.1:0"
[admin]
bind = "127.0.0.1:0"
[pools.status-page]
strategy = "round_robin"
backends = [
  {{ name = "web-1", address = "{}" }},
  {{ name = "{HOSTILE}", address = "{}" }},
]
[pools.status-page.health]
interval = "100ms"
timeout = "80ms"
"#,
        nodes[0].local_addr(),
        nodes[1].local_addr()
    );
    let running = balancer(&toml).await;
    let target = format!("http://{}/", running.addr("status_http").unwrap());
    let status_url = format!("http://{}/status", running.admin_addr().unwrap());
    // Kept open across the renders: the listener has a connection to show.
    let client = client();

    // Steady traffic, about 50 requests a second, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (client, target, stop) = (client.clone(), target.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(get(&client, &target).await.status, 200);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Until the sampler has drawn a few seconds of it: a line in each node's request chart.
    wait_until("both request charts have a line of 4 points", || {
        let (http, status_url) = (client.clone(), status_url.clone());
        async move {
            let page = get(&http, &status_url).await.text();
            let lines = request_chart_points(&page);
            lines.len() == 2 && lines.iter().all(|&points| points >= 4)
        }
    })
    .await;

    // The hostile node fails: its checks fail with a reason and it goes down.
    nodes.pop().unwrap().shutdown().await;
    let hostile = running.router().pools()[0]
        .snapshot()
        .backends
        .iter()
        .find(|b| &*b.node.name == HOSTILE)
        .map(|b| b.node.clone())
        .unwrap();
    wait_until("the hostile node is down", || {
        let hostile = hostile.clone();
        async move { hostile.health() == Health::Down }
    })
    .await;
    // The sampler has seen it down too: its lane turns red.
    wait_until("the timeline shows a node down", || {
        let (http, status_url) = (client.clone(), status_url.clone());
        async move {
            let page = get(&http, &status_url).await.text();
            page.contains("class='s-down'")
        }
    })
    .await;

    let dump_url = status_url.clone();
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &dump_url))
        .await
        .unwrap();

    // The name ran no script and broke no markup: it is text, and the page has no script.
    assert!(dom.contains("<title>fulcrum status</title>"), "{dom}");
    assert!(
        !dom.contains("<script"),
        "a script element reached the DOM:\n{dom}"
    );
    assert!(dom.contains(HOSTILE_TEXT), "{dom}");

    // Each node has its three charts; web-1's request chart has a line, and its table row a
    // real rate.
    for id in ["node-0-0", "node-0-1"] {
        let card = card(&dom, id);
        assert_eq!(card.matches("<svg").count(), 3, "{card}");
        for chart in ["requests/s", "errors/s", "p99 latency"] {
            assert!(card.contains(chart), "{card}");
        }
    }
    let web_1 = card(&dom, "node-0-0");
    assert!(web_1.contains("<h3>web-1</h3>"), "{web_1}");
    assert!(web_1.contains("<polyline points="), "{web_1}");
    assert!(web_1.contains("class=\"check pass\""), "{web_1}");

    // The failed node: its last check failed, with the reason, and it is down.
    let failed = card(&dom, "node-0-1");
    assert!(
        failed.contains(&format!("<h3>{HOSTILE_TEXT}</h3>")),
        "{failed}"
    );
    assert!(failed.contains("class=\"state down\""), "{failed}");
    assert!(failed.contains("class=\"check fail\""), "{failed}");
    assert!(failed.contains("class=\"reason\""), "{failed}");
    assert!(failed.contains("connect failed"), "{failed}");

    // The transition is on the pool's timeline, with the node's lanes.
    assert!(
        dom.contains(&format!(
            "<td>{HOSTILE_TEXT}</td><td><span class=\"state down\">down</span></td>"
        )),
        "the transition is listed: {dom}"
    );
    assert!(dom.matches("<div class=\"lane\">").count() >= 2, "{dom}");
    assert!(dom.contains("class=\"s-down\""), "{dom}");

    // The listener, with the connection this test holds open.
    let listener = dom
        .split("<tr class=\"listener\">")
        .nth(1)
        .and_then(|row| row.split("</tr>").next())
        .unwrap_or_else(|| panic!("no listener row: {dom}"));
    let cells: Vec<&str> = listener
        .split("<td>")
        .skip(1)
        .map(|c| c.trim_end_matches("</td>"))
        .collect();
    assert_eq!(cells[0], "status_http", "{listener}");
    assert!(cells[3].parse::<f64>().unwrap() >= 1.0, "{listener}");

    // The pictures: a desktop window for the README, and a phone's width.
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&shots).unwrap();
    for (file, size) in [
        ("status-page.png", "1280,1600"),
        ("status-page-phone.png", "390,1600"),
    ] {
        let path: PathBuf = shots.join(file);
        let _ = std::fs::remove_file(&path);
        let (shot, window, url) = (
            format!("--screenshot={}", path.display()),
            format!("--window-size={size}"),
            status_url.clone(),
        );
        tokio::task::spawn_blocking(move || chromium(&[&shot, &window], &url))
            .await
            .unwrap();
        let png = std::fs::read(&path).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{}",
            path.display()
        );
        // Straight to stderr so the path shows in a passing run too.
        let line = format!("status page screenshot: {}\n", path.display());
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    running.shutdown().await;
}
