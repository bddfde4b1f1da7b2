//! TLS termination: choosing a certificate by SNI (loading them is [`crate::base::certs`]'s),
//! and the handshake (bounded by `tls_handshake_timeout`,
//! counted in `fulcrum_tls_handshakes_total`) that each connection's task runs, never the
//! accept loop.
//!
//! The certificates of a listener live in one [`CertSet`] behind an `ArcSwap` in the
//! [`CertResolver`], so a reload can publish a new set without touching the listener or the
//! connections being served (the resolver is asked once per handshake).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::{Counter, counter};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};
use tracing::debug;

use crate::base::certs::{CertError, Expiry, client_verifier, load_cert, provider};
use crate::base::config::TlsConfig;
use crate::base::metrics::{TLS_HANDSHAKES_TOTAL, set_certificate_expiry};

/// ALPN protocols offered, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// What a gRPC listener (the registry) offers: HTTP/2 only.
const ALPN_GRPC: [&[u8]; 1] = [b"h2"];

/// The certificates of one listener, by the name a client asks for.
#[derive(Debug)]
pub(crate) struct CertSet {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Every certificate of the set (the default first), for the expiry gauge.
    expiries: Vec<Expiry>,
}

impl CertSet {
    /// Loads every certificate of `config`, or fails on the first that cannot be used.
    pub(crate) fn load(config: &TlsConfig) -> Result<Self, CertError> {
        let default = load_cert(&config.default)?;
        let mut set = CertSet {
            default: default.certified,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            expiries: vec![default.expiry],
        };
        for sni in &config.sni {
            let loaded = load_cert(&sni.paths)?;
            set.expiries.push(loaded.expiry);
            let certified = loaded.certified;
            for name in &sni.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(suffix) => (&mut set.wildcard, suffix),
                    None => (&mut set.exact, name.as_str()),
                };
                // Validation rejects a name claimed twice; should one slip through, the first wins.
                map.entry(key.to_owned())
                    .or_insert_with(|| certified.clone());
            }
        }
        Ok(set)
    }

    /// The certificate for the SNI name a client sent: an exact name, else a wildcard one
    /// label up, else the default.
    pub(crate) fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return &self.default;
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        // rustls hands over SNI names in lower case already; fold only if one is not.
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(cert) = self.exact.get(name) {
            return cert;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

/// Chooses a listener's certificate per handshake from a swappable [`CertSet`].
#[derive(Debug)]
pub(crate) struct CertResolver {
    certs: ArcSwap<CertSet>,
}

impl CertResolver {
    pub(crate) fn new(certs: CertSet) -> Self {
        Self {
            certs: ArcSwap::from_pointee(certs),
        }
    }

    /// Publishes a new set; handshakes from now on use it, established connections keep theirs.
    pub(crate) fn replace(&self, certs: CertSet) {
        self.certs.store(Arc::new(certs));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certs.load().pick(hello.server_name()).clone())
    }
}

/// How one handshake ended: the `result` label of `fulcrum_tls_handshakes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeResult {
    Ok,
    Error,
    Timeout,
}

impl HandshakeResult {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::Error => "error",
            HandshakeResult::Timeout => "timeout",
        }
    }
}

/// A listener's TLS side: acceptor, certificates, handshake timeout and counters.
pub(crate) struct TlsTerminator {
    listener: Arc<str>,
    acceptor: TlsAcceptor,
    resolver: Arc<CertResolver>,
    timeout: Duration,
    ok: Counter,
    error: Counter,
    timed_out: Counter,
}

