//! What makes a backend valid, wherever it comes from: the config file's `backends`, the admin
//! API's `PUT`/`POST` bodies and the registry's `ReportActive`. Each rule is written here once
//! and answers a [`BackendError`]; each caller turns it into its own form (a located
//! diagnostic, a `400` with a JSON error, a gRPC status).
//!
//! The config reports every field's mistake at once, so the rules come one field at a time;
//! [`backend`] runs them in order for callers that stop at the first.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{BackendConfig, MAX_BACKEND_CONNECTIONS, MAX_WEIGHT, NotAnAddress, parse_socket_addr};

/// The longest backend name. A name is a metric label, a log field and the key of a sticky
/// id, so it stays short and printable.
pub const MAX_NAME_LEN: usize = 255;

/// Why a backend is refused. `Display` is the message about the value; [`BackendError::field`]
/// names the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// `address` is not an IP:port.
    #[error(transparent)]
    Address(#[from] NotAnAddress),
    /// `address` has port 0.
    #[error("port 0 is not a backend port")]
    PortZero,
    /// `weight` outside 1..=[`MAX_WEIGHT`].
    #[error("must be between 1 and {MAX_WEIGHT} (got {0})")]
    Weight(i128),
    /// `name` is empty.
    #[error("must not be empty")]
    EmptyName,
    /// `name` is too long or holds a control character.
    #[error("must be at most {MAX_NAME_LEN} bytes without control characters")]
    Name,
    /// `max_connections` outside 1..=[`MAX_BACKEND_CONNECTIONS`].
    #[error("must be between 1 and {MAX_BACKEND_CONNECTIONS} (got {0}); leave it out for no cap")]
    MaxConnections(i128),
    /// Another backend of the pool has this name.
    #[error("duplicate backend `{0}`")]
    DuplicateName(String),
    /// Another backend of the pool has this address.
    #[error("duplicate backend address {0}")]
    DuplicateAddress(SocketAddr),
}

impl BackendError {
    /// The field at fault, as the config file and the admin API spell it.
    pub fn field(&self) -> &'static str {
        match self {
            BackendError::Address(_)
            | BackendError::PortZero
            | BackendError::DuplicateAddress(_) => "address",
            BackendError::Weight(_) => "weight",
            BackendError::EmptyName | BackendError::Name | BackendError::DuplicateName(_) => "name",
            BackendError::MaxConnections(_) => "max_connections",
        }
    }
}

/// A backend's address: `IP:port`, and never port 0 (nothing listens there; a connect to it
/// fails on every attempt).
pub fn address(text: &str) -> Result<SocketAddr, BackendError> {
    port(parse_socket_addr(text)?)
}

/// An address that already parsed (the registry builds one from its IP and port fields).
pub fn port(address: SocketAddr) -> Result<SocketAddr, BackendError> {
    if address.port() == 0 {
        return Err(BackendError::PortZero);
    }
    Ok(address)
}

/// A backend's weight, 1 when absent; [`MAX_WEIGHT`] bounds the precomputed round-robin
/// sequence. Wide, so that any integer a caller read is answered with the bound.
pub fn weight(value: Option<i128>) -> Result<u32, BackendError> {
    let Some(value) = value else { return Ok(1) };
    u32::try_from(value)
        .ok()
        .filter(|w| (1..=MAX_WEIGHT).contains(w))
        .ok_or(BackendError::Weight(value))
}

/// A backend's name as given, or its address text when none is.
pub fn name_or_address(name: Option<&str>, address: &str) -> String {
    name.unwrap_or(address).to_owned()
}

/// A name is 1 to [`MAX_NAME_LEN`] bytes without control characters.
pub fn name(name: &str) -> Result<(), BackendError> {
    if name.is_empty() {
        return Err(BackendError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(BackendError::Name);
    }
    Ok(())
}

/// A connection cap (a backend's `max_connections`, a pool's `max_connections_per_backend`):
/// 1 to [`MAX_BACKEND_CONNECTIONS`]; absent is no cap.
pub fn max_connections(value: Option<i128>) -> Result<Option<u32>, BackendError> {
    let Some(value) = value else { return Ok(None) };
    u32::try_from(value)
        .ok()
        .filter(|cap| (1..=MAX_BACKEND_CONNECTIONS).contains(cap))
        .map(Some)
        .ok_or(BackendError::MaxConnections(value))
}

/// One backend as a caller states it, before the rules.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// `IP:port`, as written.
    pub address: &'a str,
    /// 1..=[`MAX_WEIGHT`] (default 1).
    pub weight: Option<i128>,
    /// The node's identity (default: the address as written).
    pub name: Option<&'a str>,
    /// In-flight cap; absent takes the pool's `max_connections_per_backend`.
    pub max_connections: Option<i128>,
}

