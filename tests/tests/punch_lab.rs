//! The NAT-lab matrix for UDP punching (`--transport udp`): for every ordered pair of NAT
//! kinds, `peer expose` behind one and `peer reach` behind the other (real processes, real
//! kernel NATs), data flows both ways through `reach`, and the path is the one the pair must
//! get: direct for every pair except random symmetric with any symmetric NAT, which use the
//! relay. Also: two peers behind one NAT, and a direct path that dies.

use chuantou_tests::lab_peers::{
    DIES_ROUTERS, direct_path_dies, must_relay, run_matrix, run_pair, start_rendezvous,
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
