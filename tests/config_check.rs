//! `fulcrum check -c FILE` on each kind of config mistake, through the real binary: exit 1 and a
//! `FILE:LINE:COL: key: message` line on stderr that points at the mistake. Valid files exit 0
//! with a summary on stdout.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A config written to a file of its own for one test, removed when the test ends (also when it
/// fails), so parallel tests and repeated runs never share a file.
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    fn new(test: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "fulcrum-config-check-{}-{test}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("write temp config");
        Self { path }
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What `fulcrum check` said about one file.
struct Checked {
    output: Output,
    file: String,
}

impl Checked {
    fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Every stderr line as `(line, column, "key: message")`; panics on a line that is not a
    /// located diagnostic for this file, so stray output fails the test too.
    fn diagnostics(&self) -> Vec<(usize, usize, String)> {
        let stderr = self.stderr();
        stderr
            .lines()
            .map(|l| {
                let rest = l
                    .strip_prefix(&self.file)
                    .and_then(|r| r.strip_prefix(':'))
                    .unwrap_or_else(|| panic!("not a diagnostic for {}: {l:?}", self.file));
                let mut parts = rest.splitn(3, ':');
                let mut number = || {
                    parts
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| panic!("no line:col in {l:?}"))
                };
                let (line, column) = (number(), number());
                let message = parts.next().unwrap_or_default().trim_start().to_owned();
                (line, column, message)
            })
            .collect()
    }

    /// Asserts exit 1 and a diagnostic at `line:column` (any column when `None`) whose
    /// `key: message` contains every piece of `expected`.
    #[track_caller]
    fn assert_error(&self, line: usize, column: Option<usize>, expected: &[&str]) {
        assert_eq!(self.code(), Some(1), "stderr:\n{}", self.stderr());
        let found = self.diagnostics().into_iter().any(|(l, c, message)| {
            l == line
                && column.is_none_or(|col| col == c)
                && expected.iter().all(|e| message.contains(e))
        });
        assert!(
            found,
            "no diagnostic at {line}:{} containing {expected:?} in:\n{}",
            column.map_or("*".to_owned(), |c| c.to_string()),
            self.stderr()
        );
    }
}

fn check(path: &Path) -> Checked {
    let output = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "-c"])
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .expect("run fulcrum check");
    Checked {
        output,
        file: path.display().to_string(),
    }
}

fn check_text(test: &str, text: &str) -> Checked {
    let file = ConfigFile::new(test, text);
    check(&file.path)
}

/// The smallest config `fulcrum run` accepts: one listener, one pool with one backend.
const MINIMAL: &str = r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
backends = [{ address = "127.0.0.1:9001" }]
"#;

#[test]
fn unknown_key_is_an_error_with_its_line() {
    let checked = check_text(
        "unknown_key",
        r#"[[listeners]]
bind = "127.0.0.1:8080"
bnd = "127.0.0.1:8081"

[pools.web]
backends = [{ address = "127.0.0.1:9001" }]
"#,
    );
    checked.assert_error(3, Some(1), &["listeners[0].bnd: unknown field `bnd`"]);
}

#[test]
fn listener_bind_must_be_an_ip_and_port() {
    let checked = check_text(
        "listener_bind",
        r#"[[listeners]]
bind = "localhost"

[pools.web]
backends = [{ address = "127.0.0.1:9001" }]
"#,
    );
    // Column 8 is the opening quote of the value.
    checked.assert_error(
        2,
        Some(8),
        &["listeners[0].bind: `localhost` is not an IP:port address"],
    );
}

#[test]
fn backend_address_must_be_an_ip_and_port() {
    let checked = check_text(
        "backend_address",
        r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
backends = [
  { address = "127.0.0.1:9001" },
  { address = "300.1.1.1:80" },
]
"#,
    );
    checked.assert_error(
        7,
        Some(15),
        &["pools.web.backends[1].address: `300.1.1.1:80` is not an IP:port address"],
    );
}

#[test]
fn zero_weight_is_out_of_range() {
    let checked = check_text(
        "zero_weight",
        r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
backends = [
  { address = "127.0.0.1:9001" },
  { address = "127.0.0.1:9002", weight = 0 },
]
"#,
    );
    checked.assert_error(
        7,
        Some(42),
        &["pools.web.backends[1].weight: must be between 1 and 256"],
    );
}

