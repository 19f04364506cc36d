//! Helpers shared by the rendezvous loopback tests: start a server on ephemeral loopback
//! ports, make keys and clients, speak raw frames, and bound every wait.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rendezvous::server::{Server, ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::frame::{self, FrameReader};
use wire::signal::client::{Client, ClientConfig};
use wire::signal::{ClientFrame, Hello, PROTOCOL_VERSION, Proto, ServerFrame, Service};

/// Upper bound on any single wait in these tests, so a bug hangs nothing.
pub const BOUND: Duration = Duration::from_secs(20);

/// Awaits `f`, failing the test if it takes longer than [`BOUND`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {BOUND:?}"))
}

/// A config on loopback with ephemeral ports.
pub fn loopback_config() -> ServerConfig {
    ServerConfig::loopback()
}

/// Starts a server with `config`.
pub async fn start(config: ServerConfig) -> ServerHandle {
    Server::bind(config).await.expect("bind server").spawn()
}

/// A deterministic key per seed.
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A TCP web service on `port`.
pub fn web(port: u16) -> Service {
    Service {
        port,
        proto: Proto::Tcp,
        description: "web".into(),
    }
}

/// A client connected to `server`.
pub async fn client(server: &ServerHandle) -> Client {
    client_with(server, ClientConfig::default()).await
}

/// A client with a custom config.
pub async fn client_with(server: &ServerHandle, config: ClientConfig) -> Client {
    let addr = server.addrs().signaling.to_string();
    within("connect", Client::connect(&addr, config))
        .await
        .expect("client connects")
}

/// A raw signaling connection (TLS done, nothing said) for speaking broken protocol on
/// purpose.
pub type Raw = wire::signal::client::Tls;

/// Completes the TLS handshake on `tcp`.
pub async fn tls(tcp: TcpStream) -> Raw {
    let addr = tcp.peer_addr().expect("peer addr");
    within("tls handshake", wire::signal::client::handshake(tcp, addr))
        .await
        .expect("tls handshake")
        .0
}

/// A raw connection to `server`.
pub async fn raw(server: &ServerHandle) -> Raw {
    tls(TcpStream::connect(server.addrs().signaling)
        .await
        .expect("raw connect"))
    .await
}

/// Sends a hello with the current version.
pub async fn raw_hello(s: &mut Raw) {
    let hello = ClientFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        token: None,
    });
    s.write_all(&frame::encode(&hello).unwrap()).await.unwrap();
}

/// Reads server frames until one is an error frame or the stream ends; returns the error
/// frame, or `None` if the server closed without one.
pub async fn closing_error(
    s: impl tokio::io::AsyncRead + Unpin,
) -> Option<wire::signal::ErrorFrame> {
    let mut r = FrameReader::new(s);
    loop {
        match within("server closes", r.read::<ServerFrame>()).await {
            Ok(ServerFrame::Error(e)) => {
                // After the error frame the server must close.
                let mut rest = [0u8; 1];
                // (A TLS close_notify or a reset both read as the end here.)
                let n = within("close after error", r.get_mut().read(&mut rest))
                    .await
                    .unwrap_or(0);
                assert_eq!(n, 0, "server kept the connection open after an error frame");
                return Some(e);
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// GET `path` from the HTTP API; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, text) = http_get_with(addr, path, "").await;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// GET `path` with extra header lines (each ending in CRLF); returns status and the whole
/// response, headers included.
pub async fn http_get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("http connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    within("http response", s.read_to_end(&mut buf))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The value of an unlabelled metric from `/metrics`.
pub async fn metric(http: SocketAddr, name: &str) -> u64 {
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing from\n{body}"))
}

/// Raises the open-file limit to its hard maximum; tests opening many sockets need it.
pub fn raise_fd_limit(need: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        now >= need,
        "this test needs {need} open files and the hard limit is {now}; raise it (ulimit -Hn)"
    );
}

/// A raw connection past hello: the reader and the server's nonce.
pub async fn raw_welcome(server: &ServerHandle) -> (FrameReader<Raw>, [u8; 32]) {
    let mut s = raw(server).await;
    raw_hello(&mut s).await;
    let mut r = FrameReader::new(s);
    match within("welcome", r.read::<ServerFrame>()).await {
        Ok(ServerFrame::Welcome(w)) => (r, w.nonce),
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// Sends a raw register claiming `claimed`'s key with the signature `sig`; returns the
/// server's answer.
pub async fn raw_register(
    r: &mut FrameReader<Raw>,
    id: u32,
    name: &str,
    claimed: &SigningKey,
    sig: ed25519_dalek::Signature,
) -> ServerFrame {
    use wire::signal::{PublicKey, Register, Request, Signature};
    let reg = ClientFrame::Request {
        id,
        body: Request::Register(Register {
            name: name.into(),
            key: PublicKey(claimed.verifying_key().to_bytes()),
            services: vec![],
            lan_addrs: vec![],
            signature: Signature(sig.to_bytes()),
            nat: None,
        }),
    };
    r.get_mut()
        .write_all(&frame::encode(&reg).expect("encode"))
        .await
        .expect("send register");
    within("register answer", r.read::<ServerFrame>())
        .await
        .expect("register answer")
}

/// A raw connection from a chosen loopback source address.
pub async fn raw_from(server: &ServerHandle, src: std::net::Ipv4Addr) -> Raw {
    tls(raw_tcp_from(server, src).await).await
}

/// A plain TCP connection from a chosen loopback source address (no TLS: a client that
/// connects and says nothing at all).
pub async fn raw_tcp_from(server: &ServerHandle, src: std::net::Ipv4Addr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((src, 0))).expect("bind source");
    sock.connect(server.addrs().signaling)
        .await
        .expect("raw connect")
}

/// "pc" (offering `service` under `name`) and "phone", both registered: the usual pair.
pub async fn pc_and_phone(server: &ServerHandle, name: &str, service: Service) -> (Client, Client) {
    let pc = client(server).await;
    pc.register(&key(1), name, vec![service], vec![])
        .await
        .expect("pc registers");
    let phone = client(server).await;
    phone
        .register(&key(2), "phone", vec![], vec![])
        .await
        .expect("phone registers");
    (pc, phone)
}
