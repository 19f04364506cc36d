//! The UDP punch shell: runs the sans-IO [`punch`](crate::punch::udp) agent for one brokered
//! session on the shared UDP endpoint (and, on the hard side of birthday mode, on extra
//! sockets) and returns the pair it proved. The session then runs a path on it: on the
//! shared socket a plain address, on a birthday socket a link of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};
use wire::signal::{Broker, NatAllocation, NatInfo, NatMapping, Role};

use natprobe::classify::{Allocation, NatType};

use crate::defaults::PUNCH_LINGER;
use crate::presence::endpoint::UdpEndpoint;
use crate::punch::probe::ProbeKey;
use crate::punch::strategy::{Mappings, NatProfile, Strategy, plan};
use crate::punch::udp::{Config, Event, Input, Output, Punch, Timing};

/// Why there is no direct path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectError {
    /// The NATs make a direct path hopeless; the strategy says why.
    #[error("{0}")]
    Hopeless(String),
    /// No pair answered in time.
    #[error("no direct path: {probes} probes in {secs:.1} s went unanswered")]
    Unanswered {
        /// Requests sent.
        probes: u32,
        /// How long it tried.
        secs: f64,
    },
    /// A socket failed.
    #[error("punch socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A punched UDP pair.
#[derive(Debug)]
pub struct Punched {
    /// The other side's address that answered.
    pub remote: SocketAddr,
    /// The birthday socket the pair is on; `None` for the shared endpoint socket.
    pub socket: Option<UdpSocket>,
    /// How the pair was found, for the log.
    pub why: String,
    /// From the punch's start to the pair being agreed.
    pub elapsed: Duration,
    /// Other addresses of the other side heard on the same socket: where to try the
    /// handshake next if it fails on `remote` (see [`crate::punch::udp::Path::fallbacks`]).
    pub fallbacks: Vec<SocketAddr>,
}

/// What natprobe-style probing at registration told a peer, as the strategy wants it.
pub fn profile(nat: Option<NatInfo>) -> NatProfile {
    let Some(n) = nat else {
        return NatProfile {
            nat_type: None,
            allocation: None,
            delta: None,
        };
    };
    NatProfile {
        nat_type: match n.mapping {
            NatMapping::None => Some(NatType::Open),
            // Filtering is not measured at registration: assume the strictest cone.
            NatMapping::EndpointIndependent => Some(NatType::PortRestrictedCone),
            NatMapping::Varies => Some(NatType::Symmetric),
            NatMapping::Unknown => None,
        },
        allocation: match n.allocation {
            NatAllocation::Preserved => Some(Allocation::Preserved),
            NatAllocation::Sequential => Some(Allocation::Sequential),
            NatAllocation::Random => Some(Allocation::Random),
            NatAllocation::Unknown => None,
        },
        delta: (n.allocation == NatAllocation::Sequential).then_some(n.delta),
    }
}

/// The timing of a punch in `rounds` (prediction × birthday): more time to give up.
pub fn timing_for(rounds: crate::punch::udp::Rounds) -> Timing {
    let t = Timing::default();
    if rounds.count > 1 {
        Timing {
            give_up: crate::punch::strategy::HARD_GIVE_UP,
            ..t
        }
    } else {
        t
    }
}

