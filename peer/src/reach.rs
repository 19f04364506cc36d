//! `peer reach NAME`: a local port that is the named peer's service. Registers (the
//! rendezvous brokers only registered peers), pins the peer's key on first contact, listens
//! locally, and carries each local connection on the best path of one session: direct UDP
//! (QUIC), else direct TCP (TLS + yamux), else the relay tunnel, as `--transport` and
//! `--no-relay` allow. A session is brokered on the first connection and again, through a
//! new broker exchange, when it is over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use rendezvous::client::{Client, ClientError};
use rendezvous::proto::{PeerInfo, Proto, ServiceRef};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::direct::{self, Direct};
use crate::home::{Home, Pinned};
use crate::signal::{Signaling, Tcp, Udp};
use crate::status::Board;
use crate::transport::{Transport, best_path};
use crate::tunnel::{self, Tunnel};

/// What to reach.
#[derive(Debug, Clone)]
pub struct Reach {
    /// Our own registration (no services).
    pub signaling: Signaling,
    /// The peer's name.
    pub target: String,
    /// Which of its services (TCP port); `None` for its only one.
    pub service: Option<u16>,
    /// The local address to listen on; `None` for `127.0.0.1:<service port>`.
    pub local: Option<SocketAddr>,
    /// Reach a UDP service (datagrams on the local address).
    pub udp: bool,
    /// Which direct paths to punch.
    pub transport: Transport,
    /// Never use the relay: connections wait for a direct path, and fail without one.
    pub no_relay: bool,
}

/// One brokered session: the relay tunnel (unless `--no-relay`) and the counters every
/// connection of the session adds to, whatever path carries it. It is over when the relay
/// tunnel closes, or, without a relay, when every punch has failed or its path died.
#[derive(Debug, Clone)]
struct Session {
    relay: Option<Tunnel>,
    stats: Arc<crate::tunnel::TunnelStats>,
    closed: CancellationToken,
}

/// Held by each punch task of a session without a relay; the last one dropped ends it.
struct PathGuard {
    left: Arc<std::sync::atomic::AtomicUsize>,
    closed: CancellationToken,
    changed: Arc<tokio::sync::Notify>,
}

impl Drop for PathGuard {
    fn drop(&mut self) {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.closed.cancel();
        }
        self.changed.notify_waiters();
    }
}

/// How long to wait for the relay to pair us with the peer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound `reach`, ready to run.
#[derive(Debug)]
pub struct Reacher {
    local: Local,
    state: Arc<State>,
}

/// The local end: a TCP listener or a UDP socket.
#[derive(Debug)]
enum Local {
    Tcp(TcpListener),
    Udp(tokio::net::UdpSocket),
}

#[derive(Debug)]
struct State {
    cfg: Reach,
    key: SigningKey,
    home: Home,
    service: ServiceRef,
    /// The target's key, pinned.
    peer_key: rendezvous::proto::PublicKey,
    shutdown: CancellationToken,
    client: Mutex<Option<Client>>,
    session: Mutex<Option<Session>>,
    /// Woken when a direct path comes up or goes.
    path_changed: Arc<tokio::sync::Notify>,
    /// Why there is no direct UDP / TCP path, for the relay's log lines.
    why_not: std::sync::Mutex<[Option<String>; 2]>,
    /// The UDP endpoint punching starts from, while registered with STUN.
    udp: Mutex<Option<Udp>>,
    /// The shared TCP port punching starts from.
    tcp: Mutex<Option<Arc<Tcp>>>,
    /// The direct path, while it lives.
    direct: Mutex<Option<Direct>>,
    /// The tunnel over a punched TCP connection, while it lives.
    direct_tcp: Mutex<Option<Tunnel>>,
    board: Board,
}

