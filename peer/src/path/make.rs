//! Making a session's paths for one broker message, the same way on both sides: this
//! side's half of the relay (over UDP when both peers have a UDP presence, else over TCP)
//! and the UDP and TCP punches that `--transport` allows, all started at once. Each attempt
//! reports one [`Made`]: a path ready to carry the session (its address for QUIC and the
//! link under it, if any), or why there is none. The exposing side dials or opens the
//! paths; the reaching side hands the links to its session and keeps the reasons for its
//! log lines.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{info, warn};
use wire::signal::{Broker, NatInfo};

use super::PathKind;
use super::link::Link;
use crate::presence::endpoint::UdpEndpoint;
use crate::presence::signal::Tcp;
use crate::punch::{tcp_shell, udp_shell};

/// Where this side's paths start from.
#[derive(Debug, Clone)]
pub struct From {
    /// The QUIC endpoint the session runs on (its links table, its UDP socket).
    pub endpoint: UdpEndpoint,
    /// Whether STUN answered over UDP, and what we measured of the NAT then.
    pub udp: Option<Option<NatInfo>>,
    /// The shared TCP port, when signaling could leave from one.
    pub tcp: Option<Arc<Tcp>>,
    /// The gateway's mapping of the UDP endpoint's port, when one was asked for.
    pub mapped: Option<tokio::sync::watch::Receiver<Option<std::net::SocketAddrV4>>>,
}

impl From {
    /// Whether the gateway maps our UDP endpoint's port now.
    pub fn is_mapped(&self) -> bool {
        self.mapped.as_ref().is_some_and(|w| w.borrow().is_some())
    }
}

/// Which attempts to start.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    /// Join the relay (not on a re-punch, nor with `--no-relay`).
    pub relay: bool,
    /// Punch UDP.
    pub udp: bool,
    /// Punch TCP.
    pub tcp: bool,
}

/// What one attempt came to.
#[derive(Debug)]
pub enum Made {
    /// A path that can carry the session.
    Path {
        /// What carries it.
        kind: PathKind,
        /// Its address for QUIC: the peer's, or the link's made-up one.
        addr: SocketAddr,
        /// The link under it, which must be held while the path lives.
        link: Option<Link>,
        /// Further addresses for QUIC on the same link, to dial if the handshake fails on
        /// `addr` (punched UDP on the shared socket: other pairs that answered).
        fallbacks: Vec<SocketAddr>,
    },
    /// No path of this kind, and why (for the log lines of connections on the relay).
    Failed {
        /// The kind that failed.
        kind: PathKind,
        /// Why.
        why: String,
    },
}

/// Starts the attempts `want` asks for, for broker message `b`; each reports on `tx`.
/// Returns how many will report.
pub fn start(from: &From, b: &Broker, want: Wanted, tx: &mpsc::Sender<Made>) -> usize {
    let relay_tcp = super::relay::over_tcp(from.udp.is_some(), b);
    // The relay joins both sides make before punching take a mapping each, on UDP or
    // TCP, which sequential-NAT prediction must skip.
    let joins = want.relay && b.relay.is_some();
    let mut n = 0;
    if want.relay {
        match b.relay.clone() {
            Some(offer) => {
                n += 1;
                let (links, peer, done) =
                    (from.endpoint.links().clone(), b.peer.clone(), tx.clone());
                tokio::spawn(async move {
                    let made = match super::relay::join(&links, &offer, !relay_tcp).await {
                        Ok(link) => Made::Path {
                            kind: link.kind,
                            addr: link.addr,
                            link: Some(link),
                            fallbacks: Vec::new(),
                        },
                        Err(e) => {
                            warn!(%peer, relay = %offer.addr, error = %e, "could not join the relay");
                            Made::Failed {
                                kind: PathKind::Relay,
                                why: e.to_string(),
                            }
                        }
                    };
                    let _ = done.send(made).await;
                });
            }
            None => {
                info!(peer = %b.peer, "the rendezvous offered no relay (started with --no-relay?); direct paths only")
            }
        }
    }
    if want.udp {
        n += 1;
        let (endpoint, b, nat, done) = (from.endpoint.clone(), b.clone(), from.udp, tx.clone());
        let mapped = from.is_mapped();
        tokio::spawn(async move {
            let made = match (nat, b.candidates.udp) {
                (None, _) => failed_udp(&b, "no UDP endpoint (no STUN answer)".into()),
                (Some(_), None) => failed_udp(
                    &b,
                    format!("{} has no UDP endpoint (no STUN answer)", b.peer),
                ),
                (Some(nat), Some(_)) => {
                    match udp_shell::establish(&endpoint, (nat, mapped), &b, joins && !relay_tcp)
                        .await
                    {
                        Ok(p) => match p.socket {
                            None => Made::Path {
                                kind: PathKind::DirectUdp,
                                addr: p.remote,
                                link: None,
                                fallbacks: p.fallbacks,
                            },
                            Some(sock) => {
                                let links = endpoint.links();
                                let link = links.add_udp(PathKind::DirectUdp, sock, p.remote, None);
                                Made::Path {
                                    kind: PathKind::DirectUdp,
                                    addr: link.addr,
                                    link: Some(link),
                                    fallbacks: Vec::new(),
                                }
                            }
                        },
                        Err(e) => {
                            info!(peer = %b.peer, session = %b.session, "staying on the relay: {e}");
                            Made::Failed {
                                kind: PathKind::DirectUdp,
                                why: e.to_string(),
                            }
                        }
                    }
                }
            };
            let _ = done.send(made).await;
        });
    }
    if want.tcp {
        n += 1;
        let (links, tcp, b, done) = (
            from.endpoint.links().clone(),
            from.tcp.clone(),
            b.clone(),
            tx.clone(),
        );
        tokio::spawn(async move {
            let made = match tcp {
                None => {
                    info!(peer = %b.peer, "no direct tcp: no shared TCP port");
                    Made::Failed {
                        kind: PathKind::DirectTcp,
                        why: "no shared TCP port".into(),
                    }
                }
                Some(tcp) => match tcp_shell::establish_tcp(&tcp, &b, joins && relay_tcp).await {
                    Ok(d) => {
                        let link = links.add_stream(PathKind::DirectTcp, d.stream);
                        Made::Path {
                            kind: PathKind::DirectTcp,
                            addr: link.addr,
                            link: Some(link),
                            fallbacks: Vec::new(),
                        }
                    }
                    Err(e) => {
                        info!(peer = %b.peer, session = %b.session, "no direct tcp path: {e}");
                        Made::Failed {
                            kind: PathKind::DirectTcp,
                            why: e.to_string(),
                        }
                    }
                },
            };
            let _ = done.send(made).await;
        });
    }
    n
}

fn failed_udp(b: &Broker, why: String) -> Made {
    info!(peer = %b.peer, "relay only: {why}");
    Made::Failed {
        kind: PathKind::DirectUdp,
        why,
    }
}
