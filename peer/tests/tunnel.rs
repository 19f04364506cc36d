//! The tunnel on loopback: streams both ways, pinned keys enforced on both sides, and a
//! middlebox that flips bits makes the tunnel fail closed: altered data is never delivered.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use peer::tunnel::{self, TunnelError, TunnelStream};
use rendezvous::proto::PublicKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const BOUND: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn public(k: &SigningKey) -> PublicKey {
    PublicKey(k.verifying_key().to_bytes())
}

/// A TCP pair on loopback.
async fn pipe() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap());
    let (a, b) = tokio::join!(a, l.accept());
    (a.unwrap(), b.unwrap().0)
}

/// An echo service on the exposing side's inbound streams.
fn echo(mut rx: mpsc::UnboundedReceiver<TunnelStream>) {
    tokio::spawn(async move {
        while let Some(mut s) = rx.recv().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
}

#[tokio::test]
async fn streams_flow_both_ways_with_the_right_keys() {
    let (reacher, exposer) = (key(1), key(2));
    let (a, b) = pipe().await;
    let (tx, rx) = mpsc::unbounded_channel();
    echo(rx);
    let (c, s) = within("handshake", async {
        tokio::join!(
            tunnel::connect(a, &reacher, public(&exposer)),
            tunnel::accept(b, &exposer, public(&reacher), tx)
        )
    })
    .await;
    let (client, _server) = (c.unwrap(), s.unwrap());
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = client.open().await.unwrap();
            let data: Vec<u8> = (0..100_000u32).map(|j| (j as u8) ^ i).collect();
            s.write_all(&data).await.unwrap();
            let mut back = vec![0u8; data.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, data, "stream {i}");
        }));
    }
    for t in tasks {
        within("echo", t).await.unwrap();
    }
}

#[tokio::test]
async fn a_peer_with_another_key_is_refused_on_both_sides() {
    let (reacher, exposer, impostor) = (key(1), key(2), key(3));
    // The reaching side expects `exposer` but meets `impostor`.
    let (a, b) = pipe().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let (c, s) = within("handshake", async {
        tokio::join!(
            tunnel::connect(a, &reacher, public(&exposer)),
            tunnel::accept(b, &impostor, public(&reacher), tx)
        )
    })
    .await;
    let err = c.unwrap_err();
    assert!(matches!(err, TunnelError::Handshake(_)), "{err}");
    assert!(
        err.to_string().contains(&public(&impostor).to_string()),
        "{err}"
    );
    assert!(s.is_err());

    // The exposing side expects `reacher` but is reached by `impostor`.
    let (a, b) = pipe().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let (c, s) = within("handshake", async {
        tokio::join!(
            tunnel::connect(a, &impostor, public(&exposer)),
            tunnel::accept(b, &exposer, public(&reacher), tx)
        )
    })
    .await;
    let err = s.unwrap_err();
    assert!(
        err.to_string().contains(&public(&impostor).to_string()),
        "{err}"
    );
    // The client learns of the refusal at the latest when it tries to use the tunnel.
    if let Ok(t) = c {
        let r = within("use refused tunnel", async {
            let mut s = t.open().await?;
            s.write_all(b"x").await.map_err(TunnelError::Handshake)?;
            let mut b = [0u8; 1];
            match s.read(&mut b).await {
                Ok(n) if n > 0 => Ok(()),
                _ => Err(TunnelError::Closed),
            }
        })
        .await;
        assert!(r.is_err());
    }
}

/// A relay that flips one bit in the reaching side's traffic after the handshake.
#[tokio::test]
async fn flipped_bits_fail_closed_and_are_never_delivered() {
    let (reacher, exposer) = (key(1), key(2));
    let (a, mid_a) = pipe().await;
    let (mid_b, b) = pipe().await;
    // Forward mid_b → mid_a untouched; mid_a → mid_b with one bit flipped at byte 5000.
    let (mut ar, mut aw) = mid_a.into_split();
    let (mut br, mut bw) = mid_b.into_split();
    tokio::spawn(async move { tokio::io::copy(&mut br, &mut aw).await });
    tokio::spawn(async move {
        let mut seen = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            let n = match ar.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if seen <= 5000 && 5000 < seen + n {
                buf[5000 - seen] ^= 0x10;
            }
            seen += n;
            if bw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (c, s) = within("handshake", async {
        tokio::join!(
            tunnel::connect(a, &reacher, public(&exposer)),
            tunnel::accept(b, &exposer, public(&reacher), tx)
        )
    })
    .await;
    let (client, server) = (c.unwrap(), s.unwrap());
    let sent: Vec<u8> = (0..64 * 1024u32).map(|i| i as u8).collect();
    let writer = {
        let client = client.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut s = client.open().await?;
            s.write_all(&sent).await.map_err(TunnelError::Handshake)?;
            s.shutdown().await.map_err(TunnelError::Handshake)
        })
    };
    // Whatever the exposing side receives must be an unaltered prefix of what was sent.
    let mut got = Vec::new();
    if let Some(mut s) = within("inbound stream", rx.recv()).await {
        let _ = within("read until the tunnel dies", s.read_to_end(&mut got)).await;
    }
    assert!(
        got.len() < sent.len(),
        "the altered record must not be delivered"
    );
    assert_eq!(got, sent[..got.len()], "delivered bytes must be unaltered");
    within("server tunnel closes", server.closed().cancelled()).await;
    let _ = within("writer ends", writer).await;
}

/// Forwards bytes between `a` and `b` until `freeze`, then holds everything: a path that
/// died without a word (a NAT that forgot the mapping, a relay that vanished).
fn freezable(
    a: tokio::io::DuplexStream,
    b: tokio::io::DuplexStream,
    freeze: tokio_util::sync::CancellationToken,
) {
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    for (mut from, mut to) in [(ar, bw), (br, aw)] {
        let freeze = freeze.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    _ = freeze.cancelled() => return std::future::pending().await,
                    r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                };
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_whose_pings_go_unanswered_closes_itself() {
    let (reacher, exposer) = (key(1), key(2));
    let (a, a_far) = tokio::io::duplex(64 * 1024);
    let (b, b_far) = tokio::io::duplex(64 * 1024);
    let freeze = tokio_util::sync::CancellationToken::new();
    freezable(a_far, b_far, freeze.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let (t, _u) = tokio::join!(
        tunnel::connect(a, &reacher, public(&exposer)),
        tunnel::accept(b, &exposer, public(&reacher), tx)
    );
    let t = t.unwrap();
    echo(rx);
    // Answered pings keep it up however long it idles.
    tokio::time::sleep(tunnel::DEAD_AFTER * 3).await;
    assert!(!t.is_closed());
    let mut s = t.open().await.unwrap();
    s.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    // The path dies silently: within one ping interval and the dead time, it is closed.
    freeze.cancel();
    let limit = tunnel::PING_INTERVAL + tunnel::DEAD_AFTER + Duration::from_secs(1);
    tokio::time::timeout(limit, t.closed().cancelled())
        .await
        .expect("the tunnel noticed its dead path");
    assert!(t.open().await.is_err(), "a closed tunnel opens no streams");
}
