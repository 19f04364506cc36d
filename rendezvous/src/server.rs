//! The tokio shell of the rendezvous: the signaling listener (one task per connection), the
//! STUN sockets (one task per socket), the registry's expiry timer and the HTTP API, all
//! stopped by one cancellation token.
//!
//! The sans-IO cores ([`Registry`], [`Responder`]) sit behind short-held mutexes; no lock is
//! held across an `.await`. Each connection task owns its socket and receives pushes (a
//! broker message, "you were replaced", "you expired") through a small channel, so one slow
//! peer never blocks another.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signature as DalekSignature, SigningKey, VerifyingKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc};
use tokio::time::{sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker::{self, Side};
use crate::defaults;
use crate::metrics::{self, Metrics};
use crate::registry::{
    self, ConnId, Registration, Registry, RegistryError, StunCredential, Timing,
};
use crate::stun::{Layout, Received, Responder, Slot};
use relay::announce::{RelayMsg, RelayReply};
use relay::server::{RelayConfig, RelayServer};
use relay::stats::RelayStats;
use wire::frame::{self, FrameError, FrameReader};
use wire::signal::{
    Candidates, ClientFrame, ErrorCode, ErrorFrame, PROTOCOL_VERSION, PeerInfo, PublicKey, Reply,
    Request, ServerFrame, SessionId, Welcome, register_payload,
};
use wire::ticket::TicketKey;

/// A signaling connection: TLS 1.3 with the server's identity over TCP.
type Tls = tokio_rustls::server::TlsStream<TcpStream>;
/// Its halves.
type Rd = ReadHalf<Tls>;
type Wr = WriteHalf<Tls>;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Signaling TCP address.
    pub listen: SocketAddr,
    /// STUN primary address; `None` turns STUN off.
    pub stun: Option<SocketAddr>,
    /// Second IP of this host: makes the STUN responder an RFC 5780 server.
    pub alt_ip: Option<IpAddr>,
    /// Alternate STUN port (default: the primary port + 1).
    pub alt_port: Option<u16>,
    /// HTTP API address; `None` turns it off.
    pub http: Option<SocketAddr>,
    /// Token every client must present in `Hello`.
    pub token: Option<String>,
    /// Heartbeat interval, expiry and name retention.
    pub timing: Timing,
    /// Most names the registry holds.
    pub max_peers: usize,
    /// Most simultaneous signaling connections.
    pub max_connections: usize,
    /// Most connections from one IP that have not said hello yet.
    pub max_pending_per_ip: usize,
    /// Most signaling connections one IP address may hold open (hello said or not).
    pub max_connections_per_ip: usize,
    /// Time a new connection has to say hello.
    pub hello_timeout: Duration,
    /// Time a started frame has to complete.
    pub frame_timeout: Duration,
    /// The embedded relay; `None` runs none (sessions then get no relay offer).
    pub relay: Option<RelayConfig>,
    /// How long relay tickets stay valid after brokering.
    pub ticket_lifetime: Duration,
    /// The ticket key shared with standalone relays (`--relay-key`); without it, relays
    /// cannot register. The embedded relay should use the same key.
    pub shared_relay_key: Option<TicketKey>,
    /// The server's identity: signaling is TLS 1.3 with this key, which peers and relays
    /// pin. Keep it in the state directory so that it survives restarts.
    pub identity: SigningKey,
    /// Where name → key bindings are kept across restarts (a redb file); `None` keeps
    /// them in memory only.
    pub names_db: Option<std::path::PathBuf>,
    /// Connect requests per second a registered peer may make (bursts of 10 times this);
    /// a target may receive five times as many from everyone together.
    pub connect_rate: u32,
    /// Names one address (IPv6: one /64) may bind.
    pub max_names_per_ip: usize,
    /// Time an HTTP API client has to send a request's headers (a connection lives at most
    /// six times as long).
    pub http_timeout: Duration,
}

impl ServerConfig {
    /// Every service on an ephemeral port of 127.0.0.1, with a fresh relay key: for tests
    /// and demos on one machine (ask [`Server::addrs`] for the ports).
    pub fn loopback() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        ServerConfig {
            listen: any,
            stun: Some(any),
            http: Some(any),
            relay: Some(RelayConfig::new(any, TicketKey::random())),
            ..ServerConfig::default()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            stun: Some(SocketAddr::from(([0, 0, 0, 0], 3478))),
            alt_ip: None,
            alt_port: None,
            http: Some(SocketAddr::from(([127, 0, 0, 1], 7080))),
            token: None,
            timing: Timing::default(),
            max_peers: defaults::MAX_PEERS,
            max_connections: defaults::MAX_CONNECTIONS,
            max_pending_per_ip: defaults::MAX_PENDING_PER_IP,
            max_connections_per_ip: defaults::MAX_CONNECTIONS_PER_IP,
            hello_timeout: defaults::HELLO_TIMEOUT,
            frame_timeout: defaults::FRAME_TIMEOUT,
            relay: Some(RelayConfig::new(
                SocketAddr::from(([0, 0, 0, 0], 7001)),
                TicketKey::random(),
            )),
            ticket_lifetime: defaults::TICKET_LIFETIME,
            shared_relay_key: None,
            // A fresh one: a server that must keep its key is given it (main.rs).
            identity: SigningKey::from_bytes(&rand::random()),
            names_db: None,
            connect_rate: defaults::CONNECT_RATE,
            max_names_per_ip: defaults::MAX_NAMES_PER_IP,
            http_timeout: defaults::HTTP_TIMEOUT,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which service.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("{0}")]
    Config(String),
}

/// The addresses the server actually bound (ports resolved when 0 was asked).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// Signaling.
    pub signaling: SocketAddr,
    /// STUN layout, if STUN is on.
    pub stun: Option<Layout>,
    /// HTTP API, if on.
    pub http: Option<SocketAddr>,
    /// The embedded relay (TCP and UDP), if on.
    pub relay: Option<SocketAddr>,
}

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    relay: Option<RelayServer>,
    listener: TcpListener,
    stun: Vec<(Slot, UdpSocket)>,
    stun_tcp: Vec<(Slot, TcpListener)>,
    http: Option<TcpListener>,
    shared: Arc<Shared>,
    addrs: BoundAddrs,
}

/// State every task of the server shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) metrics: Metrics,
    state: Mutex<State>,
    responder: Option<Mutex<Responder>>,
    expiry_changed: Notify,
    relay: Option<EmbeddedRelay>,
    /// Standalone relays registered now: id → (address handed out, their sessions).
    relays: Mutex<HashMap<u64, (SocketAddr, u32)>>,
    next_relay: std::sync::atomic::AtomicU64,
    /// Signaling's TLS configuration.
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    /// Refusals being delivered (each needs a TLS handshake to say why): bounded, so a
    /// flood of connections past the limits costs little.
    refusals: Arc<tokio::sync::Semaphore>,
    /// Saves name bindings, when they are kept across restarts.
    names: Option<crate::names::Writer>,
}

