//! The tunnel between two peers over one byte stream (today a relay session; later a
//! punched TCP path): TLS 1.3 with pinned keys ([`crate::tls`]), then yamux carrying every
//! local TCP connection as its own stream.
//!
//! yamux's `Connection` must be polled continuously, from one place: a driver task owns it,
//! takes "open a stream" requests over a channel, hands inbound streams to a handler, and
//! ends the tunnel (closing [`Tunnel::closed`]) when the connection fails or ends.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use ed25519_dalek::SigningKey;
use rendezvous::proto::PublicKey;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::tls;

/// A multiplexed stream inside a tunnel, with tokio's I/O traits.
pub type TunnelStream = Compat<yamux::Stream>;

/// Why a tunnel could not be set up or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The handshake failed: wrong key, altered bytes, or the stream broke.
    #[error("tunnel handshake: {0}")]
    Handshake(io::Error),
    /// The tunnel is gone.
    #[error("tunnel closed")]
    Closed,
    /// yamux refused to open a stream.
    #[error("opening a stream: {0}")]
    Open(yamux::ConnectionError),
}

/// Byte counters of one tunnel.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Bytes sent to the other peer (payload).
    pub bytes_out: AtomicU64,
    /// Bytes received from the other peer (payload).
    pub bytes_in: AtomicU64,
    /// Local connections open through it now.
    pub open: AtomicU64,
    /// Last measured round trip through the tunnel, in microseconds (0: not yet).
    pub rtt_us: AtomicU64,
}

/// How often the reaching side pings through the tunnel's control stream: the round trip
/// for `peer status`, and traffic that keeps an idle tunnel's relay session and NAT
/// mappings alive.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

type OpenReply = oneshot::Sender<Result<yamux::Stream, TunnelError>>;

/// A live tunnel; cloning shares it. The driver stops when every clone is dropped.
#[derive(Debug, Clone)]
pub struct Tunnel {
    opener: mpsc::Sender<OpenReply>,
    closed: CancellationToken,
    /// Its counters.
    pub stats: Arc<TunnelStats>,
}

impl Tunnel {
    /// Opens a new stream to the other side.
    pub async fn open(&self) -> Result<TunnelStream, TunnelError> {
        let (tx, rx) = oneshot::channel();
        self.opener
            .send(tx)
            .await
            .map_err(|_| TunnelError::Closed)?;
        Ok(rx.await.map_err(|_| TunnelError::Closed)??.compat())
    }

    /// Cancelled when the tunnel ends.
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Whether the tunnel has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

/// How long closing a tunnel may wait for the other side.
const CLOSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Copy buffer per direction of each local connection.
const COPY_BUF: usize = 128 * 1024;

fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    // Hundreds of concurrent local connections are normal for a browser behind `reach`;
    // yamux wants 256 KiB of connection window per stream.
    c.set_max_num_streams(1024);
    c.set_max_connection_receive_window(Some(1024 * 256 * 1024));
    // Fewer, larger frames: one TLS record (16 KiB) per yamux frame is the natural minimum.
    c.set_split_send_size(64 * 1024);
    c
}

/// The reaching side: TLS client authenticating as `me`, accepting only `peer`.
pub async fn connect<S>(io: S, me: &SigningKey, peer: PublicKey) -> Result<Tunnel, TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = Arc::new(tls::client_config(me, peer)?);
    let name = ServerName::try_from(tls::SERVER_NAME)
        .map_err(|e| TunnelError::Handshake(io::Error::other(e)))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(TunnelError::Handshake)?;
    let conn = yamux::Connection::new(tls.compat(), yamux_config(), yamux::Mode::Client);
    let tunnel = spawn_driver(conn, None);
    // The first stream is the control stream. Its first ping is written before any other
    // stream can be opened, so it is the first stream the other side sees.
    let mut control = tunnel.open().await?;
    let sent = std::time::Instant::now();
    control
        .write_all(&0u64.to_be_bytes())
        .await
        .map_err(TunnelError::Handshake)?;
    tokio::spawn(pinger(
        control,
        sent,
        tunnel.stats.clone(),
        tunnel.closed.clone(),
    ));
    Ok(tunnel)
}

/// A ping unanswered this long means the path is dead (a NAT or a relay dropped it without a
/// word): the tunnel is closed, so new connections take another path and a new one is made.
/// The same 30 s as the direct QUIC path's idle timeout.
pub const DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Pings through the control stream every [`PING_INTERVAL`], recording the round trip;
/// closes the tunnel when a ping goes unanswered for [`DEAD_AFTER`].
async fn pinger(
    mut control: TunnelStream,
    mut sent: std::time::Instant,
    stats: Arc<TunnelStats>,
    closed: CancellationToken,
) {
    let mut seq = 0u64;
    loop {
        let mut pong = [0u8; 8];
        let got = tokio::select! {
            _ = closed.cancelled() => return,
            r = tokio::time::timeout(DEAD_AFTER, control.read_exact(&mut pong)) => r,
        };
        match got {
            Ok(Ok(_)) if pong == seq.to_be_bytes() => {
                let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.rtt_us.store(us.max(1), Ordering::Relaxed);
            }
            Ok(Ok(_)) => {
                warn!("tunnel ping answered out of turn; closing the tunnel");
                stats.rtt_us.store(0, Ordering::Relaxed);
                closed.cancel();
                return;
            }
            // The other side ended the tunnel: the driver sees it too.
            Ok(Err(_)) => return,
            Err(_) => {
                warn!(
                    "tunnel ping unanswered for {DEAD_AFTER:?}: the path is dead, closing the tunnel"
                );
                stats.rtt_us.store(0, Ordering::Relaxed);
                closed.cancel();
                return;
            }
        }
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(PING_INTERVAL) => {}
        }
        seq += 1;
        sent = std::time::Instant::now();
        if control.write_all(&seq.to_be_bytes()).await.is_err() {
            return;
        }
    }
}