fn pick_service(peer: &PeerInfo, wanted: Option<u16>, proto: Proto) -> anyhow::Result<ServiceRef> {
    let tcp: Vec<ServiceRef> = peer
        .services
        .iter()
        .map(|s| s.reference())
        .filter(|r| r.proto == proto)
        .collect();
    let list = || {
        peer.services
            .iter()
            .map(|s| s.reference().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match wanted {
        Some(p) => tcp.into_iter().find(|r| r.port == p).with_context(|| {
            format!(
                "{} does not offer {p}/tcp; it offers: {}",
                peer.name,
                list()
            )
        }),
        None => match tcp.as_slice() {
            [only] => Ok(*only),
            [] => bail!("{} offers no TCP service (offers: {})", peer.name, list()),
            _ => bail!(
                "{} offers several services ({}); choose one with --service PORT",
                peer.name,
                list()
            ),
        },
    }
}

impl Reacher {
    /// Registers, looks the peer up, pins its key and binds the local port.
    pub async fn bind(
        cfg: Reach,
        home: Home,
        key: SigningKey,
        board: Board,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Reacher> {
        let registration =
            cfg.signaling.register_udp(&key).await.with_context(|| {
                format!("registering with rendezvous {}", cfg.signaling.rendezvous)
            })?;
        let client = registration.client;
        let peer = client
            .lookup(&cfg.target)
            .await
            .with_context(|| format!("looking up {}", cfg.target))?;
        if home.pin(&peer.name, peer.key)? == Pinned::New {
            info!(peer = %peer.name, key = %peer.key, "pinned {}'s key (first contact)", peer.name);
        }
        if let Some(u) = &registration.udp {
            // We reach exactly one peer: our endpoint accepts its direct connections only.
            u.endpoint
                .set_server(crate::quic::server_config(&key, peer.key)?);
        }
        let proto = if cfg.udp { Proto::Udp } else { Proto::Tcp };
        let service = pick_service(&peer, cfg.service, proto)?;
        let local = cfg
            .local
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], service.port)));
        let hint = || format!("listening on {local} (choose another with --local ADDR:PORT)");
        let listener = if cfg.udp {
            Local::Udp(
                tokio::net::UdpSocket::bind(local)
                    .await
                    .with_context(hint)?,
            )
        } else {
            Local::Tcp(TcpListener::bind(local).await.with_context(hint)?)
        };
        info!(
            peer = %peer.name,
            local = %listener.addr().unwrap_or(local),
            "reaching {} {} on {}{}",
            peer.name,
            service,
            local,
            if peer.online { "" } else { " (it is offline now)" }
        );
        Ok(Reacher {
            local: listener,
            state: Arc::new(State {
                cfg,
                key,
                home,
                service,
                peer_key: peer.key,
                shutdown,
                client: Mutex::new(Some(client)),
                session: Mutex::new(None),
                path_changed: Arc::default(),
                why_not: std::sync::Mutex::new([None, None]),
                udp: Mutex::new(registration.udp),
                tcp: Mutex::new(registration.tcp),
                direct: Mutex::new(None),
                direct_tcp: Mutex::new(None),
                board,
            }),
        })
    }

    /// The local address connections should go to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.local.addr()
    }

    /// Serves local connections (or UDP flows) until shutdown.
    pub async fn run(self) -> anyhow::Result<()> {
        let listener = match self.local {
            Local::Tcp(l) => l,
            Local::Udp(sock) => {
                let state = self.state.clone();
                let open = move || {
                    let state = state.clone();
                    async move {
                        let s = match state.session().await {
                            Ok(s) => s,
                            Err(e) => {
                                warn!(error = %format!("{e:#}"), "no tunnel to {}", state.cfg.target);
                                return None;
                            }
                        };
                        // A flow too big for a QUIC datagram, or no UDP path: a stream on
                        // the direct TCP tunnel, else on the relay's.
                        if s.relay.is_none() {
                            state.wait_direct(&s).await;
                        }
                        if let Some(tt) = state.direct_tcp_tunnel().await
                            && let Ok(stream) = tt.open().await
                        {
                            return Some(stream);
                        }
                        s.relay.as_ref()?.open().await.ok()
                    }
                };
                let state = self.state.clone();
                let direct = move || {
                    let state = state.clone();
                    async move { state.direct_conn().await }
                };
                return tokio::select! {
                    _ = self.state.shutdown.cancelled() => Ok(()),
                    r = crate::udp::reach_udp(sock, open, direct) => r.context("local udp socket"),
                };
            }
        };
        loop {
            let (local, from) = tokio::select! {
                _ = self.state.shutdown.cancelled() => return Ok(()),
                r = listener.accept() => r.context("accepting local connections")?,
            };
            let _ = local.set_nodelay(true);
            let state = self.state.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let s = match state.session().await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%from, error = %format!("{e:#}"), "no tunnel to {}", state.cfg.target);
                        return;
                    }
                };
                if s.relay.is_none() && !state.wait_direct(&s).await {
                    warn!(%from, "no direct path to {} and --no-relay: connection closed", state.cfg.target);
                    return;
                }
                let stats = s.stats.clone();
                if let Some(conn) = state.direct_conn().await {
                    match conn.open_bi().await {
                        Ok((send, recv)) => {
                            info!(%from, path = "direct-udp", "connection via the direct path after {:?} (the best one up)", started.elapsed());
                            let stream = tokio::io::join(recv, send);
                            if let Err(e) = tunnel::splice(local, stream, &stats).await {
                                debug!(%from, error = %e, "connection ended with an error");
                            }
                            return;
                        }
                        Err(e) => {
                            warn!(%from, error = %e, "direct udp path failed; trying the next")
                        }
                    }
                }
                if let Some(tt) = state.direct_tcp_tunnel().await {
                    match tt.open().await {
                        Ok(stream) => {
                            info!(%from, path = "direct-tcp", "connection via the direct tcp path after {:?} (no direct udp path up)", started.elapsed());
                            if let Err(e) = tunnel::splice(local, stream, &stats).await {
                                debug!(%from, error = %e, "connection ended with an error");
                            }
                            return;
                        }
                        Err(e) => {
                            warn!(%from, error = %e, "direct tcp path failed; using the relay")
                        }
                    }
                }
                let Some(t) = s.relay.as_ref() else {
                    warn!(%from, "the direct paths to {} failed and --no-relay: connection closed", state.cfg.target);
                    return;
                };
                let stream = match t.open().await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%from, error = %e, "opening a stream failed");
                        return;
                    }
                };
                let why = state.why_relay();
                info!(%from, path = "relay", "connection via the relay after {:?} ({why})", started.elapsed());
                if let Err(e) = tunnel::splice(local, stream, &stats).await {
                    debug!(%from, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

impl Local {
    fn addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Local::Tcp(l) => l.local_addr(),
            Local::Udp(s) => s.local_addr(),
        }
    }
}

