//! A simulated network of two NATs and a STUN server in virtual time, for unit tests of
//! the punch agent: each NAT has a mapping behaviour, a filtering behaviour, a port
//! allocation (preserved, sequential with a delta, random), and the path a loss rate.
//! The same kinds the NAT lab builds with the kernel, modelled after RFC 4787.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use natprobe::classify::{Allocation, NatType};
use wire::ticket::Side;

use crate::punch::probe::ProbeKey;
use crate::punch::strategy::{NatProfile, Strategy, plan};
use crate::punch::udp::{Config, Event, Input, Output, Path, Punch};

/// The NAT kinds of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    None,
    FullCone,
    AddressRestricted,
    PortRestricted,
    SymmetricRandom,
    SymmetricSequential,
}

impl Kind {
    pub(crate) const ALL: [Kind; 6] = [
        Kind::None,
        Kind::FullCone,
        Kind::AddressRestricted,
        Kind::PortRestricted,
        Kind::SymmetricRandom,
        Kind::SymmetricSequential,
    ];

    /// What natprobe would report behind this kind.
    fn profile(self, delta: i32) -> NatProfile {
        let (t, a) = match self {
            Kind::None => (NatType::Open, Allocation::Preserved),
            Kind::FullCone => (NatType::FullCone, Allocation::Preserved),
            Kind::AddressRestricted => (NatType::RestrictedCone, Allocation::Preserved),
            Kind::PortRestricted => (NatType::PortRestrictedCone, Allocation::Preserved),
            Kind::SymmetricRandom => (NatType::Symmetric, Allocation::Random),
            Kind::SymmetricSequential => (NatType::Symmetric, Allocation::Sequential),
        };
        NatProfile {
            nat_type: Some(t),
            allocation: Some(a),
            delta: (a == Allocation::Sequential).then_some(delta),
        }
    }
}

struct Nat {
    kind: Kind,
    wan: Ipv4Addr,
    delta: u16,
    next_port: u16,
    rng: u64,
    /// (internal, destination for symmetric) → WAN port
    map: HashMap<(SocketAddrV4, Option<SocketAddrV4>), u16>,
    owner: HashMap<u16, SocketAddrV4>,
    /// Symmetric kinds: (WAN port, remote) → internal. A WAN port serves many remotes,
    /// one mapping each, as conntrack allows (only the whole tuple must be unique).
    reply: HashMap<(u16, SocketAddrV4), SocketAddrV4>,
    sent_to: HashSet<(u16, SocketAddrV4)>,
}

