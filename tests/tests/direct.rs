//! The direct path on this machine: after the first connection (carried by the relay
//! while the punch runs), new connections take the punched QUIC path, `peer status`
//! says `direct-udp` (or `direct-tcp` with `--transport tcp`), and a transfer on it does not
//! touch the relay.

use chuantou_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Sends `data` through `local` to the echo service and returns what came back.
async fn echo(local: std::net::SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(local).await.unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(send, recv);
    n.unwrap();
    back
}

/// What the standby relay path may carry while a transfer runs on a direct path: its
/// keep-alives and, once per path, path MTU discovery, whose probes climb to 6 KiB
/// datagrams (`peer::defaults::MAX_UDP_PAYLOAD`): about 90 KB on loopback.
const STANDBY_RELAY_BYTES: u64 = 160 * 1024;

/// 4 MiB echoed through `local` on `path`, checked by SHA-256: the relay carries none of it
/// (pings on its control stream are all it may carry meanwhile), and status counts it.
async fn direct_transfer(
    server: &rendezvous::server::ServerHandle,
    local: std::net::SocketAddr,
    board: &peer::status::Board,
    path: &str,
) {
    let before = relay_bytes(server).await;
    let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let back = within("4 MiB echo", echo(local, &data)).await;
    assert_eq!(Sha256::digest(&back), Sha256::digest(&data));
    let after = relay_bytes(server).await;
    assert!(
        after - before < STANDBY_RELAY_BYTES,
        "the relay carried {} bytes of a direct transfer",
        after - before
    );
    let status = board.snapshot();
    assert_eq!(status[0].path, path, "{status:?}");
    assert!(status[0].bytes_out >= data.len() as u64, "{status:?}");
}

/// A UDP flow through `local` whose first echo came back: it brings the tunnels up (a
/// datagram may be lost on the way, so it is sent again until one returns).
async fn udp_first_echo(local: std::net::SocketAddr) -> tokio::net::UdpSocket {
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(local).await.unwrap();
    let mut buf = vec![0u8; 64];
    within("first echo", async {
        loop {
            client.send(b"ping").await.unwrap();
            let wait = std::time::Duration::from_millis(200);
            if let Ok(Ok(n)) = tokio::time::timeout(wait, client.recv(&mut buf)).await {
                assert_eq!(&buf[..n], b"ping");
                return;
            }
        }
    })
    .await;
    client
}

/// Datagrams from 1 byte to 60,000 through `flow`; each comes back whole.
async fn udp_echo_sizes(flow: &tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    for size in [1usize, 100, 1200, 9000, 60_000] {
        let d: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        flow.send(&d).await.unwrap();
        let n = within("echo", flow.recv(&mut buf)).await.unwrap();
        assert_eq!(&buf[..n], &d[..], "{size} bytes");
    }
}

/// The relay's byte counter, from the rendezvous's Prometheus metrics.
async fn relay_bytes(server: &rendezvous::server::ServerHandle) -> u64 {
    relay_metric(server, "chuantou_relay_bytes_total").await
}

