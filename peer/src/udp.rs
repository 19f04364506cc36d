//! UDP services through a tunnel. Each local UDP flow (one source address on the reaching
//! side) is carried as its own tunnel stream; inside it every datagram travels as a 2-byte
//! big-endian length and its bytes, so datagram boundaries survive the byte stream. On the
//! exposing side each flow gets its own socket connected to the service, so replies find
//! their way back to the right flow. Flows silent for [`FLOW_IDLE`] are closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, mpsc};
use tokio::time::timeout;
use tracing::debug;

use crate::tunnel::TunnelStream;

/// A flow with no datagram either way for this long is closed (UDP has no end marker;
/// most UDP services, DNS or game traffic, are done or re-sending well within a minute).
pub const FLOW_IDLE: Duration = Duration::from_secs(60);

/// Largest datagram carried (IPv4's UDP payload limit, 65,507, fits the 2-byte length).
const MAX_DATAGRAM: usize = 65_535;

async fn write_datagram(w: &mut WriteHalf<TunnelStream>, d: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(d.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut frame = Vec::with_capacity(2 + d.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(d);
    w.write_all(&frame).await
}

/// The next datagram from a flow stream; `None` at its end.
async fn read_datagram(r: &mut ReadHalf<TunnelStream>, buf: &mut Vec<u8>) -> Option<()> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await.ok()?;
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    r.read_exact(buf).await.ok()?;
    Some(())
}

/// Exposing side: carries one flow stream to `target` and back until either ends or the
/// flow goes idle.
pub async fn serve_flow(stream: TunnelStream, target: &str) -> std::io::Result<()> {
    let sock = UdpSocket::bind(if target.starts_with('[') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })
    .await?;
    sock.connect(target).await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let mut up = Vec::new();
    let mut down = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            got = timeout(FLOW_IDLE, read_datagram(&mut r, &mut up)) => match got {
                Ok(Some(())) => { let _ = sock.send(&up).await; }
                _ => break,
            },
            got = sock.recv(&mut down) => match got {
                Ok(n) => write_datagram(&mut w, &down[..n]).await?,
                // ICMP port unreachable from the service: keep the flow, UDP is lossy.
                Err(_) => continue,
            },
        }
    }
    let _ = w.shutdown().await;
    Ok(())
}

/// Reaching side: serves UDP on `local`, each source address as a flow through a stream
/// from `open`. Runs until `local`'s socket fails.
/// When `direct` yields a connection, datagrams take the direct path as QUIC datagrams
/// ([`crate::udp_direct`]) instead.
pub async fn reach_udp<F, Fut, D, DFut>(sock: UdpSocket, open: F, direct: D) -> std::io::Result<()>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<TunnelStream>> + Send,
    D: Fn() -> DFut,
    DFut: std::future::Future<Output = Option<quinn::Connection>>,
{
    let sock = Arc::new(sock);
    let flows: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>> = Arc::default();
    let direct_flows = Arc::new(crate::udp_direct::Flows::default());
    let mut delivering: Option<usize> = None;
    let open = Arc::new(open);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        if let Some(conn) = direct().await {
            if delivering != Some(conn.stable_id()) {
                delivering = Some(conn.stable_id());
                crate::udp_direct::deliver_back(conn.clone(), sock.clone(), direct_flows.clone());
            }
            crate::udp_direct::send(&conn, direct_flows.id(from), &buf[..n]).await;
            continue;
        }
        let datagram = buf[..n].to_vec();
        let mut map = flows.lock().await;
        if let Some(tx) = map.get(&from)
            && tx.try_send(datagram.clone()).is_ok()
        {
            continue;
        }
        // A new flow (or one whose task ended): open a stream for it.
        let (tx, rx) = mpsc::channel::<Vec<u8>>(256);
        let _ = tx.try_send(datagram);
        map.insert(from, tx);
        drop(map);
        let (sock, flows, open) = (sock.clone(), flows.clone(), open.clone());
        tokio::spawn(async move {
            if let Some(stream) = open().await {
                flow(stream, rx, &sock, from).await;
            }
            flows.lock().await.remove(&from);
            debug!(%from, "udp flow closed");
        });
    }
}

async fn flow(
    stream: TunnelStream,
    mut rx: mpsc::Receiver<Vec<u8>>,
    sock: &UdpSocket,
    from: SocketAddr,
) {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut back = Vec::new();
    loop {
        tokio::select! {
            d = timeout(FLOW_IDLE, rx.recv()) => match d {
                Ok(Some(d)) => if write_datagram(&mut w, &d).await.is_err() { break },
                _ => break,
            },
            got = read_datagram(&mut r, &mut back) => match got {
                Some(()) => { let _ = sock.send_to(&back, from).await; }
                None => break,
            },
        }
    }
    let _ = w.shutdown().await;
}
