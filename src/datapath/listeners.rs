//! Traffic listeners: bound (certificates loaded, socket listening) before anything serves,
//! then served. Start and reload both go through here, so a reload that fails to bind changes
//! nothing, and a listener is wired to the proxy path in one way only.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tracing::info;

use crate::base::certs::CertError;
use crate::base::config::{self, AccessLogPath, ListenerConfig};
use crate::datapath::access_log::AccessLog;
use crate::datapath::proxy::{self, ConnInfo, ListenerInfo, Router};
use crate::datapath::proxy_protocol::ProxyProtocol;
use crate::datapath::server::{self, AcceptSocket, ConnLimits, Lifecycle};
use crate::datapath::tls::TlsTerminator;

/// Why a balancer (or a reload's new listener) could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config did not validate; every problem is listed.
    #[error("invalid config:\n{0}")]
    Config(#[from] config::ConfigError),
    /// A listener's socket could not be bound (address in use, no permission).
    #[error("cannot bind listener `{name}` to {addr}: {source}")]
    Bind {
        /// The listener's `name`.
        name: String,
        /// The address it was to bind.
        addr: SocketAddr,
        /// What the bind returned.
        #[source]
        source: io::Error,
    },
    /// A listener's access log file could not be opened for appending.
    #[error("listener `{name}`: cannot open access log {path}: {source}")]
    AccessLog {
        /// The listener's `name`.
        name: String,
        /// The file, as configured.
        path: String,
        /// What the open returned.
        #[source]
        source: io::Error,
    },
    /// A listener's certificates or key could not be loaded.
    #[error("listener `{name}`: {source}")]
    Tls {
        /// The listener's `name`.
        name: String,
        /// Why its TLS could not be set up.
        #[source]
        source: CertError,
    },
}

/// A traffic listener bound and its TLS loaded, not yet serving.
#[derive(Debug)]
pub(crate) struct BoundListener {
    pub config: ListenerConfig,
    pub tls: Option<Arc<TlsTerminator>>,
    pub tcp: TcpListener,
    /// One more socket on the same address for each further worker thread.
    pub more: Vec<std::net::TcpListener>,
    /// The listener's access log; a reload that changes `access_log` stores the new one here.
    pub access_log: LogSlot,
}

/// Where a listener finds its access log, swapped by a reload without touching the listener.
pub(crate) type LogSlot = Arc<ArcSwapOption<AccessLog>>;

/// Opens the access log `l` asks for (`None` when it asks for none).
pub(crate) fn open_access_log(l: &ListenerConfig) -> Result<Option<Arc<AccessLog>>, StartError> {
    let Some(config) = &l.access_log else {
        return Ok(None);
    };
    AccessLog::open(config)
        .map(Some)
        .map_err(|source| StartError::AccessLog {
            name: l.name.clone(),
            path: match &config.path {
                AccessLogPath::Stdout => "-".to_owned(),
                AccessLogPath::File(file) => file.display().to_string(),
            },
            source,
        })
}

/// Loads a listener's certificates and binds its sockets, one per worker; nothing serves yet,
/// so a later failure (at start or in a reload) can drop it without effect.
pub(crate) fn bind_listener(
    l: &ListenerConfig,
    workers: usize,
) -> Result<BoundListener, StartError> {
    let tls = match &l.tls {
        Some(tls) => Some(Arc::new(TlsTerminator::new(&l.name, tls).map_err(
            |source| StartError::Tls {
                name: l.name.clone(),
                source,
            },
        )?)),
        None => None,
    };
    let backlog = u32::try_from(l.max_connections)
        .unwrap_or(u32::MAX)
        .min(65_535);
    let bind_error = |source| StartError::Bind {
        name: l.name.clone(),
        addr: l.bind,
        source,
    };
    let tcp = server::listen(l.bind, backlog, workers > 1).map_err(bind_error)?;
    // Port 0 was settled by the first bind: the others join that port.
    let addr = tcp.local_addr().map_err(bind_error)?;
    let more = (1..workers)
        .map(|_| server::listen_more(addr, backlog))
        .collect::<Result<_, _>>()
        .map_err(bind_error)?;
    let access_log = Arc::new(ArcSwapOption::new(open_access_log(l)?));
    Ok(BoundListener {
        config: l.clone(),
        tls,
        tcp,
        more,
        access_log,
    })
}

/// Serves a bound listener until `lifecycle.shutdown` is cancelled: its first socket on the
/// current runtime, each further one on its worker in `workers`. Returns its address.
#[expect(clippy::expect_used, reason = "a bound socket has an address")]
pub(crate) fn serve(
    bound: BoundListener,
    router: &Arc<ArcSwap<Router>>,
    client_connections: &Arc<AtomicU64>,
    lifecycle: Lifecycle,
    workers: &[tokio::runtime::Handle],
) -> SocketAddr {
    let BoundListener {
        config: l,
        tls,
        tcp,
        more,
        access_log,
    } = bound;
    let addr = tcp.local_addr().expect("a bound socket has an address");
    let proto = if tls.is_some() { "https" } else { "http" };
    info!(listener = %l.name, %addr, proto, workers = 1 + more.len(),
        proxy_protocol = l.proxy_protocol, "listening");
    if let Some(tls) = &tls {
        tls.export_expiry();
    }
    let info = Arc::new(ListenerInfo {
        name: Arc::from(l.name.as_str()),
        proto,
        forwarded: l.forwarded,
        max_body_bytes: l.max_body_bytes,
        trusted_proxies: l.trusted_proxies.clone().into(),
        router: router.clone(),
        access_log,
        request_id: l.request_id,
    });
    let limits = ConnLimits {
        header_read_timeout: l.header_read_timeout,
        idle_timeout: l.idle_timeout,
        max_header_bytes: l.max_header_bytes,
        max_connections: l.max_connections,
        proxy_protocol: l
            .proxy_protocol
            .then(|| Arc::new(ProxyProtocol::new(&l.name, &l.trusted_proxies))),
    };
    let mut sockets = vec![AcceptSocket::Here(tcp)];
    sockets.extend(
        more.into_iter()
            .zip(workers)
            .map(|(socket, worker)| AcceptSocket::On(socket, worker.clone())),
    );
    server::spawn_accept_loop(
        sockets,
        info.name.clone(),
        limits,
        tls,
        move |peer, conn| {
            let conn = Arc::new(ConnInfo {
                peer,
                listener: info.clone(),
                conn,
            });
            hyper::service::service_fn(move |req| proxy::handle(req, conn.clone()))
        },
        client_connections.clone(),
        lifecycle,
    );
    addr
}

pub(crate) fn bind(name: &str, addr: SocketAddr, backlog: u32) -> Result<TcpListener, StartError> {
    server::listen(addr, backlog, false).map_err(|source| StartError::Bind {
        name: name.to_owned(),
        addr,
        source,
    })
}