impl Nat {
    fn new(kind: Kind, wan: Ipv4Addr, delta: u16, seed: u64) -> Nat {
        Nat {
            kind,
            wan,
            delta,
            next_port: 20000,
            rng: seed | 1,
            map: HashMap::new(),
            owner: HashMap::new(),
            reply: HashMap::new(),
            sent_to: HashSet::new(),
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn outbound(&mut self, from: SocketAddrV4, to: SocketAddrV4) -> SocketAddrV4 {
        if self.kind == Kind::None {
            return from;
        }
        let symmetric = matches!(self.kind, Kind::SymmetricRandom | Kind::SymmetricSequential);
        let key = (from, symmetric.then_some(to));
        let port = match self.map.get(&key) {
            Some(p) => *p,
            None => {
                let port = match self.kind {
                    Kind::SymmetricSequential => loop {
                        // Round 1024–65535, as the lab's sequential NAT and Linux walk it.
                        self.next_port = u16::try_from(
                            (u32::from(self.next_port.max(1024)) - 1024 + u32::from(self.delta))
                                % 64512
                                + 1024,
                        )
                        .unwrap_or(1024);
                        if !self.reply.contains_key(&(self.next_port, to)) {
                            break self.next_port;
                        }
                    },
                    Kind::SymmetricRandom => loop {
                        let p = 1024 + (self.random() % 64512) as u16;
                        if !self.reply.contains_key(&(p, to)) {
                            break p;
                        }
                    },
                    _ if !self.owner.contains_key(&from.port()) => from.port(),
                    _ => loop {
                        let p = 1024 + (self.random() % 64512) as u16;
                        if !self.owner.contains_key(&p) {
                            break p;
                        }
                    },
                };
                self.map.insert(key, port);
                if symmetric {
                    self.reply.insert((port, to), from);
                } else {
                    self.owner.insert(port, from);
                }
                port
            }
        };
        self.sent_to.insert((port, to));
        SocketAddrV4::new(self.wan, port)
    }

    fn inbound(&mut self, from: SocketAddrV4, to_port: u16) -> Option<SocketAddrV4> {
        if self.kind == Kind::None {
            return Some(SocketAddrV4::new(self.wan, to_port));
        }
        if matches!(self.kind, Kind::SymmetricRandom | Kind::SymmetricSequential) {
            return self.reply.get(&(to_port, from)).copied();
        }
        let internal = *self.owner.get(&to_port)?;
        let allowed = match self.kind {
            Kind::FullCone => true,
            Kind::AddressRestricted => self
                .sent_to
                .iter()
                .any(|(p, r)| *p == to_port && r.ip() == from.ip()),
            _ => self.sent_to.contains(&(to_port, from)),
        };
        allowed.then_some(internal)
    }
}

/// One side: a NAT, a host behind it, its sockets, and its agent.
struct Side_ {
    nat: Nat,
    lan: Ipv4Addr,
    sockets: usize,
    punch: Option<Punch>,
    deadline: Instant,
    result: Option<Event>,
}

impl Side_ {
    fn socket_addr(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.lan, 40000 + i as u16)
    }
}

/// What a simulated punch ended with.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) initiator: Option<Event>,
    pub(crate) responder: Option<Event>,
    /// Why each side planned as it did.
    pub(crate) plans: [String; 2],
    pub(crate) relay: bool,
}

impl Outcome {
    pub(crate) fn paths(&self) -> Option<(Path, Path)> {
        match (&self.initiator, &self.responder) {
            (Some(Event::Connected(a)), Some(Event::Connected(b))) => Some((a.clone(), b.clone())),
            _ => None,
        }
    }
}

const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 3478);

