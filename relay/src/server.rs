//! The relay's tokio shell: one TCP listener and one UDP socket on the same port, one task
//! per TCP connection, one task for the UDP socket, and a timer for pairing deadlines, all
//! stopped by one cancellation token. Admission decisions come from [`Pairing`].
//!
//! TCP forwarding borrows each stream from both directions' pumps (readable/try_read,
//! writable/try_write), and borrows a buffer from a pool only while bytes move: an idle
//! paired session costs its task and two sockets, no buffers.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, oneshot};
use tokio::time::{sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::defaults;
use crate::pairing::{Admit, ConnId, Event, Limits, Pairing};
use crate::stats::RelayStats;
use wire::batch::{BATCH_BUF, BatchSocket};
use wire::frame::{self, FrameReader};
use wire::relay::{
    Hello, Proof, RELAY_VERSION, Refusal, RefusalCode, Status, UdpControl, decode_udp, encode_udp,
};
use wire::ticket::{SessionId, Side, TicketKey};

/// How a relay is set up.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// TCP and UDP address (the same port for both).
    pub listen: SocketAddr,
    /// The key tickets are signed with.
    pub key: TicketKey,
    /// Admission limits.
    pub limits: Limits,
    /// Bytes (both directions) after which a session is closed; `None`: no limit.
    pub max_bytes_per_session: Option<u64>,
    /// Bytes per second per session; `None`: no limit.
    pub rate_per_session: Option<u64>,
    /// A paired session silent this long is closed.
    pub idle_timeout: Duration,
    /// Time a TCP connection has to present its ticket.
    pub hello_timeout: Duration,
    /// On every address, take IPv4 and IPv6 halves alike (where the host has IPv6).
    pub dual_stack: bool,
}

