//! `peer expose PORT`: keep a service reachable under a name. Stays registered (reconnecting
//! when the rendezvous goes away, while existing tunnels keep serving), and for every
//! brokered session runs its paths side by side — the relay tunnel (unless `--no-relay`),
//! direct UDP (QUIC) and direct TCP (TLS + yamux), as `--transport` allows — accepting only
//! the reaching peer's key (pinned by the broker message) and connecting each stream to the
//! local service. The session lasts while any of its paths does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rendezvous::client::ClientEvent;
use rendezvous::proto::{Broker, NatInfo, PublicKey, RelayOffer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::direct;
use crate::endpoint::UdpEndpoint;
use crate::signal::{Signaling, Tcp};
use crate::status::Board;
use crate::transport::{Transport, best_path};
use crate::tunnel::{self, TunnelStats, TunnelStream};

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
    /// Never join the relay: sessions live on direct paths only.
    pub no_relay: bool,
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

/// Which paths are up, for the board.
#[derive(Default)]
struct Up {
    relay: AtomicBool,
    udp: AtomicBool,
    tcp: AtomicBool,
}

impl Up {
    fn set(&self, which: &AtomicBool, on: bool, board: &Board, peer: &str) {
        which.store(on, Ordering::Relaxed);
        board.set_path(
            peer,
            "expose",
            best_path(
                self.udp.load(Ordering::Relaxed),
                self.tcp.load(Ordering::Relaxed),
                self.relay.load(Ordering::Relaxed),
            ),
        );
    }
}

/// What every path task of one session shares.
#[derive(Clone)]
struct Ctx {
    cfg: Arc<Expose>,
    key: Arc<SigningKey>,
    b: Arc<Broker>,
    board: Board,
    up: Arc<Up>,
    stats: Arc<TunnelStats>,
    /// Streams the other side opens in a TLS + yamux tunnel (relay or direct TCP).
    streams: mpsc::UnboundedSender<TunnelStream>,
}

/// Serves one brokered session: the relay tunnel (unless `--no-relay`) and the direct paths
/// punched beside it, each a task; the session lasts while any of them does.
async fn session(
    cfg: Arc<Expose>,
    key: Arc<SigningKey>,
    b: Broker,
    direct: Direct,
    board: Board,
    shutdown: CancellationToken,
) {
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
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctx = Ctx {
        cfg: cfg.clone(),
        key,
        b: Arc::new(b),
        board: board.clone(),
        up: Arc::default(),
        stats: Arc::default(),
        streams: tx,
    };
    let ended = CancellationToken::new();
    // On the board before any path can come up and set its name.
    board.add_parts(&peer, "expose", "none", &ctx.stats, &ended);
    let mut paths = tokio::task::JoinSet::new();
    if cfg.no_relay {
        info!(%peer, "not joining the relay (--no-relay)");
    } else if let Some(offer) = ctx.b.relay.clone() {
        paths.spawn(relay_path(ctx.clone(), offer));
    } else {
        info!(%peer, "the rendezvous offered no relay; direct paths only");
    }
    if let Some(tcp) = direct.tcp {
        paths.spawn(tcp_path(ctx.clone(), tcp));
    }
    if let Some((endpoint, nat)) = direct.udp {
        paths.spawn(udp_path(ctx.clone(), endpoint, nat));
    }
    let stats = ctx.stats.clone();
    let session_id = ctx.b.session;
    drop(ctx);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            done = paths.join_next() => match done {
                Some(_) => continue,
                None => break,
            },
            s = rx.recv() => match s { Some(s) => s, None => break },
        };
        let target = cfg.target.clone();
        let stats = stats.clone();
        let peer = peer.clone();
        if cfg.udp {
            tokio::spawn(async move {
                if let Err(e) = crate::udp::serve_flow(stream, &target).await {
                    warn!(%peer, %target, error = %e, "udp flow failed");
                }
            });
            continue;
        }
        tokio::spawn(serve_stream(stream, target, stats, peer));
    }
    ended.cancel();
    paths.abort_all();
    info!(
        %peer,
        session = %session_id,
        sent = stats.bytes_out.load(Ordering::Relaxed),
        received = stats.bytes_in.load(Ordering::Relaxed),
        "session closed"
    );
}

