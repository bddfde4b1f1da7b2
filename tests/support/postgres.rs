//! A PostgreSQL server of a test's own: a fresh cluster in a scratch directory on a free loopback
//! port, for the shared registry store and the web node's durable sessions.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
//! `postgres` user the Debian package creates. A missing PostgreSQL fails the test;
//! `FULCRUM_SKIP_POSTGRES=1` turns that into an announced skip. `.ci/run` installs it.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::free_port;

/// How long the server may take to accept connections after `pg_ctl start`.
const STARTUP: Duration = Duration::from_secs(30);

/// A running PostgreSQL cluster, stopped (immediate mode) and deleted on drop.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    running: bool,
}

/// The newest installed server's `bin` directory (`/usr/lib/postgresql/<version>/bin`).
fn server_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether this test may use PostgreSQL: fails loudly when it is missing, unless
/// `FULCRUM_SKIP_POSTGRES=1`.
pub fn postgres_available() -> bool {
    if server_bin().is_some() && psql_installed() {
        return true;
    }
    super::tool_available(
        "pg_ctl-and-psql",
        "FULCRUM_SKIP_POSTGRES",
        "Debian/Ubuntu: `apt-get install postgresql`",
    )
}

fn psql_installed() -> bool {
    Command::new("psql")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A command run as the `postgres` user when we are root, as ourselves otherwise.
fn as_server_user(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// A fresh cluster on a free port, or `None` when the test is to be skipped.
    pub fn start() -> Option<Self> {
        if !postgres_available() {
            return None;
        }
        let bin = server_bin().expect("checked by postgres_available");
        let dir =
            std::env::temp_dir().join(format!("fulcrum-pg-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        if running_as_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown {}", dir.display());
        }
        let status = as_server_user(&bin.join("initdb"))
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb in {}", dir.display());
        let mut server = Postgres {
            bin,
            dir,
            port: 0,
            running: false,
        };
        // Another process may take the free port before the server binds it: try a few.
        for _ in 0..3 {
            server.port = free_port();
            if server.try_start() {
                return Some(server);
            }
        }
        panic!("PostgreSQL did not start on any of three free ports");
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: trust authentication, loopback only.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> bool {
        as_server_user(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(self.dir.join("data"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn try_start(&mut self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        let log = log.to_str().unwrap();
        if !self.pg_ctl(&["-w", "-t", "30", "-l", log, "-o", &options, "start"]) {
            return false;
        }
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if self.try_psql("SELECT 1").is_some() {
                self.running = true;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Stops the server at once (clients are cut off), keeping its data: an outage drill.
    pub fn stop(&mut self) {
        assert!(
            self.pg_ctl(&["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop"
        );
        self.running = false;
    }

    /// Starts a stopped server again on the same port with the same data.
    pub fn restart(&mut self) {
        assert!(!self.running, "restart() after stop()");
        assert!(
            self.try_start(),
            "PostgreSQL restarts on port {}",
            self.port
        );
    }

    /// Runs SQL through `psql` and returns its unaligned, tuples-only output (rows on lines,
    /// columns separated by `|`), panicking on an SQL error.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|| panic!("psql failed on: {sql}"))
    }

    fn try_psql(&self, sql: &str) -> Option<String> {
        let output = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url())
            .args(["-c", sql])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
