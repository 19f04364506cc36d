//! Relay control messages. A half proves it holds its ticket's [`JoinSecret`] (which only
//! it and the relay know) by an HMAC over a fresh challenge, so a ticket seen on the wire
//! can neither join, nor replace, nor stall a half. The flow:
//!
//! - TCP: the client sends a frame `Hello { version, ticket }`; the relay answers
//!   `Status::Challenge { nonce }` (random); the client sends `Proof { mac }`; then the
//!   relay says `Status::Waiting` while the other half is missing, and `Status::Paired`,
//!   after which the stream carries the session's bytes, opaque, until either side closes.
//!   A refused hello or proof gets `Status::Refused` and the connection is closed.
//! - UDP: the client sends [`UDP_MAGIC`] followed by a postcard `UdpControl::Hello` from the
//!   socket it will use; the relay answers `Status::Challenge` with a cookie bound to that
//!   source address (stateless, and smaller than the hello: a spoofed hello holds nothing
//!   and reflects nothing); the client sends `UdpControl::Proven { hello, nonce, mac }`,
//!   repeating until it hears `Status(Paired)`. A half whose address changes proves again
//!   from the new one, and the session follows it. After that every datagram it sends
//!   without the magic prefix is forwarded to the other half. Data never starts with the
//!   magic: its first byte is 0, which no QUIC packet has (RFC 9000 §17.2 and §17.3 fix
//!   the 0x40 bit).
//!
//! [`JoinSecret`]: crate::ticket::JoinSecret

pub mod client;

use serde::{Deserialize, Serialize};

use crate::ticket::Ticket;

/// The relay control protocol version (2: joins prove possession of the ticket's secret).
pub const RELAY_VERSION: u16 = 2;

/// Prefix of every UDP control datagram.
pub const UDP_MAGIC: [u8; 4] = [0x00, b'C', b'T', b'R'];

/// The first (and only) control frame a client sends on TCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`RELAY_VERSION`].
    pub version: u16,
    /// The rendezvous-signed admission.
    pub ticket: Ticket,
}

/// The relay's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Admitted; the other half has not arrived yet.
    Waiting,
    /// Both halves are in: from now on, bytes are the session's.
    Paired,
    /// Not admitted, or the session ended; the relay closes after sending it.
    Refused(Refusal),
    /// Prove you hold the ticket's secret: answer with an HMAC over this nonce.
    Challenge {
        /// Fresh (TCP), or a cookie bound to the source address (UDP).
        nonce: [u8; 32],
    },
}

/// The client's answer to [`Status::Challenge`] on TCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// [`JoinSecret::prove`](crate::ticket::JoinSecret::prove) over `b"tcp"` and the nonce.
    pub mac: [u8; 32],
}

/// Why the relay refused or ended a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code:?})")]
pub struct Refusal {
    /// What went wrong.
    pub code: RefusalCode,
    /// A sentence for humans.
    pub message: String,
}

impl Refusal {
    /// Builds a refusal.
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Refusal codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The ticket's MAC does not verify.
    BadTicket,
    /// The ticket expired.
    Expired,
    /// This ticket was already used.
    Reused,
    /// The relay is at its session limit.
    Busy,
    /// The other half did not arrive in time.
    PairTimeout,
    /// Another protocol version.
    VersionMismatch,
    /// Unreadable control message.
    BadFrame,
    /// The ticket's lifetime is longer than this relay accepts.
    TicketTooLong,
    /// The join did not prove possession of the ticket's secret.
    NoProof,
}

/// UDP control datagrams (after [`UDP_MAGIC`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UdpControl {
    /// Client → relay: admit this socket.
    Hello(Hello),
    /// Relay → client.
    Status(Status),
    /// Client → relay: the hello again, with the relay's cookie and the proof over it.
    Proven {
        /// The hello being proven.
        hello: Hello,
        /// The relay's challenge for this source address.
        nonce: [u8; 32],
        /// [`JoinSecret::prove`](crate::ticket::JoinSecret::prove) over `b"udp"` and the
        /// nonce.
        mac: [u8; 32],
    },
}

/// Encodes a UDP control datagram.
pub fn encode_udp(msg: &UdpControl) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail.
    postcard::to_extend(msg, UDP_MAGIC.to_vec()).unwrap_or_else(|_| UDP_MAGIC.to_vec())
}

/// Decodes a UDP control datagram; `None` when `data` is not one (session data).
pub fn decode_udp(data: &[u8]) -> Option<Result<UdpControl, postcard::Error>> {
    let body = data.strip_prefix(&UDP_MAGIC)?;
    Some(crate::frame::decode(body).map_err(|e| match e {
        crate::frame::FrameError::Decode(e) => e,
        _ => postcard::Error::DeserializeBadEncoding,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::{SessionId, Side, TicketKey};

    #[test]
    fn udp_control_round_trips_and_data_is_not_control() {
        let t = TicketKey::from_bytes([1; 32]).issue(SessionId([3; 16]), Side::Initiator, 5);
        let hello = UdpControl::Hello(Hello {
            version: RELAY_VERSION,
            ticket: t,
        });
        let bytes = encode_udp(&hello);
        assert_eq!(&bytes[..4], &UDP_MAGIC);
        assert_eq!(decode_udp(&bytes).unwrap().unwrap(), hello);
        // A QUIC short-header packet (0x40 bit set) is data.
        assert!(decode_udp(&[0x41, 1, 2, 3, 4]).is_none());
        assert!(
            decode_udp(&[0x00, b'C', b'T', b'R', 0xff])
                .unwrap()
                .is_err()
        );
    }
}
