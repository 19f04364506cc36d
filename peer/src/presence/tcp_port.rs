//! The peer's one TCP port P. The signaling connection leaves from it, so the rendezvous
//! sees P's NAT mapping; the peer listens on it; and TCP punching connects from it. All of
//! these sockets set SO_REUSEADDR and SO_REUSEPORT before binding, which is what lets a
//! listener and several connections share P. Connections accepted on P are routed by the
//! session id in their first punch probe to that session's punch.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tracing::debug;

use crate::defaults::{ACCEPT_PAUSE, FIRST_PROBE_WITHIN};
use crate::punch::probe;

/// An accepted connection with its first message (the other side's first probe).
pub type Accepted = (TcpStream, SocketAddr, [u8; probe::LEN]);

/// Accepted connections that have not sent their first probe yet, at most: strangers can
/// connect to P, so what they can hold is bounded.
const MAX_UNIDENTIFIED: usize = 32;

/// Accepted connections waiting for their session's punch to take them.
const ROUTE_QUEUE: usize = 16;

type Routes = Arc<Mutex<HashMap<[u8; 16], mpsc::Sender<Accepted>>>>;

/// The TCP port P and its acceptor; dropping it stops listening.
#[derive(Debug)]
pub struct TcpPort {
    port: u16,
    routes: Routes,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for TcpPort {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// A socket ready to bind to P.
fn reusable() -> io::Result<TcpSocket> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    Ok(s)
}

impl TcpPort {
    /// Listens on a fresh port of every local IPv4 address.
    pub fn bind() -> io::Result<TcpPort> {
        let s = reusable()?;
        s.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
        let listener = s.listen(128)?;
        let port = listener.local_addr()?.port();
        let routes: Routes = Arc::default();
        let acceptor = tokio::spawn(accept_loop(listener, routes.clone()));
        Ok(TcpPort {
            port,
            routes,
            acceptor,
        })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connects from P to `to`.
    pub async fn connect(&self, to: SocketAddr) -> io::Result<TcpStream> {
        let s = reusable()?;
        s.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.port)))?;
        s.connect(to).await
    }

    /// Routes connections accepted for `session` to the returned receiver, until it is
    /// dropped.
    pub fn route(&self, session: [u8; 16]) -> Route {
        let (tx, rx) = mpsc::channel(ROUTE_QUEUE);
        lock(&self.routes).insert(session, tx);
        Route {
            rx,
            session,
            routes: self.routes.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One session's accepted connections.
#[derive(Debug)]
pub struct Route {
    /// Accepted connections with their first probe.
    pub rx: mpsc::Receiver<Accepted>,
    session: [u8; 16],
    routes: Routes,
}

impl Drop for Route {
    fn drop(&mut self) {
        lock(&self.routes).remove(&self.session);
    }
}

async fn accept_loop(listener: TcpListener, routes: Routes) {
    let unidentified = Arc::new(Semaphore::new(MAX_UNIDENTIFIED));
    loop {
        let (mut stream, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                debug!(error = %e, "tcp port accept");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = unidentified.clone().try_acquire_owned() else {
            debug!(%from, "too many unidentified connections on the tcp port; closed");
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let mut first = [0u8; probe::LEN];
            let read = tokio::time::timeout(FIRST_PROBE_WITHIN, stream.read_exact(&mut first));
            if !matches!(read.await, Ok(Ok(_))) {
                return debug!(%from, "no probe on an accepted connection; closed");
            }
            drop(permit);
            let Some(session) = probe::session_of(&first) else {
                return debug!(%from, "not a punch probe on the tcp port; closed");
            };
            let tx = lock(&routes).get(&session).cloned();
            match tx {
                Some(tx) => {
                    let _ = tx.try_send((stream, from, first));
                }
                None => debug!(%from, "a probe for no current session; closed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::punch::probe::{Kind, Probe, ProbeKey};
    use tokio::io::AsyncWriteExt as _;
    use wire::ticket::Side;

    #[tokio::test]
    async fn accepted_connections_reach_their_session_and_strangers_are_closed() {
        let port = TcpPort::bind().unwrap();
        let mut route = port.route([1; 16]);
        let to = SocketAddr::from(([127, 0, 0, 1], port.port()));
        let probe = ProbeKey::new([1; 16], [2; 32]).encode(&Probe {
            kind: Kind::Request,
            from: Side::Initiator,
            transaction: 1,
            observed: None,
        });
        // A stranger and another session's probe first: both closed, nothing routed.
        let mut junk = TcpStream::connect(to).await.unwrap();
        junk.write_all(&[0u8; probe::LEN]).await.unwrap();
        let other = ProbeKey::new([3; 16], [2; 32]).encode(&Probe {
            kind: Kind::Request,
            from: Side::Initiator,
            transaction: 1,
            observed: None,
        });
        let mut elsewhere = TcpStream::connect(to).await.unwrap();
        elsewhere.write_all(&other).await.unwrap();
        let mut buf = [0u8; 1];
        let bound = std::time::Duration::from_secs(10);
        for s in [&mut junk, &mut elsewhere] {
            let r = tokio::time::timeout(bound, s.read(&mut buf)).await.unwrap();
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        }
        // Ours, from another peer's P as punching does (SO_REUSEPORT beside its listener).
        let other_peer = TcpPort::bind().unwrap();
        let mut c = other_peer.connect(to).await.unwrap();
        assert_eq!(c.local_addr().unwrap().port(), other_peer.port());
        c.write_all(&probe).await.unwrap();
        let (_, from, first) = tokio::time::timeout(bound, route.rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, c.local_addr().unwrap());
        assert_eq!(first, probe);
        drop(route);
        assert!(lock(&port.routes).is_empty());
    }
}
