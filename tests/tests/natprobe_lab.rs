//! natprobe in the NAT lab: behind each router kind it names exactly the NAT that was
//! built, against our rendezvous (`--alt-ip`) and against coturn with two IPs alike; it
//! finds a short mapping lifetime; and with UDP dropped it says so, within bounded time.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chuantou_tests::natlab::{EVERY_KIND_ROUTERS, Lab, SERVER_ALT_IP, SERVER_IP};
use chuantou_tests::workspace_bin;
use serde_json::Value;

/// Our rendezvous in the lab: STUN on 198.18.0.1:3478, RFC 5780 with 198.18.0.2:3479.
const OURS: u16 = 3478;
/// coturn in the lab: 198.18.0.1:4478, alternate port 4479.
const COTURN: u16 = 4478;

/// Starts our STUN server and coturn in the lab; the returned state directory (of our
/// server) lives as long as it is held.
fn start_servers(lab: &Lab) -> chuantou_tests::TempHome {
    let rendezvous = workspace_bin("rendezvous");
    let state = chuantou_tests::TempHome::new();
    let mut cmd = lab.command("server", &rendezvous);
    cmd.arg("--state").arg(&state.0);
    cmd.args(["--listen", "198.18.0.1:7000", "--stun"])
        .arg(format!("{SERVER_IP}:{OURS}"))
        .args([
            "--alt-ip",
            &SERVER_ALT_IP.to_string(),
            "--no-http",
            "--no-relay",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(cmd).unwrap();
    let pidfile = std::env::temp_dir().join(format!("natprobe-lab-{}.pid", std::process::id()));
    let mut cmd = lab.command("server", "turnserver");
    cmd.args([
        "-n",
        "--no-cli",
        "--stun-only",
        "--no-auth",
        "--no-tls",
        "--no-dtls",
        "--listening-ip",
        &SERVER_IP.to_string(),
        "--listening-ip",
        &SERVER_ALT_IP.to_string(),
        "--listening-port",
        &COTURN.to_string(),
        "--alt-listening-port",
        &(COTURN + 1).to_string(),
        "--pidfile",
    ])
    .arg(&pidfile)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    lab.spawn(cmd)
        .expect("turnserver (coturn) is not installed: run scripts/test");
    for port in [OURS, COTURN] {
        await_stun(lab, SocketAddr::from((SERVER_IP, port)));
        await_stun(lab, SocketAddr::from((SERVER_ALT_IP, port + 1)));
    }
    state
}

/// Waits until a STUN server answers (asking again every 100 ms, as a client would).
fn await_stun(lab: &Lab, server: SocketAddr) {
    let sock = lab
        .udp("third", SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let req = wire::stun::binding_request(None, None).unwrap();
    let deadline = Instant::now() + chuantou_tests::BOUND;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&req.bytes, server).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if wire::stun::parse_response(&buf[..n], &req.tid, None).is_ok() {
                return;
            }
        }
    }
    panic!("no STUN server at {server}");
}

