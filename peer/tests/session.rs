//! The session on real loopback sockets: two peers' endpoints, a "relay" that is a TCP
//! connection between them (a stream link, as the relay over TCP is), and a direct UDP path
//! through a forwarder the test can cut. Shows that the keys are pinned, that an open
//! stream's bytes move onto a direct path once it is validated and back onto the relay when
//! the direct path dies, and that a corrupted datagram is never delivered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use peer::path::PathKind;
use peer::path::link::Link;
use peer::presence::endpoint::UdpEndpoint;
use peer::session::Session;
use peer::transport::Policy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use wire::signal::PublicKey;

/// Bounds every wait, so a broken session fails the test instead of hanging it.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn public(k: &SigningKey) -> PublicKey {
    PublicKey(k.verifying_key().to_bytes())
}

fn endpoint() -> UdpEndpoint {
    // RUST_LOG shows the session's path events when a test needs looking into.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    UdpEndpoint::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap()
        .0
}

async fn pipe() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(to), l.accept());
    (a.unwrap(), b.unwrap().0)
}

/// Two peers: `dialer` (the exposing side, QUIC client) and `listener` (the reaching side,
/// QUIC server pinned to the dialer's key), joined by a relay over TCP whose two halves are
/// `relay_a` and `relay_b`.
struct Pair {
    dialer: UdpEndpoint,
    listener: UdpEndpoint,
    keys: (SigningKey, SigningKey),
}

impl Pair {
    fn new() -> Pair {
        let keys = (key(1), key(2));
        let listener = endpoint();
        listener.set_server(peer::quic::server_config(&keys.1, public(&keys.0)).unwrap());
        Pair {
            dialer: endpoint(),
            listener,
            keys,
        }
    }

    /// The session over a relay link made of `(relay_a, relay_b)`; both sides' sessions.
    async fn over(&self, relay_a: TcpStream, relay_b: TcpStream) -> (Session, Session) {
        let la = self.dialer.links().add_stream(PathKind::RelayTcp, relay_a);
        let lb = self
            .listener
            .links()
            .add_stream(PathKind::RelayTcp, relay_b);
        self.connect(la, lb).await
    }

    async fn connect(&self, la: Link, lb: Link) -> (Session, Session) {
        let (c, s) = self.handshake(&self.keys.0, la.addr).await;
        (
            Session::start(c.unwrap(), "pc", Policy::default(), vec![la]),
            Session::start(s.unwrap(), "phone", Policy::default(), vec![lb]),
        )
    }

    /// The dialer, presenting `key`, dials the listener at `to`; both ends' outcomes.
    async fn handshake(
        &self,
        key: &SigningKey,
        to: SocketAddr,
    ) -> (
        Result<noq::Connection, noq::ConnectionError>,
        Result<noq::Connection, noq::ConnectionError>,
    ) {
        let config = peer::quic::client_config(key, public(&self.keys.1)).unwrap();
        let dial = self
            .dialer
            .quic()
            .connect_with(config, to, wire::tls::SERVER_NAME)
            .unwrap();
        let accept = async { self.listener.quic().accept().await.unwrap().await };
        within("handshake", async { tokio::join!(dial, accept) }).await
    }
}

/// Waits until `s` carries traffic on a path of `kind`.
async fn active(s: &Session, kind: PathKind) {
    let mut w = s.watch_active();
    within(&format!("{kind} active"), async {
        while *w.borrow_and_update() != Some(kind) {
            w.changed().await.unwrap();
        }
    })
    .await;
}

/// A UDP forwarder between the dialer (which sends to the first address returned) and `to`
/// (which hears from the second), dropping everything while `cut` is set: a path the test
/// can break.
async fn cuttable(to: SocketAddr, cut: Arc<AtomicBool>) -> (SocketAddr, SocketAddr) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let back_addr = back.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (f, b, c, x) = (front.clone(), back.clone(), client.clone(), cut.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().unwrap() = Some(from);
            if !x.load(Ordering::Relaxed) {
                let _ = b.send_to(&buf[..n], to).await;
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, _)) = back.recv_from(&mut buf).await {
            let dst = *client.lock().unwrap();
            if let (Some(dst), false) = (dst, cut.load(Ordering::Relaxed)) {
                let _ = front.send_to(&buf[..n], dst).await;
            }
        }
    });
    (addr, back_addr)
}