impl std::fmt::Debug for TlsTerminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTerminator")
            .field("listener", &self.listener)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TlsTerminator {
    /// Loads the listener's certificates and builds its rustls configuration: TLS 1.3 and 1.2,
    /// ALPN `h2` then `http/1.1`, stateless session tickets.
    pub(crate) fn new(listener: &str, config: &TlsConfig) -> Result<Self, CertError> {
        Self::build(listener, config, None, &ALPN)
    }

    /// The registry's TLS: gRPC, so ALPN `h2` only; with `client_ca`, a client without a
    /// certificate signed by one of its CAs does not complete the handshake.
    pub(crate) fn grpc(
        listener: &str,
        config: &TlsConfig,
        client_ca: Option<&Path>,
    ) -> Result<Self, CertError> {
        let verifier = client_ca.map(client_verifier).transpose()?;
        Self::build(listener, config, verifier, &ALPN_GRPC)
    }

    #[expect(
        clippy::expect_used,
        reason = "the default provider supports TLS 1.2 and 1.3; the system random number generator works"
    )]
    fn build(
        listener: &str,
        config: &TlsConfig,
        clients: Option<Arc<dyn ClientCertVerifier>>,
        alpn: &[&[u8]],
    ) -> Result<Self, CertError> {
        let resolver = Arc::new(CertResolver::new(CertSet::load(config)?));
        let builder = ServerConfig::builder_with_provider(provider().clone())
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])
            .expect("the default provider supports TLS 1.2 and 1.3");
        let builder = match clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(resolver.clone());
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Resumption without server-side state: TLS 1.3 tickets and TLS 1.2 session tickets.
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .expect("the system random number generator works");
        let listener: Arc<str> = Arc::from(listener);
        let count = |result: HandshakeResult| counter!(TLS_HANDSHAKES_TOTAL, "listener" => listener.to_string(), "result" => result.as_str());
        Ok(Self {
            ok: count(HandshakeResult::Ok),
            error: count(HandshakeResult::Error),
            timed_out: count(HandshakeResult::Timeout),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
            timeout: config.handshake_timeout,
            listener,
        })
    }

    /// Serves `certs` from the next handshake on (a reload's), established connections keep
    /// theirs, and publishes their expiry.
    pub(crate) fn replace_certs(&self, certs: CertSet) {
        self.resolver.replace(certs);
        self.export_expiry();
    }

    /// Sets `fulcrum_tls_certificate_expiry_timestamp_seconds` of this listener to the
    /// certificates it serves now. Called when the listener starts serving and by
    /// [`Self::replace_certs`], not when it is built: a listener a failed reload bound and
    /// dropped never exports anything.
    pub(crate) fn export_expiry(&self) {
        let certs = self.resolver.certs.load();
        set_certificate_expiry(
            &self.listener,
            certs
                .expiries
                .iter()
                .map(|e| (e.name.as_str(), e.not_after)),
        );
    }

    /// Runs the server side of a handshake within the listener's timeout. `None` means the
    /// client is gone or useless (plaintext on a TLS port, a bad hello, silence): the caller
    /// drops the connection.
    pub(crate) async fn handshake<IO>(&self, io: IO, peer: SocketAddr) -> Option<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let (result, stream) = match tokio::time::timeout(self.timeout, self.take_turns(io)).await {
            Ok(Ok(stream)) => (HandshakeResult::Ok, Some(stream)),
            Ok(Err(e)) => {
                // Scanners and plaintext clients do this all day: not worth more than debug.
                debug!(listener = %self.listener, %peer, error = %e, "TLS handshake failed");
                (HandshakeResult::Error, None)
            }
            Err(_) => {
                debug!(listener = %self.listener, %peer, timeout = ?self.timeout, "TLS handshake timed out");
                (HandshakeResult::Timeout, None)
            }
        };
        match result {
            HandshakeResult::Ok => self.ok.increment(1),
            HandshakeResult::Error => self.error.increment(1),
            HandshakeResult::Timeout => self.timed_out.increment(1),
        }
        stream
    }
}

