//! A standalone relay registers with the rendezvous (proving the shared ticket key) and is
//! then handed out in tickets; a relay with another key is refused, naming the reason.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chuantou_tests::*;
use relay::announce::{AnnounceError, announce, announce_once};
use relay::server::{RelayConfig, RelayServer};
use relay::stats::RelayStats;
use rendezvous::server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use wire::signal::client::{Client, ClientEvent};
use wire::ticket::TicketKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_relay_carries_brokered_sessions() {
    let key = TicketKey::random();
    let server = Server::bind(ServerConfig {
        relay: None,
        shared_relay_key: Some(key.clone()),
        ..ServerConfig::loopback()
    })
    .await
    .unwrap()
    .spawn();
    let standalone = RelayServer::bind(RelayConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        key.clone(),
    ))
    .await
    .unwrap();
    let relay_addr = standalone.local_addr();
    let stats = standalone.stats();
    let stop = CancellationToken::new();
    tokio::spawn(standalone.run(stop.clone()));
    tokio::spawn(announce(
        server.addrs().signaling.to_string(),
        Some(server.key()),
        key,
        relay_addr.port(),
        None,
        stats.clone(),
        stop.clone(),
    ));

    let addr = server.addrs().signaling.to_string();
    let mut pc = Client::connect(&addr, Default::default()).await.unwrap();
    pc.register(
        &ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
        "pc",
        vec![wire::signal::Service {
            port: 80,
            proto: wire::signal::Proto::Tcp,
            description: String::new(),
        }],
        vec![],
    )
    .await
    .unwrap();
    let phone = Client::connect(&addr, Default::default()).await.unwrap();
    phone
        .register(
            &ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
            "phone",
            vec![],
            vec![],
        )
        .await
        .unwrap();
    // Until the relay has registered, sessions get no offer (no embedded relay here).
    let (theirs, other) = within("a session offered the standalone relay", async {
        loop {
            let mine = phone.connect_to("pc", None).await.unwrap();
            let pushed = match pc.next_event().await {
                Some(ClientEvent::Broker(b)) => *b,
                other => panic!("{other:?}"),
            };
            if mine.relay.is_some() {
                return (mine, pushed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (a, b) = (theirs.relay.unwrap(), other.relay.unwrap());
    assert_eq!(a.addr, relay_addr);
    assert_eq!(b.addr, relay_addr);
    let t = Duration::from_secs(10);
    let (x, y) = tokio::join!(
        wire::relay::client::join_tcp(a.addr, a.ticket, a.secret, t),
        wire::relay::client::join_tcp(b.addr, b.ticket, b.secret, t)
    );
    let (mut x, mut y) = (x.unwrap(), y.unwrap());
    x.write_all(b"through the standalone relay").await.unwrap();
    let mut buf = [0u8; 28];
    within("read", y.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"through the standalone relay");
    // The relay counts a chunk once it has written it on: the count may trail the read.
    within("the relay's byte count", async {
        while stats.bytes_total.load(Ordering::Relaxed) < 28 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_with_another_key_or_no_shared_key_is_refused() {
    let server = Server::bind(ServerConfig {
        shared_relay_key: Some(TicketKey::random()),
        ..ServerConfig::loopback()
    })
    .await
    .unwrap()
    .spawn();
    // What a relay with a random key hears from `server`.
    let refusal = |server: rendezvous::server::ServerHandle| async move {
        let (stop, stats) = (CancellationToken::new(), RelayStats::default());
        let signaling = server.addrs().signaling.to_string();
        within(
            "refusal",
            announce_once(
                &signaling,
                &mut None,
                &TicketKey::random(),
                7001,
                None,
                &stats,
                &stop,
            ),
        )
        .await
        .unwrap_err()
    };
    let err = refusal(server).await;
    assert!(matches!(err, AnnounceError::Refused(_)), "{err}");
    assert!(err.to_string().contains("--relay-key"), "{err}");
    let err = refusal(rendezvous().await).await;
    assert!(err.to_string().contains("no --relay-key"), "{err}");
}

#[tokio::test]
async fn a_relay_refuses_a_rendezvous_with_another_key_than_its_pin() {
    let key = TicketKey::random();
    let server = Server::bind(ServerConfig {
        shared_relay_key: Some(key.clone()),
        ..ServerConfig::loopback()
    })
    .await
    .unwrap()
    .spawn();
    let (stop, stats) = (CancellationToken::new(), RelayStats::default());
    let signaling = server.addrs().signaling.to_string();
    let mut pin = Some(wire::signal::PublicKey([9; 32]));
    let err = within(
        "refusal",
        announce_once(&signaling, &mut pin, &key, 7001, None, &stats, &stop),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("presented key") && err.to_string().contains("is pinned"),
        "{err}"
    );
    assert_eq!(pin, Some(wire::signal::PublicKey([9; 32])), "the pin stays");
    // Without a pin the first key is learned for the rest of the run.
    let mut pin = None;
    stop.cancel();
    let _ = within(
        "first contact",
        announce_once(&signaling, &mut pin, &key, 7001, None, &stats, &stop),
    )
    .await;
    assert_eq!(pin, Some(server.key()));
}
