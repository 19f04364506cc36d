//! The punch shell: runs the sans-IO [`punch`](crate::punch) agent for one brokered
//! session on the shared UDP endpoint (and, on the hard side of birthday mode, on extra
//! sockets), then brings up the direct QUIC connection on the pair it proved. The relay
//! tunnel comes up beside it; this only ever adds a faster path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rendezvous::proto::{Broker, NatAllocation, NatInfo, NatMapping, Role};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};

use natprobe::classify::{Allocation, NatType};

use crate::endpoint::UdpEndpoint;
use crate::probe::ProbeKey;
use crate::punch::{Config, Event, Input, Output, Punch, Timing};
use crate::quic::{self, QuicError, QuicTunnel};
use crate::strategy::{NatProfile, Strategy, plan};

/// How long the responder keeps answering probes after agreeing, so a nomination whose
/// ack was lost is acknowledged again.
const LINGER: Duration = Duration::from_secs(3);

/// The QUIC handshake on a proven pair takes a round trip or two; past this the pair is
/// taken for broken and the relay carries on alone.
const QUIC_SETUP: Duration = Duration::from_secs(5);

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
    /// The QUIC handshake on the punched pair failed.
    #[error(transparent)]
    Quic(#[from] QuicError),
}

/// A direct tunnel that works.
#[derive(Debug, Clone)]
pub struct Direct {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// How the pair was found, for the log.
    pub why: String,
    /// From the punch's start to QUIC being up.
    pub elapsed: Duration,
    /// The endpoint of a birthday socket, kept alive with the connection.
    _own: Option<Arc<QuicTunnel>>,
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

/// Punches for session `b` and brings up QUIC on the proven pair. The reaching side
/// (initiator) is the QUIC server on its endpoint, pinned to the one peer it reaches; the
/// exposing side connects.
pub async fn establish(
    endpoint: &UdpEndpoint,
    my_nat: Option<NatInfo>,
    b: &Broker,
    key: &SigningKey,
) -> Result<Direct, DirectError> {
    let started = Instant::now();
    let strategy = plan(
        &profile(my_nat),
        &profile(b.candidates.nat),
        b.candidates.udp,
        &b.candidates.lan,
    );
    let (sockets, remote, spray, why) = match strategy {
        Strategy::Direct {
            sockets,
            remote,
            spray,
            why,
        } => (sockets, remote, spray, why),
        Strategy::Relay { why } => return Err(DirectError::Hopeless(why)),
    };
    debug!(session = %b.session, %why, candidates = ?remote, sockets, "punching");
    // Extra sockets (birthday mode): the std socket is kept for QUIC, a duplicate of it
    // sends and reads probes; their datagrams feed one channel, tagged with the index.
    let (tx, mut extra_rx) = mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(1024);
    let mut extra = Vec::new();
    let mut readers = Vec::new();
    for i in 1..sockets {
        let std_sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
        let dup = std_sock.try_clone()?;
        dup.set_nonblocking(true)?;
        let io = Arc::new(UdpSocket::from_std(dup)?);
        let (r, tx) = (io.clone(), tx.clone());
        readers.push(AbortOnDrop(tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = r.recv_from(&mut buf).await {
                if crate::probe::is_probe(&buf[..n]) {
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
        start: Instant::now() + Duration::from_millis(u64::from(b.start_in_ms)),
        timing: Timing::default(),
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
            let end = tokio::time::Instant::now() + LINGER;
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
    let quic_up = async {
        if path.socket == 0 {
            let conn = if b.role == Role::Initiator {
                accept_from(endpoint, path.remote).await?
            } else {
                endpoint
                    .quic()
                    .connect_with(
                        quic::client_config(key, b.peer_key)?,
                        path.remote,
                        crate::tls::SERVER_NAME,
                    )
                    .map_err(QuicError::from)?
                    .await
                    .map_err(QuicError::from)?
            };
            return Ok::<_, DirectError>((conn, None));
        }
        // A birthday socket: its own QUIC endpoint.
        drop(readers);
        let s = extra[path.socket - 1]
            .0
            .take()
            .ok_or_else(|| std::io::Error::other("birthday socket already taken"))?;
        let t = if b.role == Role::Initiator {
            QuicTunnel::accept(s, key, b.peer_key, quic::KEEPALIVE).await?
        } else {
            QuicTunnel::connect(s, path.remote, key, b.peer_key, quic::KEEPALIVE).await?
        };
        Ok((t.conn.clone(), Some(Arc::new(t))))
    };
    let (conn, own) = tokio::time::timeout(QUIC_SETUP, quic_up)
        .await
        .map_err(|_| DirectError::Unanswered {
            probes: 0,
            secs: started.elapsed().as_secs_f64(),
        })??;
    Ok(Direct {
        conn,
        why,
        elapsed: started.elapsed(),
        _own: own,
    })
}

/// The next incoming connection from `remote` on the shared endpoint (the server config,
/// pinned to the peer, is set by the reaching side when it starts).
async fn accept_from(
    endpoint: &UdpEndpoint,
    remote: SocketAddr,
) -> Result<quinn::Connection, DirectError> {
    loop {
        let incoming = endpoint.quic().accept().await.ok_or(QuicError::NoPeer)?;
        if incoming.remote_address() != remote {
            debug!(from = %incoming.remote_address(), "ignoring a connection from elsewhere");
            incoming.ignore();
            continue;
        }
        return Ok(incoming.await.map_err(QuicError::from)?);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