impl RelayConfig {
    /// Defaults for everything but the address and key.
    pub fn new(listen: SocketAddr, key: TicketKey) -> Self {
        RelayConfig {
            listen,
            key,
            limits: Limits::default(),
            max_bytes_per_session: None,
            rate_per_session: None,
            idle_timeout: defaults::IDLE_TIMEOUT,
            hello_timeout: defaults::HELLO_TIMEOUT,
            dual_stack: true,
        }
    }
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A socket could not be bound.
    #[error("cannot bind relay {proto} on {addr}: {source}")]
    Bind {
        /// "tcp" or "udp".
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// A bound, not yet running relay.
#[derive(Debug)]
pub struct RelayServer {
    tcp: TcpListener,
    udp: UdpSocket,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: RelayConfig,
    stats: Arc<RelayStats>,
    pairing: Mutex<Pairing>,
    parked: Mutex<HashMap<ConnId, oneshot::Sender<TcpStream>>>,
    udp: Mutex<UdpTable>,
    next_conn: AtomicU64,
    deadlines: Notify,
    pool: Mutex<Vec<Vec<u8>>>,
    /// Keys the UDP challenge cookies (random per start: cookies are short-lived).
    cookie_key: [u8; 32],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Buffers kept for reuse; beyond this, returned buffers are freed.
const POOL_KEEP: usize = 64;

impl Shared {
    fn take_buf(&self) -> Vec<u8> {
        lock(&self.pool)
            .pop()
            .unwrap_or_else(|| vec![0u8; defaults::CHUNK])
    }

    fn put_buf(&self, buf: Vec<u8>) {
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_KEEP {
            pool.push(buf);
        }
    }

    fn conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn refused(&self, remote: SocketAddr, r: &Refusal) {
        self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
        info!(%remote, code = ?r.code, "relay refused: {}", r.message);
    }
}

impl RelayServer {
    /// Binds TCP and UDP on `config.listen` (port 0 picks one free for both).
    pub async fn bind(config: RelayConfig) -> Result<RelayServer, RelayError> {
        let err = |proto, addr| {
            move |source| RelayError::Bind {
                proto,
                addr,
                source,
            }
        };
        let tcp = wire::dual::tcp_listener(config.listen, config.dual_stack)
            .map_err(err("tcp", config.listen))?;
        let addr = tcp.local_addr().map_err(err("tcp", config.listen))?;
        let udp = wire::dual::udp_socket(addr, config.dual_stack).map_err(err("udp", addr))?;
        wire::sockbuf::grow_udp_buffers(&udp);
        let shared = Arc::new(Shared {
            pairing: Mutex::new(Pairing::new(config.key.clone(), config.limits)),
            config,
            stats: Arc::new(RelayStats::default()),
            parked: Mutex::new(HashMap::new()),
            udp: Mutex::new(UdpTable::default()),
            next_conn: AtomicU64::new(1),
            deadlines: Notify::new(),
            pool: Mutex::new(Vec::new()),
            cookie_key: rand::random(),
        });
        Ok(RelayServer {
            tcp,
            udp,
            addr,
            shared,
        })
    }

    /// The bound address (TCP and UDP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.shared.stats.clone()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let RelayServer {
            tcp,
            udp,
            addr,
            shared,
        } = self;
        info!(%addr, "relay listening (tcp and udp)");
        let tracker = TaskTracker::new();
        tracker.spawn(timer(shared.clone(), shutdown.clone()));
        tracker.spawn(serve_udp(shared.clone(), udp, shutdown.clone()));
        loop {
            let (stream, remote) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = tcp.accept() => match r {
                    Ok((s, remote)) => (s, wire::dual::canonical(remote)),
                    Err(e) => {
                        warn!(error = %e, "relay accept failed");
                        sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            tracker.spawn(serve_tcp(shared.clone(), stream, remote, shutdown.clone()));
        }
        tracker.close();
        let _ = timeout(Duration::from_secs(2), tracker.wait()).await;
        info!("relay stopped");
    }

    /// Runs the relay on a task; dropping the handle stops it.
    pub fn spawn(self) -> RelayHandle {
        let addr = self.addr;
        let stats = self.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.run(shutdown.clone()));
        RelayHandle {
            addr,
            stats,
            shutdown,
            task: Some(task),
        }
    }
}

/// A running relay; dropping it stops the relay.
#[derive(Debug)]
pub struct RelayHandle {
    addr: SocketAddr,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RelayHandle {
    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Stops the relay and waits for it.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn timer(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let next = lock(&shared.pairing).poll_timeout();
        // Also wake now and then to forget expired tickets and idle UDP sessions.
        let at = next
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
            .min(Instant::now() + Duration::from_secs(1));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = shared.deadlines.notified() => continue,
            _ = sleep_until(at.into()) => {}
        }
        let now = Instant::now();
        let mut p = lock(&shared.pairing);
        p.handle_timeout(now, unix_now());
        while let Some(Event::PairTimeout { conn, session }) = p.poll_event() {
            debug!(%session, "relay half waited too long for its partner");
            // Dropping the parked sender wakes the waiting task, which reports the timeout.
            lock(&shared.parked).remove(&conn);
            lock(&shared.udp).waiting.remove(&conn);
        }
        drop(p);
        let ended = lock(&shared.udp).sweep_idle(now, shared.config.idle_timeout);
        for s in ended {
            lock(&shared.pairing).session_ended();
            shared.stats.sessions_active.fetch_sub(1, Ordering::Relaxed);
            s.log("idle");
        }
    }
}

async fn serve_tcp(
    shared: Arc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut reader = FrameReader::new(stream);
    let hello = match timeout(shared.config.hello_timeout, reader.read::<Hello>()).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let r = Refusal::new(RefusalCode::BadFrame, format!("bad hello: {e}"));
            shared.refused(remote, &r);
            return refuse(reader.into_inner(), r).await;
        }
        Err(_) => {
            let r = Refusal::new(RefusalCode::BadFrame, "no ticket within the hello timeout");
            shared.refused(remote, &r);
            return refuse(reader.into_inner(), r).await;
        }
    };
    let mut stream = reader.into_inner();
    if hello.version != RELAY_VERSION {
        let r = Refusal::new(
            RefusalCode::VersionMismatch,
            format!(
                "relay speaks version {RELAY_VERSION}, client {}",
                hello.version
            ),
        );
        shared.refused(remote, &r);
        return refuse(stream, r).await;
    }
    // Prove possession before anything is held for this connection: a ticket seen on the
    // wire does not join, and does not move or stall the real half.
    if let Err(r) = tcp_proof(&shared, &mut stream, &hello).await {
        shared.refused(remote, &r);
        return refuse(stream, r).await;
    }
    let conn = shared.conn_id();
    let session = hello.ticket.session;
    let (tx, rx) = oneshot::channel();
    let admit = {
        // A waiting half is parked under the same lock that admits it: a partner admitted
        // a moment later must find it there, or its stream would be dropped unpaired.
        let mut pairing = lock(&shared.pairing);
        let admit =
            pairing.handle_hello_from(Instant::now(), unix_now(), conn, &hello.ticket, remote.ip());
        if let Ok(Admit::Wait | Admit::Replace { .. }) = admit {
            let mut parked = lock(&shared.parked);
            if let Ok(Admit::Replace { old }) = admit {
                // Dropping the old half's sender wakes it, and it closes.
                parked.remove(&old);
            }
            parked.insert(conn, tx);
        }
        admit
    };
    match admit {
        Err(r) => {
            shared.refused(remote, &r);
            refuse(stream, r).await;
        }
        Ok(Admit::Pair { other }) => {
            let waiting = lock(&shared.parked).remove(&other);
            let unpaired = match waiting {
                Some(tx) => tx.send(stream).err(),
                None => Some(stream),
            };
            if let Some(stream) = unpaired {
                // The waiting half left at this very moment.
                lock(&shared.pairing).session_ended();
                refuse(
                    stream,
                    Refusal::new(RefusalCode::PairTimeout, "the other half just left"),
                )
                .await;
            }
        }
        Ok(admit @ (Admit::Wait | Admit::Replace { .. })) => {
            if let Admit::Replace { .. } = admit {
                info!(%session, %remote, "relay half came back on a new connection");
            } else {
                shared.stats.halves_total.fetch_add(1, Ordering::Relaxed);
            }
            shared.deadlines.notify_one();
            if let Err(e) = write_status(&mut stream, &Status::Waiting).await {
                debug!(%session, %remote, error = %e, "relay half left before it heard it waits");
                return gone(&shared, conn);
            }
            debug!(%session, side = ?hello.ticket.side, %remote, "relay half waiting");
            let mut probe = [0u8; 1];
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => gone(&shared, conn),
                partner = rx => match partner {
                    Ok(other) => {
                        let (a, b) = match hello.ticket.side {
                            Side::Initiator => (stream, other),
                            Side::Responder => (other, stream),
                        };
                        forward(&shared, session, a, b, &shutdown).await;
                    }
                    Err(_) => {
                        refuse(stream, Refusal::new(
                            RefusalCode::PairTimeout,
                            format!("the other half did not arrive within {:?} \
                                (or this ticket was presented again on a newer connection)",
                                shared.config.limits.pairing_timeout),
                        )).await;
                    }
                },
                // Nothing may arrive before `Paired`: bytes or EOF both end the wait.
                r = stream.peek(&mut probe) => {
                    debug!(%session, %remote, result = ?r, "relay half left while waiting");
                    gone(&shared, conn)
                }
            }
        }
    }
}

