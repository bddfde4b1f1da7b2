//! `fulcrum webnode --register URL[,URL...]`: the node's side of the seed registry.
//!
//! On start the node reports itself active (id, address, start time) and then heartbeats at the
//! interval the registry answers. With several URLs (several balancers sharing one registry
//! store, as behind one DNS name) it talks to one at a time: the first that answers, and the
//! next one in the list as soon as that one fails a call; when none answers it retries with
//! backoff while the node keeps serving. On SIGTERM or Ctrl-C it stops heartbeating, asks the
//! registry to decommission it (through the one it last used, else the next that answers; the
//! balancers drain it), and keeps serving for a short grace so requests a balancer had already
//! sent finish normally.
//!
//! Every call carries `authorization: Bearer TOKEN` when a token was given (the balancer's
//! `[registry] token`); an `https://` registry is verified against `--registry-ca`, and
//! `--registry-cert`/`--registry-key` are the node's client certificate for mutual TLS.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tracing::{debug, info, warn};

use crate::base::config::Secret;

use crate::base::proto::server_registry_service_client::ServerRegistryServiceClient;
use crate::base::proto::{ReportActiveRequest, ReportDecommissionRequest};

/// Each call to the registry: long enough for a loaded balancer, short enough that a shutdown
/// waiting on an unanswered heartbeat is not held up.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries of an unreachable registry start here and double up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A registry answering 0 or an absurd interval is clamped to this range (seconds).
const INTERVAL_SECS: (u64, u64) = (1, 3600);

/// What `--register`, `--registry-*`, `--drain-timeout` and `--drain-grace` asked for.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// The registries' gRPC endpoints, tried in this order, e.g. `http://127.0.0.1:9091`, or
    /// `https://` for a registry with `[registry.tls]`. At least one.
    pub urls: Vec<String>,
    /// Sent as `authorization: Bearer TOKEN` on every call.
    pub token: Option<Secret>,
    /// PEM CA certificates the registry's certificate must chain to (`https://` only).
    pub ca: Option<PathBuf>,
    /// The node's client certificate and key (PEM), for a registry with `client_ca`.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The drain the balancer is asked for, sent in whole seconds (rounded up).
    pub drain_timeout: Duration,
    /// How long the node keeps serving once its decommission was accepted (at most
    /// `drain_timeout`).
    pub drain_grace: Duration,
}

type Client = ServerRegistryServiceClient<InterceptedService<Channel, Bearer>>;

/// Puts the token on every call; without one, sends calls as they are.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// One registry the node may talk to.
#[derive(Clone)]
struct Registry {
    url: String,
    client: Client,
}

/// The registries in the order given, and the one in use (the last that answered).
#[derive(Clone)]
struct Registries {
    list: Arc<[Registry]>,
    current: Arc<AtomicUsize>,
}

impl Registries {
    /// Each registry once, starting with the one in use.
    fn in_turn(&self) -> impl Iterator<Item = (usize, &Registry)> {
        let start = self.current.load(Ordering::Relaxed);
        let n = self.list.len();
        (0..n).map(move |k| {
            let i = (start + k) % n;
            (i, &self.list[i])
        })
    }

    fn answered(&self, i: usize) {
        self.current.store(i, Ordering::Relaxed);
    }
}

/// A node announced to a registry and heartbeating in the background.
pub(super) struct Registration {
    id: String,
    options: RegisterOptions,
    registries: Registries,
    stop: CancellationToken,
    heartbeats: JoinHandle<()>,
}

