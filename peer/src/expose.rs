//! `peer expose PORT`: keep a service reachable under a name. Stays registered (reconnecting
//! when the rendezvous goes away, while sessions keep serving), and for every reaching peer
//! keeps one [`Session`]: it joins the relay and punches the direct paths `--transport`
//! allows, all at once; dials the session's QUIC connection (pinned to the reaching peer's
//! key from the broker message) over whichever path is ready first, and opens the others
//! as further paths when they are. A later broker message for a peer that already has a
//! session is that peer asking to re-punch: its punches become new paths of the same
//! session. Every stream the other side opens is connected to the local service.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ed25519_dalek::SigningKey;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::signal::client::ClientEvent;
use wire::signal::{Broker, HttpAuth, PublicKey, PublicOpen, Publish};

use crate::defaults;
use crate::forward::tcp::{self as forward, TunnelStats};
use crate::path::link::Link;
use crate::path::make::{self, From, Made, Wanted};
use crate::path::{PathKind, for_quic};
use crate::presence::signal::Signaling;
use crate::session::Session;
use crate::status::Board;
use crate::transport::{Policy, Transport};

/// What to expose.
#[derive(Debug, Clone)]
pub struct Expose {
    /// Registration.
    pub signaling: Signaling,
    /// Where the service listens on this machine (or on `--to HOST`).
    pub target: String,
    /// Keys allowed to reach us; empty allows every key the rendezvous brokers.
    pub allow: Vec<PublicKey>,
    /// The service is UDP: every flow is a datagram flow ([`crate::forward::udp`]).
    pub udp: bool,
    /// Which direct paths to punch.
    pub transport: Transport,
    /// Never join the relay: sessions live on direct paths only.
    pub no_relay: bool,
    /// Sessions served at once (one per reaching key); brokers for further keys are
    /// refused.
    pub max_sessions: usize,
    /// Publish the service to clients that run no `peer` (through the rendezvous' public
    /// entries), asked again at every registration.
    pub public: Option<Publish>,
}

/// What the `--public*` flags ask for, as a publish request for `service`.
pub fn public_request(
    service: wire::signal::ServiceRef,
    http: bool,
    tls: bool,
    port: Option<u16>,
    auth: Option<&str>,
) -> anyhow::Result<Option<Publish>> {
    if !http && !tls && port.is_none() {
        anyhow::ensure!(
            auth.is_none(),
            "--public-auth protects --public: add --public"
        );
        return Ok(None);
    }
    let auth = match auth {
        Some(a) => {
            anyhow::ensure!(http, "--public-auth protects the HTTP entry: add --public");
            Some(HttpAuth::parse(a).map_err(|e| anyhow::anyhow!("--public-auth: {e}"))?)
        }
        None => None,
    };
    Ok(Some(Publish {
        service,
        http,
        tls,
        port: port.map(|p| (p != 0).then_some(p)),
        auth,
    }))
}

impl Expose {
    fn policy(&self) -> Policy {
        Policy {
            transport: self.transport,
            no_relay: self.no_relay,
        }
    }
}

