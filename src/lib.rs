//! fulcrum: a Layer-7 reverse-proxy load balancer.
//!
//! How a request flows:
//!
//! ```text
//! client ──TCP──▶ server.rs   accept (max_connections), TLS handshake (tls.rs: SNI, ALPN,
//!                             timeout) in the connection's task, hyper HTTP/1.1 or HTTP/2
//!                             connection, header-read and idle timeouts, graceful drain,
//!                             byte tunnels for upgraded (WebSocket) connections
//!                     │
//!                     ▼
//!                 proxy.rs    route (host, path prefix → pool)
//!                             pick   (pool.rs snapshot + balance/*: one ArcSwap load, atomics)
//!                             forward (headers.rs rewrites the head; upstream.rs: the node's
//!                                      idle HTTP/1.1 connections, or a new one)
//!                             respond (body.rs streams the backend's body and holds the
//!                                      in-flight count until it ends)
//!                     │
//!                     ▼
//!                 backend ──▶ response streamed back the same way
//! ```
//!
//! Errors on that path all pass through `ProxyError::into_response`, the single place that
//! picks a status (502/503/504 for a backend, 400/408/413 for a client, 404), counts the
//! metric and logs the cause.

// The layers, bottom up: each imports only from those below it (tests/layers.rs keeps it
// so). They are the crate's inside; what tools, tests and benches use is re-exported below.
pub(crate) mod base;
pub(crate) mod control;
pub(crate) mod datapath;
pub(crate) mod model;
pub(crate) mod upstream;
// Entry points.
pub mod demo;
pub mod load;
pub mod webnode;

// The crate's API: the config a balancer starts from, the pool and strategy types the tests
// and benches inspect, the head rewrite the benches measure, and the registry's messages.
pub use base::config;
pub use datapath::headers;
pub use datapath::listeners::StartError;
pub use model::{balance, pool};

/// The seed registry's gRPC messages and client, for web nodes and tools that register.
pub mod registry {
    pub use crate::base::proto;
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::base::config::Config;
use crate::control::Control;
use crate::datapath::listeners::{bind, bind_listener};
use crate::datapath::proxy::Router;
use crate::datapath::server::Lifecycle;
use crate::datapath::tls::TlsTerminator;

/// A running balancer.
#[derive(Debug)]
pub struct Running {
    admin: Option<SocketAddr>,
    registry: Option<SocketAddr>,
    router: Arc<ArcSwap<Router>>,
    control: Arc<Control>,
    lifecycle: Lifecycle,
    grace: Duration,
}

/// Binds every listener of `config` (all or nothing), then serves them on the current runtime.
/// A balancer started this way has no file to reload.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    start_with(config, None, &Workers::default()).await
}

/// Like [`start`], for the config read from `path`, which `SIGHUP` and `POST /api/reload`
/// re-read.
pub async fn start_file(path: &Path) -> Result<Running, StartError> {
    start_file_on(path, &Workers::default()).await
}

/// Like [`start_file`], serving traffic on `workers` too: each listener gets one
/// `SO_REUSEPORT` socket per worker, and the kernel spreads new connections among them. The
/// control plane (health checks, reloads, the admin API, the registry) stays on the current
/// runtime, which serves traffic as worker 0.
pub async fn start_file_on(path: &Path, workers: &Workers) -> Result<Running, StartError> {
    let config = Config::load(path)?;
    start_with(&config, Some(path.to_owned()), workers).await
}

/// Like [`start`], serving traffic on `workers` too (see [`start_file_on`]).
pub async fn start_on(config: &Config, workers: &Workers) -> Result<Running, StartError> {
    start_with(config, None, workers).await
}

