//! The shipped Prometheus files pass promtool: the rules are valid, their unit tests
//! (deploy/prometheus/fulcrum-rules.test.yml: every alert fires on one input and stays quiet on
//! another) pass, and the example config with its rule file is valid.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::tool_available;

fn deploy_prometheus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus")
}

/// Runs `promtool ARGS` in deploy/prometheus and returns its stdout; fails with its output
/// unless it succeeds. `None` when promtool is missing and `FULCRUM_SKIP_PROMTOOL=1`.
fn promtool(args: &[&str]) -> Option<String> {
    if !tool_available(
        "promtool",
        "FULCRUM_SKIP_PROMTOOL",
        "Debian/Ubuntu: `apt-get install prometheus`, or a Prometheus release tarball",
    ) {
        return None;
    }
    let output = Command::new("promtool")
        .args(args)
        .current_dir(deploy_prometheus())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    Some(text)
}

#[test]
fn the_rules_file_passes_promtool_check_rules() {
    if let Some(out) = promtool(&["check", "rules", "fulcrum-rules.yml"]) {
        assert!(out.contains("SUCCESS"), "{out}");
    }
}

#[test]
fn every_alert_fires_and_stays_quiet_in_the_promtool_unit_tests() {
    let Some(out) = promtool(&["test", "rules", "fulcrum-rules.test.yml"]) else {
        return;
    };
    assert!(out.contains("SUCCESS"), "{out}");
    // Each alert of the rules file has a unit test.
    let rules = std::fs::read_to_string(deploy_prometheus().join("fulcrum-rules.yml")).unwrap();
    let tests =
        std::fs::read_to_string(deploy_prometheus().join("fulcrum-rules.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "no unit test for {alert}"
        );
    }
}

#[test]
fn the_example_scrape_config_passes_promtool_check_config() {
    if let Some(out) = promtool(&["check", "config", "prometheus.yml"]) {
        assert!(out.contains("SUCCESS"), "{out}");
    }
}
