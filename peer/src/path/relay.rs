//! The relay as a path: joins the relay a broker message offers with this side's ticket and
//! makes the joined socket or stream a [`Link`]. Over UDP when both peers have a working
//! UDP endpoint (the relay forwards QUIC datagrams as they are), else over TCP (datagrams
//! framed on the stream), for peers whose UDP is blocked. Both sides decide the same way
//! from the same facts, so both halves of a session come to the relay over one protocol.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use wire::relay::client::JoinError;
use wire::signal::{Broker, RelayOffer};

use super::PathKind;
use super::link::{Link, Links};
use crate::defaults;

/// Whether `b`'s relay is joined over TCP: unless both sides have a UDP presence (ours,
/// `our_udp`: STUN answered; theirs: the broker gave us its observed UDP address).
pub fn over_tcp(our_udp: bool, b: &Broker) -> bool {
    !(our_udp && b.candidates.udp.is_some())
}

/// Joins the relay of `offer` and returns the link, once the other half is there too.
pub async fn join(links: &Arc<Links>, offer: &RelayOffer, udp: bool) -> Result<Link, JoinError> {
    if udp {
        let any = if offer.addr.is_ipv6() {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        };
        let sock = UdpSocket::bind(any).await.map_err(JoinError::Io)?;
        wire::sockbuf::grow_udp_buffers(&sock);
        let join = wire::relay::client::UdpJoin::new(offer.ticket.clone(), offer.secret);
        wire::relay::client::join_udp(
            &sock,
            offer.addr,
            &join,
            defaults::RELAY_UDP_HELLO,
            defaults::RELAY_JOIN,
        )
        .await?;
        return Ok(links.add_udp(PathKind::Relay, sock, offer.addr, Some(join)));
    }
    let stream = wire::relay::client::join_tcp(
        offer.addr,
        offer.ticket.clone(),
        offer.secret,
        defaults::RELAY_JOIN,
    )
    .await?;
    Ok(links.add_stream(PathKind::RelayTcp, stream))
}