/// What brokering needs to know of the embedded relay.
#[derive(Debug)]
struct EmbeddedRelay {
    addr: SocketAddr,
    key: TicketKey,
    stats: Arc<RelayStats>,
}

#[derive(Debug)]
struct State {
    registry: Registry,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    /// Connections per source IP that have not said hello yet.
    pending: HashMap<IpAddr, usize>,
    /// Open connections per source IP.
    open: HashMap<IpAddr, usize>,
    /// Connect requests by requester (its key), and to each target.
    connects_by: crate::ratelimit::RateLimiter<PublicKey>,
    connects_to: crate::ratelimit::RateLimiter<String>,
}

/// A signaling connection as other tasks see it.
#[derive(Debug)]
struct Conn {
    /// Pushes to its task.
    tx: mpsc::Sender<Push>,
    /// The server address this peer reached: the address it can reach the relay on too.
    local: SocketAddr,
}

/// Counts a connection as pending hello until dropped.
struct Pending<'a> {
    shared: &'a Shared,
    ip: IpAddr,
}

/// One connection from `ip` fewer.
fn release_open(st: &mut State, ip: IpAddr) {
    if let Some(n) = st.open.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            st.open.remove(&ip);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.state();
        if let Some(n) = st.pending.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.pending.remove(&self.ip);
            }
        }
    }
}

/// Something another task asks a connection task to send.
#[derive(Debug)]
enum Push {
    /// Boxed: the channel reserves slots of this enum's size for every connection.
    Frame(Box<ServerFrame>),
    Close(ErrorFrame),
}

/// Pushes queued per connection before the connection counts as not reading.
const PUSH_QUEUE: usize = 8;

impl Shared {
    /// The STUN responder's answer to one message, over UDP or TCP; `None` without STUN.
    fn stun_answer(
        &self,
        slot: Slot,
        src: SocketAddr,
        data: &[u8],
    ) -> Option<Result<crate::stun::Reply, crate::stun::Dropped>> {
        let responder = self.responder.as_ref()?;
        let mut r = responder.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            r.handle(Instant::now(), Received { slot, src, data }, |stamped| {
                let (user, _) = wire::stun::unstamp(stamped)?;
                self.state().registry.stun_password(user).map(str::to_owned)
            }),
        )
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the whole server down with poisoned locks.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The embedded relay's counters, if it runs.
    pub(crate) fn relay_stats(&self) -> Option<&RelayStats> {
        self.relay.as_ref().map(|r| r.stats.as_ref())
    }

    /// Standalone relays registered now.
    pub(crate) fn relay_count(&self) -> usize {
        self.relays.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The registered standalone relay with the fewest sessions.
    fn least_loaded_relay(&self) -> Option<SocketAddr> {
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays.values().min_by_key(|(_, n)| *n).map(|(a, _)| *a)
    }

    /// Runs `f` on the registry (for the HTTP API).
    pub(crate) fn with_registry<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        f(&self.state().registry)
    }
}

impl Server {
    /// Binds every socket the configuration asks for.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let bind_err = |what, addr| move |source| ServerError::Bind { what, addr, source };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(bind_err("signaling", config.listen))?;
        let signaling = listener
            .local_addr()
            .map_err(bind_err("signaling", config.listen))?;

        let mut stun = Vec::new();
        let mut stun_tcp = Vec::new();
        let mut layout = None;
        if let Some(primary) = config.stun {
            let (sockets, listeners, l) =
                bind_stun(primary, config.alt_ip, config.alt_port).await?;
            stun = sockets;
            stun_tcp = listeners;
            layout = Some(l);
        } else if config.alt_ip.is_some() {
            return Err(ServerError::Config(
                "--alt-ip needs the STUN responder; remove --no-stun".into(),
            ));
        }

