//! Helpers for tests of public entries: a loopback rendezvous with every entry on, a
//! threaded (optionally TLS) Python file server, exposing with a publication and waiting
//! until the rendezvous lists it, and a raw HTTP/1.1 GET.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rendezvous::public::PublicConfig;
use rendezvous::server::{ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wire::signal::{HttpAuth, Proto, Publish, ServiceRef};

use crate::{ExposeOpts, KillOnDrop, TempHome, expose_proto, rendezvous_with, within};

/// The public domain: curl and Chromium resolve every `*.localhost` to loopback.
pub const DOMAIN: &str = "localhost";

/// A threaded HTTP/1.1 file server on an ephemeral loopback port (printed first), with TLS
/// when given a certificate and key.
const FILE_SERVER: &str = r#"
import functools, http.server, ssl, sys
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=sys.argv[1]))
srv.daemon_threads = True
if len(sys.argv) > 3:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// A WebSocket echo server (Python's `websockets`) on an ephemeral loopback port (printed
/// first).
const WS_ECHO: &str = r#"
import asyncio, websockets
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None) as srv:
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;

/// Starts [`FILE_SERVER`] on `dir`; returns it and its port.
pub async fn file_server(dir: &Path, tls: Option<(&Path, &Path)>) -> (KillOnDrop, u16) {
    let mut args = vec![dir.as_os_str()];
    if let Some((cert, key)) = tls {
        args.extend([cert.as_os_str(), key.as_os_str()]);
    }
    python_server(FILE_SERVER, &args).await
}

/// Starts a WebSocket echo server; returns it and its port.
pub async fn ws_echo_server() -> (KillOnDrop, u16) {
    python_server(WS_ECHO, &[]).await
}

/// Runs Python `script` with `args`; returns it and the port it prints first.
async fn python_server(script: &str, args: &[&std::ffi::OsStr]) -> (KillOnDrop, u16) {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]).args(args);
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = KillOnDrop(child);
    let port = within(
        "server port",
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line.trim().parse::<u16>().unwrap()
        }),
    )
    .await
    .unwrap();
    (proc, port)
}

/// A free range of `n` loopback ports (bound and released: another process could take
/// one meanwhile, which a test would show as a refused publish, not as a wrong pass).
pub fn free_ports(n: u16) -> (u16, u16) {
    for _ in 0..50 {
        let base = 20000 + rand::random::<u16>() % 30000;
        let all_free =
            (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return (base, base + n - 1);
        }
    }
    panic!("no {n} free ports in a row");
}

/// A loopback rendezvous with every public entry on.
pub async fn public_rendezvous() -> (ServerHandle, (u16, u16)) {
    let ports = free_ports(4);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = ServerConfig {
        public: PublicConfig {
            http: Some(any),
            tls: Some(any),
            domain: Some(DOMAIN.into()),
            ports: Some(("127.0.0.1".parse().unwrap(), ports.0..=ports.1)),
            allow_any: true,
            ..ServerConfig::default().public
        },
        ..ServerConfig::loopback()
    };
    (rendezvous_with(config).await, ports)
}

/// A publication of TCP service `port`: by host name, by TLS name, on a raw port.
pub fn publish(port: u16, http: bool, tls: bool, raw: bool, auth: Option<HttpAuth>) -> Publish {
    Publish {
        service: ServiceRef {
            port,
            proto: Proto::Tcp,
        },
        http,
        tls,
        port: raw.then_some(None),
        auth,
    }
}

/// Exposes `service` as `name` with `publication`, and waits until the rendezvous lists
/// the publication.
pub async fn expose_public(
    server: &ServerHandle,
    name: &str,
    service: u16,
    publication: Publish,
    stop: &CancellationToken,
) -> TempHome {
    let home = TempHome::new();
    expose_proto(
        server,
        &home,
        name,
        ([127, 0, 0, 1], service).into(),
        ExposeOpts {
            public: Some(publication),
            ..ExposeOpts::default()
        },
        stop,
    );
    let api = server.addrs().http.unwrap();
    within("publication listed", async {
        loop {
            let r = get(api, "127.0.0.1", "/v1/dashboard", "").await;
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let listed = v["public"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == name && p["online"] == true);
            if listed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    home
}

/// An HTTP response.
pub struct Got {
    /// The status code.
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// The body.
    pub body: Vec<u8>,
}

/// One HTTP/1.1 GET with `Connection: close`, read to the end.
pub async fn get(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Got {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&all)));
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Got {
        status,
        head,
        body: all[split + 4..].to_vec(),
    }
}

/// A site of [`crate::web::site`] (`mib` MiB big) served by [`file_server`] and published
/// as `pc-home` with `publication` (given the service port) on a fresh
/// [`public_rendezvous`]. Everything stops when it is dropped.
pub struct PublishedSite {
    /// The rendezvous.
    pub server: ServerHandle,
    /// Stops the exposing peer.
    pub stop: CancellationToken,
    /// SHA-256 of the site's big file.
    pub big_sha: String,
    _server_proc: KillOnDrop,
    _dir: TempHome,
    _home: TempHome,
}

impl Drop for PublishedSite {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sets a [`PublishedSite`] up.
pub async fn published_site(mib: usize, publication: impl FnOnce(u16) -> Publish) -> PublishedSite {
    let dir = TempHome::new();
    let big_sha = crate::web::site(&dir.0, mib);
    let (proc, port) = file_server(&dir.0, None).await;
    let (server, _) = public_rendezvous().await;
    let stop = CancellationToken::new();
    let home = expose_public(&server, "pc-home", port, publication(port), &stop).await;
    PublishedSite {
        server,
        stop,
        big_sha,
        _server_proc: proc,
        _dir: dir,
        _home: home,
    }
}
