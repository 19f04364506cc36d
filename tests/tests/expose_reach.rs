//! `peer expose` and `peer reach` end to end through the embedded relay: a real HTTP client
//! (curl), 200 concurrent connections each echoing 1 MiB with content checked, a pinned key
//! that changed, and `--allow` refusing a key.

use std::process::Command;

use chuantou_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wire::signal::PublicKey;

/// A tiny HTTP server answering every request with `body`.
async fn http_service(body: &'static str) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_the_exposed_page_through_the_tunnel() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let web = http_service("hello from pc-home\n").await;
    // Relay only, so that the path `peer status` shows below is the relay's for sure.
    let relay_only = Transport::Relay;
    expose_proto(
        &server,
        &pc,
        "pc-home",
        web,
        ExposeOpts {
            transport: relay_only,
            ..ExposeOpts::default()
        },
        &stop,
    );
    online(&server, "pc-home").await;
    let opts = ReachOpts {
        transport: relay_only,
        ..ReachOpts::default()
    };
    let (local, _) = reach_board(&server, &phone, "pc-home", opts, &stop)
        .await
        .unwrap();
    let url = format!("http://{local}/");
    let out = within(
        "curl",
        tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sS", "--max-time", "30", &url])
                .output()
                .expect("curl is installed (scripts/test installs it)")
        }),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from pc-home\n");

    // `peer status --json` on each side: one tunnel, on the relay path, bytes counted.
    let mine = peer::status::query(&phone.0).await.unwrap();
    let listing: Vec<_> = std::fs::read_dir(&phone.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?} {listing:?}");
    assert_eq!(
        (
            mine[0].peer.as_str(),
            mine[0].role.as_str(),
            mine[0].path.as_str()
        ),
        ("pc-home", "reach", "relay")
    );
    assert!(mine[0].bytes_out > 0 && mine[0].bytes_in >= 19, "{mine:?}");
    // The round trip is measured by a ping through the tunnel's control stream.
    let rtt = within("round trip measured", async {
        loop {
            if let Some(ms) = peer::status::query(&phone.0).await.unwrap()[0].rtt_ms {
                return ms;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(rtt > 0.0 && rtt < 10_000.0, "rtt {rtt} ms");
    let theirs = peer::status::query(&pc.0).await.unwrap();
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    assert_eq!(
        (theirs[0].role.as_str(), theirs[0].path.as_str()),
        ("expose", "relay")
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_each_echo_one_mebibyte() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    expose(&server, &pc, "echo", echo, vec![], &stop);
    online(&server, "echo").await;
    let local = reach(&server, &phone, "echo", &stop).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(local).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let data: Vec<u8> = (0..(1u32 << 20))
                .map(|j| (j.wrapping_mul(2654435761) >> 13) as u8 ^ i as u8)
                .collect();
            let want = Sha256::digest(&data);
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut back = Vec::with_capacity(1 << 20);
            r.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            assert_eq!(back.len(), 1 << 20, "connection {i} length");
            assert_eq!(Sha256::digest(&back), want, "connection {i} content");
        }));
    }
    for t in tasks {
        within("echo connection", t).await.unwrap();
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_for_a_pinned_name_is_refused_loudly() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    expose(&server, &pc, "pc-home", echo, vec![], &stop);
    online(&server, "pc-home").await;
    // The phone once pinned another key for pc-home.
    phone.open().pin("pc-home", PublicKey([7; 32])).unwrap();
    let err = reach(&server, &phone, "pc-home", &stop).await.unwrap_err();
    assert!(err.contains("KEY MISMATCH for pc-home"), "{err}");
    assert!(err.contains(&PublicKey([7; 32]).to_string()), "{err}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_refuses_other_keys_and_admits_listed_ones() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let (pc, phone, friend) = (TempHome::new(), TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    let friend_key = PublicKey(friend.open().key().unwrap().verifying_key().to_bytes());
    expose(&server, &pc, "pc-home", echo, vec![friend_key], &stop);
    online(&server, "pc-home").await;

    // The phone's key is not on the list: its connection is closed without data.
    let local = reach(&server, &phone, "pc-home", &stop).await.unwrap();
    let mut s = TcpStream::connect(local).await.unwrap();
    let _ = s.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    let n = within("refused connection closes", s.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "a refused peer must get no data");

    // The friend's is.
    let local = reach(&server, &friend, "pc-home", &stop).await.unwrap();
    let mut s = TcpStream::connect(local).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    within("friend echo", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    stop.cancel();
}
