//! The admin listener: `GET /metrics` for Prometheus and `GET /healthz` for fulcrum's own
//! health in the seed's schema. It runs on its own port so scrapes never queue behind traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::health_report::{CpuMeter, HealthReport};
use crate::proxy::local_response;

#[derive(Debug)]
pub struct AdminState {
    pub cpu: CpuMeter,
    /// Client connections open on all traffic listeners.
    pub client_connections: Arc<AtomicU64>,
}

pub async fn handle(req: Request<Incoming>, state: &AdminState) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return local_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match req.uri().path() {
        "/metrics" => {
            let text = crate::metrics::recorder().render();
            with_type(
                Response::new(ProxyBody::local(text)),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/healthz" => {
            let connections = state.client_connections.load(Ordering::Relaxed);
            let report = HealthReport::new("fulcrum", "UP", &state.cpu, connections);
            let body = serde_json::to_vec(&report).expect("the health report always serializes");
            with_type(Response::new(ProxyBody::local(body)), "application/json")
        }
        _ => local_response(StatusCode::NOT_FOUND, "not found; try /metrics or /healthz"),
    }
}

fn with_type(mut response: Response<ProxyBody>, content_type: &'static str) -> Response<ProxyBody> {
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
