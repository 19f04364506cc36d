//! How to punch, from what each side knows of its NAT (natprobe's classification, carried
//! in the broker message): the sockets to open, the remote candidates in the order to try
//! them (predicted ports first), birthday spraying, or straight to the relay when no
//! direct path can work. Pure: the matrix of every NAT pair is unit tested.
//!
//! # The hardest pair: random symmetric ↔ sequential symmetric
//!
//! Neither side can tell the other where its next packet will come from, but the
//! sequential side S can say where its next mappings will be: its j-th new mapping gets
//! port sⱼ = s₀ + j·δ. So S *sprays*: request j goes from its one socket to a random port
//! tⱼ of the random side R's IP, and takes the mapping sⱼ, which lets in only packets from
//! R's IP and port tⱼ. R *sweeps*: each of its K sockets sends one request to each
//! predicted port sⱼ, and each such packet gets a fresh random mapping on R's NAT, one of
//! P = 64,512 ports. The pair (socket, sⱼ) works when R's NAT happened to give it port tⱼ:
//! then S's request j comes in on it, or R's request gets in through S's mapping sⱼ,
//! whichever arrives second (the first one is dropped harmlessly).
//!
//! With J predicted ports and K sockets, R makes J·K mappings, each hitting with
//! probability 1/P, so a round succeeds with probability p = 1 − (1 − 1/P)^(J·K) ≈
//! 1 − e^(−J·K/P), for J·K + J probes. The budget is per round: J = [`HARD_PORTS`] = 390
//! and K = [`HARD_SOCKETS`] = 256 make 99,840 sweep probes plus 390 spray probes, under
//! 100,000 + 400, for p ≈ 1 − e^(−1.55) = 0.79. Up to [`HARD_ROUNDS`] = 3 rounds run
//! back to back on the next predicted ports, each with the same budget, until a pair
//! answers: 1 − e^(−3.09) = 0.955 after two, 1 − e^(−4.64) = 0.990 after three (a single
//! round of 90 % would need J·K ≈ 148,500). Which packet of a pair arrives first does not
//! matter, so S sprays all its rounds at once (1,170 requests, 1 ms apart) and R sweeps
//! as fast as it can, at most [`HARD_BURST`] requests per millisecond (50,000 packets/s,
//! about 32 Mbit/s of 81-byte probes, 2 s a round). The punch gives up after
//! [`HARD_GIVE_UP`]; the relay carries the session meanwhile.
//! random ↔ random has no predictable side: without a port mapping it stays on the relay.

use std::net::{IpAddr, SocketAddr};

use natprobe::classify::{Allocation, NatType};

use crate::punch::udp::{BIRTHDAY_SOCKETS, Rounds, SPRAY_EVERY, SPRAY_PROBES, Spray, Sweep};

/// Sockets of the random side in prediction × birthday (K in the module doc).
pub const HARD_SOCKETS: usize = 256;
/// Predicted ports of the sequential side per round (J in the module doc).
pub const HARD_PORTS: usize = 390;
/// Rounds of prediction × birthday.
pub const HARD_ROUNDS: u32 = 3;
/// Sweep requests per millisecond.
pub const HARD_BURST: u32 = 50;

// The budget of the module doc, held at compile time: at most 100,000 sweep probes a round.
const _: () = assert!(HARD_PORTS * HARD_SOCKETS <= 100_000);
/// When a prediction × birthday punch gives up: three rounds at a slow machine's rate
/// (25,000 requests/s) take 12 s.
pub const HARD_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(13);

/// The rounds of prediction × birthday, the same on both sides: back to back.
pub const HARD: Rounds = Rounds {
    count: HARD_ROUNDS,
    every: std::time::Duration::ZERO,
};

/// Ports predicted past a sequential NAT's observed one. Prediction pairs the k-th new
/// mapping of each side, so a few spare guesses absorb mappings other programs made
/// meanwhile.
pub const PREDICTED_PORTS: i32 = 8;

/// What one side knows of its NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatProfile {
    /// The classic name; `None` when unknown (treated as a port-restricted cone).
    pub nat_type: Option<NatType>,
    /// How its ports are allocated.
    pub allocation: Option<Allocation>,
    /// The step of a sequential allocation.
    pub delta: Option<i32>,
}

impl NatProfile {
    fn kind(&self) -> NatType {
        self.nat_type.unwrap_or(NatType::PortRestrictedCone)
    }

    fn random_symmetric(&self) -> bool {
        self.kind() == NatType::Symmetric && !self.sequential()
    }

    fn sequential(&self) -> bool {
        self.kind() == NatType::Symmetric
            && self.allocation == Some(Allocation::Sequential)
            && self.delta.is_some_and(|d| d != 0)
    }
}

