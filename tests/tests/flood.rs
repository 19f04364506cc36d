//! Floods aimed at one exposer, measured where they land. Many registered keys asking the
//! rendezvous to connect to `pc-home` get at most the target's quota brokered, and the
//! exposer spends at most one relay half per key on them (never one per request); stray
//! QUIC Initials sprayed at a `peer reach` leave its memory bounded. Meanwhile a real
//! peer reaches `pc-home` and its data arrives intact.

use std::time::{Duration, Instant};

use chuantou_tests::*;
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wire::signal::ErrorCode;
use wire::signal::client::{Client, ClientError};

async fn echo_once(local: std::net::SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(local).await.unwrap();
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    back
}

const ATTACKERS: u64 = 20;
const ASKS_EACH: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flood_costs_the_exposer_one_relay_half_per_key_at_most() {
    let server = rendezvous().await;
    let http = server.addrs().http.unwrap();
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    expose(&server, &pc, "pc-home", echo, vec![], &stop);
    online(&server, "pc-home").await;
    let halves_before = metric(http, "chuantou_relay_halves_total").await;

    // Registered attackers ask for pc-home as fast as they can and never show up.
    let signaling = server.addrs().signaling.to_string();
    let mut attackers = Vec::new();
    for i in 0..ATTACKERS {
        let c = Client::connect(&signaling, Default::default())
            .await
            .unwrap();
        let key = SigningKey::from_bytes(&rand::random());
        c.register(&key, &format!("flood-{i}"), vec![], vec![])
            .await
            .unwrap();
        attackers.push(c);
    }
    let started = Instant::now();
    let (mut brokered, mut busy) = (0u64, 0u64);
    for c in &attackers {
        for _ in 0..ASKS_EACH {
            match c.connect_to("pc-home", None).await {
                Ok(_) => brokered += 1,
                Err(ClientError::Refused(e)) if e.code == ErrorCode::Busy => busy += 1,
                Err(e) => panic!("unexpected answer to a flood request: {e}"),
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // The target's quota: a burst of 50, then 5 a second.
    let allowed = 50 + (5.0 * secs).ceil() as u64;
    assert!(
        brokered <= allowed,
        "{brokered} of {} brokered in {secs:.2} s",
        ATTACKERS * ASKS_EACH
    );
    assert_eq!(brokered + busy, ATTACKERS * ASKS_EACH);

    // A real peer still gets through, and its bytes arrive intact.
    let local = reach(&server, &phone, "pc-home", &stop).await.unwrap();
    let msg: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let back = within("echo through the tunnel", echo_once(local, &msg)).await;
    assert!(back == msg, "echoed bytes differ");

    // The exposer handled every broker before the real peer's (one signaling connection,
    // in order): it joined the relay at most once per attacking key, plus the real
    // session's two halves.
    let halves = metric(http, "chuantou_relay_halves_total").await - halves_before;
    println!(
        "{} asks, {brokered} brokered, {busy} refused in {secs:.2} s; {halves} relay halves",
        ATTACKERS * ASKS_EACH
    );
    assert!(
        halves <= ATTACKERS.min(brokered) + 2,
        "{halves} relay halves for {brokered} brokered sessions from {ATTACKERS} keys"
    );
    stop.cancel();
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_quic_initials_leave_a_reach_small_and_working() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    expose(&server, &pc, "pc-home", echo, vec![], &stop);
    online(&server, "pc-home").await;

    let signaling = server.addrs().signaling.to_string();
    let local = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let reach = chuantou_tests::KillOnDrop(
        std::process::Command::new(workspace_bin("peer"))
            .arg("--home")
            .arg(&phone.0)
            .args([
                "reach",
                "pc-home",
                "--as",
                "phone",
                "--local",
                &local.to_string(),
            ])
            .args(["--rendezvous", &signaling])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = reach.0.id();
    online(&server, "phone").await;
    // Its QUIC endpoint is the UDP address the rendezvous observed (a member asks).
    let watcher = Client::connect(&signaling, Default::default())
        .await
        .unwrap();
    watcher
        .register(
            &SigningKey::from_bytes(&rand::random()),
            "watcher",
            vec![],
            vec![],
        )
        .await
        .unwrap();
    let target = within("reach's udp address", async {
        loop {
            if let Some(a) = watcher.lookup("phone").await.unwrap().udp_addr {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let before = rss_kib(pid);

    // 8,000 genuine QUIC Initials (real ClientHellos, from a real QUIC stack) with keys
    // the reach does not expect, paced over about two seconds.
    // From another address than the exposer's (127.0.0.1 here): a stranger.
    let endpoint = noq::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
    let stranger = SigningKey::from_bytes(&rand::random());
    let config = peer::quic::client_config(
        &stranger,
        wire::signal::PublicKey(
            SigningKey::from_bytes(&rand::random())
                .verifying_key()
                .to_bytes(),
        ),
    )
    .unwrap();
    // Two rounds: a stranger's Initials are ignored before any TLS work, so memory stays
    // where it was, round after round.
    let mut rss = vec![before];
    for _round in 0..2 {
        let mut connecting = Vec::new();
        for i in 0..8_000u32 {
            if let Ok(c) = endpoint.connect_with(config.clone(), target, wire::tls::SERVER_NAME) {
                connecting.push(c);
            }
            if i % 200 == 199 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        rss.push(rss_kib(pid));
        drop(connecting);
    }
    endpoint.close(0u32.into(), b"");
    println!("reach RSS (KiB): {rss:?}: before, after 8,000 stray Initials, after 8,000 more");
    assert!(
        rss[1] < before + 4 * 1024,
        "reach grew from {before} KiB to {} KiB",
        rss[1]
    );
    assert!(
        rss[2] < rss[1] + 2 * 1024,
        "reach kept growing: {rss:?} KiB"
    );
    // And it still serves: a connection through it is echoed intact.
    let msg: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let back = within("echo through the reach", echo_once(local, &msg)).await;
    assert!(back == msg, "echoed bytes differ");
    drop(reach);
    stop.cancel();
}