/// The TCP challenge: a random nonce, answered within the hello timeout by a proof over it.
async fn tcp_proof(shared: &Shared, stream: &mut TcpStream, hello: &Hello) -> Result<(), Refusal> {
    shared
        .config
        .key
        .authentic(&hello.ticket)
        .map_err(|e| Refusal::new(RefusalCode::BadTicket, e.to_string()))?;
    let nonce: [u8; 32] = rand::random();
    write_status(stream, &Status::Challenge { nonce })
        .await
        .map_err(|e| Refusal::new(RefusalCode::BadFrame, e.to_string()))?;
    let mut reader = FrameReader::new(&mut *stream);
    let proof = match timeout(shared.config.hello_timeout, reader.read::<Proof>()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Err(Refusal::new(
                RefusalCode::BadFrame,
                format!("bad proof: {e}"),
            ));
        }
        Err(_) => {
            return Err(Refusal::new(
                RefusalCode::NoProof,
                "no proof of the ticket's secret within the hello timeout",
            ));
        }
    };
    if !shared
        .config
        .key
        .check_proof(&hello.ticket, b"tcp", &nonce, &proof.mac)
    {
        return Err(Refusal::new(
            RefusalCode::NoProof,
            "the proof does not verify: this connection does not hold the ticket's secret",
        ));
    }
    Ok(())
}

