//! UDP services over the session: every datagram of a local flow travels as one QUIC
//! datagram (unreliable and unordered, as UDP itself), on whichever path carries the
//! session, tagged with a 4-byte flow id the reaching side assigns per local source
//! address. A datagram larger than the path
//! can carry as a QUIC datagram goes on a one-off unidirectional stream instead, so
//! nothing a UDP service sends is refused. On the exposing side each flow id gets its own
//! socket connected to the service; flows silent for [`FLOW_IDLE`] are closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tracing::debug;

use crate::defaults::FLOW_IDLE;

/// Largest datagram a uni stream fallback reads (IPv4's UDP payload limit and the id).
const MAX_FALLBACK: usize = 65_535 + 4;

fn tagged(id: u32, d: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(4 + d.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(d);
    v.into()
}

/// A flow datagram's id and payload (`None` when it is too short to carry an id).
pub fn untag(d: &[u8]) -> Option<(u32, &[u8])> {
    let id = u32::from_be_bytes(d.get(..4)?.try_into().ok()?);
    Some((id, &d[4..]))
}

/// Sends one flow datagram: as a QUIC datagram when it fits, else on a uni stream.
pub async fn send(conn: &noq::Connection, id: u32, d: &[u8]) {
    let t = tagged(id, d);
    if conn.max_datagram_size().is_some_and(|max| t.len() <= max) {
        if let Err(e) = conn.send_datagram(t) {
            debug!(error = %e, "direct udp datagram not sent");
        }
        return;
    }
    if let Ok(mut s) = conn.open_uni().await {
        let _ = s.write_all(&t).await;
        let _ = s.finish();
    }
}

/// Every flow datagram the other side sends, from QUIC datagrams and uni streams, until
/// the connection ends.
pub async fn receive(conn: noq::Connection, mut deliver: impl FnMut(u32, &[u8])) {
    loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(d) => if let Some((id, p)) = untag(&d) { deliver(id, p) },
                Err(_) => return,
            },
            s = conn.accept_uni() => match s {
                Ok(mut s) => if let Ok(d) = s.read_to_end(MAX_FALLBACK).await {
                    if let Some((id, p)) = untag(&d) { deliver(id, p) }
                },
                Err(_) => return,
            },
        }
    }
}

/// Reaching side: flow ids for local sources, and the way back.
#[derive(Debug, Default)]
pub struct Flows {
    ids: std::sync::Mutex<HashMap<SocketAddr, u32>>,
    sources: std::sync::Mutex<HashMap<u32, SocketAddr>>,
}

impl Flows {
    /// The id of `from`'s flow, made on first use.
    pub fn id(&self, from: SocketAddr) -> u32 {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let next = ids.len() as u32;
        let id = *ids.entry(from).or_insert(next);
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, from);
        id
    }

    /// The local source of flow `id`.
    pub fn source(&self, id: u32) -> Option<SocketAddr> {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
    }
}

/// Reaching side: answers arriving on `conn` go back to their flow's local source.
pub fn deliver_back(conn: noq::Connection, sock: Arc<UdpSocket>, flows: Arc<Flows>) {
    tokio::spawn(async move {
        receive(conn, |id, d| {
            if let Some(to) = flows.source(id) {
                // try_send: the local socket is ours and loopback, a full buffer means
                // the application is not reading; UDP drops then.
                let _ = sock.try_send_to(d, to);
            }
        })
        .await;
    });
}

/// Exposing side: serves the flows arriving on `conn` from `target` until it ends.
pub async fn serve(conn: noq::Connection, target: String) {
    let flows: Arc<Mutex<HashMap<u32, Arc<UdpSocket>>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u32, Vec<u8>)>(1024);
    let recv = receive(conn.clone(), move |id, d| {
        let _ = tx.try_send((id, d.to_vec()));
    });
    tokio::pin!(recv);
    loop {
        let (id, d) = tokio::select! {
            _ = &mut recv => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        let sock = {
            let mut map = flows.lock().await;
            match map.get(&id) {
                Some(s) => s.clone(),
                None => {
                    let bind = if target.starts_with('[') {
                        "[::]:0"
                    } else {
                        "0.0.0.0:0"
                    };
                    let Ok(s) = UdpSocket::bind(bind).await else {
                        continue;
                    };
                    if s.connect(&target).await.is_err() {
                        continue;
                    }
                    let s = Arc::new(s);
                    map.insert(id, s.clone());
                    // Replies from the service go back tagged with the flow id.
                    let (s2, conn2, flows2) = (s.clone(), conn.clone(), flows.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_535];
                        loop {
                            match tokio::time::timeout(FLOW_IDLE, s2.recv(&mut buf)).await {
                                Ok(Ok(n)) => send(&conn2, id, &buf[..n]).await,
                                Ok(Err(_)) => continue,
                                Err(_) => break,
                            }
                        }
                        flows2.lock().await.remove(&id);
                        debug!(id, "direct udp flow idle, closed");
                    });
                    s
                }
            }
        };
        let _ = sock.send(&d).await;
    }
}

/// Reaching side: serves UDP on `local`, every source address a flow of the session
/// `session` gives (asked for each datagram, so a new session after the old one ended is
/// picked up). Runs until `local`'s socket fails.
pub async fn reach_udp<F, Fut>(local: UdpSocket, session: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<noq::Connection>>,
{
    let sock = Arc::new(local);
    let flows = Arc::new(Flows::default());
    let mut delivering: Option<usize> = None;
    let mut buf = vec![0u8; MAX_FALLBACK];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let Some(conn) = session().await else {
            continue;
        };
        if delivering != Some(conn.stable_id()) {
            delivering = Some(conn.stable_id());
            deliver_back(conn.clone(), sock.clone(), flows.clone());
        }
        send(&conn, flows.id(from), &buf[..n]).await;
    }
}
