//! Moving between networks in the NAT lab: the reaching host moves from one router to
//! another in the middle of a download (its address and its NAT change, as a laptop
//! going from home Wi-Fi to a café's). The download completes intact, and the session is
//! back on a direct path within 5 s of the move.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use chuantou_tests::lab_peers::{start_peer, start_rendezvous, status_path};
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

#[test]
fn a_download_survives_a_move_to_another_network_and_goes_direct_again_within_5_s() {
    let Some(lab) = Lab::for_test(&[
        "ex=port-restricted",
        "home=port-restricted",
        "cafe=address-restricted",
    ]) else {
        return;
    };
    let peer = workspace_bin("peer");
    let _server = start_rendezvous(&lab, &workspace_bin("rendezvous"));
    let (home_a, home_b) = (TempHome::new(), TempHome::new());
    let service = download_service(&lab, "ex-1").to_string();
    let args = ["expose", &service, "--name", "files", "--transport", "udp"];
    let mut expose = start_peer(&lab, &peer, "ex-1", &home_a.0, &args, "registered");
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
    let mut reach = start_peer(&lab, &peer, "home-1", &home_b.0, &args, "reaching");

    let mut s = lab
        .inside("home-1", || TcpStream::connect(local))
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
        status_path(&peer, &home_b.0),
        "direct-udp",
        "{}",
        reach.log()
    );
    at += read_checked(&mut s, at, 3 << 20);

    // The move, with the download's connection open and data in flight.
    let punched_before = reach.log().matches("punched via udp").count();
    let moved_at = Instant::now();
    let new_addr = lab.move_host("home-1", "cafe").expect("moving");
    // The rest of the download, read while the session finds its way again.
    let reader = std::thread::spawn(move || read_checked(&mut s, at, SIZE - at) + at);

    while reach.log().matches("punched via udp").count() <= punched_before {
        reach.wait_for(&["punched via udp"]);
    }
    // Traffic is on a direct path from the new network once the old ones are closed.
    let switched = [
        "direct paths from before the move closed",
        "traffic continues on the direct",
    ];
    if !switched.iter().any(|w| reach.log().contains(w)) {
        reach.wait_for(&switched);
    }
    let direct_again = moved_at.elapsed();
    let path = status_path(&peer, &home_b.0);
    let total = reader.join().unwrap_or_else(|p| {
        panic!(
            "download after the move: {p:?}\n--- reach:\n{}\n--- expose:\n{}",
            reach.finish(),
            expose.finish()
        )
    });
    let log = reach.log();
    println!("moved to {new_addr}; direct again after {direct_again:?}; path {path}");
    for l in log.lines().filter(|l| {
        [
            "network changed",
            "punched via",
            "path up",
            "path lost",
            "registered",
        ]
        .iter()
        .any(|w| l.contains(w))
    }) {
        println!("  {l}");
    }
    assert_eq!(total, SIZE);
    // Once the download is done, traffic still runs direct.
    let after = status_path(&peer, &home_b.0);
    assert_eq!(after, "direct-udp", "after the download:\n{log}");
    assert!(
        log.contains("network changed"),
        "reach noticed the move:\n{log}"
    );
    assert_eq!(path, "direct-udp", "{log}");
    assert!(
        direct_again <= Duration::from_secs(5),
        "direct again only after {direct_again:?}:\n{log}"
    );
}
