//! `fulcrum demo`: three web nodes and a balancer on loopback, from an embedded config, over
//! HTTP and HTTPS (a self-signed certificate made at start).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::base::config::Config;
use crate::webnode::{self, WebNodeOptions};

/// The demo's config: three web nodes behind one pool, over HTTP and HTTPS.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// The demo's self-signed certificate, in a temporary directory removed when the demo ends.
struct DemoCert {
    dir: PathBuf,
}

impl DemoCert {
    fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("fulcrum-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let demo = Self { dir };
        let (cert, key) = crate::base::certs::self_signed(&["localhost", "127.0.0.1"])
            .context("generating the demo certificate")?;
        for (name, pem) in [("localhost.crt", cert), ("localhost.key", key)] {
            let path = demo.dir.join(name);
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(demo)
    }

    /// The embedded config with this certificate's directory filled in.
    fn config(&self) -> anyhow::Result<Config> {
        let text = DEMO_CONFIG.replace("$DEMO_TLS_DIR", &self.dir.display().to_string());
        Config::parse(Path::new("<embedded demo.toml>"), &text).context("embedded demo config")
    }
}

impl Drop for DemoCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run() -> anyhow::Result<()> {
    let cert = DemoCert::create()?;
    let config = cert.config()?;
    let mut nodes = Vec::new();
    for backend in config.pools.values().flat_map(|p| &p.backends) {
        let node = webnode::spawn(WebNodeOptions::new(backend.address, backend.name.clone()))
            .await
            .with_context(|| {
                format!(
                    "starting web node {} on {} (is the port in use?)",
                    backend.name, backend.address
                )
            })?;
        nodes.push(node);
    }
    let running = crate::start(&config)
        .await
        .context("starting the balancer (is the port in use?)")?;
    print_banner(&running, &nodes);
    crate::shutdown_signal().await;
    running.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}

/// Where everything listens, and what to try.
fn print_banner(running: &crate::Running, nodes: &[webnode::WebNode]) {
    let address = |scheme: &str, addr: Option<std::net::SocketAddr>| {
        addr.map(|a| format!("{scheme}://{a}")).unwrap_or_default()
    };
    let url = address("http", running.addr("http"));
    let https = address("https", running.addr("https"));
    let admin = address("http", running.admin_addr());

    println!("fulcrum demo: 3 web nodes behind one balancer (round robin)\n");
    println!("  balancer   {url}/");
    println!("  balancer   {https}/   (TLS, self-signed certificate: curl -k)");
    for node in nodes {
        println!(
            "  web node   {} at http://{}/",
            node.id(),
            node.local_addr()
        );
    }
    println!(
        "  admin      {admin}/status (open it in a browser)   {admin}/metrics   {admin}/healthz\n"
    );
    println!("Try:");
    for (command, what) in [
        (
            format!("for i in 1 2 3 4 5 6; do curl -s {url}/; done"),
            "answers rotate web-1, web-2, web-3",
        ),
        (
            format!("curl -s {url}/echo"),
            "what a backend receives (X-Forwarded-*)",
        ),
        (format!("curl -s {url}/slow?ms=500"), "a slow answer"),
        (
            format!("curl -sk {https}/echo"),
            "over TLS: X-Forwarded-Proto: https",
        ),
        (
            format!("curl -sk --http2 -o /dev/null -w '%{{http_version}}\\n' {https}/"),
            "HTTP/2 by ALPN: prints 2",
        ),
    ] {
        println!("  {command:<68} # {what}");
    }
    println!("  curl -s {admin}/metrics | grep -E '^fulcrum_(requests|tls_handshakes)_total'");
    println!("\nCtrl-C stops everything.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_gets_a_fresh_certificate_and_an_https_listener() {
        let cert = DemoCert::create().unwrap();
        let config = cert.config().unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        let https = config.listeners.iter().find(|l| l.name == "https").unwrap();
        let tls = https
            .tls
            .as_ref()
            .expect("the https listener terminates TLS");
        assert!(tls.default.cert.starts_with(&cert.dir));
        let dir = cert.dir.clone();
        drop(cert);
        assert!(!dir.exists(), "the certificate is removed with the demo");
    }
}
