//! `fulcrum demo`: three web nodes and a balancer on loopback, from an embedded config.

use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::webnode::{self, WebNodeOptions};

pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run() -> anyhow::Result<()> {
    let config = Config::parse(Path::new("<embedded demo.toml>"), DEMO_CONFIG)
        .context("embedded demo config")?;
    let mut nodes = Vec::new();
    for backend in config.pools.values().flat_map(|p| &p.backends) {
        let node = webnode::spawn(WebNodeOptions {
            listen: backend.address,
            id: backend.name.clone(),
        })
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
    let url = running
        .addr("http")
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();
    let admin = running
        .admin_addr()
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();

    println!("fulcrum demo: 3 web nodes behind one balancer (round robin)\n");
    println!("  balancer   {url}/");
    for node in &nodes {
        println!(
            "  web node   {} at http://{}/",
            node.id(),
            node.local_addr()
        );
    }
    println!("  admin      {admin}/metrics   {admin}/healthz\n");
    println!("Try:");
    println!(
        "  for i in 1 2 3 4 5 6; do curl -s {url}/; done          # answers rotate web-1, web-2, web-3"
    );
    println!(
        "  curl -s {url}/echo                                    # what a backend receives (X-Forwarded-*)"
    );
    println!("  curl -s {url}/slow?ms=500                             # a slow answer");
    println!("  curl -s {admin}/metrics | grep ^fulcrum_requests_total");
    println!("\nCtrl-C stops everything.");

    crate::shutdown_signal().await;
    running.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}
