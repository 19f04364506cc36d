//! Punch probes on the wire: small UDP datagrams authenticated with the session secret
//! from the rendezvous, so stray or spoofed packets never complete a punch.
//!
//! - `Request`: "can you hear me?", sent on every candidate pair;
//! - `Response`: sent back to a request's source from the socket it arrived on, carrying
//!   the address the request came from (our peer-reflexive address);
//! - `Nominate`: the initiator picks the first pair that answered;
//! - `NominateAck`: the responder agrees; both then run the tunnel on that pair.
//!
//! Layout (53 bytes): magic `04 'C' 'T' 'P'` | kind | sender role | session id (16) |
//! transaction (8) | observed address (family 4, IPv4, port; zero when absent: 7) |
//! HMAC-SHA256 over everything before it, first 16 bytes. The first byte, 4, is outside
//! the ranges STUN (0–3) and QUIC (64–255) use (RFC 9443), so one socket can carry all three.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use wire::ticket::{Side, constant_time_eq, hmac_sha256};

/// The first four bytes of every probe.
pub const MAGIC: [u8; 4] = [4, b'C', b'T', b'P'];
/// Length of every probe.
pub const LEN: usize = 4 + 1 + 1 + 16 + 8 + 7 + 16;
const MAC_LEN: usize = 16;

/// What a probe says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Asks for a response.
    Request,
    /// Answers a request.
    Response,
    /// The initiator chooses this pair.
    Nominate,
    /// The responder accepts the nomination.
    NominateAck,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Request => 1,
            Kind::Response => 2,
            Kind::Nominate => 3,
            Kind::NominateAck => 4,
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Request,
            2 => Kind::Response,
            3 => Kind::Nominate,
            4 => Kind::NominateAck,
            _ => return None,
        })
    }
}

/// A decoded, authenticated probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// What it says.
    pub kind: Kind,
    /// Which side sent it.
    pub from: Side,
    /// Matches responses to requests (and acks to nominations).
    pub transaction: u64,
    /// In a response: where the request came from, as the responder saw it.
    pub observed: Option<SocketAddrV4>,
}

/// The keys of one session's probes.
#[derive(Clone)]
pub struct ProbeKey {
    session: [u8; 16],
    secret: [u8; 32],
}

impl std::fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeKey")
            .field("session", &hex::encode(self.session))
            .finish_non_exhaustive()
    }
}

fn side_byte(s: Side) -> u8 {
    match s {
        Side::Initiator => 0,
        Side::Responder => 1,
    }
}

impl ProbeKey {
    /// The key of session `session` with the secret the rendezvous handed both sides.
    pub fn new(session: [u8; 16], secret: [u8; 32]) -> ProbeKey {
        ProbeKey { session, secret }
    }

    /// Encodes and signs `probe`.
    pub fn encode(&self, probe: &Probe) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = probe.kind.byte();
        b[5] = side_byte(probe.from);
        b[6..22].copy_from_slice(&self.session);
        b[22..30].copy_from_slice(&probe.transaction.to_be_bytes());
        if let Some(a) = probe.observed {
            b[30] = 4;
            b[31..35].copy_from_slice(&a.ip().octets());
            b[35..37].copy_from_slice(&a.port().to_be_bytes());
        }
        let mac = hmac_sha256(&self.secret, &[b"chuantou punch v1\0", &b[..LEN - MAC_LEN]]);
        b[LEN - MAC_LEN..].copy_from_slice(&mac[..MAC_LEN]);
        b
    }

    /// Decodes a datagram; `None` unless it is a well-formed probe of this session with a
    /// valid MAC. Never panics, whatever the bytes.
    pub fn decode(&self, data: &[u8]) -> Option<Probe> {
        if data.len() != LEN || data[..4] != MAGIC || data[6..22] != self.session {
            return None;
        }
        let mac = hmac_sha256(
            &self.secret,
            &[b"chuantou punch v1\0", &data[..LEN - MAC_LEN]],
        );
        if !constant_time_eq(&mac[..MAC_LEN], &data[LEN - MAC_LEN..]) {
            return None;
        }
        let kind = Kind::from_byte(data[4])?;
        let from = match data[5] {
            0 => Side::Initiator,
            1 => Side::Responder,
            _ => return None,
        };
        let mut t = [0u8; 8];
        t.copy_from_slice(&data[22..30]);
        let observed = match data[30] {
            0 => None,
            4 => {
                let ip = Ipv4Addr::new(data[31], data[32], data[33], data[34]);
                Some(SocketAddrV4::new(
                    ip,
                    u16::from_be_bytes([data[35], data[36]]),
                ))
            }
            _ => return None,
        };
        Some(Probe {
            kind,
            from,
            transaction: u64::from_be_bytes(t),
            observed,
        })
    }
}

/// Whether a datagram looks like a punch probe at all (cheap, before any MAC work).
pub fn is_probe(data: &[u8]) -> bool {
    data.len() == LEN && data[..4] == MAGIC
}

/// The session a probe claims to belong to (unauthenticated: only for routing it to the
/// session's agent, which checks the MAC).
pub fn session_of(data: &[u8]) -> Option<[u8; 16]> {
    if !is_probe(data) {
        return None;
    }
    let mut session = [0u8; 16];
    session.copy_from_slice(&data[6..22]);
    Some(session)
}

/// An IPv4 socket address, if `a` is one.
pub fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> ProbeKey {
        ProbeKey::new([7; 16], [9; 32])
    }

    #[test]
    fn round_trips_and_is_pinned() {
        let p = Probe {
            kind: Kind::Response,
            from: Side::Responder,
            transaction: 0x0102_0304_0506_0708,
            observed: Some("198.18.1.2:40000".parse().unwrap()),
        };
        let b = key().encode(&p);
        assert_eq!(key().decode(&b), Some(p));
        let want = ["04435450", "02", "01", &"07".repeat(16), "0102030405060708"].concat()
            + "04c61201029c40";
        assert_eq!(hex::encode(&b[..LEN - MAC_LEN]), want);
    }

    #[test]
    fn refuses_other_sessions_secrets_and_any_altered_byte() {
        let p = Probe {
            kind: Kind::Request,
            from: Side::Initiator,
            transaction: 42,
            observed: None,
        };
        let b = key().encode(&p);
        assert_eq!(ProbeKey::new([7; 16], [8; 32]).decode(&b), None);
        assert_eq!(ProbeKey::new([6; 16], [9; 32]).decode(&b), None);
        for i in 0..LEN {
            let mut c = b;
            c[i] ^= 0x01;
            assert_eq!(key().decode(&c), None, "byte {i} altered");
        }
        assert_eq!(key().decode(&b[..LEN - 1]), None);
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = key().decode(&data);
        }
    }
}
