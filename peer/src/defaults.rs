//! Every timing constant of the peer in one place, each with the reason for its value.
//! The punch agents keep their protocol timings in their own `Timing` structs (they are
//! parameters of a sans-IO core and tested in virtual time); everything the shells and the
//! session wait for is here.

use std::time::Duration;

/// How long to wait for the relay to pair us with the other peer. The other side hears of
/// the session through its own signaling connection, which may be slow to wake on a phone.
pub const RELAY_JOIN: Duration = Duration::from_secs(30);

/// How often a UDP relay hello is repeated until the relay says both halves are in.
pub const RELAY_UDP_HELLO: Duration = Duration::from_millis(250);

/// How often a relay joined over UDP hears our hello again: when our NAT gives the relay
/// socket a new mapping, the relay moves the session to it at the next hello (once the old
/// address has been quiet for a second), so this bounds the relay's part of the stall.
pub const RELAY_REHELLO: Duration = Duration::from_secs(1);

/// The session's QUIC handshake over its first path (a round trip or two); past this the
/// path is taken for broken and the next one that comes up is tried.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// How long `reach` waits for the exposing side to open the session after the broker
/// exchange: the relay join plus the handshake, or a punch without a relay.
pub const SESSION_OPEN: Duration = Duration::from_secs(40);

/// Keep-alive on every path: the lab's and many home routers' UDP mappings last 30–60 s
/// (RFC 4787 asks for at least 2 minutes), and a silent direct path must be noticed within
/// a few seconds, so each path is probed often; a keep-alive costs about 50 bytes.
pub const PATH_KEEPALIVE: Duration = Duration::from_millis(500);

/// A direct path that has received nothing for this long is abandoned and its traffic
/// moves to the next path. Four keep-alives lost in a row: long enough not to flap on a
/// lossy link, short enough that an interactive connection stalls for under 3 s.
pub const DIRECT_PATH_IDLE: Duration = Duration::from_millis(2_000);

/// The whole session ends when no path has carried anything for this long (QUIC never
/// abandons the last path: this is what ends a session whose every path died). Twenty
/// keep-alives lost; then new connections are brokered afresh instead of stalling.
pub const SESSION_IDLE: Duration = Duration::from_secs(10);

/// After a direct path is lost, the first re-punch waits this long (the NAT may be
/// rebooting, the network changing) and each further one twice as long …
pub const REPUNCH_FIRST: Duration = Duration::from_secs(1);

/// … up to this.
pub const REPUNCH_MAX: Duration = Duration::from_secs(30);

/// How soon a path QUIC could not open yet (the other side has not issued the ids for one
/// more path, which takes a round trip) is asked for again.
pub const PATH_RETRY: Duration = Duration::from_millis(50);

/// Paths one session may have at once: the relay, direct UDP, direct TCP, and room for a
/// new direct path to come up before the old one is abandoned.
pub const MAX_PATHS: u32 = 8;

/// The largest QUIC datagram we accept and probe for (path MTU discovery climbs from 1,200
/// towards it; on internet paths it settles near 1,452, on loopback, LANs with jumbo
/// frames and links over TCP it climbs further). Larger datagrams mean fewer system calls
/// and packets per byte: on loopback, 1,472 (QUIC's default) gave 4.6 Gbit/s on direct UDP
/// and 1.4 on the relay, 6,144 gave 6.2–7.1 and 3.4. Past 6 KiB, direct UDP fell back to
/// about 4 Gbit/s (noq then builds GSO batches of only two datagrams), so this is where it
/// stays. noq's receive buffer grows linearly with it (a few MiB of address space).
pub const MAX_UDP_PAYLOAD: u16 = 6144;

/// How often `peer status` figures and the active path are refreshed from the session.
pub const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// How long a punched UDP responder keeps answering probes after agreeing, so a
/// nomination whose ack was lost is acknowledged again.
pub const PUNCH_LINGER: Duration = Duration::from_secs(3);

/// A datagram link (relay or punched TCP) holds at most this many datagrams waiting to be
/// written; beyond it they are dropped, as a full UDP socket buffer would, and QUIC's
/// congestion control slows down.
pub const LINK_QUEUE: usize = 2048;

