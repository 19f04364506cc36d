//! Local connections carried as session streams: the copy between the two, counting the
//! bytes each way for `peer status`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};

/// Copy buffer per direction of each local connection.
const COPY_BUF: usize = 128 * 1024;

/// Byte counters of one session's local connections.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Bytes sent to the other peer (payload).
    pub bytes_out: AtomicU64,
    /// Bytes received from the other peer (payload).
    pub bytes_in: AtomicU64,
    /// Local connections open through it now.
    pub open: AtomicU64,
}

/// Copies between a local connection and a session stream until both directions end,
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

/// A session stream that counts what is written to it (sent to the peer) and read from it
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
