//! Links: paths that are not a plain UDP pair on the shared socket, each known to QUIC by a
//! made-up address ([`super::mapped`]). A link is either a byte stream (a relay or punched
//! TCP connection) on which every datagram travels as a 2-byte big-endian length and its
//! bytes, or a UDP socket of its own with one fixed remote (a relay over UDP, a birthday
//! socket). Datagrams that arrive on any link reach the QUIC socket through one queue,
//! tagged with the link's address; datagrams QUIC sends to a link's address go out on it.
//! Dropping the [`Link`] closes it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use wire::batch::{BATCH_BUF, BatchSocket};
use wire::relay::client::UdpJoin;

use super::{PathKind, mapped};
use crate::defaults::{LINK_QUEUE, RELAY_REHELLO};

/// Largest datagram a stream link carries (the 2-byte length).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// One datagram, or a run of datagrams of `stride` bytes each (the last may be shorter)
/// that travel as one GSO/GRO batch where the link can.
#[derive(Debug, Clone)]
pub struct Run {
    /// The datagrams, back to back.
    pub bytes: Bytes,
    /// Size of each (the whole length for a single datagram).
    pub stride: usize,
}

impl Run {
    /// A single datagram.
    pub fn one(bytes: Bytes) -> Run {
        let stride = bytes.len();
        Run { bytes, stride }
    }

    /// Its datagrams, in order (an empty run is one empty datagram).
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        let empty = self.bytes.is_empty().then_some(&[][..]);
        self.bytes.chunks(self.stride.max(1)).chain(empty)
    }
}

/// Datagrams on their way between a link and QUIC, in the form the link keeps them, so
/// that nothing is copied more often than it must be.
#[derive(Debug, Clone)]
pub enum Datagrams {
    /// A run (a UDP link's GRO batch, or one of QUIC's GSO batches).
    Run(Run),
    /// Datagrams as a stream link carries them: each a 2-byte big-endian length and its
    /// bytes, back to back, whole ones only.
    Framed(Bytes),
}

impl Datagrams {
    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        match self {
            Datagrams::Run(r) => r.bytes.is_empty(),
            Datagrams::Framed(b) => b.is_empty(),
        }
    }

    /// Moves the next run that fits into `buf` (datagrams of one size, the last maybe
    /// shorter, as GRO hands them over) and says its length and stride; `None` when
    /// nothing is left. A datagram larger than `buf` is dropped, as a socket would.
    pub fn take_into(&mut self, buf: &mut [u8]) -> Option<(usize, usize)> {
        match self {
            Datagrams::Run(run) => loop {
                if run.bytes.is_empty() {
                    return None;
                }
                let stride = run.stride.max(1);
                let fit = (buf.len() / stride * stride).min(run.bytes.len());
                if fit == 0 {
                    run.bytes.advance(stride.min(run.bytes.len()));
                    continue;
                }
                buf[..fit].copy_from_slice(&run.bytes[..fit]);
                run.bytes.advance(fit);
                return Some((fit, stride.min(fit)));
            },
            Datagrams::Framed(bytes) => {
                let mut len = 0;
                let mut stride = 0;
                while let Some(next) = frame_len(bytes) {
                    if len == 0 {
                        if next == 0 || next > buf.len() {
                            // QUIC has no use for an empty datagram; an oversized one
                            // would not fit any buffer.
                            bytes.advance(2 + next);
                            continue;
                        }
                        stride = next;
                    } else if next == 0 || next > stride || len + next > buf.len() {
                        break;
                    }
                    buf[len..len + next].copy_from_slice(&bytes[2..2 + next]);
                    bytes.advance(2 + next);
                    len += next;
                    if next < stride {
                        break; // a shorter one ends its run
                    }
                }
                (len > 0).then_some((len, stride))
            }
        }
    }
}

/// The length of the frame at the front of `bytes`, if it is all there.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let len = usize::from(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]));
    (bytes.len() >= 2 + len).then_some(len)
}

