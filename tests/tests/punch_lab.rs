//! The NAT-lab matrix for UDP punching: for every ordered pair of NAT kinds, `peer expose`
//! behind one and `peer reach` behind the other (real processes, real kernel NATs), data
//! flows both ways through `reach`, and the path is the one the pair must get: direct for
//! every pair except random symmetric with any symmetric NAT, which use the relay.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use chuantou_tests::natlab::{Lab, SERVER_ALT_IP, SERVER_IP};
use chuantou_tests::{BOUND, TempHome, workspace_bin};

/// (short name, lab kind)
const KINDS: [(&str, &str); 6] = [
    ("pub", "none"),
    ("fc", "full-cone"),
    ("ar", "address-restricted"),
    ("pr", "port-restricted"),
    ("symr", "symmetric-random"),
    ("syms", "symmetric-sequential"),
];

fn must_relay(a: &str, b: &str) -> bool {
    let sym = |k: &str| k.starts_with("sym");
    sym(a) && sym(b) && (a == "symr" || b == "symr")
}

/// A process whose stderr lines arrive on a channel; killed on drop.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn start(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line containing any of `what`; panics with the log after [`BOUND`].
    fn wait_for(&mut self, what: &[&str]) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if what.iter().any(|w| line.contains(w)) {
                        return line;
                    }
                }
                Err(_) => panic!("none of {what:?} in:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Echoes `data` through a connection to `to` made on `host`, checking what comes back.
fn echo(lab: &Lab, host: &str, to: SocketAddr, data: &[u8]) {
    let mut s = lab.tcp_connect(host, None, to).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    let mut w = s.try_clone().unwrap();
    let out = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&out).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(
        back == data,
        "echo came back different ({} bytes)",
        back.len()
    );
}

/// A TCP echo service on `host`'s loopback; returns its port.
fn echo_service(lab: &Lab, host: &str) -> u16 {
    let l = lab
        .tcp_listener(host, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

/// `peer status --json` of the processes using `home`.
fn status_path(peer: &Path, home: &Path) -> String {
    let out = Command::new(peer)
        .arg("--home")
        .arg(home)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    v[0]["path"].as_str().unwrap_or("none").to_owned()
}

fn start_rendezvous(lab: &Lab) -> Proc {
    let rendezvous = workspace_bin("rendezvous");
    let mut cmd = lab.command("server", &rendezvous);
    cmd.args(["--listen", "198.18.0.1:7000", "--stun"])
        .arg(format!("{SERVER_IP}:3478"))
        .args(["--alt-ip", &SERVER_ALT_IP.to_string(), "--no-http"])
        .args(["--relay", "198.18.0.1:7001"]);
    let mut server = Proc::start(cmd);
    server.wait_for(&["relay listening"]);
    server
}

/// `peer expose` of an echo service on `host_a` as `name`, `peer reach name` on `host_b`;
/// echoes through it, waits for the punch's verdict, echoes 256 KiB on whichever path new
/// connections then take. Returns (punched, the verdict line, the status path, reach's log).
fn run_pair(
    lab: &Lab,
    peer: &Path,
    host_a: &str,
    host_b: &str,
    name: &str,
) -> (bool, String, String, String) {
    let (home_a, home_b) = (TempHome::new(), TempHome::new());
    let service = echo_service(lab, host_a);
    let mut cmd = lab.command(host_a, peer);
    cmd.arg("--home").arg(&home_a.0).args([
        "--rendezvous",
        "198.18.0.1:7000",
        "expose",
        &service.to_string(),
        "--name",
        name,
    ]);
    let mut expose = Proc::start(cmd);
    expose.wait_for(&["registered"]);
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 17274));
    let mut cmd = lab.command(host_b, peer);
    cmd.arg("--home").arg(&home_b.0).args([
        "--rendezvous",
        "198.18.0.1:7000",
        "reach",
        name,
        "--local",
        &local.to_string(),
    ]);
    let mut reach = Proc::start(cmd);
    reach.wait_for(&["reaching"]);
    // The first connection brokers the session: relay at once, punching beside it.
    echo(lab, host_b, local, b"first");
    let outcome = reach.wait_for(&["direct path up", "staying on the relay", "relay only"]);
    let direct = outcome.contains("direct path up");
    // Then a bigger exchange, both ways, on whichever path new connections take.
    let data: Vec<u8> = (0..256 * 1024u32).map(|k| (k % 251) as u8).collect();
    echo(lab, host_b, local, &data);
    let path = status_path(peer, &home_b.0);
    let log = reach.seen.join("\n");
    drop((expose, reach));
    (direct, outcome, path, log)
}

#[test]
fn every_pair_of_nat_kinds_connects_directly_or_through_the_relay() {
    let routers: Vec<String> = KINDS
        .iter()
        .flat_map(|(s, k)| [format!("{s}x={k}"), format!("{s}y={k}")])
        .collect();
    let refs: Vec<&str> = routers.iter().map(String::as_str).collect();
    let Some(lab) = Lab::for_test(&refs) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab);

    let mut table = Vec::new();
    let mut failures = Vec::new();
    for (i, (a, _)) in KINDS.iter().enumerate() {
        for (j, (b, _)) in KINDS.iter().enumerate() {
            let (host_a, host_b) = (format!("{a}x-1"), format!("{b}y-1"));
            let name = format!("pc{i}{j}");
            let (direct, outcome, path, log) = run_pair(&lab, &peer, &host_a, &host_b, &name);
            let want_direct = !must_relay(a, b);
            let ms = outcome
                .split("direct path up in ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .unwrap_or("-");
            table.push(format!("{:>5} -> {:<5} {:<11} {:>6} ms", a, b, path, ms));
            if direct != want_direct || path != if want_direct { "direct-udp" } else { "relay" } {
                failures.push(format!(
                    "{a} -> {b}: got {path} ({outcome}), want {}\n{}",
                    if want_direct { "direct-udp" } else { "relay" },
                    log
                ));
            }
        }
    }
    println!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn two_peers_behind_one_nat_without_hairpin_connect_over_the_lan() {
    let Some(lab) = Lab::for_test(&["home=port-restricted,hosts=2"]) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab);
    let (direct, outcome, path, log) = run_pair(&lab, &peer, "home-1", "home-2", "pc");
    assert!(direct && path == "direct-udp", "{outcome}\n{log}");
    // The pair found is the LAN one: the hosts' own addresses, not the router's.
    assert!(
        outcome.contains("remote=198.19.") || log.contains("remote=198.19."),
        "{log}"
    );
}
