//! IPv6 in the NAT lab (addresses in 2001:2::/48 only): two peers behind stateful IPv6
//! firewalls (no NAT, new inbound dropped) punch a direct UDP path over IPv6 by sending at
//! the same time, as behind port-restricted NATs; and a dual-stack pair (IPv4 NAT plus
//! IPv6 firewall at each end) learns both mappings and ends on IPv6.

use chuantou_tests::lab_peers::{run_pair_via, start_rendezvous_on};
use chuantou_tests::natlab::Lab;
use chuantou_tests::workspace_bin;

use chuantou_tests::lab_peers::EVERY_ADDRESS as DUAL_SERVER;

/// Asserts that `run` went direct over UDP, its punched pair on IPv6 in the lab's prefix.
fn assert_direct_over_ipv6(run: &chuantou_tests::lab_peers::PairRun) {
    assert_direct_to(run, "[2001:2:0:");
}

/// Asserts that `run` went direct over UDP, the other side's punched address starting with
/// `prefix`.
fn assert_direct_to(run: &chuantou_tests::lab_peers::PairRun, prefix: &str) {
    assert!(
        run.direct && run.path == "direct-udp",
        "{}\n{}",
        run.outcome,
        run.log
    );
    assert!(
        punched_remote(&run.log).starts_with(prefix),
        "punched to {prefix}…: {}",
        run.log
    );
}

/// The other side's address in reach's "punched via udp" line.
fn punched_remote(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("punched via udp"))
        .and_then(|l| l.split("remote=").nth(1))
        .map(|r| r.split(' ').next().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

#[test]
fn two_ipv6_peers_behind_stateful_firewalls_punch_direct_over_ipv6() {
    let Some(lab) = Lab::for_test(&["fwa=firewall", "fwb=firewall"]) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous_on(&lab, &workspace_bin("rendezvous"), "server", &DUAL_SERVER);
    let run = run_pair_via(
        &lab,
        &peer,
        "[2001:2::1]:7000",
        "fwa-1",
        "fwb-1",
        "pc6",
        "udp",
    );
    assert!(run.error.is_none(), "{}", run.error.unwrap_or_default());
    assert_direct_over_ipv6(&run);
}

#[test]
fn a_dual_stack_pair_learns_both_mappings_and_prefers_ipv6() {
    let Some(lab) = Lab::for_test(&["da=port-restricted,v6", "db=port-restricted,v6"]) else {
        return;
    };
    let peer = workspace_bin("peer");
    let mut args = DUAL_SERVER.to_vec();
    args.extend(["--advertise", "198.18.0.1,2001:2::1"]);
    let _server = start_rendezvous_on(&lab, &workspace_bin("rendezvous"), "server", &args);
    let run = run_pair_via(
        &lab,
        &peer,
        "198.18.0.1:7000",
        "da-1",
        "db-1",
        "pc46",
        "udp",
    );
    assert!(run.error.is_none(), "{}", run.error.unwrap_or_default());
    assert!(
        run.log
            .contains("udp mapping observed in the other address family"),
        "{}",
        run.log
    );
    assert_direct_over_ipv6(&run);
}

#[test]
fn the_ipv6_firewall_drops_what_was_not_asked_for_and_passes_answers() {
    let Some(lab) = Lab::for_test(&["fwc=firewall"]) else {
        return;
    };
    let inside = lab.host("fwc-1").addr6.expect("an IPv6 address");
    let host = lab.udp("fwc-1", "[::]:0".parse().unwrap()).unwrap();
    let port = host.local_addr().unwrap().port();
    let third = lab.udp("third", "[2001:2::3]:0".parse().unwrap()).unwrap();
    let third_addr = third.local_addr().unwrap();
    for s in [&host, &third] {
        s.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
    }
    let mut buf = [0u8; 64];
    // Unasked: dropped at the firewall.
    third.send_to(b"knock", (inside, port)).unwrap();
    assert!(
        host.recv_from(&mut buf).is_err(),
        "an unsolicited datagram got in"
    );
    // Once the host has sent to the stranger, its answers come in.
    host.send_to(b"hello", third_addr).unwrap();
    let (n, from) = third.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"hello"[..], std::net::IpAddr::V6(inside))
    );
    third.send_to(b"answer", from).unwrap();
    let (n, _) = host.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"answer");
}

