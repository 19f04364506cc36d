//! Faults: the rendezvous (and with it the embedded relay) dies in the middle of a
//! transfer. Local connections must end cleanly, not hang; once a rendezvous is back on
//! the same address, `expose` re-registers by itself and the next `reach` connection gets
//! a new tunnel through a new broker exchange.

use std::time::{Duration, Instant};

use chuantou_tests::*;
use rendezvous::server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

async fn echo_once(local: std::net::SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(local).await?;
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await?;
    Ok(back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_dies_mid_transfer_then_a_restarted_rendezvous_serves_again() {
    // A restart keeps the server's identity (it lives in the state directory), so the
    // peers' pins still hold.
    chuantou_tests::logs();
    let identity = ed25519_dalek::SigningKey::from_bytes(&[11; 32]);
    let first = Server::bind(ServerConfig {
        identity: identity.clone(),
        ..ServerConfig::loopback()
    })
    .await
    .unwrap()
    .spawn();
    let addrs = first.addrs();
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    // Relay only: a punched path would rightly outlive the rendezvous, and this is about
    // the relay going away.
    let relay_only = Transport::Relay;
    expose_proto(
        &first,
        &pc,
        "pc-home",
        echo,
        ExposeOpts {
            transport: relay_only,
            ..ExposeOpts::default()
        },
        &stop,
    );
    online(&first, "pc-home").await;
    let opts = ReachOpts {
        transport: relay_only,
        ..ReachOpts::default()
    };
    let (local, _) = reach_board(&first, &phone, "pc-home", opts, &stop)
        .await
        .unwrap();
    assert_eq!(echo_once(local, b"before").await.unwrap(), b"before");

    // A transfer in flight when the relay goes away.
    let mut busy = TcpStream::connect(local).await.unwrap();
    busy.write_all(&[1u8; 100_000]).await.unwrap();
    let mut buf = vec![0u8; 100_000];
    busy.read_exact(&mut buf).await.unwrap();
    within("first rendezvous stops", first.shutdown()).await;
    // The local connection ends (EOF or reset) instead of hanging.
    let mut rest = Vec::new();
    let _ = within("in-flight connection ends", busy.read_to_end(&mut rest)).await;

    // A new rendezvous on the same addresses.
    let mut config = ServerConfig {
        identity,
        ..ServerConfig::loopback()
    };
    config.listen = addrs.signaling;
    config.relay = config.relay.map(|mut r| {
        r.listen = addrs.relay.expect("relay address");
        r
    });
    let second = Server::bind(config)
        .await
        .expect("rebind the same ports")
        .spawn();
    let back_at = Instant::now();
    online(&second, "pc-home").await;
    // Reach needs no restart: the next connection brokers a new tunnel.
    let got = within("reach works again", async {
        loop {
            match echo_once(local, b"after").await {
                Ok(v) => return v,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert_eq!(got, b"after");
    // Well within two heartbeat intervals (30 s), as users are promised.
    assert!(back_at.elapsed() < rendezvous::defaults::HEARTBEAT_INTERVAL * 2);
    stop.cancel();
}
