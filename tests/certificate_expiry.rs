//! `fulcrum_tls_certificate_expiry_timestamp_seconds{listener,name}`: every certificate a TLS
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own
//! listener serves shows its `notAfter` under its first DNS name (else its subject CN), and a
//! reload that rotates certificates or removes the listener takes the old series out at once.

mod support;

use http::Request;
use support::tls::CertDir;
use support::*;

const METRIC: &str = "fulcrum_tls_certificate_expiry_timestamp_seconds";

/// A self-signed certificate valid until the start of `year`, written to `dir` as
/// `stem.crt`/`stem.key`. `names` become the subjectAltName (first one first); `cn` the
/// subject's common name.
fn cert_until(
    dir: &CertDir,
    stem: &str,
    names: &[&str],
    cn: Option<&str>,
    year: i32,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (
        dir.file(&format!("{stem}.crt"), cert.pem().as_bytes()),
        dir.file(&format!("{stem}.key"), key.serialize_pem().as_bytes()),
    )
}

/// Unix seconds of 1 January `year`, 00:00 UTC.
fn new_year(year: i32) -> f64 {
    let days: i64 = (1970..year)
        .map(|y| {
            if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) {
                366
            } else {
                365
            }
        })
        .sum();
    (days * 86_400) as f64
}

/// The expiry series of `listener` in a scrape, as (name, value), sorted.
fn expiries(scrape: &str, listener: &str) -> Vec<(String, f64)> {
    let prefix = format!("{METRIC}{{listener=\"{listener}\",name=\"");
    let mut found: Vec<(String, f64)> = scrape
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

async fn reload(running: &fulcrum::Running) {
    let admin = running.admin_addr().unwrap();
    let reply = send(
        &client(),
        Request::post(format!("http://{admin}/api/reload"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn expiry_gauges_follow_loaded_certificates_through_rotation_and_listener_removal() {
    let dir = CertDir::new("expiry-gauge");
    let nodes = webnodes(1).await;
    let (old_cert, old_key) = cert_until(&dir, "old", &["old.expiry.test", "b.test"], None, 2031);
    let (cn_cert, cn_key) = cert_until(&dir, "cn", &[], Some("cn-only.expiry.test"), 2033);
    let (anon_cert, anon_key) = cert_until(&dir, "anon", &[], None, 2034);
    let base = single_pool(
        "expiry_gauge",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    );
    let sni = |names: &str, cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "\n[[listeners.tls.sni]]\nnames = [{names}]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    let first = base.clone()
        + &tls::tls_listener("expiry_gauge_tls", &old_cert, &old_key, "")
        + &sni("\"cn-only.expiry.test\"", &cn_cert, &cn_key)
        + &sni("\"anon.expiry.test\"", &anon_cert, &anon_key);
    let path = dir.path.join("fulcrum.toml");
    std::fs::write(&path, &first).unwrap();
    let running = fulcrum::start_file(&path).await.unwrap();

    assert_eq!(
        expiries(&scrape(&running).await, "expiry_gauge_tls"),
        vec![
            ("cn-only.expiry.test".to_owned(), new_year(2033)),
            ("old.expiry.test".to_owned(), new_year(2031)),
            ("unnamed".to_owned(), new_year(2034)),
        ],
        "the first DNS name, else the CN, else `unnamed`; notAfter in Unix seconds"
    );

    // Rotation: new files, one certificate dropped, another kept.
    let (new_cert, new_key) = cert_until(&dir, "new", &["new.expiry.test"], None, 2032);
    std::fs::write(
        &path,
        base.clone()
            + &tls::tls_listener("expiry_gauge_tls", &new_cert, &new_key, "")
            + &sni("\"cn-only.expiry.test\"", &cn_cert, &cn_key),
    )
    .unwrap();
    reload(&running).await;
    let text = scrape(&running).await;
    assert_eq!(
        expiries(&text, "expiry_gauge_tls"),
        vec![
            ("cn-only.expiry.test".to_owned(), new_year(2033)),
            ("new.expiry.test".to_owned(), new_year(2032)),
        ],
        "a reload publishes the new certificates and drops the series of those gone:\n{text}"
    );

    // The listener goes: so do its series.
    std::fs::write(&path, &base).unwrap();
    reload(&running).await;
    let text = scrape(&running).await;
    assert_eq!(
        expiries(&text, "expiry_gauge_tls"),
        Vec::new(),
        "a removed listener's certificates leave the scrape:\n{text}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn the_registry_certificate_shows_under_listener_registry() {
    let dir = CertDir::new("expiry-registry");
    let nodes = webnodes(1).await;
    let (cert, key) = cert_until(&dir, "registry", &["registry.expiry.test"], None, 2035);
    let toml = support::registry::registry_config(
        "expiry_registry",
        &nodes_as_backends(&nodes),
        "1s",
        &format!(
            "[registry.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let running = balancer(&toml).await;
    let text = scrape(&running).await;
    assert_eq!(
        series(
            &text,
            &format!("{METRIC}{{listener=\"registry\",name=\"registry.expiry.test\"}}")
        ),
        Some(new_year(2035)),
        "{text}"
    );
    running.shutdown().await;
}
