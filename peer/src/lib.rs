//! chuantou peer: exposes a local service under a name, and reaches a named peer's service
//! through one end-to-end encrypted session per peer pair, whose traffic takes the best
//! path at each moment: a punched UDP pair, a punched TCP connection, or the relay — and
//! moves, open connections included, when a better path is proven or the current one dies.
//!
//! # Layout
//!
//! - [`session`]: one multipath QUIC session per peer pair, owning its paths and choosing
//!   the one that carries traffic now.
//! - [`path`]: the path kinds, the links (relay, punched TCP, birthday sockets) presented
//!   to QUIC as addresses of their own, the QUIC socket, and the sans-IO chooser.
//! - [`punch`]: the sans-IO UDP and TCP punch agents, their strategy and shells.
//! - [`presence`]: registration with the rendezvous, the UDP endpoint and the TCP port.
//! - [`forward`]: local TCP connections and UDP flows carried by a session.
//! - [`expose`] and [`reach`]: the two commands, listeners and forwarders on sessions;
//!   [`up`]: every `[[expose]]` and `[[reach]]` of `config.toml` in one process.
//! - [`status`]: the board of live sessions and the control socket `peer status` reads.
//! - [`home`]: identity key, `config.toml`, `known_peers` pinning.
//! - [`quic`]: the session's QUIC settings (TLS 1.3 pinned to ed25519 keys is `wire::tls`).
//! - [`transport`]: `--transport` and `--no-relay`, the kinds of path a session may use.
//! - [`defaults`]: every timing constant of the peer, each with its reason.
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod defaults;
pub mod expose;
pub mod forward;
pub mod home;
pub mod path;
pub mod presence;
pub mod punch;
pub mod quic;
pub mod reach;
pub mod session;
pub mod status;
pub mod transport;
pub mod up;