/// The UDP challenge for a hello from `src`: a cookie over the source address, the ticket
/// and the current 30-second window, so that the relay keeps nothing for hellos nobody
/// proves, and a proof made at one address is no good from another.
fn udp_cookie(shared: &Shared, src: SocketAddr, hello: &Hello, window: u64) -> [u8; 32] {
    let addr = match src {
        SocketAddr::V4(a) => [&a.ip().octets()[..], &a.port().to_be_bytes()].concat(),
        SocketAddr::V6(a) => [&a.ip().octets()[..], &a.port().to_be_bytes()].concat(),
    };
    wire::ticket::hmac_sha256(
        &shared.cookie_key,
        &[
            b"chuantou relay cookie v1\0",
            &window.to_be_bytes(),
            &addr,
            &hello.ticket.session.0,
            &hello.ticket.mac,
        ],
    )
}

/// How long a UDP cookie is good: its window and the one after.
const COOKIE_WINDOW: u64 = 30;

/// Whether a UDP proof from `src` holds: the cookie is this source's (now or in the
/// previous window) and the proof over it verifies.
fn udp_proven(
    shared: &Shared,
    src: SocketAddr,
    hello: &Hello,
    nonce: &[u8; 32],
    mac: &[u8; 32],
) -> bool {
    let window = unix_now() / COOKIE_WINDOW;
    let fresh = [window, window.saturating_sub(1)]
        .iter()
        .any(|w| wire::ticket::constant_time_eq(&udp_cookie(shared, src, hello, *w), nonce));
    fresh
        && shared
            .config
            .key
            .check_proof(&hello.ticket, b"udp", nonce, mac)
}

fn gone(shared: &Shared, conn: ConnId) {
    // Under the pairing lock, so a partner admitted now waits itself rather than being
    // handed to a half that has gone.
    let mut pairing = lock(&shared.pairing);
    pairing.handle_gone(conn);
    lock(&shared.parked).remove(&conn);
}

async fn write_status(stream: &mut TcpStream, s: &Status) -> Result<(), frame::FrameError> {
    match timeout(defaults::HELLO_TIMEOUT, frame::write(stream, s)).await {
        Ok(r) => r,
        Err(_) => Err(frame::FrameError::Io(io::ErrorKind::TimedOut.into())),
    }
}

async fn refuse(mut stream: TcpStream, r: Refusal) {
    if write_status(&mut stream, &Status::Refused(r)).await.is_ok() {
        frame::close_after_error(&mut stream).await;
    }
}

/// Why a relay session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    Reset(&'static str),
    ByteLimit,
    Idle,
    Shutdown,
}

/// Per-session counters shared by its two pumps.
struct Session {
    id: SessionId,
    start: Instant,
    /// Initiator → responder, responder → initiator.
    bytes: [AtomicU64; 2],
    /// Milliseconds since `start` of the last forwarded byte.
    last: AtomicU64,
    pacer: Mutex<Pacer>,
}

impl Session {
    fn new(id: SessionId, rate: Option<u64>) -> Self {
        let start = Instant::now();
        Session {
            id,
            start,
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            last: AtomicU64::new(0),
            pacer: Mutex::new(Pacer::new(rate, start)),
        }
    }

    fn total(&self) -> u64 {
        self.bytes[0].load(Ordering::Relaxed) + self.bytes[1].load(Ordering::Relaxed)
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    fn log(&self, reason: &str) {
        info!(
            session = %self.id,
            initiator_to_responder = self.bytes[0].load(Ordering::Relaxed),
            responder_to_initiator = self.bytes[1].load(Ordering::Relaxed),
            secs = format_args!("{:.1}", self.start.elapsed().as_secs_f64()),
            "relay session ended: {reason}"
        );
    }
}

/// Paces a session to a byte rate: a token bucket holding at most one second's worth, so a
/// session may burst one second of bytes but never banks more while it idles.
#[derive(Debug)]
struct Pacer {
    rate: Option<u64>,
    /// Bytes that may go now; negative while sends already made wait their turn.
    tokens: f64,
    last: Instant,
}

impl Pacer {
    fn new(rate: Option<u64>, start: Instant) -> Self {
        Pacer {
            rate,
            tokens: rate.unwrap_or(0) as f64,
            last: start,
        }
    }

