//! The peer's half of signaling: connect and say hello, then register, list, look up and
//! ask to be brokered; heartbeats run by themselves once registered. Also a STUN Binding
//! query with RFC 8489 retransmission, for learning the UDP mapping with a credential.
//!
//! One task owns the connection. [`Client`] methods send it requests and await their
//! replies; brokered sessions pushed by the server arrive through [`Client::next_event`].
//! Dropping the [`Client`] stops the task and closes the connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::frame::{self, FrameError, FrameReader};
use crate::signal::{
    Broker, ClientFrame, ErrorFrame, Hello, NatInfo, PROTOCOL_VERSION, PeerInfo, PublicKey,
    Register, Registered, Reply, Request, ServerFrame, Service, ServiceRef, Signature, Welcome,
    identify_payload, register_payload, same_host,
};
use crate::stun::transaction::{Retransmit, Timing};
use crate::stun::{self, BindingError, BindingResponse};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Could not reach the server.
    #[error("connecting to rendezvous {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server refused this request (the connection stays usable).
    #[error("rendezvous refused: {0}")]
    Refused(ErrorFrame),
    /// The server closed the connection, with its reason when it gave one.
    #[error("rendezvous closed the connection{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Closed(Option<ErrorFrame>),
    /// No answer in time.
    #[error("rendezvous did not answer within {0:?}")]
    Timeout(Duration),
    /// The byte stream broke or carried something unreadable.
    #[error("signaling stream: {0}")]
    Frame(#[from] FrameError),
    /// The server sent something out of protocol.
    #[error("unexpected answer from rendezvous: {0}")]
    Protocol(String),
    /// The TLS handshake failed: not a chuantou rendezvous, an old one that speaks
    /// plaintext, or something in between.
    #[error("tls handshake with rendezvous {addr} failed: {reason}")]
    Tls {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The pinned key could not be looked up or written down.
    #[error("rendezvous key pin: {0}")]
    Pin(String),
    /// The server proved a key other than the one pinned: a different server, or someone
    /// in between. Nothing was sent to it.
    #[error(
        "rendezvous {addr} presented key {presented}, but {pinned} is pinned for it: someone may be \
         intercepting the connection; if the server's key really changed, update the pin"
    )]
    KeyMismatch {
        /// Where.
        addr: SocketAddr,
        /// The key the server proved.
        presented: PublicKey,
        /// The key we insisted on.
        pinned: PublicKey,
    },
    /// A STUN query failed.
    #[error("stun: {0}")]
    Stun(#[from] BindingError),
    /// A STUN query went unanswered through every retransmission.
    #[error("stun server {0} did not answer")]
    StunTimeout(SocketAddr),
    /// Local socket trouble during a STUN query.
    #[error("stun socket: {0}")]
    StunIo(std::io::Error),
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server token, if the server wants one.
    pub token: Option<String>,
    /// Bound on connecting plus hello.
    pub connect_timeout: Duration,
    /// Bound on each request.
    pub request_timeout: Duration,
    /// The rendezvous key to insist on; with `None` any key is accepted (first contact:
    /// the caller pins [`Client::server_key`]). Either way the TLS handshake proves the
    /// server holds the key it shows, before anything (the token) is sent.
    pub server_key: Option<PublicKey>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            token: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            server_key: None,
        }
    }
}

/// Something the server pushed.
#[derive(Debug)]
pub enum ClientEvent {
    /// Another peer asked to reach one of our services.
    Broker(Box<Broker>),
    /// A public client wants one of our published services.
    Open(Box<crate::signal::PublicOpen>),
    /// The connection ended; no more events follow.
    Closed(ClientError),
}

struct Cmd {
    body: Request,
    reply: oneshot::Sender<Result<Reply, ClientError>>,
}