/// Every rule of one backend on its own, in the order address, weight, name, cap; the first
/// broken one is the answer.
pub fn backend(fields: Fields<'_>) -> Result<BackendConfig, BackendError> {
    let address = address(fields.address)?;
    let weight = weight(fields.weight)?;
    let backend_name = name_or_address(fields.name, fields.address);
    name(&backend_name)?;
    let max_connections = max_connections(fields.max_connections)?;
    Ok(BackendConfig {
        name: backend_name,
        address,
        weight,
        max_connections,
    })
}

/// The names and addresses a pool holds so far: two backends never share either (a name is
/// the node's identity, and two nodes at one address would be one node counted twice).
#[derive(Debug, Default)]
pub struct Roster {
    names: HashSet<String>,
    addresses: HashSet<SocketAddr>,
}

impl Roster {
    /// The roster of a pool that holds `backends`.
    pub fn of<'a>(backends: impl IntoIterator<Item = &'a BackendConfig>) -> Self {
        let mut roster = Self::default();
        for b in backends {
            roster.names.insert(b.name.clone());
            roster.addresses.insert(b.address);
        }
        roster
    }

    /// Takes `name` for a backend; `DuplicateName` when another holds it.
    pub fn take_name(&mut self, name: &str) -> Result<(), BackendError> {
        if self.names.insert(name.to_owned()) {
            Ok(())
        } else {
            Err(BackendError::DuplicateName(name.to_owned()))
        }
    }

    /// Takes `address` for a backend; `DuplicateAddress` when another holds it.
    pub fn take_address(&mut self, address: SocketAddr) -> Result<(), BackendError> {
        if self.addresses.insert(address) {
            Ok(())
        } else {
            Err(BackendError::DuplicateAddress(address))
        }
    }

    /// Takes both for `backend`, the name first.
    pub fn take(&mut self, backend: &BackendConfig) -> Result<(), BackendError> {
        self.take_name(&backend.name)?;
        self.take_address(backend.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(address: &'a str, name: Option<&'a str>) -> Fields<'a> {
        Fields {
            address,
            weight: None,
            name,
            max_connections: None,
        }
    }

    #[test]
    fn a_backend_needs_an_address_with_a_port_and_gets_weight_1_and_its_address_as_name() {
        let b = backend(fields("127.0.0.1:9001", None)).unwrap();
        assert_eq!(b.name, "127.0.0.1:9001");
        assert_eq!((b.weight, b.max_connections), (1, None));
        assert_eq!(
            backend(fields("localhost:80", None)).unwrap_err(),
            BackendError::Address(NotAnAddress("localhost:80".into()))
        );
        assert_eq!(
            backend(fields("127.0.0.1:0", None)).unwrap_err(),
            BackendError::PortZero
        );
    }

    #[test]
    fn weights_and_caps_are_bounded_and_an_absurd_number_is_answered_with_the_bound() {
        assert_eq!(weight(None), Ok(1));
        assert_eq!(weight(Some(256)), Ok(256));
        for bad in [0, -1, 257, i128::from(u64::MAX)] {
            assert_eq!(weight(Some(bad)), Err(BackendError::Weight(bad)));
        }
        assert_eq!(max_connections(None), Ok(None));
        assert_eq!(max_connections(Some(1_000_000)), Ok(Some(1_000_000)));
        for bad in [0, -1, 1_000_001, i128::from(u64::MAX)] {
            assert_eq!(
                max_connections(Some(bad)),
                Err(BackendError::MaxConnections(bad))
            );
        }
    }

    #[test]
    fn a_name_is_1_to_255_bytes_without_control_characters() {
        assert_eq!(name("web-1"), Ok(()));
        assert_eq!(name(&"x".repeat(MAX_NAME_LEN)), Ok(()));
        assert_eq!(name("nœud"), Ok(()));
        assert_eq!(name(""), Err(BackendError::EmptyName));
        for bad in ["a\nb", "tab\there", "\u{7f}", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert_eq!(name(bad), Err(BackendError::Name), "{bad:?}");
        }
    }

    #[test]
    fn a_roster_refuses_a_second_holder_of_a_name_or_an_address() {
        let first = backend(fields("127.0.0.1:1", Some("a"))).unwrap();
        let mut roster = Roster::of([&first]);
        let same_name = backend(fields("127.0.0.1:2", Some("a"))).unwrap();
        assert_eq!(
            roster.take(&same_name),
            Err(BackendError::DuplicateName("a".into()))
        );
        let same_address = backend(fields("127.0.0.1:1", Some("b"))).unwrap();
        assert_eq!(
            roster.take(&same_address),
            Err(BackendError::DuplicateAddress(first.address))
        );
        let other = backend(fields("127.0.0.1:3", Some("c"))).unwrap();
        assert_eq!(roster.take(&other), Ok(()));
        assert_eq!(
            roster.take_name("c"),
            Err(BackendError::DuplicateName("c".into()))
        );
    }

    #[test]
    fn every_error_names_its_field() {
        assert_eq!(BackendError::PortZero.field(), "address");
        assert_eq!(BackendError::Weight(0).field(), "weight");
        assert_eq!(BackendError::Name.field(), "name");
        assert_eq!(BackendError::MaxConnections(0).field(), "max_connections");
    }
}
