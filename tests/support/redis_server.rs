//! A `redis-server` of a test's own on a free loopback port, for the web node's Redis
//! sessions, and a three-master Redis Cluster of a test's own ([`RedisCluster`]).
//!
//! A missing `redis-server` fails the test: a suite that passes without running its Redis tests
//! says nothing about Redis. `FULCRUM_SKIP_REDIS=1` turns that into a skip, announced on
//! stderr with `SKIPPED`, for a machine that cannot install it. `.ci/run` installs it, so CI
//! always runs them.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
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
        Self::start_with(port, &[])
    }

    /// [`RedisServer::start_on`] with more `redis-server` arguments.
    fn start_with(port: u16, extra: &[&str]) -> Option<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
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
        let mut buf = [0u8; 4096];
        // Every answer used here is one line, or a bulk string: `$LEN` line, LEN bytes, CRLF
        // (CLUSTER INFO's holds CRLFs of its own, so its length decides).
        loop {
            let n = stream.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            let Some(eol) = answer.windows(2).position(|w| w == b"\r\n") else {
                continue;
            };
            let header = String::from_utf8_lossy(&answer[..eol]).into_owned();
            let needed = match header.strip_prefix('$') {
                Some(len) if len != "-1" => eol + 2 + len.parse::<usize>().ok()? + 2,
                _ => eol + 2,
            };
            if answer.len() >= needed {
                break;
            }
        }
        let text = String::from_utf8(answer).ok()?;
        let mut lines = text.split("\r\n");
        let first = lines.next()?;
        match first.as_bytes().first()? {
            b'+' | b':' => Some(first[1..].to_owned()),
            b'$' if first == "$-1" => Some(String::new()),
            b'$' => {
                let len: usize = first[1..].parse().ok()?;
                let start = first.len() + 2;
                text.get(start..start + len).map(str::to_owned)
            }
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

/// How long a new cluster may take to agree on its slots (`cluster_state:ok` on every master).
const CLUSTER_FORMING: Duration = Duration::from_secs(30);

/// Three `redis-server --cluster-enabled yes` masters on free loopback ports, their 16384 slots
/// split by `redis-cli --cluster create` (no replicas): the seed's three-shard session cluster.
pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// A formed cluster, or `None` when the test is to be skipped (see [`redis_available`]).
    pub fn start() -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "fulcrum-redis-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut masters = Vec::new();
        for _ in 0..20 {
            if masters.len() == 3 {
                break;
            }
            // The cluster bus listens on PORT + 10000: keep that within range.
            let port = free_port();
            if port > 55_000 {
                continue;
            }
            let config = dir.join(format!("nodes-{port}.conf"));
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                config.to_str().unwrap(),
                "--cluster-node-timeout",
                "5000",
                "--dir",
                dir.to_str().unwrap(),
            ];
            // A port another process took in the meantime: draw another.
            if let Some(server) = RedisServer::start_with(port, &args) {
                masters.push(server);
            }
        }
        assert_eq!(masters.len(), 3, "three cluster masters started");
        let cluster = RedisCluster { masters, dir };
        let nodes: Vec<String> = cluster
            .masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + CLUSTER_FORMING;
        while !cluster.masters.iter().all(|m| {
            m.try_command(&["CLUSTER", "INFO"])
                .is_some_and(|info| info.contains("cluster_state:ok"))
        }) {
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within {CLUSTER_FORMING:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(cluster)
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`, as `--sessions` takes it.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// `DBSIZE` of each master, in order: how the keys spread over the shards.
    pub fn key_counts(&self) -> Vec<u64> {
        self.masters
            .iter()
            .map(|m| m.command(&["DBSIZE"]).parse().unwrap())
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Each master is killed by its own Drop; then their node files go.
        self.masters.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
