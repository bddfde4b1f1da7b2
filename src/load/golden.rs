//! The report's printed forms, pinned byte for byte.
//!
//! People read the table and scripts parse the JSON, so a change to either must be deliberate.
//! The expected texts were captured from the code before the report and the run were split into
//! named steps; they go through [`render`], the command line's own path, so they cover what
//! `fulcrum load` prints and not just what one formatter returns. The `--svg` chart is pinned
//! the same way, by digest.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::report::NO_NODE;
use super::*;

/// Everything the table can show: paths, an open loop, unfinished requests, a node name wider
/// than the column heading, a node that missed a second, answers without a node, continuity
/// with the open-loop caveat.
fn busy() -> Report {
    Report {
        url: "http://127.0.0.1:8080/".into(),
        paths: vec!["/session".into(), "/a?b=1".into()],
        mode: Mode::Open,
        target_rate: Some(250.5),
        users: 3,
        started_unix_ms: 1_700_000_000_123,
        duration_s: 4.004,
        requests: 1003,
        unfinished: 2,
        achieved_rate: 250.5,
        nodes: BTreeMap::from([
            node(NO_NODE, 3, 0.3),
            node("edge-10.0.0.17:9001", 333, 33.3),
            node("web-1", 664, 66.4),
        ]),
        distribution: Distribution {
            shares: BTreeMap::from([
                ("edge-10.0.0.17:9001".to_owned(), 0.334),
                ("web-1".to_owned(), 0.666),
            ]),
            cv: Some(0.3327),
            max_min_ratio: Some(1.994),
        },
        statuses: BTreeMap::from([(200, 990), (404, 7), (503, 3)]),
        errors: ErrorCounts {
            total: 6,
            connect: 1,
            timeout: 1,
            reset: 0,
            status: 3,
            other: 1,
        },
        latency_ms: Latency {
            samples: 1000,
            p50: 1.203,
            p99: 12.5,
            p999: 48.127,
            max: 61.44,
        },
        sessions: Sessions {
            switches: 41,
            users_switched: 2,
            users_tracked: 3,
            users_reset: 1,
            resets: 17,
            continuity: Some(0.6667),
        },
        timeline: busy_timeline(),
        failover: None,
    }
}

/// One entry of `Report::nodes`.
fn node(name: &str, responses: u64, share_pct: f64) -> (String, NodeCount) {
    let count = NodeCount {
        responses,
        share_pct,
    };
    (name.to_owned(), count)
}

/// Second 1 misses a node and has one without a name, second 2 is empty.
fn busy_timeline() -> Vec<Second> {
    let second = |second, nodes: &[(&str, u64)], errors| Second {
        second,
        responses: nodes.iter().map(|(_, n)| n).sum(),
        nodes: nodes.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        errors,
        balancers: Vec::new(),
    };
    let failed = |connect, timeout, status, other| ErrorCounts {
        total: connect + timeout + status + other,
        connect,
        timeout,
        reset: 0,
        status,
        other,
    };
    vec![
        second(
            0,
            &[("web-1", 167), ("edge-10.0.0.17:9001", 84)],
            ErrorCounts::default(),
        ),
        second(1, &[("web-1", 246), (NO_NODE, 3)], failed(1, 0, 3, 0)),
        second(2, &[], ErrorCounts::default()),
        second(
            3,
            &[("web-1", 251), ("edge-10.0.0.17:9001", 249)],
            failed(0, 1, 0, 1),
        ),
    ]
}

/// Nothing answered: every "nothing to show" line.
fn silent() -> Report {
    Report {
        url: "http://[::1]:9/".into(),
        paths: Vec::new(),
        mode: Mode::Closed,
        target_rate: None,
        users: 1,
        started_unix_ms: 0,
        duration_s: 0.5,
        requests: 0,
        unfinished: 0,
        achieved_rate: 0.0,
        nodes: BTreeMap::new(),
        distribution: Distribution::default(),
        statuses: BTreeMap::new(),
        errors: ErrorCounts::default(),
        latency_ms: Latency::default(),
        sessions: Sessions::default(),
        timeline: Vec::new(),
        failover: None,
    }
}

