//! The peer's one TCP port P. The signaling connection leaves from it, so the rendezvous
//! sees P's NAT mapping; the peer listens on it; and TCP punching connects from it. All of
//! these sockets set SO_REUSEADDR and SO_REUSEPORT before binding, which is what lets a
//! listener and several connections share P. Connections accepted on P are routed by the
//! session id in their first punch probe to that session's punch.
//!
//! Anyone can connect to P, so what a stranger can hold there is bounded: a connection is
//! kept only from an IP some punch under way expects (the other side's candidates), at
//! most [`MAX_UNIDENTIFIED_PER_IP`] per IP and [`MAX_UNIDENTIFIED`] in all until each sends
//! its first probe. A filler elsewhere on the internet takes no slot at all.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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

/// Of those, from one IP: a peer's NAT needs a few (one per predicted port it tries), an
/// attacker at a candidate's IP gets no more.
pub const MAX_UNIDENTIFIED_PER_IP: usize = 4;

/// Accepted connections waiting for their session's punch to take them.
const ROUTE_QUEUE: usize = 16;

/// Each session punching now: where its connections go, and the IPs it expects them from.
type Routes = Arc<Mutex<HashMap<[u8; 16], (mpsc::Sender<Accepted>, Vec<IpAddr>)>>>;

/// The TCP port P and its acceptor; dropping it stops listening.
#[derive(Debug)]
pub struct TcpPort {
    port: u16,
    /// Its sockets are dual-stack IPv6 ones (IPv4 peers as v4-mapped addresses).
    v6: bool,
    routes: Routes,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for TcpPort {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// A socket ready to bind to P: dual-stack where the host has IPv6 (`v6`), else IPv4.
fn reusable(v6: bool) -> io::Result<TcpSocket> {
    let s = if v6 {
        let s = TcpSocket::new_v6()?;
        socket2::SockRef::from(&s).set_only_v6(false)?;
        s
    } else {
        TcpSocket::new_v4()?
    };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    Ok(s)
}

/// Every address of the family `v6` says, on `port`.
fn any(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
    }
}

impl TcpPort {
    /// Listens on a fresh port of every local IPv4 address.
    pub fn bind() -> io::Result<TcpPort> {
        TcpPort::bind_for(false)
    }

