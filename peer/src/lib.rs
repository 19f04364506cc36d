//! chuantou peer: exposes a local service under a name, and reaches a named peer's service
//! through an end-to-end encrypted tunnel (today over the relay; hole punching comes in
//! later issues).
//!
//! # Layout
//!
//! - [`home`]: identity key, `config.toml`, `known_peers` pinning.
//! - [`tls`]: TLS 1.3 authenticated by pinned ed25519 keys.
//! - [`tunnel`]: TLS + yamux over one byte stream; local connections as streams.
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod home;
pub mod tls;
pub mod tunnel;

/// What the `peer` binary cannot do yet.
pub const STATUS: &str = "peer expose/reach are being built (issue 4): identity, pinning and the \
encrypted tunnel exist as a library, the commands come next";
