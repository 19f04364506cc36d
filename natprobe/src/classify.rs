//! The NAT classifier, sans-IO: what the probes saw goes in, RFC 4787 behaviour, the
//! classic NAT name and the "direct connection likely?" table come out. No socket, no
//! clock; `probe` fills the observations.
//!
//! - mapping (RFC 5780 §4.3): Test I to the primary address, Test II to the other IP
//!   (same mapping ⇒ endpoint-independent), Test III to the other IP and port (same as
//!   Test II ⇒ address-dependent, else address-and-port-dependent). Without an
//!   RFC 5780 server, two plain servers tell "same" from "varies by destination" only.
//! - filtering (§4.4), on a socket that has talked to the primary address only: an answer
//!   from the other IP and port ⇒ endpoint-independent; else an answer from the other port
//!   ⇒ address-dependent; else address-and-port-dependent.
//! - port allocation: fresh mappings keep the local port (preserved), step by a constant
//!   delta (sequential), or neither (random).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

/// The classic name of a NAT, as the JSON's `nat_type` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatType {
    /// No translation and no filtering.
    Open,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    RestrictedCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestrictedCone,
    /// The mapping depends on the destination.
    Symmetric,
    /// No STUN answer over UDP at all.
    UdpBlocked,
}

impl NatType {
    /// Every type, for the direct-connection table.
    pub const ALL: [NatType; 6] = [
        NatType::Open,
        NatType::FullCone,
        NatType::RestrictedCone,
        NatType::PortRestrictedCone,
        NatType::Symmetric,
        NatType::UdpBlocked,
    ];

    /// The JSON spelling, for text output too.
    pub fn name(self) -> &'static str {
        match self {
            NatType::Open => "open",
            NatType::FullCone => "full-cone",
            NatType::RestrictedCone => "restricted-cone",
            NatType::PortRestrictedCone => "port-restricted-cone",
            NatType::Symmetric => "symmetric",
            NatType::UdpBlocked => "udp-blocked",
        }
    }
}

/// RFC 4787 mapping or filtering behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Behaviour {
    /// The same for every destination / anyone may send in.
    EndpointIndependent,
    /// Depends on the remote IP.
    AddressDependent,
    /// Depends on the remote IP and port.
    AddressAndPortDependent,
}

impl Behaviour {
    /// The JSON spelling.
    pub fn name(self) -> &'static str {
        match self {
            Behaviour::EndpointIndependent => "endpoint-independent",
            Behaviour::AddressDependent => "address-dependent",
            Behaviour::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// How the NAT picks the public port of a new mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allocation {
    /// The public port is the local port.
    Preserved,
    /// Each new mapping's port is the last one plus a constant delta.
    Sequential,
    /// No pattern.
    Random,
}

/// How likely a direct path is with a peer behind another kind of NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Likelihood {
    /// Plain hole punching works.
    Likely,
    /// Needs port prediction or birthday punching; usually works, sometimes the relay.
    Possible,
    /// Only the relay (or TCP, when UDP is the problem).
    Unlikely,
}

/// What the mapping tests saw; `None` where a test got no answer or was not run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingObservations {
    /// The probing socket's own address.
    pub local: Option<SocketAddr>,
    /// Test I: the mapped address seen by the primary server address.
    pub primary: Option<SocketAddr>,
    /// Test II: seen by the other IP, primary port (RFC 5780 servers).
    pub alt_ip: Option<SocketAddr>,
    /// Test III: seen by the other IP and other port.
    pub alt_ip_port: Option<SocketAddr>,
    /// Seen by a second plain server (`--server` twice).
    pub second_server: Option<SocketAddr>,
    /// Seen by the primary IP's second port (a one-IP server that offers one).
    pub second_port: Option<SocketAddr>,
}

/// The mapping verdict: a behaviour, or only "it varies" when two plain servers are all
/// there is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Exactly known.
    Known(Behaviour),
    /// Varies by destination, but whether by address or by address and port is unknown.
    Varies,
    /// Not determined.
    Unknown,
}