        let http = match config.http {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(bind_err("http api", addr))?,
            ),
            None => None,
        };
        let http_addr = match (&http, config.http) {
            (Some(l), Some(asked)) => Some(l.local_addr().map_err(bind_err("http api", asked))?),
            _ => None,
        };

        let relay = match &config.relay {
            Some(rc) => Some(RelayServer::bind(rc.clone()).await.map_err(|e| match e {
                relay::server::RelayError::Bind {
                    proto,
                    addr,
                    source,
                } => ServerError::Bind {
                    what: if proto == "tcp" {
                        "relay tcp"
                    } else {
                        "relay udp"
                    },
                    addr,
                    source,
                },
                other => ServerError::Config(other.to_string()),
            })?),
            None => None,
        };
        let embedded = match (&relay, &config.relay) {
            (Some(r), Some(rc)) => Some(EmbeddedRelay {
                addr: r.local_addr(),
                key: rc.key.clone(),
                stats: r.stats(),
            }),
            _ => None,
        };

        let tls = wire::tls::signaling_server_config(&config.identity)
            .map_err(|e| ServerError::Config(format!("signaling tls: {e}")))?;
        let mut registry = Registry::new(config.timing, config.max_peers)
            .with_max_names_per_ip(config.max_names_per_ip);
        let names = match &config.names_db {
            Some(path) => {
                let store = crate::names::NameStore::open(path)
                    .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
                let (bindings, bad) = store
                    .load()
                    .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
                if bad > 0 {
                    warn!(rows = bad, path = %path.display(), "unreadable name bindings skipped");
                }
                let (now, now_unix) = (Instant::now(), unix_now());
                let restored = bindings.len();
                for b in bindings {
                    let age = Duration::from_secs(now_unix.saturating_sub(b.last_seen));
                    let seen = now.checked_sub(age).unwrap_or(now);
                    registry.restore(b.name, b.key, seen);
                }
                info!(names = restored, path = %path.display(), "name bindings restored");
                Some(crate::names::Writer::start(store))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            tls: Arc::new(tls),
            refusals: Arc::new(tokio::sync::Semaphore::new(defaults::REFUSALS_IN_FLIGHT)),
            names,
            state: Mutex::new(State {
                registry,
                conns: HashMap::new(),
                next_conn: 1,
                pending: HashMap::new(),
                open: HashMap::new(),
                connects_by: crate::ratelimit::RateLimiter::new(
                    config.connect_rate,
                    config.connect_rate.saturating_mul(defaults::CONNECT_BURST),
                    defaults::MAX_PEERS,
                ),
                connects_to: crate::ratelimit::RateLimiter::new(
                    config
                        .connect_rate
                        .saturating_mul(defaults::CONNECT_TARGET_RATE),
                    config
                        .connect_rate
                        .saturating_mul(defaults::CONNECT_TARGET_BURST),
                    defaults::MAX_PEERS,
                ),
            }),
            responder: layout.map(|l| Mutex::new(Responder::new(l))),
            metrics: Metrics::default(),
            expiry_changed: Notify::new(),
            relay: embedded,
            relays: Mutex::new(HashMap::new()),
            next_relay: std::sync::atomic::AtomicU64::new(1),
            config,
        });
        let relay_addr = relay.as_ref().map(RelayServer::local_addr);
        Ok(Server {
            relay,
            listener,
            stun,
            stun_tcp,
            http,
            shared,
            addrs: BoundAddrs {
                signaling,
                stun: layout,
                http: http_addr,
                relay: relay_addr,
            },
        })
    }

    /// The addresses bound.
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The server's public key (what peers and relays pin).
    pub fn key(&self) -> PublicKey {
        PublicKey(self.shared.config.identity.verifying_key().to_bytes())
    }

    /// Serves until `shutdown` is cancelled, then tells every peer and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server {
            relay,
            listener,
            stun,
            stun_tcp,
            http,
            shared,
            addrs,
        } = self;
        let tracker = TaskTracker::new();
        info!(addr = %addrs.signaling, "signaling listening");
        if let Some(layout) = addrs.stun {
            match layout.alternate {
                Some(alt) => info!(primary = %layout.primary, alternate = %alt,
                    "stun listening (RFC 5780: two IPs, two ports)"),
                None => info!(addr = %layout.primary, "stun listening"),
            }
        }
        let stun = Arc::new(stun);
        for i in 0..stun.len() {
            tracker.spawn(stun_task(shared.clone(), stun.clone(), i, shutdown.clone()));
        }
        let tcp_slots = Arc::new(tokio::sync::Semaphore::new(
            defaults::STUN_TCP_MAX_CONNECTIONS,
        ));
        for (slot, listener) in stun_tcp {
            tracker.spawn(stun_tcp_task(
                shared.clone(),
                slot,
                listener,
                tcp_slots.clone(),
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(l) = http {
            info!(addr = %addrs.http.unwrap_or(addrs.signaling), "http api listening");
            tracker.spawn(crate::http::serve(l, shared.clone(), shutdown.clone()));
        }
        tracker.spawn(expiry_task(shared.clone(), shutdown.clone()));
        if shared.names.is_some() {
            tracker.spawn(refresh_names_task(shared.clone(), shutdown.clone()));
        }
        if let Some(r) = relay {
            tracker.spawn(r.run(shutdown.clone()));
        }

        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let open = shared
                .metrics
                .connections_open
                .load(std::sync::atomic::Ordering::Relaxed);
            if open as usize >= shared.config.max_connections {
                refuse(
                    &shared,
                    stream,
                    format!(
                        "server at its limit of {} connections; try later",
                        shared.config.max_connections
                    ),
                );
                continue;
            }
            {
                let mut st = shared.state();
                let open = st.open.get(&remote.ip()).copied().unwrap_or(0);
                if open >= shared.config.max_connections_per_ip {
                    drop(st);
                    warn!(ip = %remote.ip(), "too many connections from one address; refusing");
                    refuse(
                        &shared,
                        stream,
                        format!(
                            "{} already holds {} connections, the most one address may; try later",
                            remote.ip(),
                            shared.config.max_connections_per_ip
                        ),
                    );
                    continue;
                }
                *st.open.entry(remote.ip()).or_default() += 1;
                let n = st.pending.entry(remote.ip()).or_default();
                if *n >= shared.config.max_pending_per_ip {
                    release_open(&mut st, remote.ip());
                    drop(st);
                    warn!(ip = %remote.ip(), "too many connections waiting for hello; refusing");
                    refuse(
                        &shared,
                        stream,
                        format!(
                            "{} connections from {} have not said hello yet; try later",
                            shared.config.max_pending_per_ip,
                            remote.ip()
                        ),
                    );
                    continue;
                }
                *n += 1;
            }
            let _ = stream.set_nodelay(true);
            metrics::inc(&shared.metrics.connections_total);
            metrics::inc(&shared.metrics.connections_open);
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                serve_conn(&shared, stream, remote, shutdown).await;
                metrics::dec(&shared.metrics.connections_open);
                release_open(&mut shared.state(), remote.ip());
            });
        }
        drop(listener);
        tracker.close();
        if timeout(defaults::SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            warn!("some connections did not close in time");
        }
        let saving = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(w) = &saving.names {
                w.close();
            }
        })
        .await;
        info!("rendezvous stopped");
    }

    /// Runs the server on a task; dropping the handle stops it.
    pub fn spawn(self) -> ServerHandle {
        let addrs = self.addrs;
        let key = self.key();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.run(shutdown.clone()));
        ServerHandle {
            addrs,
            key,
            shutdown,
            task: Some(task),
        }
    }
}

