//! An HAProxy of a test's own in TCP mode on a free loopback port, sending a PROXY protocol
//! header to the one server behind it, as an L4 tier in front of fulcrum would.
//!
//! A missing `haproxy` fails the test; `FULCRUM_SKIP_HAPROXY=1` turns that into a skip,
//! announced on stderr with `SKIPPED`. `.ci/run` installs it, so CI always runs them.
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::free_port;

/// How long HAProxy may take to accept connections after it was started.
const STARTUP: Duration = Duration::from_secs(10);

/// Debian installs it outside a normal user's `PATH`.
const CANDIDATES: [&str; 2] = ["haproxy", "/usr/sbin/haproxy"];

/// A running HAProxy, killed (by its PID) and its directory removed on drop.
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
    /// Where clients connect.
    pub addr: SocketAddr,
}

/// The `haproxy` to run, when one runs (`haproxy -v`; it has no `--version`).
fn binary() -> Option<&'static str> {
    CANDIDATES.into_iter().find(|bin| {
        Command::new(bin)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Whether this test may use HAProxy: fails loudly when it is missing, unless
/// `FULCRUM_SKIP_HAPROXY=1` (see [`super::tool_available`]).
pub fn haproxy_available() -> bool {
    binary().is_some()
        || super::tool_available(
            "haproxy",
            "FULCRUM_SKIP_HAPROXY",
            "Debian/Ubuntu: `apt-get install haproxy`",
        )
}

impl Haproxy {
    /// HAProxy in TCP mode forwarding every connection to `server` with `send_proxy`
    /// (`send-proxy` for v1, `send-proxy-v2`), health-checking it with the same header, or
    /// `None` when the test is to be skipped.
    pub fn start(test: &str, server: SocketAddr, send_proxy: &str) -> Option<Self> {
        if !haproxy_available() {
            return None;
        }
        let bin = binary()?;
        let dir =
            std::env::temp_dir().join(format!("fulcrum-haproxy-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Another process may take the free port before HAProxy binds it: try a few.
        for _ in 0..3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, config_text(addr, server, send_proxy)).unwrap();
            let mut child = Command::new(bin)
                .arg("-db")
                .arg("-f")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn haproxy");
            if wait_ready(&mut child, addr) {
                return Some(Self { child, dir, addr });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("haproxy did not start on any of three free ports");
    }
}

/// Whether HAProxy accepts connections on `addr` within [`STARTUP`]; false if it exited (the
/// port was taken).
fn wait_ready(child: &mut Child, addr: SocketAddr) -> bool {
    let start = Instant::now();
    while start.elapsed() < STARTUP {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `no strict-limits`: a container's low file limit must not stop it from starting.
fn config_text(bind: SocketAddr, server: SocketAddr, send_proxy: &str) -> String {
    format!(
        "global
    no strict-limits
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend l4
    bind {bind}
    default_backend balancers

backend balancers
    server fulcrum {server} {send_proxy} check inter 200ms
"
    )
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
