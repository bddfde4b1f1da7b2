//! `fulcrum run` serves on one single-threaded worker per core it may run on, each with its own
//! `SO_REUSEPORT` listening socket: plain `run` on this machine, `taskset -c 0` (one), and
//! `--threads N`. Observed from outside, as an operator would: the process's threads and the
//! kernel's listening sockets on the port.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use support::admin_api::ConfigFile;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One balancer process at a time: each takes a port from `free_port` for its config, and two
/// picked at once may be the same port, which `SO_REUSEPORT` would let both bind.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Listening TCP sockets on `port` (IPv4), from `/proc/net/tcp`: state `0A` is LISTEN.
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "0A"
        })
        .count()
}

/// Threads of `pid` named `fulcrum-worker-N`, besides the main thread (worker 0).
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.starts_with("fulcrum-worker"))
        })
        .count()
}

/// Starts `fulcrum run` (through `prefix`, e.g. `taskset -c 0`) on a fresh port and returns
/// it once it answers, with its listener address.
async fn run(
    prefix: &[&str],
    extra: &[&str],
    backend: SocketAddr,
) -> (Process, SocketAddr, ConfigFile) {
    let listen = free_port().await;
    let toml = format!(
        "[[listeners]]\nname = \"http\"\nbind = \"{listen}\"\n[pools.web]\nstrategy = \"round_robin\"\nbackends = [{{ address = \"{backend}\" }}]\n"
    );
    let file = ConfigFile::new("workers", &toml);
    let bin = env!("CARGO_BIN_EXE_fulcrum");
    let mut command = match prefix.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(bin);
            command
        }
        None => Command::new(bin),
    };
    let child = command
        .arg("run")
        .args(extra)
        .arg("-c")
        .arg(file.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    wait_until("the balancer answers", || async {
        get_status(listen).await == Some(200)
    })
    .await;
    (process, listen, file)
}

/// One `GET /` on a fresh connection; its status.
async fn get_status(addr: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let head = String::from_utf8_lossy(&answer);
    head.get(9..12)?.parse().ok()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

#[tokio::test]
async fn plain_run_has_one_worker_and_one_listening_socket_per_core() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nodes = webnodes(1).await;
    let (process, listen, _file) = run(&[], &[], nodes[0].local_addr()).await;
    assert_eq!(worker_threads(process.0.id()), cores() - 1);
    assert_eq!(listening_sockets(listen.port()), cores());
    // Many connections, each a fresh source port, all served whichever socket took them.
    for _ in 0..50 {
        assert_eq!(get_status(listen).await, Some(200));
    }
}

#[tokio::test]
async fn pinned_to_one_core_it_runs_one_worker() {
    let _one = ONE_AT_A_TIME.lock().await;
    let installed = Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(installed, "taskset (util-linux) is needed for this test");
    let nodes = webnodes(1).await;
    let (process, listen, _file) = run(&["taskset", "-c", "0"], &[], nodes[0].local_addr()).await;
    assert_eq!(worker_threads(process.0.id()), 0);
    assert_eq!(listening_sockets(listen.port()), 1);
}

#[tokio::test]
async fn threads_sets_the_worker_count_and_every_worker_serves() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nodes = webnodes(1).await;
    let (process, listen, _file) = run(&[], &["--threads", "3"], nodes[0].local_addr()).await;
    assert_eq!(worker_threads(process.0.id()), 2);
    assert_eq!(listening_sockets(listen.port()), 3);
    for _ in 0..60 {
        assert_eq!(get_status(listen).await, Some(200));
    }
}

#[tokio::test]
async fn a_second_balancer_on_a_port_in_use_refuses_to_start_rather_than_share_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nodes = webnodes(1).await;
    let (first, listen, _file) = run(&[], &["--threads", "2"], nodes[0].local_addr()).await;
    let toml = format!(
        "[[listeners]]\nname = \"http\"\nbind = \"{listen}\"\n[pools.web]\nstrategy = \"round_robin\"\nbackends = [{{ address = \"{}\" }}]\n",
        nodes[0].local_addr()
    );
    let file = ConfigFile::new("workers-second", &toml);
    let second = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "--threads", "2", "-c"])
        .arg(file.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        !second.status.success(),
        "the second balancer must not start"
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("cannot bind listener `http`"), "{stderr}");
    assert_eq!(
        listening_sockets(listen.port()),
        2,
        "only the first balancer's sockets"
    );
    drop(first);
}
