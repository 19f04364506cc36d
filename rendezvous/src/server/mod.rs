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

mod conn;
mod publish;
mod relays;
mod requests;
mod stun_io;
mod upkeep;

use conn::{End, constant_time_eq, read_failure, serve_conn, shutting_down, write_frame};
pub(crate) use publish::OpenError;
use relays::relay_session;
use requests::handle_request;
use stun_io::{bind_stun, stun_task, stun_tcp_task};
use upkeep::{expiry_task, record, record_seen, refresh_names_task, unix_now};

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
    /// The token the HTTP API (and its dashboard) asks for; required when `http` is not a
    /// loopback address.
    pub http_token: Option<String>,
    /// The public addresses of this host, when they are not its own (a cloud's 1:1 NAT):
    /// the first for STUN's primary address and the embedded relay, the second for the
    /// STUN alternate IP (`--alt-ip`). Empty: the bound addresses, or where a peer
    /// reached the server when bound to every address.
    pub advertise: Vec<IpAddr>,
    /// Public entries for clients that run no `peer`; all off by default.
    pub public: crate::public::PublicConfig,
    /// Sockets on every address (`0.0.0.0` or `[::]`) take IPv4 and IPv6 clients alike,
    /// where the host has IPv6 (`--ipv4-only` turns it off).
    pub dual_stack: bool,
}

impl ServerConfig {
    /// The first address advertised in one family (`v6`): this host's public address for
    /// clients of that family.
    pub fn advertised_for(&self, v6: bool) -> Option<IpAddr> {
        self.advertise.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }

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
            advertise: Vec::new(),
            dual_stack: true,
            http_token: None,
            public: crate::public::PublicConfig {
                max_conns: defaults::PUBLIC_MAX_CONNS,
                max_conns_per_ip: defaults::PUBLIC_MAX_CONNS_PER_IP,
                head_timeout: defaults::HTTP_TIMEOUT,
                ..crate::public::PublicConfig::default()
            },
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
    /// The public HTTP entry, if on.
    pub public_http: Option<SocketAddr>,
    /// The public TLS entry, if on.
    pub public_tls: Option<SocketAddr>,
}

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    relay: Option<RelayServer>,
    listener: TcpListener,
    stun: Vec<(Slot, UdpSocket)>,
    stun_tcp: Vec<(Slot, TcpListener)>,
    http: Option<TcpListener>,
    public_http: Option<TcpListener>,
    public_tls: Option<TcpListener>,
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
    /// Public entries: what is published, and the clients carried now.
    pub(crate) public: crate::public::entry::Entries,
    /// Where the public HTTP and TLS entries listen (for the URLs handed out).
    public_addrs: PublicAddrs,
}

#[derive(Debug, Clone, Copy, Default)]
struct PublicAddrs {
    http: Option<SocketAddr>,
    tls: Option<SocketAddr>,
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
    /// Sessions as their peers report them, and punching outcomes.
    sessions: crate::sessions::SessionBook,
}

/// A signaling connection as other tasks see it.
#[derive(Debug)]
struct Conn {
    /// Pushes to its task.
    tx: mpsc::Sender<Push>,
    /// The key this connection proved with `Identify`, when it holds a name.
    identified: Option<PublicKey>,
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