impl State {
    /// The direct connection, if one is up.
    async fn direct_conn(&self) -> Option<quinn::Connection> {
        self.direct
            .lock()
            .await
            .as_ref()
            .map(|d| d.conn.clone())
            .filter(|c| c.close_reason().is_none())
    }

    /// The tunnel over the punched TCP connection, if one is up.
    async fn direct_tcp_tunnel(&self) -> Option<Tunnel> {
        self.direct_tcp
            .lock()
            .await
            .clone()
            .filter(|t| !t.is_closed())
    }

    /// Shows the path new connections take now, and wakes connections waiting for one.
    async fn show_path(&self, peer: &str) {
        let udp = self.direct_conn().await.is_some();
        let tcp = self.direct_tcp_tunnel().await.is_some();
        self.board
            .set_path(peer, "reach", best_path(udp, tcp, !self.cfg.no_relay));
        self.path_changed.notify_waiters();
    }

    /// Records why direct path `which` (0: UDP, 1: TCP) did not come up.
    fn not_direct(&self, which: usize, why: String) {
        self.why_not.lock().unwrap_or_else(|e| e.into_inner())[which] = Some(why);
    }

    /// Why a connection takes the relay: what each direct path said, or that it is still
    /// being punched.
    fn why_relay(&self) -> String {
        if self.cfg.transport == Transport::Relay {
            return "--transport relay".into();
        }
        let why = self
            .why_not
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut parts = Vec::new();
        for (i, (name, on)) in [
            ("udp", self.cfg.transport.udp()),
            ("tcp", self.cfg.transport.tcp()),
        ]
        .into_iter()
        .enumerate()
        {
            if on {
                let w = why[i].as_deref().unwrap_or("still punching");
                parts.push(format!("{name}: {w}"));
            }
        }
        parts.join("; ")
    }

