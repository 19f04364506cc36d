//! Port mapping in the NAT lab: a router with a NAT-PMP/PCP gateway (the harness's
//! responder, real nftables rules) maps the UDP port of the peer behind it, asked by the
//! real client crate; a random-symmetric ↔ random-symmetric pair, which no punch can
//! join otherwise, then goes direct through the mapping, whichever side has it; and the
//! mapping is gone once the peer stops. A short-lived mapping is renewed in time.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use chuantou_tests::lab_peers::{
    Proc, echo, echo_service, start_peer, start_rendezvous, status_path,
};
use chuantou_tests::natlab::{Lab, THIRD_IP};
use chuantou_tests::{TempHome, workspace_bin};

/// The external port in a gateway's nft rule `udp dport EXT dnat ip to IP:PORT`, and the
/// internal port.
fn ports(rule: &str) -> (u16, u16) {
    let ext = rule
        .split("dport ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no external port in {rule:?}"));
    let int = rule
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no internal port in {rule:?}"));
    (ext, int)
}

/// The gateway's mappings once none is left, or what is left after a bounded wait: the
/// removal is a notification the client does not wait for, so the gateway may still be
/// installing it when the client has exited.
fn mappings_once_gone(lab: &Lab, router: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + chuantou_tests::BOUND;
    loop {
        let left = lab.port_mappings(router).unwrap();
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Exposes an echo service on `exposer`, reaches it from `reacher`, with the gateway of
/// `mapped_router` mapping the port of the peer behind it (`mapped_peer` is its log's
/// owner: "expose" or "reach"); checks the pair goes direct, then stops the mapped peer
/// and checks its mapping is gone.
fn mapped_pair(routers: [&str; 2], exposer: &str, reacher: &str, mapped: (&str, &str), name: &str) {
    let (mapped, protocol) = mapped;
    let Some(lab) = Lab::for_test(&routers) else {
        return;
    };
    let peer = workspace_bin("peer");
    let mut server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    let (home_a, home_b) = (TempHome::new(), TempHome::new());
    let service = echo_service(&lab, exposer).to_string();
    let args = ["expose", &service, "--name", name];
    let mut expose = start_peer(&lab, &peer, exposer, &home_a.0, &args, "registered");
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 17274));
    let local_arg = local.to_string();
    let args = ["reach", name, "--local", &local_arg];
    let mut reach = start_peer(&lab, &peer, reacher, &home_b.0, &args, "reaching");
    let router = mapped.split('-').next().unwrap();
    let mapped_proc: &mut Proc = if mapped == exposer {
        &mut expose
    } else {
        &mut reach
    };
    // The mapped peer's log and the rendezvous agree on the mapping before anyone
    // connects (the broker hands out what the rendezvous holds).
    let line = mapped_proc.wait_for(&["port mapped by the gateway"]);
    assert!(line.contains(&format!("({protocol})")), "{line}");
    server.wait_for(&["port mapping offered to peers"]);
    let rules = lab.port_mappings(router).unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    let (ext, _internal) = ports(&rules[0]);
    assert!(
        line.contains(&format!("{}:{ext}", lab.wan(router))),
        "the peer's mapping is the gateway's: {line} / {rules:?}"
    );

    echo(&lab, reacher, local, b"first");
    let verdict = reach.wait_for(&["punched via udp", "staying on the relay"]);
    assert!(
        verdict.contains("punched via udp") && verdict.contains("port mapping"),
        "random ↔ random goes direct through the mapping: {verdict}\n{}",
        reach.log()
    );
    let data: Vec<u8> = (0..256 * 1024u32).map(|k| (k % 251) as u8).collect();
    echo(&lab, reacher, local, &data);
    assert_eq!(
        status_path(&peer, &home_b.0),
        "direct-udp",
        "{}",
        reach.log()
    );

    // Stopped as a service manager stops it, the peer removes its mapping.
    let mapped_proc: &mut Proc = if mapped == exposer {
        &mut expose
    } else {
        &mut reach
    };
    let (log, exited) = mapped_proc.terminate();
    assert!(exited, "the mapped peer did not stop:\n{log}");
    let left = mappings_once_gone(&lab, router);
    assert!(left.is_empty(), "mapping left after exit: {left:?}\n{log}");
    // And the port takes nothing from a stranger any more: a socket on the peer's old
    // port hears nothing that `third` sends to the external port.
    let internal = ports(&rules[0]).1;
    let wan = lab.wan(router);
    let listener = lab
        .inside(mapped, || {
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, internal))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        })
        .unwrap();
    let stranger = lab
        .inside("third", || std::net::UdpSocket::bind((THIRD_IP, 0)))
        .unwrap();
    stranger.send_to(b"anyone?", (wan, ext)).unwrap();
    let mut buf = [0u8; 16];
    assert!(
        listener.recv_from(&mut buf).is_err(),
        "a stranger got in through a removed mapping"
    );
}