/// Starts natprobe on `host` with `args` (its JSON report is read by [`report`]).
fn natprobe(lab: &Lab, natprobe: &Path, host: &str, args: &[String]) -> std::process::Child {
    lab.command(host, natprobe)
        .args(args)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(child: std::process::Child, what: &str) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what}: natprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn natprobe_names_every_router_kind_like_coturn_does() {
    let Some(lab) = Lab::for_test(&EVERY_KIND_ROUTERS) else {
        return;
    };
    let _state = start_servers(&lab);
    let bin = workspace_bin("natprobe");
    // (host, nat_type, mapping, filtering, port_allocation, hairpin)
    let ei = "endpoint-independent";
    let ad = "address-dependent";
    let apd = "address-and-port-dependent";
    let cases = [
        ("pub-1", "open", ei, ei, "preserved", true),
        ("fc-1", "full-cone", ei, ei, "preserved", false),
        ("ar-1", "restricted-cone", ei, ad, "preserved", false),
        ("pr-1", "port-restricted-cone", ei, apd, "preserved", true),
        ("pr0-1", "port-restricted-cone", ei, apd, "preserved", false),
        ("symr-1", "symmetric", apd, apd, "random", false),
        ("syms-1", "symmetric", apd, apd, "sequential", false),
    ];
    // Each host probes our rendezvous, then coturn (one at a time per host, so the
    // sequential NAT's counter sees one prober); hosts run side by side.
    let runs: Vec<_> = cases
        .iter()
        .map(|c| {
            let host = c.0;
            let lab = &lab;
            let bin = bin.clone();
            (c, move || {
                [OURS, COTURN].map(|port| {
                    let args = vec![
                        "--server".to_string(),
                        format!("{SERVER_IP}:{port}"),
                        "--tcp".into(),
                    ];
                    (port, report(natprobe(lab, &bin, host, &args), host))
                })
            })
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = runs.into_iter().map(|(c, run)| (c, s.spawn(run))).collect();
        for (&(host, nat_type, mapping, filtering, alloc, hairpin), h) in handles {
            for (port, r) in h.join().unwrap() {
                let server = if port == OURS { "rendezvous" } else { "coturn" };
                let u = &r["udp"];
                let what = format!("{host} against {server}: {r}");
                assert_eq!(u["nat_type"], nat_type, "{what}");
                assert_eq!(u["mapping"], mapping, "{what}");
                assert_eq!(u["filtering"], filtering, "{what}");
                assert_eq!(u["port_allocation"], alloc, "{what}");
                assert_eq!(u["hairpin"], hairpin, "{what}");
                if host == "syms-1" {
                    assert_eq!(u["port_delta"], 3, "{what}");
                    assert_eq!(r["tcp"]["port_delta"], 3, "{what}");
                }
                assert_eq!(r["tcp"]["mapping"], mapping, "{what}: TCP");
                assert_eq!(r["tcp"]["port_allocation"], alloc, "{what}: TCP");
                if host != "pub-1" {
                    let router = host.split('-').next().unwrap();
                    let public: SocketAddr = u["public_addr"].as_str().unwrap().parse().unwrap();
                    assert_eq!(public.ip(), lab.wan(router), "{what}");
                }
                let direct = r["direct"].as_object().unwrap();
                assert_eq!(direct.len(), 6, "{what}");
            }
        }
    });
}

#[test]
fn natprobe_finds_a_five_second_mapping_lifetime() {
    let Some(lab) = Lab::for_test(&["short=port-restricted,timeout=5"]) else {
        return;
    };
    let _state = start_servers(&lab);
    let bin = workspace_bin("natprobe");
    // Both servers at once: the search takes about as long as the lifetime.
    let runs = [OURS, COTURN].map(|port| {
        let args = vec![
            "--server".to_string(),
            format!("{SERVER_IP}:{port}"),
            "--lifetime".into(),
            "--lifetime-max".into(),
            "20".into(),
        ];
        (port, natprobe(&lab, &bin, "short-1", &args))
    });
    for (port, child) in runs {
        let r = report(child, "lifetime");
        let life = r["udp"]["mapping_lifetime_s"]
            .as_f64()
            .unwrap_or_else(|| panic!("no lifetime against port {port}: {r}"));
        assert!(
            (4.0..=6.0).contains(&life),
            "lifetime {life} s against {port}: {r}"
        );
    }
}

#[test]
fn natprobe_says_udp_is_blocked_and_still_sees_tcp() {
    let Some(lab) = Lab::for_test(&["noudp=port-restricted"]) else {
        return;
    };
    lab.nft(
        "noudp",
        "table ip block {\n  chain forward_udp { type filter hook forward priority filter - 10; \
         policy accept;\n    meta l4proto udp drop\n  }\n}\n",
    )
    .unwrap();
    // Readiness is checked from `third`, whose UDP is not blocked.
    let _state = start_servers(&lab);
    let bin = workspace_bin("natprobe");
    let args = vec![
        "--server".to_string(),
        format!("{SERVER_IP}:{OURS}"),
        "--tcp".into(),
    ];
    let started = Instant::now();
    let r = report(natprobe(&lab, &bin, "noudp-1", &args), "udp blocked");
    eprintln!("verdict after {:?}", started.elapsed());
    assert_eq!(r["udp"]["nat_type"], "udp-blocked", "{r}");
    assert_eq!(r["udp"]["mapping"], Value::Null, "{r}");
    assert!(
        r["notes"][0].as_str().unwrap().contains("UDP is blocked"),
        "{r}"
    );
    assert_eq!(r["tcp"]["mapping"], "endpoint-independent", "{r}");
    assert!(r["tcp"]["public_addr"].is_string(), "{r}");
    assert_eq!(r["direct"]["open"], "unlikely", "{r}");
}

