//! Brokering: turns "A wants B's service" into the two `Broker` messages that start a
//! session. Pure functions; the shell supplies the random session id and secret.

use std::time::Duration;

use crate::defaults;
use std::net::{IpAddr, SocketAddr};

use wire::ticket::TicketKey;

use wire::signal::{
    Broker, Candidates, ErrorCode, ErrorFrame, PublicKey, RelayOffer, Role, Service, ServiceRef,
    SessionId,
};

/// One side of a session as the broker needs it.
#[derive(Debug, Clone)]
pub struct Side<'a> {
    /// Registered name.
    pub name: &'a str,
    /// Its key.
    pub key: PublicKey,
    /// Where it can be reached.
    pub candidates: Candidates,
    /// Its round trip to the server, if it reported one.
    pub rtt: Option<Duration>,
}

/// What the broker needs to hand out relay tickets.
#[derive(Debug, Clone)]
pub struct RelayIssue<'a> {
    /// The key shared with the relay.
    pub key: &'a TicketKey,
    /// Unix seconds at which the tickets expire.
    pub expires: u64,
    /// The relay address as the initiator should dial it.
    pub addr_for_initiator: SocketAddr,
    /// The relay address as the responder should dial it.
    pub addr_for_responder: SocketAddr,
}

/// The relays a rendezvous can hand out right now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relays<'a> {
    /// The registered standalone relay with the fewest sessions, with the key shared with
    /// it (standalone relays register only when the rendezvous has that key).
    pub standalone: Option<(SocketAddr, &'a TicketKey)>,
    /// The embedded relay: the address it is bound to, and its key.
    pub embedded: Option<(SocketAddr, &'a TicketKey)>,
}

/// Which relay carries a session, and at which address each side should dial it.
///
/// Standalone relays come first: they are what a deployment adds to spare the rendezvous'
/// own bandwidth. The embedded relay shares the rendezvous' host: it is dialled at the
/// address the operator advertises for that host (`--advertise`, for servers behind a
/// cloud's 1:1 NAT), else where it is bound, or, bound to every address, on "the host you
/// reached the rendezvous on" (an unspecified IP the peer resolves, see
/// [`wire::signal::same_host`]): the one address sure to reach this host from that peer.
pub fn choose_relay<'a>(
    relays: Relays<'a>,
    (advertise_initiator, advertise_responder): (Option<IpAddr>, Option<IpAddr>),
    expires: u64,
) -> Option<RelayIssue<'a>> {
    if let Some((addr, key)) = relays.standalone {
        return Some(RelayIssue {
            key,
            expires,
            addr_for_initiator: addr,
            addr_for_responder: addr,
        });
    }
    let (bound, key) = relays.embedded?;
    // Each side dials this host's address in its own family, when one is advertised.
    let dial = |advertise: Option<IpAddr>| match advertise {
        Some(ip) => SocketAddr::new(ip, bound.port()),
        None => bound,
    };
    Some(RelayIssue {
        key,
        expires,
        addr_for_initiator: dial(advertise_initiator),
        addr_for_responder: dial(advertise_responder),
    })
}

/// Where the two halves of a public client's relay session dial: the rendezvous itself (the
/// initiator) and the exposer (the responder).
#[derive(Debug, Clone)]
pub struct PublicRelay<'a> {
    /// The key shared with the relay.
    pub key: &'a TicketKey,
    /// Where the rendezvous dials it.
    pub for_self: SocketAddr,
    /// Where the exposer dials it (an unspecified IP: the host it reached us on).
    pub for_exposer: SocketAddr,
}

/// Which relay carries a public client to its exposer. Unlike a peer session, the bytes
/// already pass through this host (the public entry is here), so the embedded relay comes
/// first: a standalone relay would only add a hop. The rendezvous dials the embedded relay
/// on loopback when it is bound to every address (IPv4 loopback: a socket on every
/// address takes IPv4 whether or not it takes IPv6 too).
pub fn choose_public_relay<'a>(
    relays: Relays<'a>,
    advertise: Option<IpAddr>,
) -> Option<PublicRelay<'a>> {
    if let Some((bound, key)) = relays.embedded {
        let for_self = if bound.ip().is_unspecified() {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, bound.port()))
        } else {
            bound
        };
        let for_exposer = match advertise {
            Some(ip) => SocketAddr::new(ip, bound.port()),
            None => bound,
        };
        return Some(PublicRelay {
            key,
            for_self,
            for_exposer,
        });
    }
    let (addr, key) = relays.standalone?;
    Some(PublicRelay {
        key,
        for_self: addr,
        for_exposer: addr,
    })
}