/// Live sessions by the reaching peer's key: where its further broker messages go.
type Sessions = Arc<Mutex<HashMap<PublicKey, mpsc::Sender<Broker>>>>;

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
    let sessions: Sessions = Arc::default();
    // Session tasks, so that a stop waits (briefly) until each has told its peer.
    let tasks = tokio_util::task::TaskTracker::new();
    let stopped = || async {
        tasks.close();
        let _ = tokio::time::timeout(defaults::CLOSE_FLUSH * 2, tasks.wait()).await;
        Ok(())
    };
    let mut first = true;
    // Public clients being carried: bounded, as the rendezvous bounds them per service.
    let public_slots = Arc::new(tokio::sync::Semaphore::new(defaults::MAX_PUBLIC_CONNS));
    // The UDP endpoint outlives registrations: sessions run on its QUIC endpoint, so a
    // re-registration (after a move, or a lost rendezvous) keeps it and new paths for
    // those sessions start from it.
    let mut kept: Option<crate::presence::signal::Reuse> = None;
    let mut moves = crate::presence::moves::Moves::start().await;
    loop {
        let Some(registration) = cfg
            .signaling
            .register_until_up(&key, &shutdown, kept.clone())
            .await?
        else {
            return stopped().await;
        };
        kept = Some(registration.reuse());
        let mut status = crate::status::RegistrationStatus::of(
            &cfg.signaling.name,
            "expose",
            &cfg.signaling.rendezvous,
            &cfg.signaling.services,
            &registration,
        );
        if let Some(p) = &cfg.public {
            match registration.client.publish(p.clone()).await {
                Ok(published) => {
                    let urls = published.urls();
                    info!(name = %cfg.signaling.name, "public at {}", urls.join(", "));
                    status.public = urls;
                }
                // The first time, a refusal is the answer to what the user asked: say it
                // and stop. After a reconnect (a server restarted with other settings),
                // peers can still reach the service: keep serving them.
                Err(e) if first => {
                    return Err(anyhow::anyhow!(e).context(format!(
                        "publishing {} to public clients",
                        cfg.signaling.name
                    )));
                }
                Err(e) => {
                    warn!(error = %e, "could not publish again after reconnecting; peers still reach the service");
                }
            }
        }
        first = false;
        let _reports = crate::presence::report::spawn(
            registration.client.reporter(),
            board.clone(),
            cfg.signaling.name.clone(),
        );
        // The UDP presence lives as long as this registration: its refreshes keep the
        // observed mapping the one the rendezvous hands out.
        board.registered(status);
        let (mut client, mut udp) = (registration.client, registration.udp);
        let from = From {
            endpoint: registration.endpoint,
            udp: udp.as_ref().map(|u| u.nat),
            tcp: registration.tcp,
            mapped: udp
                .as_ref()
                .and_then(|u| u.portmap.as_ref())
                .map(|p| p.watch()),
        };
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(u) = &mut udp {
                        u.release_mapping().await;
                    }
                    return stopped().await;
                }
                why = moves.next() => {
                    // Our signaling connection left from an address we may no longer
                    // have: register again from here; the reaching side re-punches when
                    // its direct path goes quiet.
                    info!(name = %cfg.signaling.name, "network changed ({why}): registering again");
                    break;
                }
                e = client.next_event() => e,
            };
            match event {
                Some(ClientEvent::Broker(b)) => {
                    let b = *b;
                    let known = sessions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&b.peer_key)
                        .cloned();
                    // One session per reaching key: a further broker for the same key is
                    // a re-punch, and one queued is enough.
                    let open = match known {
                        Some(tx) => match tx.try_send(b.clone()) {
                            Ok(()) => {
                                info!(peer = %b.peer, session = %b.session, "re-punching for the live session");
                                false
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                debug!(peer = %b.peer, "a re-punch is already queued; this one is dropped");
                                false
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => true,
                        },
                        None => true,
                    };
                    let serving = sessions.lock().unwrap_or_else(|e| e.into_inner()).len();
                    if open && serving >= cfg.max_sessions {
                        warn!(peer = %b.peer, key = %b.peer_key, "refused: already serving {serving} sessions (--max-sessions)");
                        continue;
                    }
                    match open {
                        false => {}
                        true => {
                            let (tx, rx) = mpsc::channel(1);
                            sessions
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(b.peer_key, tx);
                            let ctx = Ctx {
                                cfg: cfg.clone(),
                                key: key.clone(),
                                board: board.clone(),
                                from: from.clone(),
                            };
                            let sessions = sessions.clone();
                            let shutdown = shutdown.clone();
                            tasks.spawn(async move {
                                let peer_key = b.peer_key;
                                session(ctx, b, rx, shutdown).await;
                                let mut s = sessions.lock().unwrap_or_else(|e| e.into_inner());
                                if s.get(&peer_key).is_some_and(|tx| tx.is_closed()) {
                                    s.remove(&peer_key);
                                }
                            });
                        }
                    }
                }
                Some(ClientEvent::Open(o)) => {
                    let Ok(slot) = public_slots.clone().try_acquire_owned() else {
                        warn!(client = %o.client, "public client dropped: already carrying {} (the most)", defaults::MAX_PUBLIC_CONNS);
                        continue;
                    };
                    let cfg = cfg.clone();
                    tokio::spawn(async move {
                        serve_public(&cfg, *o).await;
                        drop(slot);
                    });
                }
                Some(ClientEvent::Closed(e)) => {
                    warn!(error = %e, "lost the rendezvous; sessions keep serving, reconnecting");
                    board.unregistered(&cfg.signaling.name);
                    break;
                }
                None => break,
            }
        }
    }
}

