//! Staying registered with the rendezvous: connect, measure the NAT and register, keep the
//! UDP mapping observed, and on any loss reconnect with backoff. Shared by `expose` and
//! `reach`.

use std::net::SocketAddr;

use ed25519_dalek::SigningKey;
use tokio::net::UdpSocket;
use wire::signal::client::{Client, ClientConfig, ClientError};
use wire::signal::{ErrorCode, NatAllocation, NatInfo, NatMapping, Service};

use crate::defaults::{
    ALT_STUN_WITHIN, BACKOFF_MAX, BACKOFF_MIN, REGISTERED_STUN_WITHIN, STUN_ANSWER_WITHIN,
    TCP_STUN_WITHIN, UDP_REFRESH,
};
use crate::presence::endpoint::UdpEndpoint;
use crate::presence::tcp_port::TcpPort;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct Signaling {
    /// The rendezvous, `HOST:PORT`.
    pub rendezvous: String,
    /// Its token, if it wants one.
    pub token: Option<String>,
    /// Our name.
    pub name: String,
    /// What we offer.
    pub services: Vec<Service>,
    /// Which rendezvous key to insist on.
    pub trust: super::trust::Trust,
    /// Ask the gateway to map the UDP endpoint's port (PCP, NAT-PMP, UPnP); never for a
    /// rendezvous on loopback.
    pub port_mapping: bool,
}

impl Signaling {
    /// The registration of a reaching side (`reach`, `ping`, a `[[reach]]`): a name, no
    /// services.
    pub fn reaching(
        rendezvous: String,
        token: Option<String>,
        name: String,
        trust: super::trust::Trust,
    ) -> Signaling {
        Signaling {
            rendezvous,
            token,
            name,
            services: vec![],
            trust,
            port_mapping: true,
        }
    }
}

/// Errors no retry can fix: they end the command with a clear message. A taken name is
/// not one of them: its owner may release it, or it may expire (the peer keeps trying).
pub fn is_fatal(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused(f) if matches!(
        f.code,
        ErrorCode::Unauthorized
            | ErrorCode::VersionMismatch
            | ErrorCode::InvalidName
            | ErrorCode::BadRequest
    ))
}

