//! `peer expose PORT`: keep a service reachable under a name. Stays registered (reconnecting
//! when the rendezvous goes away, while existing tunnels keep serving), and for every
//! brokered session joins the relay, accepts the tunnel from the reaching peer (its key
//! pinned by the broker message) and connects each stream to the local service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rendezvous::client::ClientEvent;
use rendezvous::proto::{Broker, NatInfo, PublicKey};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::direct;
use crate::endpoint::UdpEndpoint;
use crate::signal::{Signaling, Tcp};
use crate::status::Board;
use crate::transport::{Transport, best_path};
use crate::tunnel;

/// What to expose.
#[derive(Debug, Clone)]
pub struct Expose {
    /// Registration.
    pub signaling: Signaling,
    /// Where the service listens on this machine (or on `--to HOST`).
    pub target: String,
    /// Keys allowed to reach us; empty allows every key the rendezvous brokers.
    pub allow: Vec<PublicKey>,
    /// The service is UDP: every stream is a UDP flow ([`crate::udp`]).
    pub udp: bool,
    /// Which direct paths to punch.
    pub transport: Transport,
}

/// How long to wait for the relay to pair us with the reaching peer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until `shutdown`, or a refusal no retry can fix (name taken, bad token).
pub async fn run(
    cfg: Expose,
    key: SigningKey,
    board: Board,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let key = Arc::new(key);
    let cfg = Arc::new(cfg);
    info!(
        name = %cfg.signaling.name,
        target = %cfg.target,
        "exposing {} as {}",
        cfg.target,
        cfg.signaling.name
    );
    loop {
        let Some(registration) = cfg.signaling.register_until_up(&key, &shutdown).await? else {
            return Ok(());
        };
        // The UDP presence lives as long as this registration: its refreshes keep the
        // observed mapping the one the rendezvous hands out.
        let (mut client, udp) = (registration.client, registration.udp);
        let direct_from = udp
            .as_ref()
            .filter(|_| cfg.transport.udp())
            .map(|u| (u.endpoint.clone(), u.nat));
        let tcp = registration.tcp.filter(|_| cfg.transport.tcp());
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                e = client.next_event() => e,
            };
            match event {
                Some(ClientEvent::Broker(b)) => {
                    tokio::spawn(session(
                        cfg.clone(),
                        key.clone(),
                        *b,
                        Direct {
                            udp: direct_from.clone(),
                            tcp: tcp.clone(),
                        },
                        board.clone(),
                        shutdown.clone(),
                    ));
                }
                Some(ClientEvent::Closed(e)) => {
                    warn!(error = %e, "lost the rendezvous; tunnels keep serving, reconnecting");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Where direct paths may be punched from.
struct Direct {
    udp: Option<(UdpEndpoint, Option<NatInfo>)>,
    tcp: Option<Arc<Tcp>>,
}

/// Which direct paths are up, for the board.
#[derive(Default)]
struct Up {
    udp: std::sync::atomic::AtomicBool,
    tcp: std::sync::atomic::AtomicBool,
}

impl Up {
    fn show(&self, board: &Board, peer: &str) {
        board.set_path(
            peer,
            "expose",
            best_path(
                self.udp.load(Ordering::Relaxed),
                self.tcp.load(Ordering::Relaxed),
            ),
        );
    }
}

async fn session(
    cfg: Arc<Expose>,
    key: Arc<SigningKey>,
    b: Broker,
    direct: Direct,
    board: Board,
    shutdown: CancellationToken,
) {
    let direct_from = direct.udp;
    let peer = b.peer.clone();
    if !cfg.allow.is_empty() && !cfg.allow.contains(&b.peer_key) {
        warn!(%peer, key = %b.peer_key, "refused: key not in --allow");
        // Join and fail the handshake, so the other side hears "refused" at once instead
        // of waiting for a relay timeout.
        if let Some(offer) = b.relay
            && let Ok(stream) =
                relay::client::join_tcp(offer.addr, offer.ticket, JOIN_TIMEOUT).await
        {
            let (tx, _rx) = mpsc::unbounded_channel();
            let _ = tunnel::accept(stream, &key, PublicKey([0; 32]), tx).await;
        }
        return;
    }
    let Some(offer) = b.relay.clone() else {
        warn!(%peer, "session without a relay offer: this version needs the relay beside the direct path");
        return;
    };
    let stream = match relay::client::join_tcp(offer.addr, offer.ticket, JOIN_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, error = %e, "could not join the relay");
            return;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t = match tunnel::accept(stream, &key, b.peer_key, tx.clone()).await {
        Ok(t) => t,
        Err(e) => {
            warn!(%peer, error = %e, "tunnel handshake failed");
            return;
        }
    };
    info!(%peer, session = %b.session, path = "relay", relay = %offer.addr, "tunnel up");
    board.add(&peer, "expose", "relay", &t);
    let up = Arc::new(Up::default());
    if let Some(tcp) = direct.tcp {
        // Punch TCP beside the relay; the reaching side opens streams on that tunnel as on
        // the relay's, and they are served from the same queue.
        let (key, board, b, tx, up) = (
            key.clone(),
            board.clone(),
            b.clone(),
            tx.clone(),
            up.clone(),
        );
        let closed = t.closed().clone();
        tokio::spawn(async move {
            let d = match crate::direct_tcp::establish_tcp(&tcp, &b).await {
                Ok(d) => d,
                Err(e) => {
                    info!(peer = %b.peer, session = %b.session, "no direct tcp path: {e}");
                    return;
                }
            };
            let tt = match tunnel::accept(d.stream, &key, b.peer_key, tx).await {
                Ok(tt) => tt,
                Err(e) => {
                    info!(peer = %b.peer, error = %e, "tunnel handshake on the punched tcp connection failed");
                    return;
                }
            };
            info!(peer = %b.peer, session = %b.session, path = "direct-tcp", remote = %d.remote,
                "direct tcp path up in {:.0} ms ({})", d.elapsed.as_secs_f64() * 1000.0, d.why);
            up.tcp.store(true, Ordering::Relaxed);
            up.show(&board, &b.peer);
            tokio::select! {
                _ = closed.cancelled() => {}
                _ = tt.closed().cancelled() => {
                    info!(peer = %b.peer, "direct tcp path lost; back to the next best path");
                }
            }
            up.tcp.store(false, Ordering::Relaxed);
            up.show(&board, &b.peer);
        });
    }
    if let Some((endpoint, nat)) = direct_from {
        // Punch beside the relay; streams the other side opens on the direct path are
        // served like those from the relay.
        let (cfg, key, board, stats, b, up) = (
            cfg.clone(),
            key.clone(),
            board.clone(),
            t.stats.clone(),
            b.clone(),
            up.clone(),
        );
        let closed = t.closed().clone();
        tokio::spawn(async move {
            let d = match direct::establish(&endpoint, nat, &b, &key).await {
                Ok(d) => d,
                Err(e) => {
                    info!(peer = %b.peer, session = %b.session, "staying on the relay: {e}");
                    return;
                }
            };
            info!(peer = %b.peer, session = %b.session, path = "direct-udp",
                "direct path up in {:.0} ms ({})", d.elapsed.as_secs_f64() * 1000.0, d.why);
            up.udp.store(true, Ordering::Relaxed);
            up.show(&board, &b.peer);
            if cfg.udp {
                tokio::spawn(crate::udp_direct::serve(d.conn.clone(), cfg.target.clone()));
            }
            loop {
                let (send, recv) = tokio::select! {
                    _ = closed.cancelled() => break,
                    r = d.conn.accept_bi() => match r {
                        Ok(s) => s,
                        Err(e) => {
                            info!(peer = %b.peer, "direct path lost ({e}); back to the relay");
                            break;
                        }
                    },
                };
                let (target, stats, peer) = (cfg.target.clone(), stats.clone(), b.peer.clone());
                tokio::spawn(async move {
                    match TcpStream::connect(&target).await {
                        Ok(local) => {
                            let _ = local.set_nodelay(true);
                            let stream = tokio::io::join(recv, send);
                            if let Err(e) = tunnel::splice(local, stream, &stats).await {
                                debug!(%peer, error = %e, "connection ended with an error");
                            }
                        }
                        Err(e) => {
                            warn!(%peer, %target, error = %e, "cannot reach the exposed service")
                        }
                    }
                });
            }
            d.conn.close(0u32.into(), b"relay tunnel closed");
            up.udp.store(false, Ordering::Relaxed);
            up.show(&board, &b.peer);
        });
    }
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = t.closed().cancelled() => break,
            s = rx.recv() => match s { Some(s) => s, None => break },
        };
        let target = cfg.target.clone();
        let stats = t.stats.clone();
        let peer = peer.clone();
        if cfg.udp {
            tokio::spawn(async move {
                if let Err(e) = crate::udp::serve_flow(stream, &target).await {
                    warn!(%peer, %target, error = %e, "udp flow failed");
                }
            });
            continue;
        }
        tokio::spawn(async move {
            match TcpStream::connect(&target).await {
                Ok(local) => {
                    let _ = local.set_nodelay(true);
                    if let Err(e) = tunnel::splice(local, stream, &stats).await {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                Err(e) => warn!(%peer, %target, error = %e, "cannot reach the exposed service"),
            }
        });
    }
    info!(
        %peer,
        session = %b.session,
        sent = t.stats.bytes_out.load(Ordering::Relaxed),
        received = t.stats.bytes_in.load(Ordering::Relaxed),
        "tunnel closed"
    );
}

/// The address `--to HOST` and the port make.
pub fn target(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}