/// Carries one public client: joins the relay session the rendezvous opened, connects it
/// to the service, and says whether the service took it (so that an HTTP client gets a
/// page saying so instead of an empty reply).
async fn serve_public(cfg: &Expose, o: PublicOpen) {
    use tokio::io::AsyncWriteExt as _;
    use wire::signal::public::{OPEN_OK, OPEN_REFUSED};
    let ours = cfg
        .signaling
        .services
        .iter()
        .any(|s| s.reference() == o.service);
    if !ours || cfg.udp != (o.entry == wire::signal::EntryKind::UdpPort) {
        warn!(service = %o.service, "public client for a service this process does not expose; ignored");
        return;
    }
    if cfg.udp {
        if let Err(e) = serve_public_udp(cfg, &o).await {
            warn!(client = %o.client, error = %e, "public udp client lost");
        }
        return;
    }
    let mut relay = match wire::relay::client::join_tcp(
        o.relay.addr,
        o.relay.ticket,
        o.relay.secret,
        defaults::PUBLIC_JOIN_TIMEOUT,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(client = %o.client, error = %e, "public client lost: cannot join the relay");
            return;
        }
    };
    let mut service = match TcpStream::connect(&cfg.target).await {
        Ok(s) => s,
        Err(e) => {
            warn!(target = %cfg.target, client = %o.client, error = %e, "cannot reach the exposed service for a public client");
            let _ = relay.write_all(&[OPEN_REFUSED]).await;
            return;
        }
    };
    let _ = service.set_nodelay(true);
    if relay.write_all(&[OPEN_OK]).await.is_err() {
        return;
    }
    debug!(client = %o.client, entry = o.entry.as_str(), "public client connected to the service");
    match tokio::io::copy_bidirectional(&mut relay, &mut service).await {
        Ok((up, down)) => debug!(client = %o.client, up, down, "public client done"),
        Err(e) => debug!(client = %o.client, error = %e, "public client ended"),
    }
}

/// Carries one public UDP flow: joins the relay session over UDP, and moves datagrams
/// between it (each prefixed with [`UDP_DATA`](wire::signal::public::UDP_DATA) there) and
/// a socket connected to the service, until the flow falls silent.
async fn serve_public_udp(cfg: &Expose, o: &PublicOpen) -> anyhow::Result<()> {
    use wire::relay::client::{UdpJoin, join_udp};
    use wire::signal::public::UDP_DATA;
    let relay = o.relay.addr;
    let any = |a: SocketAddr| -> SocketAddr {
        match a {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        }
    };
    let sock = tokio::net::UdpSocket::bind(any(relay)).await?;
    let join = UdpJoin::new(o.relay.ticket.clone(), o.relay.secret);
    join_udp(
        &sock,
        relay,
        &join,
        std::time::Duration::from_millis(200),
        defaults::PUBLIC_JOIN_TIMEOUT,
    )
    .await?;
    let service = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    service.connect(&cfg.target).await?;
    debug!(client = %o.client, "public udp flow connected to the service");
    let mut buf = vec![0u8; 65536];
    let mut back = vec![0u8; 65536];
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, from) = r?;
                if from != relay || n == 0 {
                    continue;
                }
                if buf[0] == UDP_DATA {
                    let _ = service.send(&buf[1..n]).await;
                } else if let Some(answer) = join.answer(&buf[..n]) {
                    // The relay asks again (its cookie window turned): prove again.
                    sock.send_to(&answer, relay).await?;
                }
            }
            r = service.recv(&mut back[1..]) => {
                let Ok(n) = r else { continue };
                back[0] = UDP_DATA;
                let _ = sock.send_to(&back[..=n], relay).await;
            }
            _ = tokio::time::sleep(defaults::PUBLIC_UDP_IDLE) => return Ok(()),
        }
    }
}

