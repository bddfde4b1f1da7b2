//! TLS pieces of the tests: certificates made with rcgen in a directory of the test's own, TOML
//! for TLS listeners, and rustls clients that report which certificate the server chose.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::TestBody;

/// A certificate written as PEM files, and its DER to compare with what a server presents.
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

/// A directory of certificates for one test, removed when the test ends.
pub struct CertDir {
    pub path: PathBuf,
}

impl CertDir {
    pub fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("fulcrum-tls-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create cert dir");
        Self { path }
    }

    /// A self-signed P-256 certificate for `names`, valid now.
    pub fn cert(&self, stem: &str, names: &[&str]) -> Cert {
        let params = rcgen::CertificateParams::new(to_strings(names)).unwrap();
        self.write(stem, params, &rcgen::KeyPair::generate().unwrap())
    }

    /// A self-signed RSA-2048 certificate (PKCS#8 key), valid now.
    pub fn rsa_cert(&self, stem: &str, names: &[&str]) -> Cert {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(to_strings(names)).unwrap();
        self.write(stem, params, &key)
    }

    /// A certificate that expired in 2021.
    pub fn expired_cert(&self, stem: &str, names: &[&str]) -> Cert {
        let mut params = rcgen::CertificateParams::new(to_strings(names)).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.write(stem, params, &rcgen::KeyPair::generate().unwrap())
    }

    fn write(&self, stem: &str, params: rcgen::CertificateParams, key: &rcgen::KeyPair) -> Cert {
        let cert = params.self_signed(key).unwrap();
        Cert {
            cert: self.file(&format!("{stem}.crt"), cert.pem().as_bytes()),
            key: self.file(&format!("{stem}.key"), key.serialize_pem().as_bytes()),
            der: cert.der().to_vec(),
        }
    }

    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).expect("write cert file");
        path
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn to_strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// A `[[listeners]]` entry for a TLS listener on an ephemeral port; `extra` goes into the
/// listener table (e.g. `tls_handshake_timeout = "300ms"`). Append `[[listeners.tls.sni]]`
/// tables right after it.
pub fn tls_listener(name: &str, cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "{name}"
bind = "127.0.0.1:0"
{extra}
[listeners.tls]
cert = "{}"
key = "{}"
"#,
        cert.display(),
        key.display()
    )
}

/// An `[[listeners.tls.sni]]` entry.
pub fn sni_entry(names: &[&str], cert: &Cert) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "\n[[listeners.tls.sni]]\nnames = [{}]\ncert = \"{}\"\nkey = \"{}\"\n",
        names.join(", "),
        cert.cert.display(),
        cert.key.display()
    )
}

/// Trusts whatever the server presents: the tests look at which certificate it was instead.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection to `addr` sending `sni` (none when `None`) and offering `alpn`.
pub async fn connect(addr: SocketAddr, sni: Option<&str>, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    // rustls sends no SNI for an IP address.
    let name = match sni {
        Some(name) => ServerName::try_from(name.to_owned()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    connect_over(tcp, name, alpn).await
}

/// The client side of a TLS handshake over an open connection (which may have carried
/// something first, e.g. a PROXY protocol header), offering `alpn`.
pub async fn connect_over(
    tcp: TcpStream,
    name: ServerName<'static>,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    tokio::time::timeout(
        super::DEADLINE,
        TlsConnector::from(client_config(alpn)).connect(name, tcp),
    )
    .await
    .expect("handshake within the deadline")
    .expect("handshake succeeds")
}

/// A client that accepts any server certificate, offering `alpn`.
fn client_config(alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The bytes of a real `ClientHello` for `sni`, for a client that sends it by hand and
/// then does what a test wants (nothing, say).
pub fn client_hello(sni: &str) -> Vec<u8> {
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let mut client = rustls::ClientConnection::new(client_config(&[b"h2"]), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    hello
}

/// The DER of the certificate the server presented.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("server sent a certificate")[0]
        .to_vec()
}

pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// An HTTP/2 client over an established TLS connection (ALPN `h2`).
pub async fn h2(stream: TlsStream<TcpStream>) -> http2::SendRequest<TestBody> {
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// An HTTP/1.1 client over an established TLS connection.
pub async fn h1(stream: TlsStream<TcpStream>) -> http1::SendRequest<TestBody> {
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(conn);
    sender
}
