//! Sticky cookies that several balancers agree on without sharing state.
//!
//! A cookie value is `base64url(id ‖ expiry ‖ tag)`, 24 bytes, 32 characters:
//! - `id`: 8 bytes of HMAC(secret, node name). It depends on the name only, so it survives
//!   restarts and address moves, is the same on every instance with the same secret, and tells a
//!   client nothing about the node.
//! - `expiry`: unix seconds as a big-endian u32, 0 for none. Carried in the value, not left to
//!   the browser, so every instance rejects an old cookie alike.
//! - `tag`: 12 bytes of HMAC(secret, id ‖ expiry), checked in constant time, so a client cannot
//!   pick a node or extend an expiry.
//!
//! Without a secret the key is empty: the same format, but anyone can compute it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;

use super::{Balancer, CappedPick, Pick};
use crate::base::config::StickyConfig;
pub use crate::base::metrics::Outcome;
use crate::model::node::Backend;

type HmacSha256 = Hmac<Sha256>;

/// A node's opaque id in a cookie: derived from its name and the secret, so every instance and
/// restart agrees on it.
pub type NodeId = [u8; ID_LEN];

const ID_LEN: usize = 8;
const EXPIRY_LEN: usize = 4;
const TAG_LEN: usize = 12;
const RAW_LEN: usize = ID_LEN + EXPIRY_LEN + TAG_LEN;
const ENCODED_LEN: usize = RAW_LEN * 4 / 3;

/// Domain separation: an id can never be replayed as a tag or the other way round.
const ID_CONTEXT: &[u8] = b"fulcrum sticky node v1\0";
const TAG_CONTEXT: &[u8] = b"fulcrum sticky cookie v1\0";

/// Signs and checks cookie values.
#[derive(Clone)]
pub struct CookieCodec {
    /// Keyed once; cloning the state skips re-deriving the HMAC pads per value.
    mac: HmacSha256,
}

impl std::fmt::Debug for CookieCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieCodec(..)")
    }
}

impl CookieCodec {
    /// A codec keyed with `secret`; without one the key is empty and anyone can forge a cookie.
    #[expect(clippy::expect_used, reason = "HMAC takes keys of any length")]
    pub fn new(secret: Option<&str>) -> Self {
        let key = secret.unwrap_or_default().as_bytes();
        Self {
            mac: HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length"),
        }
    }

