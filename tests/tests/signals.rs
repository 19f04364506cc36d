//! The binaries stop the way a service manager stops them: SIGTERM (systemd's stop) or
//! SIGINT ends `peer` and `relay` cleanly, with exit status 0, and `peer` removes its
//! control socket on the way out.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use chuantou_tests::{BOUND, TempHome, rendezvous, workspace_bin};
use rustix::process::{Pid, Signal, kill_process};

/// A child process whose stderr lines arrive on a channel; killed on drop if still running.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    fn wait_line(&self, needle: &str) {
        let deadline = Instant::now() + BOUND;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return,
                Ok(l) => seen.push(l),
                Err(_) => panic!("no log line with {needle:?} within {BOUND:?}: {seen:#?}"),
            }
        }
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(self.child.id() as i32).expect("pid");
        kill_process(pid, sig).expect("send signal");
    }

    /// Waits (bounded) for the exit; its status.
    fn exit(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "still running {BOUND:?} after the signal"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn control_sockets(home: &TempHome) -> Vec<String> {
    std::fs::read_dir(&home.0)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("control-"))
                .collect()
        })
        .unwrap_or_default()
}

// Multi-threaded: the rendezvous serves on the runtime while this thread waits on logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_stops_on_sigterm_and_sigint_and_removes_its_control_socket() {
    let server = rendezvous().await;
    let signaling = server.addrs().signaling.to_string();
    for (sig, name) in [(Signal::TERM, "term-pc"), (Signal::INT, "int-pc")] {
        let home = TempHome::new();
        let peer = Proc::start(
            Command::new(workspace_bin("peer"))
                .arg("--home")
                .arg(&home.0)
                .args(["expose", "7274", "--name", name, "--rendezvous", &signaling]),
        );
        peer.wait_line("registered");
        assert_eq!(
            control_sockets(&home).len(),
            1,
            "the running peer serves its status"
        );
        peer.signal(sig);
        let status = tokio::task::spawn_blocking(move || peer.exit())
            .await
            .unwrap();
        assert!(status.success(), "{name}: exit status {status}");
        assert!(
            control_sockets(&home).is_empty(),
            "{name}: control socket left behind"
        );
    }
}

#[tokio::test]
async fn relay_stops_on_sigterm() {
    let relay = Proc::start(Command::new(workspace_bin("relay")).args([
        "--listen",
        "127.0.0.1:0",
        "--key",
        &"ab".repeat(32),
    ]));
    relay.wait_line("relay listening");
    relay.signal(Signal::TERM);
    relay.wait_line("relay stopped");
    let status = tokio::task::spawn_blocking(move || relay.exit())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// A server started under a low soft limit of open files raises it to the hard limit, so
/// that many users are not refused with "Too many open files" long before its own limits.
#[tokio::test]
async fn servers_raise_their_open_file_limit() {
    let relay = Proc::start(Command::new("sh").arg("-c").arg(format!(
        "ulimit -Sn 256 && exec {} --listen 127.0.0.1:0 --key {}",
        workspace_bin("relay").display(),
        "cd".repeat(32)
    )));
    relay.wait_line("relay listening");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a limit line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "Max open files  SOFT  HARD  files"
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "256", "{line}");
    relay.signal(Signal::TERM);
    let status = tokio::task::spawn_blocking(move || relay.exit())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

// `peer ls` speaks for the home's key: a rendezvous without a token lists peers only to a
// key that holds a name there, so a stranger learns nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_ls_lists_only_for_a_home_that_holds_a_name() {
    let server = rendezvous().await;
    let signaling = server.addrs().signaling.to_string();
    let home = TempHome::new();
    let ls = {
        let (home, signaling) = (home.0.clone(), signaling.clone());
        move || {
            Command::new(workspace_bin("peer"))
                .arg("--home")
                .arg(&home)
                .args(["ls", "--rendezvous", &signaling])
                .output()
                .expect("peer ls runs")
        }
    };
    let stranger = tokio::task::spawn_blocking(ls.clone()).await.unwrap();
    let why = String::from_utf8_lossy(&stranger.stderr);
    assert!(!stranger.status.success(), "a stranger was served a list");
    assert!(why.contains("hold a name"), "{why}");

    let exposer = Proc::start(
        Command::new(workspace_bin("peer"))
            .arg("--home")
            .arg(&home.0)
            .args([
                "expose",
                "7274",
                "--name",
                "ls-pc",
                "--rendezvous",
                &signaling,
            ]),
    );
    exposer.wait_line("registered");
    let member = tokio::task::spawn_blocking(ls).await.unwrap();
    let listing = String::from_utf8_lossy(&member.stdout);
    assert!(
        member.status.success(),
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
    assert!(listing.contains("ls-pc"), "{listing}");
}

/// Reads at least `bytes` of a download from `s` (bounded in time), so it is under way.
async fn download(s: &mut tokio::net::TcpStream, buf: &mut [u8], bytes: usize) {
    use tokio::io::AsyncReadExt;
    let mut got = 0usize;
    while got < bytes {
        let n = chuantou_tests::within("download", s.read(buf))
            .await
            .unwrap();
        assert!(n > 0, "the download ended early");
        got += n;
    }
}

/// A service that streams bytes to each connection until the reader goes away (at most
/// 1 GiB, so it always stops).
async fn endless_service() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                for _ in 0..16 * 1024 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

// SIGTERM to an exposer in the middle of a download: the exposer closes its sessions with a
// reason before it exits, so the downloading side's connection ends at once (not after an
// idle timeout), and it says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_an_exposer_ends_the_download_on_the_other_side_within_a_second() {
    use tokio::io::AsyncReadExt;
    chuantou_tests::logs();
    let server = rendezvous().await;
    let signaling = server.addrs().signaling.to_string();
    let service = endless_service().await;
    let home = TempHome::new();
    let exposer = Proc::start(
        Command::new(workspace_bin("peer"))
            .arg("--home")
            .arg(&home.0)
            .args(["expose", &service.port().to_string(), "--name", "dl-pc"])
            .args(["--rendezvous", &signaling]),
    );
    exposer.wait_line("registered");
    let phone = TempHome::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let local = chuantou_tests::reach(&server, &phone, "dl-pc", &stop)
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    download(&mut s, &mut buf, 4 * 1024 * 1024).await;
    exposer.signal(Signal::TERM);
    let signalled = Instant::now();
    let ended = chuantou_tests::within("the download ends", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await;
    let took = ended - signalled;
    println!("the download ended {took:?} after SIGTERM to the exposer");
    let status = tokio::task::spawn_blocking(move || exposer.exit())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < std::time::Duration::from_secs(1),
        "the download ran on {took:?} after the exposer was stopped"
    );
    assert!(
        control_sockets(&home).is_empty(),
        "control socket left behind"
    );
    stop.cancel();
}