/// Signaling runs over TLS 1.3 with the rendezvous' identity.
pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// The TLS handshake of signaling over `stream` to `addr`; the key the server proved
/// (compare it with the pin before sending anything).
pub async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
) -> Result<(Tls, PublicKey), ClientError> {
    let tls_err = |reason: String| ClientError::Tls { addr, reason };
    let config = crate::tls::signaling_client_config(crate::tls::ServerKey::Learn)
        .map_err(|e| tls_err(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME)
        .map_err(|e| tls_err(e.to_string()))?;
    let tls = connector.connect(name, stream).await.map_err(|e| {
        tls_err(match e.kind() {
            // Bytes that are no TLS record at all: a plaintext server (an HTTP port given
            // for the signaling port, or a rendezvous older than TLS signaling).
            std::io::ErrorKind::InvalidData if e.to_string().contains("InvalidContentType") => {
                format!(
                    "it answered in plaintext, not TLS: is {addr} the rendezvous' signaling \
                     port (7000 by default), not its HTTP API or another service?"
                )
            }
            std::io::ErrorKind::InvalidData => {
                format!("{e} (is this a chuantou rendezvous of this version?)")
            }
            _ => e.to_string(),
        })
    })?;
    let key = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::tls::cert_key)
        .ok_or_else(|| tls_err("the server showed no ed25519 key".into()))?;
    Ok((tls, key))
}

/// Splits `HOST:PORT#KEY` into the address and the pinned key (`HOST:PORT` alone: none).
pub fn split_pinned(spec: &str) -> Result<(String, Option<PublicKey>), String> {
    match spec.split_once('#') {
        None => Ok((with_default_port(spec), None)),
        Some((addr, key)) => Ok((
            with_default_port(addr),
            Some(
                key.parse()
                    .map_err(|e| format!("rendezvous {spec:?}: after '#', {e}"))?,
            ),
        )),
    }
}

/// The rendezvous' signaling port when an address names none.
pub const DEFAULT_PORT: u16 = 7000;

/// `addr` with [`DEFAULT_PORT`] added when it names a host or IP only (`example.org`,
/// `198.18.0.1`, `::1`, `[::1]`); an address with a port stays as it is.
pub fn with_default_port(addr: &str) -> String {
    let addr = addr.trim();
    if addr.parse::<SocketAddr>().is_ok() {
        return addr.to_owned();
    }
    let bare = addr.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return SocketAddr::new(ip, DEFAULT_PORT).to_string();
    }
    match addr.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => addr.to_owned(),
        _ => format!("{addr}:{DEFAULT_PORT}"),
    }
}

/// Sends session reports on a [`Client`]'s connection.
#[derive(Debug, Clone)]
pub struct Reporter {
    cmds: mpsc::Sender<Cmd>,
    timeout: Duration,
}

impl Reporter {
    /// Sends one report and waits for the server to note it.
    pub async fn report(&self, r: crate::signal::Report) -> Result<(), ClientError> {
        self.request(Request::Report(r)).await
    }

    /// Sends a request the server answers with `Noted`.
    async fn request(&self, body: Request) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd { body, reply: tx })
            .await
            .map_err(|_| ClientError::Closed(None))?;
        match timeout(self.timeout, rx)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
            .map_err(|_| ClientError::Closed(None))??
        {
            Reply::Noted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Tells the server the port mapping our gateway granted (or that it is gone).
    pub async fn mapped(&self, addr: Option<SocketAddr>) -> Result<(), ClientError> {
        self.request(Request::Mapped { addr }).await
    }
}