impl Registration {
    /// Starts reporting `id` at `listen`; returns at once (the first report runs in the
    /// background). Fails only on a URL that cannot be used.
    pub(super) async fn start(
        options: RegisterOptions,
        id: &str,
        listen: SocketAddr,
    ) -> io::Result<Registration> {
        let bearer = bearer(options.token.as_ref())?;
        let mut list = Vec::new();
        let mut first = None;
        for url in &options.urls {
            let (uri, https) = registry_uri(url)?;
            first.get_or_insert_with(|| uri.clone());
            let endpoint = endpoint(uri, https, url, &options)?;
            let client = ServerRegistryServiceClient::with_interceptor(
                endpoint.connect_lazy(),
                Bearer(bearer.clone()),
            );
            list.push(Registry {
                url: url.clone(),
                client,
            });
        }
        let Some(first) = first else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--register needs at least one URL",
            ));
        };
        // The balancers behind the list are alike; the first one's route picks the address.
        let ip = advertised_ip(listen, &first)
            .await
            .map_err(|e| invalid(&options.urls[0], &e))?;
        let registries = Registries {
            list: list.into(),
            current: Arc::new(AtomicUsize::new(0)),
        };
        let report = ReportActiveRequest {
            server_id: id.to_owned(),
            ip_address: ip.to_string(),
            port: i32::from(listen.port()),
            bootstrap_timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        };
        let stop = CancellationToken::new();
        let heartbeats = tokio::spawn(heartbeat(registries.clone(), report, stop.clone()));
        Ok(Registration {
            id: id.to_owned(),
            options,
            registries,
            stop,
            heartbeats,
        })
    }

    /// Stops heartbeating, asks to be decommissioned, and (when the registry agreed) keeps the
    /// node serving for the grace, or until a second signal.
    pub(super) async fn leave(mut self) {
        // Let a heartbeat already on the wire finish first: answered after the decommission,
        // it would register the node again.
        self.stop.cancel();
        if let Err(e) = (&mut self.heartbeats).await {
            warn!(error = %e, "heartbeat task failed");
        }
        let drain_secs = whole_seconds(self.options.drain_timeout);
        let request = ReportDecommissionRequest {
            server_id: self.id.clone(),
            graceful_drain_timeout_seconds: drain_secs.to_string(),
        };
        for (_, registry) in self.registries.in_turn() {
            match registry
                .client
                .clone()
                .report_decommission(request.clone())
                .await
            {
                Ok(reply) if reply.get_ref().is_decommission_started => {
                    let grace = self.options.drain_grace.min(self.options.drain_timeout);
                    info!(id = %self.id, registry = %registry.url, drain_secs, ?grace, "decommission started; serving through the grace");
                    tokio::select! {
                        () = tokio::time::sleep(grace) => {}
                        // A second Ctrl-C / SIGTERM means now.
                        _ = super::shutdown_signal() => {}
                    }
                    return;
                }
                Ok(_) => {
                    warn!(id = %self.id, registry = %registry.url, "the registry did not start a decommission");
                }
                Err(status) => {
                    warn!(id = %self.id, registry = %registry.url, code = ?status.code(), message = status.message(), "decommission failed");
                }
            }
        }
    }
}

/// Reports active until `stop`: at the registry's interval once registered, with backoff while
/// it cannot be reached or refuses.
async fn heartbeat(registries: Registries, report: ReportActiveRequest, stop: CancellationToken) {
    // The registry the node is registered through, once one answered.
    let mut registered: Option<usize> = None;
    let mut backoff = FIRST_BACKOFF;
    // Bounded by `stop`; each round waits at least FIRST_BACKOFF.
    loop {
        let mut answered = None;
        for (i, registry) in registries.in_turn() {
            let error = match registry.client.clone().report_active(report.clone()).await {
                Ok(reply) if reply.get_ref().is_registered => {
                    answered = Some((i, reply.get_ref().heartbeat_interval_seconds));
                    break;
                }
                Ok(_) => "the registry answered is_registered = false".to_owned(),
                Err(status) => format!("{:?}: {}", status.code(), status.message()),
            };
            let next = registries.list.len() > 1;
            warn!(id = %report.server_id, registry = %registry.url, %error, trying_next = next, "report active failed; still serving");
        }
        let wait = match answered {
            Some((i, interval)) => {
                let secs = u64::try_from(interval)
                    .unwrap_or(0)
                    .clamp(INTERVAL_SECS.0, INTERVAL_SECS.1);
                registries.answered(i);
                if registered == Some(i) {
                    debug!(id = %report.server_id, "heartbeat");
                } else {
                    info!(id = %report.server_id, registry = %registries.list[i].url, address = %format!("{}:{}", report.ip_address, report.port), heartbeat_secs = secs, "registered");
                    registered = Some(i);
                }
                backoff = FIRST_BACKOFF;
                Duration::from_secs(secs)
            }
            None => {
                warn!(id = %report.server_id, retry_in = ?backoff, "no registry answered; still serving");
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The TLS side of the registry connection, when any `--registry-*` file was given.
fn client_tls(options: &RegisterOptions) -> io::Result<Option<ClientTlsConfig>> {
    if options.ca.is_none() && options.identity.is_none() {
        return Ok(None);
    }
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{flag} {}: cannot read: {e}", path.display()),
            )
        })
    };
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &options.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read("--registry-ca", ca)?));
    }
    if let Some((cert, key)) = &options.identity {
        tls = tls.identity(Identity::from_pem(
            read("--registry-cert", cert)?,
            read("--registry-key", key)?,
        ));
    }
    Ok(Some(tls))
}