/// A running server; dropping it shuts the server down.
#[derive(Debug)]
pub struct ServerHandle {
    addrs: BoundAddrs,
    key: PublicKey,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ServerHandle {
    /// The addresses bound.
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The server's public key (what peers and relays pin).
    pub fn key(&self) -> PublicKey {
        self.key
    }

    /// Stops the server and waits until it has told its peers.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The STUN responder's UDP sockets, TCP listeners and layout.
type StunSockets = (Vec<(Slot, UdpSocket)>, Vec<(Slot, TcpListener)>, Layout);

/// Binds the STUN responder: UDP and TCP (RFC 8489 §6.2.2) on each slot's address.
async fn bind_stun(
    primary: SocketAddr,
    alt_ip: Option<IpAddr>,
    alt_port: Option<u16>,
) -> Result<StunSockets, ServerError> {
    let bind = |addr: SocketAddr| async move {
        UdpSocket::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                what: "stun",
                addr,
                source,
            })
    };
    let bind_tcp = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                what: "stun (tcp)",
                addr,
                source,
            })
    };
    let Some(alt_ip) = alt_ip else {
        // With port 0 the UDP socket picks the port and TCP must get the same one; a
        // port free for UDP can be taken for TCP, so try a few.
        let mut attempts = if primary.port() == 0 { 8 } else { 1 };
        loop {
            attempts -= 1;
            let sock = bind(primary).await?;
            let bound = sock.local_addr().map_err(|source| ServerError::Bind {
                what: "stun",
                addr: primary,
                source,
            })?;
            match bind_tcp(bound).await {
                Ok(l) => {
                    return Ok((
                        vec![(Slot::PRIMARY, sock)],
                        vec![(Slot::PRIMARY, l)],
                        Layout {
                            primary: bound,
                            alternate: None,
                        },
                    ));
                }
                Err(e) if attempts == 0 => return Err(e),
                Err(_) => continue,
            }
        }
    };
    if primary.ip().is_unspecified() {
        return Err(ServerError::Config(format!(
            "--alt-ip {alt_ip} needs --stun on a concrete IP of this host (e.g. --stun \
             203.0.113.1:{}), not {}: RFC 5780 replies must come from a known address",
            primary.port(),
            primary.ip()
        )));
    }
    if alt_ip == primary.ip() || alt_ip.is_ipv4() != primary.is_ipv4() {
        return Err(ServerError::Config(format!(
            "--alt-ip {alt_ip} must be a second address of the same family as {}",
            primary.ip()
        )));
    }
    if primary.port() == 0 {
        return Err(ServerError::Config(
            "--alt-ip needs a fixed STUN port (not 0)".into(),
        ));
    }
    let alt_port = alt_port.unwrap_or(primary.port().wrapping_add(1).max(1));
    if alt_port == primary.port() {
        return Err(ServerError::Config(format!(
            "--alt-port {alt_port} must differ from the STUN port"
        )));
    }
    let layout = Layout {
        primary,
        alternate: Some(SocketAddr::new(alt_ip, alt_port)),
    };
    let mut socks = Vec::new();
    let mut listeners = Vec::new();
    for slot in layout.slots() {
        socks.push((slot, bind(layout.addr(slot)).await?));
        listeners.push((slot, bind_tcp(layout.addr(slot)).await?));
    }
    Ok((socks, listeners, layout))
}

/// STUN over TCP on one slot: Binding requests on the stream, answered on the stream.
/// CHANGE-REQUEST and RESPONSE-PORT cannot be honoured over a connection, so such requests
/// end it (RFC 5780 defines them for UDP only).
async fn stun_tcp_task(
    shared: Arc<Shared>,
    slot: Slot,
    listener: TcpListener,
    limit: Arc<tokio::sync::Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (mut stream, src) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => { debug!(error = %e, "stun tcp accept"); continue; }
            },
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let serve = async {
                loop {
                    let mut msg = vec![0u8; 20];
                    let read = tokio::time::timeout(defaults::STUN_TCP_IDLE, async {
                        stream.read_exact(&mut msg).await?;
                        let len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
                        if 20 + len > defaults::STUN_MAX_REQUEST {
                            return Err(std::io::Error::other("oversized stun message"));
                        }
                        msg.resize(20 + len, 0);
                        stream.read_exact(&mut msg[20..]).await?;
                        Ok::<_, std::io::Error>(())
                    })
                    .await;
                    match read {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return debug!(%src, error = %e, "stun tcp closed"),
                        Err(_) => return debug!(%src, "stun tcp idle, closed"),
                    }
                    let reply = shared.stun_answer(slot, src, &msg);
                    let reply = match reply {
                        Some(Ok(r)) if r.from == slot && r.to == src => r,
                        Some(Ok(_)) => {
                            return debug!(%src, "stun tcp: CHANGE-REQUEST or RESPONSE-PORT, closed");
                        }
                        Some(Err(why)) => {
                            metrics::inc(&shared.metrics.stun_dropped);
                            return debug!(%src, %why, "stun tcp message dropped, closed");
                        }
                        None => return,
                    };
                    if let Some((user, counter)) =
                        reply.authenticated.as_deref().and_then(wire::stun::unstamp)
                    {
                        let mut st = shared.state();
                        if let Some((name, nat)) = st.registry.observe_tcp(user, counter, src) {
                            info!(peer = %name, tcp = %src, mapping = ?nat.mapping,
                                allocation = ?nat.allocation, delta = nat.delta,
                                "observed tcp mapping");
                        }
                    }
                    if stream.write_all(&reply.bytes).await.is_err() {
                        return;
                    }
                    metrics::inc(&shared.metrics.stun_responses);
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                _ = serve => {}
            }
        });
    }
}

async fn stun_task(
    shared: Arc<Shared>,
    sockets: Arc<Vec<(Slot, UdpSocket)>>,
    index: usize,
    shutdown: CancellationToken,
) {
    let (slot, sock) = &sockets[index];
    if shared.responder.is_none() {
        return;
    }
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, src) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // ICMP errors from earlier sends surface here on some systems; keep serving.
                Err(e) => { debug!(error = %e, "stun recv"); continue; }
            },
        };
        let Some(reply) = shared.stun_answer(*slot, src, &buf[..n]) else {
            return;
        };
        let reply = match reply {
            Ok(r) => r,
            Err(why) => {
                metrics::inc(&shared.metrics.stun_dropped);
                debug!(%src, %why, "stun datagram dropped");
                continue;
            }
        };
        if let Some((user, counter)) = reply.authenticated.as_deref().and_then(wire::stun::unstamp)
        {
            let mut st = shared.state();
            if let Some((name, true)) = st.registry.observe_udp(user, counter, src) {
                info!(peer = %name, udp = %src, "observed udp mapping");
            }
        }
        let Some((_, out)) = sockets.iter().find(|(s, _)| *s == reply.from) else {
            continue;
        };
        match out.send_to(&reply.bytes, reply.to).await {
            Ok(_) => metrics::inc(&shared.metrics.stun_responses),
            Err(e) => debug!(to = %reply.to, error = %e, "stun send failed"),
        }
    }
}

/// Every [`defaults::NAME_REFRESH`], saves that online peers were seen now: after a crash,
/// a name's retention then counts from at most that long before it.
async fn refresh_names_task(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(defaults::NAME_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let online: Vec<(String, PublicKey)> = shared
            .state()
            .registry
            .online_bindings()
            .map(|(n, k)| (n.to_owned(), k))
            .collect();
        for (name, key) in online {
            record_seen(&shared, &name, key);
        }
    }
}

async fn expiry_task(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let next = shared.state().registry.poll_timeout();
        let sleep = async {
            match next {
                Some(at) => sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = shared.expiry_changed.notified() => continue,
            _ = sleep => {}
        }
        let expiry = shared.config.timing.expiry();
        let mut st = shared.state();
        st.registry.handle_timeout(Instant::now());
        while let Some(ev) = st.registry.poll_event() {
            match ev {
                registry::Event::Offline { name, conn, .. } => {
                    info!(peer = %name, "went offline: no heartbeat for {expiry:?}");
                    if let Some(e) = st.registry.get(&name) {
                        record_seen(&shared, &name, e.key);
                    }
                    if let Some(c) = st.conns.get(&conn) {
                        let _ = c.tx.try_send(Push::Close(ErrorFrame::new(
                            ErrorCode::Expired,
                            format!("no heartbeat for {expiry:?}; register again"),
                        )));
                    }
                }
                registry::Event::Forgotten { name } => {
                    info!(peer = %name, "name released after long absence");
                    record(&shared, crate::names::Change::Delete(name));
                }
            }
        }
    }
}