/// Punches for session `b` and returns the pair both sides agreed on. `me`: what we
/// measured of our NAT, and whether our gateway maps our endpoint's port. `relay_udp`:
/// both sides join the relay over UDP (a mapping each, made before the first probe).
pub async fn establish(
    endpoint: &UdpEndpoint,
    (my_nat, mapped_here): (Option<NatInfo>, bool),
    b: &Broker,
    relay_udp: bool,
) -> Result<Punched, DirectError> {
    let started = Instant::now();
    // The other side's mapping in the other address family (IPv6 beside IPv4) is one more
    // candidate; the agent prefers an IPv6 pair that answers within its grace.
    let extra: Vec<SocketAddr> = b
        .candidates
        .udp_alt
        .into_iter()
        .chain(b.candidates.lan.iter().copied())
        .collect();
    let strategy = plan(
        &profile(my_nat),
        &profile(b.candidates.nat),
        b.candidates.udp,
        &extra,
        i32::from(relay_udp),
        Mappings {
            mine: mapped_here,
            peer: b.candidates.mapped,
        },
    );
    let (sockets, remote, spray, sweep, rounds, why) = match strategy {
        Strategy::Direct {
            sockets,
            remote,
            spray,
            sweep,
            rounds,
            why,
        } => (sockets, remote, spray, sweep, rounds, why),
        Strategy::Relay { why } => return Err(DirectError::Hopeless(why)),
    };
    if sweep.is_some() {
        debug!(session = %b.session, %why, predicted = remote.len(), sockets, "punching");
    } else {
        debug!(session = %b.session, %why, candidates = ?remote, sockets, "punching");
    }
    // Extra sockets (birthday mode): the std socket is kept for QUIC, a duplicate of it
    // sends and reads probes; their datagrams feed one channel, tagged with the index.
    let (tx, mut extra_rx) = mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(1024);
    let mut extra = Vec::new();
    let mut readers = Vec::new();
    for i in 1..sockets {
        let std_sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
        wire::sockbuf::grow_udp_buffers(&std_sock);
        let dup = std_sock.try_clone()?;
        dup.set_nonblocking(true)?;
        let io = Arc::new(UdpSocket::from_std(dup)?);
        let (r, tx) = (io.clone(), tx.clone());
        readers.push(AbortOnDrop(tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = r.recv_from(&mut buf).await {
                if crate::punch::probe::is_probe(&buf[..n]) {
                    let _ = tx.try_send((i, from, buf[..n].to_vec()));
                }
            }
        })));
        extra.push((Some(std_sock), io));
    }
    drop(tx);
    let mut route = endpoint.punch_route(b.session.0);
    let mut agent = Punch::new(Config {
        role: b.role,
        key: ProbeKey::new(b.session.0, b.secret),
        sockets,
        remote,
        spray,
        sweep,
        rounds,
        start: Instant::now() + Duration::from_millis(u64::from(b.start_in_ms)),
        timing: timing_for(rounds),
        seed: rand::random(),
    });
    agent.handle_input(Input::Timeout(Instant::now()));
    let path = loop {
        let mut connected = None;
        let mut deadline = None;
        while connected.is_none() && deadline.is_none() {
            match agent.poll_output() {
                Output::Transmit(t) => {
                    let sent = if t.socket == 0 {
                        endpoint.send_to(&t.payload, t.to).await
                    } else {
                        extra[t.socket - 1].1.send_to(&t.payload, t.to).await
                    };
                    if let Err(e) = sent {
                        debug!(to = %t.to, error = %e, "probe not sent");
                    }
                }
                Output::Event(Event::Connected(p)) => connected = Some(p),
                Output::Event(Event::Failed { probes }) => {
                    return Err(DirectError::Unanswered {
                        probes,
                        secs: started.elapsed().as_secs_f64(),
                    });
                }
                Output::Timeout(at) => deadline = Some(at),
            }
        }
        if let Some(p) = connected {
            break p;
        }
        let at = deadline.unwrap_or_else(Instant::now);
        let input = tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => None,
            Some((from, data)) = route.rx.recv() => Some((0, from, data)),
            Some((i, from, data)) = extra_rx.recv() => Some((i, from, data)),
        };
        let now = Instant::now();
        match input {
            None => agent.handle_input(Input::Timeout(now)),
            Some((socket, from, data)) => agent.handle_input(Input::Receive {
                now,
                socket,
                from,
                data: &data,
            }),
        }
    };
    info!(
        session = %b.session,
        peer = %b.peer,
        remote = %path.remote,
        "punched via udp in {:.0} ms ({why})",
        path.elapsed.as_secs_f64() * 1000.0
    );
    if b.role == Role::Responder && path.socket == 0 {
        // Keep acknowledging late nominations for a while.
        let (mut agent, endpoint) = (agent, endpoint.clone());
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + PUNCH_LINGER;
            loop {
                let (from, data) = tokio::select! {
                    _ = tokio::time::sleep_until(end) => return,
                    Some(d) = route.rx.recv() => d,
                };
                agent.handle_input(Input::Receive {
                    now: Instant::now(),
                    socket: 0,
                    from,
                    data: &data,
                });
                while let Output::Transmit(t) = agent.poll_output() {
                    let _ = endpoint.send_to(&t.payload, t.to).await;
                }
            }
        });
    }
    drop(readers);
    let socket = match path.socket {
        0 => None,
        i => {
            let (std_sock, _) = extra.swap_remove(i - 1);
            let s =
                std_sock.ok_or_else(|| std::io::Error::other("birthday socket already taken"))?;
            s.set_nonblocking(true)?;
            Some(UdpSocket::from_std(s)?)
        }
    };
    Ok(Punched {
        remote: path.remote,
        socket,
        why,
        elapsed: started.elapsed(),
        fallbacks: path.fallbacks,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
