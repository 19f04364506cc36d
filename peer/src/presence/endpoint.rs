//! The peer's UDP endpoint: the one socket whose NAT mapping the rendezvous observed,
//! shared by STUN refreshes, punch probes of every session and the QUIC endpoint all
//! sessions run on. Its QUIC socket ([`path::socket`]) also carries every link (relay,
//! punched TCP, birthday socket) as a path of its own.
//!
//! [`path::socket`]: crate::path::socket

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::path::link::Links;
use crate::path::socket::{ROUTE_QUEUE, Routes, Socket};

pub use crate::path::socket::Datagram;

/// The shared endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UdpEndpoint {
    quic: noq::Endpoint,
    sender: Arc<tokio::net::UdpSocket>,
    routes: Arc<Routes>,
    links: Arc<Links>,
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
        // reading stays with QUIC's side.
        wire::sockbuf::grow_udp_buffers(&socket);
        let send = socket.try_clone()?;
        send.set_nonblocking(true)?;
        let sender = Arc::new(tokio::net::UdpSocket::from_std(send)?);
        let runtime = Arc::new(noq::TokioRuntime);
        let udp = noq::Runtime::wrap_udp_socket(&*runtime, socket)?;
        let routes = Arc::new(Routes::default());
        let (stun_tx, stun_rx) = mpsc::channel(ROUTE_QUEUE);
        *routes.stun.lock().unwrap_or_else(|e| e.into_inner()) = Some(stun_tx);
        let (links, incoming) = Links::new();
        let socket = Socket::new(udp, routes.clone(), links.clone(), incoming);
        let quic = noq::Endpoint::new_with_abstract_socket(
            crate::quic::endpoint_config(),
            None,
            Box::new(socket),
            runtime,
        )?;
        Ok((
            UdpEndpoint {
                quic,
                sender,
                routes,
                links,
            },
            stun_rx,
        ))
    }

    /// STUN answers from now on go to the returned receiver (a new registration's
    /// refresher takes them over from the last one's).
    pub fn stun_route(&self) -> mpsc::Receiver<Datagram> {
        let (tx, rx) = mpsc::channel(ROUTE_QUEUE);
        *self.routes.stun.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
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
    pub fn quic(&self) -> &noq::Endpoint {
        &self.quic
    }

    /// The links (relay, punched TCP, birthday sockets) the QUIC socket sends to beside
    /// the UDP socket.
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    /// Lets the endpoint accept QUIC connections with `config` (the reaching side, which
    /// has exactly one peer).
    pub fn set_server(&self, config: noq::ServerConfig) {
        self.quic.set_server_config(Some(config));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::punch::probe::{Kind, Probe, ProbeKey};
    use wire::ticket::Side;

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
        let req = wire::stun::binding_request(None, None).unwrap();
        a.send_to(&req.bytes, b_addr).await.unwrap();
        let (_, data) = b_stun.recv().await.unwrap();
        assert_eq!(data, req.bytes);

        // QUIC on the same sockets.
        let (pc, phone) = (
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
        );
        let public =
            |k: &ed25519_dalek::SigningKey| wire::signal::PublicKey(k.verifying_key().to_bytes());
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
            .connect_with(
                client,
                crate::path::for_quic(b_addr),
                wire::tls::SERVER_NAME,
            )
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