    /// Accounts `n` bytes; returns how long to wait before sending them.
    fn delay(&mut self, n: usize, now: Instant) -> Duration {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return Duration::ZERO;
        };
        let rate = rate as f64;
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + rate * dt).min(rate) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }

    /// Whether `n` more bytes fit the rate now (for datagrams, which are dropped, not
    /// delayed, when they do not).
    fn admit(&mut self, n: usize, now: Instant) -> bool {
        if self.delay(n, now).is_zero() {
            return true;
        }
        self.tokens += n as f64;
        false
    }
}

async fn forward(
    shared: &Arc<Shared>,
    id: SessionId,
    mut initiator: TcpStream,
    mut responder: TcpStream,
    shutdown: &CancellationToken,
) {
    if write_status(&mut initiator, &Status::Paired).await.is_err()
        || write_status(&mut responder, &Status::Paired).await.is_err()
    {
        lock(&shared.pairing).session_ended();
        return;
    }
    shared.stats.sessions_active.fetch_add(1, Ordering::Relaxed);
    shared.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
    info!(session = %id, "relay session paired");
    let session = Session::new(id, shared.config.rate_per_session);
    let end = {
        let mut up = pin!(pump(shared, &session, 0, &initiator, &responder));
        let mut down = pin!(pump(shared, &session, 1, &responder, &initiator));
        let (mut up_done, mut down_done) = (false, false);
        let idle = shared.config.idle_timeout;
        loop {
            let check = idle
                .saturating_sub(session.idle_for())
                .max(Duration::from_millis(50));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break End::Shutdown,
                r = &mut up, if !up_done => match r {
                    End::Closed => { up_done = true; if down_done { break End::Closed } }
                    e => break e,
                },
                r = &mut down, if !down_done => match r {
                    End::Closed => { down_done = true; if up_done { break End::Closed } }
                    e => break e,
                },
                _ = sleep(check) => if session.idle_for() >= idle { break End::Idle },
            }
        }
    };
    if end != End::Closed {
        // Abrupt end: reset both, so neither side mistakes it for a clean close. A zero
        // linger sends RST at once and never blocks the drop (only non-zero lingers do).
        for s in [&initiator, &responder] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }
    drop((initiator, responder));
    lock(&shared.pairing).session_ended();
    shared.stats.sessions_active.fetch_sub(1, Ordering::Relaxed);
    session.log(match end {
        End::Closed => "closed by both sides",
        End::Reset(why) => why,
        End::ByteLimit => "byte limit reached",
        End::Idle => "idle timeout",
        End::Shutdown => "relay shutting down",
    });
}

/// Moves bytes `from` → `to` until EOF (then half-closes `to`) or trouble.
async fn pump(
    shared: &Shared,
    session: &Session,
    dir: usize,
    from: &TcpStream,
    to: &TcpStream,
) -> End {
    let max = shared.config.max_bytes_per_session;
    loop {
        if from.readable().await.is_err() {
            return End::Reset("read failed");
        }
        let mut buf = shared.take_buf();
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                shared.put_buf(buf);
                let _ = socket_shutdown_write(to);
                return End::Closed;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                shared.put_buf(buf);
                continue;
            }
            Err(_) => {
                shared.put_buf(buf);
                return End::Reset("a side closed abruptly");
            }
        };
        if max.is_some_and(|m| session.total() + n as u64 > m) {
            shared.put_buf(buf);
            return End::ByteLimit;
        }
        let wait = lock(&session.pacer).delay(n, Instant::now());
        if !wait.is_zero() {
            sleep(wait).await;
        }
        let sent = write_all(to, &buf[..n]).await;
        shared.put_buf(buf);
        if sent.is_err() {
            return End::Reset("a side closed abruptly");
        }
        session.bytes[dir].fetch_add(n as u64, Ordering::Relaxed);
        shared
            .stats
            .bytes_total
            .fetch_add(n as u64, Ordering::Relaxed);
        session.touch();
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn socket_shutdown_write(s: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write)
}

