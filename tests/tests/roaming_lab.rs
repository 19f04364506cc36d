//! Moving between networks in the NAT lab: the reaching host moves from one router to
//! another in the middle of a download (its address and its NAT change, as a laptop
//! going from home Wi-Fi to a café's). The download completes intact, and the session is
//! back on a direct path within 5 s of the move; the same when the exposing host moves.
//! And sleeping: either peer is frozen
//! mid-download, then wakes with every timer overdue, as after a suspend.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use chuantou_tests::lab_peers::{Proc, start_peer, start_rendezvous, status_path};
use chuantou_tests::natlab::Lab;
use chuantou_tests::{TempHome, workspace_bin};

/// The download's size, and the byte at each offset.
const SIZE: usize = 48 << 20;
fn byte(k: usize) -> u8 {
    (k % 251) as u8
}

/// A server on `host` that sends [`SIZE`] bytes to each client, then closes.
fn download_service(lab: &Lab, host: &str) -> u16 {
    let l = lab
        .inside(host, || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .expect("listening");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let chunk: Vec<u8> = (0..251 * 256).map(byte).collect();
                let mut sent = 0;
                while sent < SIZE {
                    let n = chunk.len().min(SIZE - sent);
                    if s.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    sent += n;
                }
            });
        }
    });
    port
}

/// Reads `n` bytes at offset `at` of the download, checking each.
fn read_checked(s: &mut TcpStream, at: usize, n: usize) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < n {
        let want = buf.len().min(n - got);
        let k = s.read(&mut buf[..want]).expect("download read");
        assert!(k > 0, "the download ended at {} of {SIZE} bytes", at + got);
        for (i, b) in buf[..k].iter().enumerate() {
            assert_eq!(
                *b,
                byte(at + got + i),
                "byte {} of the download",
                at + got + i
            );
        }
        got += k;
    }
    got
}

/// A download from `ex-1` through a session that runs direct over UDP, with 4 MiB of it
/// read and checked.
struct Running {
    _server: Proc,
    expose: Proc,
    reach: Proc,
    peer: PathBuf,
    homes: (TempHome, TempHome),
    stream: TcpStream,
    at: usize,
}

impl Running {
    /// `reach` runs on `from` (a host of the lab's second router).
    fn start(lab: &Lab, from: &str) -> Running {
        let peer = workspace_bin("peer");
        let server = start_rendezvous(lab, &workspace_bin("rendezvous"));
        let homes = (TempHome::new(), TempHome::new());
        let service = download_service(lab, "ex-1").to_string();
        let args = ["expose", &service, "--name", "files", "--transport", "udp"];
        let mut expose = start_peer(lab, &peer, "ex-1", &homes.0.0, &args, "registered");
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 17274));
        let local_arg = local.to_string();
        let args = [
            "reach",
            "files",
            "--local",
            &local_arg,
            "--transport",
            "udp",
        ];
        let mut reach = start_peer(lab, &peer, from, &homes.1.0, &args, "reaching");
        let mut s = lab
            .inside(from, || TcpStream::connect(local))
            .expect("connecting to reach");
        s.set_read_timeout(Some(chuantou_tests::BOUND)).unwrap();
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_checked(&mut s, 0, 1 << 20)
        }));
        let mut at = first.unwrap_or_else(|_| {
            panic!(
                "before the move:\n--- reach:\n{}\n--- expose:\n{}",
                reach.finish(),
                expose.finish()
            )
        });
        reach.wait_for(&["direct udp path up"]);
        assert_eq!(
            status_path(&peer, &homes.1.0),
            "direct-udp",
            "{}",
            reach.log()
        );
        at += read_checked(&mut s, at, 3 << 20);
        Running {
            _server: server,
            expose,
            reach,
            peer,
            homes,
            stream: s,
            at,
        }
    }

    /// The rest of the download, read on a thread of its own.
    fn read_rest(&self) -> std::thread::JoinHandle<usize> {
        let mut s = self.stream.try_clone().expect("cloning the download");
        let at = self.at;
        std::thread::spawn(move || read_checked(&mut s, at, SIZE - at) + at)
    }

    /// Waits for the reader, with both logs if it failed.
    fn finish_download(&mut self, reader: std::thread::JoinHandle<usize>, when: &str) -> usize {
        reader.join().unwrap_or_else(|p| {
            panic!(
                "download {when}: {p:?}\n--- reach:\n{}\n--- expose:\n{}",
                self.reach.finish(),
                self.expose.finish()
            )
        })
    }
}