/// Answers pings on the control stream (the first stream the reaching side opens).
async fn ponger(mut control: TunnelStream) {
    let mut ping = [0u8; 8];
    while control.read_exact(&mut ping).await.is_ok() {
        if control.write_all(&ping).await.is_err() {
            return;
        }
    }
}

/// The exposing side: TLS server authenticating as `me`, requiring `peer`; each stream the
/// other side opens is given to `on_stream`, none dropped.
pub async fn accept<S>(
    io: S,
    me: &SigningKey,
    peer: PublicKey,
    on_stream: mpsc::UnboundedSender<TunnelStream>,
) -> Result<Tunnel, TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = Arc::new(tls::server_config(me, peer)?);
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(io)
        .await
        .map_err(TunnelError::Handshake)?;
    let conn = yamux::Connection::new(tls.compat(), yamux_config(), yamux::Mode::Server);
    // The first inbound stream is the control stream; the rest are the service's.
    let (tx, mut rx) = mpsc::unbounded_channel::<TunnelStream>();
    tokio::spawn(async move {
        if let Some(control) = rx.recv().await {
            tokio::spawn(ponger(control));
        }
        while let Some(s) = rx.recv().await {
            if on_stream.send(s).is_err() {
                return;
            }
        }
    });
    Ok(spawn_driver(conn, Some(tx)))
}

fn spawn_driver<T>(
    mut conn: yamux::Connection<T>,
    // Unbounded, yet bounded: yamux caps the streams open at once (`set_max_num_streams`),
    // and a stream cannot be refused from inside the poll without losing it.
    inbound: Option<mpsc::UnboundedSender<TunnelStream>>,
) -> Tunnel
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static,
{
    let (opener, mut requests) = mpsc::channel::<OpenReply>(64);
    let closed = CancellationToken::new();
    let done = closed.clone();
    tokio::spawn(async move {
        let mut waiting: VecDeque<OpenReply> = VecDeque::new();
        let mut requests_open = true;
        // Closing the tunnel from outside (a dead path) ends the driver too.
        let stop = done.clone();
        let mut stopped = std::pin::pin!(stop.cancelled());
        let end = poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            while requests_open {
                match requests.poll_recv(cx) {
                    Poll::Ready(Some(r)) => waiting.push_back(r),
                    Poll::Ready(None) => requests_open = false,
                    Poll::Pending => break,
                }
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(s)) => {
                        if let Some(r) = waiting.pop_front() {
                            let _ = r.send(Ok(s));
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(s))) => match &inbound {
                        Some(tx) => {
                            if tx.send(s.compat()).is_err() {
                                debug!("tunnel: inbound stream dropped, nobody serves them");
                            }
                        }
                        // The reaching side does not serve streams.
                        None => drop(s),
                    },
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            if !requests_open && waiting.is_empty() && inbound.is_none() {
                // Nobody can open streams any more and none come in: close politely.
                return Poll::Ready(Ok(()));
            }
            Poll::Pending
        })
        .await;
        match &end {
            Ok(()) => debug!("tunnel ended"),
            Err(e) => debug!(error = %e, "tunnel failed"),
        }
        for r in waiting {
            let _ = r.send(Err(TunnelError::Closed));
        }
        // A dead path never acknowledges the goodbye: do not wait for it long.
        let _ = tokio::time::timeout(CLOSE_WITHIN, poll_fn(|cx| conn.poll_close(cx))).await;
        done.cancel();
    });
    Tunnel {
        opener,
        closed,
        stats: Arc::new(TunnelStats::default()),
    }
}

/// Copies between a local connection and a tunnel stream until both directions end,
/// counting bytes into `stats` as they pass (so `peer status` shows live figures).
pub async fn splice<L, S>(mut local: L, stream: S, stats: &TunnelStats) -> io::Result<()>
where
    L: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    stats.open.fetch_add(1, Ordering::Relaxed);
    let mut counted = Counted {
        inner: stream,
        stats,
    };
    // tokio's default 8 KiB buffers cost a system call per 8 KiB; bulk transfers through
    // the tunnel go several times faster with larger ones.
    let r = tokio::io::copy_bidirectional_with_sizes(&mut local, &mut counted, COPY_BUF, COPY_BUF)
        .await;
    stats.open.fetch_sub(1, Ordering::Relaxed);
    r.map(|_| ())
}

/// A tunnel stream that counts what is written to it (sent to the peer) and read from it
/// (received from the peer).
struct Counted<'a, S> {
    inner: S,
    stats: &'a TunnelStats,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.stats.bytes_in.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
