//! The embedded relay: a brokered session's two tickets pair at the rendezvous' relay and
//! carry bytes both ways; the rendezvous' /metrics counts them. Without a relay, sessions
//! get no offer.

mod common;

use std::time::Duration;

use common::*;
use rendezvous::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::relay::client::join_tcp;
use wire::signal::client::ClientEvent;

#[tokio::test]
async fn brokered_tickets_pair_at_the_embedded_relay() {
    let server = start(loopback_config()).await;
    let relay_addr = server.addrs().relay.expect("relay on");
    let (mut pc, phone) = pc_and_phone(&server, "pc-home", web(7274)).await;

    let mine = phone.connect_to("pc-home", None).await.unwrap();
    let theirs = match within("broker push", pc.next_event()).await {
        Some(ClientEvent::Broker(b)) => *b,
        other => panic!("{other:?}"),
    };
    let (mo, to) = (mine.relay.expect("offer"), theirs.relay.expect("offer"));
    // Both dial the relay where they reached the rendezvous: loopback, the relay's port.
    assert_eq!(mo.addr, relay_addr);
    assert_eq!(to.addr, relay_addr);
    let limit = Duration::from_secs(10);
    let (a, b) = tokio::join!(
        join_tcp(mo.addr, mo.ticket, mo.secret, limit),
        join_tcp(to.addr, to.ticket, to.secret, limit)
    );
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut req = [0u8; 18];
    within("pc reads", b.read_exact(&mut req)).await.unwrap();
    assert_eq!(&req, b"GET / HTTP/1.1\r\n\r\n");
    b.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    let mut resp = [0u8; 19];
    within("phone reads", a.read_exact(&mut resp))
        .await
        .unwrap();
    assert_eq!(&resp, b"HTTP/1.1 200 OK\r\n\r\n");

    let http = server.addrs().http.unwrap();
    assert_eq!(metric(http, "chuantou_relay_bytes_total").await, 37);
    assert_eq!(metric(http, "chuantou_relay_sessions").await, 1);
}

#[tokio::test]
async fn without_a_relay_sessions_get_no_offer() {
    let server = start(ServerConfig {
        relay: None,
        ..loopback_config()
    })
    .await;
    assert!(server.addrs().relay.is_none());
    let (_pc, phone) = pc_and_phone(&server, "pc", web(80)).await;
    assert!(phone.connect_to("pc", None).await.unwrap().relay.is_none());
}
