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
use relay::batch::{BATCH_BUF, BatchSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

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

/// Datagrams that came in on a link: the link's address and the run.
pub type Incoming = (SocketAddr, Run);

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
    out: mpsc::Sender<Run>,
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
    ) -> (Link, mpsc::Receiver<Run>) {
        let addr = mapped(self.next.fetch_add(1, Ordering::Relaxed));
        let (out, rx) = mpsc::channel(LINK_QUEUE);
        self.table().insert(
            addr,
            Entry {
                kind,
                out,
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
        let (out, direct) = {
            let table = self.table();
            let Some(e) = table.get(addr) else {
                return false;
            };
            (e.out.clone(), e.direct.clone())
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
        let _ = out.try_send(Run {
            bytes: Bytes::copy_from_slice(datagrams),
            stride: stride.clamp(1, datagrams.len().max(1)),
        });
        true
    }

    /// A link over a byte stream: datagrams framed with a 2-byte length.
    pub fn add_stream(self: &Arc<Self>, kind: PathKind, stream: TcpStream) -> Link {
        let remote = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let _ = stream.set_nodelay(true);
        let (link, mut out) = self.register(kind, remote);
        let (r, mut w) = stream.into_split();
        let (addr, closed, incoming) = (link.addr, link.closed.clone(), self.incoming.clone());
        let done = closed.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(64 * 1024);
            loop {
                let first = tokio::select! {
                    _ = done.cancelled() => break,
                    d = out.recv() => match d { Some(d) => d, None => break },
                };
                // Everything already queued goes out in one write.
                batch.clear();
                first.datagrams().for_each(|d| frame(&mut batch, d));
                while batch.len() < 256 * 1024 {
                    match out.try_recv() {
                        Ok(run) => run.datagrams().for_each(|d| frame(&mut batch, d)),
                        Err(_) => break,
                    }
                }
                if let Err(e) = w.write_all(&batch).await {
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
            let mut runs = Runs::default();
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
                // Every complete datagram goes on, runs of equal size together (as GRO
                // would hand them over); a partial one waits for the rest.
                runs.take_from(&mut buf);
                let mut gone = false;
                for run in runs.out.drain(..) {
                    // TCP already paces us: wait for room rather than drop.
                    if incoming.send((addr, run)).await.is_err() {
                        gone = true;
                        break;
                    }
                }
                if gone {
                    break;
                }
            }
            done.cancel();
        });
        link
    }

    /// A link over a UDP socket of its own whose datagrams all go to, and are taken only
    /// from, `remote`. With `hello` (a relay's join datagram), that is sent again every
    /// [`RELAY_REHELLO`], so that a relay follows us when our NAT gives us a new mapping,
    /// and the relay's answers (control datagrams) are kept from QUIC.
    pub fn add_udp(
        self: &Arc<Self>,
        kind: PathKind,
        sock: UdpSocket,
        remote: SocketAddr,
        hello: Option<Vec<u8>>,
    ) -> Link {
        let (link, mut out) = self.register(kind, remote);
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
        let control = hello.is_some();
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
                let _ = tx.send(remote, &run.bytes, run.stride).await;
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
                let is_control = |d: &[u8]| control && relay::proto::decode_udp(d).is_some();
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
                // A full queue drops the datagrams, as a full socket buffer would.
                if incoming.try_send((addr, run)).is_err() && incoming.is_closed() {
                    break;
                }
            }
        });
        link
    }
}

/// Cuts framed datagrams out of a stream's bytes into runs of equal-size datagrams.
#[derive(Debug, Default)]
struct Runs {
    out: Vec<Run>,
}

impl Runs {
    /// Takes every complete frame off the front of `buf`.
    fn take_from(&mut self, buf: &mut BytesMut) {
        let mut run = BytesMut::new();
        let mut stride = 0;
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            // A longer datagram, or one past the batch size, starts a new run.
            if !run.is_empty() && (len > stride || len == 0 || run.len() + len > BATCH_BUF) {
                self.flush(&mut run, stride);
            }
            if run.is_empty() {
                stride = len;
            }
            buf.advance(2);
            run.extend_from_slice(&buf[..len]);
            buf.advance(len);
            // A shorter (or empty) one ends its run.
            if len < stride || len == 0 {
                self.flush(&mut run, stride);
            }
        }
        if !run.is_empty() {
            self.flush(&mut run, stride);
        }
    }

    fn flush(&mut self, run: &mut BytesMut, stride: usize) {
        self.out.push(Run {
            bytes: run.split().freeze(),
            stride: stride.max(1),
        });
    }
}

fn frame(batch: &mut Vec<u8>, d: &[u8]) {
    // QUIC never builds a datagram past the largest MTU we allow (far below 64 KiB).
    let len = u16::try_from(d.len()).unwrap_or(u16::MAX);
    batch.extend_from_slice(&len.to_be_bytes());
    batch.extend_from_slice(&d[..usize::from(len)]);
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
        for d in [&b"one"[..], &[7u8; 1400], b""] {
            assert!(la.send(&link_a.addr, d, d.len()));
            let (from, got) = rxb.recv().await.unwrap();
            assert_eq!((from, &got.bytes[..]), (link_b.addr, d));
        }
        // A run of datagrams (a GSO batch from QUIC) keeps its datagrams' boundaries.
        assert!(lb.send(&link_b.addr, b"backandforth", 4));
        let mut got = Vec::new();
        while got.len() < 3 {
            let (_, run) = rxa.recv().await.unwrap();
            got.extend(run.datagrams().map(<[u8]>::to_vec));
        }
        assert_eq!(got, [&b"back"[..], b"andf", b"orth"]);
        // The other end going away closes the link; dropping one forgets it.
        drop(link_b);
        link_a.closed().cancelled().await;
        assert!(!la.send(&mapped(999), b"nobody", 6));
    }

    #[test]
    fn framed_datagrams_come_out_in_runs_of_equal_size() {
        let mut stream = Vec::new();
        for d in [
            &[1u8; 6][..],
            &[2; 6],
            &[3; 6],
            &[4; 3],
            &[5; 8],
            &[6; 8],
            &[7; 2],
        ] {
            frame(&mut stream, d);
        }
        // Half of the next datagram has arrived.
        stream.extend_from_slice(&[0, 5, 9, 9]);
        let mut buf = BytesMut::from(&stream[..]);
        let mut runs = Runs::default();
        runs.take_from(&mut buf);
        let got: Vec<Vec<Vec<u8>>> = runs
            .out
            .iter()
            .map(|r| r.datagrams().map(<[u8]>::to_vec).collect())
            .collect();
        assert_eq!(
            got,
            vec![
                vec![vec![1; 6], vec![2; 6], vec![3; 6], vec![4; 3]],
                vec![vec![5; 8], vec![6; 8], vec![7; 2]],
            ]
        );
        assert_eq!(&buf[..], &[0, 5, 9, 9], "the partial datagram waits");
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
        assert_eq!((from, &got.bytes[..]), (link.addr, &b"reply"[..]));
    }
}