#[test]
fn natprobe_reports_ipv6_reachability_with_and_without_ipv4() {
    let Some(lab) = Lab::for_test(&["fwn=firewall", "dsn=port-restricted,v6"]) else {
        return;
    };
    let _server = start_rendezvous_on(&lab, &workspace_bin("rendezvous"), "server", &DUAL_SERVER);
    let probe = |host: &str| -> serde_json::Value {
        let mut cmd = lab.command(host, workspace_bin("natprobe"));
        cmd.args([
            "--server",
            "198.18.0.1:3478",
            "--server6",
            "[2001:2::1]:3478",
            "--json",
        ]);
        cmd.args(["--rto", "100"]);
        let out = cmd.output().unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{host}: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    // Dual stack behind a port-restricted NAT and an IPv6 firewall: both answer, and the
    // IPv6 address the server sees is the host's own.
    let dual = probe("dsn-1");
    let own = lab.host("dsn-1").addr6.unwrap().to_string();
    assert_eq!(dual["ipv6"]["reachable"], true, "{dual}");
    assert_eq!(dual["ipv6"]["translated"], false, "{dual}");
    assert!(
        dual["ipv6"]["public_addr"].as_str().unwrap().contains(&own),
        "{dual}"
    );
    assert!(dual["udp"]["public_addr"].is_string(), "{dual}");
    // IPv6 only: IPv4 is blocked, IPv6 answers (and natprobe exits 0: it measured something).
    let v6only = probe("fwn-1");
    assert_eq!(v6only["udp"]["nat_type"], "udp-blocked", "{v6only}");
    assert_eq!(v6only["ipv6"]["reachable"], true, "{v6only}");
    // A plain responder cannot tell filtering over IPv6, and says why.
    assert!(v6only["ipv6"]["filtering"].is_null(), "{v6only}");
    assert!(v6only["ipv6"]["note"].is_string(), "{v6only}");
    // An RFC 5780 server over IPv6 (2001:2::1 and 2001:2::2) can: behind the stateful
    // firewall, address-and-port-dependent, as a port-restricted cone's.
    let _rfc5780 = start_rendezvous_on(
        &lab,
        &workspace_bin("rendezvous"),
        "server",
        &[
            "--listen",
            "[2001:2::1]:7100",
            "--stun",
            "[2001:2::1]:3480",
            "--alt-ip",
            "2001:2::2",
            "--relay",
            "[2001:2::1]:7101",
            "--no-http",
        ],
    );
    for host in ["fwn-1", "dsn-1"] {
        let out = lab
            .command(host, workspace_bin("natprobe"))
            .args([
                "--server",
                "198.18.0.1:3478",
                "--server6",
                "[2001:2::1]:3480",
            ])
            .args(["--json", "--rto", "100", "--no-port-mapping"])
            .output()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{host}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(
            r["ipv6"]["filtering"], "address-and-port-dependent",
            "{host}: {r}"
        );
        assert_eq!(r["ipv6"]["translated"], false, "{host}: {r}");
    }
}

#[test]
fn a_host_with_native_ipv6_and_carrier_nat_ipv4_reaches_ipv4_only_peers() {
    // A phone on a mobile network: global IPv6, and IPv4 only through the carrier's NAT
    // (random symmetric, as many carrier NATs are). The peers it reaches have IPv4 only.
    // (Real 464XLAT translates that IPv4 into IPv6 to the carrier's NAT64; nftables
    // cannot translate between families, so the lab routes it as carrier NAT over IPv4,
    // which is what the IPv4 peer sees either way.)
    let Some(lab) = Lab::for_test(&[
        "cgn=symmetric-random,v6",
        "home=port-restricted",
        "other=symmetric-random",
    ]) else {
        return;
    };
    let peer = workspace_bin("peer");
    // The IPv4 peers' rendezvous: IPv4 with RFC 5780 (a second address), so the phone
    // learns its carrier NAT is random symmetric.
    let _server = chuantou_tests::lab_peers::start_rendezvous(&lab, &workspace_bin("rendezvous"));
    // Direct where the pair allows it: birthday punching over IPv4 with a port-restricted
    // cone.
    let run = run_pair_via(
        &lab,
        &peer,
        "198.18.0.1:7000",
        "home-1",
        "cgn-1",
        "pc4",
        "udp",
    );
    assert!(run.error.is_none(), "{}", run.error.unwrap_or_default());
    assert_direct_to(&run, "198.18.");
    // The relay otherwise: random symmetric on both sides, no port mapping.
    let run = run_pair_via(
        &lab,
        &peer,
        "198.18.0.1:7000",
        "other-1",
        "cgn-1",
        "pc4r",
        "udp",
    );
    assert!(run.error.is_none(), "{}", run.error.unwrap_or_default());
    assert!(
        !run.direct && run.path == "relay",
        "{}\n{}",
        run.outcome,
        run.log
    );
}