/// Runs one punch between a host behind `a` (the initiator) and one behind `b`, with
/// one-way `latency`, `loss_pct` of datagrams dropped, and `seed` for every random choice.
pub(crate) fn run(a: Kind, b: Kind, latency: Duration, loss_pct: u64, seed: u64) -> Outcome {
    let t0 = Instant::now();
    let delta = 2;
    // Side n sits behind a NAT at 198.18.n.1 (or is that public host) with LAN 198.19.n.0/24.
    let side = |n: u8, kind: Kind, salt: u64| {
        let wan = Ipv4Addr::new(198, 18, n, 1);
        Side_ {
            nat: Nat::new(kind, wan, delta, seed ^ salt),
            lan: if kind == Kind::None {
                wan
            } else {
                Ipv4Addr::new(198, 19, n, 2)
            },
            sockets: 1,
            punch: None,
            deadline: t0,
            result: None,
        }
    };
    let mut sides = [side(1, a, 0xa), side(2, b, 0xb)];
    // The rendezvous observes each side's socket 0.
    let observed: Vec<SocketAddrV4> = sides
        .iter_mut()
        .map(|s| {
            let from = s.socket_addr(0);
            s.nat.outbound(from, SERVER)
        })
        .collect();
    let profiles = [a.profile(i32::from(delta)), b.profile(i32::from(delta))];
    let key = ProbeKey::new([1; 16], [2; 32]);
    let start = t0 + Duration::from_millis(50);
    let mut plans = [String::new(), String::new()];
    let mut relay = false;
    for i in 0..2 {
        let other = 1 - i;
        match plan(
            &profiles[i],
            &profiles[other],
            Some(SocketAddr::V4(observed[other])),
            &[SocketAddr::V4(sides[other].socket_addr(0))],
            0,
            crate::punch::strategy::Mappings::default(),
        ) {
            Strategy::Relay { why } => {
                plans[i] = why;
                relay = true;
            }
            Strategy::Direct {
                sockets,
                remote,
                spray,
                sweep,
                rounds,
                why,
            } => {
                plans[i] = why;
                sides[i].sockets = sockets;
                sides[i].punch = Some(Punch::new(Config {
                    role: if i == 0 {
                        Side::Initiator
                    } else {
                        Side::Responder
                    },
                    key: key.clone(),
                    sockets,
                    remote,
                    spray,
                    sweep,
                    rounds,
                    start,
                    timing: crate::punch::udp_shell::timing_for(rounds),
                    seed: seed.wrapping_mul(31).wrapping_add(i as u64),
                }));
            }
        }
    }
    if relay {
        return Outcome {
            initiator: None,
            responder: None,
            plans,
            relay,
        };
    }
    for s in sides.iter_mut() {
        if let Some(p) = s.punch.as_mut() {
            p.handle_input(Input::Timeout(t0));
        }
    }
    // In flight: (delivery time, sequence) → (to, from, payload)
    let mut flight: BTreeMap<(Instant, u64), (SocketAddrV4, SocketAddrV4, Vec<u8>)> =
        BTreeMap::new();
    let mut seq = 0u64;
    let mut loss_rng = seed | 1;
    let mut now = t0;
    let end = start + Duration::from_secs(14);
    while now < end && sides.iter().any(|s| s.result.is_none()) {
        for s in sides.iter_mut() {
            let Some(p) = s.punch.as_mut() else { continue };
            loop {
                match p.poll_output() {
                    Output::Transmit(t) => {
                        let from = SocketAddrV4::new(s.lan, 40000 + t.socket as u16);
                        let SocketAddr::V4(to) = t.to else { continue };
                        // A private destination is not routed on this internet.
                        if to.ip().octets()[1] == 19 {
                            continue;
                        }
                        let src = s.nat.outbound(from, to);
                        loss_rng ^= loss_rng << 13;
                        loss_rng ^= loss_rng >> 7;
                        loss_rng ^= loss_rng << 17;
                        if loss_rng % 100 < loss_pct {
                            continue;
                        }
                        seq += 1;
                        flight.insert((now + latency, seq), (to, src, t.payload.to_vec()));
                    }
                    Output::Event(e) => {
                        if s.result.is_none() {
                            s.result = Some(e);
                        }
                    }
                    Output::Timeout(at) => {
                        s.deadline = at;
                        break;
                    }
                }
            }
        }
        let next_flight = flight.keys().next().map(|k| k.0);
        let next_timer = sides
            .iter()
            .filter(|s| s.punch.is_some())
            .map(|s| s.deadline)
            .min();
        let Some(next) = [next_flight, next_timer].into_iter().flatten().min() else {
            break;
        };
        now = next.max(now);
        while let Some(entry) = flight.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (to, from, payload) = entry.remove();
            let Some(side) = sides.iter_mut().find(|s| s.nat.wan == *to.ip()) else {
                continue;
            };
            let Some(internal) = side.nat.inbound(from, to.port()) else {
                continue;
            };
            let socket = usize::from(internal.port().wrapping_sub(40000));
            if *internal.ip() != side.lan || socket >= side.sockets {
                continue;
            }
            if let Some(p) = side.punch.as_mut() {
                p.handle_input(Input::Receive {
                    now,
                    socket,
                    from: SocketAddr::V4(from),
                    data: &payload,
                });
            }
        }
        for s in sides.iter_mut() {
            if let Some(p) = s.punch.as_mut() {
                if s.deadline <= now {
                    p.handle_input(Input::Timeout(now));
                }
            }
        }
    }
    let [a, b] = sides;
    Outcome {
        initiator: a.result,
        responder: b.result,
        plans,
        relay,
    }
}