#[tokio::test]
async fn streams_flow_over_the_relay_with_the_pinned_keys() {
    let pair = Pair::new();
    let (a, b) = pipe().await;
    let (dialer, listener) = pair.over(a, b).await;
    active(&dialer, PathKind::RelayTcp).await;
    let server = tokio::spawn(async move {
        let (mut send, mut recv) = listener.conn().accept_bi().await.unwrap();
        let got = recv.read_to_end(usize::MAX).await.unwrap();
        send.write_all(&got).await.unwrap();
        send.shutdown().await.unwrap();
        listener
    });
    let (mut send, mut recv) = dialer.conn().open_bi().await.unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    send.write_all(&data).await.unwrap();
    send.shutdown().await.unwrap();
    let back = within("echo", recv.read_to_end(usize::MAX)).await.unwrap();
    assert_eq!(back, data);
    let listener = server.await.unwrap();
    let report = listener.report();
    assert_eq!(report.len(), 1, "{report:?}");
    assert_eq!(
        (report[0].kind.as_str(), report[0].state.as_str()),
        ("relay-tcp", "active")
    );
    assert!(report[0].bytes_in > 300_000, "{report:?}");
}

/// The listener's link reaches QUIC before its maker hands it to the session (the relay
/// join returns a moment after the other side's first packet): the path is picked up then.
#[tokio::test]
async fn a_link_handed_over_after_the_session_started_becomes_its_path() {
    let pair = Pair::new();
    let (a, b) = pipe().await;
    let la = pair.dialer.links().add_stream(PathKind::RelayTcp, a);
    let lb = pair.listener.links().add_stream(PathKind::RelayTcp, b);
    let (c, s) = pair.handshake(&pair.keys.0, la.addr).await;
    let _dialer = Session::start(c.unwrap(), "pc", Policy::default(), vec![la]);
    let listener = Session::start(s.unwrap(), "phone", Policy::default(), vec![]);
    assert_eq!(listener.active(), None, "no path known without its link");
    listener.hold(lb);
    active(&listener, PathKind::RelayTcp).await;
}

#[tokio::test]
async fn a_key_other_than_the_pinned_one_is_refused() {
    let pair = Pair::new();
    let (a, b) = pipe().await;
    let la = pair.dialer.links().add_stream(PathKind::RelayTcp, a);
    let _lb = pair.listener.links().add_stream(PathKind::RelayTcp, b);
    // Mallory knows the listener's key but presents her own.
    let (c, s) = pair.handshake(&key(3), la.addr).await;
    assert!(s.is_err(), "the listener accepted a key it did not pin");
    // In TLS 1.3 the client finishes first; the server's refusal then closes it.
    if let Ok(c) = c {
        let why = within("refusal", c.closed()).await;
        assert!(
            why.to_string().contains("other side presented key"),
            "{why}"
        );
    }
}

/// Writes 64 KiB chunks on a stream, keeping a running hash of what it wrote.
struct Writer {
    send: noq::SendStream,
    hash: u64,
    sent: u64,
}

impl Writer {
    async fn write(&mut self, chunks: usize) {
        let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
        for _ in 0..chunks {
            self.send.write_all(&chunk).await.unwrap();
            for &x in &chunk {
                self.hash = self.hash.wrapping_mul(31).wrapping_add(u64::from(x));
            }
            self.sent += chunk.len() as u64;
        }
    }
}

