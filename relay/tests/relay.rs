//! The relay on loopback: pairing, opaque forwarding both ways with half-close, abrupt
//! close, forged / expired / reused tickets, byte limit, pairing and idle timeouts, UDP.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay::server::{RelayConfig, RelayHandle, RelayServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use wire::frame::{self, FrameReader};
use wire::relay::client::{JoinError, UdpJoin};
use wire::relay::{Hello, RELAY_VERSION, RefusalCode, Status};
use wire::ticket::{SessionId, Side, Ticket, TicketKey};

const BOUND: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

fn key() -> TicketKey {
    TicketKey::from_bytes([42; 32])
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Joins over TCP as the ticket's holder (with the secret the rendezvous would hand it).
async fn join_tcp(
    relay: SocketAddr,
    t: Ticket,
    within: Duration,
) -> Result<tokio::net::TcpStream, JoinError> {
    let secret = key().join_secret(&t);
    wire::relay::client::join_tcp(relay, t, secret, within).await
}

/// Joins over UDP as the ticket's holder.
async fn join_udp(
    sock: &UdpSocket,
    relay: SocketAddr,
    t: Ticket,
    every: Duration,
    within: Duration,
) -> Result<(), JoinError> {
    let join = UdpJoin::new(t.clone(), key().join_secret(&t));
    wire::relay::client::join_udp(sock, relay, &join, every, within).await
}

fn tickets(session: u8) -> (Ticket, Ticket) {
    let id = SessionId([session; 16]);
    let exp = unix_now() + 60;
    (
        key().issue(id, Side::Initiator, exp),
        key().issue(id, Side::Responder, exp),
    )
}

async fn relay_with(f: impl FnOnce(&mut RelayConfig)) -> RelayHandle {
    let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap(), key());
    f(&mut config);
    RelayServer::bind(config).await.unwrap().spawn()
}

async fn pair(relay: SocketAddr, session: u8) -> (TcpStream, TcpStream) {
    let (a, b) = tickets(session);
    let (x, y) = within(
        "pairing",
        futures_join(join_tcp(relay, a, BOUND), join_tcp(relay, b, BOUND)),
    )
    .await;
    (x.unwrap(), y.unwrap())
}