/// Mapping behaviour from the mapping tests.
pub fn mapping(obs: &MappingObservations) -> Mapping {
    let Some(m1) = obs.primary else {
        return Mapping::Unknown;
    };
    if obs.local == Some(m1) {
        // No translation at all: the mapping cannot depend on anything.
        return Mapping::Known(Behaviour::EndpointIndependent);
    }
    match (obs.alt_ip, obs.alt_ip_port) {
        (Some(m2), _) if m2 == m1 => Mapping::Known(Behaviour::EndpointIndependent),
        (Some(m2), Some(m3)) if m3 == m2 => Mapping::Known(Behaviour::AddressDependent),
        (Some(_), Some(_)) => Mapping::Known(Behaviour::AddressAndPortDependent),
        (Some(_), None) => Mapping::Varies,
        (None, _) => match (obs.second_server, obs.second_port) {
            (Some(m), _) if m == m1 => Mapping::Known(Behaviour::EndpointIndependent),
            (Some(_), _) => Mapping::Varies,
            // Another port of the same IP: a changed mapping is port-dependent, so
            // symmetric; the same one is endpoint-independent or address-dependent, which
            // one port cannot tell apart.
            (None, Some(m)) if m != m1 => Mapping::Varies,
            (None, _) => Mapping::Unknown,
        },
    }
}

/// Filtering behaviour from the two CHANGE-REQUEST tests: `Some(answered)` for a test that
/// ran, `None` for one that could not (no RFC 5780 server).
pub fn filtering(change_ip_port: Option<bool>, change_port: Option<bool>) -> Option<Behaviour> {
    match (change_ip_port, change_port) {
        // Anyone got in: the strongest evidence, whatever the other test saw.
        (Some(true), _) => Some(Behaviour::EndpointIndependent),
        (Some(false), Some(true)) => Some(Behaviour::AddressDependent),
        (Some(false), Some(false)) => Some(Behaviour::AddressAndPortDependent),
        _ => None,
    }
}

/// The classic name from mapping and filtering; `translated` is false when the public
/// address is the machine's own.
pub fn nat_type(
    answered: bool,
    translated: bool,
    mapping: Mapping,
    filtering: Option<Behaviour>,
) -> Option<NatType> {
    use Behaviour::*;
    if !answered {
        return Some(NatType::UdpBlocked);
    }
    match (mapping, filtering) {
        (Mapping::Varies, _) | (Mapping::Known(AddressDependent | AddressAndPortDependent), _) => {
            Some(NatType::Symmetric)
        }
        (Mapping::Known(EndpointIndependent), Some(EndpointIndependent)) if !translated => {
            Some(NatType::Open)
        }
        (Mapping::Known(EndpointIndependent), Some(EndpointIndependent)) => Some(NatType::FullCone),
        (Mapping::Known(EndpointIndependent), Some(AddressDependent)) => {
            Some(NatType::RestrictedCone)
        }
        (Mapping::Known(EndpointIndependent), Some(AddressAndPortDependent)) => {
            Some(NatType::PortRestrictedCone)
        }
        (Mapping::Known(EndpointIndependent), None) | (Mapping::Unknown, _) => None,
    }
}

/// Port allocation from fresh mappings `(local port, public port)`, in the order they were
/// made: preserved when most keep their port, sequential (with the delta) when most steps
/// are equal or every step is a small multiple of the smallest, random otherwise. Neither
/// rule needs every step equal, so mappings other programs or hosts made between two of
/// ours do not hide the pattern.
pub fn allocation(fresh: &[(u16, u16)]) -> (Option<Allocation>, Option<i32>) {
    if fresh.len() < 3 {
        return (None, None);
    }
    let majority = |n: usize, of: usize| n * 3 >= of * 2;
    let kept = fresh.iter().filter(|(l, m)| l == m).count();
    if majority(kept, fresh.len()) {
        return (Some(Allocation::Preserved), None);
    }
    let steps: Vec<i32> = fresh
        .windows(2)
        .map(|w| {
            // Ports wrap: the step from 65535 to 1025 is small, not -64510.
            let d = i32::from(w[1].1) - i32::from(w[0].1);
            if d > 32768 {
                d - 65536
            } else if d < -32768 {
                d + 65536
            } else {
                d
            }
        })
        .collect();
    let mut best = (0, 0usize);
    for &s in &steps {
        let n = steps.iter().filter(|&&t| t == s).count();
        if n > best.1 {
            best = (s, n);
        }
    }
    if best.0 != 0 && best.0.abs() <= 1000 && majority(best.1, steps.len()) {
        return (Some(Allocation::Sequential), Some(best.0));
    }
    // On a busy NAT other hosts take ports between ours: every step is then a small
    // multiple of the delta (with the delta itself among them). Random ports line up like
    // that about never.
    let delta = steps
        .iter()
        .copied()
        .filter(|d| *d != 0)
        .min_by_key(|d| d.abs());
    if let Some(d) = delta
        && d.abs() <= 1000
        && steps
            .iter()
            .all(|s| s % d == 0 && (1..=MAX_GAP_MULTIPLE).contains(&(s / d)))
    {
        return (Some(Allocation::Sequential), Some(d));
    }
    (Some(Allocation::Random), None)
}

