//! `peer reach NAME`: a local port that is the named peer's service. Registers (the
//! rendezvous brokers only registered peers), pins the peer's key on first contact, listens
//! locally, and carries every local connection as a stream (every UDP flow as datagrams) of
//! one [`Session`] with the peer, whatever path carries it at the moment.
//!
//! The first connection asks the rendezvous to broker a session; this side then joins the
//! relay and punches beside it, and the exposing side dials the session over the first
//! path that is ready and adds the others as they come. When a direct path is lost, this
//! side asks for a new broker exchange in the background (with backoff) until a re-punch
//! brings one back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::signal::client::{Client, ClientError};
use wire::signal::{Broker, ErrorCode, PeerInfo, Proto, ServiceRef};

use crate::defaults;
use crate::forward::tcp as forward;
use crate::home::{Home, Pinned};
use crate::path::PathKind;
use crate::path::link::Link;
use crate::path::make::{self, From, Made, Wanted};
use crate::presence::endpoint::UdpEndpoint;
use crate::presence::signal::{Registration, Signaling, Tcp, Udp};
use crate::session::Session;
use crate::status::Board;
use crate::transport::{Policy, Transport};

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

/// The sockets paths start from, as the current registration has them.
#[derive(Debug)]
struct Presence {
    endpoint: UdpEndpoint,
    /// Kept for its refreshes; `None` when STUN did not answer over UDP.
    udp: Option<Udp>,
    tcp: Option<Arc<Tcp>>,
    /// Stops this endpoint's accept loop when a new registration replaces it.
    accepting: CancellationToken,
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.accepting.cancel();
    }
}

impl Presence {
    /// What a new registration keeps of this one.
    fn reuse(&self) -> crate::presence::signal::Reuse {
        crate::presence::signal::Reuse {
            endpoint: self.endpoint.clone(),
            portmap: self.udp.as_ref().and_then(|u| u.portmap.clone()),
        }
    }
}

