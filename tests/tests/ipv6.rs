//! IPv6 on loopback: a rendezvous on every address takes IPv4 and IPv6 peers on the same
//! sockets (signaling, STUN, relay), two peers that reach it over IPv6 punch a direct UDP
//! path over IPv6, and, told its address in each family, it lets dual-stack peers learn
//! both mappings and prefer IPv6. Skipped, saying so, on a host without IPv6.

use std::net::SocketAddr;

use chuantou_tests::*;
use rendezvous::server::{ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A rendezvous whose every socket is on every address (both families, one socket each),
/// on ephemeral ports, advertising `advertise`; `None` without IPv6 here.
async fn dual_rendezvous(advertise: &[&str]) -> Option<ServerHandle> {
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
    config.advertise = advertise.iter().map(|ip| ip.parse().unwrap()).collect();
    Some(rendezvous_with(config).await)
}

/// An echo service exposed as `name` by a peer that reaches the rendezvous at `expose_ip`,
/// reached by one that reaches it at `reach_ip`, one echo through it done.
async fn pair(
    server: &ServerHandle,
    name: &str,
    (expose_ip, reach_ip): (&str, &str),
    stop: &CancellationToken,
) -> ((TempHome, TempHome), SocketAddr, peer::status::Board) {
    let port = server.addrs().signaling.port();
    let at = |ip: &str| Some(SocketAddr::new(ip.parse().unwrap(), port));
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    let opts = ExposeOpts {
        via: at(expose_ip),
        ..ExposeOpts::default()
    };
    expose_proto(server, &pc, name, echo, opts, stop);
    online(server, name).await;
    let reach = ReachOpts {
        via: at(reach_ip),
        ..ReachOpts::default()
    };
    let (local, board) = reach_board(server, &phone, name, reach, stop)
        .await
        .unwrap();
    echo_round(local).await;
    ((pc, phone), local, board)
}

async fn echo_round(local: SocketAddr) {
    let mut c = tokio::net::TcpStream::connect(local).await.unwrap();
    let data = vec![9u8; 100_000];
    c.write_all(&data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    within("echo", c.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, data);
}

/// The direct UDP path's other end, once there is one.
async fn direct_remote(board: &peer::status::Board, name: &str) -> SocketAddr {
    within("a direct path", board.wait_path(name, "direct-udp")).await;
    let s = board.snapshot();
    let direct = s[0].paths.iter().find(|p| p.kind == "direct-udp").unwrap();
    direct.remote.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rendezvous_serves_an_ipv6_peer_and_an_ipv4_peer() {
    let Some(server) = dual_rendezvous(&[]).await else {
        return;
    };
    let bound = server.addrs().signaling;
    assert!(bound.is_ipv6(), "bound dual-stack: {bound}");
    let stop = CancellationToken::new();
    let (_homes, _, board) = pair(&server, "pc6", ("::1", "127.0.0.1"), &stop).await;
    // The two have no address family in common for a direct path: the relay carries them,
    // each half on its own family.
    let s = board.snapshot();
    assert_eq!(s[0].path, "relay", "{s:?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ipv6_peers_punch_a_direct_udp_path_over_ipv6() {
    let Some(server) = dual_rendezvous(&[]).await else {
        return;
    };
    let stop = CancellationToken::new();
    let (_homes, local, board) = pair(&server, "pc6", ("::1", "::1"), &stop).await;
    let remote = direct_remote(&board, "pc6").await;
    assert!(remote.is_ipv6() && remote.ip().is_loopback(), "{remote}");
    echo_round(local).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_peers_learn_both_mappings_and_prefer_the_ipv6_direct_path() {
    // Told its address in each family (as `--advertise 203.0.113.1,2001:db8::1` would),
    // the server lets peers that reach it over IPv4 learn their IPv6 mapping too.
    let Some(server) = dual_rendezvous(&["127.0.0.1", "::1"]).await else {
        return;
    };
    let stop = CancellationToken::new();
    let (_homes, local, board) = pair(&server, "pc46", ("127.0.0.1", "127.0.0.1"), &stop).await;
    let remote = direct_remote(&board, "pc46").await;
    assert!(
        remote.is_ipv6(),
        "both families punched, IPv6 preferred: {remote}"
    );
    echo_round(local).await;
    stop.cancel();
}
