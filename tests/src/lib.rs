//! Helpers for the end-to-end tests in `tests/tests/`: a rendezvous with its relay on
//! loopback, exposing and reaching peers with their own homes, a local echo service, and a
//! bound on every wait; and the NAT lab ([`natlab`]).
#![deny(missing_docs, unreachable_pub)]
#![allow(clippy::unwrap_used)]

pub mod browser;
pub mod fuzz;
pub mod lab_peers;
pub mod natlab;
pub mod portmapd;
pub mod public;
pub mod web;

use peer::presence::trust::Trust;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use peer::expose::{self, Expose};
use peer::home::Home;
use peer::presence::signal::Signaling;
use peer::reach::{Reach, Reacher};
pub use peer::transport::Transport;
use rendezvous::server::{Server, ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wire::signal::{Proto, PublicKey, Service};

/// Upper bound on any single wait, so a bug hangs nothing.
pub const BOUND: Duration = Duration::from_secs(60);

/// Awaits `f`, failing the test after [`BOUND`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

/// Shows the in-process peers' and servers' logs when `RUST_LOG` asks for them (with
/// `--nocapture`), to look into a failing test.
pub fn logs() {
    // In-process servers and peers hold a descriptor per connection, as the binaries do
    // (which raise the limit themselves): hundreds of connections must not meet 1,024.
    wire::cli::raise_open_files();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A rendezvous with STUN, HTTP and relay on ephemeral loopback ports.
pub async fn rendezvous() -> ServerHandle {
    rendezvous_with(ServerConfig::loopback()).await
}

/// A rendezvous set up as `config` says, on a task.
pub async fn rendezvous_with(config: ServerConfig) -> ServerHandle {
    logs();
    Server::bind(config).await.unwrap().spawn()
}

/// A child process killed (and reaped) when dropped, also when a test fails.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh, empty peer home in the temp directory (removed on drop).
pub struct TempHome(pub PathBuf);

impl TempHome {
    /// Makes one.
    pub fn new() -> TempHome {
        let dir = std::env::temp_dir().join(format!(
            "chuantou-test-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        TempHome(dir)
    }

    /// Opens it.
    pub fn open(&self) -> Home {
        Home::open(Some(self.0.clone())).unwrap()
    }
}

impl Default for TempHome {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // Tests keep a peer's stderr beside its home (`HOME.log`): it goes too.
        let _ = std::fs::remove_file(self.0.with_extension("log"));
    }
}

/// A TCP echo service on loopback; returns its address.
pub async fn echo_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
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
    addr
}

/// A UDP echo service on loopback; returns its address.
pub async fn udp_echo_service() -> SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Starts `peer expose` for `service` under `name`; returns the exposing peer's key.
pub fn expose(
    server: &ServerHandle,
    home: &TempHome,
    name: &str,
    service: SocketAddr,
    allow: Vec<PublicKey>,
    shutdown: &CancellationToken,
) -> PublicKey {
    expose_proto(
        server,
        home,
        name,
        service,
        ExposeOpts {
            allow,
            ..ExposeOpts::default()
        },
        shutdown,
    )
}

/// How [`expose_proto`] exposes.
#[derive(Debug, Clone, Default)]
pub struct ExposeOpts {
    /// Keys allowed in (empty: any).
    pub allow: Vec<PublicKey>,
    /// A UDP service.
    pub udp: bool,
    /// Which direct paths to punch.
    pub transport: Transport,
    /// Never join the relay.
    pub no_relay: bool,
    /// Sessions served at once [default: the peer's default].
    pub max_sessions: Option<usize>,
    /// Publish to plain clients.
    pub public: Option<wire::signal::Publish>,
    /// Reach the rendezvous at this address [default: where it is bound].
    pub via: Option<SocketAddr>,
}

/// Like [`expose`], with options.
pub fn expose_proto(
    server: &ServerHandle,
    home: &TempHome,
    name: &str,
    service: SocketAddr,
    opts: ExposeOpts,
    shutdown: &CancellationToken,
) -> PublicKey {
    let ExposeOpts {
        allow,
        udp,
        transport,
        no_relay,
        max_sessions,
        public: publication,
        via,
    } = opts;
    let key = home.open().key().unwrap();
    let public = PublicKey(key.verifying_key().to_bytes());
    let cfg = Expose {
        signaling: Signaling {
            rendezvous: via.unwrap_or(server.addrs().signaling).to_string(),
            token: None,
            name: name.into(),
            // On loopback no gateway is asked anyway.
            port_mapping: false,
            trust: Trust {
                key: Some(server.key()),
                home: None,
            },
            services: vec![Service {
                port: service.port(),
                proto: if udp { Proto::Udp } else { Proto::Tcp },
                description: "test".into(),
            }],
        },
        target: service.to_string(),
        allow,
        udp,
        transport,
        no_relay,
        max_sessions: max_sessions.unwrap_or(peer::defaults::MAX_SESSIONS),
        public: publication,
    };
    let board = serve_status(home, shutdown);
    tokio::spawn(expose::run(cfg, key, board, shutdown.clone()));
    public
}

/// Binds `peer reach name` on an ephemeral local port and runs it.
pub async fn reach(
    server: &ServerHandle,
    home: &TempHome,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<SocketAddr, String> {
    reach_proto(server, home, name, false, shutdown).await
}

/// Like [`reach`], for a UDP service when `udp`.
pub async fn reach_proto(
    server: &ServerHandle,
    home: &TempHome,
    name: &str,
    udp: bool,
    shutdown: &CancellationToken,
) -> Result<SocketAddr, String> {
    Ok(reach_board(
        server,
        home,
        name,
        ReachOpts {
            udp,
            ..ReachOpts::default()
        },
        shutdown,
    )
    .await?
    .0)
}

/// A pair on loopback: `expose` of `service` as `name` with `expose`, then `reach name`
/// with `reach`. Returns both homes (keep them), the local address and reach's board.
pub async fn expose_and_reach(
    server: &ServerHandle,
    name: &str,
    service: SocketAddr,
    (expose, reach): (ExposeOpts, ReachOpts),
    shutdown: &CancellationToken,
) -> ((TempHome, TempHome), SocketAddr, peer::status::Board) {
    let (pc, phone) = (TempHome::new(), TempHome::new());
    expose_proto(server, &pc, name, service, expose, shutdown);
    online(server, name).await;
    let (local, board) = reach_board(server, &phone, name, reach, shutdown)
        .await
        .unwrap();
    ((pc, phone), local, board)
}

/// How [`reach_board`] reaches.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReachOpts {
    /// A UDP service.
    pub udp: bool,
    /// Which direct paths to punch.
    pub transport: Transport,
    /// Never use the relay.
    pub no_relay: bool,
    /// Reach the rendezvous at this address [default: where it is bound].
    pub via: Option<SocketAddr>,
}

/// Like [`reach_proto`], with options, also returning the reaching peer's status board.
pub async fn reach_board(
    server: &ServerHandle,
    home: &TempHome,
    name: &str,
    opts: ReachOpts,
    shutdown: &CancellationToken,
) -> Result<(SocketAddr, peer::status::Board), String> {
    let ReachOpts {
        udp,
        transport,
        no_relay,
        via,
    } = opts;
    let h = home.open();
    let key = h.key().unwrap();
    let cfg = Reach {
        signaling: Signaling {
            rendezvous: via.unwrap_or(server.addrs().signaling).to_string(),
            token: None,
            name: format!("reach-{}", hex::encode(rand::random::<[u8; 4]>())),
            services: vec![],
            port_mapping: false,
            trust: Trust {
                key: Some(server.key()),
                home: None,
            },
        },
        target: name.into(),
        service: None,
        local: Some("127.0.0.1:0".parse().unwrap()),
        udp,
        transport,
        no_relay,
    };
    let board = serve_status(home, shutdown);
    let r = Reacher::bind(cfg, h, key, board.clone(), shutdown.clone())
        .await
        .map_err(|e| format!("{e:#}"))?;
    let addr = r.local_addr().unwrap();
    tokio::spawn(r.run());
    Ok((addr, board))
}

/// A status board for a peer of `home`, served on its control socket as `peer` does.
fn serve_status(home: &TempHome, shutdown: &CancellationToken) -> peer::status::Board {
    let board = peer::status::Board::default();
    let (dir, b, stop) = (home.0.clone(), board.clone(), shutdown.clone());
    // Bound before the peer starts, so `peer status` finds it as soon as it registers.
    let listener = peer::status::bind(&dir).expect("status socket");
    tokio::spawn(async move {
        peer::status::serve_on(listener, &dir, b, stop)
            .await
            .expect("status socket")
    });
    board
}

/// The value of the Prometheus metric `name` at the HTTP API `http` (0 when absent).
pub async fn metric(http: SocketAddr, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let prefix = format!("{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `name` is online at the rendezvous.
pub async fn online(server: &ServerHandle, name: &str) {
    let c = wire::signal::client::Client::connect(
        &server.addrs().signaling.to_string(),
        Default::default(),
    )
    .await
    .unwrap();
    // Only members may look peers up: register a watcher of our own.
    let watcher = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let watcher_name = format!("watch-{}", hex::encode(rand::random::<[u8; 4]>()));
    c.register(&watcher, &watcher_name, vec![], vec![])
        .await
        .unwrap();
    within("peer online", async {
        loop {
            if c.lookup(name).await.is_ok_and(|p| p.online) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// The path of a workspace binary, built first, so tests that run binaries inside the NAT
/// lab always run the current code. The build is `cargo build --workspace --all-targets`,
/// the same feature set `cargo test --workspace` compiles, so it is a no-op there instead
/// of rebuilding dependencies with other features.
pub fn workspace_bin(bin: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q", "--workspace", "--all-targets"]);
        // What cargo set for this test binary must not leak into the build: build scripts
        // that watch CARGO_MANIFEST_DIR (ring's does) would rebuild on every run.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            let leaked = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
                || k == "CARGO_PRIMARY_PACKAGE"
                || k == "CARGO_TARGET_TMPDIR";
            if leaked {
                cmd.env_remove(&key);
            }
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("running cargo build: {e}"));
        assert!(status.success(), "cargo build --workspace failed");
    });
    // This test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = dir.join(bin);
    assert!(path.exists(), "{} was not built", path.display());
    path
}