    /// Without a relay: waits until a direct path is up (true) or the session is over.
    async fn wait_direct(&self, s: &Session) -> bool {
        loop {
            // Made before looking, so a change between the look and the wait still wakes us.
            let changed = self.path_changed.notified();
            if self.direct_conn().await.is_some() || self.direct_tcp_tunnel().await.is_some() {
                return true;
            }
            if s.closed.is_cancelled() {
                return false;
            }
            tokio::select! {
                _ = changed => {}
                _ = s.closed.cancelled() => {}
            }
        }
    }

    /// Punches whatever `--transport` allows beside the relay (or, with `--no-relay`,
    /// alone: `guard` ends the session when the last punch is over); each direct path that
    /// works is taken by new connections until it dies. Returns how many punches started.
    fn start_punch(self: &Arc<Self>, b: rendezvous::proto::Broker, s: Option<&Session>) -> usize {
        *self.why_not.lock().unwrap_or_else(|e| e.into_inner()) = [None, None];
        let kinds = [self.cfg.transport.udp(), self.cfg.transport.tcp()];
        let n = kinds.iter().filter(|k| **k).count();
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(n));
        let guard = || {
            s.map(|s| PathGuard {
                left: left.clone(),
                closed: s.closed.clone(),
                changed: self.path_changed.clone(),
            })
        };
        if kinds[0] {
            self.start_udp_punch(b.clone(), guard());
        }
        if kinds[1] {
            self.start_tcp_punch(b, guard());
        }
        n
    }

    /// TCP simultaneous open; on the agreed connection the same TLS + yamux tunnel as
    /// over the relay, we being its client.
    fn start_tcp_punch(self: &Arc<Self>, b: rendezvous::proto::Broker, guard: Option<PathGuard>) {
        let state = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let Some(tcp) = state.tcp.lock().await.clone() else {
                info!(peer = %b.peer, "no direct tcp: no shared TCP port");
                state.not_direct(1, "no shared TCP port".into());
                return;
            };
            let d = match crate::direct_tcp::establish_tcp(&tcp, &b).await {
                Ok(d) => d,
                Err(e) => {
                    info!(peer = %b.peer, session = %b.session, "no direct tcp path: {e}");
                    state.not_direct(1, e.to_string());
                    return;
                }
            };
            let t = match tunnel::connect(d.stream, &state.key, b.peer_key).await {
                Ok(t) => t,
                Err(e) => {
                    info!(peer = %b.peer, error = %e, "tunnel handshake on the punched tcp connection failed");
                    return;
                }
            };
            info!(
                peer = %b.peer,
                session = %b.session,
                path = "direct-tcp",
                remote = %d.remote,
                "direct tcp path up in {:.0} ms ({}); new connections take it{}",
                d.elapsed.as_secs_f64() * 1000.0,
                d.why,
                if state.direct_conn().await.is_some() { " when the udp path is gone" } else { "" }
            );
            let closed = t.closed().clone();
            *state.direct_tcp.lock().await = Some(t);
            state.show_path(&b.peer).await;
            closed.cancelled().await;
            info!(peer = %b.peer, "direct tcp path lost; new connections take the next best path");
            state.not_direct(1, "the direct tcp path was lost".into());
            state.show_path(&b.peer).await;
        });
    }

    fn start_udp_punch(self: &Arc<Self>, b: rendezvous::proto::Broker, guard: Option<PathGuard>) {
        let state = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let (endpoint, nat) = {
                let udp = state.udp.lock().await;
                match udp.as_ref() {
                    Some(u) => (u.endpoint.clone(), u.nat),
                    None => {
                        info!(peer = %b.peer, "relay only: no UDP endpoint (no STUN answer)");
                        state.not_direct(0, "no UDP endpoint (no STUN answer)".into());
                        return;
                    }
                }
            };
            let d = match direct::establish(&endpoint, nat, &b, &state.key).await {
                Ok(d) => d,
                Err(e) => {
                    info!(peer = %b.peer, session = %b.session, "staying on the relay: {e}");
                    state.not_direct(0, e.to_string());
                    return;
                }
            };
            info!(
                peer = %b.peer,
                session = %b.session,
                path = "direct-udp",
                "direct path up in {:.0} ms ({}); new connections take it",
                d.elapsed.as_secs_f64() * 1000.0,
                d.why
            );
            let conn = d.conn.clone();
            *state.direct.lock().await = Some(d);
            state.show_path(&b.peer).await;
            let why = conn.closed().await;
            info!(peer = %b.peer, "direct udp path lost ({why}); new connections take the next best path");
            state.not_direct(0, format!("the direct udp path was lost ({why})"));
            state.show_path(&b.peer).await;
        });
    }

    /// The live session, or a new one through a fresh broker exchange.
    async fn session(self: &Arc<Self>) -> anyhow::Result<Session> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.closed.is_cancelled()) {
            return Ok(s.clone());
        }
        let started = Instant::now();
        let b = self.broker().await?;
        // The broker names the key; it must be the one pinned for this name.
        self.home.pin(&b.peer, b.peer_key)?;
        if self.cfg.no_relay {
            let s = Session {
                relay: None,
                stats: Arc::default(),
                closed: CancellationToken::new(),
            };
            if self.start_punch(b.clone(), Some(&s)) == 0 {
                bail!("--no-relay with --transport relay leaves no path");
            }
            info!(peer = %b.peer, session = %b.session, "punching without a relay (--no-relay)");
            self.board
                .add_parts(&b.peer, "reach", "none", &s.stats, &s.closed);
            self.show_path(&b.peer).await;
            *slot = Some(s.clone());
            return Ok(s);
        }
        self.start_punch(b.clone(), None);
        let offer = b.relay.with_context(
            || "the rendezvous offered no relay (started with --no-relay?); this version needs one beside the direct path",
        )?;
        let stream = relay::client::join_tcp(offer.addr, offer.ticket, JOIN_TIMEOUT)
            .await
            .with_context(|| format!("joining relay {}", offer.addr))?;
        let t = tunnel::connect(stream, &self.key, b.peer_key)
            .await
            .with_context(|| {
                format!(
                    "tunnel handshake with {} (is our key in its --allow list?)",
                    b.peer
                )
            })?;
        info!(
            peer = %b.peer,
            session = %b.session,
            path = "relay",
            "tunnel up via relay {} in {:.0} ms",
            offer.addr,
            started.elapsed().as_secs_f64() * 1000.0
        );
        self.board.add(&b.peer, "reach", "relay", &t);
        // A direct path may have come up before the relay tunnel did.
        self.show_path(&b.peer).await;
        let s = Session {
            stats: t.stats.clone(),
            closed: t.closed().clone(),
            relay: Some(t),
        };
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Asks the rendezvous for a session, reconnecting once if our signaling died.
    async fn broker(&self) -> anyhow::Result<rendezvous::proto::Broker> {
        let mut client = self.client.lock().await;
        for attempt in 0..2 {
            if client.is_none() {
                let reg = self
                    .cfg
                    .signaling
                    .register_udp(&self.key)
                    .await
                    .with_context(|| {
                        format!(
                            "reconnecting to rendezvous {}",
                            self.cfg.signaling.rendezvous
                        )
                    })?;
                // The new registration's sockets are the ones whose mappings the rendezvous
                // now hands out: punching must start from them, not the old ones.
                if let Some(u) = &reg.udp {
                    u.endpoint
                        .set_server(crate::quic::server_config(&self.key, self.peer_key)?);
                }
                *self.udp.lock().await = reg.udp;
                *self.tcp.lock().await = reg.tcp;
                *client = Some(reg.client);
            }
            let Some(c) = client.as_ref() else { continue };
            match c.connect_to(&self.cfg.target, Some(self.service)).await {
                Ok(b) => return Ok(b),
                Err(ClientError::Closed(_) | ClientError::Frame(_) | ClientError::Timeout(_))
                    if attempt == 0 =>
                {
                    warn!("lost the rendezvous; reconnecting");
                    *client = None;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("asking to reach {}", self.cfg.target));
                }
            }
        }
        bail!(
            "rendezvous {} keeps dropping us",
            self.cfg.signaling.rendezvous
        )
    }
}