/// Worker threads that serve traffic beside the thread that starts the balancer, each a
/// single-threaded runtime: nginx's workers and HAProxy's threads, in tokio terms. A
/// connection lives on the worker that accepted it, with its backend connections, timers
/// and tasks; no request wakes another thread. Dropping this stops the threads (after the
/// balancer's drain, since `run` drops it last).
#[derive(Debug, Default)]
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// `total` workers in all: the calling thread (worker 0, whose runtime the caller builds)
    /// and `total - 1` new threads named `fulcrum-worker-N`.
    pub fn spawn(total: usize) -> std::io::Result<Self> {
        let total = total.max(1);
        base::workers::set_count(total);
        base::workers::enter(0);
        let mut workers = Self::default();
        for index in 1..total {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("fulcrum-worker-{index}"))
                .spawn(move || {
                    base::workers::enter(index);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            let _ = handle_tx.send(Ok(runtime.handle().clone()));
                            runtime.block_on(async {
                                let _ = stopped.await;
                            });
                        }
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                        }
                    }
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread exited at start"))??;
            workers.handles.push(handle);
            workers.stops.push(stop);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Workers in all, the calling thread included.
    pub fn count(&self) -> usize {
        1 + self.handles.len()
    }

    /// One worker per core this process may run on: its CPU affinity and cgroup quota count,
    /// so `taskset -c 0 fulcrum run` is one thread.
    pub fn per_core() -> std::io::Result<Self> {
        Self::spawn(std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stops.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[expect(clippy::expect_used, reason = "a bound socket has an address")]
async fn start_with(
    config: &Config,
    path: Option<PathBuf>,
    workers: &Workers,
) -> Result<Running, StartError> {
    crate::base::metrics::recorder();
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let router = Arc::new(ArcSwap::from_pointee(Router::new(config)));

    let mut bound = Vec::new();
    for l in &config.listeners {
        bound.push(bind_listener(l, workers.count())?);
    }
    let admin_listener = match &config.admin {
        Some(admin) => Some(bind("admin", admin.bind, 1024)?),
        None => None,
    };
    let registry_listener = match &config.registry {
        Some(registry) => Some((
            registry,
            registry_tls(registry)?,
            bind("registry", registry.bind, 1024)?,
        )),
        None => None,
    };

    let lifecycle = Lifecycle::default();
    let client_connections = Arc::new(AtomicU64::new(0));
    let control = Arc::new(Control::new(
        config.clone(),
        path,
        router.clone(),
        client_connections.clone(),
        lifecycle.clone(),
        workers.handles.clone(),
    ));
    control.serve(bound);
    control.set_services(
        admin_listener
            .as_ref()
            .and_then(|tcp| tcp.local_addr().ok()),
        registry_listener
            .as_ref()
            .and_then(|(_, _, tcp)| tcp.local_addr().ok()),
    );

    let admin = admin_listener.map(|tcp| {
        let token = config.admin.as_ref().and_then(|a| a.token.clone());
        control::admin::spawn(tcp, token, &control, &client_connections, lifecycle.clone())
    });

    let registry = registry_listener.map(|(registry_config, tls, tcp)| {
        let addr = tcp.local_addr().expect("a bound socket has an address");
        info!(listener = "registry", %addr, pool = %registry_config.pool, tls = tls.is_some(),
            token_required = registry_config.token.is_some(),
            client_certificate_required = registry_config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            store = %registry_config.store.as_ref().map_or_else(|| "none".to_owned(), |s| s.redacted()),
            "registry listening");
        control::registry::Registry::new(registry_config, control.clone()).spawn(
            tcp,
            tls,
            lifecycle.clone(),
        );
        addr
    });

    Ok(Running {
        admin,
        registry,
        router,
        control,
        lifecycle,
        grace: config.shutdown_grace,
    })
}

/// The registry's TLS, loaded before anything serves. A registry open to the network without a
/// token or client CA is refused here too, for a `Config` built in code rather than parsed.
fn registry_tls(
    registry: &config::RegistryConfig,
) -> Result<Option<Arc<TlsTerminator>>, StartError> {
    if let Some(message) = registry.unauthenticated() {
        return Err(StartError::Config(config::ConfigError {
            diagnostics: vec![config::Diagnostic {
                file: PathBuf::new(),
                line: 0,
                column: 0,
                key: "registry.bind".to_owned(),
                message,
            }],
        }));
    }
    let Some(tls) = &registry.tls else {
        return Ok(None);
    };
    TlsTerminator::grpc("registry", &tls.certs, tls.client_ca.as_deref())
        .map(|terminator| {
            // The registry's certificate does not reload: its expiry is set once, here.
            terminator.export_expiry();
            Some(Arc::new(terminator))
        })
        .map_err(|source| StartError::Tls {
            name: "registry".to_owned(),
            source,
        })
}

impl Running {
    /// The address a listener is bound to (the real port when the config said port 0).
    pub fn addr(&self, listener: &str) -> Option<SocketAddr> {
        self.control.listener_addr(listener)
    }

    /// The admin API's bound address; `None` without `[admin]`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The gRPC registry's address, when the config has a `[registry]`.
    pub fn registry_addr(&self) -> Option<SocketAddr> {
        self.registry
    }

    /// The routing table, for tools that inspect pools (tests, the admin API).
    pub fn router(&self) -> arc_swap::Guard<Arc<Router>> {
        self.router.load()
    }

    /// Reload, the admin API and the registry act through this.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Stops accepting, lets in-flight requests finish within `shutdown_grace`, and returns
    /// how many connections were cut off when it ran out.
    pub async fn shutdown(self) -> usize {
        info!(grace = ?self.grace, "shutting down: no new connections, finishing in-flight requests");
        self.lifecycle.shutdown.cancel();
        let cut_off = datapath::server::drain(&self.lifecycle, self.grace).await;
        // The access log's writers hold the last lines in their buffers.
        let _ = tokio::task::spawn_blocking(|| {
            datapath::access_log::flush_all(Duration::from_secs(2));
        })
        .await;
        cut_off
    }
}

/// Makes every access log reopen its file by name (what `SIGUSR1` does, for logrotate); the
/// writers reopen after their current batch. Returns how many logs were asked.
pub fn reopen_access_logs() -> usize {
    datapath::access_log::reopen_all()
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