// Two processes exposing one name from one home used to take the name from each other
// forever ("registered again from another connection"); the second now says who holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_for_the_same_name_says_which_process_holds_it() {
    let server = rendezvous().await;
    let signaling = server.addrs().signaling.to_string();
    let home = TempHome::new();
    let expose = |port: &str| {
        let mut c = Command::new(workspace_bin("peer"));
        c.arg("--home").arg(&home.0).args([
            "expose",
            port,
            "--name",
            "twice",
            "--rendezvous",
            &signaling,
        ]);
        c
    };
    let first = Proc::start(&mut expose("7274"));
    first.wait_line("registered");
    let mut second = expose("8080");
    let out = tokio::task::spawn_blocking(move || second.output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let pid = first.child.id().to_string();
    assert!(
        err.contains("twice is already served from") && err.contains(&pid),
        "{err}"
    );
    assert!(err.contains("peer expose 7274 --name twice"), "{err}");
    // Another name from the same home is fine.
    let other = Proc::start(
        Command::new(workspace_bin("peer"))
            .arg("--home")
            .arg(&home.0)
            .args([
                "expose",
                "8080",
                "--name",
                "other",
                "--rendezvous",
                &signaling,
            ]),
    );
    other.wait_line("registered");
}

// And the other way: SIGTERM to a `peer reach` mid-download ends the exposing side's
// connection to its service at once, not after the session's idle timeout. (Its close
// used to be lost now and then: the session dropped its links, relay and punched TCP,
// the moment the connection closed, taking the close still queued on one with them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_reach_ends_the_exposers_service_connection_within_a_second() {
    use tokio::io::AsyncWriteExt;
    let server = rendezvous().await;
    let signaling = server.addrs().signaling.to_string();
    // A service that reports when its client (the exposer's connection) goes away.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = l.local_addr().unwrap();
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::channel::<Instant>(1);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let gone_tx = gone_tx.clone();
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                for _ in 0..16 * 1024 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let _ = gone_tx.send(Instant::now()).await;
            });
        }
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let pc = TempHome::new();
    chuantou_tests::expose(&server, &pc, "dl-pc2", service, vec![], &stop);
    chuantou_tests::online(&server, "dl-pc2").await;
    let local = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let phone = TempHome::new();
    let reach = Proc::start(
        Command::new(workspace_bin("peer"))
            .arg("--home")
            .arg(&phone.0)
            .args(["reach", "dl-pc2", "--local", &local.to_string()])
            .args(["--rendezvous", &signaling]),
    );
    reach.wait_line("reaching");
    let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    download(&mut s, &mut buf, 4 * 1024 * 1024).await;
    // No more reading: the service's writes block, so only the stop can end them.
    reach.signal(Signal::TERM);
    let signalled = Instant::now();
    let gone = chuantou_tests::within("the service's connection ends", gone_rx.recv())
        .await
        .unwrap();
    let took = gone.saturating_duration_since(signalled);
    println!("the service's connection ended {took:?} after SIGTERM to the reach");
    assert!(
        took < std::time::Duration::from_secs(1),
        "the exposer held the service's connection {took:?} after the reach stopped"
    );
    let status = tokio::task::spawn_blocking(move || reach.exit())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        control_sockets(&phone).is_empty(),
        "control socket left behind"
    );
    drop(s);
    stop.cancel();
}