#[test]
fn duplicate_backend_name_is_an_error_at_the_second_one() {
    let checked = check_text(
        "duplicate_name",
        r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
backends = [
  { address = "127.0.0.1:9001", name = "a" },
  { address = "127.0.0.1:9002", name = "a" },
]
"#,
    );
    checked.assert_error(
        7,
        Some(40),
        &["pools.web.backends[1].name: duplicate backend `a`"],
    );
}

#[test]
fn duplicate_backend_address_is_an_error_at_the_second_one() {
    let checked = check_text(
        "duplicate_address",
        r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
backends = [
  { address = "127.0.0.1:9001", name = "a" },
  { address = "127.0.0.1:9001", name = "b" },
]
"#,
    );
    checked.assert_error(
        7,
        Some(15),
        &["pools.web.backends[1].address: duplicate backend address 127.0.0.1:9001"],
    );
}

#[test]
fn a_backend_named_like_another_backends_address_is_a_duplicate_name() {
    // The unnamed backend's name is its address: two nodes would share one identity.
    let checked = check_text(
        "duplicate_identity",
        r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
backends = [
  { address = "127.0.0.1:9001", name = "127.0.0.1:9002" },
  { address = "127.0.0.1:9002" },
]
"#,
    );
    checked.assert_error(
        7,
        Some(15),
        &["pools.web.backends[1].name: duplicate backend `127.0.0.1:9002`"],
    );
    assert_eq!(checked.diagnostics().len(), 1, "{}", checked.stderr());
}

#[test]
fn route_to_an_unknown_pool_is_an_error() {
    let checked = check_text(
        "route_unknown_pool",
        &format!("{MINIMAL}\n[[routes]]\npath_prefix = \"/api/\"\npool = \"api\"\n"),
    );
    checked.assert_error(9, Some(8), &["routes[0].pool: no pool named `api`"]);
}

#[test]
fn bad_duration_names_the_key() {
    let checked = check_text(
        "bad_duration",
        r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
response_timeout = "soon"
backends = [{ address = "127.0.0.1:9001" }]
"#,
    );
    checked.assert_error(
        5,
        Some(20),
        &["pools.web.response_timeout: `soon` is not a duration"],
    );
}

#[test]
fn non_loopback_admin_bind_needs_a_token() {
    let without = check_text(
        "admin_without_token",
        &format!("{MINIMAL}\n[admin]\nbind = \"0.0.0.0:9090\"\n"),
    );
    without.assert_error(
        8,
        Some(8),
        &["admin.bind: a non-loopback admin bind needs admin.token"],
    );

    let with = check_text(
        "admin_with_token",
        &format!("{MINIMAL}\n[admin]\nbind = \"0.0.0.0:9090\"\ntoken = \"s3cret\"\n"),
    );
    assert_eq!(with.code(), Some(0), "stderr:\n{}", with.stderr());
}

#[test]
fn several_pools_without_routes_is_an_error() {
    let checked = check_text(
        "pools_without_routes",
        &format!("{MINIMAL}\n[pools.api]\nbackends = [{{ address = \"127.0.0.1:9101\" }}]\n"),
    );
    // The mistake is something missing, so it has no line of its own; only the key is checked.
    assert_eq!(checked.code(), Some(1), "stderr:\n{}", checked.stderr());
    let diagnostics = checked.diagnostics();
    assert!(
        diagnostics
            .iter()
            .any(|(_, _, m)| m.starts_with("routes: ") && m.contains("[[routes]]")),
        "{}",
        checked.stderr()
    );
}

#[test]
fn toml_syntax_error_has_file_line_and_column() {
    let checked = check_text(
        "syntax_error",
        r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web
backends = [{ address = "127.0.0.1:9001" }]
"#,
    );
    // Column 11 is where the missing `]` should be.
    checked.assert_error(4, Some(11), &[]);
    assert_eq!(checked.diagnostics().len(), 1, "{}", checked.stderr());
}

