//! Loopback tests of signaling: register, list, look up, broker; observed addresses;
//! name ownership, reconnects and expiry; the HTTP API's view of the same registry.

mod common;

use std::time::Duration;

use common::*;
use rendezvous::registry::Timing;
use rendezvous::server::ServerConfig;
use tokio::net::UdpSocket;
use wire::signal::client::{ClientConfig, ClientError, ClientEvent, stun_binding};
use wire::signal::{ErrorCode, PublicKey, Role, ServerFrame, ServiceRef, register_payload};
use wire::stun::transaction::Timing as StunTiming;

fn refused_code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Refused(f) => f.code,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn two_peers_register_list_look_up_and_get_brokered() {
    let server = start(loopback_config()).await;
    let mut pc = client(&server).await;
    let phone = client(&server).await;
    let pc_reg = pc
        .register(
            &key(1),
            "pc-home",
            vec![web(7274)],
            vec!["198.18.100.5:7000".parse().unwrap()],
        )
        .await
        .unwrap();
    assert!(!pc_reg.replaced);
    phone
        .register(&key(2), "phone", vec![], vec![])
        .await
        .unwrap();

    let names: Vec<String> = phone
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["pc-home", "phone"]);
    let found = phone.lookup("pc-home").await.unwrap();
    assert!(found.online);
    assert_eq!(found.key, PublicKey(key(1).verifying_key().to_bytes()));
    assert_eq!(found.services, vec![web(7274)]);

    let mine = phone.connect_to("pc-home", None).await.unwrap();
    let theirs = match within("broker push", pc.next_event()).await {
        Some(ClientEvent::Broker(b)) => *b,
        other => panic!("pc got {other:?}"),
    };
    assert_eq!((mine.role, theirs.role), (Role::Initiator, Role::Responder));
    assert_eq!((mine.session, mine.secret), (theirs.session, theirs.secret));
    assert_eq!(mine.peer, "pc-home");
    assert_eq!(theirs.peer, "phone");
    assert_eq!(mine.peer_key, PublicKey(key(1).verifying_key().to_bytes()));
    assert_eq!(
        theirs.peer_key,
        PublicKey(key(2).verifying_key().to_bytes())
    );
    assert_eq!(mine.service, web(7274));
    // Each side gets the other's observed TCP address and reported LAN addresses.
    assert_eq!(mine.candidates.tcp, Some(pc.local_addr()));
    assert_eq!(
        mine.candidates.lan,
        vec!["198.18.100.5:7000".parse().unwrap()]
    );
    assert_eq!(theirs.candidates.tcp, Some(phone.local_addr()));
    assert!(mine.start_in_ms > 0 && mine.start_in_ms <= 2000);

    let http = server.addrs().http.unwrap();
    assert_eq!(metric(http, "chuantou_sessions_brokered_total").await, 1);
    assert_eq!(metric(http, "chuantou_registered_peers").await, 2);
}

#[tokio::test]
async fn observed_addresses_are_observed_not_claimed() {
    let server = start(loopback_config()).await;
    let pc = client(&server).await;
    let reg = pc
        .register(&key(1), "pc", vec![web(80)], vec![])
        .await
        .unwrap();
    assert_eq!(reg.observed_tcp, pc.local_addr());

    let stun = server.addrs().stun.unwrap().primary;
    // A Binding without the credential tells us our address but links nothing.
    let anon = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let r = stun_binding(&anon, stun, None, StunTiming::RFC8489)
        .await
        .unwrap();
    assert_eq!(r.mapped, anon.local_addr().unwrap());
    assert_eq!(pc.lookup("pc").await.unwrap().udp_addr, None);
    // A wrong password is refused and links nothing either.
    let err = stun_binding(
        &anon,
        stun,
        Some((&reg.stun_username, "guess")),
        StunTiming::RFC8489,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(pc.lookup("pc").await.unwrap().udp_addr, None);

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let cred = (reg.stun_username.as_str(), reg.stun_password.as_str());
    let r = stun_binding(&sock, stun, Some(cred), StunTiming::RFC8489)
        .await
        .unwrap();
    assert_eq!(r.mapped, sock.local_addr().unwrap());
    assert_eq!(
        pc.lookup("pc").await.unwrap().udp_addr,
        Some(sock.local_addr().unwrap())
    );
    assert_eq!(
        pc.heartbeat().await.unwrap(),
        Some(sock.local_addr().unwrap())
    );

    // The HTTP API shows the same, and 404s with a JSON error for unknown names.
    let http = server.addrs().http.unwrap();
    let (status, body) = http_get(http, "/v1/peers/pc").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["udp_addr"], sock.local_addr().unwrap().to_string());
    assert_eq!(v["tcp_addr"], pc.local_addr().to_string());
    assert_eq!(v["online"], true);
    assert_eq!(v["services"][0]["port"], 80);
    assert_eq!(v["services"][0]["proto"], "tcp");
    assert_eq!(v["key"], hex_key(1));
    assert!(v["last_seen"].as_str().unwrap().ends_with('Z'));
    let (status, body) = http_get(http, "/v1/peers/nobody").await;
    assert_eq!(status, 404);
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("nobody")
    );
    let (status, body) = http_get(http, "/v1/peers").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (status, body) = http_get(http, "/healthz").await;
    assert_eq!((status, body.contains("\"ok\"")), (200, true));
}