/// Why a connection ended, for the log and for the last frame sent.
enum End {
    /// The peer closed.
    Closed,
    /// We close with this error frame.
    Error(ErrorFrame),
    /// The socket failed; nothing more can be sent.
    Io(std::io::Error),
}

async fn serve_conn(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    remote: SocketAddr,
    shutdown: CancellationToken,
) {
    let pending = Pending {
        shared,
        ip: remote.ip(),
    };
    // Where the peer reached us (the server may listen on every address).
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    // The TLS handshake counts against the hello timeout and the per-IP pending limit.
    let started = tokio::time::Instant::now();
    let hello_timeout = shared.config.hello_timeout;
    let handshake = async {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            // A TLS record of type handshake (22); anything else is no TLS client.
            Ok(1) if first[0] == 22 => {}
            Ok(1) => {
                metrics::inc(&shared.metrics.frames_rejected);
                debug!(%remote, "plaintext client on the TLS signaling port");
                refuse_plaintext(&mut stream).await;
                return None;
            }
            _ => return None,
        }
        match tokio_rustls::TlsAcceptor::from(shared.tls.clone())
            .accept(stream)
            .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                metrics::inc(&shared.metrics.frames_rejected);
                debug!(%remote, error = %e, "tls handshake failed");
                None
            }
        }
    };
    let tls = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = timeout(hello_timeout, handshake) => r.ok().flatten(),
    };
    let Some(tls) = tls else { return };
    let (rd, mut wr) = tokio::io::split(tls);
    let mut reader = FrameReader::new(rd);
    let left = hello_timeout.saturating_sub(started.elapsed());
    let greeted = hello(shared, &mut reader, &mut wr, &shutdown, left, local).await;
    drop(pending);
    let end = match greeted {
        Ok(Greeting::Peer(nonce)) => {
            session(
                shared,
                &mut reader,
                &mut wr,
                remote,
                local,
                nonce,
                &shutdown,
            )
            .await
        }
        Ok(Greeting::Relay { port, public }) => {
            relay_session(
                shared,
                &mut reader,
                &mut wr,
                remote,
                port,
                public,
                &shutdown,
            )
            .await
        }
        Err(end) => end,
    };
    match end {
        End::Closed => debug!(%remote, "connection closed by peer"),
        End::Io(e) => debug!(%remote, error = %e, "connection failed"),
        End::Error(err) => {
            debug!(%remote, %err, "closing connection");
            if !matches!(
                err.code,
                ErrorCode::ShuttingDown | ErrorCode::Replaced | ErrorCode::Expired
            ) {
                metrics::inc(&shared.metrics.frames_rejected);
            }
            let sent = timeout(
                defaults::WRITE_TIMEOUT,
                frame::write(&mut wr, &ServerFrame::Error(err)),
            )
            .await;
            if matches!(sent, Ok(Ok(()))) {
                // Let the error frame arrive: unread input at close would turn it into RST.
                let _ = timeout(defaults::WRITE_TIMEOUT, wr.shutdown()).await;
                frame::drain(reader.get_mut()).await;
                return;
            }
        }
    }
    let _ = timeout(defaults::WRITE_TIMEOUT, wr.shutdown()).await;
}

/// A standalone relay's registration: challenge, proof with the shared ticket key, then
/// load reports until it leaves or falls silent.
async fn relay_session(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<Rd>,
    wr: &mut Wr,
    remote: SocketAddr,
    port: u16,
    public: Option<SocketAddr>,
    shutdown: &CancellationToken,
) -> End {
    let Some(key) = shared.config.shared_relay_key.as_ref() else {
        return End::Error(ErrorFrame::new(
            ErrorCode::RelayRefused,
            "this rendezvous has no --relay-key, so standalone relays cannot register",
        ));
    };
    let nonce: [u8; 32] = rand::random();
    if let Err(end) = write_frame(wr, &ServerFrame::Relay(RelayReply::Challenge { nonce })).await {
        return end;
    }
    match timeout(shared.config.hello_timeout, reader.read::<ClientFrame>()).await {
        Ok(Ok(ClientFrame::Relay(RelayMsg::Proof { mac }))) => {
            if !constant_time_eq(&mac, &relay::announce::proof(key, &nonce, port)) {
                warn!(%remote, "relay refused: its key differs from --relay-key");
                return End::Error(ErrorFrame::new(
                    ErrorCode::RelayRefused,
                    "proof does not verify: the relay's key differs from this rendezvous' --relay-key",
                ));
            }
        }
        Ok(Ok(_)) => {
            return End::Error(ErrorFrame::new(
                ErrorCode::BadRequest,
                "expected the relay's proof",
            ));
        }
        Ok(Err(e)) => return read_failure(e),
        Err(_) => {
            return End::Error(ErrorFrame::new(ErrorCode::Timeout, "no proof in time"));
        }
    }
    let advertised = public.unwrap_or_else(|| SocketAddr::new(remote.ip(), port));
    let id = shared
        .next_relay
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .relays
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, (advertised, 0));
    info!(relay = %advertised, "relay registered");
    let end = match write_frame(wr, &ServerFrame::Relay(RelayReply::Accepted { advertised })).await
    {
        Err(end) => end,
        Ok(()) => loop {
            let silent = relay::announce::LOAD_INTERVAL * 3;
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break End::Error(shutting_down()),
                m = timeout(silent, reader.read::<ClientFrame>()) => m,
            };
            match msg {
                Ok(Ok(ClientFrame::Relay(RelayMsg::Load { sessions }))) => {
                    if let Some(r) = shared
                        .relays
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&id)
                    {
                        r.1 = sessions;
                    }
                }
                Ok(Ok(_)) => {
                    break End::Error(ErrorFrame::new(
                        ErrorCode::BadRequest,
                        "expected a load report",
                    ));
                }
                Ok(Err(e)) => break read_failure(e),
                Err(_) => {
                    break End::Error(ErrorFrame::new(
                        ErrorCode::Timeout,
                        format!("relay silent for {silent:?}"),
                    ));
                }
            }
        },
    };
    shared
        .relays
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    info!(relay = %advertised, "relay left");
    end
}