    /// Every relay: the embedded one (if it runs) and the standalone ones registered now,
    /// with their sessions.
    pub(crate) fn relay_list(&self) -> Vec<(SocketAddr, &'static str, u64)> {
        let mut out = Vec::new();
        if let Some(r) = &self.relay {
            let sessions = r
                .stats
                .sessions_active
                .load(std::sync::atomic::Ordering::Relaxed);
            out.push((r.addr, "embedded", sessions));
        }
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(
            relays
                .values()
                .map(|(a, n)| (*a, "standalone", u64::from(*n))),
        );
        out
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

    /// Runs `f` on the session book (for the HTTP API).
    pub(crate) fn with_sessions<T>(&self, f: impl FnOnce(&crate::sessions::SessionBook) -> T) -> T {
        f(&self.state().sessions)
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
        let dual = config.dual_stack;
        let listener = wire::dual::tcp_listener(config.listen, dual)
            .map_err(bind_err("signaling", config.listen))?;
        let signaling = listener
            .local_addr()
            .map_err(bind_err("signaling", config.listen))?;

        if let Some(addr) = config.http
            && !addr.ip().is_loopback()
            && config.http_token.as_deref().is_none_or(str::is_empty)
        {
            return Err(ServerError::Config(format!(
                "--http {addr}: the API and its dashboard list every peer to whoever reaches \
                 them; give --http-token TOKEN (openssl rand -hex 32), or keep it on loopback"
            )));
        }
        for v6 in [false, true] {
            let family: Vec<IpAddr> = config
                .advertise
                .iter()
                .copied()
                .filter(|ip| ip.is_ipv6() == v6)
                .collect();
            if family.len() > 2 {
                return Err(ServerError::Config(
                    "--advertise takes one IP per family, or two with --alt-ip (the public \
                     side of each)"
                        .into(),
                ));
            }
            if family.len() == 2 && config.alt_ip.is_none() {
                return Err(ServerError::Config(format!(
                    "--advertise {} names a second IP of one family, which is the public side \
                     of --alt-ip: give --alt-ip too, or advertise one IP per family",
                    family[1]
                )));
            }
        }
        if let Some(ip) = config.advertise.iter().find(|ip| ip.is_unspecified()) {
            return Err(ServerError::Config(format!(
                "--advertise {ip}: give the public address peers reach this host on"
            )));
        }
        let mut stun = Vec::new();
        let mut stun_tcp = Vec::new();
        let mut layout = None;
        if let Some(primary) = config.stun {
            let (sockets, listeners, l) = bind_stun(
                primary,
                (config.alt_ip, config.alt_port),
                config.relay.as_ref().map(|r| r.listen.port()),
                dual,
            )
            .await?;
            stun = sockets;
            stun_tcp = listeners;
            layout = Some(l);
        } else if config.alt_ip.is_some() {
            return Err(ServerError::Config(
                "--alt-ip needs the STUN responder; remove --no-stun".into(),
            ));
        }

        let http = match config.http {
            Some(addr) => {
                Some(wire::dual::tcp_listener(addr, dual).map_err(bind_err("http api", addr))?)
            }
            None => None,
        };
        let http_addr = match (&http, config.http) {
            (Some(l), Some(asked)) => Some(l.local_addr().map_err(bind_err("http api", asked))?),
            _ => None,
        };

        let public = &config.public;
        if (public.http.is_some() || public.tls.is_some())
            && public.domain.as_deref().is_none_or(str::is_empty)
        {
            return Err(ServerError::Config(
                "--public-http and --public-tls route by host name: give --public-domain DOMAIN \
                 (names are published as NAME.DOMAIN; point *.DOMAIN at this host)"
                    .into(),
            ));
        }
        let bind_public = |addr: Option<SocketAddr>, what: &'static str| async move {
            match addr {
                Some(a) => {
                    let l = wire::dual::tcp_listener(a, dual).map_err(bind_err(what, a))?;
                    let bound = l.local_addr().map_err(bind_err(what, a))?;
                    Ok::<_, ServerError>((Some(l), Some(bound)))
                }
                None => Ok((None, None)),
            }
        };
        let (public_http, public_http_addr) = bind_public(public.http, "public http").await?;
        let (public_tls, public_tls_addr) = bind_public(public.tls, "public tls").await?;

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
                sessions: crate::sessions::SessionBook::default(),
            }),
            responder: layout.map(|l| {
                let same_family: Vec<IpAddr> = config
                    .advertise
                    .iter()
                    .copied()
                    .filter(|ip| {
                        ip.is_ipv6() == l.primary.is_ipv6() || l.primary.ip().is_unspecified()
                    })
                    .collect();
                let public = match same_family.as_slice() {
                    [] => l,
                    [ip, rest @ ..] => Layout {
                        primary: SocketAddr::new(*ip, l.primary.port()),
                        alternate: l.alternate.map(|a| {
                            SocketAddr::new(rest.first().copied().unwrap_or(a.ip()), a.port())
                        }),
                        port2: l.port2,
                    },
                };
                Mutex::new(Responder::new(l).with_advertised(public))
            }),
            metrics: Metrics::default(),
            expiry_changed: Notify::new(),
            relay: embedded,
            relays: Mutex::new(HashMap::new()),
            next_relay: std::sync::atomic::AtomicU64::new(1),
            public: crate::public::entry::Entries::new(config.public.clone()),
            public_addrs: PublicAddrs {
                http: public_http_addr,
                tls: public_tls_addr,
            },
            config,
        });
        let relay_addr = relay.as_ref().map(RelayServer::local_addr);
        Ok(Server {
            relay,
            listener,
            stun,
            stun_tcp,
            http,
            public_http,
            public_tls,
            shared,
            addrs: BoundAddrs {
                signaling,
                stun: layout,
                http: http_addr,
                relay: relay_addr,
                public_http: public_http_addr,
                public_tls: public_tls_addr,
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
            public_http,
            public_tls,
            shared,
            addrs,
        } = self;
        let tracker = TaskTracker::new();
        info!(addr = %addrs.signaling, "signaling listening");
        if let Some(layout) = addrs.stun {
            match layout.alternate {
                Some(alt) => info!(primary = %layout.primary, alternate = %alt,
                    "stun listening (RFC 5780: two IPs, two ports)"),
                None => match layout.port2 {
                    // A second port, so peers can tell symmetric NATs.
                    Some(p) => info!(addr = %layout.primary, port2 = p, "stun listening"),
                    None => info!(addr = %layout.primary, "stun listening"),
                },
            }
        }
        let stun: Vec<_> = stun
            .into_iter()
            .filter_map(|(slot, sock)| match wire::batch::BatchSocket::new(sock) {
                Ok(b) => Some((slot, b)),
                Err(e) => {
                    warn!(error = %e, "a stun socket could not be set up; it does not answer");
                    None
                }
            })
            .collect();
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
        {
            use crate::public::entry::{Kind, accept_loop, sweep_task};
            let stop = shared.public.stop.clone();
            if let Some(l) = public_http {
                info!(addr = %addrs.public_http.unwrap_or(addrs.signaling), "public http entry listening");
                tracker.spawn(accept_loop(l, shared.clone(), Kind::Http, stop.clone()));
            }
            if let Some(l) = public_tls {
                info!(addr = %addrs.public_tls.unwrap_or(addrs.signaling), "public tls entry listening");
                tracker.spawn(accept_loop(l, shared.clone(), Kind::Tls, stop.clone()));
            }
            if shared.public.config.enabled() {
                tracker.spawn(sweep_task(shared.clone(), stop.clone()));
            }
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                stop.cancel();
            });
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
                Ok((s, remote)) => (s, wire::dual::canonical(remote)),
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
