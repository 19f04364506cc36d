//! chuantou relay: admits the two halves of a brokered session on rendezvous-signed tickets
//! and forwards their bytes (TCP) or datagrams (UDP), opaque: the tunnel inside is
//! end-to-end encrypted, so a relay never sees plaintext. Its messages, tickets and the
//! client half of a join are in the `wire` crate.
//!
//! # Layout
//!
//! - [`pairing`]: the sans-IO pairing table (admission, replay refusal, pairing timeout).
//! - [`server`]: the tokio shell: TCP and UDP forwarding with limits and accounting;
//!   [`stats`]: its counters and their Prometheus text.
//! - [`announce`]: a standalone relay registering with a rendezvous.
//! - [`defaults`]: every timeout and limit, with its reason.
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod announce;
pub mod defaults;
pub mod pairing;
pub mod server;
pub mod stats;
