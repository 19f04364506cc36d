//! Published UDP ports: each client address is a flow with a relay session of its own to
//! the exposer (joined over UDP), made on its first datagram and dropped after
//! [`FLOW_IDLE`] of silence. Datagrams cross the relay prefixed with [`UDP_DATA`], so no
//! client datagram can pass for relay control. Flows count against the same limits as
//! TCP clients (per client IP, per name, in all), and a port holds at most
//! [`MAX_FLOWS_PER_PORT`]; datagrams that come while a flow is being set up wait in a
//! short queue, and those past it are dropped, as UDP allows.
//!
//! [`UDP_DATA`]: wire::signal::public::UDP_DATA

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use wire::signal::EntryKind;
use wire::signal::public::UDP_DATA;

use super::entry::{Admitted, NameSlot};
use crate::metrics::{self, PublicRefusal};
use crate::server::Shared;

/// A flow silent this long is dropped.
pub const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Flows one public UDP port carries at once.
pub const MAX_FLOWS_PER_PORT: usize = 256;
/// Datagrams queued per flow (also while it is set up).
const QUEUE: usize = 64;

/// Serves public UDP `port` on `sock` until `stop`.
pub(crate) async fn serve(
    sock: UdpSocket,
    shared: Arc<Shared>,
    port: u16,
    stop: CancellationToken,
) {
    let sock = Arc::new(sock);
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let (done_tx, mut done) = mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = tokio::select! {
            _ = stop.cancelled() => return,
            Some(gone) = done.recv() => {
                flows.remove(&gone);
                continue;
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => (n, wire::dual::canonical(from)),
                Err(e) => {
                    debug!(port, error = %e, "public udp receive failed");
                    continue;
                }
            },
        };
        let data = buf[..n].to_vec();
        if let Some(tx) = flows.get(&client) {
            // Full: the flow is behind; UDP may drop.
            let _ = tx.try_send(data);
            continue;
        }
        if flows.len() >= MAX_FLOWS_PER_PORT {
            shared.metrics.public_refused(PublicRefusal::Busy);
            continue;
        }
        let Some(name) = shared.public_port_holder(port) else {
            shared.metrics.public_refused(PublicRefusal::NotFound);
            continue;
        };
        let Some(route) = shared.public_route(&name).filter(|r| r.publication.udp) else {
            shared.metrics.public_refused(PublicRefusal::NotFound);
            continue;
        };
        if !route.online {
            shared.metrics.public_refused(PublicRefusal::Offline);
            continue;
        }
        let (Some(admitted), Some(slot)) = (
            Admitted::new(&shared, client.ip()),
            NameSlot::new(&shared, &name),
        ) else {
            shared.metrics.public_refused(PublicRefusal::Busy);
            continue;
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let _ = tx.try_send(data);
        flows.insert(client, tx);
        let (shared, sock, stop, done) =
            (shared.clone(), sock.clone(), stop.clone(), done_tx.clone());
        let service = route.publication.service;
        tokio::spawn(async move {
            let _held = (admitted, slot);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = flow(&shared, &name, service, client, sock, rx) => {}
            }
            let _ = done.send(client);
        });
    }
}

/// Carries one client's datagrams until the flow falls silent.
async fn flow(
    shared: &Arc<Shared>,
    name: &str,
    service: wire::signal::ServiceRef,
    client: SocketAddr,
    public: Arc<UdpSocket>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let (relay, relay_addr) = match shared.open_public_udp(name, service, client).await {
        Ok(x) => x,
        Err(e) => {
            shared.metrics.public_refused(PublicRefusal::Failed);
            info!(peer = %name, %client, error = %e, "public udp client not carried");
            return;
        }
    };
    metrics::inc(&shared.metrics.public_connections[EntryKind::UdpPort as usize]);
    debug!(peer = %name, %client, "public udp flow carried to the exposer");
    let m = &shared.metrics;
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(2048);
    loop {
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { return };
                out.clear();
                out.push(UDP_DATA);
                out.extend_from_slice(&d);
                if relay.send_to(&out, relay_addr).await.is_ok() {
                    m.public_bytes_to_service.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            r = relay.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { return };
                // Only the relay's data datagrams; its control (a late Paired) is not data.
                if from != relay_addr || n == 0 || buf[0] != UDP_DATA {
                    continue;
                }
                if public.send_to(&buf[1..n], client).await.is_ok() {
                    m.public_bytes_to_client.fetch_add(n as u64 - 1, Ordering::Relaxed);
                }
            }
            _ = tokio::time::sleep(FLOW_IDLE) => return,
        }
    }
}
