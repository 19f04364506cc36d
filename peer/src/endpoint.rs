//! The peer's UDP endpoint: the one socket whose NAT mapping the rendezvous observed,
//! shared by STUN refreshes, punch probes of every session and every direct QUIC tunnel.
//! quinn reads the socket; datagrams that are not QUIC are taken out before it sees them
//! and routed by their first byte (RFC 9443): STUN (0–3) to the refresher, punch probes
//! (4, see [`probe`]) to the punch of their session.
//!
//! [`probe`]: crate::probe

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use tokio::sync::mpsc;

use crate::probe;

/// Datagrams queued per route before new ones are dropped (UDP semantics: a slow reader
/// loses packets, memory stays bounded).
const ROUTE_QUEUE: usize = 1024;

/// A datagram taken out of the QUIC stream: where it came from and its bytes.
pub type Datagram = (SocketAddr, Vec<u8>);

#[derive(Debug, Default)]
struct Routes {
    punches: Mutex<HashMap<[u8; 16], mpsc::Sender<Datagram>>>,
    stun: Mutex<Option<mpsc::Sender<Datagram>>>,
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

/// quinn's socket with the non-QUIC datagrams taken out.
struct Demux {
    inner: Arc<dyn AsyncUdpSocket>,
    routes: Arc<Routes>,
}

impl fmt::Debug for Demux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Demux").finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for Demux {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let mut kept = 0;
            for i in 0..n {
                let m = meta[i];
                let stride = m.stride.max(1);
                // A receive may coalesce several datagrams of one source (GRO): look at
                // each, keep the QUIC ones packed at the front of the buffer.
                let buf = &mut bufs[i][..m.len];
                let mut write = 0;
                let mut read = 0;
                while read < m.len {
                    let end = (read + stride).min(m.len);
                    if !self.routes.divert(m.addr, &buf[read..end]) {
                        buf.copy_within(read..end, write);
                        write += end - read;
                    }
                    read = end;
                }
                if write == 0 {
                    continue;
                }
                meta[i].len = write;
                if kept != i {
                    bufs.swap(kept, i);
                    meta.swap(kept, i);
                }
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Everything was for us, not quinn: read again (registers the waker if empty).
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The shared endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UdpEndpoint {
    quic: quinn::Endpoint,
    sender: Arc<tokio::net::UdpSocket>,
    routes: Arc<Routes>,
}

/// Punch probes of one session; the route is removed when this is dropped.
#[derive(Debug)]
pub struct PunchRoute {
    /// The probes, with their sources.
    pub rx: mpsc::Receiver<Datagram>,
    session: [u8; 16],
    routes: Arc<Routes>,
}

impl Drop for PunchRoute {
    fn drop(&mut self) {
        self.routes
            .punches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.session);
    }
}

impl UdpEndpoint {
    /// Makes `socket` the endpoint (a QUIC client; [`UdpEndpoint::set_server`] makes it
    /// accept too). STUN datagrams arrive on the returned receiver.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<(UdpEndpoint, mpsc::Receiver<Datagram>)> {
        // A second handle on the same socket, for sending probes and STUN requests; all
        // reading stays with quinn's side.
        let send = socket.try_clone()?;
        send.set_nonblocking(true)?;
        let sender = Arc::new(tokio::net::UdpSocket::from_std(send)?);
        let runtime = Arc::new(quinn::TokioRuntime);
        let inner = runtime.wrap_udp_socket(socket)?;
        let routes = Arc::new(Routes::default());
        let (stun_tx, stun_rx) = mpsc::channel(ROUTE_QUEUE);
        *routes.stun.lock().unwrap_or_else(|e| e.into_inner()) = Some(stun_tx);
        let demux = Arc::new(Demux {
            inner,
            routes: routes.clone(),
        });
        let quic = quinn::Endpoint::new_with_abstract_socket(
            crate::quic::endpoint_config(),
            None,
            demux,
            runtime,
        )?;
        Ok((
            UdpEndpoint {
                quic,
                sender,
                routes,
            },
            stun_rx,
        ))
    }

    /// Routes session `session`'s probes to the returned receiver.
    pub fn punch_route(&self, session: [u8; 16]) -> PunchRoute {
        let (tx, rx) = mpsc::channel(ROUTE_QUEUE);
        self.routes
            .punches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session, tx);
        PunchRoute {
            rx,
            session,
            routes: self.routes.clone(),
        }
    }

    /// Sends a datagram from the endpoint's socket (a probe or a STUN request).
    pub async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.sender.send_to(data, to).await
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sender.local_addr()
    }

    /// The QUIC endpoint on the socket.
    pub fn quic(&self) -> &quinn::Endpoint {
        &self.quic
    }

    /// Lets the endpoint accept QUIC connections with `config` (the reaching side, which
    /// has exactly one peer).
    pub fn set_server(&self, config: quinn::ServerConfig) {
        self.quic.set_server_config(Some(config));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Kind, Probe, ProbeKey};
    use relay::ticket::Side;

    #[tokio::test]
    async fn probes_stun_and_quic_share_one_socket() {
        let a_sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b_sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b_addr = b_sock.local_addr().unwrap();
        let (a, _a_stun) = UdpEndpoint::new(a_sock).unwrap();
        let (b, mut b_stun) = UdpEndpoint::new(b_sock).unwrap();

        // A probe of session 1 reaches session 1's route, not session 2's.
        let mut one = b.punch_route([1; 16]);
        let mut two = b.punch_route([2; 16]);
        let key = ProbeKey::new([1; 16], [9; 32]);
        let p = key.encode(&Probe {
            kind: Kind::Request,
            from: Side::Initiator,
            transaction: 5,
            observed: None,
        });
        a.send_to(&p, b_addr).await.unwrap();
        let (from, data) = one.rx.recv().await.unwrap();
        assert_eq!(from, a.local_addr().unwrap());
        assert_eq!(key.decode(&data).unwrap().transaction, 5);
        assert!(two.rx.try_recv().is_err());

        // A STUN message goes to the STUN route.
        let req = rendezvous::stun::binding_request(None, None).unwrap();
        a.send_to(&req.bytes, b_addr).await.unwrap();
        let (_, data) = b_stun.recv().await.unwrap();
        assert_eq!(data, req.bytes);

        // QUIC on the same sockets.
        let (pc, phone) = (
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
        );
        let public = |k: &ed25519_dalek::SigningKey| {
            rendezvous::proto::PublicKey(k.verifying_key().to_bytes())
        };
        b.set_server(crate::quic::server_config(&phone, public(&pc)).unwrap());
        let server = tokio::spawn({
            let b = b.clone();
            async move {
                let conn = b.quic().accept().await.unwrap().await.unwrap();
                let (mut s, mut r) = conn.accept_bi().await.unwrap();
                let got = r.read_to_end(1024).await.unwrap();
                s.write_all(&got).await.unwrap();
                s.finish().unwrap();
                conn.closed().await;
            }
        });
        let client = crate::quic::client_config(&pc, public(&phone)).unwrap();
        let conn = a
            .quic()
            .connect_with(client, b_addr, crate::tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(b"through quic").await.unwrap();
        s.finish().unwrap();
        assert_eq!(r.read_to_end(1024).await.unwrap(), b"through quic");
        // Probes still flow beside the connection.
        a.send_to(&p, b_addr).await.unwrap();
        assert!(one.rx.recv().await.is_some());
        drop(one);
        assert!(
            b.routes.punches.lock().unwrap().len() == 1,
            "dropped route removed"
        );
        conn.close(0u32.into(), b"done");
        server.await.unwrap();
    }
}