#[derive(Clone)]
struct Ctx {
    cfg: Arc<Expose>,
    key: Arc<SigningKey>,
    board: Board,
    from: From,
}

/// Starts the attempts at a path for broker message `b` that `--transport` and
/// `--no-relay` allow (the relay only when `relay`: not on a re-punch); returns how many
/// will report on `tx`.
fn start_paths(ctx: &Ctx, b: &Broker, relay: bool, tx: &mpsc::Sender<Made>) -> usize {
    let want = Wanted {
        relay: relay && !ctx.cfg.no_relay,
        udp: ctx.cfg.transport.udp(),
        tcp: ctx.cfg.transport.tcp(),
    };
    make::start(&ctx.from, b, want, tx)
}

/// Serves one reaching peer: dials its session over the first path that is ready, adds the
/// others (and those of re-punches) as they come, until the session ends.
async fn session(
    ctx: Ctx,
    b: Broker,
    mut repunch: mpsc::Receiver<Broker>,
    shutdown: CancellationToken,
) {
    let peer = b.peer.clone();
    let refused = !ctx.cfg.allow.is_empty() && !ctx.cfg.allow.contains(&b.peer_key);
    if refused {
        warn!(%peer, key = %b.peer_key, "refused: key not in --allow");
    }
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel(8);
    // A refused peer still gets the relay (only), so that it hears "refused" at once
    // instead of waiting for a timeout.
    let mut pending = if refused {
        let only_relay = Wanted {
            relay: true,
            udp: false,
            tcp: false,
        };
        make::start(&ctx.from, &b, only_relay, &tx)
    } else {
        start_paths(&ctx, &b, true, &tx)
    };
    let mut live: Option<Session> = None;
    loop {
        let closed = async {
            match &live {
                Some(s) => s.closed().cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = closed => break,
            nb = repunch.recv() => match nb {
                // At most one re-punch runs beside the first attempt: a flood of brokers
                // for this key costs no more probes than that.
                Some(_) if pending > 3 => debug!(%peer, "re-punch asked while punching; ignored"),
                Some(nb) => pending += start_paths(&ctx, &nb, false, &tx),
                None => break,
            },
            r = rx.recv() => {
                pending = pending.saturating_sub(1);
                match r {
                    Some(Made::Path { kind, addr, link, fallbacks }) => {
                        if let Some(s) = &live {
                            if let Some(l) = link {
                                s.hold(l);
                            }
                            s.open_path(addr);
                        } else {
                            match dial(&ctx, &b, kind, (addr, &fallbacks), link, refused).await {
                                Some(s) => {
                                    info!(%peer, session = %b.session, path = kind.name(), "session up in {:.0} ms over the {kind} path", started.elapsed().as_secs_f64() * 1000.0);
                                    serve(&ctx, &s);
                                    ctx.board.add(&ctx.cfg.signaling.name, &peer, "expose", &s);
                                    live = Some(s);
                                }
                                None if refused => break,
                                None => {}
                            }
                        }
                    }
                    Some(Made::Failed { .. }) | None => {}
                }
                if live.is_none() && pending == 0 {
                    warn!(%peer, session = %b.session, "no path to {peer}: session given up");
                    break;
                }
            }
        }
    }
    if let Some(s) = live {
        s.close(if shutdown.is_cancelled() {
            "the exposing peer stopped"
        } else {
            "session over"
        });
        // The close goes out from the endpoint's driver: let it, before a stopping
        // process ends, so the other side's connections end now, not at an idle timeout.
        if shutdown.is_cancelled() {
            crate::session::flush_closes(ctx.from.endpoint.quic()).await;
        }
        let stats = s.stats();
        info!(
            %peer,
            sent = stats.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
            received = stats.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
            "session closed"
        );
    }
}

/// Dials the session's QUIC connection over its first path: at `addrs.0`, else at each
/// further address of the same link in turn (a punched pair whose handshake fails, say
/// because the nominated address was not the peer's, falls back to the next pair that
/// answered).
async fn dial(
    ctx: &Ctx,
    b: &Broker,
    kind: PathKind,
    addrs: (SocketAddr, &[SocketAddr]),
    link: Option<Link>,
    refused: bool,
) -> Option<Session> {
    let config = match crate::quic::client_config(&ctx.key, b.peer_key) {
        Ok(c) => c,
        Err(e) => {
            warn!(peer = %b.peer, error = %e, "cannot make the session's configuration");
            return None;
        }
    };
    let mut tries = std::iter::once(addrs.0)
        .chain(addrs.1.iter().copied())
        .peekable();
    let conn = loop {
        let addr = tries.next()?;
        let connecting = match ctx.from.endpoint.quic().connect_with(
            config.clone(),
            for_quic(addr),
            wire::tls::SERVER_NAME,
        ) {
            Ok(c) => c,
            Err(e) => {
                warn!(peer = %b.peer, error = %e, "cannot dial the session");
                return None;
            }
        };
        let why = match tokio::time::timeout(defaults::HANDSHAKE, connecting).await {
            Ok(Ok(c)) => break c,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        match tries.peek() {
            Some(next) => {
                warn!(peer = %b.peer, path = kind.name(), %addr, %next, "session handshake failed ({why}); trying the next pair")
            }
            None => {
                warn!(peer = %b.peer, path = kind.name(), %addr, "session handshake failed: {why}");
                return None;
            }
        }
    };
    if refused {
        conn.close(
            1u32.into(),
            b"refused: your key is not in the exposing peer's --allow list",
        );
        // The close goes out from the endpoint's driver: keep the link a moment for it.
        tokio::spawn(async move {
            tokio::time::sleep(defaults::PATH_KEEPALIVE).await;
            drop(link);
        });
        return None;
    }
    Some(Session::start(
        conn,
        &b.peer,
        ctx.cfg.policy(),
        link.into_iter().collect(),
    ))
}

/// Connects every stream (or datagram flow) the other side opens to the local service.
fn serve(ctx: &Ctx, s: &Session) {
    let (conn, target, stats, peer) = (
        s.conn().clone(),
        ctx.cfg.target.clone(),
        s.stats().clone(),
        s.peer().to_owned(),
    );
    if ctx.cfg.udp {
        tokio::spawn(crate::forward::udp::serve(conn.clone(), target.clone()));
    }
    tokio::spawn(async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(serve_stream(
                send,
                recv,
                target.clone(),
                stats.clone(),
                peer.clone(),
            ));
        }
    });
}

/// Connects one stream to the local service.
async fn serve_stream(
    send: noq::SendStream,
    recv: noq::RecvStream,
    target: String,
    stats: Arc<TunnelStats>,
    peer: String,
) {
    let (send, mut recv) = (send, recv);
    if let Err(e) = tokio::time::timeout(defaults::HANDSHAKE, forward::accept(&mut recv))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("no announcement in time")))
    {
        return debug!(%peer, error = %e, "a stream that is not a connection; ignored");
    }
    match TcpStream::connect(&target).await {
        Ok(local) => {
            let _ = local.set_nodelay(true);
            if let Err(e) = forward::splice(local, send, recv, &stats).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        Err(e) => {
            // Reset, not finish: the reaching side's client sees a failed connection rather
            // than an empty answer.
            let (mut send, mut recv) = (send, recv);
            let _ = send.reset(forward::LOCAL_FAILED.into());
            let _ = recv.stop(forward::LOCAL_FAILED.into());
            warn!(%peer, %target, error = %e, "cannot reach the exposed service")
        }
    }
}

/// The address `--to HOST` and the port make.
pub fn target(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}