/// Turns a just-accepted connection away with a `Busy` error frame. Saying why takes a
/// TLS handshake, so only [`defaults::REFUSALS_IN_FLIGHT`] refusals are delivered at a
/// time, each within [`defaults::REFUSAL_TIMEOUT`]; past that, connections are just closed.
fn refuse(shared: &Shared, stream: TcpStream, why: String) {
    metrics::inc(&shared.metrics.connections_refused);
    let Ok(permit) = shared.refusals.clone().try_acquire_owned() else {
        return;
    };
    let tls = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let _ = timeout(defaults::REFUSAL_TIMEOUT, async move {
            let mut s = tls.accept(stream).await?;
            let err = ServerFrame::Error(ErrorFrame::new(ErrorCode::Busy, why));
            frame::write(&mut s, &err)
                .await
                .map_err(std::io::Error::other)?;
            tokio::io::AsyncWriteExt::shutdown(&mut s).await
        })
        .await;
    });
}

/// A client that speaks plaintext to a TLS-only server (an older peer or relay) gets one
/// plaintext error frame saying so, instead of a TLS alert it cannot read.
async fn refuse_plaintext(stream: &mut TcpStream) {
    let err = ServerFrame::Error(ErrorFrame::new(
        ErrorCode::VersionMismatch,
        "this rendezvous speaks signaling over TLS 1.3 only; upgrade the peer or relay",
    ));
    let _ = timeout(defaults::WRITE_TIMEOUT, frame::write(stream, &err)).await;
    let _ = timeout(
        defaults::WRITE_TIMEOUT,
        tokio::io::AsyncWriteExt::shutdown(stream),
    )
    .await;
}

/// Maps a frame read failure to how the connection ends.
fn read_failure(e: FrameError) -> End {
    match e {
        FrameError::Closed => End::Closed,
        FrameError::Io(e) => End::Io(e),
        FrameError::TooLarge { len, max } => End::Error(ErrorFrame::new(
            ErrorCode::FrameTooLarge,
            format!("frame of {len} bytes exceeds the {max}-byte limit"),
        )),
        e => End::Error(ErrorFrame::new(ErrorCode::BadFrame, e.to_string())),
    }
}

/// Who said hello.
enum Greeting {
    /// A peer; the nonce it must sign to register.
    Peer([u8; 32]),
    /// A standalone relay registering.
    Relay {
        port: u16,
        public: Option<SocketAddr>,
    },
}

async fn hello(
    shared: &Shared,
    reader: &mut FrameReader<Rd>,
    wr: &mut Wr,
    shutdown: &CancellationToken,
    within: Duration,
    local: SocketAddr,
) -> Result<Greeting, End> {
    let cfg = &shared.config;
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Err(End::Error(shutting_down())),
        r = timeout(within, reader.read::<ClientFrame>()) => r,
    };
    let hello = match first {
        Err(_) => {
            return Err(End::Error(ErrorFrame::new(
                ErrorCode::Timeout,
                format!("no hello within {:?}", cfg.hello_timeout),
            )));
        }
        Ok(Err(e)) => return Err(read_failure(e)),
        Ok(Ok(ClientFrame::Hello(h))) => h,
        Ok(Ok(ClientFrame::Relay(RelayMsg::Hello {
            version,
            port,
            public,
        }))) => {
            if version != relay::announce::ANNOUNCE_VERSION {
                return Err(End::Error(ErrorFrame::new(
                    ErrorCode::VersionMismatch,
                    format!(
                        "this rendezvous speaks relay registration version {}, the relay {version}",
                        relay::announce::ANNOUNCE_VERSION
                    ),
                )));
            }
            return Ok(Greeting::Relay { port, public });
        }
        Ok(Ok(ClientFrame::Request { .. } | ClientFrame::Relay(_))) => {
            return Err(End::Error(ErrorFrame::new(
                ErrorCode::HelloExpected,
                "the first frame must be hello",
            )));
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(End::Error(ErrorFrame::new(
            ErrorCode::VersionMismatch,
            format!(
                "this server speaks protocol {PROTOCOL_VERSION}, the client {}; upgrade the older side",
                hello.version
            ),
        )));
    }
    if let Some(want) = &cfg.token
        && !hello
            .token
            .as_deref()
            .is_some_and(|got| constant_time_eq(got.as_bytes(), want.as_bytes()))
    {
        return Err(End::Error(ErrorFrame::new(
            ErrorCode::Unauthorized,
            if hello.token.is_some() {
                "wrong token"
            } else {
                "this server needs a token (--token or CHUANTOU_TOKEN)"
            },
        )));
    }
    let nonce: [u8; 32] = rand::random();
    let welcome = ServerFrame::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        nonce,
        heartbeat_interval_ms: u32::try_from(cfg.timing.heartbeat_interval.as_millis())
            .unwrap_or(u32::MAX),
        software: crate::stun::SOFTWARE.into(),
        stun: shared.responder.as_ref().map(|r| {
            let primary = r.lock().unwrap_or_else(|p| p.into_inner()).layout().primary;
            // Bound to every address: tell the client the one it reached us on.
            if primary.ip().is_unspecified() {
                SocketAddr::new(local.ip(), primary.port())
            } else {
                primary
            }
        }),
    });
    write_frame(wr, &welcome).await?;
    Ok(Greeting::Peer(nonce))
}

async fn write_frame(wr: &mut Wr, f: &ServerFrame) -> Result<(), End> {
    match timeout(defaults::WRITE_TIMEOUT, frame::write(wr, f)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(FrameError::Io(e))) => Err(End::Io(e)),
        Ok(Err(e)) => Err(End::Io(std::io::Error::other(e))),
        Err(_) => Err(End::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer does not read",
        ))),
    }
}

fn shutting_down() -> ErrorFrame {
    ErrorFrame::new(
        ErrorCode::ShuttingDown,
        "server shutting down; reconnect later",
    )
}

