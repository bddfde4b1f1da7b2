//! `GET /session` and `POST /v1/sessions/verify`: the HTTP side of the node's session store.
//!
//! `/session` counts a visit of the session named by the `session` cookie. A cookie the store
//! does not hold (never issued, expired, or issued by another node's memory) is a reset, and
//! the answer says so three ways: `"new":true`, `"visits":1` (also in `x-session-visits`, which
//! `fulcrum load` reads instead of parsing bodies) and a `Set-Cookie` with a fresh id.

use cookie::Cookie;
use std::net::{IpAddr, SocketAddr};

use http::header::{CACHE_CONTROL, COOKIE, HeaderName, HeaderValue, SET_COOKIE, USER_AGENT};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::session_core::{ClientInfo, SessionId};
use super::sessions::StoreError;
use super::{NodeBody, Shared, error_json, json};

/// The cookie that carries the session id.
pub const SESSION_COOKIE: &str = "session";
/// The visit count of the answer, so a load generator need not parse bodies.
pub const X_SESSION_VISITS: HeaderName = HeaderName::from_static("x-session-visits");
/// `user_sessions.user_agent` keeps at most this much of a `User-Agent`.
const MAX_USER_AGENT: usize = 512;
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// A verify body is a token and a few short fields; this is generous.
const MAX_VERIFY_BODY: usize = 16 * 1024;

/// `GET /session`.
#[expect(clippy::expect_used, reason = "hex digits and ASCII attributes")]
pub(super) async fn session(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Response<NodeBody> {
    let presented = session_cookie(headers);
    let client = client_info(peer, headers);
    let visit = match shared.sessions.visit(presented, &client).await {
        Ok(visit) => visit,
        Err(err) => return store_error(shared, &err),
    };
    let mut resp = json(
        StatusCode::OK,
        &SessionBody {
            node: &shared.id,
            session: visit.id.to_string(),
            visits: visit.visits,
            new: visit.new,
        },
    );
    let headers = resp.headers_mut();
    headers.insert(X_SESSION_VISITS, HeaderValue::from(visit.visits));
    // One user's session must never be served to another from a shared cache.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if visit.new {
        let cookie = format!(
            "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax",
            visit.id
        );
        headers.insert(
            SET_COOKIE,
            HeaderValue::from_str(&cookie).expect("hex digits and ASCII attributes"),
        );
    }
    resp
}

/// The first `session` cookie that holds a well-formed id; a malformed one is as good as none.
fn session_cookie(headers: &HeaderMap) -> Option<SessionId> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|c| c.name() == SESSION_COOKIE)
        .find_map(|c| SessionId::parse(c.value()))
}

/// Who is visiting, as `user_sessions` records it: the last `X-Forwarded-For` entry (the one
/// the balancer in front appended) when it is an address, else the peer; the `User-Agent`, cut
/// to [`MAX_USER_AGENT`] bytes.
fn client_info(peer: SocketAddr, headers: &HeaderMap) -> ClientInfo {
    let forwarded = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','))
        .next_back()
        .and_then(|last| last.trim().parse::<IpAddr>().ok());
    let user_agent = headers
        .get(USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .map(|mut agent| {
            if agent.len() > MAX_USER_AGENT {
                let mut end = MAX_USER_AGENT;
                while !agent.is_char_boundary(end) {
                    end -= 1;
                }
                agent.truncate(end);
            }
            agent
        });
    ClientInfo {
        ip: Some(forwarded.unwrap_or_else(|| peer.ip())),
        user_agent,
    }
}

#[derive(Serialize)]
struct SessionBody<'a> {
    node: &'a str,
    session: String,
    visits: u64,
    new: bool,
}

/// The seed's verify request. Only `sessionToken` decides the answer; the others are checked
/// for type and logged, since this store keeps no client address or agent to compare with.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerifyRequest {
    session_token: String,
    #[serde(default)]
    client_ip: Option<String>,
    #[serde(default)]
    user_agent: Option<String>,
    #[serde(default)]
    validation_parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VerifyBody<'a> {
    valid: bool,
    session_token: &'a str,
    /// 0 when the session is not valid.
    visits: u64,
    served_by: &'a str,
}

/// `POST /v1/sessions/verify`: whether the store holds the token, without counting a visit or
/// extending its life.
pub(super) async fn verify(shared: &Shared, req: Request<Incoming>) -> Response<NodeBody> {
    let body = match Limited::new(req.into_body(), MAX_VERIFY_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            let message = format!("the body is larger than {MAX_VERIFY_BODY} bytes");
            return error_json(StatusCode::PAYLOAD_TOO_LARGE, &message);
        }
        Err(err) => return error_json(StatusCode::BAD_REQUEST, &format!("reading body: {err}")),
    };
    let request: VerifyRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => return error_json(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    debug!(
        id = %shared.id,
        client_ip = ?request.client_ip,
        user_agent = ?request.user_agent,
        parameters = request.validation_parameters.as_ref().map_or(0, serde_json::Map::len),
        "verifying a session"
    );
    let visits = match SessionId::parse(&request.session_token) {
        // Not an id this store could have issued: no need to ask it.
        None => None,
        Some(id) => match shared.sessions.lookup(id).await {
            Ok(visits) => visits,
            Err(err) => return store_error(shared, &err),
        },
    };
    json(
        StatusCode::OK,
        &VerifyBody {
            valid: visits.is_some(),
            session_token: &request.session_token,
            visits: visits.unwrap_or(0),
            served_by: &shared.id,
        },
    )
}

/// 503 while the store cannot be reached (a balancer may retry elsewhere or the user later);
/// 500 for what no retry fixes.
fn store_error(shared: &Shared, err: &StoreError) -> Response<NodeBody> {
    let status = if err.is_unavailable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    // The monitor logs Redis going away once; a line per request would flood the log.
    debug!(id = %shared.id, error = %err, "session store failed");
    json(
        status,
        &serde_json::json!({ "error": err.to_string(), "node": shared.id }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_well_formed_session_cookie_wins() {
        let id = "0123456789abcdef0123456789abcdef";
        let mut headers = HeaderMap::new();
        assert_eq!(session_cookie(&headers), None);
        headers.append(COOKIE, HeaderValue::from_static("a=1; session=nothex"));
        headers.append(
            COOKIE,
            HeaderValue::from_str(&format!(
                "fulcrum_sticky=x; session={id}; session=ffffffffffffffffffffffffffffffff"
            ))
            .unwrap(),
        );
        assert_eq!(session_cookie(&headers), SessionId::parse(id));

        let mut garbage = HeaderMap::new();
        garbage.append(COOKIE, HeaderValue::from_static("session; =; ;;session="));
        assert_eq!(session_cookie(&garbage), None);
    }

    #[test]
    fn verify_requests_need_a_string_token() {
        let parse = |s: &str| serde_json::from_str::<VerifyRequest>(s).map(|r| r.session_token);
        assert_eq!(parse(r#"{"sessionToken":"t"}"#).unwrap(), "t");
        let full = r#"{"sessionToken":"t","clientIp":"10.0.0.1","userAgent":"x",
                       "validationParameters":{"strict":true},"extra":1}"#;
        assert_eq!(parse(full).unwrap(), "t");
        for bad in [
            "{}",
            r#"{"sessionToken":null}"#,
            r#"{"sessionToken":7}"#,
            r#"{"sessionToken":"t","validationParameters":[1]}"#,
            "not json",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
