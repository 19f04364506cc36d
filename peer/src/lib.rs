//! chuantou peer: exposes a local service under a name, and reaches a named peer's service
//! through an end-to-end encrypted tunnel: over the relay at once, and over a punched
//! direct path as soon as one works — UDP (QUIC) or TCP simultaneous open (TLS + yamux).
//!
//! # Layout
//!
//! - [`home`]: identity key, `config.toml`, `known_peers` pinning.
//! - [`tcp_port`]: the one TCP port that signaling, the listener and TCP punching share.
//! - [`tls`]: TLS 1.3 authenticated by pinned ed25519 keys.
//! - [`transport`]: `--transport auto|udp|tcp|relay` and the order paths are preferred in.
//! - [`tunnel`]: TLS + yamux over one byte stream; local connections as streams.
//! - [`signal`]: staying registered with the rendezvous (backoff, fatal refusals).
//! - [`expose`] and [`reach`]: the two sides of a tunnel, as the commands run them.
//! - [`udp`]: UDP flows as length-framed datagrams in tunnel streams.
//! - [`udp_direct`]: UDP flows as QUIC datagrams on the direct path.
//! - [`status`]: the board of live tunnels and the control socket `peer status` reads.
//! - [`direct`]: the punch shell and the direct QUIC path it brings up.
//! - [`direct_tcp`]: the TCP punch shell; the tunnel then runs on the connection it agreed.
//! - [`endpoint`]: the one UDP socket shared by STUN, punch probes and direct QUIC tunnels.
//! - [`probe`]: punch probes on the wire, authenticated by the session secret.
//! - [`punch`]: the UDP punch agent, sans-IO (drive loop in its docs).
//! - [`punch_tcp`]: the TCP simultaneous-open agent, sans-IO (drive loop in its docs).
//! - [`quic`]: the direct tunnel, QUIC on the punched socket.
//! - [`strategy`]: how to punch (or not) from both sides' NAT profiles.
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod defaults;
pub mod direct;
pub mod direct_tcp;
pub mod endpoint;
pub mod expose;
pub mod home;
#[cfg(test)]
mod natsim;
pub mod path;
pub mod probe;
pub mod punch;
pub mod punch_tcp;
pub mod quic;
pub mod reach;
pub mod session;
pub mod signal;
pub mod status;
pub mod strategy;
pub mod tcp_port;
pub mod tls;
pub mod transport;
pub mod tunnel;
pub mod udp_direct;
