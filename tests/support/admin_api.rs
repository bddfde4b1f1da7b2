//! The admin API as an operator's client calls it, and config files for balancers that reload.

use std::path::{Path, PathBuf};

use fulcrum::Running;
use http::{Method, Request, StatusCode};
use serde_json::Value;

use super::{client, empty, full, send};

/// Calls the admin API (JSON in and out); `token` goes in `Authorization: Bearer`.
pub async fn api(
    running: &Running,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let admin = running.admin_addr().expect("admin listener");
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(value) => {
            request = request.header("content-type", "application/json");
            full(value.to_string())
        }
        None => empty(),
    };
    let reply = send(&client(), request.body(body).unwrap()).await;
    let value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, value)
}

/// A config file of its own for one balancer that reloads; removed when dropped.
pub struct ConfigFile(PathBuf);

impl ConfigFile {
    pub fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("fulcrum-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    pub fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