/// The plan for one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// Punch.
    Direct {
        /// UDP sockets to open (more than 1 only on the hard side of birthday mode).
        sockets: usize,
        /// The other side's candidates, in order.
        remote: Vec<SocketAddr>,
        /// Birthday spraying towards the other side's IP (the easy side).
        spray: Option<Spray>,
        /// Prediction × birthday sweep (the random side facing a sequential one).
        sweep: Option<Sweep>,
        /// Rounds of spray or sweep.
        rounds: Rounds,
        /// Why this way, for the log.
        why: String,
    },
    /// No direct path can work; use the relay.
    Relay {
        /// Why, for the log ("symmetric ↔ symmetric").
        why: String,
    },
}

fn name(p: &NatProfile) -> &'static str {
    match p.nat_type {
        None => "unknown NAT",
        Some(NatType::Symmetric) if p.sequential() => "sequential symmetric",
        Some(NatType::Symmetric) => "random symmetric",
        Some(t) => t.name(),
    }
}

/// Two symmetric NATs of which one is random: each side's packets leave from a port the
/// other cannot know, and neither lets in an unknown one. (For UDP, random ↔ sequential
/// has prediction × birthday; see the module doc.)
fn hopeless(me: &NatProfile, peer: &NatProfile) -> bool {
    me.kind() == NatType::Symmetric
        && peer.kind() == NatType::Symmetric
        && (me.random_symmetric() || peer.random_symmetric())
}

/// A port its gateway mapped (PCP, NAT-PMP, UPnP): whatever the NAT does to other
/// traffic, that port takes packets from anyone, as a full cone's does.
const MAPPED: NatProfile = NatProfile {
    nat_type: Some(NatType::FullCone),
    allocation: Some(Allocation::Preserved),
    delta: None,
};

/// Port mappings on either side: whether our gateway mapped our UDP endpoint, and the
/// other side's mapped address if its gateway did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mappings {
    /// Our endpoint has a mapping (the other side is told its address).
    pub mine: bool,
    /// The other side's mapped address.
    pub peer: Option<SocketAddr>,
}

/// Plans this side's punch. `peer_observed` is the other side's UDP address as the
/// rendezvous saw it, `peer_lan` its LAN addresses, `peer_between` how many UDP mappings
/// it makes before its first probe (1 when it joins the relay over UDP, which it does as
/// soon as it hears of the session: past a sequential NAT that mapping takes the next
/// port, so prediction starts after it and tries it last).
///
/// A port mapping turns its side into a full cone for this purpose: the other side's
/// probes to the mapped address get in from whatever port its NAT picks, and the answers
/// go back through the mapping. So a mapping on either side makes every pair punchable,
/// random symmetric ↔ random symmetric included.
pub fn plan(
    me: &NatProfile,
    peer: &NatProfile,
    peer_observed: Option<SocketAddr>,
    peer_lan: &[SocketAddr],
    peer_between: i32,
    mapped: Mappings,
) -> Strategy {
    let (me, peer) = (
        if mapped.mine { &MAPPED } else { me },
        if mapped.peer.is_some() { &MAPPED } else { peer },
    );
    let pair = match (mapped.mine, mapped.peer.is_some()) {
        (false, false) => format!("{} ↔ {}", name(me), name(peer)),
        (true, false) => format!("port mapping here ↔ {}", name(peer)),
        (_, true) => "port mapping there".to_owned(),
    };
    if me.kind() == NatType::UdpBlocked || peer.kind() == NatType::UdpBlocked {
        return Strategy::Relay {
            why: format!("UDP blocked ({pair})"),
        };
    }
    if me.random_symmetric() && peer.sequential() {
        // The sweep: every socket to each of the peer's next mappings, round by round.
        let Some(obs) = peer_observed else {
            return Strategy::Relay {
                why: format!("no UDP address known for the other side ({pair})"),
            };
        };
        let count = HARD_PORTS * HARD_ROUNDS as usize;
        return Strategy::Direct {
            sockets: HARD_SOCKETS,
            remote: predicted_n(peer, obs, peer_between, count),
            spray: None,
            sweep: Some(Sweep {
                per_round: HARD_PORTS,
                burst: HARD_BURST,
            }),
            rounds: HARD,
            why: format!("prediction × birthday, {HARD_SOCKETS} sockets ({pair})"),
        };
    }
    if me.sequential() && peer.random_symmetric() {
        // The spray: each request takes our next mapping towards a random port of theirs.
        let Some(IpAddr::V4(ip)) = peer_observed.map(|a| a.ip()) else {
            return Strategy::Relay {
                why: format!("no IPv4 address known for the other side ({pair})"),
            };
        };
        return Strategy::Direct {
            sockets: 1,
            remote: Vec::new(),
            spray: Some(Spray {
                ip,
                probes: HARD_PORTS as u32,
                every: SPRAY_EVERY,
            }),
            sweep: None,
            rounds: HARD,
            why: format!("prediction × birthday, spraying ({pair})"),
        };
    }
    if hopeless(me, peer) {
        return Strategy::Relay { why: pair };
    }
    let mut remote = Vec::new();
    if let Some(m) = mapped.peer {
        // The mapped port first: it takes our probes whatever port they leave from.
        remote.push(m);
    }
    if let Some(obs) = peer_observed.filter(|o| Some(*o) != mapped.peer) {
        // The k-th new mapping of the peer lands k·delta past the observed port.
        remote.extend(after(peer, obs, peer_between));
    }
    // LAN candidates last: they matter only when both sit behind the same NAT, and on a
    // sequential NAT a packet to a foreign private address could take a mapping.
    for a in peer_lan {
        if !remote.contains(a) {
            remote.push(*a);
        }
    }
    let filters_ports = matches!(me.kind(), NatType::PortRestrictedCone);
    let peer_filters_ports = matches!(peer.kind(), NatType::PortRestrictedCone);
    let (sockets, spray, why) = if me.random_symmetric() && peer_filters_ports {
        (
            BIRTHDAY_SOCKETS,
            None,
            format!("birthday, {BIRTHDAY_SOCKETS} sockets ({pair})"),
        )
    } else if filters_ports && peer.random_symmetric() {
        let spray = match peer_observed.map(|a| a.ip()) {
            Some(IpAddr::V4(ip)) => Some(Spray {
                ip,
                probes: SPRAY_PROBES,
                every: SPRAY_EVERY,
            }),
            _ => None,
        };
        (1, spray, format!("birthday, spraying ({pair})"))
    } else if peer.sequential() || me.sequential() {
        (1, None, format!("port prediction ({pair})"))
    } else {
        (1, None, pair)
    };
    Strategy::Direct {
        sockets,
        remote,
        spray,
        sweep: None,
        rounds: Rounds::default(),
        why,
    }
}