/// Connects one stream to the local service.
async fn serve_stream<S>(stream: S, target: String, stats: Arc<TunnelStats>, peer: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match TcpStream::connect(&target).await {
        Ok(local) => {
            let _ = local.set_nodelay(true);
            if let Err(e) = tunnel::splice(local, stream, &stats).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        Err(e) => warn!(%peer, %target, error = %e, "cannot reach the exposed service"),
    }
}

/// The relay tunnel, until it closes.
async fn relay_path(ctx: Ctx, offer: RelayOffer) {
    let b = &ctx.b;
    let stream = match relay::client::join_tcp(offer.addr, offer.ticket, JOIN_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => {
            return warn!(peer = %b.peer, error = %e, "could not join the relay");
        }
    };
    let t = match tunnel::accept(stream, &ctx.key, b.peer_key, ctx.streams.clone()).await {
        Ok(t) => t,
        Err(e) => return warn!(peer = %b.peer, error = %e, "tunnel handshake failed"),
    };
    info!(peer = %b.peer, session = %b.session, path = "relay", relay = %offer.addr, "tunnel up");
    ctx.up.set(&ctx.up.relay, true, &ctx.board, &b.peer);
    t.closed().cancelled().await;
    info!(peer = %b.peer, session = %b.session, "relay tunnel closed");
    ctx.up.set(&ctx.up.relay, false, &ctx.board, &b.peer);
}

/// TCP simultaneous open, then the same TLS + yamux tunnel as over the relay; the reaching
/// side opens streams on it, served from the same queue.
async fn tcp_path(ctx: Ctx, tcp: Arc<Tcp>) {
    let b = &ctx.b;
    let d = match crate::direct_tcp::establish_tcp(&tcp, b).await {
        Ok(d) => d,
        Err(e) => return info!(peer = %b.peer, session = %b.session, "no direct tcp path: {e}"),
    };
    let tt = match tunnel::accept(d.stream, &ctx.key, b.peer_key, ctx.streams.clone()).await {
        Ok(tt) => tt,
        Err(e) => {
            return info!(peer = %b.peer, error = %e,
                "tunnel handshake on the punched tcp connection failed");
        }
    };
    info!(peer = %b.peer, session = %b.session, path = "direct-tcp", remote = %d.remote,
        "direct tcp path up in {:.0} ms ({})", d.elapsed.as_secs_f64() * 1000.0, d.why);
    ctx.up.set(&ctx.up.tcp, true, &ctx.board, &b.peer);
    tt.closed().cancelled().await;
    info!(peer = %b.peer, "direct tcp path lost");
    ctx.up.set(&ctx.up.tcp, false, &ctx.board, &b.peer);
}

/// UDP punching and QUIC; streams the other side opens on it are served like the others.
async fn udp_path(ctx: Ctx, endpoint: UdpEndpoint, nat: Option<NatInfo>) {
    let b = &ctx.b;
    let d = match direct::establish(&endpoint, nat, b, &ctx.key).await {
        Ok(d) => d,
        Err(e) => {
            return info!(peer = %b.peer, session = %b.session, "staying on the relay: {e}");
        }
    };
    info!(peer = %b.peer, session = %b.session, path = "direct-udp",
        "direct path up in {:.0} ms ({})", d.elapsed.as_secs_f64() * 1000.0, d.why);
    ctx.up.set(&ctx.up.udp, true, &ctx.board, &b.peer);
    if ctx.cfg.udp {
        tokio::spawn(crate::udp_direct::serve(
            d.conn.clone(),
            ctx.cfg.target.clone(),
        ));
    }
    loop {
        let (send, recv) = match d.conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                info!(peer = %b.peer, "direct udp path lost ({e})");
                break;
            }
        };
        tokio::spawn(serve_stream(
            tokio::io::join(recv, send),
            ctx.cfg.target.clone(),
            ctx.stats.clone(),
            b.peer.clone(),
        ));
    }
    ctx.up.set(&ctx.up.udp, false, &ctx.board, &b.peer);
}

/// The address `--to HOST` and the port make.
pub fn target(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}
