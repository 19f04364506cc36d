//! The chuantou rendezvous: where peers behind NATs register, find each other, learn their
//! NAT-mapped addresses and get brokered into sessions. The messages, and the peer's half
//! of signaling, are in the `wire` crate.
//!
//! # Layout
//!
//! - [`registry`]: names, keys, observed addresses and liveness (sans-IO).
//! - [`broker`]: turning a connect request into the two session messages (pure).
//! - [`stun`]: the STUN Binding responder (sans-IO);
//!   [`ratelimit`]: the per-source buckets it uses.
//! - [`server`]: the tokio shell: signaling listener, STUN sockets, expiry timer;
//!   [`http`]: the read-only JSON API and metrics; [`metrics`]: the counters.
//! - [`public`]: services published to plain clients ([`public::Publications`], sans-IO;
//!   [`public::sniff`], routing by Host or TLS server name; [`public::entry`], the shell).
//! - [`sessions`]: what peers report of their sessions, and punching outcomes by NAT pair
//!   (sans-IO).
//! - [`names`]: name → key bindings kept across restarts (redb).
//! - [`state`]: the state directory (the identity peers pin).
//! - [`defaults`]: every timeout and limit, with its reason.
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod broker;
pub mod defaults;
mod http;
pub mod metrics;
pub mod names;
pub mod public;
pub mod ratelimit;
pub mod registry;
pub mod server;
pub mod sessions;
pub mod state;
pub mod stun;
