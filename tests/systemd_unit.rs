//! deploy/systemd/fulcrum.service: `systemd-analyze verify` finds nothing to say about it, its
//! hardening scores as "OK" in `systemd-analyze security`, and its `ExecStartPre` (and
//! `ExecReload`) check stops a start or reload on a broken config.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::tool_available;

const INSTALLED_BINARY: &str = "/usr/local/bin/fulcrum";
const INSTALLED_CONFIG: &str = "/etc/fulcrum/fulcrum.toml";

fn unit_text() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/fulcrum.service"),
    )
    .unwrap()
}

fn systemd_analyze_available() -> bool {
    tool_available(
        "systemd-analyze",
        "FULCRUM_SKIP_SYSTEMD",
        "Debian/Ubuntu: `apt-get install systemd`",
    )
}

/// A directory of the test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("fulcrum-systemd-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The unit as `fulcrum.service` in `dir`, its binary being the one this build made (verify
/// checks that every command it names exists).
fn installed_copy(dir: &TempDir) -> PathBuf {
    let unit = unit_text().replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_fulcrum"));
    let path = dir.0.join("fulcrum.service");
    std::fs::write(&path, unit).unwrap();
    path
}

fn report(output: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_without_a_warning() {
    if !systemd_analyze_available() {
        return;
    }
    let dir = TempDir::new("verify");
    let unit = installed_copy(&dir);
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", report(&output));
    // verify exits 0 on unknown keys and bad values, which it only prints.
    assert!(output.stderr.is_empty(), "{}", report(&output));
}

#[test]
fn the_units_hardening_scores_ok_in_systemd_analyze_security() {
    if !systemd_analyze_available() {
        return;
    }
    let dir = TempDir::new("security");
    let unit = installed_copy(&dir);
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = report(&output);
    let exposure: f64 = text
        .split("Overall exposure level for fulcrum.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|level| level.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    // systemd rates 0-2 as "OK", above that "MEDIUM", "EXPOSED", "UNSAFE".
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
}

#[test]
fn the_units_exec_start_pre_check_fails_on_a_broken_config_and_passes_a_valid_one() {
    let unit = unit_text();
    let command_of = |key: &str| {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let pre = command_of("ExecStartPre=");
    assert_eq!(pre.len(), 1, "{pre:?}");
    assert!(
        command_of("ExecReload=").contains(&pre[0]),
        "a reload checks the config first too"
    );
    assert!(command_of("ExecReload=").contains(&"/bin/kill -HUP $MAINPID".to_owned()));
    let dir = TempDir::new("exec-start-pre");
    let run = |config: &str| -> Output {
        let path = dir.0.join("fulcrum.toml");
        std::fs::write(&path, config).unwrap();
        let line = pre[0].replace(INSTALLED_CONFIG, path.to_str().unwrap());
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some(INSTALLED_BINARY));
        Command::new(env!("CARGO_BIN_EXE_fulcrum"))
            .args(words)
            .output()
            .unwrap()
    };
    let valid = "[[listeners]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n\
                 [pools.web]\nstrategy = \"round_robin\"\nbackends = [{ address = \"127.0.0.1:9001\" }]\n";
    let output = run(valid);
    assert!(output.status.success(), "{}", report(&output));

    let broken = valid.replace("round_robin", "round_robbin");
    let output = run(&broken);
    assert_eq!(output.status.code(), Some(1), "{}", report(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("fulcrum.toml:5:") && stderr.contains("strategy"),
        "{}",
        report(&output)
    );
}