async fn session(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<Rd>,
    wr: &mut Wr,
    remote: SocketAddr,
    local: SocketAddr,
    nonce: [u8; 32],
    shutdown: &CancellationToken,
) -> End {
    let (tx, mut rx) = mpsc::channel(PUSH_QUEUE);
    let conn = {
        let mut st = shared.state();
        let id = st.next_conn;
        st.next_conn += 1;
        st.conns.insert(id, Conn { tx, local });
        id
    };
    let end = session_loop(shared, reader, wr, remote, nonce, conn, &mut rx, shutdown).await;
    let name = {
        let mut st = shared.state();
        st.conns.remove(&conn);
        let name = st.registry.disconnect(Instant::now(), conn);
        if let Some(key) = name
            .as_deref()
            .and_then(|n| st.registry.get(n))
            .map(|e| e.key)
        {
            record_seen(shared, name.as_deref().unwrap_or_default(), key);
        }
        name
    };
    if let Some(name) = name {
        shared.expiry_changed.notify_one();
        info!(peer = %name, %remote, "went offline: connection closed");
    }
    end
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<Rd>,
    wr: &mut Wr,
    remote: SocketAddr,
    nonce: [u8; 32],
    conn: ConnId,
    rx: &mut mpsc::Receiver<Push>,
    shutdown: &CancellationToken,
) -> End {
    // Twice the registry's expiry: a registered peer that falls silent is closed by the
    // registry ("expired"); this is only the backstop for connections that never register.
    let idle = shared.config.timing.expiry() * 2;
    let mut last_frame = Instant::now();
    let mut frame_started: Option<Instant> = None;
    loop {
        let deadline = match frame_started {
            Some(t) => t + shared.config.frame_timeout,
            None => last_frame + idle,
        };
        let step = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return End::Error(shutting_down()),
            push = rx.recv() => match push {
                Some(Push::Frame(f)) => {
                    if let Err(end) = write_frame(wr, &f).await {
                        return end;
                    }
                    continue;
                }
                Some(Push::Close(e)) => return End::Error(e),
                None => return End::Error(shutting_down()),
            },
            _ = sleep_until(deadline.into()) => {
                return End::Error(match frame_started {
                    Some(_) => ErrorFrame::new(ErrorCode::Timeout, format!(
                        "frame incomplete after {:?}", shared.config.frame_timeout)),
                    None => ErrorFrame::new(ErrorCode::Timeout, format!(
                        "silent for {:?}; heartbeat every {:?}",
                        idle, shared.config.timing.heartbeat_interval)),
                });
            }
            r = reader.step() => r,
        };
        let body = match step {
            Ok(None) => {
                frame_started.get_or_insert_with(Instant::now);
                continue;
            }
            Ok(Some(body)) => body,
            Err(e) => return read_failure(e),
        };
        frame_started = None;
        last_frame = Instant::now();
        let (id, req) = match frame::decode::<ClientFrame>(&body) {
            Ok(ClientFrame::Request { id, body }) => (id, body),
            Ok(ClientFrame::Hello(_)) => {
                return End::Error(ErrorFrame::new(
                    ErrorCode::HelloExpected,
                    "hello sent twice",
                ));
            }
            Ok(ClientFrame::Relay(_)) => {
                return End::Error(ErrorFrame::new(
                    ErrorCode::BadRequest,
                    "relay messages belong on a relay registration",
                ));
            }
            Err(e) => return read_failure(e),
        };
        let result = handle_request(shared, conn, remote, &nonce, req);
        if let Err(end) = write_frame(wr, &ServerFrame::Response { id, body: result }).await {
            return end;
        }
    }
}

fn handle_request(
    shared: &Arc<Shared>,
    conn: ConnId,
    remote: SocketAddr,
    nonce: &[u8; 32],
    req: Request,
) -> Result<Reply, ErrorFrame> {
    let now = Instant::now();
    match req {
        Request::Register(r) => {
            r.validate()?;
            let key = VerifyingKey::from_bytes(&r.key.0).map_err(|_| {
                ErrorFrame::new(
                    ErrorCode::BadSignature,
                    "public key is not a valid ed25519 point",
                )
            })?;
            key.verify_strict(
                &register_payload(nonce, &r.name),
                &DalekSignature::from_bytes(&r.signature.0),
            )
            .map_err(|_| {
                ErrorFrame::new(
                    ErrorCode::BadSignature,
                    "signature over the server nonce does not verify for this key",
                )
            })?;
            let stun = StunCredential {
                username: hex::encode(rand::random::<[u8; 12]>()),
                password: hex::encode(rand::random::<[u8; 16]>()),
            };
            let name = r.name.clone();
            let outcome = {
                let mut st = shared.state();
                let out = st.registry.register(
                    now,
                    Registration {
                        name: r.name,
                        key: r.key,
                        services: r.services,
                        lan_addrs: r.lan_addrs,
                        tcp_addr: remote,
                        conn,
                        stun: stun.clone(),
                        nat: r.nat,
                    },
                );
                if let Ok(reg) = &out
                    && let Some(old) = reg.old_conn
                    && let Some(c) = st.conns.get(&old)
                {
                    let _ = c.tx.try_send(Push::Close(ErrorFrame::new(
                        ErrorCode::Replaced,
                        format!("{name} registered again from another connection"),
                    )));
                }
                out
            };
            shared.expiry_changed.notify_one();
            match outcome {
                Ok(reg) => {
                    metrics::inc(&shared.metrics.registrations_total);
                    record_seen(shared, &name, r.key);
                    if reg.replaced {
                        info!(peer = %name, tcp = %remote, "re-registered");
                    } else {
                        info!(peer = %name, tcp = %remote, key = %r.key, "registered");
                    }
                    Ok(Reply::Registered(wire::signal::Registered {
                        observed_tcp: remote,
                        stun_username: stun.username,
                        stun_password: stun.password,
                        replaced: reg.replaced,
                    }))
                }
                Err(e) => {
                    metrics::inc(&shared.metrics.registrations_refused);
                    info!(peer = %name, tcp = %remote, error = %e, "registration refused");
                    Err(registry_error(e))
                }
            }
        }
        Request::Heartbeat { rtt_ms } => {
            let rtt = rtt_ms.map(|ms| Duration::from_millis(u64::from(ms)));
            let udp = shared
                .state()
                .registry
                .heartbeat(now, conn, rtt)
                .map_err(registry_error)?;
            Ok(Reply::HeartbeatAck { udp_addr: udp })
        }
        Request::List { after } => {
            let st = shared.state();
            let (page, more) = st.registry.page(after.as_deref(), wire::signal::LIST_PAGE);
            // Peers can be large (16 services with long descriptions): stop the page before
            // the reply would outgrow a frame, and let the client continue from there.
            let budget = frame::MAX_FRAME_LEN - 1024;
            let mut used = 0;
            let mut peers = Vec::with_capacity(page.len());
            for (n, e) in &page {
                let info = peer_info(now, n, e);
                used += postcard::experimental::serialized_size(&info).unwrap_or(budget);
                if used > budget && !peers.is_empty() {
                    break;
                }
                peers.push(info);
            }
            let truncated = peers.len() < page.len();
            let next = (more || truncated)
                .then(|| peers.last().map(|p| p.name.clone()))
                .flatten();
            Ok(Reply::Peers { peers, next })
        }
        Request::Lookup { name } => {
            let st = shared.state();
            st.registry
                .get(&name)
                .map(|e| Reply::Peer(peer_info(now, &name, e)))
                .ok_or_else(|| unknown_peer(&name))
        }
        Request::Connect { name, service } => connect(shared, conn, &name, service),
        Request::Release { name } => {
            shared
                .state()
                .registry
                .release(conn, &name)
                .map_err(registry_error)?;
            shared.expiry_changed.notify_one();
            record(shared, crate::names::Change::Delete(name.clone()));
            info!(peer = %name, "name released by its owner");
            Ok(Reply::Released)
        }
    }
}