/// One node in a closed loop: "1 node", and continuity without the open-loop caveat.
fn single() -> Report {
    Report {
        users: 2,
        duration_s: 1.25,
        requests: 4,
        achieved_rate: 3.2,
        nodes: BTreeMap::from([node("web-1", 4, 100.0)]),
        distribution: Distribution {
            shares: BTreeMap::from([("web-1".to_owned(), 1.0)]),
            cv: Some(0.0),
            max_min_ratio: Some(1.0),
        },
        statuses: BTreeMap::from([(200, 4)]),
        latency_ms: Latency {
            samples: 4,
            p50: 0.25,
            p99: 0.5,
            p999: 0.5,
            max: 0.5,
        },
        sessions: Sessions {
            users_tracked: 2,
            continuity: Some(1.0),
            ..Sessions::default()
        },
        timeline: vec![Second {
            second: 0,
            responses: 4,
            nodes: BTreeMap::from([("web-1".to_owned(), 4)]),
            errors: ErrorCounts::default(),
            balancers: Vec::new(),
        }],
        ..silent()
    }
}

fn printed(report: &Report, json: bool) -> String {
    let args = LoadArgs {
        json,
        ..LoadArgs::new(report.url.clone())
    };
    render(report, &args).expect("rendering without --svg cannot fail")
}

/// More nodes than the chart's legend has lines for, with names longer than it shows whole.
fn crowd() -> Report {
    let names: Vec<String> = (0..30)
        .map(|i| format!("backend-pool-eu-west-{i:02}.internal"))
        .collect();
    let mut report = busy();
    report.nodes = names.iter().map(|name| node(name, 10, 3.33)).collect();
    report.timeline = (0..90)
        .map(|second| Second {
            second,
            responses: 30,
            nodes: names
                .iter()
                .enumerate()
                .map(|(i, name)| (name.clone(), (second + i as u64) % 7))
                .collect(),
            errors: ErrorCounts {
                total: second % 5,
                ..ErrorCounts::default()
            },
            balancers: Vec::new(),
        })
        .collect();
    report
}

/// Shows both texts whole on a mismatch: a table diff is read by eye, not as an escaped string.
#[track_caller]
fn assert_same(what: &str, printed: &str, expected: &str) {
    assert!(
        printed == expected,
        "{what} changed.\n--- printed:\n{printed}\n--- expected:\n{expected}"
    );
}

#[test]
fn the_table_is_printed_as_before() {
    assert_same("busy table", &printed(&busy(), false), BUSY_TABLE);
    assert_same("silent table", &printed(&silent(), false), SILENT_TABLE);
    assert_same(
        "single-node table",
        &printed(&single(), false),
        SINGLE_TABLE,
    );
}

#[test]
fn the_json_is_printed_as_before() {
    assert_same("busy JSON", &printed(&busy(), true), BUSY_JSON);
    assert_same("silent JSON", &printed(&silent(), true), SILENT_JSON);
    assert_same("single-node JSON", &printed(&single(), true), SINGLE_JSON);
}

/// The chart is pinned by digest: 15 to 40 KB of SVG per fixture would drown the test. A
/// mismatch after a `plotters` upgrade is expected; look at the new charts, then update these.
#[test]
fn the_chart_is_drawn_as_before() {
    let pinned = [
        ("busy", busy(), BUSY_SVG_SHA256),
        ("silent", silent(), SILENT_SVG_SHA256),
        ("single", single(), SINGLE_SVG_SHA256),
        ("crowd", crowd(), CROWD_SVG_SHA256),
    ];
    for (name, report, expected) in pinned {
        let path = std::env::temp_dir().join(format!(
            "fulcrum-load-golden-{}-{name}.svg",
            std::process::id()
        ));
        write_svg(&report, &path, "drill").expect("the chart is written");
        let svg = std::fs::read(&path).expect("the chart is read back");
        std::fs::remove_file(&path).expect("the chart is removed");
        let digest: String = Sha256::digest(&svg)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(digest, expected, "the {name} chart changed");
    }
}