    /// Listens on a fresh port of every local address of the family the rendezvous is
    /// reached in: with `v6`, a dual-stack socket (IPv4 peers too), else IPv4 only, the
    /// port an IPv4 deployment always had. TCP candidates are of one family (the one the
    /// rendezvous observed the port in), so a second family would serve nothing yet.
    pub fn bind_for(v6: bool) -> io::Result<TcpPort> {
        let s = reusable(v6)?;
        s.bind(any(v6, 0))?;
        let listener = s.listen(128)?;
        let port = listener.local_addr()?.port();
        let routes: Routes = Arc::default();
        let acceptor = tokio::spawn(accept_loop(listener, routes.clone()));
        Ok(TcpPort {
            port,
            v6,
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
        let s = reusable(self.v6)?;
        s.bind(any(self.v6, self.port))?;
        // A dual-stack socket reaches IPv4 at the v4-mapped address.
        let to = match to {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port())
            }
            other => other,
        };
        if to.is_ipv6() && !self.v6 {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("{to}: this host has no IPv6"),
            ));
        }
        s.connect(to).await
    }

    /// Routes connections accepted for `session` from the IPs in `expect` to the returned
    /// receiver, until it is dropped.
    pub fn route(&self, session: [u8; 16], expect: Vec<IpAddr>) -> Route {
        let (tx, rx) = mpsc::channel(ROUTE_QUEUE);
        lock(&self.routes).insert(session, (tx, expect));
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

/// Connections per IP that have not sent their first probe.
type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Holds one of `ip`'s unidentified slots until dropped.
struct IpSlot {
    per_ip: PerIp,
    ip: IpAddr,
}

impl IpSlot {
    fn take(per_ip: &PerIp, ip: IpAddr) -> Option<IpSlot> {
        let mut m = lock(per_ip);
        let n = m.entry(ip).or_default();
        if *n >= MAX_UNIDENTIFIED_PER_IP {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            per_ip: per_ip.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = lock(&self.per_ip);
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, routes: Routes) {
    let unidentified = Arc::new(Semaphore::new(MAX_UNIDENTIFIED));
    let per_ip = PerIp::default();
    loop {
        let (mut stream, from) = match listener.accept().await {
            Ok((s, from)) => (s, wire::dual::canonical(from)),
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                debug!(error = %e, "tcp port accept");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let expected = lock(&routes)
            .values()
            .any(|(_, ips)| ips.contains(&from.ip()));
        if !expected {
            debug!(%from, "no punch expects a connection from there; closed");
            continue;
        }
        let Some(ip_slot) = IpSlot::take(&per_ip, from.ip()) else {
            debug!(%from, "too many unidentified connections from one address; closed");
            continue;
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
            drop((permit, ip_slot));
            let Some(session) = probe::session_of(&first) else {
                return debug!(%from, "not a punch probe on the tcp port; closed");
            };
            let tx = lock(&routes)
                .get(&session)
                .filter(|(_, ips)| ips.contains(&from.ip()))
                .map(|(tx, _)| tx.clone());
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
        let mut route = port.route([1; 16], vec![IpAddr::from([127, 0, 0, 1])]);
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
        assert_eq!(from, wire::dual::canonical(c.local_addr().unwrap()));
        assert_eq!(first, probe);
        drop(route);
        assert!(lock(&port.routes).is_empty());
    }

    /// Connects from `ip` (a loopback address) to `to`.
    async fn connect_from(ip: [u8; 4], to: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((ip, 0))).unwrap();
        s.connect(to).await.unwrap()
    }

    /// Whether the port closed `s` (it reads end of stream or a reset).
    async fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        let bound = std::time::Duration::from_secs(10);
        matches!(
            tokio::time::timeout(bound, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn a_filler_cannot_take_the_slots_a_punch_needs() {
        let port = TcpPort::bind().unwrap();
        let to = SocketAddr::from(([127, 0, 0, 1], port.port()));
        // The punch expects the peer at 127.0.0.1 and a candidate at 127.0.0.3.
        let expect = vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 3])];
        let mut route = port.route([1; 16], expect);
        // A filler elsewhere opens 100 silent connections, and one at a candidate's IP
        // ten, all before the real peer's connection arrives.
        let mut elsewhere = Vec::new();
        for _ in 0..100 {
            elsewhere.push(connect_from([127, 0, 0, 2], to).await);
        }
        let mut near = Vec::new();
        for _ in 0..10 {
            near.push(connect_from([127, 0, 0, 3], to).await);
        }
        // The real peer's connection still gets through to the punch (were the filler's
        // connections held, every slot would be taken and it would be closed).
        let probe = ProbeKey::new([1; 16], [2; 32]).encode(&Probe {
            kind: Kind::Request,
            from: Side::Initiator,
            transaction: 1,
            observed: None,
        });
        let mut c = connect_from([127, 0, 0, 1], to).await;
        c.write_all(&probe).await.unwrap();
        let bound = std::time::Duration::from_secs(10);
        let (_, from, _) = tokio::time::timeout(bound, route.rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, wire::dual::canonical(c.local_addr().unwrap()));
        // The stranger's are closed; the near filler keeps its share and no more, until
        // its first-probe time runs out.
        for s in &mut elsewhere {
            assert!(closed(s).await, "a stranger's connection was kept");
        }
        for s in near.iter_mut().skip(MAX_UNIDENTIFIED_PER_IP) {
            assert!(closed(s).await, "more than its share was kept");
        }
        for s in &near[..MAX_UNIDENTIFIED_PER_IP] {
            let kept = matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            assert!(kept, "a connection within the share was closed early");
        }
        drop(near);
    }
}