/// The largest step, in deltas, that still counts as sequential (up to three foreign
/// mappings between two of ours).
const MAX_GAP_MULTIPLE: i32 = 4;

/// How likely a direct UDP path is between `me` (with its port allocation) and a peer
/// behind `other`. The rules are chuantou's punching (peer-reflexive replies, port
/// prediction, birthday punching), as tested in the NAT lab.
pub fn direct(me: NatType, allocation: Option<Allocation>, other: NatType) -> Likelihood {
    use NatType::*;
    let easy = |t: NatType| matches!(t, Open | FullCone | RestrictedCone);
    match (me, other) {
        (UdpBlocked, _) | (_, UdpBlocked) => Likelihood::Unlikely,
        // Someone whose filter lets the other's first probe in, or who answers the
        // probe's real source: plain punching works.
        (a, b) if easy(a) || easy(b) => Likelihood::Likely,
        (PortRestrictedCone, PortRestrictedCone) => Likelihood::Likely,
        // A port-restricted cone against a symmetric NAT: port prediction (sequential) or
        // birthday punching (random).
        (PortRestrictedCone, Symmetric) | (Symmetric, PortRestrictedCone) => Likelihood::Possible,
        // Both symmetric: only prediction can work, and only if ours is predictable.
        (Symmetric, Symmetric) => match allocation {
            Some(Allocation::Sequential) => Likelihood::Possible,
            _ => Likelihood::Unlikely,
        },
        _ => Likelihood::Unlikely,
    }
}

/// The whole direct-connection table for `me`.
pub fn direct_table(me: NatType, allocation: Option<Allocation>) -> BTreeMap<NatType, Likelihood> {
    NatType::ALL
        .into_iter()
        .map(|other| (other, direct(me, allocation, other)))
        .collect()
}

/// The mapping lifetime search's result (RFC 5780 §4.6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lifetime {
    /// The oldest age, in seconds, at which a mapping still worked.
    pub alive_at: Option<f64>,
    /// The youngest age at which one had gone.
    pub gone_at: Option<f64>,
}

