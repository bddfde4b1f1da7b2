//! The admin listener: `GET /metrics` for Prometheus, `GET /status` for people, `GET /healthz`
//! for fulcrum's own health in the seed's schema, and the JSON API under `/api/` that changes pools at runtime. It runs
//! on its own port so scrapes and changes never queue behind traffic.
//!
//! Reads stay open; every mutation needs `Authorization: Bearer TOKEN` when `admin.token` is
//! set, compared in constant time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::body::ProxyBody;
use crate::control::{BackendSpec, ChangeError, Control, PoolView, ReloadError, Removal};
use crate::health_report::{CpuMeter, HealthReport};
use crate::proxy::local_response;
use crate::status::RateSampler;

/// API bodies are a few backends; anything bigger is a mistake or an attack.
const MAX_API_BODY: usize = 1 << 20;

#[derive(Debug)]
pub struct AdminState {
    pub cpu: CpuMeter,
    /// Client connections open on all traffic listeners.
    pub client_connections: Arc<AtomicU64>,
    pub control: Arc<Control>,
    pub token: Option<String>,
    pub status_rates: RateSampler,
}

pub async fn handle(req: Request<Incoming>, state: &AdminState) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    if path == "/api" || path.starts_with("/api/") {
        return api(req, &path, state).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return local_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match path.as_str() {
        "/metrics" => {
            let text = crate::metrics::recorder().render();
            with_type(
                Response::new(ProxyBody::local(text)),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/status" => {
            let html = crate::status::render(&state.control.router(), &state.status_rates);
            with_type(
                Response::new(ProxyBody::local(html)),
                "text/html; charset=utf-8",
            )
        }
        "/healthz" => {
            let connections = state.client_connections.load(Ordering::Relaxed);
            let report = HealthReport::new("fulcrum", "UP", &state.cpu, connections);
            let body = serde_json::to_vec(&report).expect("the health report always serializes");
            with_type(Response::new(ProxyBody::local(body)), "application/json")
        }
        _ => local_response(
            StatusCode::NOT_FOUND,
            "not found; try /status, /metrics, /healthz or /api/pools",
        ),
    }
}

async fn api(req: Request<Incoming>, path: &str, state: &AdminState) -> Response<ProxyBody> {
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mutating = method != Method::GET && method != Method::HEAD;
    if mutating && !authorized(&req, state.token.as_deref()) {
        let mut response = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let control = &state.control;
    match (&method, segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["api", "pools"]) => {
            let pools: serde_json::Map<String, serde_json::Value> = control
                .pools()
                .await
                .into_iter()
                .map(|(name, view)| (name, serde_json::to_value(view).unwrap_or_default()))
                .collect();
            ok(StatusCode::OK, &json!({ "pools": pools }))
        }
        (&Method::GET | &Method::HEAD, ["api", "pools", pool]) => {
            match control.pools().await.into_iter().find(|(n, _)| n == pool) {
                Some((_, view)) => ok(StatusCode::OK, &view),
                None => error(StatusCode::NOT_FOUND, &format!("no pool named `{pool}`")),
            }
        }
        (&Method::PUT, ["api", "pools", pool, "backends"]) => {
            let pool = (*pool).to_owned();
            match read_json::<Vec<BackendSpec>>(req).await {
                Ok(specs) => changed(control.replace_backends(&pool, specs).await),
                Err(response) => response,
            }
        }
        (&Method::POST, ["api", "pools", pool, "backends"]) => {
            let pool = (*pool).to_owned();
            match read_json::<BackendSpec>(req).await {
                Ok(spec) => changed(control.add_backend(&pool, spec).await),
                Err(response) => response,
            }
        }
        (&Method::DELETE, ["api", "pools", pool, "backends", name]) => {
            let drain = match drain_param(req.uri().query()) {
                Ok(drain) => drain,
                Err(message) => return error(StatusCode::BAD_REQUEST, &message),
            };
            match control.remove_backend(pool, name, drain).await {
                Ok((Removal::Removed, view)) => ok(StatusCode::OK, &view),
                Ok((Removal::Draining, view)) => ok(StatusCode::ACCEPTED, &view),
                Err(e) => change_error(e),
            }
        }
        (&Method::POST, ["api", "reload"]) => match control.reload().await {
            Ok(()) => ok(StatusCode::OK, &json!({ "result": "ok" })),
            Err(ReloadError::Invalid(e)) => {
                let errors: Vec<String> = e.diagnostics.iter().map(ToString::to_string).collect();
                ok(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": "the new config is invalid; the running config stays", "errors": errors }),
                )
            }
            Err(e @ (ReloadError::Certificate(_) | ReloadError::Listener(_))) => {
                // "outer: cause": the cause names the file or the address.
                let cause = std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default();
                ok(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": e.to_string(), "errors": [cause] }),
                )
            }
            Err(e @ ReloadError::NoFile) => error(StatusCode::CONFLICT, &e.to_string()),
        },
        (_, ["api", "pools"] | ["api", "pools", _] | ["api", "reload"])
        | (_, ["api", "pools", _, "backends", ..]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => error(StatusCode::NOT_FOUND, "no such API endpoint"),
    }
}

/// Constant-time comparison of the bearer token, so response timing does not leak how much
/// of a guess was right.
fn authorized<B>(req: &Request<B>, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|given| bool::from(given.ct_eq(token.as_bytes())))
}

/// `?drain=30s`: absent or `0s` removes at once.
fn drain_param(query: Option<&str>) -> Result<Duration, String> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("drain="))
    else {
        return Ok(Duration::ZERO);
    };
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(value)
        .map_err(|e| format!("drain=`{value}` is not a duration such as 30s: {e}"))
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<ProxyBody>> {
    let body: Bytes = match Limited::new(req.into_body(), MAX_API_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
            ));
        }
    };
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))
}

fn changed(result: Result<PoolView, ChangeError>) -> Response<ProxyBody> {
    match result {
        Ok(view) => ok(StatusCode::OK, &view),
        Err(e) => change_error(e),
    }
}

fn change_error(e: ChangeError) -> Response<ProxyBody> {
    let status = match e {
        ChangeError::Invalid(_) => StatusCode::BAD_REQUEST,
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
        ChangeError::Conflict(_) => StatusCode::CONFLICT,
    };
    error(status, &e.to_string())
}

fn ok(status: StatusCode, value: &impl Serialize) -> Response<ProxyBody> {
    let body = serde_json::to_vec(value).expect("API values always serialize");
    let mut response = with_type(Response::new(ProxyBody::local(body)), "application/json");
    *response.status_mut() = status;
    response
}

fn error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    ok(status, &json!({ "error": message }))
}

fn with_type(mut response: Response<ProxyBody>, content_type: &'static str) -> Response<ProxyBody> {
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
