//! chuantou's shared vocabulary, the bottom of the workspace: everything two chuantou
//! programs must agree on, and the small client-side pieces both a server and a peer use.
//! It depends on no other chuantou crate, so `peer` and `natprobe` build on it without
//! pulling in a server.
//!
//! # Layout
//!
//! - [`frame`]: length-prefixed postcard frames (signaling and relay control).
//! - [`ticket`]: session ids, sides, and HMAC-signed tickets.
//! - [`relay`]: the relay control messages and their flow; [`relay::client`]: joining a
//!   session over TCP or UDP.
//! - [`signal`]: the signaling messages between peers (and relays) and the rendezvous;
//!   [`signal::client`]: the peer's half of signaling, and STUN queries over its sockets.
//! - [`batch`]: a UDP socket that receives and sends datagrams in GRO/GSO batches;
//!   [`sockbuf`]: UDP buffer sizes for sockets that carry sessions.
//! - [`dual`]: dual-stack UDP sockets and canonical addresses.
//! - [`announce`]: the messages of a standalone relay registering with a rendezvous.
//! - [`stun`]: the STUN Binding client codec and its retransmission schedule.
//! - [`tls`]: TLS 1.3 authenticated by pinned ed25519 keys (peers, and signaling).
//! - [`cli`]: logging, runtime, signals and error reporting shared by every binary.
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod announce;
pub mod batch;
pub mod cli;
pub mod dual;
pub mod frame;
pub mod relay;
pub mod signal;
pub mod sockbuf;
pub mod stun;
pub mod ticket;
pub mod tls;