    /// The opaque id of the node called `name`.
    pub fn node_id(&self, name: &str) -> NodeId {
        let mut mac = self.mac.clone();
        mac.update(ID_CONTEXT);
        mac.update(name.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut id = [0; ID_LEN];
        id.copy_from_slice(&digest[..ID_LEN]);
        id
    }

    /// A cookie value naming `id`, valid until `expires` (unix seconds; 0 = no expiry).
    pub fn encode(&self, id: &NodeId, expires: u32) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[..ID_LEN].copy_from_slice(id);
        raw[ID_LEN..ID_LEN + EXPIRY_LEN].copy_from_slice(&expires.to_be_bytes());
        let tag = self
            .tag(&raw[..ID_LEN + EXPIRY_LEN])
            .finalize()
            .into_bytes();
        raw[ID_LEN + EXPIRY_LEN..].copy_from_slice(&tag[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The node id and expiry of a genuine, unexpired value; `None` for anything else.
    pub fn decode(&self, value: &[u8], now_unix: u64) -> Option<(NodeId, u32)> {
        if value.len() != ENCODED_LEN {
            return None;
        }
        let mut raw = [0u8; RAW_LEN];
        let decoded = URL_SAFE_NO_PAD.decode_slice(value, &mut raw).ok()?;
        if decoded != RAW_LEN {
            return None;
        }
        let (signed, tag) = raw.split_at(ID_LEN + EXPIRY_LEN);
        // Constant time: the comparison does not reveal how much of a forged tag was right.
        self.tag(signed).verify_truncated_left(tag).ok()?;
        let expires = u32::from_be_bytes(signed[ID_LEN..].try_into().ok()?);
        if expires != 0 && u64::from(expires) <= now_unix {
            return None;
        }
        let mut id = [0; ID_LEN];
        id.copy_from_slice(&signed[..ID_LEN]);
        Some((id, expires))
    }

    fn tag(&self, signed: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(TAG_CONTEXT);
        mac.update(signed);
        mac
    }
}

/// What a request's cookie says, resolved against one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieTarget {
    /// No cookie, or one that is forged, expired or garbled: a new user.
    Absent,
    /// A valid cookie for the node at this index of the snapshot.
    Node {
        /// The node's index in the snapshot's backends.
        index: usize,
        /// When the cookie expires, in unix seconds; 0 = no expiry.
        expires: u32,
    },
    /// A valid cookie for a node that is no longer in the pool.
    Gone,
}

/// `sticky_cookie`: keeps a user on the node its signed cookie names; new users go to the
/// fallback strategy.
#[derive(Debug)]
pub struct Sticky {
    codec: CookieCodec,
    cookie: Box<str>,
    /// One per backend, in snapshot order.
    ids: Box<[NodeId]>,
    max_age: Option<Duration>,
    /// `; Path=/; HttpOnly; SameSite=Lax` and the like, without `Secure` and `Max-Age`.
    attributes: Box<str>,
    secure: Option<bool>,
    fallback: Box<Balancer>,
}

impl Sticky {
    /// Precomputes node ids and the cookie's attributes from the pool's `[sticky]` settings.
    pub fn new(config: &StickyConfig, backends: &[Backend]) -> Self {
        let codec = CookieCodec::new(config.secret.as_deref());
        let ids = backends
            .iter()
            .map(|b| codec.node_id(&b.node.name))
            .collect();
        let mut attributes = format!("; Path={}", config.path);
        if let Some(domain) = &config.domain {
            attributes.push_str("; Domain=");
            attributes.push_str(domain);
        }
        if config.http_only {
            attributes.push_str("; HttpOnly");
        }
        attributes.push_str("; SameSite=");
        attributes.push_str(config.same_site.as_str());
        Self {
            codec,
            cookie: config.cookie.as_str().into(),
            ids,
            max_age: config.max_age,
            attributes: attributes.into(),
            secure: config.secure,
            fallback: Box::new(Balancer::new(config.fallback, config, backends)),
        }
    }

    /// Finds this pool's cookie among the request's `Cookie` headers and resolves it.
    pub fn target<'a>(
        &self,
        cookie_headers: impl Iterator<Item = &'a HeaderValue>,
    ) -> CookieTarget {
        let now = unix_now();
        let mut gone = false;
        // A browser may send several cookies of one name (other paths or domains): any genuine
        // one will do.
        for value in cookie_headers.flat_map(|h| cookie_values(h.as_bytes(), &self.cookie)) {
            let Some((id, expires)) = self.codec.decode(value, now) else {
                continue;
            };
            match self.ids.iter().position(|known| *known == id) {
                Some(index) => return CookieTarget::Node { index, expires },
                None => gone = true,
            }
        }
        if gone {
            CookieTarget::Gone
        } else {
            CookieTarget::Absent
        }
    }

    /// The cookie's node while it serves its existing users, else the fallback's pick.
    pub fn pick(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        self.cookie_node(backends, pick)
            .or_else(|| self.fallback.pick(backends, pick))
    }

    /// A user whose node still serves them waits for it when it is full: moving them would cost
    /// their session on a stateful node, which is what the cookie is for.
    pub fn pick_capped(&self, backends: &[Backend], pick: &Pick<'_>) -> CappedPick {
        match self.cookie_node(backends, pick) {
            Some(index) => CappedPick::Bound(index),
            None => self.fallback.pick_capped(backends, pick),
        }
    }

    /// The node the request's cookie names, while it serves its existing users.
    fn cookie_node(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        match pick.cookie {
            CookieTarget::Node { index, .. }
                if backends[index].node.serves_existing_users() && !pick.tried.contains(&index) =>
            {
                Some(index)
            }
            _ => None,
        }
    }

    /// How the request's cookie fared, for the sticky metrics.
    pub fn outcome(&self, target: CookieTarget, served: usize) -> Outcome {
        match target {
            CookieTarget::Absent => Outcome::New,
            CookieTarget::Node { index, .. } if index == served => Outcome::Hit,
            CookieTarget::Node { .. } | CookieTarget::Gone => Outcome::Rerouted,
        }
    }

    /// The `Set-Cookie` for a response served by `served`, or `None` when the request's cookie
    /// already names it and is not past half its life (a sliding expiry without a header on
    /// every response).
    pub fn set_cookie(
        &self,
        target: CookieTarget,
        served: usize,
        tls: bool,
    ) -> Option<HeaderValue> {
        let now = unix_now();
        if let CookieTarget::Node { index, expires } = target
            && index == served
            && self
                .max_age
                .is_none_or(|max_age| u64::from(expires) > now + max_age.as_secs() / 2)
        {
            return None;
        }
        let expires = self.max_age.map_or(0, |max_age| {
            u32::try_from(now + max_age.as_secs()).unwrap_or(u32::MAX)
        });
        let mut header = format!(
            "{}={}{}",
            self.cookie,
            self.codec.encode(&self.ids[served], expires),
            self.attributes
        );
        if let Some(max_age) = self.max_age {
            header.push_str(&format!("; Max-Age={}", max_age.as_secs()));
        }
        if self.secure.unwrap_or(tls) {
            header.push_str("; Secure");
        }
        // Built from a validated name and attributes and base64url: always a valid value.
        HeaderValue::try_from(header).ok()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The values of every `name=value` pair called `name` in one `Cookie` header.
fn cookie_values<'a>(header: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    header.split(|&b| b == b';').filter_map(move |pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| {
            let value = pair[eq + 1..].trim_ascii();
            // RFC 6265 allows a quoted value.
            value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_ids_depend_on_name_and_secret_only() {
        let codec = CookieCodec::new(Some("s3cret"));
        let id = codec.node_id("web-1");
        assert_eq!(id, CookieCodec::new(Some("s3cret")).node_id("web-1"));
        assert_ne!(id, codec.node_id("web-2"));
        assert_ne!(id, CookieCodec::new(Some("other")).node_id("web-1"));
        assert_ne!(id, CookieCodec::new(None).node_id("web-1"));

        let value = codec.encode(&id, 0);
        assert_eq!(value.len(), ENCODED_LEN);
        assert_eq!(codec.decode(value.as_bytes(), 1_000), Some((id, 0)));
        // Another secret cannot read it.
        assert_eq!(
            CookieCodec::new(Some("other")).decode(value.as_bytes(), 1_000),
            None
        );
    }

    #[test]
    fn forged_expired_and_garbled_values_are_rejected() {
        let codec = CookieCodec::new(Some("s3cret"));
        let id = codec.node_id("web-1");
        let value = codec.encode(&id, 2_000);
        assert!(codec.decode(value.as_bytes(), 1_999).is_some());
        assert_eq!(codec.decode(value.as_bytes(), 2_000), None, "expired");

        // Flip every character in turn: each change breaks the tag (or the base64).
        for i in 0..value.len() {
            let mut forged = value.clone().into_bytes();
            forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
            assert_eq!(codec.decode(&forged, 1_000), None, "byte {i} changed");
        }
        for garbled in [
            &b""[..],
            b"x",
            b"!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
            &[0xff; 32],
        ] {
            assert_eq!(codec.decode(garbled, 1_000), None);
        }
        // An unkeyed codec's values do not pass for keyed ones.
        let unkeyed = CookieCodec::new(None).encode(&id, 0);
        assert_eq!(codec.decode(unkeyed.as_bytes(), 1_000), None);
    }

    #[test]
    fn cookie_values_are_found_among_others() {
        let header = b"a=1; fulcrum_sticky=abc ;b=2;fulcrum_sticky=\"def\"; fulcrum_stickyx=no";
        let found: Vec<&[u8]> = cookie_values(header, "fulcrum_sticky").collect();
        assert_eq!(found, [&b"abc"[..], b"def"]);
        assert_eq!(cookie_values(b"novalue; =x", "novalue").count(), 0);
    }
}