/// How many bytes at the front of `bytes` are whole frames.
pub fn whole_frames(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(len) = frame_len(&bytes[at..]) {
        at += 2 + len;
    }
    at
}

/// Datagrams that came in on a link: the link's address and the datagrams.
pub type Incoming = (SocketAddr, Datagrams);

/// Every live link of one QUIC socket.
#[derive(Debug)]
pub struct Links {
    table: Mutex<HashMap<SocketAddr, Entry>>,
    next: AtomicU64,
    incoming: mpsc::Sender<Incoming>,
}

#[derive(Debug)]
struct Entry {
    kind: PathKind,
    out: mpsc::Sender<Datagrams>,
    /// A stream link: its queue holds datagrams framed already.
    framed: bool,
    /// A UDP link's socket and remote: QUIC's datagrams go straight out on it when it has
    /// room, skipping the queue (a task hop and a copy per batch).
    direct: Option<(Arc<BatchSocket>, SocketAddr)>,
}

/// One link, alive while this is held.
#[derive(Debug)]
pub struct Link {
    /// Its made-up address.
    pub addr: SocketAddr,
    /// What it is.
    pub kind: PathKind,
    /// The real address at its other end (the relay or the peer), for status and logs.
    pub remote: SocketAddr,
    closed: CancellationToken,
    links: Arc<Links>,
}

impl Link {
    /// Cancelled when the link's connection ended (or the link was dropped).
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.closed.cancel();
        self.links.remove(&self.addr);
    }
}

impl Links {
    /// A table whose links deliver into the returned receiver.
    pub fn new() -> (Arc<Links>, mpsc::Receiver<Incoming>) {
        let (incoming, rx) = mpsc::channel(LINK_QUEUE);
        let links = Links {
            table: Mutex::default(),
            next: AtomicU64::new(1),
            incoming,
        };
        (Arc::new(links), rx)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, addr: &SocketAddr) {
        self.table().remove(addr);
    }

    fn register(
        self: &Arc<Self>,
        kind: PathKind,
        remote: SocketAddr,
        framed: bool,
    ) -> (Link, mpsc::Receiver<Datagrams>) {
        let addr = mapped(self.next.fetch_add(1, Ordering::Relaxed));
        let (out, rx) = mpsc::channel(LINK_QUEUE);
        self.table().insert(
            addr,
            Entry {
                kind,
                out,
                framed,
                direct: None,
            },
        );
        let link = Link {
            addr,
            kind,
            remote,
            closed: CancellationToken::new(),
            links: self.clone(),
        };
        (link, rx)
    }

    /// The kind of the link at `addr`, if there is one.
    pub fn kind_of(&self, addr: &SocketAddr) -> Option<PathKind> {
        self.table().get(addr).map(|e| e.kind)
    }

    /// Queues `datagrams` (a run of `stride`-byte datagrams, or one) on the link at
    /// `addr`; false when there is no such link. A full queue drops them (as a full
    /// socket buffer would).
    pub fn send(&self, addr: &SocketAddr, datagrams: &[u8], stride: usize) -> bool {
        // Take what is needed and let go of the table before any system call.
        let (out, direct, framed) = {
            let table = self.table();
            let Some(e) = table.get(addr) else {
                return false;
            };
            (e.out.clone(), e.direct.clone(), e.framed)
        };
        // Straight out when the socket has room and nothing is queued before it (order
        // matters little to QUIC, but reordering costs spurious loss detection).
        if let Some((sock, remote)) = direct
            && out.capacity() == out.max_capacity()
        {
            match sock.try_send(remote, datagrams, stride) {
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                // Sent, or lost as UDP loses datagrams.
                _ => return true,
            }
        }
        let stride = stride.clamp(1, datagrams.len().max(1));
        let queued = if framed {
            // Framed here, once, so that the writer only writes.
            let mut b = BytesMut::with_capacity(datagrams.len() + 2 * datagrams.len() / stride + 2);
            datagrams.chunks(stride).for_each(|d| frame(&mut b, d));
            Datagrams::Framed(b.freeze())
        } else {
            Datagrams::Run(Run {
                bytes: Bytes::copy_from_slice(datagrams),
                stride,
            })
        };
        let _ = out.try_send(queued);
        true
    }