impl Lifetime {
    /// The best estimate in seconds: the middle of the bracket; the lower bound when no
    /// mapping died within the search; `None` when even the first check failed.
    pub fn estimate(&self) -> Option<f64> {
        match (self.alive_at, self.gone_at) {
            (Some(a), Some(g)) => Some(((a + g) / 2.0 * 10.0).round() / 10.0),
            (Some(a), None) => Some(a),
            (None, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Behaviour::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Observations a NAT with `mapping` would give: public ports differ per destination
    /// as the behaviour says.
    fn seen(m: Behaviour, translated: bool) -> MappingObservations {
        let local = a("198.19.1.2:5000");
        let p1 = if translated {
            a("198.18.1.1:5000")
        } else {
            local
        };
        let (p2, p3) = match m {
            EndpointIndependent => (p1, p1),
            AddressDependent => (a("198.18.1.1:6000"), a("198.18.1.1:6000")),
            AddressAndPortDependent => (a("198.18.1.1:6000"), a("198.18.1.1:6001")),
        };
        MappingObservations {
            local: Some(local),
            primary: Some(p1),
            alt_ip: Some(p2),
            alt_ip_port: Some(p3),
            second_server: None,
            second_port: None,
        }
    }

    fn answers(f: Behaviour) -> (Option<bool>, Option<bool>) {
        match f {
            EndpointIndependent => (Some(true), Some(true)),
            AddressDependent => (Some(false), Some(true)),
            AddressAndPortDependent => (Some(false), Some(false)),
        }
    }

    #[test]
    fn every_mapping_and_filtering_combination_gets_its_name() {
        let all = [
            EndpointIndependent,
            AddressDependent,
            AddressAndPortDependent,
        ];
        for m in all {
            for f in all {
                let obs = seen(m, true);
                let got_m = mapping(&obs);
                assert_eq!(got_m, Mapping::Known(m));
                let (ipp, p) = answers(f);
                let got_f = filtering(ipp, p);
                assert_eq!(got_f, Some(f));
                let want = match (m, f) {
                    (EndpointIndependent, EndpointIndependent) => NatType::FullCone,
                    (EndpointIndependent, AddressDependent) => NatType::RestrictedCone,
                    (EndpointIndependent, AddressAndPortDependent) => NatType::PortRestrictedCone,
                    _ => NatType::Symmetric,
                };
                assert_eq!(
                    nat_type(true, true, got_m, got_f),
                    Some(want),
                    "{m:?} {f:?}"
                );
            }
        }
    }

    #[test]
    fn no_translation_is_open_or_a_filtering_firewall() {
        for (f, want) in [
            (EndpointIndependent, NatType::Open),
            (AddressDependent, NatType::RestrictedCone),
            (AddressAndPortDependent, NatType::PortRestrictedCone),
        ] {
            let mut obs = seen(EndpointIndependent, false);
            // Without translation, even a missing Test II cannot make the mapping unknown.
            obs.alt_ip = None;
            obs.alt_ip_port = None;
            let m = mapping(&obs);
            assert_eq!(m, Mapping::Known(EndpointIndependent));
            let (ipp, p) = answers(f);
            assert_eq!(nat_type(true, false, m, filtering(ipp, p)), Some(want));
        }
    }

    #[test]
    fn silence_is_udp_blocked_and_missing_tests_stay_unknown() {
        assert_eq!(
            nat_type(false, true, Mapping::Unknown, None),
            Some(NatType::UdpBlocked)
        );
        // A plain server: no filtering tests, a single server: nothing to name.
        let obs = MappingObservations {
            local: Some(a("198.19.1.2:5000")),
            primary: Some(a("198.18.1.1:5000")),
            ..Default::default()
        };
        assert_eq!(mapping(&obs), Mapping::Unknown);
        assert_eq!(filtering(None, None), None);
        assert_eq!(filtering(Some(false), None), None);
        assert_eq!(nat_type(true, true, Mapping::Unknown, None), None);
        // Endpoint-independent but no filtering tests: a cone, but which one is unknown.
        assert_eq!(
            nat_type(true, true, Mapping::Known(EndpointIndependent), None),
            None
        );
    }

    #[test]
    fn two_plain_servers_tell_same_from_varying() {
        let mut obs = MappingObservations {
            local: Some(a("198.19.1.2:5000")),
            primary: Some(a("198.18.1.1:5000")),
            second_server: Some(a("198.18.1.1:5000")),
            ..Default::default()
        };
        assert_eq!(mapping(&obs), Mapping::Known(EndpointIndependent));
        obs.second_server = Some(a("198.18.1.1:5001"));
        assert_eq!(mapping(&obs), Mapping::Varies);
        assert_eq!(
            nat_type(true, true, Mapping::Varies, None),
            Some(NatType::Symmetric)
        );
    }

    #[test]
    fn a_second_port_of_one_server_tells_a_symmetric_nat_only() {
        let mut obs = MappingObservations {
            local: Some(a("198.19.1.2:5000")),
            primary: Some(a("198.18.1.1:5000")),
            second_port: Some(a("198.18.1.1:5007")),
            ..Default::default()
        };
        assert_eq!(mapping(&obs), Mapping::Varies);
        // The same mapping: endpoint-independent or address-dependent, not told apart.
        obs.second_port = obs.primary;
        assert_eq!(mapping(&obs), Mapping::Unknown);
    }

    #[test]
    fn a_stranger_getting_in_outweighs_a_lost_change_port_answer() {
        assert_eq!(
            filtering(Some(true), Some(false)),
            Some(EndpointIndependent)
        );
    }

    #[test]
    fn port_allocation_patterns() {
        let preserved = [(4000, 4000), (4100, 4100), (4200, 4200), (4300, 4300)];
        assert_eq!(allocation(&preserved), (Some(Allocation::Preserved), None));
        for delta in [1i32, 2, 3, 7, -1, 1000] {
            let fresh: Vec<(u16, u16)> = (0..5)
                .map(|k| (4000 + k, (30000 + delta * i32::from(k)) as u16))
                .collect();
            assert_eq!(
                allocation(&fresh),
                (Some(Allocation::Sequential), Some(delta)),
                "delta {delta}"
            );
        }
        // Wrapping around the top of the port range is still a step of 2.
        let wrap = [(1, 65532), (2, 65534), (3, 0), (4, 2), (5, 4)];
        assert_eq!(allocation(&wrap), (Some(Allocation::Sequential), Some(2)));
        // One foreign mapping in between (a step of 2 among steps of 1) keeps the pattern.
        let noisy = [(1, 100), (2, 101), (3, 103), (4, 104), (5, 105)];
        assert_eq!(allocation(&noisy), (Some(Allocation::Sequential), Some(1)));
        // A busy NAT: other hosts' mappings between ours at most steps; still delta 3.
        let busy = [(1, 2000), (2, 2006), (3, 2009), (4, 2018), (5, 2021)];
        assert_eq!(allocation(&busy), (Some(Allocation::Sequential), Some(3)));
        // Small steps that are not multiples of one another, or going both ways: random.
        let ragged = [(1, 2000), (2, 2003), (3, 2008), (4, 2015), (5, 2017)];
        assert_eq!(allocation(&ragged), (Some(Allocation::Random), None));
        let back_and_forth = [(1, 2000), (2, 2003), (3, 2000), (4, 2006), (5, 2003)];
        assert_eq!(
            allocation(&back_and_forth),
            (Some(Allocation::Random), None)
        );
        let random = [(1, 31234), (2, 50123), (3, 2291), (4, 40001), (5, 17000)];
        assert_eq!(allocation(&random), (Some(Allocation::Random), None));
        assert_eq!(allocation(&random[..2]), (None, None));
    }

    #[test]
    fn direct_table_follows_the_punching_rules() {
        use Likelihood::*;
        use NatType::*;
        // Symmetric in the table is about `me`; each pair must agree in both directions
        // except where our own allocation is what decides.
        for me in NatType::ALL {
            for other in NatType::ALL {
                if me != Symmetric && other != Symmetric {
                    assert_eq!(
                        direct(me, None, other),
                        direct(other, None, me),
                        "{me:?} {other:?}"
                    );
                }
            }
        }
        assert_eq!(direct(FullCone, None, Symmetric), Likely);
        assert_eq!(direct(RestrictedCone, None, Symmetric), Likely);
        assert_eq!(direct(PortRestrictedCone, None, Symmetric), Possible);
        assert_eq!(
            direct(Symmetric, Some(Allocation::Random), Symmetric),
            Unlikely
        );
        assert_eq!(
            direct(Symmetric, Some(Allocation::Sequential), Symmetric),
            Possible
        );
        assert_eq!(direct(Open, None, UdpBlocked), Unlikely);
        assert_eq!(direct_table(Open, None).len(), 6);
    }

    #[test]
    fn lifetime_estimates() {
        let l = |a, g| Lifetime {
            alive_at: a,
            gone_at: g,
        };
        assert_eq!(l(Some(4.6), Some(5.0)).estimate(), Some(4.8));
        assert_eq!(l(Some(150.0), None).estimate(), Some(150.0));
        assert_eq!(l(None, Some(1.0)).estimate(), None);
    }
}
