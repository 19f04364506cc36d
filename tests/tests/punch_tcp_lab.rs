//! The NAT-lab matrix for TCP simultaneous open (`--transport tcp`): for every ordered pair
//! of NAT kinds, `peer expose` behind one and `peer reach` behind the other, data both ways
//! through `reach`, and the path each pair must get: direct TCP except where the NATs make
//! it hopeless (random symmetric with any symmetric NAT or with a port-restricted cone),
//! which use the relay. With UDP dropped at one NAT, `--transport auto` ends on direct TCP;
//! when the direct TCP path dies silently, new connections go back to the relay.

use std::net::{Ipv4Addr, SocketAddr};

use chuantou_tests::TempHome;
use chuantou_tests::lab_peers::{
    DIES_ROUTERS, direct_path_dies, echo, echo_service, must_relay_tcp, run_matrix, start_expose,
    start_reach, start_rendezvous, status, status_path,
};
use chuantou_tests::natlab::Lab;
use chuantou_tests::workspace_bin;

#[test]
fn every_pair_of_nat_kinds_connects_over_direct_tcp_or_through_the_relay() {
    run_matrix("tcp", "direct-tcp", must_relay_tcp);
}

#[test]
fn with_udp_dropped_at_one_nat_auto_ends_on_direct_tcp() {
    let Some(lab) = Lab::for_test(&["a=port-restricted", "b=port-restricted"]) else {
        return;
    };
    // Router a forwards no UDP at all, from the start.
    lab.nft(
        "a",
        "table ip noudp {\n  chain f { type filter hook forward priority filter - 10; \
         policy accept;\n    meta l4proto udp drop\n  }\n}\n",
    )
    .unwrap();
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    let (home_a, home_b) = (TempHome::new(), TempHome::new());
    let service = echo_service(&lab, "a-1");
    let mut expose = start_expose(&lab, &peer, "a-1", &home_a.0, service, "pc", "auto");
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 17274));
    let mut reach = start_reach(&lab, &peer, "b-1", &home_b.0, "pc", local, "auto");
    echo(&lab, "b-1", local, b"first");
    let up = reach.wait_for(&["direct tcp path up", "no direct tcp path"]);
    assert!(up.contains("direct tcp path up"), "{up}\n{}", reach.log());
    let data: Vec<u8> = (0..256 * 1024u32).map(|k| (k % 253) as u8).collect();
    echo(&lab, "b-1", local, &data);
    let line = reach.wait_for(&["connection via the"]);
    let line = if line.contains("direct tcp") {
        line
    } else {
        // The first connection went through the relay before the punch was done.
        reach.wait_for(&["connection via the"])
    };
    assert!(
        line.contains("path=\"direct-tcp\""),
        "{line}\n{}",
        reach.log()
    );
    assert_eq!(status_path(&peer, &home_b.0), "direct-tcp");
    // The relay is there too, over TCP (UDP is blocked), standing by.
    if !reach.log().contains("relay over tcp path up") {
        reach.wait_for(&["relay over tcp path up"]);
    }
    let s = status(&peer, &home_b.0);
    let paths = s[0]["paths"].as_array().cloned().unwrap_or_default();
    let has = |kind: &str, state: &str| {
        paths
            .iter()
            .any(|p| p["kind"] == kind && p["state"] == state && p["bytes_in"].as_u64() > Some(0))
    };
    assert!(
        has("direct-tcp", "active") && has("relay-tcp", "standby"),
        "{s:#}"
    );
    // The UDP side never had a chance: the exposing peer saw no STUN answer over UDP.
    let log = expose.finish();
    assert!(log.contains("no STUN answer over UDP"), "{log}");
}

#[test]
fn when_the_direct_tcp_path_dies_new_connections_go_back_to_the_relay() {
    let Some(lab) = Lab::for_test(&DIES_ROUTERS) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    // Router a silently drops every TCP packet except those to and from the rendezvous
    // and relay (198.18.0.0/24): the punched connection's pings go unanswered, the tunnel
    // closes itself, and the next connection takes the relay.
    direct_path_dies(
        &lab,
        &peer,
        "tcp",
        "meta l4proto tcp ip saddr != 198.18.0.0/24 ip daddr != 198.18.0.0/24",
    );
}
