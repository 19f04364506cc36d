//! The NAT-lab matrix for UDP punching (`--transport udp`): for every ordered pair of NAT
//! kinds, `peer expose` behind one and `peer reach` behind the other (real processes, real
//! kernel NATs), data flows both ways through `reach`, and the path is the one the pair must
//! get: direct for every pair except random symmetric with any symmetric NAT, which use the
//! relay. Also: two peers behind one NAT, a direct path that dies, and a rendezvous with
//! one IP.

use chuantou_tests::lab_peers::{
    DIES_ROUTERS, RENDEZVOUS, direct_path_dies, must_relay, run_matrix, run_pair, run_pair_via,
    start_rendezvous, start_rendezvous_on,
};
use chuantou_tests::natlab::Lab;
use chuantou_tests::workspace_bin;

#[test]
fn every_pair_of_nat_kinds_connects_directly_or_through_the_relay() {
    run_matrix("udp", "direct-udp", must_relay);
}

#[test]
fn two_peers_behind_one_nat_without_hairpin_connect_over_the_lan() {
    let Some(lab) = Lab::for_test(&["home=port-restricted,hosts=2"]) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    let run = run_pair(&lab, &peer, "home-1", "home-2", "pc", "udp");
    assert!(run.error.is_none(), "{}", run.error.unwrap_or_default());
    let (direct, outcome, path, log) = (run.direct, run.outcome, run.path, run.log);
    assert!(direct && path == "direct-udp", "{outcome}\n{log}");
    // The pair found is the LAN one: the hosts' own addresses, not the router's.
    assert!(
        outcome.contains("remote=198.19.") || log.contains("remote=198.19."),
        "{log}"
    );
}

#[test]
fn when_the_direct_path_dies_new_connections_go_back_to_the_relay() {
    let Some(lab) = Lab::for_test(&DIES_ROUTERS) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    // Router a silently drops all UDP except to and from the rendezvous and relay
    // (198.18.0.0/24): the direct path's keep-alives are lost, it is abandoned, and the
    // session's traffic, new connections' too, continues on the relay.
    direct_path_dies(
        &lab,
        &peer,
        "udp",
        "meta l4proto udp ip saddr != 198.18.0.0/24 ip daddr != 198.18.0.0/24",
    );
}

/// A rendezvous with one IP (the usual VPS) cannot offer RFC 5780's OTHER-ADDRESS; its
/// second STUN port still shows a peer that its mapping changes with the destination, so
/// a random-symmetric peer is known for one and punched with birthday sockets (taken for
/// a cone, it was punched as one, in vain, and stayed on the relay).
#[test]
fn with_a_one_ip_rendezvous_a_random_symmetric_peer_is_recognised_and_goes_direct() {
    let Some(lab) = Lab::for_test(&["pr=port-restricted", "symr=symmetric-random"]) else {
        return;
    };
    let args = [
        "--listen",
        "198.18.0.1:7000",
        "--stun",
        "198.18.0.1:3478",
        "--relay",
        "198.18.0.1:7001",
        "--no-http",
    ];
    let mut server = start_rendezvous_on(&lab, &workspace_bin("rendezvous"), "server", &args);
    let peer = workspace_bin("peer");
    let run = run_pair_via(&lab, &peer, RENDEZVOUS, "pr-1", "symr-1", "oneip", "udp");
    assert!(run.error.is_none(), "{}", run.error.unwrap_or_default());
    let observed = run
        .log
        .lines()
        .find(|l| l.contains("udp mapping observed"))
        .unwrap_or_default();
    assert!(
        observed.contains("mapping=Varies"),
        "the random-symmetric peer saw its mapping vary: {observed}\n--- rendezvous:\n{}",
        server.log()
    );
    assert!(
        run.direct && run.path == "direct-udp",
        "{}\n{}",
        run.outcome,
        run.log
    );
}