    /// A link over a byte stream: datagrams framed with a 2-byte length.
    pub fn add_stream(self: &Arc<Self>, kind: PathKind, stream: TcpStream) -> Link {
        let remote = stream
            .peer_addr()
            .map(wire::dual::canonical)
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let _ = stream.set_nodelay(true);
        let (link, mut out) = self.register(kind, remote, true);
        let (r, mut w) = stream.into_split();
        let (addr, closed, incoming) = (link.addr, link.closed.clone(), self.incoming.clone());
        let done = closed.clone();
        tokio::spawn(async move {
            let mut batch: Vec<Bytes> = Vec::new();
            loop {
                let first = tokio::select! {
                    _ = done.cancelled() => break,
                    d = out.recv() => match d { Some(d) => d, None => break },
                };
                // Everything already queued goes out in one write.
                batch.clear();
                let mut size = 0;
                let mut next = Some(first);
                while let Some(d) = next.take() {
                    if let Datagrams::Framed(b) = d {
                        size += b.len();
                        batch.push(b);
                    }
                    if size < 256 * 1024 && batch.len() < 64 {
                        next = out.try_recv().ok();
                    }
                }
                if let Err(e) = write_all(&mut w, &mut batch).await {
                    debug!(%addr, error = %e, "link write failed");
                    break;
                }
            }
            done.cancel();
        });
        let done = closed;
        tokio::spawn(async move {
            let mut r = r;
            let mut buf = BytesMut::new();
            loop {
                if buf.capacity() - buf.len() < BATCH_BUF {
                    buf.reserve(4 * BATCH_BUF);
                }
                tokio::select! {
                    _ = done.cancelled() => break,
                    n = r.read_buf(&mut buf) => match n {
                        Ok(0) => { debug!(%addr, "link closed by the other end"); break; }
                        Ok(_) => {}
                        Err(e) => { debug!(%addr, error = %e, "link closed"); break; }
                    },
                }
                // Every whole datagram goes on as it came, without a copy; a partial one
                // waits for the rest.
                let whole = whole_frames(&buf);
                if whole == 0 {
                    continue;
                }
                let framed = Datagrams::Framed(buf.split_to(whole).freeze());
                // TCP already paces us: wait for room rather than drop.
                if incoming.send((addr, framed)).await.is_err() {
                    break;
                }
            }
            done.cancel();
        });
        link
    }