#[test]
fn a_pcp_mapping_on_the_exposing_side_joins_a_random_symmetric_pair_and_is_removed_on_exit() {
    mapped_pair(
        ["ma=symmetric-random,map", "rb=symmetric-random"],
        "ma-1",
        "rb-1",
        ("ma-1", "PCP"),
        "mapped-pc",
    );
}

#[test]
fn a_nat_pmp_mapping_on_the_reaching_side_joins_a_random_symmetric_pair_and_is_removed_on_exit() {
    mapped_pair(
        ["ra=symmetric-random", "mb=symmetric-random,map=pmp"],
        "ra-1",
        "mb-1",
        ("mb-1", "NAT-PMP"),
        "mapped-phone",
    );
}

#[test]
fn natprobe_reports_what_the_gateway_offers_and_leaves_no_mapping() {
    let Some(lab) = Lab::for_test(&["pm=port-restricted,map", "nm=port-restricted"]) else {
        return;
    };
    let _server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    let probe = |host: &str| -> serde_json::Value {
        let out = lab
            .command(host, workspace_bin("natprobe"))
            .args(["--server", "198.18.0.1:3478", "--json", "--rto", "100"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{host}: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let mapped = probe("pm-1");
    let pm = &mapped["port_mapping"];
    assert_eq!(pm["gateway"], "198.19.1.1", "{mapped}");
    assert_eq!(
        (&pm["pcp"], &pm["nat_pmp"]),
        (&true.into(), &true.into()),
        "{mapped}"
    );
    assert_eq!(pm["protocol"], "PCP", "{mapped}");
    assert_eq!(pm["public"], true, "{mapped}");
    assert!(
        pm["mapped"].as_str().unwrap().starts_with("198.18.1.1:"),
        "{mapped}"
    );
    // The test mapping was removed before natprobe exited.
    assert_eq!(mappings_once_gone(&lab, "pm"), Vec::<String>::new());
    // A gateway without port mapping: every protocol no, a reason, no mapping.
    let plain = probe("nm-1");
    let pm = &plain["port_mapping"];
    assert_eq!(pm["gateway"], "198.19.2.1", "{plain}");
    assert_eq!(
        (&pm["pcp"], &pm["nat_pmp"]),
        (&false.into(), &false.into()),
        "{plain}"
    );
    assert!(pm["mapped"].is_null() && pm["note"].is_string(), "{plain}");
}

/// A gateway that grants 4 s at most: the peer renews its mapping before it lapses (the
/// client renews at half the lifetime), so the mapping outlives three lifetimes' worth of
/// renewals with the same external port, and it is still removed on exit.
#[test]
fn a_short_lived_mapping_is_renewed_before_it_lapses_and_removed_on_exit() {
    let Some(lab) = Lab::for_test(&["gw=port-restricted,map,maplife=4"]) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    let home = TempHome::new();
    let service = echo_service(&lab, "gw-1").to_string();
    let args = ["expose", &service, "--name", "renewed"];
    let mut expose = start_peer(&lab, &peer, "gw-1", &home.0, &args, "registered");
    expose.wait_for(&["port mapped by the gateway"]);
    let first = lab.port_mappings("gw").unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    // Three renewals take about 6 s, past the 4 s the first grant was good for; the
    // rule must be there, unchanged, throughout.
    let mapped_at = std::time::Instant::now();
    let deadline = mapped_at + chuantou_tests::BOUND;
    loop {
        let (renewed, lapsed) = lab.port_mapping_renewals("gw");
        assert_eq!(lapsed, 0, "a mapping lapsed unrenewed:\n{}", expose.log());
        assert_eq!(
            lab.port_mappings("gw").unwrap(),
            first,
            "the mapping changed:\n{}",
            expose.log()
        );
        if renewed >= 3 {
            println!("{renewed} renewals in {:?}", mapped_at.elapsed());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{renewed} renewals:\n{}",
            expose.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (log, exited) = expose.terminate();
    assert!(exited, "the peer did not stop:\n{log}");
    let left = mappings_once_gone(&lab, "gw");
    assert!(left.is_empty(), "mapping left after exit: {left:?}\n{log}");
    assert_eq!(lab.port_mapping_renewals("gw").1, 0, "removed, not lapsed");
}