#[test]
fn two_plain_servers_tell_whether_the_mapping_varies() {
    let Some(lab) = Lab::for_test(&["fc=full-cone", "syms=symmetric-sequential"]) else {
        return;
    };
    // Two plain STUN servers (no --alt-ip, so no OTHER-ADDRESS), one per server IP.
    let rendezvous = workspace_bin("rendezvous");
    let states = [
        chuantou_tests::TempHome::new(),
        chuantou_tests::TempHome::new(),
    ];
    for (i, ip) in [SERVER_IP, SERVER_ALT_IP].into_iter().enumerate() {
        let mut cmd = lab.command("server", &rendezvous);
        cmd.arg("--state").arg(&states[i].0);
        cmd.args(["--listen", &format!("{ip}:{}", 7000 + i), "--stun"])
            .arg(format!("{ip}:5000"))
            .args(["--no-http", "--no-relay"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        lab.spawn(cmd).unwrap();
        await_stun(&lab, SocketAddr::from((ip, 5000)));
    }
    let bin = workspace_bin("natprobe");
    let args = vec![
        "--server".to_string(),
        format!("{SERVER_IP}:5000"),
        "--server".into(),
        format!("{SERVER_ALT_IP}:5000"),
    ];
    let cone = report(natprobe(&lab, &bin, "fc-1", &args), "fc-1");
    assert_eq!(cone["udp"]["mapping"], "endpoint-independent", "{cone}");
    assert_eq!(cone["udp"]["filtering"], Value::Null, "{cone}");
    assert_eq!(cone["udp"]["nat_type"], Value::Null, "{cone}");
    let sym = report(natprobe(&lab, &bin, "syms-1", &args), "syms-1");
    assert_eq!(sym["udp"]["nat_type"], "symmetric", "{sym}");
    assert_eq!(sym["udp"]["mapping"], Value::Null, "{sym}");
    assert!(
        sym["notes"].to_string().contains("varies by destination"),
        "{sym}"
    );
}

#[test]
fn one_plain_rendezvous_tells_a_symmetric_nat_by_its_second_port() {
    let Some(lab) = Lab::for_test(&["fc=full-cone", "syms=symmetric-sequential"]) else {
        return;
    };
    // One rendezvous on one IP: no OTHER-ADDRESS, but its STUN answers on port + 1 too.
    let state = chuantou_tests::TempHome::new();
    let mut cmd = lab.command("server", workspace_bin("rendezvous"));
    cmd.arg("--state").arg(&state.0);
    cmd.args(["--listen", &format!("{SERVER_IP}:7000"), "--stun"])
        .arg(format!("{SERVER_IP}:5000"))
        .args(["--no-http", "--no-relay"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(cmd).unwrap();
    await_stun(&lab, SocketAddr::from((SERVER_IP, 5000)));
    await_stun(&lab, SocketAddr::from((SERVER_IP, 5001)));
    let bin = workspace_bin("natprobe");
    let args = vec!["--server".to_string(), format!("{SERVER_IP}:5000")];
    let sym = report(natprobe(&lab, &bin, "syms-1", &args), "syms-1");
    assert_eq!(sym["udp"]["nat_type"], "symmetric", "{sym}");
    assert!(
        sym["notes"]
            .to_string()
            .contains("changed with the destination port"),
        "{sym}"
    );
    // A cone keeps its mapping; one IP cannot tell endpoint-independent from
    // address-dependent, so the mapping stays unnamed.
    let cone = report(natprobe(&lab, &bin, "fc-1", &args), "fc-1");
    assert_eq!(cone["udp"]["mapping"], Value::Null, "{cone}");
    assert!(cone["notes"].to_string().contains("the same"), "{cone}");
}
