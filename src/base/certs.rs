//! Certificate chains and private keys from PEM files, checked (the key belongs to the
//! certificate, the leaf's names and validity read) with errors that name the file. Config
//! validation and the TLS listeners both load through here, so a file `check` accepts is one
//! a listener serves.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM certificate chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
/// Relative paths are relative to the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the chain's leaf.
    pub key: PathBuf,
}

/// aws-lc-rs with rustls' default suites: TLS 1.3 AES-GCM and ChaCha20-Poly1305, TLS 1.2 only
/// with ECDHE and AEAD suites; X25519MLKEM768, X25519, P-256 and P-384 key exchange.
pub(crate) fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Which file of a certificate/key pair a [`CertError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFile {
    Cert,
    Key,
}

/// Why a certificate chain and key could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read certificate file `{}`: {source}", path.display())]
    ReadCert {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read key file `{}`: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` is not valid PEM: {source}", path.display())]
    Pem {
        file: CertFile,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("`{}` contains no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("`{}` does not start with a valid X.509 certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("`{}` contains no private key (PEM PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`)", path.display())]
    NoKey { path: PathBuf },
    #[error("the private key in `{}` cannot be used: {source}", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key in `{}` does not belong to the certificate in `{}`", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

impl CertError {
    /// The file to point the operator at.
    pub fn file(&self) -> CertFile {
        match self {
            CertError::ReadCert { .. }
            | CertError::NoCertificate { .. }
            | CertError::BadCertificate { .. } => CertFile::Cert,
            CertError::ReadKey { .. }
            | CertError::NoKey { .. }
            | CertError::BadKey { .. }
            | CertError::Mismatch { .. } => CertFile::Key,
            CertError::Pem { file, .. } => *file,
        }
    }
}

/// A certificate chain with its key, ready to serve, and what the operator should hear about it.
#[derive(Debug)]
pub(crate) struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    /// DNS names of the leaf's subjectAltName, lower case (`*.example.com` for wildcards).
    pub dns_names: Vec<String>,
    /// Expired or not yet valid: clients will refuse it, but fulcrum serves it (a reload or a
    /// restart with a fresh file fixes it without a config change).
    pub warnings: Vec<String>,
    /// What the expiry gauge calls the leaf, and when it expires.
    pub expiry: Expiry,
}

/// A leaf's `notAfter`, under the name `fulcrum_tls_certificate_expiry_timestamp_seconds`
/// gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expiry {
    /// The first DNS name of the subjectAltName, else the subject's common name, else
    /// `unnamed`.
    pub name: String,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
}

impl LoadedCert {
    /// Whether a client asking for `name` (a config SNI name, possibly `*.x`) accepts the leaf.
    pub(crate) fn covers(&self, name: &str) -> bool {
        self.dns_names.iter().any(|have| {
            have == name
                || (have.starts_with("*.")
                    && name
                        .split_once('.')
                        .is_some_and(|(first, rest)| first != "*" && rest == &have[2..]))
        })
    }
}

/// Reads and checks one certificate chain (leaf first) and its private key.
pub(crate) fn load_cert(paths: &CertPaths) -> Result<LoadedCert, CertError> {
    let cert_pem = std::fs::read(&paths.cert).map_err(|source| CertError::ReadCert {
        path: paths.cert.clone(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            file: CertFile::Cert,
            path: paths.cert.clone(),
            source,
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: paths.cert.clone(),
        });
    };
    let (dns_names, warnings, expiry) = inspect_leaf(&paths.cert, leaf)?;

    let key_pem = std::fs::read(&paths.key).map_err(|source| CertError::ReadKey {
        path: paths.key.clone(),
        source,
    })?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(CertError::NoKey {
                path: paths.key.clone(),
            });
        }
        Err(source) => {
            return Err(CertError::Pem {
                file: CertFile::Key,
                path: paths.key.clone(),
                source,
            });
        }
    };
    let certified = CertifiedKey::from_der(chain, key, provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::Mismatch {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
        },
        source => CertError::BadKey {
            path: paths.key.clone(),
            source,
        },
    })?;
    Ok(LoadedCert {
        certified: Arc::new(certified),
        dns_names,
        warnings,
        expiry,
    })
}

/// The leaf's DNS names, validity warnings and expiry.
fn inspect_leaf(
    path: &Path,
    leaf: &CertificateDer<'_>,
) -> Result<(Vec<String>, Vec<String>, Expiry), CertError> {
    let bad = |reason: String| CertError::BadCertificate {
        path: path.to_owned(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(name) = name {
                dns_names.push(name.to_ascii_lowercase());
            }
        }
    }
    let mut warnings = Vec::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = cert.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if not_after < now {
        warnings.push(format!(
            "the certificate in `{}` expired on {}; clients will refuse it",
            path.display(),
            utc(not_after)
        ));
    } else if not_before > now {
        warnings.push(format!(
            "the certificate in `{}` is not valid before {}; clients will refuse it until then",
            path.display(),
            utc(not_before)
        ));
    }
    let name = dns_names
        .first()
        .cloned()
        .or_else(|| {
            cert.subject()
                .iter_common_name()
                .find_map(|cn| cn.as_str().ok().map(str::to_owned))
        })
        .unwrap_or_else(|| "unnamed".to_owned());
    let expiry = Expiry { name, not_after };
    Ok((dns_names, warnings, expiry))
}

/// `2030-01-01T00:00:00Z` for a Unix time (certificates may predate 1970 in theory: clamp).
fn utc(unix: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Requires a client certificate that chains to one of the CA certificates in `path` (PEM):
/// the registry's mutual TLS. Errors name the file as [`CertFile::Cert`].
pub(crate) fn client_verifier(path: &Path) -> Result<Arc<dyn ClientCertVerifier>, CertError> {
    let pem = std::fs::read(path).map_err(|source| CertError::ReadCert {
        path: path.to_owned(),
        source,
    })?;
    let cas = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            file: CertFile::Cert,
            path: path.to_owned(),
            source,
        })?;
    if cas.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    let bad = |reason: String| CertError::BadCertificate {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| bad(e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider().clone())
        .build()
        .map_err(|e| bad(e.to_string()))
}

/// A self-signed certificate for `names` (DNS names or IP addresses), PEM encoded: the demo's
/// and the tests' certificate. P-256, valid from now for a year.
pub(crate) fn self_signed(names: &[&str]) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}
