//! The `rendezvous` binary as a user runs it: `--help`, start-up log lines, clear errors
//! for bad flags, and graceful shutdown on SIGTERM that tells connected peers why.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use common::*;
use wire::signal::ErrorCode;
use wire::signal::client::{Client, ClientConfig, ClientError, ClientEvent};

const BIN: &str = env!("CARGO_BIN_EXE_rendezvous");

/// A state directory of its own for each test (removed on drop), so that tests neither
/// share an identity nor write into the user's.
struct StateDir(std::path::PathBuf);

impl StateDir {
    fn new() -> StateDir {
        StateDir(std::env::temp_dir().join(format!(
            "chuantou-rv-state-{}",
            hex::encode(rand::random::<[u8; 8]>())
        )))
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A rendezvous process, killed on drop if still running (never leaves one behind).
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    _state: StateDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        Proc::start_in(args, StateDir::new())
    }

    fn start_in(args: &[&str], state: StateDir) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("CHUANTOU_STATE_DIR", &state.0)
            .env("RUST_LOG", "info")
            .env_remove("CHUANTOU_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rendezvous");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            _state: state,
        }
    }

    /// The first log line containing `needle`.
    fn wait_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(_) => panic!("no log line with {needle:?} within {BOUND:?}"),
            }
        }
    }
}

fn addr_in(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--stun",
        "--alt-ip",
        "--alt-port",
        "--http",
        "--token",
        "CHUANTOU_TOKEN",
        "--heartbeat-interval",
        "--relay",
        "--no-relay",
        "CHUANTOU_RELAY_KEY",
        "0.0.0.0:7001",
        "RFC 5780",
        "0.0.0.0:7000",
        "0.0.0.0:3478",
        "127.0.0.1:7080",
        "--state",
        "CHUANTOU_STATE_DIR",
        "key",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn bad_flags_give_clear_errors() {
    let out = Command::new(BIN)
        .args([
            "--alt-ip",
            "127.0.0.2",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--alt-ip 127.0.0.2 needs --stun on a concrete IP"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["--listen", "nonsense"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));

    // A port already in use names the service and the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["--listen", &addr, "--no-stun", "--no-http", "--no-relay"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot bind signaling on {addr}")),
        "{err}"
    );
}

#[tokio::test]
async fn the_identity_is_kept_and_printed_by_the_key_command() {
    let state = StateDir::new();
    let out = Command::new(BIN)
        .args(["key", "--state"])
        .arg(&state.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let key: wire::signal::PublicKey = printed.parse().expect("a key on stdout");
    // The server started on that directory proves the same key, and logs it.
    let proc = Proc::start_in(
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-stun",
            "--no-http",
            "--no-relay",
        ],
        state,
    );
    let line = proc.wait_line("rendezvous key");
    assert!(line.contains(&printed), "{line}");
    let signaling = addr_in(&proc.wait_line("signaling listening"), "addr");
    let config = ClientConfig {
        server_key: Some(key),
        ..ClientConfig::default()
    };
    let c = within("connect", Client::connect(&signaling.to_string(), config))
        .await
        .unwrap();
    assert_eq!(c.server_key(), key);
}

#[tokio::test]
async fn sigterm_tells_peers_and_exits_cleanly() {
    let proc = Proc::start(&[
        "--listen",
        "127.0.0.1:0",
        "--stun",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--relay",
        "127.0.0.1:0",
    ]);
    let signaling = addr_in(&proc.wait_line("signaling listening"), "addr");
    let _ = proc.wait_line("http api listening");
    let mut peer = within(
        "connect",
        Client::connect(&signaling.to_string(), ClientConfig::default()),
    )
    .await
    .unwrap();
    peer.register(&key(1), "pc-home", vec![web(7274)], vec![])
        .await
        .unwrap();
    let _ = proc.wait_line("registered");

    let pid = rustix::process::Pid::from_raw(proc.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("send SIGTERM");

    match within("shutdown notice", peer.next_event()).await {
        Some(ClientEvent::Closed(ClientError::Closed(Some(e)))) => {
            assert_eq!(e.code, ErrorCode::ShuttingDown)
        }
        other => panic!("peer got {other:?}"),
    }
    let _ = proc.wait_line("rendezvous stopped");
    let mut proc = proc;
    let status = within(
        "exit",
        tokio::task::spawn_blocking(move || {
            let s = proc.child.wait();
            (s, proc)
        }),
    )
    .await
    .unwrap()
    .0
    .unwrap();
    assert!(status.success(), "exit status {status}");
}
