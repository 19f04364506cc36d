//! Signaling as an attacker on the path sees it. It is TLS 1.3 with the rendezvous' own
//! ed25519 key: a man in the middle with a key of its own is refused by a peer that pinned
//! the real key (configured, or learned at first contact) before anything is sent, and the
//! pin stays the real key; a sniffer between a peer and the rendezvous sees neither the
//! token nor the STUN credentials; an old plaintext client is told what is wrong.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use chuantou_tests::{TempHome, within};
use ed25519_dalek::SigningKey;
use peer::presence::trust::Trust;
use rendezvous::server::{Server, ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wire::signal::client::{Client, ClientConfig, ClientError};
use wire::signal::{ClientFrame, ErrorCode, Hello, PublicKey, ServerFrame};

const TOKEN: &str = "s3cret-token-that-must-not-leak";

async fn server() -> ServerHandle {
    chuantou_tests::logs();
    let config = ServerConfig {
        token: Some(TOKEN.into()),
        ..ServerConfig::loopback()
    };
    Server::bind(config).await.unwrap().spawn()
}

fn with_token() -> ClientConfig {
    ClientConfig {
        token: Some(TOKEN.into()),
        ..ClientConfig::default()
    }
}

/// A man in the middle: terminates TLS with its own key, and records every plaintext
/// byte a client sends it after the handshake (what it would steal or forward).
struct Mitm {
    addr: SocketAddr,
    key: PublicKey,
    stolen: Arc<Mutex<Vec<u8>>>,
    /// One message per client connection that has ended.
    ended: tokio::sync::mpsc::UnboundedReceiver<()>,
}

async fn mitm() -> Mitm {
    let me = SigningKey::from_bytes(&[66; 32]);
    let config = wire::tls::signaling_server_config(&me).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stolen = Arc::new(Mutex::new(Vec::new()));
    let sink = stolen.clone();
    let (done, ended) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (acceptor, sink, done) = (acceptor.clone(), sink.clone(), done.clone());
            tokio::spawn(async move {
                let _ended = Ended(done);
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    Mitm {
        addr,
        key: PublicKey(me.verifying_key().to_bytes()),
        stolen,
        ended,
    }
}

/// Reports a connection's end when dropped.
struct Ended(tokio::sync::mpsc::UnboundedSender<()>);

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[tokio::test]
async fn a_man_in_the_middle_is_refused_before_anything_is_sent() {
    let real = server().await;
    let mut evil = mitm().await;
    // The key given with the address (HOST:PORT#KEY) is the real one.
    let config = ClientConfig {
        server_key: Some(real.key()),
        ..with_token()
    };
    let err = within("refusal", Client::connect(&evil.addr.to_string(), config))
        .await
        .unwrap_err();
    match &err {
        ClientError::KeyMismatch {
            presented, pinned, ..
        } => {
            assert_eq!((*presented, *pinned), (evil.key, real.key()));
        }
        other => panic!("expected a key mismatch, got {other}"),
    }
    assert!(err.to_string().contains("intercepting"), "{err}");
    // Once the client has hung up, the man in the middle has all it will ever get: nothing.
    within("hang-up", evil.ended.recv()).await;
    assert!(
        evil.stolen.lock().unwrap().is_empty(),
        "the man in the middle got plaintext"
    );
    // Straight to the real server the same configuration works.
    let config = ClientConfig {
        server_key: Some(real.key()),
        ..with_token()
    };
    let c = within(
        "real",
        Client::connect(&real.addrs().signaling.to_string(), config),
    )
    .await
    .unwrap();
    assert_eq!(c.server_key(), real.key());
}

#[tokio::test]
async fn the_key_learned_at_first_contact_is_kept_and_insisted_on() {
    let real = server().await;
    let mut evil = mitm().await;
    let home = TempHome::new();
    let trust = Trust {
        key: None,
        home: Some(home.open()),
    };
    let real_addr = real.addrs().signaling.to_string();
    // First contact: the real server; its key is written down.
    let c = within("first", trust.connect(&real_addr, with_token()))
        .await
        .unwrap();
    assert_eq!(c.server_key(), real.key());
    let known = std::fs::read_to_string(home.0.join("known_rendezvous")).unwrap();
    assert_eq!(known.trim(), format!("{real_addr} {}", real.key()));
    drop(c);
    // Later the same address answers with another key (the attacker took the route):
    // refused, and the pin is unchanged. The attacker's port stands in for the address.
    std::fs::write(
        home.0.join("known_rendezvous"),
        format!("{} {}\n", evil.addr, real.key()),
    )
    .unwrap();
    let err = within(
        "refusal",
        trust.connect(&evil.addr.to_string(), with_token()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::KeyMismatch { .. }), "{err}");
    let known = std::fs::read_to_string(home.0.join("known_rendezvous")).unwrap();
    assert_eq!(known.trim(), format!("{} {}", evil.addr, real.key()));
    within("hang-up", evil.ended.recv()).await;
    assert!(evil.stolen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_sniffer_sees_no_secret() {
    let real = server().await;
    // A TCP forwarder that records both directions.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    let to = real.addrs().signaling;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok((a, _)) = listener.accept().await {
            let b = TcpStream::connect(to).await.unwrap();
            let (mut ar, mut aw) = a.into_split();
            let (mut br, mut bw) = b.into_split();
            let (s1, s2) = (sink.clone(), sink.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = ar.read(&mut buf).await {
                    if n == 0 || bw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    s1.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = br.read(&mut buf).await {
                    if n == 0 || aw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    s2.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let c = within("connect", Client::connect(&front.to_string(), with_token()))
        .await
        .unwrap();
    let key = SigningKey::from_bytes(&[5; 32]);
    let reg = within("register", c.register(&key, "pc-home", vec![], vec![]))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    let contains = |needle: &[u8]| seen.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(TOKEN.as_bytes()), "the token crossed in clear");
    assert!(
        !contains(reg.stun_password.as_bytes()),
        "the STUN password crossed in clear"
    );
    assert!(!contains(b"pc-home"), "the name crossed in clear");
}

#[tokio::test]
async fn an_old_plaintext_client_is_told_to_upgrade() {
    let real = server().await;
    let mut s = TcpStream::connect(real.addrs().signaling).await.unwrap();
    let hello = ClientFrame::Hello(Hello {
        version: wire::signal::PROTOCOL_VERSION,
        token: Some(TOKEN.into()),
    });
    wire::frame::write(&mut s, &hello).await.unwrap();
    let mut reader = wire::frame::FrameReader::new(s);
    match within("answer", reader.read::<ServerFrame>())
        .await
        .unwrap()
    {
        ServerFrame::Error(e) => {
            assert_eq!(e.code, ErrorCode::VersionMismatch);
            assert!(e.message.contains("TLS"), "{}", e.message);
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
}
