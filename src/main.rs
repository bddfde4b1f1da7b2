//! The `fulcrum` command line. `anyhow` and exit codes live here and nowhere else.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fulcrum::config::{Config, ListenerConfig, PoolConfig, RegistryConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "fulcrum",
    version,
    about = "A Layer-7 reverse-proxy load balancer"
)]
struct Cli {
    /// Config file (for `run` and `check`).
    #[arg(short, long, global = true, default_value = "config/fulcrum.toml")]
    config: PathBuf,
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer (the default).
    Run {
        /// Worker threads (default: one per core this process may run on, so `taskset -c 0`
        /// means one). Each is a single-threaded runtime with its own listening sockets.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: Option<u16>,
    },
    /// Validate a config, print a summary, exit 1 with file:line:col errors.
    Check,
    /// Start 3 demo web nodes and the balancer from an embedded config.
    Demo,
    /// The demo/test backend.
    Webnode {
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        #[arg(long)]
        id: String,
        /// Opens the control endpoints (`POST /admin/health`, `POST /admin/pause`) to callers
        /// sending `Authorization: Bearer TOKEN`; without it they answer 403. Read from the
        /// environment so the token stays out of `ps`.
        #[arg(long, env = "FULCRUM_WEBNODE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Where `/session` keeps its counts: `memory` (this node only), `redis://HOST:PORT`
        /// or a Redis Cluster `redis+cluster://HOST:PORT,HOST:PORT,…` (shared by every node
        /// pointed at it).
        #[arg(
            long,
            default_value = "memory",
            value_name = "memory|redis://HOST:PORT|redis+cluster://HOST:PORT,…"
        )]
        sessions: fulcrum::webnode::SessionBackend,
        /// Keep sessions durably in the seed's `user_sessions` table behind the Redis cache
        /// (needs a Redis --sessions). Prefer the environment variable when the URL holds a
        /// password: a command-line argument is visible to every user in `ps`.
        #[arg(
            long,
            env = "FULCRUM_WEBNODE_DATABASE",
            hide_env_values = true,
            value_name = "postgres://USER@HOST:PORT/DB"
        )]
        database: Option<String>,
        /// Announce this node to a balancer's registry (its gRPC `[registry] bind`), heartbeat,
        /// and ask to be drained on SIGTERM / Ctrl-C. Several URLs, comma-separated (balancers
        /// sharing one registry store): the node uses the first that answers and moves to the
        /// next when it is away.
        #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
        register: Vec<String>,
        /// With --register: the drain the balancer is asked for (sent in whole seconds).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: std::time::Duration,
        /// With --register: how long the node keeps serving after its decommission was
        /// accepted (at most --drain-timeout).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        drain_grace: std::time::Duration,
        /// With --register: the registry's bearer token (its `[registry] token`). Prefer the
        /// environment variable: a command-line argument is visible to every user in `ps`.
        #[arg(
            long,
            env = "FULCRUM_REGISTRY_TOKEN",
            hide_env_values = true,
            value_name = "TOKEN"
        )]
        registry_token: Option<String>,
        /// With --register https://...: PEM CA certificates the registry's certificate must
        /// chain to.
        #[arg(long, value_name = "PEM")]
        registry_ca: Option<PathBuf>,
        /// With --register https://...: this node's client certificate (PEM), for a registry
        /// with `client_ca`.
        #[arg(long, value_name = "PEM", requires = "registry_key")]
        registry_cert: Option<PathBuf>,
        /// The private key of --registry-cert (PEM).
        #[arg(long, value_name = "PEM", requires = "registry_cert")]
        registry_key: Option<PathBuf>,
    },
    /// Session-aware traffic simulator: virtual users with cookie jars and source IPs.
    Load(fulcrum::load::LoadArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command.unwrap_or(Command::Run { threads: None }) {
        Command::Check => return check(&cli.config),
        Command::Run { threads } => balancer_runtime().and_then(|rt| {
            let workers = match threads {
                Some(n) => fulcrum::Workers::spawn(usize::from(n)),
                None => fulcrum::Workers::per_core(),
            }
            .context("starting the worker threads")?;
            rt.block_on(run(&cli.config, &workers))
        }),
        Command::Demo => runtime().and_then(|rt| rt.block_on(fulcrum::demo::run())),
        Command::Webnode {
            listen,
            id,
            admin_token,
            sessions,
            database,
            register,
            drain_timeout,
            drain_grace,
            registry_token,
            registry_ca,
            registry_cert,
            registry_key,
        } => runtime().and_then(|rt| {
            let opts = fulcrum::webnode::WebNodeOptions {
                admin_token,
                ..fulcrum::webnode::WebNodeOptions::new(listen, id)
            };
            let urls: Vec<String> = register
                .iter()
                .map(|url| url.trim().to_owned())
                .filter(|url| !url.is_empty())
                .collect();
            let register = (!urls.is_empty()).then(|| fulcrum::webnode::RegisterOptions {
                urls,
                token: registry_token.map(fulcrum::config::Secret::new),
                ca: registry_ca,
                identity: registry_cert.zip(registry_key),
                drain_timeout,
                drain_grace,
            });
            // Parsed here rather than by clap, whose error would quote the URL, password and all.
            let mut sessions = fulcrum::webnode::SessionOptions::new(sessions);
            if let Some(url) = database {
                let database = url
                    .parse::<fulcrum::webnode::SessionDatabase>()
                    .map_err(|e| anyhow::anyhow!("--database: {e}"))?;
                sessions = sessions.with_database(database);
            }
            rt.block_on(fulcrum::webnode::run(opts, sessions, register))
                .context("web node failed")
        }),
        Command::Load(args) => runtime().and_then(|rt| {
            let report = rt
                .block_on(fulcrum::load::run(&args))
                .context("load run could not start")?;
            println!("{}", fulcrum::load::render(&report, &args)?);
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fulcrum: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Worker 0's runtime, which also runs the control plane. Single-threaded like every worker:
/// measured with wrk (64 connections, one pinned core, nginx origin), a current-thread
/// runtime spends about 20 % less CPU per request than a multi-thread one with one worker,
/// whose scheduler pays for work stealing and cross-thread wakeups it cannot use.
fn balancer_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(path: &Path, workers: &fulcrum::Workers) -> anyhow::Result<()> {
    let running = fulcrum::start_file_on(path, workers).await?;
    let control = running.control().clone();
    // SIGHUP re-reads the config; a bad file is logged and counted inside `reload`.
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangups.recv().await.is_some() {
            // `reload` logs and counts a rejected file itself.
            let _ = control.reload().await;
        }
    });
    // SIGUSR1 reopens the access log files (after logrotate renamed them).
    tokio::spawn(async {
        let Ok(mut usr1) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        else {
            return;
        };
        while usr1.recv().await.is_some() {
            let logs = fulcrum::reopen_access_logs();
            tracing::info!(logs, "SIGUSR1: reopening access logs");
        }
    });
    fulcrum::shutdown_signal().await;
    let cut_off = running.shutdown().await;
    if cut_off > 0 {
        tracing::warn!(
            connections = cut_off,
            "exited with connections cut off by shutdown_grace"
        );
    }
    Ok(())
}

/// `writeln!` into a String, which cannot fail.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {
        let _ = writeln!($out, $($arg)*);
    };
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            let summary = summary(path, &config);
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            // A closed pipe (`fulcrum check | head`) is not worth a panic.
            let _ = std::io::stdout().write_all(summary.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// What `check` prints for a valid config: a line for each listener, the admin API, the
/// registry, each pool (then its backends) and each route.
fn summary(path: &Path, config: &Config) -> String {
    let mut out = String::new();
    outln!(out, "{}: ok", path.display());
    for listener in &config.listeners {
        summarise_listener(&mut out, listener);
    }
    if let Some(admin) = &config.admin {
        let auth = if admin.token.is_some() {
            "token set"
        } else {
            "no token"
        };
        outln!(out, "  admin    {:<12} {} ({auth})", "", admin.bind);
    }
    if let Some(registry) = &config.registry {
        summarise_registry(&mut out, registry);
    }
    for (name, pool) in &config.pools {
        summarise_pool(&mut out, name, pool);
    }
    for r in &config.routes {
        outln!(
            out,
            "  route    host={} path_prefix={} -> {}",
            r.host.as_deref().unwrap_or("*"),
            r.path_prefix.as_deref().unwrap_or("*"),
            r.pool
        );
    }
    out
}

fn summarise_listener(out: &mut String, l: &ListenerConfig) {
    summarise_listener_socket(out, l);
    if let Some(log) = &l.access_log {
        let path = match &log.path {
            fulcrum::config::AccessLogPath::Stdout => "standard output".to_owned(),
            fulcrum::config::AccessLogPath::File(file) => file.display().to_string(),
        };
        let query = if log.include_query {
            ", with queries"
        } else {
            ""
        };
        outln!(
            out,
            "           access log -> {path} ({}{query})",
            log.format.as_str()
        );
    }
}

fn summarise_listener_socket(out: &mut String, l: &ListenerConfig) {
    let Some(tls) = &l.tls else {
        outln!(out, "  listener {:<12} {}", l.name, l.bind);
        return;
    };
    outln!(
        out,
        "  listener {:<12} {} tls ({} certificate{}, handshake timeout {:?})",
        l.name,
        l.bind,
        1 + tls.sni.len(),
        if tls.sni.is_empty() { "" } else { "s" },
        tls.handshake_timeout
    );
}

fn summarise_registry(out: &mut String, registry: &RegistryConfig) {
    let auth = match (&registry.token, &registry.tls) {
        (Some(_), Some(tls)) if tls.client_ca.is_some() => "token set, mutual TLS",
        (Some(_), Some(_)) => "token set, TLS",
        (Some(_), None) => "token set",
        (None, Some(tls)) if tls.client_ca.is_some() => "mutual TLS",
        (None, Some(_)) => "TLS, no token",
        (None, None) => "no token",
    };
    outln!(
        out,
        "  registry {:<12} {} -> pool {}, heartbeat {:?}, at most {} nodes ({auth})",
        "",
        registry.bind,
        registry.pool,
        registry.heartbeat_interval,
        registry.max_nodes
    );
    if let Some(store) = &registry.store {
        // Redacted: `check` output lands in CI logs and terminals.
        outln!(
            out,
            "  registry {:<12} shared through {store}, polled every {:?}",
            "",
            registry.store_poll_interval
        );
    }
}

fn summarise_pool(out: &mut String, name: &str, pool: &PoolConfig) {
    outln!(
        out,
        "  pool     {name:<12} {} backends, {}, {} to backends",
        pool.backends.len(),
        pool.strategy.as_str(),
        pool.backend_protocol.as_str()
    );
    for b in &pool.backends {
        outln!(
            out,
            "    {:<20} {:<22} weight {}",
            b.name,
            b.address,
            b.weight
        );
    }
}
