//! Every timing natprobe uses, in one place, each with the reason for its value.

use std::time::Duration;

pub use wire::stun::transaction::Timing;

/// Initial retransmission timeout. RFC 8489 §6.2.1 recommends 500 ms when the path's RTT
/// is unknown: long enough for a distant server, short enough for a quick verdict.
pub const RTO: Duration = Duration::from_millis(500);

/// Requests sent per transaction (RFC 8489's Rc, 7 there). natprobe waits on several
/// transactions whose *absence* of an answer is the result (filtering, hairpin), so it
/// sends 4 (at 0, 0.5, 1.5 and 3.5 s): four losses in a row are rare on a working path,
/// and a silent one gives its verdict in 5.5 s instead of 39.5 s.
pub const RC: u32 = 4;

/// After the last request, wait this many RTOs for an answer (RFC 8489's Rm, 16 there);
/// 4 × 500 ms keeps the whole transaction at 5.5 s.
pub const RM: u32 = 4;

/// Fresh mappings opened to measure port allocation: 5 give 4 steps, enough for a
/// majority to show a constant delta.
pub const FRESH_MAPPINGS: usize = 5;

/// Mapping lifetime search (RFC 5780 §4.6): mappings are opened together and checked one
/// by one at growing ages, each 10 % older than the last, so the lifetime is bracketed
/// within ±5 % and the search takes about as long as the lifetime itself.
pub const LIFETIME_FIRST: Duration = Duration::from_secs(1);
/// Ratio between the ages of consecutive checks.
pub const LIFETIME_STEP: f64 = 1.1;
/// The longest lifetime searched for by default; RFC 4787 REQ-5 asks NATs for at least
/// 2 minutes, so a mapping that lives this long is "long enough" for any keepalive.
pub const LIFETIME_MAX: Duration = Duration::from_secs(150);

/// The standard STUN port (RFC 8489 §18.6), used when `--server` gives none.
pub const STUN_PORT: u16 = 3478;

/// natprobe's retransmission timing: [`RTO`], [`RC`], [`RM`].
pub fn timing() -> Timing {
    Timing {
        rto: RTO,
        rc: RC,
        rm: RM,
    }
}