const BUSY_SVG_SHA256: &str = "998214edc19a996cc1dc471ec13f16a302d96501399ad049150936d84d003bd8";
const SILENT_SVG_SHA256: &str = "dc03acac3558f7650bb6c630fcdee38af44170157b8a81dc8988df81ac95d86c";
const SINGLE_SVG_SHA256: &str = "e1e6fd6107b869ff68db2b830cd9c8bb0c2efadacc99588b9dca9742bba265c5";
const CROWD_SVG_SHA256: &str = "d616f41409ff2e42820897e0e48b468975b1f15e30fb8e11277ddf19b7639b62";

const BUSY_TABLE: &str = r#"fulcrum load  http://127.0.0.1:8080/  paths /session, /a?b=1
  3 users, open loop at 250.5 req/s, started 2023-11-14T22:13:20.123Z (unix ms 1700000000123)
  4.00 s, 1003 requests, 250.5 req/s, 2 unfinished at the end

  node                  responses    share
  (none)                        3     0.3%
  edge-10.0.0.17:9001         333    33.3%
  web-1                       664    66.4%

  statuses  200: 990, 404: 7, 503: 3
  errors    6 (connect 1, timeout 1, reset 0, status 3, other 1)
  latency   p50 1.203 ms, p99 12.500 ms, p99.9 48.127 ms, max 61.440 ms (1000 samples)
  evenness  cv 0.3327, max/min 1.994 over 2 nodes; shares edge-10.0.0.17:9001 33.4%, web-1 66.6%
  sessions  41 node switches, 2 of 3 users switched at least once
            continuity 66.7%: 1 of 3 users saw their visit count reset (17 resets); open loop: a user's overlapping requests can read as resets

  timeline (answers per node and errors, per second)
      s  (none)  edge-10.0.0.17:9001   web-1  errors
      0       0                   84     167       0
      1       3                    0     246       4
      2       0                    0       0       0
      3       0                  249     251       2
"#;

const BUSY_JSON: &str = r#"{
  "url": "http://127.0.0.1:8080/",
  "paths": [
    "/session",
    "/a?b=1"
  ],
  "mode": "open",
  "target_rate": 250.5,
  "users": 3,
  "started_unix_ms": 1700000000123,
  "duration_s": 4.004,
  "requests": 1003,
  "unfinished": 2,
  "achieved_rate": 250.5,
  "nodes": {
    "(none)": {
      "responses": 3,
      "share_pct": 0.3
    },
    "edge-10.0.0.17:9001": {
      "responses": 333,
      "share_pct": 33.3
    },
    "web-1": {
      "responses": 664,
      "share_pct": 66.4
    }
  },
  "distribution": {
    "shares": {
      "edge-10.0.0.17:9001": 0.334,
      "web-1": 0.666
    },
    "cv": 0.3327,
    "max_min_ratio": 1.994
  },
  "statuses": {
    "200": 990,
    "404": 7,
    "503": 3
  },
  "errors": {
    "total": 6,
    "connect": 1,
    "timeout": 1,
    "reset": 0,
    "status": 3,
    "other": 1
  },
  "latency_ms": {
    "samples": 1000,
    "p50": 1.203,
    "p99": 12.5,
    "p999": 48.127,
    "max": 61.44
  },
  "sessions": {
    "switches": 41,
    "users_switched": 2,
    "users_tracked": 3,
    "users_reset": 1,
    "resets": 17,
    "continuity": 0.6667
  },
  "timeline": [
    {
      "second": 0,
      "responses": 251,
      "nodes": {
        "edge-10.0.0.17:9001": 84,
        "web-1": 167
      },
      "errors": {
        "total": 0,
        "connect": 0,
        "timeout": 0,
        "reset": 0,
        "status": 0,
        "other": 0
      }
    },
    {
      "second": 1,
      "responses": 249,
      "nodes": {
        "(none)": 3,
        "web-1": 246
      },
      "errors": {
        "total": 4,
        "connect": 1,
        "timeout": 0,
        "reset": 0,
        "status": 3,
        "other": 0
      }
    },
    {
      "second": 2,
      "responses": 0,
      "nodes": {},
      "errors": {
        "total": 0,
        "connect": 0,
        "timeout": 0,
        "reset": 0,
        "status": 0,
        "other": 0
      }
    },
    {
      "second": 3,
      "responses": 500,
      "nodes": {
        "edge-10.0.0.17:9001": 249,
        "web-1": 251
      },
      "errors": {
        "total": 2,
        "connect": 0,
        "timeout": 1,
        "reset": 0,
        "status": 0,
        "other": 1
      }
    }
  ]
}"#;