    /// A link over a UDP socket of its own whose datagrams all go to, and are taken only
    /// from, `remote`. With `join` (a relay join), its hello is sent again every
    /// [`RELAY_REHELLO`] and the relay's challenges are answered, so that a relay follows
    /// us when our NAT gives us a new mapping; the relay's control datagrams are kept from
    /// QUIC.
    pub fn add_udp(
        self: &Arc<Self>,
        kind: PathKind,
        sock: UdpSocket,
        remote: SocketAddr,
        join: Option<UdpJoin>,
    ) -> Link {
        let (link, mut out) = self.register(kind, remote, false);
        let (addr, closed, incoming) = (link.addr, link.closed.clone(), self.incoming.clone());
        let sock = match BatchSocket::new(sock) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                // Without its socket state the link cannot run: closed at once, so the
                // session does not wait for a path that will never carry anything.
                debug!(%addr, error = %e, "udp link could not be set up");
                closed.cancel();
                return link;
            }
        };
        if let Some(e) = self.table().get_mut(&addr) {
            e.direct = Some((sock.clone(), remote));
        }
        let (tx, done) = (sock.clone(), closed.clone());
        let control = join.is_some();
        let hello = join.as_ref().map(UdpJoin::hello);
        let answers = sock.clone();
        tokio::spawn(async move {
            let mut rehello = tokio::time::interval(RELAY_REHELLO);
            rehello.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let run = tokio::select! {
                    _ = done.cancelled() => break,
                    _ = rehello.tick(), if hello.is_some() => {
                        if let Some(h) = &hello {
                            let _ = tx.send(remote, h, h.len()).await;
                        }
                        continue;
                    }
                    d = out.recv() => match d { Some(d) => d, None => break },
                };
                // A send error (no route for a moment, ICMP) loses datagrams, as UDP does.
                if let Datagrams::Run(run) = run {
                    let _ = tx.send(remote, &run.bytes, run.stride).await;
                }
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; BATCH_BUF];
            loop {
                let got = tokio::select! {
                    _ = closed.cancelled() => break,
                    r = sock.recv(&mut buf) => r,
                };
                // Strangers, and ICMP errors surfacing as recv errors, are ignored.
                let Ok(batch) = got else { continue };
                if batch.from != remote {
                    continue;
                }
                let is_control = |d: &[u8]| control && wire::relay::decode_udp(d).is_some();
                // The relay's challenge (after a re-hello): prove the ticket's secret again.
                if let Some(j) = &join {
                    for d in batch.datagrams(&buf).filter(|d| is_control(d)) {
                        if let Some(answer) = j.answer(d) {
                            let _ = answers.send(remote, &answer, answer.len()).await;
                        }
                    }
                }
                let run = if batch.datagrams(&buf).any(is_control) {
                    // The relay's answers are not QUIC: keep them out, the rest in order
                    // (dropping whole datagrams keeps every stride but the last).
                    let mut kept = Vec::with_capacity(batch.len);
                    batch
                        .datagrams(&buf)
                        .filter(|d| !is_control(d))
                        .for_each(|d| kept.extend_from_slice(d));
                    if kept.is_empty() {
                        continue;
                    }
                    Run {
                        bytes: kept.into(),
                        stride: batch.stride,
                    }
                } else {
                    Run {
                        bytes: Bytes::copy_from_slice(&buf[..batch.len]),
                        stride: batch.stride,
                    }
                };
                let run = Datagrams::Run(run);
                // A full queue drops the datagrams, as a full socket buffer would.
                if incoming.try_send((addr, run)).is_err() && incoming.is_closed() {
                    break;
                }
            }
        });
        link
    }
}

/// Writes every buffer of `batch`, in as few system calls as the socket allows.
async fn write_all(
    w: &mut (impl AsyncWriteExt + Unpin),
    batch: &mut [Bytes],
) -> std::io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        let slices: Vec<std::io::IoSlice> = batch[first..]
            .iter()
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let b = &mut batch[first];
            let step = n.min(b.len());
            b.advance(step);
            n -= step;
            if b.is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

