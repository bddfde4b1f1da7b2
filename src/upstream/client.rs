//! hyper-util's pooled client, for what needs a connection task of hyper's own: h2c backends
//! (one multiplexed connection per backend) and `Upgrade` requests (the connection is handed
//! over once the backend switches protocols). Plain HTTP/1.1 requests go through
//! [`super::request`] and the node's own idle queue instead.

use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::RequestBody;
use crate::base::config::BackendProtocol;

/// hyper-util's pooled client, for what needs a task per connection: h2c backends and
/// `Upgrade` requests. Other HTTP/1.1 requests go through [`crate::upstream`].
pub(crate) type UpstreamClient = Client<HttpConnector, RequestBody>;

pub(crate) fn upstream_client(
    connect_timeout: Duration,
    idle_timeout: Duration,
    protocol: BackendProtocol,
) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        // The proxy writes Host itself: the client's Host is preserved, not the backend's address.
        .set_host(false)
        .http2_only(protocol == BackendProtocol::H2c)
        .build(connector)
}
