//! Which path carries a session's traffic now: pure logic, no I/O. The chosen path is
//! marked `Available` to QUIC and every other one `Backup`, so QUIC sends on the chosen one
//! and keeps the others alive and validated for the moment it is lost.
//!
//! The rule, as tailscale and iroh have it: a direct path beats the relay whatever their
//! round trips (the relay costs someone bandwidth and adds a hop); among paths of one tier
//! UDP beats TCP (no head-of-line blocking under QUIC's own loss recovery), and among
//! paths of one kind the lower round trip wins, with a margin so that jitter cannot make
//! traffic flap between two similar paths.

use std::time::Duration;

use super::PathKind;

/// A new path must be this much faster than the chosen one of the same kind to take over.
pub const SWITCH_MARGIN: Duration = Duration::from_millis(5);

/// What the chooser knows of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<Id> {
    /// The path.
    pub id: Id,
    /// What carries it.
    pub kind: PathKind,
    /// Its smoothed round trip, once measured.
    pub rtt: Option<Duration>,
}

/// The path to carry traffic among `paths`, given the one carrying it now (`current`) and
/// which kinds are allowed at all; `None` when no allowed path is left.
pub fn choose<Id: Copy + PartialEq>(
    paths: &[Candidate<Id>],
    current: Option<Id>,
    allowed: impl Fn(PathKind) -> bool,
) -> Option<Id> {
    let rtt = |c: &Candidate<Id>| c.rtt.unwrap_or(Duration::MAX);
    let best = paths
        .iter()
        .filter(|c| allowed(c.kind))
        .min_by_key(|c| (c.kind, rtt(c)))?;
    if let Some(cur) = current.and_then(|id| paths.iter().find(|c| c.id == id))
        && allowed(cur.kind)
        && cur.kind == best.kind
        && rtt(best).saturating_add(SWITCH_MARGIN) > rtt(cur)
    {
        return Some(cur.id);
    }
    Some(best.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u32, kind: PathKind, rtt_ms: u64) -> Candidate<u32> {
        Candidate {
            id,
            kind,
            rtt: Some(Duration::from_millis(rtt_ms)),
        }
    }

    #[test]
    fn a_direct_path_beats_a_faster_relay() {
        let paths = [c(0, PathKind::Relay, 2), c(1, PathKind::DirectUdp, 40)];
        assert_eq!(choose(&paths, Some(0), |_| true), Some(1));
    }

    #[test]
    fn udp_beats_tcp_and_the_relay_over_udp_beats_it_over_tcp() {
        let paths = [
            c(0, PathKind::RelayTcp, 1),
            c(1, PathKind::Relay, 9),
            c(2, PathKind::DirectTcp, 3),
        ];
        assert_eq!(choose(&paths, None, |_| true), Some(2));
        assert_eq!(choose(&paths[..2], None, |_| true), Some(1));
        let with_udp = [paths[2], c(3, PathKind::DirectUdp, 8)];
        assert_eq!(choose(&with_udp, Some(2), |_| true), Some(3));
    }

    #[test]
    fn the_chosen_path_stays_unless_another_of_its_kind_is_clearly_faster() {
        let paths = [c(0, PathKind::DirectUdp, 20), c(1, PathKind::DirectUdp, 17)];
        assert_eq!(choose(&paths, Some(0), |_| true), Some(0), "3 ms is jitter");
        let paths = [c(0, PathKind::DirectUdp, 20), c(1, PathKind::DirectUdp, 10)];
        assert_eq!(choose(&paths, Some(0), |_| true), Some(1));
        // An unmeasured path does not take over from a measured one.
        let fresh = Candidate {
            id: 2,
            kind: PathKind::DirectUdp,
            rtt: None,
        };
        assert_eq!(choose(&[paths[0], fresh], Some(0), |_| true), Some(0));
    }

    #[test]
    fn losing_the_chosen_path_falls_back_and_forbidden_kinds_are_never_chosen() {
        let paths = [c(0, PathKind::Relay, 5)];
        assert_eq!(choose(&paths, Some(7), |_| true), Some(0));
        let no_relay = |k: PathKind| k.is_direct();
        assert_eq!(choose(&paths, None, no_relay), None);
        let both = [c(0, PathKind::Relay, 5), c(1, PathKind::DirectTcp, 9)];
        assert_eq!(choose(&both, Some(0), no_relay), Some(1));
        assert_eq!(choose::<u32>(&[], None, |_| true), None);
    }
}
