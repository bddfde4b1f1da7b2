//! The admin listener: `GET /metrics` for Prometheus, `GET /status` for people, `GET /healthz`
//! for fulcrum's own health in the seed's schema, and the JSON API under `/api/` that changes pools at runtime. It runs
//! on its own port so scrapes and changes never queue behind traffic.
//!
//! Reads stay open; every mutation needs `Authorization: Bearer TOKEN` when `admin.token` is
//! set, compared in constant time. Browsers are kept out of mutations whatever the token says: a
//! page the operator has open elsewhere can send a "simple" cross-origin `POST` (no preflight for
//! `text/plain`), and DNS rebinding makes even `PUT`/`DELETE` same-origin in the browser's eyes.
//! So a mutation whose `Origin` is not the admin listener's own address answers `403`, and a
//! body that is not `application/json` answers `415`: neither can be produced by a form or a
//! rebound page without the browser asking first.

use std::net::{IpAddr, SocketAddr};
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
use tokio::net::TcpListener;
use tracing::info;

use crate::base::health_report::{CpuMeter, HealthReport};
use crate::control::{BackendSpec, ChangeError, Control, PoolView, ReloadError, Removal};
use crate::datapath::body::ProxyBody;
use crate::datapath::proxy::local_response;
use crate::datapath::server::{self, Lifecycle};

/// API bodies are a few backends; anything bigger is a mistake or an attack.
const MAX_API_BODY: usize = 1 << 20;

/// `?drain=` longer than a day is a typo, not a drain; it also keeps `now + drain` far from
/// overflowing an `Instant`.
pub(crate) const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
pub(crate) struct AdminState {
    pub cpu: CpuMeter,
    /// Client connections open on all traffic listeners.
    pub client_connections: Arc<AtomicU64>,
    pub control: Arc<Control>,
    pub token: Option<String>,
    /// The admin listener's bound address: the only origin allowed to send mutations.
    pub bind: SocketAddr,
}

/// Serves the admin API on `tcp` (bound, not yet serving) until shutdown; returns its address.
#[expect(
    clippy::expect_used,
    reason = "a socket bound a moment ago has an address"
)]
pub(crate) fn spawn(
    tcp: TcpListener,
    token: Option<String>,
    control: &Arc<Control>,
    client_connections: &Arc<AtomicU64>,
    lifecycle: Lifecycle,
) -> SocketAddr {
    let addr = tcp
        .local_addr()
        .expect("a socket bound a moment ago has an address");
    info!(listener = "admin", %addr, "admin listening");
    let state = Arc::new(AdminState {
        cpu: CpuMeter::new(),
        client_connections: client_connections.clone(),
        control: control.clone(),
        token,
        bind: addr,
    });
    server::spawn_accept_loop(
        vec![server::AcceptSocket::Here(tcp)],
        Arc::from("admin"),
        server::SERVICE_LIMITS,
        None,
        move |_peer, _conn| {
            let state = state.clone();
            hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &state).await) }
            })
        },
        Arc::new(AtomicU64::new(0)),
        lifecycle,
    );
    addr
}