#[derive(Debug)]
struct State {
    cfg: Reach,
    key: SigningKey,
    home: Home,
    service: ServiceRef,
    /// The target's key, pinned.
    peer_key: wire::signal::PublicKey,
    shutdown: CancellationToken,
    client: Mutex<Option<Client>>,
    presence: Mutex<Presence>,
    /// One broker exchange at a time.
    opening: Mutex<()>,
    /// The live session; replaced when the other side dials a new one.
    session: watch::Sender<Option<Session>>,
    /// Links that came up before the session they belong to.
    spare: SyncMutex<Vec<Link>>,
    /// Why there is no direct UDP / TCP path, for the relay's log lines.
    why_not: SyncMutex<[Option<String>; 2]>,
    board: Board,
    /// The other side's IPs from the latest broker message: the only sources, besides our
    /// own links, whose QUIC handshakes are taken. Anyone else's Initials are ignored
    /// before any TLS work or connection state.
    expected: SyncMutex<Vec<std::net::IpAddr>>,
    /// Reports our session to the rendezvous over the current signaling connection.
    reports: SyncMutex<Option<crate::presence::report::Reporting>>,
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
    /// `peer ping`: the session with the peer (brokered now if there is none), then its
    /// paths `count` times, `every` apart, each time handed to `round` (which prints).
    pub async fn ping(
        &self,
        count: u32,
        every: Duration,
        mut round: impl FnMut(u32, &[crate::session::PathReport]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let s = self.state.session().await?;
        for seq in 1..=count.max(1) {
            if seq > 1 {
                tokio::select! {
                    _ = self.state.shutdown.cancelled() => return Ok(()),
                    _ = s.closed().cancelled() => anyhow::bail!("the session with {} closed", s.peer()),
                    _ = tokio::time::sleep(every) => {}
                }
            }
            round(seq, &s.report())?;
        }
        s.close("ping done");
        Ok(())
    }

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
        board.registered(crate::status::RegistrationStatus::of(
            &cfg.signaling.name,
            "reach",
            &cfg.signaling.rendezvous,
            &[],
            &registration,
        ));
        let peer = registration
            .client
            .lookup(&cfg.target)
            .await
            .with_context(|| format!("looking up {}", cfg.target))?;
        if home.pin(&peer.name, peer.key)? == Pinned::New {
            info!(peer = %peer.name, key = %peer.key, "pinned {}'s key (first contact)", peer.name);
        }
        let proto = if cfg.udp { Proto::Udp } else { Proto::Tcp };
        let service = pick_service(&peer, cfg.service, proto)?;
        let local = cfg
            .local
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], service.port)));
        // Reaching our own exposed port on the port it exposes: when nothing listens there
        // the exposer's connections land on this very listener, and each one opens another.
        let me = wire::signal::PublicKey(key.verifying_key().to_bytes());
        if peer.key == me && local.port() == service.port && local.ip().is_loopback() {
            bail!(
                "{} is this peer itself (the same key), exposing port {}: listening on {local} \
                 would forward every connection back into itself; choose another --local \
                 ADDR:PORT",
                peer.name,
                service.port
            );
        }
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
        let (client, presence) = split(registration);
        let reports = crate::presence::report::spawn(
            client.reporter(),
            board.clone(),
            cfg.signaling.name.clone(),
        );
        let state = Arc::new(State {
            cfg,
            key,
            home,
            service,
            peer_key: peer.key,
            shutdown,
            client: Mutex::new(Some(client)),
            presence: Mutex::new(presence),
            opening: Mutex::new(()),
            session: watch::Sender::new(None),
            spare: SyncMutex::default(),
            why_not: SyncMutex::new([None, None]),
            board,
            expected: SyncMutex::default(),
            reports: SyncMutex::new(Some(reports)),
        });
        state.accept_on(&*state.presence.lock().await)?;
        tokio::spawn(state.clone().follow_moves());
        Ok(Reacher {
            local: listener,
            state,
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
                let session = move || {
                    let state = state.clone();
                    async move {
                        match state.session().await {
                            Ok(s) => Some(s.conn().clone()),
                            Err(e) => {
                                warn!(error = %wire::cli::chain(&e), "no session with {}", state.cfg.target);
                                None
                            }
                        }
                    }
                };
                let r = tokio::select! {
                    _ = self.state.shutdown.cancelled() => Ok(()),
                    r = crate::forward::udp::reach_udp(sock, session) => r.context("local udp socket"),
                };
                self.state.stop().await;
                return r;
            }
        };
        loop {
            let (local, from) = tokio::select! {
                _ = self.state.shutdown.cancelled() => {
                    self.state.stop().await;
                    return Ok(());
                }
                r = listener.accept() => r.context("accepting local connections")?,
            };
            let _ = local.set_nodelay(true);
            let state = self.state.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let s = match state.session().await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%from, error = %wire::cli::chain(&e), "no session with {}", state.cfg.target);
                        return;
                    }
                };
                let (mut send, recv) = match s.conn().open_bi().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(%from, error = %e, "opening a stream failed");
                        return;
                    }
                };
                if let Err(e) = forward::announce(&mut send).await {
                    warn!(%from, error = %e, "opening a stream failed");
                    return;
                }
                let after = started.elapsed();
                match s.active() {
                    Some(PathKind::DirectUdp) => {
                        info!(%from, path = "direct-udp", "connection via the direct path after {after:?} (the best one up)")
                    }
                    Some(PathKind::DirectTcp) => {
                        info!(%from, path = "direct-tcp", "connection via the direct tcp path after {after:?} (no direct udp path up)")
                    }
                    Some(k) => {
                        info!(%from, path = k.name(), "connection via the relay after {after:?} ({})", state.why_relay())
                    }
                    None => {
                        info!(%from, path = "none", "connection waiting for a path after {after:?}")
                    }
                }
                match forward::splice(local, send, recv, s.stats()).await {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        warn!(%from, peer = %state.cfg.target, "{} cannot reach the service it exposes (nothing listens there?): connection reset", state.cfg.target);
                    }
                    Err(e) => debug!(%from, error = %e, "connection ended with an error"),
                    Ok(()) => {}
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

/// The signaling client and the presence of a registration.
fn split(reg: Registration) -> (Client, Presence) {
    (
        reg.client,
        Presence {
            endpoint: reg.endpoint,
            udp: reg.udp,
            tcp: reg.tcp,
            accepting: CancellationToken::new(),
        },
    )
}

impl State {
    /// On the way out: closes the session with a reason and lets the close go out, so the
    /// other side's connections end now, not at its idle timeout.
    async fn stop(&self) {
        let endpoint = self.presence.lock().await.endpoint.clone();
        if let Some(s) = self.live() {
            s.close("the reaching peer stopped");
            crate::session::flush_closes(endpoint.quic()).await;
        }
        if let Some(u) = &mut self.presence.lock().await.udp {
            u.release_mapping().await;
        }
    }