fn frame(batch: &mut impl bytes::BufMut, d: &[u8]) {
    // QUIC never builds a datagram past the largest MTU we allow (far below 64 KiB).
    let len = u16::try_from(d.len()).unwrap_or(u16::MAX);
    batch.put_slice(&len.to_be_bytes());
    batch.put_slice(&d[..usize::from(len)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_link_keeps_datagram_boundaries_both_ways() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(to), listener.accept());
        let (la, mut rxa) = Links::new();
        let (lb, mut rxb) = Links::new();
        let link_a = la.add_stream(PathKind::RelayTcp, a.unwrap());
        let link_b = lb.add_stream(PathKind::RelayTcp, b.unwrap().0);
        assert_eq!(la.kind_of(&link_a.addr), Some(PathKind::RelayTcp));
        for d in [&b"one"[..], &[7u8; 1400]] {
            assert!(la.send(&link_a.addr, d, d.len()));
            let (from, got) = rxb.recv().await.unwrap();
            assert_eq!((from, all(got)), (link_b.addr, vec![d.to_vec()]));
        }
        // A run of datagrams (a GSO batch from QUIC) keeps its datagrams' boundaries.
        assert!(lb.send(&link_b.addr, b"backandforth", 4));
        let mut got = Vec::new();
        while got.len() < 3 {
            let (_, d) = rxa.recv().await.unwrap();
            got.extend(all(d));
        }
        assert_eq!(got, [&b"back"[..], b"andf", b"orth"]);
        // The other end going away closes the link; dropping one forgets it.
        drop(link_b);
        link_a.closed().cancelled().await;
        assert!(!la.send(&mapped(999), b"nobody", 6));
    }

    /// Every datagram of `d`, taken out as QUIC's socket takes them.
    fn all(mut d: Datagrams) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1 << 16];
        while let Some((len, stride)) = d.take_into(&mut buf) {
            out.extend(buf[..len].chunks(stride).map(<[u8]>::to_vec));
        }
        out
    }

    #[test]
    fn framed_datagrams_come_out_in_runs_of_equal_size() {
        let mut stream = Vec::new();
        for d in [
            &[1u8; 6][..],
            &[2; 6],
            &[3; 6],
            &[4; 3],
            &[],
            &[5; 8],
            &[6; 8],
            &[7; 2],
            &[8; 40],
            &[9; 4],
        ] {
            frame(&mut stream, d);
        }
        // Half of the next datagram has arrived: only whole ones are taken.
        let whole = stream.len();
        stream.extend_from_slice(&[0, 5, 9, 9]);
        assert_eq!(whole_frames(&stream), whole);
        let mut d = Datagrams::Framed(Bytes::copy_from_slice(&stream[..whole]));
        let mut buf = [0u8; 20];
        let mut runs = Vec::new();
        while let Some((len, stride)) = d.take_into(&mut buf) {
            runs.push(
                buf[..len]
                    .chunks(stride)
                    .map(<[u8]>::to_vec)
                    .collect::<Vec<_>>(),
            );
        }
        // The empty datagram is dropped, the one larger than the buffer too, and a run
        // stops where the buffer is full.
        assert_eq!(
            runs,
            vec![
                vec![vec![1; 6], vec![2; 6], vec![3; 6]],
                vec![vec![4; 3]],
                vec![vec![5; 8], vec![6; 8], vec![7; 2]],
                vec![vec![9; 4]],
            ]
        );
        assert!(d.is_empty());
    }

    #[test]
    fn a_run_is_handed_over_in_pieces_that_fit() {
        let mut d = Datagrams::Run(Run {
            bytes: Bytes::from_static(b"aaabbbcccdd"),
            stride: 3,
        });
        let mut buf = [0u8; 7];
        let mut got = Vec::new();
        while let Some((len, stride)) = d.take_into(&mut buf) {
            got.push((buf[..len].to_vec(), stride));
        }
        assert_eq!(got, vec![(b"aaabbb".to_vec(), 3), (b"cccdd".to_vec(), 3)]);
    }

    #[tokio::test]
    async fn a_udp_link_talks_to_its_remote_only() {
        let (links, mut rx) = Links::new();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mine = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mine_addr = mine.local_addr().unwrap();
        let link = links.add_udp(PathKind::Relay, mine, peer.local_addr().unwrap(), None);
        // A run of three datagrams leaves as three datagrams.
        links.send(&link.addr, b"hello, world", 5);
        let mut buf = [0u8; 64];
        for d in [&b"hello"[..], b", wor", b"ld"] {
            let (n, from) = peer.recv_from(&mut buf).await.unwrap();
            assert_eq!((&buf[..n], from), (d, mine_addr));
        }
        stranger.send_to(b"spoof", mine_addr).await.unwrap();
        peer.send_to(b"reply", mine_addr).await.unwrap();
        let (from, got) = rx.recv().await.unwrap();
        assert_eq!((from, all(got)), (link.addr, vec![b"reply".to_vec()]));
    }
}