/// Plans this side's TCP punch: simultaneous open from the one TCP port towards the other
/// side's TCP candidates (its latest mapping, predicted ones first past a sequential NAT).
/// TCP has no birthday mode, so a random symmetric NAT facing another symmetric one goes
/// to the relay; facing a cone it is tried, and works where that cone does not filter by
/// port (full cone, address-restricted) — filtering is not measured, so it is tried.
///
/// `peer_between` is how many TCP mappings the other side makes between its observed one
/// and its first punch connect: 1 when the session has a relay, whose connection both
/// sides open before punching. Past a sequential NAT those mappings take the ports next in
/// line, so prediction starts after them (and tries them last).
pub fn plan_tcp(
    me: &NatProfile,
    peer: &NatProfile,
    peer_observed: Option<SocketAddr>,
    peer_between: i32,
) -> Strategy {
    let pair = format!("{} ↔ {}", name(me), name(peer));
    let Some(obs) = peer_observed else {
        return Strategy::Relay {
            why: format!("no TCP address known for the other side ({pair})"),
        };
    };
    if hopeless(me, peer) {
        return Strategy::Relay { why: pair };
    }
    let remote = after(peer, obs, peer_between);
    let why = if peer.sequential() || me.sequential() {
        format!("port prediction ({pair})")
    } else {
        pair
    };
    Strategy::Direct {
        sockets: 1,
        remote,
        spray: None,
        sweep: None,
        rounds: Rounds::default(),
        why,
    }
}

/// The candidates past `obs`: the ports a sequential NAT hands out after `between` more
/// mappings first, then those `between` ones, then `obs` itself.
fn after(peer: &NatProfile, obs: SocketAddr, between: i32) -> Vec<SocketAddr> {
    let mut remote = predicted(peer, obs, between);
    for a in predicted(peer, obs, 0)
        .into_iter()
        .take(usize::try_from(between).unwrap_or(0))
    {
        if !remote.contains(&a) {
            remote.push(a);
        }
    }
    remote.push(obs);
    remote
}

/// The ports a sequential NAT will hand out next, past `obs` and `skip` more mappings.
fn predicted(peer: &NatProfile, obs: SocketAddr, skip: i32) -> Vec<SocketAddr> {
    predicted_n(peer, obs, skip, PREDICTED_PORTS as usize)
}