#[expect(clippy::expect_used, reason = "the health report always serializes")]
pub(crate) async fn handle(req: Request<Incoming>, state: &AdminState) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    if path == "/api" || path.starts_with("/api/") {
        return api(req, &path, state).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return local_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match path.as_str() {
        "/metrics" => {
            let text = crate::base::metrics::recorder().render();
            with_type(
                Response::new(ProxyBody::local(text)),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/status" => {
            let html = crate::control::status::render(&state.control);
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
    if mutating && let Some(refusal) = refuse_mutation(&req, state) {
        return refusal;
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
            remove_backend(control, pool, name, req.uri().query()).await
        }
        (&Method::POST, ["api", "reload"]) => reloaded(control.reload().await),
        (_, ["api", "pools"] | ["api", "pools", _] | ["api", "reload"])
        | (_, ["api", "pools", _, "backends", ..]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => error(StatusCode::NOT_FOUND, "no such API endpoint"),
    }
}

/// Why a mutation may not go ahead, in the order a caller should fix it: a browser page is
/// never let in (`403`), then the token (`401`), then a body that is not JSON (`415`).
fn refuse_mutation(req: &Request<Incoming>, state: &AdminState) -> Option<Response<ProxyBody>> {
    if let Some(origin) = foreign_origin(req, state.bind) {
        return Some(error(
            StatusCode::FORBIDDEN,
            &format!(
                "mutations from the origin `{origin}` are refused; call the admin API directly, not from a web page"
            ),
        ));
    }
    if !authorized(req, state.token.as_deref()) {
        let mut response = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Some(response);
    }
    if carries_body(req) && !is_json(req) {
        return Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be sent with Content-Type: application/json",
        ));
    }
    None
}

/// `DELETE /api/pools/{pool}/backends/{name}?drain=`: `200` removed, `202` draining.
async fn remove_backend(
    control: &Arc<Control>,
    pool: &str,
    name: &str,
    query: Option<&str>,
) -> Response<ProxyBody> {
    let drain = match drain_param(query) {
        Ok(drain) => drain,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match control.remove_backend(pool, name, drain).await {
        Ok((Removal::Removed, view)) => ok(StatusCode::OK, &view),
        Ok((Removal::Draining, view)) => ok(StatusCode::ACCEPTED, &view),
        Err(e) => change_error(e),
    }
}

/// `POST /api/reload`'s answer: `200 {"result":"ok"}`, or why the running config stays.
fn reloaded(result: Result<(), ReloadError>) -> Response<ProxyBody> {
    match result {
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
        Err(e @ ReloadError::Panicked(_)) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
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

/// The `Origin` of a request that a browser sent from a page other than the admin listener's
/// own, if any. Requests without `Origin` (curl, scripts, Prometheus) are not from a page.
///
/// The allowed origins are IP literals (or `localhost` on a loopback bind) with the admin's
/// port: the `Host` header is no guide, because a rebound page sends its own name there too.
fn foreign_origin<B>(req: &Request<B>, bind: SocketAddr) -> Option<String> {
    let origin = req.headers().get(header::ORIGIN)?;
    let own = origin
        .to_str()
        .ok()
        .and_then(|o| o.strip_prefix("http://"))
        .is_some_and(|authority| is_own_authority(authority, bind));
    (!own).then(|| String::from_utf8_lossy(origin.as_bytes()).into_owned())
}

fn is_own_authority(authority: &str, bind: SocketAddr) -> bool {
    let Some((host, port)) = authority.rsplit_once(':') else {
        return false;
    };
    if port.parse::<u16>().ok() != Some(bind.port()) {
        return false;
    }
    let loopback_bind = bind.ip().is_loopback() || bind.ip().is_unspecified();
    if host.eq_ignore_ascii_case("localhost") {
        return loopback_bind;
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match host.parse::<IpAddr>() {
        // A wildcard bind answers on every local address: any IP literal with its port is it.
        Ok(ip) => bind.ip().is_unspecified() || ip == bind.ip(),
        Err(_) => false,
    }
}

/// A body is coming: hyper knows the message has one (a length above zero, or chunked).
fn carries_body(req: &Request<Incoming>) -> bool {
    !http_body::Body::is_end_stream(req.body())
}

/// `application/json`, with or without parameters such as `charset`.
fn is_json<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// `?drain=30s`: absent or `0s` removes at once; at most [`MAX_DRAIN`].
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
    let drain = humantime::parse_duration(value)
        .map_err(|e| format!("drain=`{value}` is not a duration such as 30s: {e}"))?;
    if drain > MAX_DRAIN {
        return Err(format!(
            "drain=`{value}` is longer than the limit of {}h",
            MAX_DRAIN.as_secs() / 3600
        ));
    }
    Ok(drain)
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

#[expect(clippy::expect_used, reason = "API values always serialize")]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn origin_request(origin: &str) -> Request<()> {
        Request::post("/api/reload")
            .header(header::ORIGIN, origin)
            .body(())
            .unwrap()
    }

    #[test]
    fn only_the_admin_listeners_own_address_is_a_trusted_origin() {
        let loopback: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        for own in [
            "http://127.0.0.1:9090",
            "http://localhost:9090",
            "http://LOCALHOST:9090",
        ] {
            assert_eq!(
                foreign_origin(&origin_request(own), loopback),
                None,
                "{own}"
            );
        }
        for foreign in [
            "http://attacker.example",
            "http://attacker.example:9090",
            "http://127.0.0.1:9091",
            "http://127.0.0.2:9090",
            "https://127.0.0.1:9090",
            "null",
            "http://127.0.0.1",
        ] {
            assert!(
                foreign_origin(&origin_request(foreign), loopback).is_some(),
                "{foreign}"
            );
        }
        let wildcard: SocketAddr = "[::]:9090".parse().unwrap();
        for own in [
            "http://10.1.2.3:9090",
            "http://[::1]:9090",
            "http://localhost:9090",
        ] {
            assert_eq!(
                foreign_origin(&origin_request(own), wildcard),
                None,
                "{own}"
            );
        }
        let public: SocketAddr = "10.0.0.5:9090".parse().unwrap();
        assert!(foreign_origin(&origin_request("http://localhost:9090"), public).is_some());
        let no_origin = Request::post("/api/reload").body(()).unwrap();
        assert_eq!(foreign_origin(&no_origin, loopback), None);
    }

    #[test]
    fn drain_is_bounded_to_a_day() {
        assert_eq!(drain_param(None), Ok(Duration::ZERO));
        assert_eq!(drain_param(Some("drain=0")), Ok(Duration::ZERO));
        assert_eq!(drain_param(Some("drain=24h")), Ok(MAX_DRAIN));
        for bad in [
            "drain=25h",
            "drain=18446744073709551615s",
            "drain=1000y",
            "drain=soon",
        ] {
            assert!(drain_param(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_media_type_allows_parameters_only() {
        let with = |ct: &str| {
            Request::post("/")
                .header(header::CONTENT_TYPE, ct)
                .body(())
                .unwrap()
        };
        assert!(is_json(&with("application/json")));
        assert!(is_json(&with("Application/JSON; charset=utf-8")));
        assert!(!is_json(&with("text/plain")));
        assert!(!is_json(&with("application/jsonp")));
        assert!(!is_json(&Request::post("/").body(()).unwrap()));
    }
}