async fn futures_join<A, B>(a: A, b: B) -> (A::Output, B::Output)
where
    A: std::future::Future,
    B: std::future::Future,
{
    tokio::join!(a, b)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn refused(r: Result<TcpStream, JoinError>) -> RefusalCode {
    match r {
        Err(JoinError::Refused(r)) => r.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn tcp_forwards_both_ways_and_propagates_half_close() {
    let relay = relay_with(|_| {}).await;
    let (mut a, mut b) = pair(relay.addr(), 1).await;
    let up = pattern(1 << 20, 1);
    let down = pattern(1 << 20, 2);
    let (up2, down2) = (up.clone(), down.clone());
    // a sends 1 MiB and half-closes; b reads to EOF, then answers with 1 MiB and closes.
    let sender = tokio::spawn(async move {
        a.write_all(&up2).await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut got = Vec::new();
    within("b reads to EOF", b.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, up, "a → b content");
    b.write_all(&down2).await.unwrap();
    b.shutdown().await.unwrap();
    let back = within("a reads the answer", sender).await.unwrap();
    assert_eq!(back, down, "b → a content after a's half-close");
    within("session ends", async {
        while relay
            .stats()
            .sessions_active
            .load(std::sync::atomic::Ordering::Relaxed)
            != 0
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let s = relay.stats();
    assert_eq!(
        s.bytes_total.load(std::sync::atomic::Ordering::Relaxed),
        2 << 20
    );
    assert_eq!(
        s.sessions_total.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        relay
            .stats()
            .render()
            .contains("chuantou_relay_bytes_total 2097152")
    );
}

#[tokio::test]
async fn abrupt_close_of_one_side_closes_the_other() {
    let relay = relay_with(|_| {}).await;
    let (a, mut b) = pair(relay.addr(), 2).await;
    socket2::SockRef::from(&a)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(a);
    let mut buf = [0u8; 16];
    let r = within("b sees the close", b.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

#[tokio::test]
async fn forged_expired_and_reused_tickets_are_refused_without_disturbing_others() {
    let relay = relay_with(|_| {}).await;
    let (mut a, mut b) = pair(relay.addr(), 3).await;
    let addr = relay.addr();

    let forged =
        TicketKey::from_bytes([7; 32]).issue(SessionId([4; 16]), Side::Initiator, unix_now() + 60);
    assert_eq!(
        refused(join_tcp(addr, forged, BOUND).await),
        RefusalCode::BadTicket
    );
    let expired = key().issue(SessionId([4; 16]), Side::Initiator, unix_now() - 5);
    assert_eq!(
        refused(join_tcp(addr, expired, BOUND).await),
        RefusalCode::Expired
    );
    let (used, _) = tickets(3);
    assert_eq!(
        refused(join_tcp(addr, used, BOUND).await),
        RefusalCode::Reused
    );
    let mut altered = tickets(5).0;
    altered.session = SessionId([6; 16]);
    assert_eq!(
        refused(join_tcp(addr, altered, BOUND).await),
        RefusalCode::BadTicket
    );
    // Garbage instead of a hello.
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    within("junk closed", junk.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(!out.is_empty(), "a refusal frame comes back");

    // The first session still works.
    a.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    within("b reads", b.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still here");
    assert_eq!(
        relay
            .stats()
            .refused_total
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

#[tokio::test]
async fn session_over_its_byte_limit_is_closed() {
    let relay = relay_with(|c| c.max_bytes_per_session = Some(100 * 1024)).await;
    let (mut a, mut b) = pair(relay.addr(), 6).await;
    let (mut c, mut d) = pair(relay.addr(), 7).await;
    let writer = tokio::spawn(async move {
        // The relay cuts this off; the write may fail part way.
        let _ = a.write_all(&pattern(1 << 20, 3)).await;
    });
    let mut got = Vec::new();
    let _ = within("b sees the cut", b.read_to_end(&mut got)).await;
    assert!(
        got.len() <= 100 * 1024,
        "forwarded {} bytes past the limit",
        got.len()
    );
    assert_eq!(got, pattern(1 << 20, 3)[..got.len()], "no altered bytes");
    within("writer ends", writer).await.unwrap();
    // The other session is untouched.
    c.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    within("d reads", d.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ok");
}

#[tokio::test]
async fn a_lonely_half_times_out_and_an_idle_session_is_closed() {
    let relay = relay_with(|c| {
        c.limits.pairing_timeout = Duration::from_millis(200);
        c.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let (alone, _) = tickets(8);
    assert_eq!(
        refused(join_tcp(relay.addr(), alone, BOUND).await),
        RefusalCode::PairTimeout
    );

    let (mut a, mut b) = pair(relay.addr(), 9).await;
    let mut buf = [0u8; 1];
    assert!(matches!(
        within("idle close a", a.read(&mut buf)).await,
        Ok(0) | Err(_)
    ));
    assert!(matches!(
        within("idle close b", b.read(&mut buf)).await,
        Ok(0) | Err(_)
    ));
}

#[tokio::test]
async fn udp_forwards_datagrams_both_ways_keeping_boundaries() {
    let relay = relay_with(|_| {}).await;
    let (ta, tb) = tickets(10);
    let (a, b) = udp_pair(relay.addr(), ta, tb).await;
    let every = Duration::from_millis(100);
    for (from, to, len) in [(&a, &b, 1200usize), (&b, &a, 7), (&a, &b, 1)] {
        let msg = pattern(len, len as u8);
        from.send_to(&msg, relay.addr()).await.unwrap();
        let mut buf = [0u8; 2048];
        // Late status datagrams may still arrive first; skip them.
        loop {
            let (n, src) = within("datagram", to.recv_from(&mut buf)).await.unwrap();
            assert_eq!(src, relay.addr());
            if wire::relay::decode_udp(&buf[..n]).is_some() {
                continue;
            }
            assert_eq!(&buf[..n], &msg[..], "datagram of {len} bytes");
            break;
        }
    }
    assert_eq!(
        relay
            .stats()
            .bytes_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1208
    );
    // The same ticket from another socket is a replay.
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (ta2, _) = tickets(10);
    let r = join_udp(&c, relay.addr(), ta2, every, BOUND).await;
    assert!(
        matches!(r, Err(JoinError::Refused(ref x)) if x.code == RefusalCode::Reused),
        "{r:?}"
    );
}

/// A NAT that loses its mappings gives a UDP half a new address: once the old one has
/// gone quiet, the half's hello from the new one moves the session there, both ways.
#[tokio::test]
async fn a_quiet_udp_half_that_comes_back_from_a_new_address_takes_the_session_along() {
    let relay = relay_with(|_| {}).await;
    let (ta, tb) = tickets(11);
    let (_a, b) = udp_pair(relay.addr(), ta.clone(), tb).await;
    let every = Duration::from_millis(100);
    // Half a moves: a new socket, after the old one fell silent.
    tokio::time::sleep(relay::defaults::UDP_REBIND_QUIET).await;
    let moved = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    within("rebind", join_udp(&moved, relay.addr(), ta, every, BOUND))
        .await
        .unwrap();
    b.send_to(b"to the new address", relay.addr())
        .await
        .unwrap();
    assert_eq!(data(&moved).await, b"to the new address");
    moved.send_to(b"from it", relay.addr()).await.unwrap();
    assert_eq!(data(&b).await, b"from it");
}

/// Two UDP halves paired by `relay` with tickets `ta` and `tb`.
async fn udp_pair(relay: SocketAddr, ta: Ticket, tb: Ticket) -> (UdpSocket, UdpSocket) {
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let every = Duration::from_millis(100);
    let (ra, rb) = within(
        "udp pairing",
        futures_join(
            join_udp(&a, relay, ta, every, BOUND),
            join_udp(&b, relay, tb, every, BOUND),
        ),
    )
    .await;
    ra.unwrap();
    rb.unwrap();
    (a, b)
}

/// The next datagram on `sock` that is session data, not relay status.
async fn data(sock: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    loop {
        let (n, _) = within("datagram", sock.recv_from(&mut buf)).await.unwrap();
        if wire::relay::decode_udp(&buf[..n]).is_none() {
            return buf[..n].to_vec();
        }
    }
}

/// Presents `ticket` on a raw connection and returns it once the relay says it waits.
async fn waiting_half(relay: SocketAddr, ticket: Ticket) -> FrameReader<TcpStream> {
    let mut s = TcpStream::connect(relay).await.unwrap();
    frame::write(
        &mut s,
        &Hello {
            version: RELAY_VERSION,
            ticket: ticket.clone(),
        },
    )
    .await
    .unwrap();
    let mut r = FrameReader::new(s);
    let Status::Challenge { nonce } = within("challenge", r.read::<Status>()).await.unwrap() else {
        panic!("the relay must challenge a hello");
    };
    let mac = key().join_secret(&ticket).prove(b"tcp", &nonce);
    frame::write(r.get_mut(), &wire::relay::Proof { mac })
        .await
        .unwrap();
    let status = within("waiting", r.read::<Status>()).await.unwrap();
    assert!(matches!(status, Status::Waiting), "{status:?}");
    r
}

/// Pairs `b` with the raw half `a` that waits, and checks bytes pass.
async fn completes(relay: SocketAddr, mut a: FrameReader<TcpStream>, b: Ticket) {
    let mut y = within("b joins", join_tcp(relay, b, BOUND)).await.unwrap();
    let status = within("a hears paired", a.read::<Status>()).await.unwrap();
    assert!(matches!(status, Status::Paired), "{status:?}");
    let mut x = a.into_inner();
    x.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    within("b reads", y.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"hi");
}

#[tokio::test]
async fn a_half_whose_connection_broke_before_pairing_joins_again_with_its_ticket() {
    let relay = relay_with(|_| {}).await;
    let addr = relay.addr();

    // The first connection closed (whether or not the relay noticed yet): the ticket is
    // good again.
    let (a, b) = tickets(20);
    drop(waiting_half(addr, a.clone()).await);
    completes(addr, waiting_half(addr, a).await, b).await;

    // The first connection still looks open to the relay (a NAT dropped it silently):
    // the new one takes over and the stale one is refused.
    let (a, b) = tickets(21);
    let mut stale = waiting_half(addr, a.clone()).await;
    completes(addr, waiting_half(addr, a.clone()).await, b).await;
    match within("stale refused", stale.read::<Status>()).await {
        Ok(Status::Refused(r)) => assert_eq!(r.code, RefusalCode::PairTimeout),
        other => panic!("the stale half got {other:?}"),
    }

    // Once paired, the ticket is spent for good.
    assert_eq!(refused(join_tcp(addr, a, BOUND).await), RefusalCode::Reused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_arriving_at_the_same_moment_always_pair() {
    // Both halves of many sessions at once: a partner admitted just after a half was told
    // to wait must always find it (it once found nothing and was dropped unpaired).
    let relay = relay_with(|c| c.limits.max_sessions = 1000).await;
    let addr = relay.addr();
    let exp = unix_now() + 60;
    let mut joins = Vec::new();
    for s in 0..300u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&s.to_be_bytes());
        for side in [Side::Initiator, Side::Responder] {
            let t = key().issue(SessionId(id), side, exp);
            joins.push(tokio::spawn(async move {
                let mut stream = join_tcp(addr, t, BOUND).await?;
                // One byte each way proves the two halves are joined to each other.
                stream
                    .write_all(&[side as u8])
                    .await
                    .map_err(JoinError::Io)?;
                let mut b = [0u8; 1];
                stream.read_exact(&mut b).await.map_err(JoinError::Io)?;
                Ok::<u8, JoinError>(b[0])
            }));
        }
    }
    for (i, j) in joins.into_iter().enumerate() {
        let got = within("a half pairs", j).await.unwrap();
        let got = got.unwrap_or_else(|e| panic!("half {i}: {e}"));
        // Each half hears the other side's byte.
        let other = if i % 2 == 0 {
            Side::Responder
        } else {
            Side::Initiator
        };
        assert_eq!(got, other as u8, "half {i}");
    }
}

/// What an on-path observer of a peer's relay traffic has is the ticket, never its secret:
/// with it alone it cannot join, cannot take a waiting half's place, cannot move a paired
/// UDP half to itself (not even by replaying that half's own proof from elsewhere), and
/// hellos it sprays hold no place in the relay.
#[tokio::test]
async fn a_ticket_seen_on_the_wire_is_worth_nothing_without_its_secret() {
    let relay = relay_with(|c| c.limits.max_sessions = 4).await;
    let addr = relay.addr();

    // TCP: the observer presents a waiting half's ticket with a guessed secret.
    let (ta, tb) = tickets(20);
    let a = waiting_half(addr, ta.clone()).await;
    let guess = wire::ticket::JoinSecret([0; 32]);
    let r = wire::relay::client::join_tcp(addr, ta.clone(), guess, BOUND).await;
    assert!(
        matches!(r, Err(JoinError::Refused(ref x)) if x.code == RefusalCode::NoProof),
        "{r:?}"
    );
    // The real half is still there, and its partner pairs with it.
    completes(addr, a, tb).await;

    // UDP: a paired session; the observer captures one of c's proofs...
    let (tc, td) = tickets(21);
    let (c, d) = udp_pair(addr, tc.clone(), td).await;
    let join_c = UdpJoin::new(tc.clone(), key().join_secret(&tc));
    c.send_to(&join_c.hello(), addr).await.unwrap();
    let mut buf = [0u8; 2048];
    let captured = loop {
        let (n, _) = within("challenge", c.recv_from(&mut buf)).await.unwrap();
        if let Some(p) = join_c.answer(&buf[..n]) {
            break p;
        }
    };
    // ...and replays it from its own address once c is quiet (when a real move would be
    // accepted): refused, the cookie was c's.
    tokio::time::sleep(relay::defaults::UDP_REBIND_QUIET).await;
    let mallory = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    mallory.send_to(&captured, addr).await.unwrap();
    let refusal = loop {
        let (n, _) = within("refusal", mallory.recv_from(&mut buf))
            .await
            .unwrap();
        if let Some(Ok(wire::relay::UdpControl::Status(Status::Refused(r)))) =
            wire::relay::decode_udp(&buf[..n])
        {
            break r;
        }
    };
    assert_eq!(refusal.code, RefusalCode::NoProof);
    // Its own hello gets a challenge it cannot answer without the secret.
    let fake = UdpJoin::new(tc.clone(), guess);
    let r = wire::relay::client::join_udp(
        &mallory,
        addr,
        &fake,
        Duration::from_millis(50),
        Duration::from_millis(500),
    )
    .await;
    assert!(
        matches!(r, Err(JoinError::Refused(ref x)) if x.code == RefusalCode::NoProof),
        "{r:?}"
    );
    // The session still goes to c.
    d.send_to(b"still c", addr).await.unwrap();
    assert_eq!(data(&c).await, b"still c");

    // Spoofed hellos for a thousand sessions hold nothing: two more real pairs still fit
    // in a relay of four sessions.
    for i in 0..1000u32 {
        let t = key().issue(
            SessionId([(i % 251) as u8; 16]),
            Side::Initiator,
            unix_now() + 60,
        );
        let hello = UdpJoin::new(t, guess).hello();
        mallory.send_to(&hello, addr).await.unwrap();
    }
    let (te, tf) = tickets(22);
    let _pair = udp_pair(addr, te, tf).await;
}