/// Picks the service `wanted` among `offered`, or the only one when `wanted` is `None`.
pub fn select_service(
    peer: &str,
    offered: &[Service],
    wanted: Option<ServiceRef>,
) -> Result<Service, ErrorFrame> {
    let list = || {
        offered
            .iter()
            .map(|s| s.reference().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match wanted {
        Some(w) => offered
            .iter()
            .find(|s| s.reference() == w)
            .cloned()
            .ok_or_else(|| {
                ErrorFrame::new(
                    ErrorCode::NoSuchService,
                    if offered.is_empty() {
                        format!("{peer} offers no services")
                    } else {
                        format!("{peer} does not offer {w}; it offers {}", list())
                    },
                )
            }),
        None => match offered {
            [only] => Ok(only.clone()),
            [] => Err(ErrorFrame::new(
                ErrorCode::NoSuchService,
                format!("{peer} offers no services"),
            )),
            _ => Err(ErrorFrame::new(
                ErrorCode::NoSuchService,
                format!("{peer} offers several services ({}); name one", list()),
            )),
        },
    }
}

/// Each side's delay before punching so that both start at the same moment: the server
/// sends both messages at once, each arrives half a round trip later, so each waits the
/// common lead minus its own half round trip.
pub fn start_delays(a: Option<Duration>, b: Option<Duration>) -> (Duration, Duration) {
    let half = |r: Option<Duration>| {
        r.unwrap_or(defaults::DEFAULT_RTT)
            .min(defaults::MAX_PUNCH_LEAD)
            / 2
    };
    let (ha, hb) = (half(a), half(b));
    let lead = ha.max(hb) + defaults::PUNCH_LEAD;
    (lead - ha, lead - hb)
}

/// The two messages of a brokered session: `(to initiator, to responder)`.
pub fn broker(
    session: SessionId,
    secret: [u8; 32],
    initiator: Side<'_>,
    responder: Side<'_>,
    service: Service,
    relay: Option<RelayIssue<'_>>,
) -> (Broker, Broker) {
    let offer = |role: Role| {
        relay.as_ref().map(|r| {
            let ticket = r.key.issue(session, role, r.expires);
            RelayOffer {
                addr: match role {
                    Role::Initiator => r.addr_for_initiator,
                    Role::Responder => r.addr_for_responder,
                },
                secret: r.key.join_secret(&ticket),
                ticket,
            }
        })
    };
    let (da, db) = start_delays(initiator.rtt, responder.rtt);
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    // LAN addresses are only worth trying behind one public IP (one NAT, one site).
    // Elsewhere they are someone else's network: handing them out would let a peer that
    // claims LAN addresses make the other probe any host it names there.
    let same_site = initiator.candidates.tcp.map(|a| a.ip()).is_some()
        && initiator.candidates.tcp.map(|a| a.ip()) == responder.candidates.tcp.map(|a| a.ip());
    let (mut initiator, mut responder) = (initiator, responder);
    if !same_site {
        initiator.candidates.lan.clear();
        responder.candidates.lan.clear();
    }
    let to_initiator = Broker {
        session,
        role: Role::Initiator,
        peer: responder.name.to_owned(),
        peer_key: responder.key,
        service: service.clone(),
        candidates: responder.candidates,
        start_in_ms: ms(da),
        secret,
        relay: offer(Role::Initiator),
    };
    let to_responder = Broker {
        session,
        role: Role::Responder,
        peer: initiator.name.to_owned(),
        peer_key: initiator.key,
        service,
        candidates: initiator.candidates,
        start_in_ms: ms(db),
        secret,
        relay: offer(Role::Responder),
    };
    (to_initiator, to_responder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::signal::Proto;

    #[test]
    fn public_clients_prefer_the_embedded_relay_dialled_on_loopback() {
        let (k1, k2) = (TicketKey::random(), TicketKey::random());
        let standalone: SocketAddr = "198.18.0.9:7001".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        let r = choose_public_relay(
            Relays {
                standalone: Some((standalone, &k2)),
                embedded: Some((any, &k1)),
            },
            Some("198.18.0.1".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(r.for_self, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(r.for_exposer, "198.18.0.1:7001".parse().unwrap());
        let r = choose_public_relay(
            Relays {
                standalone: Some((standalone, &k2)),
                embedded: None,
            },
            None,
        )
        .unwrap();
        assert_eq!((r.for_self, r.for_exposer), (standalone, standalone));
        assert!(choose_public_relay(Relays::default(), None).is_none());
    }

    #[test]
    fn lan_addresses_go_only_to_a_peer_behind_the_same_public_ip() {
        let side = |name, public: &str, lan: &str| Side {
            name,
            key: PublicKey([1; 32]),
            candidates: Candidates {
                tcp: Some(public.parse().unwrap()),
                lan: vec![lan.parse().unwrap()],
                ..Candidates::default()
            },
            rtt: None,
        };
        let svc = Service {
            port: 80,
            proto: Proto::Tcp,
            description: String::new(),
        };
        let session = SessionId([1; 16]);
        // Different public IPs: no LAN addresses either way.
        let (to_a, to_b) = broker(
            session,
            [0; 32],
            side("a", "198.18.0.10:4000", "10.0.0.5:4000"),
            side("b", "198.18.0.20:4000", "10.0.0.6:4000"),
            svc.clone(),
            None,
        );
        assert!(to_a.candidates.lan.is_empty() && to_b.candidates.lan.is_empty());
        // Behind one NAT: each gets the other's.
        let (to_a, to_b) = broker(
            session,
            [0; 32],
            side("a", "198.18.0.10:4000", "10.0.0.5:4000"),
            side("b", "198.18.0.10:5000", "10.0.0.6:4000"),
            svc,
            None,
        );
        assert_eq!(to_a.candidates.lan, vec!["10.0.0.6:4000".parse().unwrap()]);
        assert_eq!(to_b.candidates.lan, vec!["10.0.0.5:4000".parse().unwrap()]);
    }

    fn svc(port: u16, proto: Proto) -> Service {
        Service {
            port,
            proto,
            description: String::new(),
        }
    }

    #[test]
    fn service_selection() {
        let one = [svc(7274, Proto::Tcp)];
        assert_eq!(select_service("pc", &one, None).unwrap().port, 7274);
        let two = [svc(7274, Proto::Tcp), svc(53, Proto::Udp)];
        let err = select_service("pc", &two, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoSuchService);
        assert!(err.message.contains("7274/tcp, 53/udp"), "{err}");
        let udp = ServiceRef {
            port: 53,
            proto: Proto::Udp,
        };
        assert_eq!(
            select_service("pc", &two, Some(udp)).unwrap().proto,
            Proto::Udp
        );
        let missing = ServiceRef {
            port: 53,
            proto: Proto::Tcp,
        };
        let err = select_service("pc", &two, Some(missing)).unwrap_err();
        assert!(err.message.contains("does not offer 53/tcp"), "{err}");
        assert!(select_service("pc", &[], None).is_err());
    }

    #[test]
    fn both_sides_start_together() {
        let ms = Duration::from_millis;
        let (a, b) = start_delays(Some(ms(20)), Some(ms(200)));
        // a's message arrives after 10 ms, b's after 100 ms: both must start at the same time.
        assert_eq!(a + ms(10), b + ms(100));
        assert_eq!(b, defaults::PUNCH_LEAD);
        // An absurd RTT claim is capped.
        let (a, _) = start_delays(Some(Duration::from_secs(3600)), None);
        assert!(a <= defaults::MAX_PUNCH_LEAD);
    }

    #[test]
    fn standalone_relays_come_first_and_the_embedded_one_is_dialled_on_the_advertised_host() {
        let (k1, k2) = (
            TicketKey::from_bytes([1; 32]),
            TicketKey::from_bytes([2; 32]),
        );
        let wildcard: SocketAddr = "0.0.0.0:7001".parse().unwrap();
        let standalone: SocketAddr = "198.18.7.7:7001".parse().unwrap();
        assert!(choose_relay(Relays::default(), (None, None), 9).is_none());

        // Bound to every address, not advertised: "the host you reached us on".
        let embedded = Relays {
            standalone: None,
            embedded: Some((wildcard, &k1)),
        };
        let r = choose_relay(embedded, (None, None), 9).unwrap();
        assert_eq!(
            (r.addr_for_initiator, r.addr_for_responder),
            (wildcard, wildcard)
        );
        assert_eq!((r.key.to_hex(), r.expires), (k1.to_hex(), 9));
        // Advertised (a 1:1 NAT in front): that address, on the relay's port.
        let public: IpAddr = "198.18.1.9".parse().unwrap();
        let r = choose_relay(embedded, (Some(public), Some(public)), 9).unwrap();
        assert_eq!(r.addr_for_responder, "198.18.1.9:7001".parse().unwrap());
        // Bound to one address: there.
        let concrete: SocketAddr = "198.18.3.3:7001".parse().unwrap();
        let one = Relays {
            standalone: None,
            embedded: Some((concrete, &k1)),
        };
        let r = choose_relay(one, (None, None), 9).unwrap();
        assert_eq!(
            (r.addr_for_initiator, r.addr_for_responder),
            (concrete, concrete)
        );

        let both = Relays {
            standalone: Some((standalone, &k2)),
            embedded: Some((wildcard, &k1)),
        };
        let r = choose_relay(both, (Some(public), Some(public)), 9).unwrap();
        assert_eq!(
            (r.addr_for_initiator, r.addr_for_responder),
            (standalone, standalone)
        );
        assert_eq!(r.key.to_hex(), k2.to_hex());
    }

    #[test]
    fn each_side_gets_the_other_sides_key_and_candidates() {
        let key = TicketKey::from_bytes([8; 32]);
        let cand = |port| Candidates {
            tcp: Some(std::net::SocketAddr::from(([198, 18, 0, 1], port))),
            udp: None,
            udp_alt: None,
            lan: vec![],
            nat: None,
            tcp_nat: None,
            mapped: None,
        };
        let (i, r) = broker(
            SessionId([1; 16]),
            [2; 32],
            Side {
                name: "phone",
                key: PublicKey([3; 32]),
                candidates: cand(1),
                rtt: None,
            },
            Side {
                name: "pc",
                key: PublicKey([4; 32]),
                candidates: cand(2),
                rtt: None,
            },
            svc(7274, Proto::Tcp),
            Some(RelayIssue {
                key: &key,
                expires: 1_900_000_000,
                addr_for_initiator: "198.18.0.1:7001".parse().unwrap(),
                addr_for_responder: "198.18.9.1:7001".parse().unwrap(),
            }),
        );
        assert_eq!((i.role, r.role), (Role::Initiator, Role::Responder));
        // Each side gets a ticket for its own half only, and the relay address it can dial.
        let (ri, rr) = (i.relay.unwrap(), r.relay.unwrap());
        assert_eq!(
            (ri.ticket.side, rr.ticket.side),
            (Role::Initiator, Role::Responder)
        );
        assert_eq!(ri.addr.ip().to_string(), "198.18.0.1");
        assert_eq!(rr.addr.ip().to_string(), "198.18.9.1");
        assert_eq!(key.verify(&ri.ticket, 1_800_000_000), Ok(()));
        assert_eq!(ri.ticket.session, i.session);
        assert_eq!((i.peer.as_str(), r.peer.as_str()), ("pc", "phone"));
        assert_eq!(
            (i.peer_key, r.peer_key),
            (PublicKey([4; 32]), PublicKey([3; 32]))
        );
        assert_eq!(i.candidates.tcp.unwrap().port(), 2);
        assert_eq!(r.candidates.tcp.unwrap().port(), 1);
        assert_eq!((i.session, i.secret), (r.session, r.secret));
    }
}
