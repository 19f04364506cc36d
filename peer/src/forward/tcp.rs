//! Local connections carried as session streams: the copy between the two, counting the
//! bytes each way for `peer status`. Bytes move as chunks that QUIC takes and hands over
//! without a further copy (`write_chunk`, `read_chunk`): at several Gbit/s a copy per
//! byte and side is a tenth of a peer's CPU.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use noq::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes read from the local connection per call: large reads cost fewer system calls and
/// make full-size QUIC packets.
const READ_CHUNK: usize = 128 * 1024;

/// Chunks taken from QUIC per write to the local connection (a chunk is about a packet's
/// payload, so one write carries up to ~190 KiB at 6 KiB packets).
const WRITE_CHUNKS: usize = 32;

/// The error code a stream is reset with when its local connection failed, so the other
/// side closes its end at once (rather than taking a truncated transfer for a complete one).
pub const LOCAL_FAILED: u32 = 1;

/// The first byte the reaching side sends on every connection's stream. A QUIC stream is
/// announced to the other side only by data on it, so without this the exposer would
/// never see the connection of a client that waits for the server to speak first (SSH,
/// SMTP, a database, a download that starts on connect).
pub const OPEN: u8 = 0x01;

/// Announces a connection on a freshly opened stream (see [`OPEN`]).
pub async fn announce(send: &mut SendStream) -> io::Result<()> {
    send.write_all(&[OPEN]).await.map_err(io::Error::other)
}

/// Takes the announcement off a stream the other side opened; an error when it is not one.
pub async fn accept(recv: &mut RecvStream) -> io::Result<()> {
    let mut first = [0u8; 1];
    recv.read_exact(&mut first)
        .await
        .map_err(io::Error::other)?;
    if first[0] != OPEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "unknown stream kind {:#04x} (a newer or older peer?)",
                first[0]
            ),
        ));
    }
    Ok(())
}

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
/// counting bytes into `stats` as they pass (so `peer status` shows live figures). An end
/// of file is passed on as one (half-close); a failure on either side resets the other,
/// so a broken transfer never looks complete.
pub async fn splice(
    local: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    stats: &TunnelStats,
) -> io::Result<()> {
    stats.open.fetch_add(1, Ordering::Relaxed);
    let (mut local_r, mut local_w) = local.into_split();
    let outbound = async {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ_CHUNK);
            let n = match local_r.read_buf(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = send.reset(LOCAL_FAILED.into());
                    return Err(e);
                }
            };
            if n == 0 {
                // The local side is done sending; the peer sees end of file.
                let _ = send.finish();
                return Ok(());
            }
            stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            if let Err(e) = send.write_chunk(buf.split().freeze()).await {
                // The other side stopped reading (its local connection failed) or the
                // session is gone: the local client learns it by a reset, as below.
                abort(local_r.as_ref());
                let unreachable = matches!(&e, noq::WriteError::Stopped(code)
                    if *code == noq::VarInt::from_u32(LOCAL_FAILED));
                return Err(if unreachable {
                    unreachable_error()
                } else {
                    io::Error::other(e)
                });
            }
        }
    };
    let inbound = async {
        let mut chunks: [Bytes; WRITE_CHUNKS] = Default::default();
        loop {
            match recv.read_many_chunks(&mut chunks).await {
                Ok(Some(n)) => {
                    let got: usize = chunks[..n].iter().map(Bytes::len).sum();
                    stats.bytes_in.fetch_add(got as u64, Ordering::Relaxed);
                    if let Err(e) = write_all_chunks(&mut local_w, &mut chunks[..n]).await {
                        let _ = recv.stop(LOCAL_FAILED.into());
                        return Err(e);
                    }
                }
                Ok(None) => {
                    let _ = local_w.shutdown().await;
                    return Ok(());
                }
                Err(e) => {
                    // Reset by the other side or the session is gone: the local connection
                    // learns it by an abortive close (RST), not by a clean end of file.
                    abort(local_w.as_ref());
                    let unreachable = matches!(&e, noq::ReadError::Reset(code)
                        if *code == noq::VarInt::from_u32(LOCAL_FAILED));
                    return Err(if unreachable {
                        unreachable_error()
                    } else {
                        io::Error::other(e)
                    });
                }
            }
        }
    };
    // A failure either way ends both (and with them the local connection): a client
    // waiting for an answer must not wait for the session that is gone.
    let r = tokio::try_join!(outbound, inbound);
    stats.open.fetch_sub(1, Ordering::Relaxed);
    if r.is_err() {
        // A write half dropped the usual way sends FIN first, which the client would
        // read as a clean end before the reset: no FIN, only the RST of [`abort`].
        local_w.forget();
    }
    r.map(|_| ())
}

/// Makes the local connection end with a reset (RST) when it is dropped: a client must not
/// take a failed transfer for a complete one, nor a refused connection for an empty reply.
fn abort(local: &TcpStream) {
    let _ = socket2::SockRef::from(local).set_linger(Some(Duration::ZERO));
}

/// What a stream failed with when the other side could not connect to its local service.
fn unreachable_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        "the other side could not connect to its local service",
    )
}

/// Writes every chunk, several per system call.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<IoSlice<'_>> = chunks[first..].iter().map(|c| IoSlice::new(c)).collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while first < chunks.len() && n >= chunks[first].len() {
            n -= chunks[first].len();
            first += 1;
        }
        if n > 0 {
            chunks[first].advance(n);
        }
    }
    Ok(())
}
