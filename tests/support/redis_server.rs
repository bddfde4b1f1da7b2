//! A `redis-server` of a test's own on a free loopback port, for the web node's Redis
//! sessions.
//!
//! A missing `redis-server` fails the test: a suite that passes without running its Redis tests
//! says nothing about Redis. `FULCRUM_SKIP_REDIS=1` turns that into a skip, announced on
//! stderr with `SKIPPED`, for a machine that cannot install it. `.ci/run` installs it, so CI
//! always runs them.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer PING after it was started.
const STARTUP: Duration = Duration::from_secs(10);

/// A `redis-server` on a loopback port, killed (by its PID) on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

/// Whether this test may use `redis-server` (see [`super::tool_available`]).
pub fn redis_available() -> bool {
    super::tool_available(
        "redis-server",
        "FULCRUM_SKIP_REDIS",
        "Debian/Ubuntu: `apt-get install redis-server`",
    )
}

/// A port nothing listens on right now (the OS picks it; it is released at once).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

impl RedisServer {
    /// A server on a free port, or `None` when the test is to be skipped (see
    /// [`redis_available`]).
    pub fn start() -> Option<Self> {
        if !redis_available() {
            return None;
        }
        // Another process may take the free port before redis binds it: try a few.
        for _ in 0..3 {
            if let Some(server) = Self::start_on(free_port()) {
                return Some(server);
            }
        }
        panic!("redis-server did not start on any of three free ports");
    }

    /// A server on `port`, once it answers PING; `None` if it exited (the port was taken).
    pub fn start_on(port: u16) -> Option<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut server = RedisServer { child, port };
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if server.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            if server.try_command(&["PING"]).as_deref() == Some("PONG") {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {port} did not answer PING within {STARTUP:?}");
    }

    /// Sends one command and returns its simple answer (status, integer or bulk string).
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|| panic!("redis answers {args:?}"))
    }

    /// RESP by hand: the tests need four commands, not a second client.
    fn try_command(&self, args: &[&str]) -> Option<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 256];
        // Every answer used here ends in CRLF; a bulk string ends in a second one.
        loop {
            let n = stream.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            let lines = text.matches("\r\n").count();
            let bulk = text.starts_with('$') && !text.starts_with("$-1");
            if lines >= if bulk { 2 } else { 1 } {
                break;
            }
        }
        let text = String::from_utf8(answer).ok()?;
        let mut lines = text.split("\r\n");
        let first = lines.next()?;
        match first.as_bytes().first()? {
            b'+' | b':' => Some(first[1..].to_owned()),
            b'$' if first == "$-1" => Some(String::new()),
            b'$' => lines.next().map(str::to_owned),
            _ => None,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL to this child's PID only; wait reaps it so no zombie is left.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