/// The peer's UDP presence: the endpoint on the socket whose NAT mapping the rendezvous
/// observed (the one punching starts from and direct tunnels run on), and what we
/// measured of that NAT. Dropping it stops the refreshes.
#[derive(Debug)]
pub struct Udp {
    /// The shared endpoint.
    pub endpoint: UdpEndpoint,
    /// Its public address as the rendezvous saw it.
    pub observed: Option<SocketAddr>,
    /// The NAT in front of it.
    pub nat: Option<NatInfo>,
    /// The gateway's mapping of its port, when asked for (it follows the endpoint).
    pub portmap: Option<Arc<super::portmap::PortMap>>,
    /// The mapping the rendezvous last observed; changes when a refresh sees another one
    /// (the NAT rebooted, a carrier moved us): a reason to punch again.
    pub mapping_changed: tokio::sync::watch::Receiver<Option<SocketAddr>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Udp {
    /// The UDP presence on `endpoint` (its STUN answers on `stun_rx`), refreshed towards
    /// `servers` (the second one, the other family, asked again at once unless `alt_seen`)
    /// with the registration's credential.
    fn keep(
        (endpoint, stun_rx): (
            UdpEndpoint,
            tokio::sync::mpsc::Receiver<crate::presence::endpoint::Datagram>,
        ),
        (servers, alt_seen, cred): (Vec<SocketAddr>, bool, (String, String)),
        (observed, nat): (Option<SocketAddr>, Option<NatInfo>),
        portmap: Option<Arc<super::portmap::PortMap>>,
    ) -> Udp {
        let (mapping_tx, mapping_changed) = tokio::sync::watch::channel(observed);
        Udp {
            refresher: tokio::spawn(refresh(
                endpoint.clone(),
                stun_rx,
                (servers, alt_seen),
                cred,
                mapping_tx,
            )),
            endpoint,
            observed,
            nat,
            portmap,
            mapping_changed,
        }
    }

    /// Removes the gateway's mapping of the endpoint (on a stop), waiting until the
    /// request is out.
    pub async fn release_mapping(&mut self) {
        if let Some(p) = &self.portmap {
            p.release().await;
        }
    }
}

impl Drop for Udp {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Keeps the mapping observed: a credentialed Binding request every [`UDP_REFRESH`],
/// retried a few times, answers read from the endpoint's STUN route.
async fn refresh(
    endpoint: UdpEndpoint,
    mut stun_rx: tokio::sync::mpsc::Receiver<crate::presence::endpoint::Datagram>,
    (servers, alt_seen): (Vec<SocketAddr>, bool),
    cred: (String, String),
    mapping: tokio::sync::watch::Sender<Option<SocketAddr>>,
) {
    // The other family (`servers[1]`), when registration did not hear it in time: asked
    // again at once.
    if let Some(&alt) = servers.get(1).filter(|_| !alt_seen) {
        match refresh_one(&endpoint, &mut stun_rx, alt, &cred).await {
            Some(mapped) => {
                info!(udp = %mapped, "udp mapping observed in the other address family")
            }
            None => tracing::debug!(stun = %alt, "no STUN answer in the other address family"),
        }
    }
    loop {
        tokio::time::sleep(UDP_REFRESH).await;
        for (i, &stun) in servers.iter().enumerate() {
            let seen = refresh_one(&endpoint, &mut stun_rx, stun, &cred).await;
            if let (0, Some(now)) = (i, seen) {
                mapping.send_if_modified(|last| {
                    let moved = last.is_some_and(|l| l != now);
                    if moved {
                        info!(was = ?last, now = %now, "our udp mapping changed");
                    }
                    *last = Some(now);
                    moved
                });
            }
        }
    }
}

/// One credentialed Binding towards `stun`, retried a few times; the mapping it saw.
async fn refresh_one(
    endpoint: &UdpEndpoint,
    stun_rx: &mut tokio::sync::mpsc::Receiver<crate::presence::endpoint::Datagram>,
    stun: SocketAddr,
    cred: &(String, String),
) -> Option<SocketAddr> {
    // A fresh counter each round: the rendezvous takes observations only from requests
    // newer than any before (retransmissions of this one are answered, not counted).
    let user = wire::stun::stamp(&cred.0);
    let req = wire::stun::binding_request(Some((&user, &cred.1)), None).ok()?;
    for _ in 0..3 {
        if endpoint.send_to(&req.bytes, stun).await.is_err() {
            break;
        }
        let answered = tokio::time::timeout(STUN_ANSWER_WITHIN, async {
            while let Some((_, data)) = stun_rx.recv().await {
                if let Ok(r) = wire::stun::parse_response(&data, &req.tid, Some(&cred.1)) {
                    return Some(r.mapped);
                }
            }
            None
        })
        .await;
        if let Ok(Some(mapped)) = answered {
            return Some(mapped);
        }
    }
    None
}

/// The peer's TCP presence: the port P its signaling connection leaves from and that it
/// listens on, P's latest public mapping, and what two mappings told of the NAT's TCP
/// side. Dropping it stops listening.
#[derive(Debug)]
pub struct Tcp {
    /// The port.
    pub port: TcpPort,
    /// Its public address as the rendezvous last saw it.
    pub observed: SocketAddr,
    /// The NAT's TCP behaviour, when the server runs STUN (which gives the second mapping).
    pub nat: Option<NatInfo>,
}

/// What a new registration keeps of the last one: the UDP endpoint (sessions run on its
/// QUIC endpoint) and the gateway's mapping of its port.
#[derive(Debug, Clone)]
pub struct Reuse {
    /// The endpoint.
    pub endpoint: UdpEndpoint,
    /// Its port mapping, if one was asked for.
    pub portmap: Option<Arc<super::portmap::PortMap>>,
}

impl Registration {
    /// What the next registration keeps of this one.
    pub fn reuse(&self) -> Reuse {
        Reuse {
            endpoint: self.endpoint.clone(),
            portmap: self.udp.as_ref().and_then(|u| u.portmap.clone()),
        }
    }
}

/// A registration: the signaling client and, when the server runs STUN, the UDP side.
#[derive(Debug)]
pub struct Registration {
    /// The signaling connection.
    pub client: Client,
    /// The QUIC endpoint sessions run on: the UDP presence's when there is one, else one
    /// on a fresh socket whose paths can only be links (the relay, punched TCP).
    pub endpoint: UdpEndpoint,
    /// The UDP presence, if STUN answered.
    pub udp: Option<Udp>,
    /// The TCP presence, if the signaling connection could leave from a shared port.
    pub tcp: Option<Arc<Tcp>>,
}

/// Connects to the rendezvous from P.
async fn connect_from(
    port: &TcpPort,
    rendezvous: &str,
    config: &ClientConfig,
) -> Result<tokio::net::TcpStream, ClientError> {
    let err = |source| ClientError::Connect {
        addr: rendezvous.to_owned(),
        source,
    };
    let work = async {
        let addrs = tokio::net::lookup_host(rendezvous).await?;
        let mut last = std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "the name resolves to no address",
        );
        for a in addrs {
            match port.connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    tokio::time::timeout(config.connect_timeout, work)
        .await
        .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
        .map_err(err)
}

fn nat_info(q: &natprobe::probe::QuickProfile) -> NatInfo {
    use natprobe::classify::{Allocation, Behaviour, Mapping};
    NatInfo {
        mapping: match q.mapping {
            _ if !q.translated => NatMapping::None,
            Mapping::Known(Behaviour::EndpointIndependent) => NatMapping::EndpointIndependent,
            Mapping::Known(_) | Mapping::Varies => NatMapping::Varies,
            Mapping::Unknown => NatMapping::Unknown,
        },
        allocation: match q.allocation {
            Some(Allocation::Preserved) => NatAllocation::Preserved,
            Some(Allocation::Sequential) => NatAllocation::Sequential,
            Some(Allocation::Random) => NatAllocation::Random,
            None => NatAllocation::Unknown,
        },
        delta: q.delta.unwrap_or(0),
    }
}

impl Signaling {
    /// Connects and registers once.
    pub async fn register(&self, key: &SigningKey) -> Result<Client, ClientError> {
        Ok(self.register_udp(key).await?.client)
    }

    /// Connects, measures the NAT in front of a fresh UDP socket (when the server runs
    /// STUN), registers with that, and has the rendezvous observe the socket's mapping.
    pub async fn register_udp(&self, key: &SigningKey) -> Result<Registration, ClientError> {
        self.register_udp_on(key, None).await
    }

    /// [`Signaling::register_udp`], keeping `reuse` as the UDP endpoint when given: after a
    /// move to another network the socket stays the same (so do the sessions on its QUIC
    /// endpoint), and only its new mapping is observed; the NAT is measured on a fresh
    /// socket beside it.
    pub async fn register_udp_on(
        &self,
        key: &SigningKey,
        reuse: Option<Reuse>,
    ) -> Result<Registration, ClientError> {
        let config = ClientConfig {
            token: self.token.clone(),
            server_key: self.trust.expected(&self.rendezvous)?,
            ..ClientConfig::default()
        };
        let first_contact = config.server_key.is_none();
        // The signaling connection leaves from the shared TCP port when it can: then the
        // rendezvous observes the mapping TCP punching will use.
        let v6 = tokio::net::lookup_host(&self.rendezvous)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| a.is_ipv6());
        let port = TcpPort::bind_for(v6)
            .inspect_err(|e| warn!(error = %e, "no shared TCP port: TCP punching is off"))
            .ok();
        let (client, port) = match port {
            Some(p) => match connect_from(&p, &self.rendezvous, &config).await {
                Ok(stream) => (Client::over(stream, config).await?, Some(p)),
                Err(e) => {
                    warn!(error = %e, "signaling from the shared TCP port failed; TCP punching is off");
                    (Client::connect(&self.rendezvous, config).await?, None)
                }
            },
            None => (Client::connect(&self.rendezvous, config).await?, None),
        };
        if first_contact {
            self.trust.learned(&self.rendezvous, client.server_key())?;
        }
        let mut udp = None;
        let mut nat = None;
        let mut lan = Vec::new();
        if let Some(stun) = client.stun_server() {
            let dual = wire::dual::udp(0).and_then(|s| {
                s.set_nonblocking(true)?;
                UdpSocket::from_std(s)
            });
            match dual {
                Ok(sock) => {
                    match natprobe::probe::quick(
                        &sock,
                        stun,
                        client.welcome().stun_port2,
                        natprobe::probe::QUICK_TIMING,
                    )
                    .await
                    {
                        Ok(Some(q)) => {
                            nat = Some(nat_info(&q));
                            let port = match &reuse {
                                Some(r) => r.endpoint.local_addr().ok(),
                                None => sock.local_addr().ok(),
                            };
                            if let (Some(l), Some(ip)) = (port, route_ip(stun)) {
                                lan.push(SocketAddr::new(ip, l.port()));
                            }
                        }
                        Ok(None) => {
                            warn!(%stun, "no STUN answer over UDP: no direct UDP path (TCP and the relay remain)")
                        }
                        Err(e) => warn!(%stun, error = %e, "measuring the NAT failed"),
                    }
                    udp = Some((sock, stun));
                }
                Err(e) => warn!(error = %e, "cannot open a UDP socket: only the relay will work"),
            }
        }
        let reg = client
            .register_with(key, &self.name, self.services.clone(), lan, nat)
            .await?;
        info!(
            name = %self.name,
            rendezvous = %self.rendezvous,
            observed = %reg.observed_tcp,
            "{}",
            if reg.replaced { "re-registered" } else { "registered" }
        );
        let tcp = match port {
            Some(port) => Some(Arc::new(
                self.observe_tcp(port, &client, &reg, Some(client.local_addr().ip()))
                    .await,
            )),
            None => None,
        };
        let (stun_alt, server_ip) = (client.stun_alt(), client.server_addr().ip());
        let alt_stun = |stun: SocketAddr| async move {
            match stun_alt {
                Some(alt) => Some(alt),
                None => {
                    let named = tokio::net::lookup_host(&self.rendezvous)
                        .await
                        .map(Iterator::collect::<Vec<_>>)
                        .unwrap_or_default();
                    other_family_stun(stun, server_ip, &named)
                }
            }
        };
        let start_portmap = |endpoint: &UdpEndpoint| {
            endpoint
                .local_addr()
                .ok()
                .filter(|_| super::portmap::wanted(self.port_mapping, client.server_addr()))
                .and_then(|l| super::portmap::PortMap::start(l.port(), client.reporter()))
        };
        let kept_endpoint = reuse.as_ref().map(|r| r.endpoint.clone());
        let udp = match (udp, reuse) {
            (Some((_measured_on, stun)), Some(Reuse { endpoint, portmap })) if nat.is_some() => {
                // The same socket on a new network: observe its new mapping through the
                // endpoint (the answers come back on its STUN route).
                let cred = (reg.stun_username.clone(), reg.stun_password.clone());
                let mut stun_rx = endpoint.stun_route();
                let observed = refresh_one(&endpoint, &mut stun_rx, stun, &cred).await;
                if let (Some(o), Some(n)) = (observed, nat) {
                    info!(udp = %o, mapping = ?n.mapping, allocation = ?n.allocation,
                        delta = n.delta, "udp mapping observed");
                }
                let mut servers = vec![stun];
                let mut alt_seen = true;
                if let Some(alt) = alt_stun(stun).await {
                    let seen = tokio::time::timeout(
                        ALT_STUN_WITHIN,
                        refresh_one(&endpoint, &mut stun_rx, alt, &cred),
                    )
                    .await;
                    alt_seen = matches!(seen, Ok(Some(_)));
                    servers.push(alt);
                }
                let portmap = match portmap {
                    Some(p) => {
                        p.rebind(client.reporter());
                        Some(p)
                    }
                    None => start_portmap(&endpoint),
                };
                Some(Udp::keep(
                    (endpoint, stun_rx),
                    (servers, alt_seen, cred),
                    (observed, nat),
                    portmap,
                ))
            }
            (Some((socket, stun)), None) if nat.is_some() => {
                let cred = (reg.stun_username.clone(), reg.stun_password.clone());
                let binding = wire::signal::client::stun_binding(
                    &socket,
                    stun,
                    Some((&cred.0, &cred.1)),
                    wire::stun::transaction::Timing::RFC8489,
                );
                let observed = tokio::time::timeout(REGISTERED_STUN_WITHIN, binding)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|r| r.mapped);
                if let (Some(o), Some(n)) = (observed, nat) {
                    info!(udp = %o, mapping = ?n.mapping, allocation = ?n.allocation,
                        delta = n.delta, "udp mapping observed");
                }
                // The other address family, from the same socket (it is dual-stack): a
                // second candidate the other side may reach us at.
                let mut servers = vec![stun];
                let alt = alt_stun(stun).await;
                // Briefly: a family with no way out (an IPv6-only host's IPv4) must not hold
                // the registration up; the refresher asks again in the background.
                let mut alt_seen = true;
                if let Some(alt) = alt {
                    let binding = wire::signal::client::stun_binding(
                        &socket,
                        alt,
                        Some((&cred.0, &cred.1)),
                        wire::stun::transaction::Timing::RFC8489,
                    );
                    alt_seen = match tokio::time::timeout(ALT_STUN_WITHIN, binding).await {
                        Ok(Ok(r)) => {
                            info!(udp = %r.mapped, "udp mapping observed in the other address family");
                            true
                        }
                        _ => false,
                    };
                    servers.push(alt);
                }
                match socket.into_std().and_then(UdpEndpoint::new) {
                    Ok((endpoint, stun_rx)) => {
                        let portmap = start_portmap(&endpoint);
                        Some(Udp::keep(
                            (endpoint, stun_rx),
                            (servers, alt_seen, cred),
                            (observed, nat),
                            portmap,
                        ))
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot make the UDP endpoint: only the relay will work");
                        None
                    }
                }
            }
            _ => None,
        };
        let endpoint = match (&udp, kept_endpoint) {
            (Some(u), _) => u.endpoint.clone(),
            // No STUN answer here: the sessions' endpoint stays all the same.
            (None, Some(e)) => e,
            (None, None) => {
                let sock = wire::dual::udp(0).map_err(ClientError::StunIo)?;
                UdpEndpoint::new(sock).map_err(ClientError::StunIo)?.0
            }
        };
        Ok(Registration {
            client,
            endpoint,
            udp,
            tcp,
        })
    }