/// The `n` ports a sequential NAT hands out next, past `obs` and `skip` more mappings.
/// Past either end of 1024–65535 the count wraps around the range, as Linux and most
/// NATs that walk their ports do; a NAT that wraps elsewhere costs only the ports past
/// its wrap.
fn predicted_n(peer: &NatProfile, obs: SocketAddr, skip: i32, n: usize) -> Vec<SocketAddr> {
    let mut v = Vec::new();
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    if let (true, Some(d)) = (peer.sequential(), peer.delta)
        && obs.port() >= FIRST_PORT
    {
        let span = 65536 - i64::from(FIRST_PORT);
        let from = i64::from(obs.port()) - i64::from(FIRST_PORT);
        for k in (1 + i64::from(skip))..=(n.saturating_add(i64::from(skip))) {
            let port = (from + k * i64::from(d)).rem_euclid(span) + i64::from(FIRST_PORT);
            let addr = SocketAddr::new(obs.ip(), u16::try_from(port).unwrap_or(FIRST_PORT));
            // A walk round the range repeats first where it started: each port once.
            if addr.port() == obs.port() {
                break;
            }
            v.push(addr);
        }
    }
    v
}

/// The first port a NAT hands out to sources above the well-known range.
const FIRST_PORT: u16 = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_plans_predict_past_sequential_nats_and_leave_random_pairs_to_the_relay() {
        let cone = p(NatType::PortRestrictedCone, Allocation::Preserved, None);
        let seq = p(NatType::Symmetric, Allocation::Sequential, Some(2));
        let random = p(NatType::Symmetric, Allocation::Random, None);
        let obs: SocketAddr = "198.18.1.6:20010".parse().unwrap();
        let Strategy::Direct { remote, why, .. } = plan_tcp(&cone, &seq, Some(obs), 0) else {
            panic!("cone ↔ sequential punches");
        };
        assert_eq!(remote.len(), PREDICTED_PORTS as usize + 1);
        assert_eq!((remote[0].port(), remote[1].port()), (20012, 20014));
        assert_eq!(remote.last(), Some(&obs));
        assert!(why.starts_with("port prediction"), "{why}");
        // The peer's relay connection takes 20012 first: prediction starts after it.
        let Strategy::Direct { remote, .. } = plan_tcp(&cone, &seq, Some(obs), 1) else {
            panic!("cone ↔ sequential punches");
        };
        let ports: Vec<u16> = remote.iter().map(|a| a.port()).collect();
        assert_eq!(ports[..2], [20014, 20016]);
        assert_eq!(ports[ports.len() - 2..], [20012, 20010]);
        let Strategy::Direct { remote, .. } = plan_tcp(&random, &cone, Some(obs), 1) else {
            panic!("random ↔ cone is worth a try");
        };
        assert_eq!(remote, [obs]);
        for (a, b) in [(&random, &seq), (&seq, &random), (&random, &random)] {
            assert!(matches!(
                plan_tcp(a, b, Some(obs), 0),
                Strategy::Relay { .. }
            ));
        }
        assert!(matches!(
            plan_tcp(&cone, &cone, None, 0),
            Strategy::Relay { .. }
        ));
    }

    fn p(t: NatType, a: Allocation, d: Option<i32>) -> NatProfile {
        NatProfile {
            nat_type: Some(t),
            allocation: Some(a),
            delta: d,
        }
    }

    #[test]
    fn predicted_ports_come_first_and_lan_last() {
        let me = p(NatType::PortRestrictedCone, Allocation::Preserved, None);
        let peer = p(NatType::Symmetric, Allocation::Sequential, Some(3));
        let obs: SocketAddr = "198.18.1.6:20000".parse().unwrap();
        let lan: SocketAddr = "198.19.6.2:40000".parse().unwrap();
        let Strategy::Direct {
            remote,
            sockets,
            spray,
            ..
        } = plan(&me, &peer, Some(obs), &[lan], 0, Mappings::default())
        else {
            panic!("should punch");
        };
        assert_eq!((sockets, spray), (1, None));
        let ports: Vec<u16> = remote.iter().map(|a| a.port()).collect();
        assert_eq!(ports[..3], [20003, 20006, 20009]);
        assert_eq!(remote[PREDICTED_PORTS as usize], obs);
        assert_eq!(remote.last(), Some(&lan));
    }

    #[test]
    fn predictions_wrap_round_the_port_range_as_the_nat_does() {
        let up = p(NatType::Symmetric, Allocation::Sequential, Some(2));
        let obs: SocketAddr = "198.18.1.6:65532".parse().unwrap();
        let ports: Vec<u16> = predicted_n(&up, obs, 0, 4)
            .iter()
            .map(|a| a.port())
            .collect();
        assert_eq!(ports, [65534, 1024, 1026, 1028]);
        let down = p(NatType::Symmetric, Allocation::Sequential, Some(-3));
        let obs: SocketAddr = "198.18.1.6:1027".parse().unwrap();
        let ports: Vec<u16> = predicted_n(&down, obs, 0, 3)
            .iter()
            .map(|a| a.port())
            .collect();
        assert_eq!(ports, [1024, 65533, 65530]);
        // A delta dividing the range comes back to the observed port: each port once.
        let whole = p(NatType::Symmetric, Allocation::Sequential, Some(32256));
        let ports: Vec<u16> = predicted_n(&whole, obs, 0, 10)
            .iter()
            .map(|a| a.port())
            .collect();
        assert_eq!(ports, [33283]);
    }

    #[test]
    fn a_port_mapping_on_either_side_makes_random_symmetric_pairs_punchable() {
        let random = p(NatType::Symmetric, Allocation::Random, None);
        let obs: SocketAddr = "198.18.1.6:31234".parse().unwrap();
        let mapped: SocketAddr = "198.18.1.6:40000".parse().unwrap();
        // Their gateway mapped a port: we probe it first, from our one socket, no spray.
        let there = Mappings {
            mine: false,
            peer: Some(mapped),
        };
        let Strategy::Direct {
            sockets,
            remote,
            spray,
            why,
            ..
        } = plan(&random, &random, Some(obs), &[], 1, there)
        else {
            panic!("a mapping there makes random ↔ random punchable");
        };
        assert_eq!((sockets, spray), (1, None));
        assert_eq!(remote, [mapped, obs]);
        assert!(why.contains("port mapping there"), "{why}");
        // Ours is mapped: we answer their probes on it and probe their observed port.
        let here = Mappings {
            mine: true,
            peer: None,
        };
        let Strategy::Direct {
            sockets, remote, ..
        } = plan(&random, &random, Some(obs), &[], 1, here)
        else {
            panic!("a mapping here makes random ↔ random punchable");
        };
        assert_eq!((sockets, remote), (1, vec![obs]));
        // Without one it stays hopeless.
        assert!(matches!(
            plan(&random, &random, Some(obs), &[], 1, Mappings::default()),
            Strategy::Relay { .. }
        ));
    }

    #[test]
    fn random_facing_sequential_sweeps_and_sequential_facing_random_sprays() {
        let random = p(NatType::Symmetric, Allocation::Random, None);
        let seq = p(NatType::Symmetric, Allocation::Sequential, Some(2));
        let obs: SocketAddr = "198.18.1.6:20000".parse().unwrap();
        let Strategy::Direct {
            sockets,
            remote,
            sweep,
            rounds,
            spray,
            ..
        } = plan(&random, &seq, Some(obs), &[], 1, Mappings::default())
        else {
            panic!("random ↔ sequential punches");
        };
        assert_eq!((sockets, spray, rounds), (HARD_SOCKETS, None, HARD));
        assert_eq!(sweep.map(|s| s.per_round), Some(HARD_PORTS));
        // Both rounds' ports, in order, past the relay join's mapping (skip 1).
        assert_eq!(remote.len(), HARD_PORTS * HARD_ROUNDS as usize);
        assert_eq!((remote[0].port(), remote[1].port()), (20004, 20006));
        let Strategy::Direct {
            sockets,
            remote,
            spray,
            rounds,
            ..
        } = plan(&seq, &random, Some(obs), &[], 1, Mappings::default())
        else {
            panic!("sequential ↔ random punches");
        };
        assert_eq!((sockets, remote.len(), rounds), (1, 0, HARD));
        let spray = spray.expect("the sequential side sprays");
        assert_eq!(
            (spray.ip, spray.probes),
            (std::net::Ipv4Addr::new(198, 18, 1, 6), HARD_PORTS as u32)
        );
    }

    #[test]
    fn hopeless_pairs_go_to_the_relay_with_a_reason() {
        let random = p(NatType::Symmetric, Allocation::Random, None);
        let blocked = p(NatType::UdpBlocked, Allocation::Preserved, None);
        let cone = p(NatType::FullCone, Allocation::Preserved, None);
        for (a, b, why) in [
            (&random, &random, "random symmetric ↔ random symmetric"),
            (&blocked, &cone, "UDP blocked"),
        ] {
            match plan(a, b, None, &[], 0, Mappings::default()) {
                Strategy::Relay { why: w } => assert!(w.contains(why), "{w}"),
                s => panic!("{s:?}"),
            }
        }
    }
}
