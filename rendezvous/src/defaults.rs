//! Every timeout and limit of the rendezvous in one place, each with the reason for its value.

use std::time::Duration;

/// How often a registered peer heartbeats. 15 s keeps a NAT's TCP mapping warm with a wide
/// margin (RFC 5382 asks NATs to keep established TCP for 2 h 4 min, but many home and
/// carrier NATs drop idle TCP within minutes) while costing a campus-sized server nothing.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);

/// Heartbeats a peer may miss before it is marked offline: three lets one or two be lost
/// on a lossy mobile link without flapping.
pub const MISSED_HEARTBEATS: u32 = 3;

/// How long an offline peer's name stays bound to its key: 30 days, so that a PC left off
/// over a holiday keeps its name (and nobody can take it meanwhile); after that the name is
/// free again. Bindings survive restarts (`names`), so this is the only way a name is lost
/// besides `peer release`.
pub const NAME_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often the last-seen time of online peers is saved: after a crash, a name's
/// retention counts from at most this long before the crash.
pub const NAME_REFRESH: Duration = Duration::from_secs(3600);

/// The registry never wakes more often than this for expiry: a heartbeat deadline that is
/// late by a quarter second does not matter, scanning 10,000 peers per heartbeat would.
pub const SWEEP_GRANULARITY: Duration = Duration::from_millis(250);

/// A new connection must say hello within this time, or it is closed; bounds the cost of
/// connections that never speak.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Once a frame has started, the rest must arrive within this time (slowloris defence).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// A write to a peer that does not read must not hold its task forever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most registered names (online or retained offline) the registry holds.
pub const MAX_PEERS: usize = 100_000;

/// Most simultaneous signaling connections.
pub const MAX_CONNECTIONS: usize = 100_000;

/// Most connections from one source IP that may wait for their hello at once. A real peer
/// says hello within a round trip, so even hundreds of peers behind one carrier NAT stay
/// far below this; a single host opening connections and saying nothing hits it.
pub const MAX_PENDING_PER_IP: usize = 256;

/// Time the server gives open connections to receive their shutdown notice.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Lead time added to the slower side's half round trip when scheduling a punch, so both
/// sides have their sockets ready before the first probe arrives.
pub const PUNCH_LEAD: Duration = Duration::from_millis(100);

/// How long relay tickets stay valid after brokering: both sides join the relay within
/// seconds of the broker message; two minutes covers a slow link and a retry, and keeps
/// the relay's memory of spent tickets short.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(120);

/// Assumed round trip for a peer that has not reported one yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(100);

/// Longest punch lead the server schedules, whatever the RTTs claim: a peer-reported RTT
/// must not make a session wait for seconds.
pub const MAX_PUNCH_LEAD: Duration = Duration::from_secs(2);

/// STUN requests allowed per source IP per second, sustained; with [`STUN_BURST`]. A
/// natprobe run needs about a dozen requests, the lifetime search a few per second.
pub const STUN_RATE: u32 = 50;

/// STUN requests a source IP may send at once before the rate applies.
pub const STUN_BURST: u32 = 100;

/// Source IPs tracked by the STUN rate limiter; beyond it the oldest are forgotten, so the
/// table's memory is bounded whatever the source addresses.
pub const STUN_RATE_TABLE: usize = 65_536;

/// Largest STUN response sent, except that a PADDING request may be answered with a
/// response as large as itself: a bound on what a spoofed request can reflect.
pub const STUN_MAX_RESPONSE: usize = 256;

/// Largest STUN request read; larger datagrams are dropped unparsed. Room for an RFC 5780
/// PADDING probe of a 1500-byte MTU.
pub const STUN_MAX_REQUEST: usize = 2048;

/// Simultaneous STUN-over-TCP connections (RFC 8489 §6.2.2; natprobe `--tcp` uses them to
/// see TCP mappings). Each is short-lived; beyond this, new ones wait in the backlog.
pub const STUN_TCP_MAX_CONNECTIONS: usize = 256;

/// How long a STUN-over-TCP connection may sit without completing a request.
pub const STUN_TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Refusals (connection limits hit) delivered at once. Each costs a TLS handshake so that
/// the client can read why; past this many, extra connections are closed without a word.
pub const REFUSALS_IN_FLIGHT: usize = 64;

/// How long delivering one refusal may take.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Connect requests a registered peer may make, per second sustained (bursts of
/// [`CONNECT_BURST`]). A session serves every connection between two peers, so a real
/// peer asks rarely; each request makes the target open a relay connection and send
/// probes, so an unlimited stream of them would turn the target into an amplifier.
pub const CONNECT_RATE: u32 = 1;
/// Connect requests a peer may make at once.
pub const CONNECT_BURST: u32 = 10;
/// Connect requests one target may receive, per second (from everyone together): a PC
/// reached by a whole class still gets through, a flood does not.
pub const CONNECT_TARGET_RATE: u32 = 5;
/// Connect requests one target may receive at once.
pub const CONNECT_TARGET_BURST: u32 = 30;

/// Names one address (or IPv6 /64) may bind. A campus or carrier NAT puts many honest
/// users behind one address, so this is generous; it stops one machine from taking
/// thousands of names (`--max-names-per-ip`).
pub const MAX_NAMES_PER_IP: usize = 256;

/// Signaling connections one address may hold open. One per peer, and a campus or carrier
/// NAT puts many peers behind one address: twice the names one address may bind, so that
/// reconnects overlap; beyond, one machine could take every descriptor the server has.
pub const MAX_CONNECTIONS_PER_IP: usize = 2 * MAX_NAMES_PER_IP;

/// HTTP API connections served at once; more wait in the listen backlog.
pub const HTTP_MAX_CONNECTIONS: usize = 256;

/// Time an HTTP API client has to send a request's headers; a connection lives at most six
/// times as long. The API answers small, quick requests only.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Public client connections one published name may have open at once.
pub const PUBLIC_MAX_CONNS: usize = 256;

/// Public client connections one client IP may have open at once, over every entry.
pub const PUBLIC_MAX_CONNS_PER_IP: usize = 128;
