//! `[listeners.tls]` and `[[listeners.tls.sni]]`: SNI names, and every certificate loaded with
//! its key, so `fulcrum check` catches a missing file or a key of another certificate before a
//! restart does.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Validator;
use crate::base::certs::{self, CertFile};
use crate::base::config::{CertPaths, SniCert, TlsConfig};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    #[serde(default)]
    sni: Vec<Spanned<RawSni>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSni {
    names: Spanned<Vec<Spanned<String>>>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

impl Validator<'_> {
    pub(super) fn tls(
        &mut self,
        listener: usize,
        raw: &RawTls,
        handshake_timeout: Duration,
    ) -> Option<TlsConfig> {
        let prefix = format!("listeners[{listener}].tls");
        let default = self.cert_pair(&prefix, &raw.cert, &raw.key, &[]);
        // name -> the sni entry that claimed it first
        let mut claimed: HashMap<String, usize> = HashMap::new();
        let mut sni = Vec::new();
        for (i, entry) in raw.sni.iter().enumerate() {
            let entry = entry.get_ref();
            let prefix = format!("{prefix}.sni[{i}]");
            if entry.names.get_ref().is_empty() {
                self.error(
                    Some(entry.names.span()),
                    format!("{prefix}.names"),
                    "needs at least one name",
                );
            }
            let mut names = Vec::new();
            for name in entry.names.get_ref() {
                match sni_name(name.get_ref()) {
                    Ok(normal) => {
                        if let Some(first) = claimed.get(&normal) {
                            self.error(
                                Some(name.span()),
                                format!("{prefix}.names"),
                                format!("`{normal}` is already claimed by sni[{first}]"),
                            );
                        } else {
                            claimed.insert(normal.clone(), i);
                        }
                        names.push((normal, name.span()));
                    }
                    Err(message) => {
                        self.error(Some(name.span()), format!("{prefix}.names"), message);
                    }
                }
            }
            if let Some(paths) = self.cert_pair(&prefix, &entry.cert, &entry.key, &names) {
                sni.push(SniCert {
                    names: names.into_iter().map(|(n, _)| n).collect(),
                    paths,
                });
            }
        }
        Some(TlsConfig {
            default: default?,
            sni,
            handshake_timeout,
        })
    }

    /// Loads one certificate and key so their problems are found now, each at its key; warns
    /// about an expired certificate and about `names` the certificate does not cover.
    pub(super) fn cert_pair(
        &mut self,
        prefix: &str,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        names: &[(String, std::ops::Range<usize>)],
    ) -> Option<CertPaths> {
        let cert_path = self.file_path(cert, format!("{prefix}.cert"));
        let key_path = self.file_path(key, format!("{prefix}.key"));
        let paths = CertPaths {
            cert: cert_path?,
            key: key_path?,
        };
        match certs::load_cert(&paths) {
            Ok(loaded) => {
                for warning in &loaded.warnings {
                    self.warn(Some(cert.span()), format!("{prefix}.cert"), warning.clone());
                }
                for (name, span) in names {
                    if !loaded.covers(name) {
                        self.warn(
                            Some(span.clone()),
                            format!("{prefix}.names"),
                            format!(
                                "the certificate in `{}` does not cover `{name}`; clients asking for it will refuse it",
                                paths.cert.display()
                            ),
                        );
                    }
                }
            }
            Err(e) => {
                let (span, field) = match e.file() {
                    CertFile::Cert => (cert.span(), "cert"),
                    CertFile::Key => (key.span(), "key"),
                };
                self.error(Some(span), format!("{prefix}.{field}"), e.to_string());
            }
        }
        Some(paths)
    }
}

/// An SNI name from the config in the form the resolver compares: lower case, no trailing dot,
/// `*.` only as a whole first label.
fn sni_name(raw: &str) -> Result<String, String> {
    let name = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !bare.split('.').all(valid_label) {
        return Err(format!(
            "`{raw}` is not a DNS name (a wildcard is `*.` followed by a name)"
        ));
    }
    if bare.parse::<std::net::IpAddr>().is_ok()
        || bare.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Err(format!(
            "`{raw}` is an IP address; clients never send one as SNI (they get the default certificate)"
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::sni_name;

    #[test]
    fn sni_names_are_normalised_and_checked() {
        assert_eq!(sni_name("WWW.Example.com.").unwrap(), "www.example.com");
        assert_eq!(sni_name("*.example.com").unwrap(), "*.example.com");
        for bad in [
            "",
            "a..b",
            "*.",
            "a.*.b",
            "w*.example.com",
            "127.0.0.1",
            "a b",
        ] {
            assert!(sni_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
