//! Certificate problems found by `fulcrum check` (the real binary), each at its config key and
//! naming the file: a key of another certificate, a missing file, a file with no PEM in it. An
//! expired certificate is a loud warning, not an error: fulcrum still starts and serves it. Key
//! formats: PKCS#8 (EC and RSA) and PKCS#1 RSA, with a chain.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::tls::{self, CertDir};
use support::*;

/// A config with one TLS listener using `cert` and `key`, plus `tail` (SNI tables).
fn config(cert: &Path, key: &Path, tail: &str) -> String {
    let mut toml = single_pool(
        "tls_check",
        "round_robin",
        &[("a", "127.0.0.1:9".parse().unwrap(), 1)],
        "",
    );
    toml += &tls::tls_listener("https", cert, key, "");
    toml + tail
}

fn check(dir: &CertDir, toml: &str) -> Output {
    let file = dir.file("fulcrum.toml", toml.as_bytes());
    Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .expect("run fulcrum check")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Exit 1 and one diagnostic line carrying every piece of `expected`.
#[track_caller]
fn assert_error(output: &Output, expected: &[&str]) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(1), "stderr:\n{err}");
    assert!(
        err.lines()
            .any(|line| expected.iter().all(|piece| line.contains(piece))),
        "no line with all of {expected:?} in:\n{err}"
    );
}

#[test]
fn a_key_of_another_certificate_fails_check_at_the_key_naming_both_files() {
    let dir = CertDir::new("mismatch");
    let site = dir.cert("site", &["site.test"]);
    let other = dir.cert("other", &["other.test"]);
    let output = check(&dir, &config(&site.cert, &other.key, ""));
    assert_error(
        &output,
        &[
            "fulcrum.toml:",
            "listeners[1].tls.key: the private key in",
            &other.key.display().to_string(),
            "does not belong to the certificate in",
            &site.cert.display().to_string(),
        ],
    );
}

#[test]
fn missing_and_non_pem_files_fail_check_naming_the_file() {
    let dir = CertDir::new("missing");
    let site = dir.cert("site", &["site.test"]);
    let missing = dir.path.join("nope.crt");
    assert_error(
        &check(&dir, &config(&missing, &site.key, "")),
        &[
            "listeners[1].tls.cert: cannot read certificate file",
            &missing.display().to_string(),
            "No such file",
        ],
    );

    let garbage = dir.file("garbage.crt", b"this is not a certificate\n");
    assert_error(
        &check(&dir, &config(&garbage, &site.key, "")),
        &[
            "listeners[1].tls.cert:",
            "contains no PEM certificate",
            "garbage.crt",
        ],
    );

    // A certificate where the key should be.
    assert_error(
        &check(&dir, &config(&site.cert, &site.cert, "")),
        &[
            "listeners[1].tls.key:",
            "contains no private key",
            "site.crt",
        ],
    );

    // Errors in an SNI entry point at that entry.
    let tail = tls::sni_entry(
        &["a.test"],
        &tls::Cert {
            cert: missing.clone(),
            key: site.key.clone(),
            der: Vec::new(),
        },
    );
    assert_error(
        &check(&dir, &config(&site.cert, &site.key, &tail)),
        &[
            "listeners[1].tls.sni[0].cert: cannot read certificate file",
            "nope.crt",
        ],
    );
}

#[test]
fn sni_names_are_checked() {
    let dir = CertDir::new("names");
    let site = dir.cert("site", &["site.test"]);
    let a = dir.cert("a", &["a.test"]);
    let tail = tls::sni_entry(&["a.test"], &a) + &tls::sni_entry(&["A.test", "10.0.0.1"], &a);
    let output = check(&dir, &config(&site.cert, &site.key, &tail));
    assert_error(
        &output,
        &["listeners[1].tls.sni[1].names: `a.test` is already claimed by sni[0]"],
    );
    assert_error(
        &output,
        &["listeners[1].tls.sni[1].names: `10.0.0.1` is an IP address"],
    );

    // A name the certificate does not cover is a warning: clients would refuse it.
    let tail = tls::sni_entry(&["b.test"], &a);
    let output = check(&dir, &config(&site.cert, &site.key, &tail));
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: ") && err.contains("does not cover `b.test`"),
        "{err}"
    );
}

#[tokio::test]
async fn an_expired_certificate_warns_loudly_but_fulcrum_starts_and_serves_it() {
    let dir = CertDir::new("expired");
    let old = dir.expired_cert("old", &["old.test"]);
    let toml = config(&old.cert, &old.key, "");
    let output = check(&dir, &toml);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("warning: ")
            && l.contains("listeners[1].tls.cert: the certificate in")
            && l.contains("old.crt")
            && l.contains("expired on 2021-01-01")),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("tls (1 certificate"));

    let running = balancer(&toml).await;
    let stream = tls::connect(
        running.addr("https").unwrap(),
        Some("old.test"),
        &[b"http/1.1"],
    )
    .await;
    assert_eq!(tls::peer_leaf(&stream), old.der);
}

/// `(tag, content, rest)` of one DER element (definite lengths only).
fn der(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (input[0], input[1] as usize);
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | *b as usize);
        (len, 2 + n)
    };
    (tag, &input[header..header + len], &input[header + len..])
}

fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn a_pkcs1_rsa_key_and_a_chain_with_its_issuer_load_and_are_served() {
    let dir = CertDir::new("formats");
    // A CA and a leaf it signed; the cert file holds the chain, leaf first.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["rsa.test".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let chain = dir.file("chain.crt", (leaf.pem() + &ca_cert.pem()).as_bytes());

    // PKCS#8 PrivateKeyInfo: SEQUENCE { version, algorithm, OCTET STRING { RSAPrivateKey } }.
    let pkcs8 = leaf_key.serialize_der();
    let (_, info, _) = der(&pkcs8);
    let (_, _, rest) = der(info); // version
    let (_, _, rest) = der(rest); // algorithm
    let (tag, rsa_private_key, _) = der(rest);
    assert_eq!(tag, 0x04, "an OCTET STRING");
    let key = dir.file(
        "rsa.key",
        pem("RSA PRIVATE KEY", rsa_private_key).as_bytes(),
    );

    let toml = config(&chain, &key, "");
    let output = check(&dir, &toml);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let running = balancer(&toml).await;
    let stream = tls::connect(running.addr("https").unwrap(), Some("rsa.test"), &[b"h2"]).await;
    let presented = stream.get_ref().1.peer_certificates().unwrap();
    assert_eq!(presented.len(), 2, "leaf and issuer are both sent");
    assert_eq!(presented[0].as_ref(), leaf.der().as_ref());
    assert_eq!(presented[1].as_ref(), ca_cert.der().as_ref());
}