const SILENT_TABLE: &str = r#"fulcrum load  http://[::1]:9/
  1 users, closed loop, started 1970-01-01T00:00:00.000Z (unix ms 0)
  0.50 s, 0 requests, 0.0 req/s

  node   responses    share
  (no answers)

  statuses  -
  errors    0 (connect 0, timeout 0, reset 0, status 0, other 0)
  latency   p50 0.000 ms, p99 0.000 ms, p99.9 0.000 ms, max 0.000 ms (0 samples)
  evenness  - (no answer named a node)
  sessions  0 node switches, 0 of 1 users switched at least once
            continuity -: no answer carried x-session-visits (try --path /session)

  timeline (answers per node and errors, per second)
      s  errors
"#;

const SILENT_JSON: &str = r#"{
  "url": "http://[::1]:9/",
  "paths": [],
  "mode": "closed",
  "target_rate": null,
  "users": 1,
  "started_unix_ms": 0,
  "duration_s": 0.5,
  "requests": 0,
  "unfinished": 0,
  "achieved_rate": 0.0,
  "nodes": {},
  "distribution": {
    "shares": {},
    "cv": null,
    "max_min_ratio": null
  },
  "statuses": {},
  "errors": {
    "total": 0,
    "connect": 0,
    "timeout": 0,
    "reset": 0,
    "status": 0,
    "other": 0
  },
  "latency_ms": {
    "samples": 0,
    "p50": 0.0,
    "p99": 0.0,
    "p999": 0.0,
    "max": 0.0
  },
  "sessions": {
    "switches": 0,
    "users_switched": 0,
    "users_tracked": 0,
    "users_reset": 0,
    "resets": 0,
    "continuity": null
  },
  "timeline": []
}"#;

const SINGLE_TABLE: &str = r#"fulcrum load  http://[::1]:9/
  2 users, closed loop, started 1970-01-01T00:00:00.000Z (unix ms 0)
  1.25 s, 4 requests, 3.2 req/s

  node    responses    share
  web-1           4   100.0%

  statuses  200: 4
  errors    0 (connect 0, timeout 0, reset 0, status 0, other 0)
  latency   p50 0.250 ms, p99 0.500 ms, p99.9 0.500 ms, max 0.500 ms (4 samples)
  evenness  cv 0.0000, max/min 1.000 over 1 node; shares web-1 100.0%
  sessions  0 node switches, 0 of 2 users switched at least once
            continuity 100.0%: 0 of 2 users saw their visit count reset (0 resets)

  timeline (answers per node and errors, per second)
      s   web-1  errors
      0       4       0
"#;

const SINGLE_JSON: &str = r#"{
  "url": "http://[::1]:9/",
  "paths": [],
  "mode": "closed",
  "target_rate": null,
  "users": 2,
  "started_unix_ms": 0,
  "duration_s": 1.25,
  "requests": 4,
  "unfinished": 0,
  "achieved_rate": 3.2,
  "nodes": {
    "web-1": {
      "responses": 4,
      "share_pct": 100.0
    }
  },
  "distribution": {
    "shares": {
      "web-1": 1.0
    },
    "cv": 0.0,
    "max_min_ratio": 1.0
  },
  "statuses": {
    "200": 4
  },
  "errors": {
    "total": 0,
    "connect": 0,
    "timeout": 0,
    "reset": 0,
    "status": 0,
    "other": 0
  },
  "latency_ms": {
    "samples": 4,
    "p50": 0.25,
    "p99": 0.5,
    "p999": 0.5,
    "max": 0.5
  },
  "sessions": {
    "switches": 0,
    "users_switched": 0,
    "users_tracked": 2,
    "users_reset": 0,
    "resets": 0,
    "continuity": 1.0
  },
  "timeline": [
    {
      "second": 0,
      "responses": 4,
      "nodes": {
        "web-1": 4
      },
      "errors": {
        "total": 0,
        "connect": 0,
        "timeout": 0,
        "reset": 0,
        "status": 0,
        "other": 0
      }
    }
  ]
}"#;