    /// A credentialed STUN Binding over TCP from P: the rendezvous records P's latest
    /// mapping (the one peers will connect to), and it and the signaling connection's
    /// mapping tell how the NAT maps TCP.
    async fn observe_tcp(
        &self,
        port: TcpPort,
        client: &Client,
        reg: &wire::signal::Registered,
        local_ip: Option<std::net::IpAddr>,
    ) -> Tcp {
        let first = reg.observed_tcp;
        let Some(stun) = client.stun_server() else {
            return Tcp {
                port,
                observed: first,
                nat: None,
            };
        };
        let cred = (reg.stun_username.as_str(), reg.stun_password.as_str());
        let second = async {
            let mut s = port.connect(stun).await.map_err(ClientError::StunIo)?;
            wire::signal::client::stun_binding_tcp(&mut s, Some(cred), TCP_STUN_WITHIN).await
        };
        match tokio::time::timeout(TCP_STUN_WITHIN, second).await {
            Ok(Ok(r)) => {
                let mut nat = NatInfo::from_tcp_mappings(first, r.mapped);
                if Some(r.mapped) == local_ip.map(|ip| SocketAddr::new(ip, port.port())) {
                    nat.mapping = NatMapping::None;
                }
                info!(tcp = %r.mapped, port = port.port(), mapping = ?nat.mapping,
                    allocation = ?nat.allocation, delta = nat.delta, "tcp mapping observed");
                Tcp {
                    port,
                    observed: r.mapped,
                    nat: Some(nat),
                }
            }
            Ok(Err(e)) => {
                warn!(%stun, error = %e, "no STUN answer over TCP; TCP punching goes by the signaling mapping");
                Tcp {
                    port,
                    observed: first,
                    nat: None,
                }
            }
            Err(_) => {
                warn!(%stun, "no STUN answer over TCP in {TCP_STUN_WITHIN:?}; TCP punching goes by the signaling mapping");
                Tcp {
                    port,
                    observed: first,
                    nat: None,
                }
            }
        }
    }