#[test]
fn all_mistakes_in_a_file_are_reported_in_one_run() {
    let checked = check_text(
        "several_mistakes",
        r#"[[listeners]]
bind = "localhost"

[admin]
bind = "0.0.0.0:9090"

[pools.web]
response_timeout = "soon"
backends = [
  { address = "300.1.1.1:80" },
  { address = "127.0.0.1:9002", weight = 0 },
  { address = "127.0.0.1:9003", name = "x" },
  { address = "127.0.0.1:9004", name = "x" },
]

[[routes]]
pool = "nope"
"#,
    );
    let expected = [
        (2, "listeners[0].bind:"),
        (5, "admin.bind:"),
        (8, "pools.web.response_timeout:"),
        (10, "pools.web.backends[0].address:"),
        (11, "pools.web.backends[1].weight:"),
        (13, "pools.web.backends[3].name: duplicate backend `x`"),
        (17, "routes[0].pool:"),
    ];
    for (line, key) in expected {
        checked.assert_error(line, None, &[key]);
    }
    let diagnostics = checked.diagnostics();
    assert_eq!(diagnostics.len(), expected.len(), "{}", checked.stderr());
    let lines: Vec<usize> = diagnostics.iter().map(|(l, _, _)| *l).collect();
    assert!(
        lines.is_sorted(),
        "diagnostics are in file order: {lines:?}"
    );
}

#[test]
fn missing_file_is_named_and_fails() {
    let path = std::env::temp_dir().join(format!(
        "fulcrum-config-check-{}-does-not-exist.toml",
        std::process::id()
    ));
    let checked = check(&path);
    assert_eq!(checked.code(), Some(1), "stderr:\n{}", checked.stderr());
    let stderr = checked.stderr();
    assert!(
        stderr.starts_with(&checked.file) && stderr.contains("cannot read config"),
        "{stderr}"
    );
}

#[test]
fn repository_example_config_is_valid_and_summarised() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fulcrum.toml");
    let checked = check(&path);
    assert_eq!(checked.code(), Some(0), "stderr:\n{}", checked.stderr());
    let stdout = checked.stdout();
    assert!(
        stdout.starts_with(&format!("{}: ok", checked.file)),
        "{stdout}"
    );
    for pool in ["web", "api"] {
        let listed = stdout.lines().any(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some("pool") && words.next() == Some(pool)
        });
        assert!(listed, "pool {pool} missing from the summary:\n{stdout}");
    }
}

#[test]
fn minimal_config_is_valid() {
    let checked = check_text("minimal", MINIMAL);
    assert_eq!(checked.code(), Some(0), "stderr:\n{}", checked.stderr());
    assert!(checked.stdout().contains(": ok"), "{}", checked.stdout());
}

#[test]
fn absurd_durations_and_counts_are_errors_naming_their_keys() {
    let checked = check_text(
        "absurd_values",
        r#"[[listeners]]
bind = "127.0.0.1:8080"
idle_timeout = "3ns"
header_read_timeout = "400d"
max_connections = 18446744073709551615

[pools.web]
strategy = "sticky_cookie"
response_timeout = "25h"
backends = [{ address = "127.0.0.1:9001" }]

[pools.web.sticky]
secret = "k"
max_age = "1000y"
"#,
    );
    checked.assert_error(
        3,
        None,
        &["listeners[0].idle_timeout: must be between 1ms and 24h"],
    );
    checked.assert_error(
        4,
        None,
        &["listeners[0].header_read_timeout: must be between"],
    );
    checked.assert_error(
        5,
        None,
        &["listeners[0].max_connections: must be between 1 and 10000000"],
    );
    checked.assert_error(
        9,
        None,
        &["pools.web.response_timeout: must be between 1ms and 24h"],
    );
    checked.assert_error(
        14,
        None,
        &["pools.web.sticky.max_age: must be between 1ms and 400d"],
    );
}

#[test]
fn a_health_timeout_longer_than_the_interval_is_accepted() {
    let checked = check_text(
        "health_timeout_over_interval",
        &format!("{MINIMAL}\n[pools.web.health]\ninterval = \"100ms\"\ntimeout = \"300ms\"\n"),
    );
    assert_eq!(checked.code(), Some(0), "stderr:\n{}", checked.stderr());
}

#[test]
fn health_interval_and_timeout_outside_a_millisecond_to_an_hour_name_the_key() {
    let checked = check_text(
        "health_bounds",
        &format!("{MINIMAL}\n[pools.web.health]\ninterval = \"90m\"\ntimeout = \"0ms\"\n"),
    );
    checked.assert_error(
        8,
        Some(12),
        &["pools.web.health.interval: must be between 1ms and 1h (got `90m`)"],
    );
    checked.assert_error(
        9,
        Some(11),
        &["pools.web.health.timeout: must be greater than zero"],
    );
    let tiny = check_text(
        "health_tiny_interval",
        &format!("{MINIMAL}\n[pools.web.health]\ninterval = \"999us\"\n"),
    );
    tiny.assert_error(
        8,
        Some(12),
        &["pools.web.health.interval: must be between 1ms and 1h (got `999us`)"],
    );
}