impl TlsTerminator {
    /// The handshake, with the expensive step (answering a `ClientHello`: the certificate's
    /// signature, ~0.5 ms for RSA-2048) taken in turns on each worker.
    ///
    /// When many clients connect at once, every `ClientHello` is ready together, and the
    /// runtime's queue would sign them all before it read any client's `Finished`: 2,000 new
    /// clients all got their first byte after ~1 s, each holding its TLS, HTTP/2 and backend
    /// state at the same moment. A turn is held from the signature until the task has
    /// yielded once, so everything ready meanwhile (finishing handshakes, requests, answers)
    /// runs before the next signature, and connections finish in the order they came.
    /// Nothing waits on a client while holding a turn, so a client that stalls holds up no one.
    async fn take_turns<IO>(&self, io: IO) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
        let turns = HANDSHAKE_TURNS.with(Arc::clone);
        // Never closed, so the error arm is unreachable; without a turn the handshake still runs.
        let turn = turns.acquire_owned().await.ok();
        let mut accept = start.into_stream(self.acceptor.config().clone());
        // The server's flight goes out before the turn passes on.
        let sent = std::future::poll_fn(|cx| match Pin::new(&mut accept).poll(cx) {
            Poll::Ready(done) => Poll::Ready(Some(done)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        if let Some(done) = sent {
            return done;
        }
        tokio::task::yield_now().await;
        drop(turn);
        accept.await
    }
}

thread_local! {
    /// One handshake turn per worker thread (see [`TlsTerminator::take_turns`]); tokio's
    /// semaphore is fair, so turns go in the order they were asked for.
    static HANDSHAKE_TURNS: Arc<Semaphore> = Arc::new(Semaphore::new(1));
}

/// The negotiated ALPN protocol of an established TLS connection.
pub(crate) fn alpn<IO>(stream: &TlsStream<IO>) -> Option<&[u8]> {
    stream.get_ref().1.alpn_protocol()
}

/// What the access log records of a TLS connection: its protocol version and the SNI name
/// the client asked for.
#[derive(Debug, Clone)]
pub(crate) struct TlsInfo {
    /// `TLSv1.2`, `TLSv1.3`.
    pub version: &'static str,
    pub sni: Option<Arc<str>>,
}

/// The version and SNI name of an established TLS connection (once per connection).
pub(crate) fn info<IO>(stream: &TlsStream<IO>) -> TlsInfo {
    let conn = stream.get_ref().1;
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        // rustls speaks no other version; an established connection always has one.
        _ => "TLS",
    };
    TlsInfo {
        version,
        sni: conn.server_name().map(Arc::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::certs::{LoadedCert, self_signed};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    fn key() -> Arc<CertifiedKey> {
        let (cert, key) = self_signed(&["x.test"]).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        Arc::new(CertifiedKey::from_der(chain, key, provider()).unwrap())
    }

    #[test]
    fn sni_prefers_exact_names_then_one_level_wildcards_then_the_default() {
        let (default, exact, wild) = (key(), key(), key());
        let set = CertSet {
            default: default.clone(),
            exact: HashMap::from([("a.example".to_owned(), exact.clone())]),
            wildcard: HashMap::from([("a.example".to_owned(), wild.clone())]),
            expiries: Vec::new(),
        };
        let is = |name: Option<&str>, want: &Arc<CertifiedKey>| {
            assert!(Arc::ptr_eq(set.pick(name), want), "{name:?}");
        };
        is(Some("a.example"), &exact);
        is(Some("A.Example."), &exact);
        is(Some("www.a.example"), &wild);
        is(Some("deep.www.a.example"), &default);
        is(Some("other.example"), &default);
        is(None, &default);
    }

    #[test]
    fn covers_follows_wildcard_rules() {
        let loaded = LoadedCert {
            certified: key(),
            dns_names: vec!["a.example".into(), "*.b.example".into()],
            warnings: Vec::new(),
            expiry: Expiry {
                name: "a.example".into(),
                not_after: 0,
            },
        };
        assert!(loaded.covers("a.example"));
        assert!(loaded.covers("x.b.example"));
        assert!(loaded.covers("*.b.example"));
        assert!(!loaded.covers("b.example"));
        assert!(!loaded.covers("y.x.b.example"));
        assert!(!loaded.covers("x.a.example"));
    }
}