fn connect(
    shared: &Arc<Shared>,
    conn: ConnId,
    target: &str,
    service: Option<wire::signal::ServiceRef>,
) -> Result<Reply, ErrorFrame> {
    let session = SessionId(rand::random());
    let secret: [u8; 32] = rand::random();
    let mut st = shared.state();
    let me = st
        .registry
        .name_of(conn)
        .ok_or_else(|| {
            ErrorFrame::new(
                ErrorCode::NotRegistered,
                "register before asking to connect",
            )
        })?
        .to_owned();
    if me == target {
        return Err(ErrorFrame::new(
            ErrorCode::SelfConnect,
            "a peer cannot connect to itself",
        ));
    }
    let my_key = st
        .registry
        .get(&me)
        .ok_or_else(|| ErrorFrame::new(ErrorCode::NotRegistered, "registration vanished"))?
        .key;
    // Quotas: each request makes the target join a relay and probe us, so neither one
    // requester nor all of them together may ask without limit.
    let now = Instant::now();
    let by_me = st.connects_by.allow(now, &my_key);
    if !by_me || !st.connects_to.allow(now, &target.to_owned()) {
        metrics::inc(&shared.metrics.connects_refused);
        let rate = shared.config.connect_rate;
        let why = if by_me {
            format!("{target} is asked for too often right now; try again in a few seconds")
        } else {
            format!("too many connect requests from {me} (at most {rate} a second); slow down")
        };
        return Err(ErrorFrame::new(ErrorCode::Busy, why));
    }
    let me = me.as_str();
    let them = st
        .registry
        .get(target)
        .ok_or_else(|| unknown_peer(target))?;
    let Some(their_conn) = them.conn else {
        return Err(ErrorFrame::new(
            ErrorCode::PeerOffline,
            format!("{target} is registered but offline"),
        ));
    };
    let svc = broker::select_service(target, &them.services, service)?;
    let mine = st
        .registry
        .get(me)
        .ok_or_else(|| ErrorFrame::new(ErrorCode::NotRegistered, "registration vanished"))?;
    let side = |name, e: &registry::Entry| Side {
        name,
        key: e.key,
        candidates: Candidates {
            tcp: Some(e.tcp_candidate()),
            udp: e.udp_addr,
            lan: e.lan_addrs.clone(),
            nat: e.nat,
            tcp_nat: e.tcp_nat,
        },
        rtt: e.rtt,
    };
    let their = st.conns.get(&their_conn).ok_or_else(|| {
        ErrorFrame::new(
            ErrorCode::PeerOffline,
            format!("{target} just went offline"),
        )
    })?;
    let my_local = st.conns.get(&conn).map(|c| c.local);
    // Standalone relays, when any are registered, carry sessions before the embedded one:
    // they are what a deployment adds to spare the rendezvous' own bandwidth.
    let standalone = shared
        .least_loaded_relay()
        .zip(shared.config.shared_relay_key.as_ref())
        .map(|(addr, key)| broker::RelayIssue {
            key,
            expires: unix_now() + shared.config.ticket_lifetime.as_secs(),
            addr_for_initiator: addr,
            addr_for_responder: addr,
        });
    let relay = standalone.or_else(|| {
        shared.relay.as_ref().map(|r| {
            // An embedded relay on a wildcard address is reached at the address each peer
            // reached us on; one on a concrete address, there.
            let dial = |local: Option<SocketAddr>| match local {
                Some(l) if r.addr.ip().is_unspecified() => SocketAddr::new(l.ip(), r.addr.port()),
                _ => r.addr,
            };
            broker::RelayIssue {
                key: &r.key,
                expires: unix_now() + shared.config.ticket_lifetime.as_secs(),
                addr_for_initiator: dial(my_local),
                addr_for_responder: dial(Some(their.local)),
            }
        })
    });
    let (to_me, to_them) = broker::broker(
        session,
        secret,
        side(me, mine),
        side(target, them),
        svc,
        relay,
    );
    their
        .tx
        .try_send(Push::Frame(Box::new(ServerFrame::Broker(Box::new(
            to_them,
        )))))
        .map_err(|_| {
            ErrorFrame::new(
                ErrorCode::Busy,
                format!("{target} is not keeping up with its connection; try again"),
            )
        })?;
    metrics::inc(&shared.metrics.sessions_brokered);
    info!(%session, from = %me, to = %target, service = %to_me.service.reference(), "brokered session");
    Ok(Reply::Brokered(Box::new(to_me)))
}

fn peer_info(now: Instant, name: &str, e: &registry::Entry) -> PeerInfo {
    PeerInfo {
        name: name.to_owned(),
        key: e.key,
        online: e.online(),
        services: e.services.clone(),
        tcp_addr: Some(e.tcp_addr),
        udp_addr: e.udp_addr,
        last_seen_ms: u64::try_from(now.saturating_duration_since(e.last_seen).as_millis())
            .unwrap_or(u64::MAX),
    }
}

fn unknown_peer(name: &str) -> ErrorFrame {
    ErrorFrame::new(ErrorCode::UnknownPeer, format!("no peer named {name:?}"))
}

fn registry_error(e: RegistryError) -> ErrorFrame {
    let code = match &e {
        RegistryError::NameTaken { .. } => ErrorCode::NameTaken,
        RegistryError::Full { .. } => ErrorCode::Busy,
        RegistryError::OtherName(_) => ErrorCode::BadRequest,
        RegistryError::NotRegistered => ErrorCode::NotRegistered,
        RegistryError::NotOwner(_) => ErrorCode::NotOwner,
        RegistryError::TooManyNames { .. } => ErrorCode::Busy,
    };
    ErrorFrame::new(code, e.to_string())
}

/// Saves a name change, when bindings are kept.
fn record(shared: &Shared, change: crate::names::Change) {
    if let Some(w) = &shared.names {
        w.record(change);
    }
}

/// Saves `name`'s binding to `key`, seen now.
fn record_seen(shared: &Shared, name: &str, key: PublicKey) {
    record(
        shared,
        crate::names::Change::Put(crate::names::Binding {
            name: name.to_owned(),
            key,
            last_seen: unix_now(),
        }),
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