    /// Whether a QUIC handshake from `from` may be the other side's: over one of our
    /// links (a made-up address only we hand out), or from an IP the broker named.
    fn expects(&self, from: std::net::SocketAddr) -> bool {
        crate::path::is_mapped(&from)
            || self
                .expected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&crate::path::canonical(from).ip())
    }

    fn policy(&self) -> Policy {
        Policy {
            transport: self.cfg.transport,
            no_relay: self.cfg.no_relay,
        }
    }

    fn live(&self) -> Option<Session> {
        self.session
            .borrow()
            .clone()
            .filter(|s| !s.closed().is_cancelled())
    }

    /// Accepts the sessions the other side dials on `p`'s endpoint (pinned to its key),
    /// until the presence is replaced.
    fn accept_on(self: &Arc<Self>, p: &Presence) -> anyhow::Result<()> {
        p.endpoint
            .set_server(crate::quic::server_config(&self.key, self.peer_key)?);
        let (state, endpoint, stop) = (self.clone(), p.endpoint.clone(), p.accepting.clone());
        tokio::spawn(async move {
            loop {
                let incoming = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = state.shutdown.cancelled() => return,
                    i = endpoint.quic().accept() => match i { Some(i) => i, None => return },
                };
                let from = incoming.remote_address();
                if !state.expects(from) {
                    debug!(%from, "a QUIC handshake from outside the peer's addresses; ignored");
                    incoming.ignore();
                    continue;
                }
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "a session handshake failed");
                        continue;
                    }
                };
                let links =
                    std::mem::take(&mut *state.spare.lock().unwrap_or_else(|e| e.into_inner()));
                let s = Session::start(conn, &state.cfg.target, state.policy(), links);
                debug!(peer = %state.cfg.target, "session up");
                state
                    .board
                    .add(&state.cfg.signaling.name, &state.cfg.target, "reach", &s);
                if let Some(old) = state.session.send_replace(Some(s.clone())) {
                    old.close("replaced by a new session");
                }
                tokio::spawn(state.clone().repunch(s));
            }
        });
        Ok(())
    }

    /// Gives `link` to the live session, or keeps it for the one about to come.
    fn adopt(&self, link: Link) {
        match self.live() {
            Some(s) => s.hold(link),
            None => self
                .spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(link),
        }
    }

    /// Records why direct path `kind` did not come up.
    fn not_direct(&self, kind: PathKind, why: String) {
        let i = usize::from(kind == PathKind::DirectTcp);
        self.why_not.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(why);
    }

    /// Why traffic is on the relay: what each direct path said, or that it is still being
    /// punched.
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

    /// Starts this side of every path for broker message `b`: the relay half (when
    /// `relay`) and the punches `--transport` allows. Links that come up go to the
    /// session, reasons for failures to the relay's log lines; each attempt's outcome (a
    /// path or not) goes to `outcomes`. Returns how many attempts started.
    async fn start_paths(
        self: &Arc<Self>,
        b: &Broker,
        relay: bool,
        outcomes: Option<mpsc::Sender<bool>>,
    ) -> usize {
        let from = {
            let p = self.presence.lock().await;
            From {
                endpoint: p.endpoint.clone(),
                udp: p.udp.as_ref().map(|u| u.nat),
                tcp: p.tcp.clone(),
                mapped: p
                    .udp
                    .as_ref()
                    .and_then(|u| u.portmap.as_ref())
                    .map(|m| m.watch()),
            }
        };
        *self.why_not.lock().unwrap_or_else(|e| e.into_inner()) = [None, None];
        let c = &b.candidates;
        let ips = c.udp.iter().chain(&c.tcp).chain(&c.lan);
        *self.expected.lock().unwrap_or_else(|e| e.into_inner()) =
            ips.map(|a| crate::path::canonical(*a).ip()).collect();
        let want = Wanted {
            relay: relay && !self.cfg.no_relay,
            udp: self.cfg.transport.udp(),
            tcp: self.cfg.transport.tcp(),
        };
        let (tx, mut rx) = mpsc::channel(4);
        let n = make::start(&from, b, want, &tx);
        drop(tx);
        let state = self.clone();
        tokio::spawn(async move {
            while let Some(made) = rx.recv().await {
                let ok = match made {
                    Made::Path { link, .. } => {
                        if let Some(link) = link {
                            state.adopt(link);
                        }
                        true
                    }
                    Made::Failed { kind, why } => {
                        if kind.is_direct() {
                            state.not_direct(kind, why);
                        }
                        false
                    }
                };
                if let Some(tx) = &outcomes {
                    let _ = tx.send(ok).await;
                }
            }
        });
        n
    }

    /// The live session, or a new one through a fresh broker exchange.
    async fn session(self: &Arc<Self>) -> anyhow::Result<Session> {
        let _one = self.opening.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let mut news = self.session.subscribe();
        news.borrow_and_update();
        let started = Instant::now();
        let b = self.broker().await?;
        // The broker names the key; it must be the one pinned for this name.
        self.home.pin(&b.peer, b.peer_key)?;
        let (tx, mut rx) = mpsc::channel(4);
        let mut pending = self.start_paths(&b, true, Some(tx)).await;
        if pending == 0 {
            bail!(
                "no path to {} is possible ({}{})",
                self.cfg.target,
                match (&b.relay, self.cfg.no_relay) {
                    (_, true) => "--no-relay; ",
                    (None, false) => "the rendezvous offers no relay (it runs with --no-relay); ",
                    (Some(_), false) => "",
                },
                self.why_relay()
            );
        }
        if self.cfg.no_relay {
            info!(peer = %b.peer, session = %b.session, "punching without a relay (--no-relay)");
        }
        let mut made = 0;
        let give_up = tokio::time::sleep(defaults::SESSION_OPEN);
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                _ = news.changed() => {
                    let Some(s) = self.session.borrow().clone() else { continue };
                    if let Some(why) = s.conn().close_reason() {
                        bail!("{} closed the session at once: {why}", self.cfg.target);
                    }
                    debug!(peer = %b.peer, "session opened {:?} after asking", started.elapsed());
                    return Ok(s);
                }
                r = rx.recv(), if pending > 0 => {
                    match r {
                        Some(ok) => {
                            pending -= 1;
                            made += usize::from(ok);
                        }
                        // Every attempt has reported.
                        None => pending = 0,
                    }
                    if pending == 0 && made == 0 {
                        let relay = match (&b.relay, self.cfg.no_relay) {
                            (_, true) => "; --no-relay",
                            (None, false) => "; and the rendezvous offers no relay (it runs with \
                                --no-relay): only a punched path can carry this pair",
                            (Some(_), false) => "",
                        };
                        bail!("no path to {}: {}{relay}", self.cfg.target, self.why_relay());
                    }
                }
                _ = &mut give_up => bail!(
                    "{} did not open a session within {:?} (is our key in its --allow list?)",
                    self.cfg.target,
                    defaults::SESSION_OPEN
                ),
            }
        }
    }

    /// While `s` lives: whenever its last direct path is lost, asks for new broker
    /// exchanges (with backoff) and punches again, until a direct path is back.
    async fn repunch(self: Arc<Self>, s: Session) {
        if self.cfg.transport == Transport::Relay {
            return;
        }
        let mut active = s.watch_active();
        let mut had_direct = false;
        loop {
            let now = *active.borrow_and_update();
            let direct = now.is_some_and(PathKind::is_direct);
            if !had_direct || direct {
                had_direct |= direct;
                tokio::select! {
                    _ = s.closed().cancelled() => return,
                    r = active.changed() => if r.is_err() { return },
                }
                continue;
            }
            let mut wait = defaults::REPUNCH_FIRST;
            loop {
                tokio::select! {
                    _ = s.closed().cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if active.borrow().is_some_and(PathKind::is_direct) {
                    break;
                }
                match self.broker().await {
                    Ok(b) => {
                        info!(peer = %b.peer, session = %b.session, "re-punching after losing the direct path");
                        self.start_paths(&b, false, None).await;
                    }
                    Err(e) => debug!(error = %wire::cli::chain(&e), "re-punch: no broker exchange"),
                }
                wait = (wait * 2).min(defaults::REPUNCH_MAX);
                // A re-punch takes a few seconds; give it that before the next.
                let until = tokio::time::Instant::now() + defaults::REPUNCH_SETTLE.min(wait);
                while !active.borrow().is_some_and(PathKind::is_direct) {
                    tokio::select! {
                        _ = s.closed().cancelled() => return,
                        _ = tokio::time::sleep_until(until) => break,
                        r = active.changed() => if r.is_err() { return },
                    }
                }
                if active.borrow().is_some_and(PathKind::is_direct) {
                    break;
                }
            }
        }
    }

    /// Follows moves to other networks and changes of our NAT mapping: each time,
    /// registers again from where we are now and, with a live session, punches anew (its
    /// connections carry on over whichever path works meanwhile).
    async fn follow_moves(self: Arc<Self>) {
        let mut moves = crate::presence::moves::Moves::start().await;
        loop {
            let mut mapping = self
                .presence
                .lock()
                .await
                .udp
                .as_ref()
                .map(|u| u.mapping_changed.clone());
            let mapping_changed = async {
                match &mut mapping {
                    Some(m) => m.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                why = moves.next() => why,
                changed = mapping_changed => {
                    if !changed {
                        // That registration was replaced: watch the new one's.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    "our NAT mapping changed".to_owned()
                }
            };
            self.moved(&why).await;
        }
    }

    /// After a move: a new registration (the old signaling connection left from an
    /// address we no longer have) and, for a live session, a new punch and relay half.
    async fn moved(self: &Arc<Self>, why: &str) {
        info!(peer = %self.cfg.target, "network changed ({why}): registering again and punching anew");
        *self.client.lock().await = None;
        if let Some(s) = self.live() {
            s.moved();
        } else {
            // Nobody to punch to yet: be findable from here for the next connection.
            if let Err(e) = self.reregister().await {
                warn!(error = %wire::cli::chain(&e), "registering again after the move");
            }
            return;
        }
        match self.broker().await {
            Ok(b) => {
                info!(peer = %b.peer, session = %b.session, "re-punching after the move");
                self.start_paths(&b, false, None).await;
            }
            Err(e) => {
                warn!(error = %wire::cli::chain(&e), "no broker exchange after the move; the session keeps its paths that still work")
            }
        }
    }

    /// Registers again now (with the same UDP endpoint), if the signaling connection is
    /// gone.
    async fn reregister(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut client = self.client.lock().await;
        if client.is_none() {
            *client = Some(self.register_again().await?);
        }
        Ok(())
    }

    /// A new registration on the same UDP endpoint and port mapping (the live session
    /// runs on its QUIC endpoint, so new paths for it must start from that socket; after a
    /// move it has a new mapping, which the registration observes), installed as our
    /// presence. The caller holds the client slot.
    async fn register_again(self: &Arc<Self>) -> anyhow::Result<Client> {
        let reuse = self.presence.lock().await.reuse();
        let reg = self
            .cfg
            .signaling
            .register_udp_on(&self.key, Some(reuse))
            .await
            .with_context(|| {
                format!(
                    "registering again with rendezvous {}",
                    self.cfg.signaling.rendezvous
                )
            })?;
        let (c, presence) = split(reg);
        self.accept_on(&presence)?;
        *self.presence.lock().await = presence;
        *self.reports.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(crate::presence::report::spawn(
                c.reporter(),
                self.board.clone(),
                self.cfg.signaling.name.clone(),
            ));
        Ok(c)
    }

    /// Asks the rendezvous for a session, reconnecting once if our signaling died.
    async fn broker(self: &Arc<Self>) -> anyhow::Result<Broker> {
        let mut client = self.client.lock().await;
        // A target asked too often right now (the rendezvous' quota, perhaps spent by
        // someone flooding it) frees up within a second or two: wait a little, a few times.
        let mut busy_waits = [250u64, 500, 1000, 2000].into_iter();
        let mut attempt = 0;
        while attempt < 2 {
            if client.is_none() {
                *client = Some(self.register_again().await?);
            }
            let Some(c) = client.as_ref() else { continue };
            match c.connect_to(&self.cfg.target, Some(self.service)).await {
                Ok(b) => return Ok(b),
                Err(ClientError::Refused(e)) if e.code == ErrorCode::Busy => {
                    let Some(ms) = busy_waits.next() else {
                        return Err(ClientError::Refused(e))
                            .with_context(|| format!("asking to reach {}", self.cfg.target));
                    };
                    info!(target = %self.cfg.target, "rendezvous busy ({}); asking again in {ms} ms", e.message);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    continue;
                }
                Err(ClientError::Closed(_) | ClientError::Frame(_) | ClientError::Timeout(_))
                    if attempt == 0 =>
                {
                    warn!("lost the rendezvous; reconnecting");
                    *client = None;
                    attempt += 1;
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