    /// Registers, retrying with jittered backoff until it works, a fatal refusal, or
    /// shutdown (`Ok(None)`).
    pub async fn register_until_up(
        &self,
        key: &SigningKey,
        shutdown: &CancellationToken,
        reuse: Option<Reuse>,
    ) -> Result<Option<Registration>, ClientError> {
        let mut wait = BACKOFF_MIN;
        loop {
            // Jitter (0.5x to 1.5x): after a rendezvous restart its peers come back spread
            // out, not in lockstep.
            let pause = wire::cli::jitter(wait, rand::random());
            match self.register_udp_on(key, reuse.clone()).await {
                Ok(c) => return Ok(Some(c)),
                Err(e) if is_fatal(&e) => return Err(e),
                Err(ClientError::Refused(f)) if f.code == ErrorCode::NameTaken => {
                    tracing::error!(
                        name = %self.name,
                        "{}; if that is another of your machines, stop it there or give this \
                         one another --name; if it is yours, `peer release {}` there frees it. \
                         Retrying in {pause:.1?}",
                        f.message,
                        self.name
                    );
                }
                Err(e @ (ClientError::KeyMismatch { .. } | ClientError::Pin(_))) => {
                    // Not an outage: someone else answers, or the pin cannot be read.
                    // Nothing was sent; keep refusing loudly until the real server is back.
                    tracing::error!(error = %e, "rendezvous refused; retrying in {pause:.1?}");
                }
                Err(e) => {
                    warn!(error = %e, "rendezvous unavailable; retrying in {pause:.1?}");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(pause) => {}
            }
            wait = (wait * 2).min(BACKOFF_MAX);
        }
    }
}

/// The STUN responder in the other address family, found from the rendezvous' name when
/// the server did not say it: only when STUN runs on the host we reached (`stun` on the
/// same IP as `server`), at the name's first address of the other family, on STUN's port.
pub fn other_family_stun(
    stun: SocketAddr,
    server: std::net::IpAddr,
    named: &[SocketAddr],
) -> Option<SocketAddr> {
    if stun.ip() != server {
        return None;
    }
    named
        .iter()
        .find(|a| a.is_ipv6() != server.is_ipv6())
        .map(|a| SocketAddr::new(a.ip(), stun.port()))
}

/// The local IP the system routes towards `to` from.
fn route_ip(to: SocketAddr) -> Option<std::net::IpAddr> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect(to).ok()?;
    Some(s.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_family_comes_from_the_name_only_for_stun_on_the_same_host() {
        let named: Vec<SocketAddr> = vec![
            "198.18.0.1:7000".parse().unwrap(),
            "[2001:2::1]:7000".parse().unwrap(),
        ];
        let v4: std::net::IpAddr = "198.18.0.1".parse().unwrap();
        // Reached over IPv4, STUN on that host: its IPv6 address, on STUN's port.
        assert_eq!(
            other_family_stun("198.18.0.1:3478".parse().unwrap(), v4, &named),
            Some("[2001:2::1]:3478".parse().unwrap())
        );
        // And the reverse.
        assert_eq!(
            other_family_stun(
                "[2001:2::1]:3478".parse().unwrap(),
                "2001:2::1".parse().unwrap(),
                &named
            ),
            Some("198.18.0.1:3478".parse().unwrap())
        );
        // STUN elsewhere (advertised on another host): the name says nothing of it.
        assert_eq!(
            other_family_stun("198.18.0.9:3478".parse().unwrap(), v4, &named),
            None
        );
        // A name of one family only.
        assert_eq!(
            other_family_stun("198.18.0.1:3478".parse().unwrap(), v4, &named[..1]),
            None
        );
    }
}
