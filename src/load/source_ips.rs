//! `--source-ips A-B`: the local addresses virtual users bind their connections to, so one
//! machine looks like many clients to the balancer (ip_hash, per-client views). The whole of
//! 127.0.0.0/8 is loopback on Linux, so a range there needs no setup.

use std::fmt;
use std::net::{AddrParseError, IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An inclusive range of addresses of one family; user `i` gets the `i`-th, wrapping around.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceIps {
    first: IpAddr,
    /// How many addresses the range holds (at least 1; a whole IPv6 range is clamped).
    len: u128,
}

/// Why a `--source-ips` range did not parse.
#[derive(Debug, thiserror::Error)]
pub enum SourceIpsError {
    /// One end of the range is not an IP address.
    #[error("`{text}` is not an IP address (expected e.g. 127.0.0.2-127.0.0.250)")]
    NotAnAddress {
        /// The text that did not parse.
        text: String,
        /// Why it did not parse.
        #[source]
        source: AddrParseError,
    },
    /// One end is IPv4 and the other IPv6.
    #[error("`{first}-{last}` mixes IPv4 and IPv6")]
    MixedFamilies {
        /// The range's first address.
        first: IpAddr,
        /// Its last address.
        last: IpAddr,
    },
    /// The first address is above the last.
    #[error("`{first}-{last}` runs backwards: the first address comes after the last")]
    Backwards {
        /// The range's first address.
        first: IpAddr,
        /// Its last address.
        last: IpAddr,
    },
}

impl SourceIps {
    /// The address of virtual user `user`; users past the end of the range wrap around.
    pub(super) fn nth(&self, user: usize) -> IpAddr {
        self.at((user as u128) % self.len)
    }

    /// Whether these are IPv4 addresses (else IPv6).
    pub(super) fn is_ipv4(&self) -> bool {
        self.first.is_ipv4()
    }

    /// The address `offset` places after the first; `offset` is below `len`.
    fn at(&self, offset: u128) -> IpAddr {
        match self.first {
            // `len` never reaches past the family's last address, so these cannot overflow.
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + offset as u32)),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) + offset)),
        }
    }
}

impl FromStr for SourceIps {
    type Err = SourceIpsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse_ip(a)?, parse_ip(b)?),
            None => {
                let ip = parse_ip(s)?;
                (ip, ip)
            }
        };
        let (lo, hi) = match (first, last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b))),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b)),
            _ => return Err(SourceIpsError::MixedFamilies { first, last }),
        };
        if lo > hi {
            return Err(SourceIpsError::Backwards { first, last });
        }
        Ok(SourceIps {
            first,
            // ::-ffff:...:ffff would be 2^128 addresses; one fewer changes nothing in practice.
            len: (hi - lo).saturating_add(1),
        })
    }
}

impl fmt::Display for SourceIps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.at(self.len - 1))
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, SourceIpsError> {
    let text = text.trim();
    text.parse().map_err(|source| SourceIpsError::NotAnAddress {
        text: text.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_crossing_an_octet_wraps_per_user() {
        let ips: SourceIps = "127.0.0.2-127.0.1.250".parse().unwrap();
        assert_eq!(ips.len, 254 + 250 + 1);
        assert_eq!(ips.nth(0).to_string(), "127.0.0.2");
        assert_eq!(ips.nth(253).to_string(), "127.0.0.255");
        assert_eq!(ips.nth(254).to_string(), "127.0.1.0");
        assert_eq!(ips.nth(504).to_string(), "127.0.1.250");
        assert_eq!(ips.nth(505).to_string(), "127.0.0.2");
        assert_eq!(ips.to_string(), "127.0.0.2-127.0.1.250");
    }

    #[test]
    fn a_single_address_is_a_range_of_one() {
        let ips: SourceIps = "127.0.0.9".parse().unwrap();
        assert_eq!(ips.len, 1);
        assert_eq!(ips.nth(7).to_string(), "127.0.0.9");
    }

    #[test]
    fn ipv6_ranges_work() {
        let ips: SourceIps = "::1-::3".parse().unwrap();
        assert_eq!(ips.nth(2).to_string(), "::3");
        assert_eq!(ips.nth(3).to_string(), "::1");
        let all: SourceIps = "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            .parse()
            .unwrap();
        assert_eq!(all.nth(usize::MAX).to_string(), "::ffff:ffff:ffff:ffff");
    }

    #[test]
    fn mistakes_are_named() {
        let err = |s: &str| s.parse::<SourceIps>().unwrap_err().to_string();
        assert_eq!(
            err("127.0.0.3-127.0.0.2"),
            "`127.0.0.3-127.0.0.2` runs backwards: the first address comes after the last"
        );
        assert_eq!(err("127.0.0.1-::1"), "`127.0.0.1-::1` mixes IPv4 and IPv6");
        assert_eq!(
            err("127.0.0.2-127.0.0.x"),
            "`127.0.0.x` is not an IP address (expected e.g. 127.0.0.2-127.0.0.250)"
        );
        assert!(err("").contains("is not an IP address"));
    }
}
