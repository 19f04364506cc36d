//! Every timeout and limit of the relay, each with the reason for its value.

use std::time::Duration;

/// Sessions paired or waiting at once. A small VM relays a few thousand interactive
/// sessions comfortably; past that, add relays.
pub const MAX_SESSIONS: usize = 10_000;

/// Halves from one IP address waiting for their partner at once. A healthy partner comes
/// within a round trip, so even a carrier NAT's many users seldom have more than a few
/// waiting; without a cap, one address could hold the whole table for the pairing timeout.
pub const MAX_WAITING_PER_IP: usize = 64;

/// How long the first half waits for the second. Both get their tickets in the same
/// broker exchange, so a healthy partner arrives within a round trip or two; 30 s covers
/// a slow mobile link and a retry.
pub const PAIRING_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest ticket lifetime a relay accepts: one hour bounds how long spent tickets must be
/// remembered to refuse replays.
pub const MAX_TICKET_LIFETIME: Duration = Duration::from_secs(3600);

/// A paired session with no bytes either way for this long is closed. Tunnels keep alive
/// far more often than this (under half the NAT mapping lifetime).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Time a new TCP connection has to present its ticket.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read per system call when forwarding. Buffers are lent from a pool only while
/// data flows, so idle sessions hold none.
pub const CHUNK: usize = 256 * 1024;

/// A paired UDP half that has been silent this long may come back from a new address with
/// its ticket (its NAT gave it a new mapping) and the session follows it. A live half
/// (QUIC keep-alives go out every half second) is never this quiet, so a replayed ticket
/// cannot move it.
pub const UDP_REBIND_QUIET: Duration = Duration::from_secs(1);