/// The reach log's lines about paths and networks, for the test's output.
fn path_events(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            [
                "network changed",
                "punched via",
                "path up",
                "path lost",
                "registered",
                "closed",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .collect()
}

#[test]
fn a_download_survives_a_move_to_another_network_and_goes_direct_again_within_5_s() {
    // Traffic is on the new direct path once the old ones are closed.
    let switched = [
        "direct paths from before the move closed",
        "traffic continues on the direct",
    ];
    if let Some((reach, _)) = move_mid_download("home-1", &switched) {
        assert!(
            reach.contains("network changed"),
            "reach noticed the move:\n{reach}"
        );
    }
}

/// The exposing host moves instead (a home PC's laptop twin, a phone that exposes): the
/// reaching side finds its direct path silent, falls back to the relay and re-punches to
/// the exposer's new network, all with the download open.
#[test]
fn a_download_survives_a_move_of_the_exposing_host_and_goes_direct_again_within_5_s() {
    let switched = ["re-punched: direct udp path up"];
    if let Some((_, expose)) = move_mid_download("ex-1", &switched) {
        assert!(
            expose.contains("network changed"),
            "the exposer noticed its move:\n{expose}"
        );
    }
}

/// Moves `host` (`home-1`, where `reach` runs, or `ex-1`, where `expose` does) onto the
/// café's network in the middle of a download, and waits until the reaching side's
/// traffic is direct again (one of `switched` in its log). The download must complete
/// intact, on a direct path again within 5 s of the move. Returns both logs (`None`
/// without a lab).
fn move_mid_download(host: &str, switched: &[&str]) -> Option<(String, String)> {
    let lab = Lab::for_test(&[
        "ex=port-restricted",
        "home=port-restricted",
        "cafe=address-restricted",
    ])?;
    let mut run = Running::start(&lab, "home-1");
    // The move, with the download's connection open and data in flight.
    let punched_before = run.reach.log().matches("punched via udp").count();
    let moved_at = Instant::now();
    let new_addr = lab.move_host(host, "cafe").expect("moving");
    // The rest of the download, read while the session finds its way again.
    let reader = run.read_rest();
    let direct_again = await_direct_again(&mut run.reach, punched_before, switched, moved_at);
    let path = status_path(&run.peer, &run.homes.1.0);
    let total = run.finish_download(reader, "after the move");
    let log = run.reach.log();
    println!("{host} moved to {new_addr}; direct again after {direct_again:?}; path {path}");
    for l in path_events(&log) {
        println!("  {l}");
    }
    assert_eq!(total, SIZE);
    assert_eq!(path, "direct-udp", "{log}");
    // Once the download is done, traffic still runs direct.
    let after = status_path(&run.peer, &run.homes.1.0);
    assert_eq!(after, "direct-udp", "after the download:\n{log}");
    assert!(
        direct_again <= Duration::from_secs(5),
        "direct again only after {direct_again:?}:\n{log}\n--- expose:\n{}",
        run.expose.log()
    );
    Some((log, run.expose.log()))
}

/// Waits until `reach` has punched again (more than `punched_before` punches) and its
/// traffic runs on a direct path from there (one of the `switched` lines); returns the
/// time since `since`.
fn await_direct_again(
    reach: &mut Proc,
    punched_before: usize,
    switched: &[&str],
    since: Instant,
) -> Duration {
    while reach.log().matches("punched via udp").count() <= punched_before {
        reach.wait_for(&["punched via udp"]);
    }
    if !switched.iter().any(|w| reach.log().contains(w)) {
        reach.wait_for(switched);
    }
    since.elapsed()
}

/// A laptop that sleeps: the reaching peer is frozen (SIGSTOP) mid-download until its NAT
/// has forgotten the direct path's mapping, then thawed (SIGCONT) with every timer
/// overdue, as after a suspend. The download completes intact and the session is direct
/// again within 5 s of the thaw.
#[test]
fn a_download_survives_a_sleep_of_the_reaching_peer_and_goes_direct_again_within_5_s() {
    sleep_past_the_mapping(Sleeper::Reach);
}

/// The same with the exposing peer asleep (a home PC that suspends): the reaching side has
/// been re-punching into silence meanwhile.
#[test]
fn a_download_survives_a_sleep_of_the_exposing_peer_and_goes_direct_again_within_5_s() {
    sleep_past_the_mapping(Sleeper::Expose);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sleeper {
    Reach,
    Expose,
}

fn sleep_past_the_mapping(sleeper: Sleeper) {
    // Mappings live 5 s here, so a short sleep outlives them (keep-alives every 0.5 s
    // hold them while the peer is awake).
    let Some(lab) = Lab::for_test(&[
        "ex=port-restricted,timeout=5",
        "home=port-restricted,timeout=5",
    ]) else {
        return;
    };
    let mut run = Running::start(&lab, "home-1");
    let punched_before = run.reach.log().matches("punched via udp").count();
    let (router, other) = match sleeper {
        Sleeper::Reach => ("home", "ex"),
        Sleeper::Expose => ("ex", "home"),
    };
    let other_wan = lab.wan(other).to_string();
    // The sleeper's NAT holds no mapping towards the other peer's NAT any more.
    let forgotten = || {
        let out = lab
            .router_command(router, "conntrack")
            .args(["-L", "-p", "udp", "--reply-src", &other_wan])
            .stderr(Stdio::null())
            .output()
            .expect("conntrack (apt-get install conntrack)");
        String::from_utf8_lossy(&out.stdout).trim().is_empty()
    };
    assert!(
        !forgotten(),
        "the direct path's mapping is live before the sleep"
    );
    let sleeping = match sleeper {
        Sleeper::Reach => &run.reach,
        Sleeper::Expose => &run.expose,
    };
    sleeping.signal(Signal::STOP);
    let slept = Instant::now();
    match sleeper {
        // Asleep until the NAT forgot the direct path: the exposer stops sending on it
        // once it is silent, and the mapping then times out.
        Sleeper::Reach => {
            while !forgotten() {
                assert!(
                    slept.elapsed() < chuantou_tests::BOUND,
                    "the {router} NAT kept the direct path's mapping"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // The reaching side keeps the exposer's mapping alive with its re-punches (Linux
        // refreshes a mapping on inbound packets too), so the sleep is a set time: past a
        // direct path's 2 s idle timeout, within the session's 10 s.
        Sleeper::Expose => std::thread::sleep(Duration::from_secs(6)),
    }
    let asleep = slept.elapsed();
    sleeping.signal(Signal::CONT);
    let woke = Instant::now();
    let reader = run.read_rest();
    // The dead direct path is given up, the relay carries on, a re-punch brings direct
    // back.
    let switched = ["re-punched: direct udp path up"];
    let direct_again = await_direct_again(&mut run.reach, punched_before, &switched, woke);
    let total = run.finish_download(reader, "after the sleep");
    let log = run.reach.log();
    println!("{sleeper:?} asleep {asleep:?}; direct again {direct_again:?} after waking");
    for l in path_events(&log) {
        println!("  {l}");
    }
    assert_eq!(total, SIZE);
    assert_eq!(
        status_path(&run.peer, &run.homes.1.0),
        "direct-udp",
        "{log}"
    );
    assert!(
        direct_again <= Duration::from_secs(5),
        "direct again only after {direct_again:?}:\n{log}\n--- expose:\n{}",
        run.expose.log()
    );
}
