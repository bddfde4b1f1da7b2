//! The registry from a test's side: configs with a `[registry]`, a plain gRPC client, the
//! messages, and the pool as `GET /api/pools` lists it.

use std::net::SocketAddr;

use fulcrum::Running;
use fulcrum::registry::proto::server_registry_service_client::ServerRegistryServiceClient;
use fulcrum::registry::proto::{ReportActiveRequest, ReportDecommissionRequest};
use serde_json::Value;
use tonic::transport::Channel;

use super::{balancer, client, get, single_pool, url, wait_until};

/// Checks every 100 ms, up after 2 passes: a registered node routes within about 300 ms.
pub const FAST_CHECKS: &str =
    "[pools.POOL.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 2\n";

/// A single-pool balancer config with a registry on an ephemeral loopback port feeding that
/// pool; `registry_extra` goes into the `[registry]` table (`token = "..."`, ...).
pub fn registry_config(
    pool: &str,
    backends: &[(&str, SocketAddr, u32)],
    heartbeat_interval: &str,
    registry_extra: &str,
) -> String {
    let extra = format!(
        "{}\n[registry]\nbind = \"127.0.0.1:0\"\npool = \"{pool}\"\nheartbeat_interval = \"{heartbeat_interval}\"\n{registry_extra}\n",
        FAST_CHECKS.replace("POOL", pool)
    );
    single_pool(pool, "round_robin", backends, &extra)
}

/// A cleartext gRPC client of the balancer's registry.
pub async fn registry_client(running: &Running) -> ServerRegistryServiceClient<Channel> {
    let addr = running.registry_addr().expect("registry listener");
    ServerRegistryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("the registry accepts a gRPC connection")
}

pub fn active(id: &str, addr: SocketAddr) -> ReportActiveRequest {
    ReportActiveRequest {
        server_id: id.into(),
        ip_address: addr.ip().to_string(),
        port: i32::from(addr.port()),
        bootstrap_timestamp_ms: 1_700_000_000_000,
    }
}

pub fn decommission(id: &str, drain: &str) -> ReportDecommissionRequest {
    ReportDecommissionRequest {
        server_id: id.into(),
        graceful_drain_timeout_seconds: drain.into(),
    }
}

/// `(name, address, state)` of every backend of `pool` in `GET /api/pools`.
pub async fn listed(running: &Running, pool: &str) -> Vec<(String, String, String)> {
    let admin = running.admin_addr().expect("admin listener");
    let reply = get(&client(), &format!("http://{admin}/api/pools")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body: Value = serde_json::from_slice(&reply.body).unwrap();
    body["pools"][pool]["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no pool {pool} in {body}"))
        .iter()
        .map(|b| {
            let field = |k: &str| b[k].as_str().unwrap_or_default().to_owned();
            (field("name"), field("address"), field("state"))
        })
        .collect()
}

pub async fn state_of(running: &Running, pool: &str, name: &str) -> Option<String> {
    listed(running, pool)
        .await
        .into_iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, _, state)| state)
}

/// A balancer of its own (listener, admin API) whose registry feeds `pool` and shares `store`; checks every 100 ms, rise 2.
pub async fn store_balancer(pool: &str, strategy: &str, store: &str, heartbeat: &str) -> Running {
    let sticky = if strategy == "sticky_cookie" {
        format!(
            "[pools.{pool}.sticky]\nsecret = \"correct horse battery staple\"\nfallback = \"round_robin\"\n"
        )
    } else {
        String::new()
    };
    let extra = format!(
        "{}\n{sticky}[registry]\nbind = \"127.0.0.1:0\"\npool = \"{pool}\"\nheartbeat_interval = \"{heartbeat}\"\nstore = \"{store}\"\nstore_poll_interval = \"1s\"\n",
        FAST_CHECKS.replace("POOL", pool)
    );
    balancer(&single_pool(pool, strategy, &[], &extra)).await
}

/// Waits until a balancer's registry reaches its store: a decommission of a node nobody
/// registered answers `NOT_FOUND` then (`UNAVAILABLE` before), and writes nothing.
pub async fn store_ready(running: &Running) {
    let registry = registry_client(running).await;
    wait_until("the registry reaches its store", || async {
        let answer = registry
            .clone()
            .report_decommission(decommission("store-probe", "0"))
            .await;
        matches!(answer, Err(status) if status.code() == tonic::Code::NotFound)
    })
    .await;
}

pub async fn served_by(running: &Running) -> String {
    get(&client(), &url(running, "/")).await.served_by()
}