fn hex_key(seed: u8) -> String {
    key(seed)
        .verifying_key()
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn only_members_list_and_look_up_peers() {
    let server = start(loopback_config()).await;
    let pc = client(&server).await;
    pc.register(&key(1), "pc-home", vec![], vec![])
        .await
        .unwrap();
    // A stranger learns nothing: not who is online, not a name's key or addresses.
    let stranger = client(&server).await;
    for err in [
        stranger.list().await.unwrap_err(),
        stranger.lookup("pc-home").await.unwrap_err(),
    ] {
        assert_eq!(refused_code(err), ErrorCode::NotRegistered);
    }
    // A key that holds no name cannot identify, nor can a signature by another key.
    assert_eq!(
        refused_code(stranger.identify(&key(9)).await.unwrap_err()),
        ErrorCode::NotRegistered
    );
    let why = stranger.lookup("pc-home").await.unwrap_err().to_string();
    assert!(why.contains("register"), "{why}");
    // The owner's key, proved on another connection (`peer ls`), may browse.
    let ls = client(&server).await;
    assert_eq!(ls.identify(&key(1)).await.unwrap(), vec!["pc-home"]);
    assert_eq!(ls.list().await.unwrap().len(), 1);
    assert!(ls.lookup("pc-home").await.unwrap().online);
    // With a token, passing hello is membership enough.
    let server = start(ServerConfig {
        token: Some("s3cret".into()),
        ..loopback_config()
    })
    .await;
    let member = wire::signal::client::Client::connect(
        &server.addrs().signaling.to_string(),
        ClientConfig {
            token: Some("s3cret".into()),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    assert!(member.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_name_belongs_to_its_first_key() {
    let server = start(loopback_config()).await;
    let owner = client(&server).await;
    owner
        .register(&key(1), "pc-home", vec![], vec![])
        .await
        .unwrap();
    let thief = client(&server).await;
    let err = thief
        .register(&key(66), "pc-home", vec![], vec![])
        .await
        .unwrap_err();
    assert_eq!(refused_code(err), ErrorCode::NameTaken);
    // Still the owner's, and the thief's connection still works for other things (looking
    // up needs a name: the thief's other key holds one).
    let other = client(&server).await;
    other
        .register(&key(67), "thief", vec![], vec![])
        .await
        .unwrap();
    assert_eq!(thief.identify(&key(67)).await.unwrap(), vec!["thief"]);
    assert_eq!(
        thief.lookup("pc-home").await.unwrap().key,
        PublicKey(key(1).verifying_key().to_bytes())
    );
    assert_eq!(
        refused_code(thief.lookup("nobody").await.unwrap_err()),
        ErrorCode::UnknownPeer
    );
    // Even after the owner goes away, the name stays bound to the owner's key.
    drop(owner);
    let offline = within("owner offline", async {
        loop {
            let p = thief.lookup("pc-home").await.unwrap();
            if !p.online {
                return p;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!offline.online);
    let err = thief
        .register(&key(66), "pc-home", vec![], vec![])
        .await
        .unwrap_err();
    assert_eq!(refused_code(err), ErrorCode::NameTaken);
}

#[tokio::test]
async fn same_key_reconnect_replaces_the_old_connection() {
    let server = start(loopback_config()).await;
    let mut first = client(&server).await;
    first
        .register(&key(1), "pc", vec![web(1)], vec![])
        .await
        .unwrap();
    let second = client(&server).await;
    let reg = second
        .register(&key(1), "pc", vec![web(2)], vec![])
        .await
        .unwrap();
    assert!(reg.replaced);
    match within("old connection closed", first.next_event()).await {
        Some(ClientEvent::Closed(ClientError::Closed(Some(e)))) => {
            assert_eq!(e.code, ErrorCode::Replaced)
        }
        other => panic!("old connection got {other:?}"),
    }
    let p = second.lookup("pc").await.unwrap();
    assert!(p.online);
    assert_eq!(p.services, vec![web(2)]);
    assert_eq!(p.tcp_addr, Some(second.local_addr()));
}

#[tokio::test]
async fn silent_peer_expires_heartbeating_peer_stays() {
    let timing = Timing {
        heartbeat_interval: Duration::from_millis(200),
        missed_heartbeats: 2,
        name_retention: Duration::from_secs(60),
    };
    let server = start(ServerConfig {
        timing,
        ..loopback_config()
    })
    .await;
    // The library client heartbeats by itself.
    let alive = client(&server).await;
    alive
        .register(&key(1), "alive", vec![], vec![])
        .await
        .unwrap();
    // A raw client registers and then says nothing.
    let (mut r, nonce) = raw_welcome(&server).await;
    let sig = ed25519_dalek::Signer::sign(&key(2), &register_payload(&nonce, "silent"));
    assert!(matches!(
        raw_register(&mut r, 1, "silent", &key(2), sig).await,
        ServerFrame::Response { body: Ok(_), .. }
    ));
    assert!(alive.lookup("silent").await.unwrap().online);

    let err = closing_error(r.into_inner()).await.expect("an error frame");
    assert_eq!(err.code, ErrorCode::Expired, "{err}");
    assert!(!alive.lookup("silent").await.unwrap().online);
    // The heartbeating peer outlived the silent one's expiry.
    assert!(alive.lookup("alive").await.unwrap().online);
}

#[tokio::test]
async fn connect_errors_are_specific() {
    let server = start(loopback_config()).await;
    let a = client(&server).await;
    assert_eq!(
        refused_code(a.connect_to("pc", None).await.unwrap_err()),
        ErrorCode::NotRegistered
    );
    a.register(&key(1), "a", vec![], vec![]).await.unwrap();
    assert_eq!(
        refused_code(a.connect_to("a", None).await.unwrap_err()),
        ErrorCode::SelfConnect
    );
    assert_eq!(
        refused_code(a.connect_to("zz", None).await.unwrap_err()),
        ErrorCode::UnknownPeer
    );
    let b = client(&server).await;
    b.register(&key(2), "b", vec![web(1), web(2)], vec![])
        .await
        .unwrap();
    let err = a.connect_to("b", None).await.unwrap_err();
    assert!(err.to_string().contains("several services"), "{err}");
    let svc = ServiceRef {
        port: 2,
        proto: wire::signal::Proto::Tcp,
    };
    assert_eq!(a.connect_to("b", Some(svc)).await.unwrap().service, web(2));
    drop(b);
    let err = within("b offline", async {
        loop {
            match a.connect_to("b", Some(svc)).await {
                Err(e) => return e,
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert_eq!(refused_code(err), ErrorCode::PeerOffline);
}

#[tokio::test]
async fn token_is_required_when_set() {
    let server = start(ServerConfig {
        token: Some("s3cret".into()),
        ..loopback_config()
    })
    .await;
    let addr = server.addrs().signaling.to_string();
    for token in [None, Some("wrong".to_string())] {
        let err = wire::signal::client::Client::connect(
            &addr,
            ClientConfig {
                token,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(refused_code(err), ErrorCode::Unauthorized);
    }
    let ok = client_with(
        &server,
        ClientConfig {
            token: Some("s3cret".into()),
            ..Default::default()
        },
    )
    .await;
    ok.register(&key(1), "pc", vec![], vec![]).await.unwrap();
}

#[tokio::test]
async fn signature_must_prove_the_key() {
    let server = start(loopback_config()).await;
    let (mut r, nonce) = raw_welcome(&server).await;
    // Signed by key 2 but claiming key 1; then signed over another nonce.
    let wrong_key = ed25519_dalek::Signer::sign(&key(2), &register_payload(&nonce, "pc"));
    let wrong_nonce = ed25519_dalek::Signer::sign(&key(1), &register_payload(&[0; 32], "pc"));
    for (id, sig) in [(1, wrong_key), (2, wrong_nonce)] {
        match raw_register(&mut r, id, "pc", &key(1), sig).await {
            ServerFrame::Response {
                id: got,
                body: Err(e),
            } => {
                assert_eq!((got, e.code), (id, ErrorCode::BadSignature))
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn listing_pages_through_peers_of_maximal_size() {
    use wire::signal::{MAX_DESCRIPTION_LEN, MAX_SERVICES, Proto, Service};
    let server = start(loopback_config()).await;
    let big: Vec<Service> = (0..MAX_SERVICES as u16)
        .map(|port| Service {
            port,
            proto: Proto::Udp,
            description: "d".repeat(MAX_DESCRIPTION_LEN),
        })
        .collect();
    let mut peers = Vec::new();
    for i in 0..40u8 {
        let c = client(&server).await;
        c.register(&key(i + 1), &format!("big-{i:02}"), big.clone(), vec![])
            .await
            .unwrap();
        peers.push(c);
    }
    // 40 peers of ~2.2 KB each do not fit one 64 KiB frame: the server must page by size.
    let all = peers[0].list().await.unwrap();
    let names: Vec<String> = all.iter().map(|p| p.name.clone()).collect();
    let want: Vec<String> = (0..40).map(|i| format!("big-{i:02}")).collect();
    assert_eq!(names, want);
    assert!(all.iter().all(|p| p.services == big));
}

#[tokio::test]
async fn a_credentialed_stun_binding_over_tcp_gives_the_tcp_candidate_and_nat() {
    use wire::signal::client::stun_binding_tcp;
    use wire::signal::{NatAllocation, NatInfo, NatMapping};
    let server = start(loopback_config()).await;
    let pc = client(&server).await;
    let phone = client(&server).await;
    let reg = pc
        .register(&key(1), "pc", vec![web(80)], vec![])
        .await
        .unwrap();
    phone
        .register(&key(2), "phone", vec![], vec![])
        .await
        .unwrap();
    let stun = server.addrs().stun.unwrap().primary;
    let cred = (reg.stun_username.as_str(), reg.stun_password.as_str());

    // To the server, a connection from a port a few past the signaling one is what a
    // sequential NAT's next mapping looks like.
    let p0 = pc.local_addr().port();
    let (step, mut from_next) = 'found: {
        for step in 1..=8u16 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            if sock.bind(([127, 0, 0, 1], p0 + step).into()).is_ok() {
                break 'found (step, sock.connect(stun).await.unwrap());
            }
        }
        panic!("no free port just past {p0}");
    };
    let err = stun_binding_tcp(&mut from_next, Some((cred.0, "guess")), BOUND)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let mut s = tokio::net::TcpStream::connect(stun).await.unwrap();
    let anon = stun_binding_tcp(&mut s, None, BOUND).await.unwrap();
    assert_eq!(anon.mapped, s.local_addr().unwrap());
    // Neither the refused nor the anonymous one moved anything.
    let b = phone.connect_to("pc", None).await.unwrap();
    assert_eq!(b.candidates.tcp, Some(pc.local_addr()));
    assert_eq!(b.candidates.tcp_nat, None);

    // The same stream again, now with the right password.
    let r = stun_binding_tcp(&mut from_next, Some(cred), BOUND)
        .await
        .unwrap();
    assert_eq!(r.mapped, from_next.local_addr().unwrap());
    let b = phone.connect_to("pc", None).await.unwrap();
    assert_eq!(b.candidates.tcp, Some(from_next.local_addr().unwrap()));
    assert_eq!(
        b.candidates.tcp_nat,
        Some(NatInfo {
            mapping: NatMapping::Varies,
            allocation: NatAllocation::Sequential,
            delta: i32::from(step),
        })
    );
    // Later observations move the candidate; the measurement stays.
    let mut s = tokio::net::TcpStream::connect(stun).await.unwrap();
    stun_binding_tcp(&mut s, Some(cred), BOUND).await.unwrap();
    let b = phone.connect_to("pc", None).await.unwrap();
    assert_eq!(b.candidates.tcp, Some(s.local_addr().unwrap()));
    assert_eq!(b.candidates.tcp_nat.unwrap().delta, i32::from(step));
}

/// An on-path observer captures a peer's credentialed STUN Binding and sends it again
/// from its own address: the peer's observed UDP address does not move.
#[tokio::test]
async fn a_replayed_stun_binding_moves_nothing() {
    let server = start(loopback_config()).await;
    let pc = client(&server).await;
    let reg = pc
        .register(&key(1), "pc", vec![web(80)], vec![])
        .await
        .unwrap();
    let stun = server.addrs().stun.unwrap().primary;
    let real = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let user = wire::stun::stamp(&reg.stun_username);
    let captured = wire::stun::binding_request(Some((&user, &reg.stun_password)), None).unwrap();
    real.send_to(&captured.bytes, stun).await.unwrap();
    let mut buf = [0u8; 512];
    within("answer", real.recv_from(&mut buf)).await.unwrap();
    assert_eq!(
        pc.lookup("pc").await.unwrap().udp_addr,
        Some(real.local_addr().unwrap())
    );
    let mallory = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    mallory.send_to(&captured.bytes, stun).await.unwrap();
    // It is answered like any Binding (the answer goes to the sender, nothing more)...
    within("answer", mallory.recv_from(&mut buf)).await.unwrap();
    // ...but the peer's address stays where it was.
    assert_eq!(
        pc.lookup("pc").await.unwrap().udp_addr,
        Some(real.local_addr().unwrap())
    );
}