/// UDP sessions: who is waiting, who is paired with whom.
#[derive(Debug, Default)]
struct UdpTable {
    /// Waiting halves by conn id (for pairing timeouts).
    waiting: HashMap<ConnId, SocketAddr>,
    /// Every admitted address: its conn id, session and side.
    by_addr: HashMap<SocketAddr, (ConnId, SessionId, Side)>,
    /// Paired sessions.
    paired: HashMap<SessionId, UdpSession>,
}

#[derive(Debug)]
struct UdpSession {
    /// Initiator and responder addresses.
    addrs: [SocketAddr; 2],
    /// When each was last heard from.
    heard: [Instant; 2],
    stats: SessionLog,
    pacer: Pacer,
}

/// What a finished UDP session logs (the TCP path logs through [`Session`]).
#[derive(Debug)]
struct SessionLog {
    id: SessionId,
    start: Instant,
    bytes: [u64; 2],
    last: Instant,
}

impl SessionLog {
    fn log(&self, reason: &str) {
        info!(
            session = %self.id,
            initiator_to_responder = self.bytes[0],
            responder_to_initiator = self.bytes[1],
            secs = format_args!("{:.1}", self.start.elapsed().as_secs_f64()),
            "relay udp session ended: {reason}"
        );
    }
}

impl UdpTable {
    fn sweep_idle(&mut self, now: Instant, idle: Duration) -> Vec<SessionLog> {
        let stale: Vec<SessionId> = self
            .paired
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.stats.last) >= idle)
            .map(|(id, _)| *id)
            .collect();
        stale.into_iter().filter_map(|id| self.end(id)).collect()
    }

    fn end(&mut self, id: SessionId) -> Option<SessionLog> {
        let s = self.paired.remove(&id)?;
        for a in s.addrs {
            self.by_addr.remove(&a);
        }
        Some(s.stats)
    }
}

async fn serve_udp(shared: Arc<Shared>, sock: UdpSocket, shutdown: CancellationToken) {
    let sock = match BatchSocket::new(sock) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "relay udp socket could not be set up: no UDP relaying");
            return;
        }
    };
    let mut buf = vec![0u8; BATCH_BUF];
    // The local address each admitted client talks to: what reaches it must leave from
    // there (on a host with several addresses the kernel's choice may be another, which
    // the client's firewall or NAT drops). Learned from its datagrams; bounded.
    let mut local_of = LocalAddrs::default();
    loop {
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = sock.recv(&mut buf) => match r {
                Ok(b) => b,
                Err(e) => { debug!(error = %e, "relay udp recv"); continue; }
            },
        };
        let src = batch.from;
        let here = batch.local;
        // A batch of data datagrams (one source, so one session) is forwarded whole; one
        // with a control datagram in it (the kernel may glue a hello to data of the same
        // source) is taken apart.
        if batch.datagrams(&buf).all(|d| decode_udp(d).is_none()) {
            if let Some(to) = udp_forward(&shared, src, batch.len) {
                local_of.learn(src, here);
                let from = local_of.get(to);
                let _ = sock
                    .send_from(to, from, &buf[..batch.len], batch.stride)
                    .await;
            }
            continue;
        }
        let datagrams: Vec<Vec<u8>> = batch.datagrams(&buf).map(<[u8]>::to_vec).collect();
        for data in datagrams {
            match decode_udp(&data) {
                Some(Ok(UdpControl::Hello(h))) => {
                    // Only a challenge: nothing is held, nothing moves until a proof.
                    let status = if h.version != RELAY_VERSION {
                        Status::Refused(Refusal::new(
                            RefusalCode::VersionMismatch,
                            format!("relay speaks version {RELAY_VERSION}, client {}", h.version),
                        ))
                    } else {
                        Status::Challenge {
                            nonce: udp_cookie(&shared, src, &h, unix_now() / COOKIE_WINDOW),
                        }
                    };
                    let encoded = encode_udp(&UdpControl::Status(status));
                    // Never more than the hello that asked for it.
                    if encoded.len() <= data.len() {
                        let _ = sock.send_from(src, here, &encoded, encoded.len()).await;
                    }
                }
                Some(Ok(UdpControl::Proven { hello, nonce, mac })) => {
                    let statuses = if udp_proven(&shared, src, &hello, &nonce, &mac) {
                        local_of.learn(src, here);
                        udp_hello(&shared, src, &hello)
                    } else {
                        let r = Refusal::new(
                            RefusalCode::NoProof,
                            "the proof does not verify for this address: challenge again",
                        );
                        shared.refused(src, &r);
                        vec![(src, Status::Refused(r))]
                    };
                    for (to, status) in statuses {
                        let encoded = encode_udp(&UdpControl::Status(status));
                        let from = if to == src { here } else { local_of.get(to) };
                        let _ = sock.send_from(to, from, &encoded, encoded.len()).await;
                    }
                }
                // Our own status messages or garbage with the magic: nothing to do.
                Some(_) => {}
                None => {
                    if let Some(to) = udp_forward(&shared, src, data.len()) {
                        local_of.learn(src, here);
                        let from = local_of.get(to);
                        let _ = sock.send_from(to, from, &data, data.len()).await;
                    }
                }
            }
        }
    }
}

