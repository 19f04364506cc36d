//! The QUIC socket of a peer: the shared UDP socket (whose NAT mapping the rendezvous
//! observed) plus every [`Links`] entry. QUIC runs in IPv6 mode so that the links' made-up
//! addresses fit beside real ones; datagrams to a made-up address go out on its link, the
//! rest on the UDP socket. Datagrams on the UDP socket that are not QUIC are taken out
//! before QUIC sees them and routed by their first byte (RFC 9443): STUN (0–3) to the
//! refresher, punch probes (4, see [`probe`]) to the punch of their session.
//!
//! [`probe`]: crate::punch::probe

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use noq::udp::{RecvMeta, Transmit};
use noq::{AsyncUdpSocket, UdpSender};
use tokio::sync::mpsc;

use super::link::{Incoming, Links};
use super::{canonical, for_quic, is_mapped};
use crate::punch::probe;

/// Datagrams queued per route before new ones are dropped (UDP semantics: a slow reader
/// loses packets, memory stays bounded).
pub const ROUTE_QUEUE: usize = 1024;

/// A datagram taken out of the QUIC stream: where it came from and its bytes.
pub type Datagram = (SocketAddr, Vec<u8>);

/// Where non-QUIC datagrams of the UDP socket go.
#[derive(Debug, Default)]
pub struct Routes {
    /// Punch probes, by session id.
    pub punches: Mutex<HashMap<[u8; 16], mpsc::Sender<Datagram>>>,
    /// STUN answers.
    pub stun: Mutex<Option<mpsc::Sender<Datagram>>>,
}

fn is_stun(data: &[u8]) -> bool {
    data.len() >= 20 && data[0] < 4 && data[4..8] == [0x21, 0x12, 0xa4, 0x42]
}

impl Routes {
    /// Takes `data` if it is not QUIC; true when it did.
    fn divert(&self, from: SocketAddr, data: &[u8]) -> bool {
        if let Some(session) = probe::session_of(data) {
            let punches = self.punches.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = punches.get(&session) {
                let _ = tx.try_send((from, data.to_vec()));
            }
            return true;
        }
        if is_stun(data) {
            let stun = self.stun.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = stun.as_ref() {
                let _ = tx.try_send((from, data.to_vec()));
            }
            return true;
        }
        // Anything else that cannot be QUIC (first byte 5–63) is dropped here too.
        data.first().is_some_and(|b| *b < 64)
    }
}

/// The socket QUIC reads and writes.
pub struct Socket {
    udp: Box<dyn AsyncUdpSocket>,
    routes: Arc<Routes>,
    links: Arc<Links>,
    incoming: mpsc::Receiver<Incoming>,
    /// Alternates which source is read first, so a busy one cannot starve the other.
    links_first: bool,
    /// The rest of a link's run that did not fit QUIC's buffer, delivered next.
    pending: Option<Incoming>,
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket").finish_non_exhaustive()
    }
}

impl Socket {
    /// QUIC's socket over `udp`, with the links of `links` (whose datagrams arrive on
    /// `incoming`) and non-QUIC datagrams going to `routes`.
    pub fn new(
        udp: Box<dyn AsyncUdpSocket>,
        routes: Arc<Routes>,
        links: Arc<Links>,
        incoming: mpsc::Receiver<Incoming>,
    ) -> Socket {
        Socket {
            udp,
            routes,
            links,
            incoming,
            links_first: false,
            pending: None,
        }
    }

    fn poll_udp(
        &mut self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = match self.udp.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let mut kept = 0;
            for i in 0..n {
                let m = meta[i];
                let stride = m.stride.max(1);
                // A dual-stack socket reads IPv4 senders as v4-mapped: one form for all.
                let from = canonical(m.addr);
                // A receive may coalesce several datagrams of one source (GRO): look at
                // each, keep the QUIC ones packed at the front of the buffer.
                let buf = &mut bufs[i][..m.len];
                let mut write = 0;
                let mut read = 0;
                while read < m.len {
                    let end = (read + stride).min(m.len);
                    if !self.routes.divert(from, &buf[read..end]) {
                        buf.copy_within(read..end, write);
                        write += end - read;
                    }
                    read = end;
                }
                if write == 0 {
                    continue;
                }
                meta[i].len = write;
                meta[i].addr = for_quic(from);
                if kept != i {
                    bufs.swap(kept, i);
                    meta.swap(kept, i);
                }
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Everything was for us, not QUIC: read again (registers the waker if empty).
        }
    }

    fn poll_links(
        &mut self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let got = if let Some(p) = self.pending.take() {
                p
            } else if n == 0 {
                match self.incoming.poll_recv(cx) {
                    Poll::Ready(Some(d)) => d,
                    // The table lives as long as the socket: never closed while we run.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            } else {
                match self.incoming.try_recv() {
                    Ok(d) => d,
                    Err(_) => break,
                }
            };
            let (from, mut datagrams) = got;
            // As many as fit QUIC's buffer now (a socket without GRO has one-datagram
            // buffers), the rest next time.
            let Some((len, stride)) = datagrams.take_into(&mut bufs[n]) else {
                continue;
            };
            if !datagrams.is_empty() {
                self.pending = Some((from, datagrams));
            }
            let mut m = RecvMeta::default();
            m.addr = from;
            m.len = len;
            m.stride = stride;
            meta[n] = m;
            n += 1;
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncUdpSocket for Socket {
    fn create_sender(&self) -> Pin<Box<dyn UdpSender>> {
        Box::pin(Sender {
            udp: self.udp.create_sender(),
            links: self.links.clone(),
        })
    }

    fn poll_recv(
        &mut self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.links_first = !self.links_first;
        if self.links_first {
            if let Poll::Ready(r) = self.poll_links(cx, bufs, meta) {
                return Poll::Ready(r);
            }
            self.poll_udp(cx, bufs, meta)
        } else {
            if let Poll::Ready(r) = self.poll_udp(cx, bufs, meta) {
                return Poll::Ready(r);
            }
            self.poll_links(cx, bufs, meta)
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        // IPv6 mode, so made-up addresses are valid remotes; the port is the real one.
        let real = self.udp.local_addr()?;
        Ok(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), real.port()))
    }

    fn max_receive_segments(&self) -> NonZeroUsize {
        self.udp.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }
}

/// Sends each transmit on its link, or on the UDP socket.
struct Sender {
    udp: Pin<Box<dyn UdpSender>>,
    links: Arc<Links>,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl UdpSender for Sender {
    fn poll_send(
        mut self: Pin<&mut Self>,
        transmit: &Transmit<'_>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if is_mapped(&transmit.destination) {
            let stride = transmit.segment_size.unwrap_or(transmit.contents.len());
            // The run stays whole: a UDP link sends it as one GSO batch. A link that is
            // gone loses it: QUIC notices the path is dead.
            self.links
                .send(&transmit.destination, transmit.contents, stride);
            return Poll::Ready(Ok(()));
        }
        let t = Transmit {
            destination: canonical(transmit.destination),
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip.map(|ip| ip.to_canonical()),
        };
        self.udp.as_mut().poll_send(&t, cx)
    }

    fn max_transmit_segments(&self) -> NonZeroUsize {
        self.udp.max_transmit_segments()
    }
}