/// A signaling connection to a rendezvous.
#[derive(Debug)]
pub struct Client {
    cmds: mpsc::Sender<Cmd>,
    events: mpsc::Receiver<ClientEvent>,
    welcome: Welcome,
    /// Where the client reached the server.
    server_addr: SocketAddr,
    local_addr: SocketAddr,
    server_key: PublicKey,
    config: ClientConfig,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects to `addr` (`HOST:PORT`) and says hello.
    pub async fn connect(addr: &str, config: ClientConfig) -> Result<Client, ClientError> {
        let addr = &with_default_port(addr);
        let err = |source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let stream = timeout(config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out",
                ))
            })?
            .map_err(err)?;
        Self::over(stream, config).await
    }

    /// Says hello over an already connected stream (e.g. one bound to a chosen local port):
    /// TLS 1.3 first, checking the server's key, then the hello.
    pub async fn over(stream: TcpStream, config: ClientConfig) -> Result<Client, ClientError> {
        let _ = stream.set_nodelay(true);
        // A dual-stack socket shows IPv4 ends as v4-mapped: one form for all.
        let local_addr = stream
            .local_addr()
            .map(crate::dual::canonical)
            .map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
        let remote = stream
            .peer_addr()
            .map(crate::dual::canonical)
            .map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
        let (tls, server_key) = timeout(config.connect_timeout, handshake(stream, remote))
            .await
            .map_err(|_| ClientError::Timeout(config.connect_timeout))??;
        if let Some(pinned) = config.server_key
            && pinned != server_key
        {
            return Err(ClientError::KeyMismatch {
                addr: remote,
                presented: server_key,
                pinned,
            });
        }
        let (rd, mut wr) = tokio::io::split(tls);
        let mut reader = FrameReader::new(rd);
        let hello = ClientFrame::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: config.token.clone(),
        });
        let welcome = timeout(config.connect_timeout, async {
            frame::write(&mut wr, &hello).await?;
            match reader.read::<ServerFrame>().await {
                Ok(ServerFrame::Welcome(w)) => Ok(w),
                Ok(ServerFrame::Error(e)) => Err(ClientError::Refused(e)),
                Ok(other) => Err(ClientError::Protocol(format!("{other:?} before welcome"))),
                Err(FrameError::Closed) => Err(ClientError::Closed(None)),
                Err(e) => Err(e.into()),
            }
        })
        .await
        .map_err(|_| ClientError::Timeout(config.connect_timeout))??;
        let mut welcome = welcome;
        welcome.stun = welcome.stun.map(|a| same_host(a, remote.ip()));
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
        let task = tokio::spawn(run(reader, wr, cmd_rx, ev_tx, interval, remote.ip()));
        Ok(Client {
            cmds: cmd_tx,
            events: ev_rx,
            welcome,
            local_addr,
            server_addr: remote,
            server_key,
            config,
            task,
        })
    }

    /// The key the server proved in the TLS handshake.
    pub fn server_key(&self) -> PublicKey {
        self.server_key
    }

    /// The server's greeting.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// This side's address of the signaling connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    async fn request(&self, body: Request) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd { body, reply: tx })
            .await
            .map_err(|_| ClientError::Closed(None))?;
        timeout(self.config.request_timeout, rx)
            .await
            .map_err(|_| ClientError::Timeout(self.config.request_timeout))?
            .map_err(|_| ClientError::Closed(None))?
    }

    /// The server's STUN address as reachable over this connection, if it runs STUN.
    pub fn stun_server(&self) -> Option<SocketAddr> {
        self.welcome.stun
    }

    /// The server's STUN address in the other address family, if it said one.
    pub fn stun_alt(&self) -> Option<SocketAddr> {
        self.welcome.stun_alt
    }

    /// Where this connection reached the server.
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }

    /// Registers `name` with `key`, offering `services`; heartbeats start by themselves.
    pub async fn register(
        &self,
        key: &SigningKey,
        name: &str,
        services: Vec<Service>,
        lan_addrs: Vec<SocketAddr>,
    ) -> Result<Registered, ClientError> {
        self.register_with(key, name, services, lan_addrs, None)
            .await
    }

    /// [`Client::register`], also telling the server what we measured of our NAT.
    pub async fn register_with(
        &self,
        key: &SigningKey,
        name: &str,
        services: Vec<Service>,
        lan_addrs: Vec<SocketAddr>,
        nat: Option<NatInfo>,
    ) -> Result<Registered, ClientError> {
        let sig = key.sign(&register_payload(&self.welcome.nonce, name));
        let reg = Register {
            name: name.to_owned(),
            key: PublicKey(key.verifying_key().to_bytes()),
            services,
            lan_addrs,
            signature: Signature(sig.to_bytes()),
            nat,
        };
        match self.request(Request::Register(reg)).await? {
            Reply::Registered(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Proves this connection holds `key` without registering a name; returns the names
    /// bound to it. A rendezvous without a token lists and looks up peers only for a
    /// registered connection or one whose key holds a name.
    pub async fn identify(&self, key: &SigningKey) -> Result<Vec<String>, ClientError> {
        let sig = key.sign(&identify_payload(&self.welcome.nonce));
        let req = Request::Identify {
            key: PublicKey(key.verifying_key().to_bytes()),
            signature: Signature(sig.to_bytes()),
        };
        match self.request(req).await? {
            Reply::Identified { names } => Ok(names),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a heartbeat now; returns the UDP address the server has observed for us.
    pub async fn heartbeat(&self) -> Result<Option<SocketAddr>, ClientError> {
        match self.request(Request::Heartbeat { rtt_ms: None }).await? {
            Reply::HeartbeatAck { udp_addr } => Ok(udp_addr),
            other => Err(unexpected(other)),
        }
    }

    /// Every peer the server knows, all pages.
    pub async fn list(&self) -> Result<Vec<PeerInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            match self.request(Request::List { after }).await? {
                Reply::Peers { peers, next } => {
                    all.extend(peers);
                    match next {
                        Some(n) => after = Some(n),
                        None => return Ok(all),
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// One peer by name.
    pub async fn lookup(&self, name: &str) -> Result<PeerInfo, ClientError> {
        match self
            .request(Request::Lookup {
                name: name.to_owned(),
            })
            .await?
        {
            Reply::Peer(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Gives up `name`, which this connection registered: the rendezvous forgets the
    /// binding at once and for good.
    pub async fn release(&self, name: &str) -> Result<(), ClientError> {
        match self
            .request(Request::Release {
                name: name.to_owned(),
            })
            .await?
        {
            Reply::Released => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Publishes one of the registered services to plain clients; returns where they reach
    /// it. Ask again after every reconnect.
    pub async fn publish(
        &self,
        p: crate::signal::Publish,
    ) -> Result<crate::signal::Published, ClientError> {
        match self.request(Request::Publish(p)).await? {
            Reply::Published(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// A handle that sends session reports on this connection, usable beside
    /// [`Client::next_event`]; it fails once the connection is gone.
    pub fn reporter(&self) -> Reporter {
        Reporter {
            cmds: self.cmds.clone(),
            timeout: self.config.request_timeout,
        }
    }

    /// Asks to be brokered to `name`'s service; the peer is told at the same moment.
    pub async fn connect_to(
        &self,
        name: &str,
        service: Option<ServiceRef>,
    ) -> Result<Broker, ClientError> {
        match self
            .request(Request::Connect {
                name: name.to_owned(),
                service,
            })
            .await?
        {
            Reply::Brokered(mut b) => {
                b.resolve(self.server_addr.ip());
                Ok(*b)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The next thing the server pushed; `None` once the connection is gone and reported.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }
}

fn unexpected(r: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {r:?}"))
}

async fn run(
    mut reader: FrameReader<ReadHalf<Tls>>,
    mut wr: WriteHalf<Tls>,
    mut cmds: mpsc::Receiver<Cmd>,
    events: mpsc::Sender<ClientEvent>,
    interval: Duration,
    server_ip: std::net::IpAddr,
) {
    let mut pending: HashMap<u32, oneshot::Sender<Result<Reply, ClientError>>> = HashMap::new();
    let mut heartbeats: HashMap<u32, Instant> = HashMap::new();
    let mut next_id: u32 = 1;
    let mut registered = false;
    let mut rtt_ms: Option<u32> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.reset();
    let end = loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return };
                let id = next_id;
                next_id = next_id.wrapping_add(1);
                let f = ClientFrame::Request { id, body: cmd.body };
                if let Err(e) = frame::write(&mut wr, &f).await {
                    let _ = cmd.reply.send(Err(e.into()));
                    break ClientError::Closed(None);
                }
                pending.insert(id, cmd.reply);
            }
            _ = ticker.tick(), if registered => {
                let id = next_id;
                next_id = next_id.wrapping_add(1);
                let f = ClientFrame::Request { id, body: Request::Heartbeat { rtt_ms } };
                if let Err(e) = frame::write(&mut wr, &f).await {
                    break e.into();
                }
                heartbeats.insert(id, Instant::now());
            }
            f = reader.read::<ServerFrame>() => match f {
                Ok(ServerFrame::Response { id, body }) => {
                    if let Some(sent) = heartbeats.remove(&id) {
                        rtt_ms = u32::try_from(sent.elapsed().as_millis()).ok();
                        continue;
                    }
                    if matches!(body, Ok(Reply::Registered(_))) {
                        registered = true;
                        ticker.reset();
                    }
                    if let Some(tx) = pending.remove(&id) {
                        let _ = tx.send(body.map_err(ClientError::Refused));
                    }
                }
                Ok(ServerFrame::Broker(mut b)) => {
                    b.resolve(server_ip);
                    let _ = events.send(ClientEvent::Broker(b)).await;
                }
                Ok(ServerFrame::Open(mut o)) => {
                    o.relay.addr = crate::signal::same_host(o.relay.addr, server_ip);
                    // Never wait on a slow consumer here: heartbeats share this loop, and
                    // a public client whose open is dropped just gets an error page.
                    let _ = events.try_send(ClientEvent::Open(o));
                }
                Ok(ServerFrame::Error(e)) => break ClientError::Closed(Some(e)),
                Ok(ServerFrame::Welcome(_)) => break ClientError::Protocol("second welcome".into()),
                Ok(ServerFrame::Relay(_)) => break ClientError::Protocol("relay message to a peer".into()),
                Err(FrameError::Closed) => break ClientError::Closed(None),
                Err(e) => break e.into(),
            },
        }
    };
    let server_error = match &end {
        ClientError::Closed(e) => e.clone(),
        _ => None,
    };
    for (_, tx) in pending.drain() {
        let _ = tx.send(Err(ClientError::Closed(server_error.clone())));
    }
    let _ = events.send(ClientEvent::Closed(end)).await;
}

/// One Binding transaction from `sock` to `server`, retransmitted on `timing`'s schedule
/// ([`Timing::RFC8489`] unless there is a reason to give up sooner). With a `credential`
/// (username, password from [`Registered`]) the server links the mapping to our
/// registration, and the response's integrity is checked.
pub async fn stun_binding(
    sock: &UdpSocket,
    server: SocketAddr,
    credential: Option<(&str, &str)>,
    timing: Timing,
) -> Result<BindingResponse, ClientError> {
    let stamped = credential.map(|(u, p)| (stun::stamp(u), p));
    let req = stun::binding_request(stamped.as_ref().map(|(u, p)| (u.as_str(), *p)), None)?;
    let mut buf = [0u8; 1500];
    let mut schedule = Retransmit::new(tokio::time::Instant::now().into_std(), timing);
    loop {
        let now = tokio::time::Instant::now().into_std();
        while schedule.poll_transmit(now) {
            sock.send_to(&req.bytes, server)
                .await
                .map_err(ClientError::StunIo)?;
        }
        if schedule.failed(now) {
            return Err(ClientError::StunTimeout(server));
        }
        let deadline = tokio::time::Instant::from_std(schedule.poll_timeout());
        let Ok(got) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await else {
            continue;
        };
        let (n, from) = got.map_err(ClientError::StunIo)?;
        if crate::dual::canonical(from).ip() != server.ip() {
            continue;
        }
        match stun::parse_response(&buf[..n], &req.tid, credential.map(|c| c.1)) {
            Ok(r) => return Ok(r),
            // Stray or late datagrams: keep waiting for ours.
            Err(BindingError::OtherTransaction | BindingError::Malformed) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One Binding transaction over a TCP stream to a STUN server (RFC 8489 §6.2.2: the
/// message itself is the framing; TCP retransmits, so one request, bounded by `within`).
/// With a `credential` the server links the mapping of the stream's local port to our
/// registration: that is how it learns the current public address of our TCP port.
pub async fn stun_binding_tcp(
    stream: &mut TcpStream,
    credential: Option<(&str, &str)>,
    within: Duration,
) -> Result<BindingResponse, ClientError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = stream
        .peer_addr()
        .map(crate::dual::canonical)
        .map_err(ClientError::StunIo)?;
    let stamped = credential.map(|(u, p)| (stun::stamp(u), p));
    let req = stun::binding_request(stamped.as_ref().map(|(u, p)| (u.as_str(), *p)), None)?;
    let exchange = async {
        stream.write_all(&req.bytes).await?;
        let mut msg = vec![0u8; 20];
        stream.read_exact(&mut msg).await?;
        let len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
        if len > 1024 {
            return Err(std::io::Error::other("oversized STUN answer"));
        }
        msg.resize(20 + len, 0);
        stream.read_exact(&mut msg[20..]).await?;
        Ok(msg)
    };
    let msg = timeout(within, exchange)
        .await
        .map_err(|_| ClientError::StunTimeout(server))?
        .map_err(ClientError::StunIo)?;
    Ok(stun::parse_response(
        &msg,
        &req.tid,
        credential.map(|c| c.1),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendezvous_without_a_port_is_on_7000() {
        for (given, want) in [
            ("198.18.0.1", "198.18.0.1:7000"),
            ("198.18.0.1:7444", "198.18.0.1:7444"),
            ("rv.example.org", "rv.example.org:7000"),
            ("rv.example.org:80", "rv.example.org:80"),
            ("::1", "[::1]:7000"),
            ("[2001:2::1]", "[2001:2::1]:7000"),
            ("[2001:2::1]:7001", "[2001:2::1]:7001"),
        ] {
            assert_eq!(with_default_port(given), want, "{given}");
        }
        let key = PublicKey([0xab; 32]);
        assert_eq!(
            split_pinned(&format!("rv.example.org#{key}")).unwrap(),
            ("rv.example.org:7000".to_owned(), Some(key))
        );
    }
}
