//! The messages of standalone relays registering with a rendezvous, so that it hands them
//! out in tickets (the task that sends them is `relay::announce`).
//!
//! They travel on the rendezvous' signaling port, as their own variants of its frames: a
//! relay's frames are `ClientFrame::Relay(RelayMsg)` and the answers
//! `ServerFrame::Relay(RelayReply)` or `ServerFrame::Error` ([`crate::signal`]).
//!
//! - relay → `Hello { version, port, public }`
//! - rendezvous → `Challenge { nonce }`
//! - relay → `Proof { mac }`: HMAC with the shared ticket key over the nonce and the
//!   relay's advertised address, so only relays that can verify tickets get handed out
//! - rendezvous → `Accepted { advertised }`
//! - relay → `Load { sessions }` every [`LOAD_INTERVAL`]; silence means gone.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ticket::TicketKey;

/// Version of these messages.
pub const ANNOUNCE_VERSION: u16 = 1;
/// How often a registered relay reports its load (and so shows it is alive).
pub const LOAD_INTERVAL: Duration = Duration::from_secs(15);

/// Relay → rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayMsg {
    /// Opens a registration.
    Hello {
        /// [`ANNOUNCE_VERSION`].
        version: u16,
        /// The relay's port (TCP and UDP).
        port: u16,
        /// Its public address, when the rendezvous cannot see it (behind a load balancer).
        public: Option<SocketAddr>,
    },
    /// Answers the challenge.
    Proof {
        /// [`proof`] of the nonce.
        mac: [u8; 32],
    },
    /// Periodic load report.
    Load {
        /// Sessions paired now.
        sessions: u32,
    },
}

/// Rendezvous → relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayReply {
    /// Prove you hold the ticket key.
    Challenge {
        /// Fresh per registration.
        nonce: [u8; 32],
    },
    /// Registered: peers will be sent to `advertised`.
    Accepted {
        /// The address handed out in tickets.
        advertised: SocketAddr,
    },
}

/// The proof a relay gives: HMAC-SHA256 with the ticket key over a tag, the nonce and the
/// port, so it cannot be replayed to another rendezvous or for another port.
pub fn proof(key: &TicketKey, nonce: &[u8; 32], port: u16) -> [u8; 32] {
    key.hmac(&[b"chuantou relay announce v1\0", nonce, &port.to_be_bytes()])
}