/// A UDP flow with no datagram either way for this long is closed (UDP has no end marker;
/// most UDP services, DNS or game traffic, are done or re-sending well within a minute).
pub const FLOW_IDLE: Duration = Duration::from_secs(60);

/// How long a re-punch is given to bring a direct path back before the next one is asked
/// for (a punch gives up after 5 s).
pub const REPUNCH_SETTLE: Duration = Duration::from_secs(6);

/// Reconnecting to the rendezvous backs off from this …
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);

/// … doubling up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How often the UDP mapping is observed again: under half of common 30–60 s NAT
/// timeouts, so the mapping the rendezvous hands out stays the live one.
pub const UDP_REFRESH: Duration = Duration::from_secs(12);

/// How long one STUN refresh waits for its answer before asking again (loopback to a
/// far-away server is well under this; three tries per refresh).
pub const STUN_ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// How long the STUN Binding over TCP that observes the TCP port's latest mapping may take.
pub const TCP_STUN_WITHIN: Duration = Duration::from_secs(3);

/// How long a connection accepted on the TCP port may take to send its first probe.
pub const FIRST_PROBE_WITHIN: Duration = Duration::from_secs(3);

/// After a failed accept (out of descriptors and the like) the TCP port pauses this long
/// rather than spin.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// TCP keepalive on a punched connection starts after this much silence …
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// … and probes this often.
pub const TCP_KEEPALIVE_EVERY: Duration = Duration::from_secs(10);

/// Runtime worker threads of a `peer` process (`TOKIO_WORKER_THREADS` overrides it). A
/// session's bytes go through one QUIC connection driver; with one worker they never hop
/// between cores on the way. Measured on a 2-core machine, one connection through a
/// session on loopback: 4.63 Gbit/s with one worker against 3.09 with two.
pub const WORKER_THREADS: usize = 1;

/// QUIC handshakes a peer lets wait at once. A peer expects a handshake only from a peer
/// the rendezvous brokered (one per session, so a few at a time); stray or forged Initials
/// beyond this are refused at once instead of each holding state.
pub const MAX_INCOMING: usize = 16;
/// Bytes buffered for one waiting handshake, and for all of them together.
pub const INCOMING_BUFFER: u64 = 64 * 1024;
/// See [`INCOMING_BUFFER`].
pub const INCOMING_BUFFER_TOTAL: u64 = 1024 * 1024;

/// Sessions an exposer serves at once (live or being set up), one per reaching key: each
/// costs a relay half and punch probes, so a flood of brokered keys is held here.
pub const MAX_SESSIONS: usize = 256;

/// How long the credentialed STUN Binding right after registering may take. The server
/// answered this socket a moment before, so a longer silence means it went away (a
/// restart mid-registration): waiting out the full RFC 8489 schedule (39.5 s) would keep
/// the peer from noticing and coming back; the refresher observes the mapping later.
pub const REGISTERED_STUN_WITHIN: Duration = Duration::from_secs(5);

/// How long registration waits for the STUN answer in the other address family (IPv6
/// beside IPv4): a round trip to the rendezvous, not a host's missing way out (an
/// IPv6-only host's IPv4), which the refresher keeps asking about in the background.
pub const ALT_STUN_WITHIN: Duration = Duration::from_millis(300);

/// How long a stopping peer waits for its sessions' closes to go out (a close is a packet
/// or two; a drained endpoint on loopback takes a few milliseconds, over the internet a
/// few round trips). The other side then ends its connections at once instead of after
/// [`SESSION_IDLE`].
pub const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// How long a closed session keeps its links (relay, punched TCP) so that its own close,
/// queued on one of them, is written out before the link goes.
pub const LINK_LINGER: Duration = Duration::from_millis(250);

/// Public clients one exposer carries at once (the rendezvous allows 256 per service).
pub const MAX_PUBLIC_CONNS: usize = 512;

/// Time to join the relay session of a public client.
pub const PUBLIC_JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Sessions are reported to the rendezvous at least this often (and at once when a path
/// changes), so its dashboard's byte counts stay fresh.
pub const REPORT_REFRESH: Duration = Duration::from_secs(10);

/// A public UDP flow silent this long is dropped (the rendezvous drops it after as long).
pub const PUBLIC_UDP_IDLE: Duration = Duration::from_secs(60);
