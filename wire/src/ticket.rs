//! Relay tickets: the rendezvous signs, per session and side, "this session may use a relay
//! until this time" with an HMAC key it shares with its relays. A relay admits a session on
//! the ticket alone, so relays need no state from, and no round trip to, the rendezvous.
//!
//! The MAC covers a domain tag, the session id, the side and the expiry, so a ticket cannot
//! be moved to another session or side, or extended. Expiry is wall-clock time (Unix
//! seconds) because issuer and relay are different machines.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// A brokered session's id, 16 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Which half of a session a ticket admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    /// The side that asked to connect.
    Initiator,
    /// The side being reached.
    Responder,
}

impl Side {
    /// The other half.
    pub fn other(self) -> Side {
        match self {
            Side::Initiator => Side::Responder,
            Side::Responder => Side::Initiator,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Side::Initiator => 1,
            Side::Responder => 2,
        }
    }
}

/// A signed admission to one relay session for one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The session.
    pub session: SessionId,
    /// Which half this admits.
    pub side: Side,
    /// Unix seconds after which the ticket is void.
    pub expires: u64,
    /// HMAC-SHA256 over the fields above.
    pub mac: [u8; 32],
}

/// Why a ticket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// The MAC does not verify: forged, altered, or signed with another key.
    #[error("ticket signature does not verify (forged, altered, or another rendezvous' key)")]
    BadMac,
    /// The ticket's time is over.
    #[error("ticket expired {0} s ago")]
    Expired(u64),
}

/// The secret that goes with a ticket: the rendezvous hands both to the half the ticket
/// admits, over encrypted signaling; the relay derives it from the ticket with its key.
/// A join proves possession of it (an HMAC over a fresh challenge), so a ticket seen on
/// the wire is worth nothing without it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinSecret(pub [u8; 32]);

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinSecret(..)")
    }
}

impl JoinSecret {
    /// The proof of possession for `challenge`, over `transport` (b"tcp" or b"udp", so a
    /// proof made for one cannot be used on the other).
    pub fn prove(&self, transport: &[u8], challenge: &[u8; 32]) -> [u8; 32] {
        hmac_sha256(
            &self.0,
            &[b"chuantou relay join v1\0", transport, challenge],
        )
    }
}

/// The key shared by a rendezvous and its relays.
#[derive(Clone)]
pub struct TicketKey([u8; 32]);

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketKey(..)")
    }
}

impl TicketKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        TicketKey(bytes)
    }

    /// A fresh random key.
    pub fn random() -> Self {
        TicketKey(rand::random())
    }

    /// Parses 64 hex digits (the form kept in key files and `CHUANTOU_RELAY_KEY`).
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(TicketKey(bytes.try_into().ok()?))
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// HMAC-SHA256 with this key over the concatenation of `parts`.
    pub(crate) fn hmac(&self, parts: &[&[u8]]) -> [u8; 32] {
        hmac_sha256(&self.0, parts)
    }

    fn mac_core(&self) -> Hmac<Sha256> {
        // A 32-byte key is always a valid HMAC key; the fallback is unreachable.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()))
    }

    fn mac(&self, session: &SessionId, side: Side, expires: u64) -> Hmac<Sha256> {
        let mut m = self.mac_core();
        m.update(b"chuantou relay ticket v1\0");
        m.update(&session.0);
        m.update(&[side.byte()]);
        m.update(&expires.to_be_bytes());
        m
    }

    /// Signs a ticket.
    pub fn issue(&self, session: SessionId, side: Side, expires: u64) -> Ticket {
        let mac = self.mac(&session, side, expires).finalize().into_bytes();
        Ticket {
            session,
            side,
            expires,
            mac: mac.into(),
        }
    }

    /// The secret that goes with `t` (see [`JoinSecret`]).
    pub fn join_secret(&self, t: &Ticket) -> JoinSecret {
        JoinSecret(self.hmac(&[
            b"chuantou relay join secret v1\0",
            &t.session.0,
            &[t.side.byte()],
            &t.expires.to_be_bytes(),
        ]))
    }

    /// Checks a join's proof for `challenge` over `transport` (constant time).
    pub fn check_proof(
        &self,
        t: &Ticket,
        transport: &[u8],
        challenge: &[u8; 32],
        proof: &[u8; 32],
    ) -> bool {
        constant_time_eq(&self.join_secret(t).prove(transport, challenge), proof)
    }

    /// Checks a ticket's MAC (in constant time) and expiry at `now_unix`.
    pub fn verify(&self, t: &Ticket, now_unix: u64) -> Result<(), TicketError> {
        self.authentic(t)?;
        if now_unix > t.expires {
            return Err(TicketError::Expired(now_unix - t.expires));
        }
        Ok(())
    }

    /// Checks only a ticket's MAC (in constant time): that it was issued for its session
    /// and side. Expiry bounds when a session may be joined, not how long a paired half
    /// may keep proving it holds the ticket (a relay half moving to a new address).
    pub fn authentic(&self, t: &Ticket) -> Result<(), TicketError> {
        self.mac(&t.session, t.side, t.expires)
            .verify_slice(&t.mac)
            .map_err(|_| TicketError::BadMac)
    }
}