/// The heart of the session: one stream keeps sending while the paths under it change.
#[tokio::test]
async fn an_open_stream_moves_to_the_direct_path_and_back_to_the_relay_when_it_dies() {
    let pair = Pair::new();
    let (a, b) = pipe().await;
    let (dialer, listener) = pair.over(a, b).await;
    // The reaching side counts what arrives; the stream opens on the relay.
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        let (_send, mut recv) = listener.conn().accept_bi().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut hash = 0u64;
        loop {
            match recv.read(&mut buf).await.unwrap() {
                None => break,
                Some(n) => {
                    for &x in &buf[..n] {
                        hash = hash.wrapping_mul(31).wrapping_add(u64::from(x));
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        (hash, listener)
    });
    let (send, _recv) = dialer.conn().open_bi().await.unwrap();
    let mut w = Writer {
        send,
        hash: 0,
        sent: 0,
    };
    w.write(16).await;

    // A direct path comes up: the same stream's bytes move onto it.
    let cut = Arc::new(AtomicBool::new(false));
    let (direct, _) = cuttable(pair.listener.local_addr().unwrap(), cut.clone()).await;
    dialer.open_path(direct);
    active(&dialer, PathKind::DirectUdp).await;
    let on_direct = |s: &Session| {
        s.report()
            .iter()
            .filter(|p| p.kind == "direct-udp")
            .map(|p| p.bytes_out)
            .sum::<u64>()
    };
    let before = on_direct(&dialer);
    w.write(64).await;
    within("bytes on the direct path", async {
        while on_direct(&dialer) < before + 2 * 1024 * 1024 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // The direct path dies silently: the stream carries on over the relay.
    cut.store(true, Ordering::Relaxed);
    let writing = tokio::spawn(async move {
        w.write(64).await;
        w.send.shutdown().await.unwrap();
        (w.hash, w.sent)
    });
    active(&dialer, PathKind::RelayTcp).await;
    let (expect, sent) = within("the rest over the relay", writing).await.unwrap();
    let (hash, listener) = within("everything delivered", reader).await.unwrap();
    assert_eq!(received.load(Ordering::Relaxed), sent);
    assert_eq!(hash, expect, "bytes arrived altered or out of order");
    assert_eq!(listener.active(), Some(PathKind::RelayTcp));
    assert!(
        !dialer.report().iter().any(|p| p.kind == "direct-udp"),
        "the dead path is gone: {:?}",
        dialer.report()
    );
}

/// A relay that flips bits: QUIC drops the altered datagrams (AEAD) and retransmits, so
/// what arrives is exactly what was sent.
#[tokio::test]
async fn flipped_bits_on_the_relay_are_never_delivered() {
    let pair = Pair::new();
    let (a, mid_a) = pipe().await;
    let (mid_b, b) = pipe().await;
    let (mut ar, mut aw) = mid_a.into_split();
    let (mut br, mut bw) = mid_b.into_split();
    tokio::spawn(async move { tokio::io::copy(&mut br, &mut aw).await });
    // Each stream-link frame is a 2-byte length and a datagram: flip a byte deep inside
    // every 50th datagram, never the lengths, so framing survives and payloads do not.
    tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            let mut len = [0u8; 2];
            if ar.read_exact(&mut len).await.is_err() {
                break;
            }
            let mut d = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if ar.read_exact(&mut d).await.is_err() {
                break;
            }
            n += 1;
            if n > 20 && n % 50 == 0 && d.len() > 100 {
                d[90] ^= 0x10;
            }
            if bw.write_all(&len).await.is_err() || bw.write_all(&d).await.is_err() {
                break;
            }
        }
    });
    let (dialer, listener) = pair.over(a, b).await;
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 249) as u8).collect();
    let reader = tokio::spawn(async move {
        let (_s, mut recv) = listener.conn().accept_bi().await.unwrap();
        recv.read_to_end(usize::MAX).await.unwrap()
    });
    let (mut send, _r) = dialer.conn().open_bi().await.unwrap();
    send.write_all(&data).await.unwrap();
    send.shutdown().await.unwrap();
    let got = within("delivery despite corruption", reader).await.unwrap();
    assert!(got == data, "altered bytes were delivered");
}

/// A NAT that forgets its mappings breaks every path at once: the direct path and the
/// relay (a UDP link here) both go silent, then the relay comes back. The stream carries
/// on over it, every byte delivered once.
#[tokio::test]
async fn when_every_path_goes_silent_and_the_relay_comes_back_the_stream_carries_on() {
    let pair = Pair::new();
    let relay_cut = Arc::new(AtomicBool::new(false));
    let sock_l = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (front, back) = cuttable(sock_l.local_addr().unwrap(), relay_cut.clone()).await;
    let sock_d = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let la = pair
        .dialer
        .links()
        .add_udp(PathKind::Relay, sock_d, front, None);
    let lb = pair
        .listener
        .links()
        .add_udp(PathKind::Relay, sock_l, back, None);
    let (dialer, listener) = pair.connect(la, lb).await;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        let (_send, mut recv) = listener.conn().accept_bi().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        while let Some(n) = recv.read(&mut buf).await.unwrap() {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        listener
    });
    let (send, _recv) = dialer.conn().open_bi().await.unwrap();
    let mut w = Writer {
        send,
        hash: 0,
        sent: 0,
    };
    w.write(4).await;
    let cut = Arc::new(AtomicBool::new(false));
    let (direct, _) = cuttable(pair.listener.local_addr().unwrap(), cut.clone()).await;
    dialer.open_path(direct);
    active(&dialer, PathKind::DirectUdp).await;
    let writing = tokio::spawn(async move {
        w.write(400).await;
        w.send.shutdown().await.unwrap();
        w.sent
    });
    // Everything goes silent while bytes are in flight; after a while the relay is back.
    let before = received.load(Ordering::Relaxed);
    within("bytes on the direct path", async {
        while received.load(Ordering::Relaxed) < before + (1 << 20) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    cut.store(true, Ordering::Relaxed);
    relay_cut.store(true, Ordering::Relaxed);
    active(&dialer, PathKind::Relay).await;
    relay_cut.store(false, Ordering::Relaxed);
    let sent = within("the rest over the relay", writing).await.unwrap();
    let listener = within("everything delivered", reader).await.unwrap();
    assert_eq!(received.load(Ordering::Relaxed), sent);
    assert_eq!(listener.active(), Some(PathKind::Relay));
}
