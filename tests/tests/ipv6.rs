//! IPv6 on loopback: a rendezvous on every address takes IPv4 and IPv6 peers on the same
//! sockets (signaling, STUN, relay), and two peers that reach it over IPv6 punch a direct
//! UDP path over IPv6. Skipped, saying so, on a host without IPv6.

use std::net::SocketAddr;

use chuantou_tests::*;
use rendezvous::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A rendezvous whose every socket is on every address (both families, one socket each),
/// on ephemeral ports; `None` without IPv6 here.
async fn dual_rendezvous() -> Option<rendezvous::server::ServerHandle> {
    if !wire::dual::host_has_ipv6() || std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this host has no IPv6 loopback");
        return None;
    }
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let mut config = ServerConfig::loopback();
    config.listen = any;
    config.stun = Some(any);
    if let Some(r) = &mut config.relay {
        r.listen = any;
    }
    Some(rendezvous_with(config).await)
}

fn at(ip: &str, port: u16) -> Option<SocketAddr> {
    Some(SocketAddr::new(ip.parse().unwrap(), port))
}

async fn echo_round(local: SocketAddr) {
    let mut c = tokio::net::TcpStream::connect(local).await.unwrap();
    let data = vec![9u8; 100_000];
    c.write_all(&data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    within("echo", c.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rendezvous_serves_an_ipv6_peer_and_an_ipv4_peer() {
    let Some(server) = dual_rendezvous().await else {
        return;
    };
    let port = server.addrs().signaling.port();
    assert!(
        server.addrs().signaling.is_ipv6(),
        "bound dual-stack: {}",
        server.addrs().signaling
    );
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    let opts = ExposeOpts {
        via: at("::1", port),
        ..ExposeOpts::default()
    };
    expose_proto(&server, &pc, "pc6", echo, opts, &stop);
    online(&server, "pc6").await;
    let reach = ReachOpts {
        via: at("127.0.0.1", port),
        ..ReachOpts::default()
    };
    let (local, board) = reach_board(&server, &phone, "pc6", reach, &stop)
        .await
        .unwrap();
    echo_round(local).await;
    // The two have no address family in common for a direct path: the relay carries them,
    // each half on its own family.
    let s = board.snapshot();
    assert_eq!(s[0].path, "relay", "{s:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ipv6_peers_punch_a_direct_udp_path_over_ipv6() {
    let Some(server) = dual_rendezvous().await else {
        return;
    };
    let port = server.addrs().signaling.port();
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    let opts = ExposeOpts {
        via: at("::1", port),
        ..ExposeOpts::default()
    };
    expose_proto(&server, &pc, "pc6", echo, opts, &stop);
    online(&server, "pc6").await;
    let reach = ReachOpts {
        via: at("::1", port),
        ..ReachOpts::default()
    };
    let (local, board) = reach_board(&server, &phone, "pc6", reach, &stop)
        .await
        .unwrap();
    echo_round(local).await;
    within("a direct path", board.wait_path("pc6", "direct-udp")).await;
    let s = board.snapshot();
    let direct = s[0].paths.iter().find(|p| p.kind == "direct-udp").unwrap();
    let remote: SocketAddr = direct.remote.parse().unwrap();
    assert!(remote.is_ipv6() && remote.ip().is_loopback(), "{direct:?}");
    echo_round(local).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_peers_learn_both_mappings_and_prefer_the_ipv6_direct_path() {
    let Some(_) = dual_rendezvous().await else {
        return;
    };
    // The same server, told its address in each family (as `--advertise 203.0.113.1,
    // 2001:db8::1` would): peers that reach it over IPv4 learn their IPv6 mapping too.
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let mut config = ServerConfig::loopback();
    config.listen = any;
    config.stun = Some(any);
    if let Some(r) = &mut config.relay {
        r.listen = any;
    }
    config.advertise = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    let server = rendezvous_with(config).await;
    let port = server.addrs().signaling.port();
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    let opts = ExposeOpts {
        via: at("127.0.0.1", port),
        ..ExposeOpts::default()
    };
    expose_proto(&server, &pc, "pc46", echo, opts, &stop);
    online(&server, "pc46").await;
    let reach = ReachOpts {
        via: at("127.0.0.1", port),
        ..ReachOpts::default()
    };
    let (local, board) = reach_board(&server, &phone, "pc46", reach, &stop)
        .await
        .unwrap();
    echo_round(local).await;
    within("a direct path", board.wait_path("pc46", "direct-udp")).await;
    let s = board.snapshot();
    let direct = s[0].paths.iter().find(|p| p.kind == "direct-udp").unwrap();
    let remote: SocketAddr = direct.remote.parse().unwrap();
    assert!(
        remote.is_ipv6(),
        "both families punched, IPv6 preferred: {s:?}"
    );
    echo_round(local).await;
    stop.cancel();
}
