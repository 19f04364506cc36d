//! The paths under a session. A session is one multipath QUIC connection (noq); each of its
//! paths is an address QUIC sends to. A punched UDP pair on the shared socket is a real
//! address; everything else — the relay (over UDP or TCP), a punched TCP connection, a
//! birthday socket — is a [`link`] presented to QUIC as a made-up address of its own, the
//! way iroh presents its relays. [`socket`] is the one QUIC socket that sends to both, and
//! [`choose`] decides which path carries traffic.
//!
//! A new path kind is one [`PathKind`] variant and, if it is not plain UDP, one way of
//! making a [`link::Link`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

pub mod choose;
pub mod link;
pub mod make;
pub mod relay;
pub mod socket;

/// What carries a path's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// A punched UDP pair.
    DirectUdp,
    /// A punched TCP connection (simultaneous open), datagrams framed on it.
    DirectTcp,
    /// The relay, forwarding UDP datagrams.
    Relay,
    /// The relay over TCP, datagrams framed on it (for peers whose UDP is blocked).
    RelayTcp,
}

impl PathKind {
    /// The name `peer status` and the logs use.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::DirectUdp => "direct-udp",
            PathKind::DirectTcp => "direct-tcp",
            PathKind::Relay => "relay",
            PathKind::RelayTcp => "relay-tcp",
        }
    }

    /// Whether the path goes straight to the other peer.
    pub fn is_direct(self) -> bool {
        matches!(self, PathKind::DirectUdp | PathKind::DirectTcp)
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The prefix of made-up link addresses: a Unique Local Address block (RFC 4193,
/// fd00::/8) with a fixed global id, never routed anywhere, so no real packet can come
/// from or go to one of them.
const MAPPED_PREFIX: [u16; 4] = [0xfd63, 0x6875, 0x616e, 0x7475];

/// The port every made-up address uses (the address alone names the link).
const MAPPED_PORT: u16 = 1;

/// The made-up address of link number `n`.
pub fn mapped(n: u64) -> SocketAddr {
    let [a, b, c, d] = MAPPED_PREFIX;
    let ip = Ipv6Addr::new(
        a,
        b,
        c,
        d,
        (n >> 48) as u16,
        (n >> 32) as u16,
        (n >> 16) as u16,
        n as u16,
    );
    SocketAddr::new(IpAddr::V6(ip), MAPPED_PORT)
}

/// Whether `addr` is a made-up link address.
pub fn is_mapped(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V6(ip) => ip.segments()[..4] == MAPPED_PREFIX,
        IpAddr::V4(_) => false,
    }
}

/// `addr` as the IPv4 socket sees it: QUIC runs in IPv6 mode (so made-up addresses fit),
/// and writes IPv4 addresses as IPv4-mapped IPv6 ones.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `addr` as QUIC wants it: IPv4 as IPv4-mapped IPv6.
pub fn for_quic(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_recognised_and_distinct() {
        let (a, b) = (mapped(1), mapped(u64::MAX));
        assert!(is_mapped(&a) && is_mapped(&b));
        assert_ne!(a, b);
        assert!(!is_mapped(&"198.18.0.1:7000".parse().unwrap()));
        assert!(!is_mapped(&"[2001:2::1]:7000".parse().unwrap()));
    }

    #[test]
    fn ipv4_survives_the_round_trip_through_quic_form() {
        let a: SocketAddr = "198.18.0.1:7000".parse().unwrap();
        assert!(for_quic(a).is_ipv6());
        assert_eq!(canonical(for_quic(a)), a);
        assert_eq!(canonical(mapped(3)), mapped(3));
    }
}