/// The local address each admitted UDP client sent to (only clients that proved a hello
/// or are paired get in). Past [`LocalAddrs::MAX`] entries it starts afresh: each live
/// client's next datagram teaches its address again, and until then the kernel chooses.
#[derive(Debug, Default)]
struct LocalAddrs(HashMap<SocketAddr, IpAddr>);

impl LocalAddrs {
    const MAX: usize = 65_536;

    fn learn(&mut self, client: SocketAddr, local: Option<IpAddr>) {
        let Some(local) = local else { return };
        if self.0.get(&client) == Some(&local) {
            return;
        }
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        self.0.insert(client, local);
    }

    fn get(&self, client: SocketAddr) -> Option<IpAddr> {
        self.0.get(&client).copied()
    }
}

/// Handles a UDP hello; returns the status datagrams to send.
fn udp_hello(shared: &Shared, src: SocketAddr, h: &Hello) -> Vec<(SocketAddr, Status)> {
    if h.version != RELAY_VERSION {
        let r = Refusal::new(RefusalCode::VersionMismatch, "relay version mismatch");
        return vec![(src, Status::Refused(r))];
    }
    let mut udp = lock(&shared.udp);
    // A repeated hello from an admitted address only re-learns its status.
    if let Some((_, session, side)) = udp.by_addr.get(&src).copied()
        && session == h.ticket.session
        && side == h.ticket.side
    {
        let paired = udp.paired.contains_key(&session);
        return vec![(
            src,
            if paired {
                Status::Paired
            } else {
                Status::Waiting
            },
        )];
    }
    // A paired half whose NAT gave it a new mapping (a NAT reboot, a carrier rebalancing)
    // comes back from a new address and proves its ticket's secret there: the session
    // follows it (expired ticket or not: expiry bounds joining, and a session may outlive
    // it). While the old address is still heard from, the half has not moved.
    let i = match h.ticket.side {
        Side::Initiator => 0,
        Side::Responder => 1,
    };
    if let Some(s) = udp.paired.get_mut(&h.ticket.session)
        && s.heard[i].elapsed() >= defaults::UDP_REBIND_QUIET
        && shared.config.key.authentic(&h.ticket).is_ok()
    {
        let old = std::mem::replace(&mut s.addrs[i], src);
        if let Some(entry) = udp.by_addr.remove(&old) {
            udp.by_addr.insert(src, entry);
        }
        info!(session = %h.ticket.session, from = %old, to = %src,
            "relay udp half moved to a new address");
        return vec![(src, Status::Paired)];
    }
    let conn = shared.conn_id();
    let admit = lock(&shared.pairing).handle_hello_from(
        Instant::now(),
        unix_now(),
        conn,
        &h.ticket,
        src.ip(),
    );
    match admit {
        Err(r) => {
            drop(udp);
            shared.refused(src, &r);
            vec![(src, Status::Refused(r))]
        }
        Ok(admit @ (Admit::Wait | Admit::Replace { .. })) => {
            if let Admit::Replace { old } = admit
                && let Some(old_addr) = udp.waiting.remove(&old)
            {
                // The client's NAT gave it a new mapping; the old address is dead.
                udp.by_addr.remove(&old_addr);
                info!(session = %h.ticket.session, from = %old_addr, to = %src,
                    "relay udp half came back from a new address");
            }
            if admit == Admit::Wait {
                shared.stats.halves_total.fetch_add(1, Ordering::Relaxed);
            }
            udp.waiting.insert(conn, src);
            udp.by_addr
                .insert(src, (conn, h.ticket.session, h.ticket.side));
            drop(udp);
            shared.deadlines.notify_one();
            vec![(src, Status::Waiting)]
        }
        Ok(Admit::Pair { other }) => {
            let Some(other_addr) = udp.waiting.remove(&other) else {
                drop(udp);
                lock(&shared.pairing).session_ended();
                let r = Refusal::new(RefusalCode::PairTimeout, "the other half just left");
                return vec![(src, Status::Refused(r))];
            };
            udp.by_addr
                .insert(src, (conn, h.ticket.session, h.ticket.side));
            let addrs = match h.ticket.side {
                Side::Initiator => [src, other_addr],
                Side::Responder => [other_addr, src],
            };
            let now = Instant::now();
            udp.paired.insert(
                h.ticket.session,
                UdpSession {
                    addrs,
                    heard: [now; 2],
                    stats: SessionLog {
                        id: h.ticket.session,
                        start: now,
                        bytes: [0, 0],
                        last: now,
                    },
                    pacer: Pacer::new(shared.config.rate_per_session, now),
                },
            );
            shared.stats.sessions_active.fetch_add(1, Ordering::Relaxed);
            shared.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
            info!(session = %h.ticket.session, "relay udp session paired");
            vec![(src, Status::Paired), (other_addr, Status::Paired)]
        }
    }
}