/// One of the relay's counters (summed over its labels).
async fn relay_metric(server: &rendezvous::server::ServerHandle, name: &str) -> u64 {
    let http = server.addrs().http.unwrap();
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_take_the_punched_path_and_skip_the_relay() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let service = echo_service().await;
    let opts = Default::default();
    let (_homes, local, board) = expose_and_reach(&server, "pc-home", service, opts, &stop).await;

    // The first connection brings the tunnels up.
    assert_eq!(echo(local, b"hello").await, b"hello");
    within("the direct path", board.wait_path("pc-home", "direct-udp")).await;

    direct_transfer(&server, local, &board, "direct-udp").await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_transport_tcp_new_connections_take_the_punched_tcp_path() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let service = echo_service().await;
    let transport = Transport::Tcp;
    let opts = (
        ExposeOpts {
            transport,
            ..ExposeOpts::default()
        },
        ReachOpts {
            transport,
            ..ReachOpts::default()
        },
    );
    let (_homes, local, board) = expose_and_reach(&server, "pc-home", service, opts, &stop).await;
    assert_eq!(echo(local, b"hello").await, b"hello");
    within(
        "the direct tcp path",
        board.wait_path("pc-home", "direct-tcp"),
    )
    .await;

    direct_transfer(&server, local, &board, "direct-tcp").await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_relay_connections_wait_for_a_direct_path_and_the_relay_carries_nothing() {
    for transport in [Transport::Tcp, Transport::Auto] {
        let server = rendezvous().await;
        let stop = CancellationToken::new();
        let service = echo_service().await;
        let opts = (
            ExposeOpts {
                transport,
                no_relay: true,
                ..ExposeOpts::default()
            },
            ReachOpts {
                transport,
                no_relay: true,
                ..ReachOpts::default()
            },
        );
        let (_homes, local, board) =
            expose_and_reach(&server, "pc-home", service, opts, &stop).await;
        // The very first connection waits for the punch instead of taking the relay.
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 3 % 251) as u8).collect();
        let back = within("1 MiB echo", echo(local, &data)).await;
        assert_eq!(Sha256::digest(&back), Sha256::digest(&data));
        let want = if transport == Transport::Tcp {
            "direct-tcp"
        } else {
            "direct-udp"
        };
        within("the direct path", board.wait_path("pc-home", want)).await;
        assert_eq!(relay_bytes(&server).await, 0, "{transport:?}");
        assert_eq!(
            relay_metric(&server, "chuantou_relay_sessions_total").await,
            0,
            "{transport:?}"
        );
        stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_take_the_direct_path_as_quic_datagrams() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let service = udp_echo_service().await;
    let opts = (
        ExposeOpts {
            udp: true,
            ..ExposeOpts::default()
        },
        ReachOpts {
            udp: true,
            ..ReachOpts::default()
        },
    );
    let (_homes, local, board) = expose_and_reach(&server, "game", service, opts, &stop).await;
    let client = udp_first_echo(local).await;
    within("the direct path", board.wait_path("game", "direct-udp")).await;
    let before = relay_bytes(&server).await;
    // Small datagrams as QUIC datagrams, a large one on the fallback stream; each comes
    // back whole. Datagrams may be lost on a real path, not on loopback.
    // Four rounds (about 560 KB both ways), well past what the standby relay may carry.
    for _ in 0..4 {
        udp_echo_sizes(&client).await;
    }
    let after = relay_bytes(&server).await;
    assert!(
        after - before < STANDBY_RELAY_BYTES,
        "the relay carried {}",
        after - before
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_transport_tcp_new_udp_flows_take_the_direct_tcp_tunnel() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let service = udp_echo_service().await;
    let transport = Transport::Tcp;
    let opts = (
        ExposeOpts {
            udp: true,
            transport,
            ..ExposeOpts::default()
        },
        ReachOpts {
            udp: true,
            transport,
            ..ReachOpts::default()
        },
    );
    let (_homes, local, board) = expose_and_reach(&server, "game", service, opts, &stop).await;
    let _first = udp_first_echo(local).await;
    within("the direct tcp path", board.wait_path("game", "direct-tcp")).await;
    // A new flow (another source port) is carried by the direct TCP tunnel: a stream of
    // length-framed datagrams, boundaries kept, nothing through the relay.
    let before = relay_bytes(&server).await;
    let flow = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    flow.connect(local).await.unwrap();
    // Four rounds (about 560 KB both ways), well past what the standby relay may carry.
    for _ in 0..4 {
        udp_echo_sizes(&flow).await;
    }
    let after = relay_bytes(&server).await;
    assert!(
        after - before < STANDBY_RELAY_BYTES,
        "the relay carried {} bytes of a direct flow",
        after - before
    );
    stop.cancel();
}

/// A relay that refuses every session (at its limit) costs nothing but the refusal: the
/// first connection is carried over the punched path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_relay_refuses_the_session_runs_on_the_direct_path() {
    let mut config = rendezvous::server::ServerConfig::loopback();
    if let Some(relay) = config.relay.as_mut() {
        relay.limits.max_sessions = 0;
    }
    let server = rendezvous::server::Server::bind(config)
        .await
        .unwrap()
        .spawn();
    let stop = CancellationToken::new();
    let service = echo_service().await;
    let opts = Default::default();
    let (_homes, local, board) = expose_and_reach(&server, "pc-home", service, opts, &stop).await;
    assert_eq!(within("first echo", echo(local, b"hello")).await, b"hello");
    within("the direct path", board.wait_path("pc-home", "direct-udp")).await;
    assert!(relay_metric(&server, "chuantou_relay_refused_total").await > 0);
    assert_eq!(
        relay_metric(&server, "chuantou_relay_sessions_total").await,
        0
    );
    direct_transfer(&server, local, &board, "direct-udp").await;
    stop.cancel();
}
