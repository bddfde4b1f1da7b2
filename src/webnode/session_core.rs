//! What the session stores share: the session id, who a session was started for, how long it
//! lives, and whether a store answered its last exchange.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// How long an untouched session lives in Redis (and in `user_sessions`); every visit starts it
/// again.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 60);
/// Keys live under this prefix, so a shared Redis can hold other things too.
const KEY_PREFIX: &str = "fulcrum:session:";

/// A session id: 128 random bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SessionId(u128);

impl SessionId {
    pub(super) fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(SessionId(u128::from_le_bytes(bytes)))
    }

    /// Exactly 32 lowercase hex digits, as [`SessionId`]s are written; anything else is `None`.
    pub(super) fn parse(text: &str) -> Option<Self> {
        // from_str_radix alone would also take a leading '+' and upper case.
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if text.len() != 32 || !text.bytes().all(hex) {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(SessionId)
    }

    pub(super) fn key(self) -> String {
        format!("{KEY_PREFIX}{self}")
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Who a session was started for, as `user_sessions` records it (`client_ip`, `user_agent`).
#[derive(Debug, Clone, Default)]
pub(super) struct ClientInfo {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

/// Whether a dependency (Redis, PostgreSQL) answered its last exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum LinkHealth {
    Disconnected = 0,
    Connected = 1,
}

impl LinkHealth {
    /// As `/healthz`'s `dependencyStatus` says it.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            LinkHealth::Disconnected => "DISCONNECTED",
            LinkHealth::Connected => "CONNECTED",
        }
    }
}

/// Whether the last exchange with a dependency worked; `DISCONNECTED` until one has.
#[derive(Debug, Default)]
pub(super) struct LinkStatus(AtomicU8);

impl LinkStatus {
    pub(super) fn get(&self) -> LinkHealth {
        if self.0.load(Ordering::Acquire) == LinkHealth::Connected as u8 {
            LinkHealth::Connected
        } else {
            LinkHealth::Disconnected
        }
    }

    pub(super) fn set(&self, health: LinkHealth) {
        self.0.store(health as u8, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_32_lowercase_hex_digits_and_nothing_else_parses() {
        let id = SessionId::random().unwrap();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(SessionId::parse(&text), Some(id));
        assert_ne!(SessionId::random().unwrap(), id);
        assert_eq!(
            SessionId::parse("0000000000000000000000000000000a").map(|i| i.0),
            Some(10)
        );
        for bad in [
            "",
            "abc",
            "0000000000000000000000000000000A",
            "+000000000000000000000000000000a",
            "0000000000000000000000000000000g",
            "0000000000000000000000000000000a0",
            "ſ000000000000000000000000000000",
        ] {
            assert_eq!(SessionId::parse(bad), None, "{bad:?}");
        }
    }
}
