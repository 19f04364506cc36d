//! Asking the gateway to map our UDP endpoint's port (PCP, then NAT-PMP, then UPnP IGD,
//! through the `portmapper` crate), renewing the mapping before it expires, telling the
//! rendezvous its address (a candidate reachable from anywhere, which makes even random
//! symmetric NATs punchable) and removing it when the registration ends.
//!
//! Off when the rendezvous is on loopback (no NAT lies between), or with
//! `--no-port-mapping`: then nothing is sent to the gateway at all.

use std::net::{SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};
use wire::signal::client::Reporter;

/// How long the gateway has to say which mapping protocols it speaks (UPnP's search
/// takes 1 s, PCP and NAT-PMP answer within 0.5 s).
const PROBE_WITHIN: Duration = Duration::from_secs(3);

/// The protocol `portmapper` will use, in its order of preference.
pub fn protocol(offered: &portmapper::ProbeOutput) -> Option<&'static str> {
    if offered.pcp {
        Some("PCP")
    } else if offered.nat_pmp {
        Some("NAT-PMP")
    } else if offered.upnp {
        Some("UPnP")
    } else {
        None
    }
}

/// How long a stop waits for the gateway to be told the mapping is gone.
const RELEASE_WITHIN: Duration = Duration::from_secs(2);

/// A port mapping being kept for one UDP endpoint, across registrations (it follows the
/// endpoint, which outlives them). Dropping the last handle removes the mapping in the
/// background; [`PortMap::release`] removes it and waits until the request is out.
#[derive(Debug)]
pub struct PortMap {
    port: NonZeroU16,
    client: std::sync::Mutex<Option<portmapper::Client>>,
    external: watch::Receiver<Option<SocketAddrV4>>,
    telling: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PortMap {
    /// Starts asking for a mapping of UDP `port`; every mapping granted, renewed to a new
    /// address, or lost is logged and told to the rendezvous through `reporter`.
    pub fn start(port: u16, reporter: Reporter) -> Option<Arc<PortMap>> {
        let port = NonZeroU16::new(port)?;
        let client = portmapper::Client::new(portmapper::Config::default());
        let map = Arc::new(PortMap {
            port,
            external: client.watch_external_address(),
            client: std::sync::Mutex::new(Some(client)),
            telling: std::sync::Mutex::new(None),
        });
        map.ask(reporter, false);
        Some(map)
    }

    /// After a move or a new registration: drops the old mapping (the gateway may be
    /// another one now), asks again, and tells the new registration's `reporter`.
    pub fn rebind(&self, reporter: Reporter) {
        self.ask(reporter, true);
    }

    /// Probes the gateway, asks for the mapping (again, when `again`), and tells
    /// `reporter` what it is and each change.
    fn ask(&self, reporter: Reporter, again: bool) {
        let Some(asking) = self.lock_client().clone() else {
            return;
        };
        let (port, mut changes) = (self.port, self.external.clone());
        let task = tokio::spawn(async move {
            if again {
                // In order: the old mapping is removed before the new one is asked for.
                asking.deactivate();
            }
            // Probe first: the mapping request then goes to a protocol the gateway speaks
            // (asked before the probe ends, it would try UPnP blindly and not retry).
            let offered = match tokio::time::timeout(PROBE_WITHIN, asking.probe()).await {
                Ok(Ok(Ok(o))) => o,
                _ => {
                    debug!("no answer from the gateway about port mapping");
                    return;
                }
            };
            let Some(protocol) = protocol(&offered) else {
                debug!("the gateway offers no port mapping (PCP, NAT-PMP, UPnP)");
                return;
            };
            asking.update_local_port(port);
            changes.borrow_and_update();
            while changes.changed().await.is_ok() {
                let now = *changes.borrow_and_update();
                match now {
                    Some(a) => {
                        info!(mapped = %a, local_port = port, "port mapped by the gateway ({protocol})")
                    }
                    None => info!(local_port = port, "port mapping gone"),
                }
                if let Err(e) = reporter.mapped(now.map(SocketAddr::V4)).await {
                    warn!(error = %e, "the rendezvous did not take the port mapping");
                }
            }
        });
        if let Some(old) = self
            .telling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    fn lock_client(&self) -> std::sync::MutexGuard<'_, Option<portmapper::Client>> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mapping's address now, if the gateway granted one.
    pub fn current(&self) -> Option<SocketAddr> {
        self.external.borrow().map(SocketAddr::V4)
    }

    /// Watches the mapping's address.
    pub fn watch(&self) -> watch::Receiver<Option<SocketAddrV4>> {
        self.external.clone()
    }

    /// Asks the gateway to remove the mapping and waits (briefly) until that request has
    /// gone out: the service handles messages in order, so once a probe asked after the
    /// removal is answered, the removal was sent.
    pub async fn release(&self) {
        if let Some(t) = self
            .telling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
        let Some(client) = self.lock_client().take() else {
            return;
        };
        client.deactivate();
        if self.external.borrow().is_none() {
            // Nothing granted (a mapping request still under way is cancelled above).
            return;
        }
        let done = client.probe();
        if tokio::time::timeout(RELEASE_WITHIN, done).await.is_err() {
            debug!("the port mapper did not confirm the removal in time");
        }
    }
}

impl Drop for PortMap {
    fn drop(&mut self) {
        if let Some(t) = self
            .telling
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
        if let Some(client) = self
            .client
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            // Not released explicitly: remove it in the background while the runtime
            // lives.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    client.deactivate();
                    let _ = tokio::time::timeout(RELEASE_WITHIN, client.probe()).await;
                });
            }
        }
    }
}

/// Whether to ask the gateway at all: not when told not to, nor when the rendezvous is
/// on this machine's loopback (no NAT between us and our peers).
pub fn wanted(enabled: bool, rendezvous: SocketAddr) -> bool {
    enabled && !rendezvous.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gateway_is_asked_for_a_rendezvous_on_loopback_or_when_turned_off() {
        let lo: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let lo6: SocketAddr = "[::1]:7000".parse().unwrap();
        let far: SocketAddr = "198.18.0.1:7000".parse().unwrap();
        assert!(!wanted(true, lo) && !wanted(true, lo6));
        assert!(!wanted(false, far));
        assert!(wanted(true, far));
    }
}
