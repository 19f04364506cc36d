//! chuantou relay: admits the two halves of a brokered session on rendezvous-signed tickets
//! and forwards their bytes (TCP) or datagrams (UDP), opaque: the tunnel inside is
//! end-to-end encrypted, so a relay never sees plaintext. It is also the bottom of the
//! workspace: the frame codec every chuantou protocol uses lives here, because the
//! rendezvous embeds a relay and so builds on this crate.
//!
//! # Layout
//!
//! - [`frame`]: length-prefixed postcard frames (signaling and relay control).
//! - [`ticket`]: session ids, sides, and HMAC-signed tickets.
//! - [`proto`]: the relay control messages and their flow.
//! - [`pairing`]: the sans-IO pairing table (admission, replay refusal, pairing timeout).
//! - [`server`]: the tokio shell: TCP and UDP forwarding with limits and accounting;
//!   [`stats`]: its counters and their Prometheus text.
//! - [`batch`]: a UDP socket that receives and sends datagrams in GRO/GSO batches.
//! - [`sockbuf`]: UDP buffer sizes for sockets that carry sessions.
//! - [`client`]: joining a session over TCP or UDP.
//! - [`announce`]: a standalone relay registering with a rendezvous.
//! - [`cli`]: logging, runtime and error reporting shared by every chuantou binary.
//! - [`defaults`]: every timeout and limit, with its reason.
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod announce;
pub mod batch;
pub mod cli;
pub mod client;
pub mod defaults;
pub mod frame;
pub mod pairing;
pub mod proto;
pub mod server;
pub mod sockbuf;
pub mod stats;
pub mod ticket;