/// The address the balancer should connect to: the listen address, or, for a wildcard listen,
/// the local address this host uses to reach the registry (a UDP `connect` sends nothing).
async fn advertised_ip(listen: SocketAddr, registry: &Uri) -> io::Result<IpAddr> {
    if !listen.ip().is_unspecified() {
        return Ok(listen.ip());
    }
    let host = registry.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = registry.port_u16().unwrap_or(80);
    let target = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4() == listen.is_ipv4())
        .ok_or_else(|| io::Error::other(format!("{host} has no address of the listen family")))?;
    let unspecified = SocketAddr::new(listen.ip(), 0);
    let socket = tokio::net::UdpSocket::bind(unspecified).await?;
    socket.connect(target).await?;
    Ok(socket.local_addr()?.ip())
}

/// Seconds for `graceful_drain_timeout_seconds`, rounded up so a short drain is not zero.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A `--register` mistake, naming the URL.
fn invalid(url: &str, e: &dyn std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("--register {url}: {e}"),
    )
}

/// The registry's URL, and whether it speaks TLS.
fn registry_uri(url: &str) -> io::Result<(Uri, bool)> {
    let uri: Uri = url.parse().map_err(|e| invalid(url, &e))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(invalid(
                url,
                &"expected http://HOST:PORT or https://HOST:PORT (the balancer's [registry] bind)",
            ));
        }
    };
    if uri.host().is_none() {
        return Err(invalid(url, &"the URL has no host"));
    }
    Ok((uri, https))
}

/// `authorization: Bearer TOKEN`, marked sensitive so tonic never logs it.
fn bearer(token: Option<&Secret>) -> io::Result<Option<MetadataValue<Ascii>>> {
    let Some(token) = token else {
        return Ok(None);
    };
    let mut value =
        MetadataValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "--registry-token must be printable ASCII",
            )
        })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// The channel to the registry, with TLS when the URL asks for it (and only then).
fn endpoint(uri: Uri, https: bool, url: &str, options: &RegisterOptions) -> io::Result<Endpoint> {
    let endpoint = Endpoint::from(uri)
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    match (https, client_tls(options)?) {
        (true, Some(tls)) => endpoint.tls_config(tls).map_err(|e| invalid(url, &e)),
        (true, None) => Err(invalid(url, &"an https:// registry needs --registry-ca")),
        (false, Some(_)) => Err(invalid(
            url,
            &"--registry-ca, --registry-cert and --registry-key need an https:// URL",
        )),
        (false, None) => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_seconds_round_up() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(30)), 30);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
    }

    #[tokio::test]
    async fn a_wildcard_listen_advertises_the_route_to_the_registry() {
        let uri: Uri = "http://127.0.0.1:9091".parse().unwrap();
        let wildcard = "0.0.0.0:9001".parse().unwrap();
        assert_eq!(
            advertised_ip(wildcard, &uri).await.unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        let fixed = "127.0.0.7:9001".parse().unwrap();
        assert_eq!(
            advertised_ip(fixed, &uri).await.unwrap(),
            "127.0.0.7".parse::<IpAddr>().unwrap()
        );
    }
}