/// HMAC-SHA256 of the concatenated `parts` under a 32-byte key: tickets use it, and so
/// do punch probes (keyed by the session secret).
pub fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // A 32-byte key is always a valid HMAC key; the fallback is unreachable.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Compares two byte strings in time that depends only on their lengths, so a forger
/// learns nothing from how fast a wrong MAC is refused.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tickets_verify_until_expiry() {
        let k = TicketKey::from_bytes([1; 32]);
        let t = k.issue(SessionId([2; 16]), Side::Initiator, 1000);
        assert_eq!(k.verify(&t, 999), Ok(()));
        assert_eq!(k.verify(&t, 1000), Ok(()));
        assert_eq!(k.verify(&t, 1003), Err(TicketError::Expired(3)));
        // Past expiry it is still authentic (a paired half may prove it holds it) …
        assert_eq!(k.authentic(&t), Ok(()));
        // … and a forged one is not.
        let mut forged = t.clone();
        forged.side = Side::Responder;
        assert_eq!(k.authentic(&forged), Err(TicketError::BadMac));
    }

    #[test]
    fn any_altered_field_or_other_key_fails() {
        let k = TicketKey::from_bytes([1; 32]);
        let t = k.issue(SessionId([2; 16]), Side::Initiator, 1000);
        let mut other_side = t.clone();
        other_side.side = Side::Responder;
        let mut later = t.clone();
        later.expires += 1;
        let mut other_session = t.clone();
        other_session.session.0[15] ^= 1;
        let mut flipped = t.clone();
        flipped.mac[0] ^= 0x80;
        for bad in [other_side, later, other_session, flipped] {
            assert_eq!(k.verify(&bad, 0), Err(TicketError::BadMac), "{bad:?}");
        }
        let stranger = TicketKey::from_bytes([9; 32]);
        assert_eq!(stranger.verify(&t, 0), Err(TicketError::BadMac));
    }

    #[test]
    fn mac_is_pinned() {
        // A change of the MAC input breaks every deployed relay: it needs a version bump.
        let k = TicketKey::from_bytes([1; 32]);
        let t = k.issue(SessionId([2; 16]), Side::Responder, 1_795_000_000);
        // Computed independently with Python's hmac module over the documented input.
        assert_eq!(
            hex::encode(t.mac),
            "c7df3e3c8be57d182fca04fcd9ee91c7186a797697dadb70979af770c990b634"
        );
        assert_eq!(
            TicketKey::from_hex(&k.to_hex()).unwrap().to_hex(),
            k.to_hex()
        );
        assert!(TicketKey::from_hex("abcd").is_none());
    }
}