/// Accounts a data datagram from `src`; returns where to forward it.
fn udp_forward(shared: &Shared, src: SocketAddr, n: usize) -> Option<SocketAddr> {
    let mut udp = lock(&shared.udp);
    let (_, session, side) = *udp.by_addr.get(&src)?;
    let s = udp.paired.get_mut(&session)?;
    let dir = match side {
        Side::Initiator => 0,
        Side::Responder => 1,
    };
    let now = Instant::now();
    if shared
        .config
        .max_bytes_per_session
        .is_some_and(|m| s.stats.bytes[0] + s.stats.bytes[1] + n as u64 > m)
    {
        if let Some(log) = udp.end(session) {
            drop(udp);
            lock(&shared.pairing).session_ended();
            shared.stats.sessions_active.fetch_sub(1, Ordering::Relaxed);
            log.log("byte limit reached");
        }
        return None;
    }
    if !s.pacer.admit(n, now) {
        return None;
    }
    s.stats.bytes[dir] += n as u64;
    s.stats.last = now;
    s.heard[dir] = now;
    shared
        .stats
        .bytes_total
        .fetch_add(n as u64, Ordering::Relaxed);
    Some(s.addrs[1 - dir])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_a_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(1000), t0);
        // A one-second burst is free, then bytes wait their turn.
        assert_eq!(p.delay(1000, t0), Duration::ZERO);
        assert_eq!(p.delay(500, t0), Duration::from_millis(500));
        assert!(p.delay(500, t0 + Duration::from_secs(2)).is_zero());
        let mut q = Pacer::new(Some(1000), t0);
        assert!(q.admit(1000, t0));
        assert!(!q.admit(1, t0));
        assert!(q.admit(100, t0 + Duration::from_millis(100)));
        assert!(Pacer::new(None, t0).delay(1 << 30, t0).is_zero());
        // Ten idle seconds bank one second's burst, not ten.
        let mut idle = Pacer::new(Some(1000), t0);
        let later = t0 + Duration::from_secs(10);
        assert!(idle.admit(1000, later));
        assert!(!idle.admit(1, later));
    }
}
