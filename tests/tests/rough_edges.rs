//! The rough edges a new user met, each as they met it: a rendezvous given without a port,
//! an error whose cause was printed twice, a closed stderr that made `peer` panic, and
//! `natprobe` reporting a local port as the server and success when nothing answered, or
//! a lifetime "about 9.8 s" on a machine with no NAT at all.

use std::process::{Command, Stdio};

use chuantou_tests::{TempHome, rendezvous, workspace_bin};

fn peer(home: &TempHome) -> Command {
    let mut c = Command::new(workspace_bin("peer"));
    c.arg("--home").arg(&home.0);
    c
}

#[test]
fn a_rendezvous_without_a_port_is_tried_on_7000_and_each_cause_is_said_once() {
    let home = TempHome::new();
    // Nothing listens on 127.0.0.1:7000 in the tests (every server takes a free port).
    let out = peer(&home)
        .args(["ls", "--rendezvous", "127.0.0.1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("127.0.0.1:7000"), "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
}

#[test]
fn a_closed_stderr_is_no_reason_to_panic() {
    let home = TempHome::new();
    let mut child = peer(&home)
        .args(["ls", "--rendezvous", "127.0.0.1:1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before anything is written: every write gets EPIPE.
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status} (101 is a panic)");
}

#[test]
fn natprobe_without_an_answer_names_the_server_and_fails() {
    // Port 9 (discard): nothing answers STUN there.
    let out = Command::new(workspace_bin("natprobe"))
        .args(["--server", "127.0.0.1:9"])
        .output()
        .unwrap();
    let (report, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{report}\n{err}");
    assert!(
        report
            .lines()
            .next()
            .unwrap_or_default()
            .contains("127.0.0.1:9"),
        "{report}"
    );
    assert!(err.contains("no STUN answer from 127.0.0.1:9"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natprobe_lifetime_without_a_nat_is_at_least_the_searched_maximum() {
    let server = rendezvous().await;
    let stun = server.addrs().stun.unwrap().primary.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(workspace_bin("natprobe"))
            .args(["--server", &stun, "--lifetime", "--lifetime-max", "5"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    let line = report
        .lines()
        .find(|l| l.contains("mapping lifetime"))
        .unwrap_or_default();
    assert!(line.contains("at least 5 s"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_through_a_rendezvous_without_a_relay_says_so() {
    use tokio::io::AsyncReadExt;
    let config = rendezvous::server::ServerConfig {
        relay: None,
        ..rendezvous::server::ServerConfig::loopback()
    };
    let server = rendezvous::server::Server::bind(config)
        .await
        .unwrap()
        .spawn();
    let stop = tokio_util::sync::CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = chuantou_tests::echo_service().await;
    chuantou_tests::expose(&server, &pc, "pc-home", echo, vec![], &stop);
    chuantou_tests::online(&server, "pc-home").await;
    let local = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = phone.0.with_extension("log");
    let reach = chuantou_tests::KillOnDrop(
        peer(&phone)
            .args(["reach", "pc-home", "--transport", "relay"])
            .args(["--local", &local.to_string()])
            .args(["--rendezvous", &server.addrs().signaling.to_string()])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The connection is taken and closed: there is no path to carry it.
    let mut s = chuantou_tests::within("reach listening", async {
        loop {
            match tokio::net::TcpStream::connect(local).await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    let mut buf = [0u8; 1];
    let n = chuantou_tests::within("closed", s.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(reach);
    let said = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        said.contains("the rendezvous offers no relay (it runs with --no-relay)"),
        "{said}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_port_where_nothing_listens_is_a_reset_and_the_reaching_side_says_why() {
    let server = rendezvous().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let free = |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (nothing, local) = (free(0), free(1));
    chuantou_tests::expose(&server, &pc, "pc-home", nothing, vec![], &stop);
    chuantou_tests::online(&server, "pc-home").await;
    let log = phone.0.with_extension("log");
    let reach = chuantou_tests::KillOnDrop(
        peer(&phone)
            .args(["reach", "pc-home", "--local", &local.to_string()])
            .args(["--rendezvous", &server.addrs().signaling.to_string()])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{local}/");
    let curl = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "30", "--retry", "20"])
            .args(["--retry-connrefused", "--retry-delay", "0", &url])
            .output()
            .expect("curl is installed (scripts/test installs it)")
    })
    .await
    .unwrap();
    // Not "(52) Empty reply from server", which reads as a broken server: a reset.
    let said = String::from_utf8_lossy(&curl.stderr).into_owned();
    // reach says why a moment after the reset: wait for its line (bounded) before ending it.
    let why = "pc-home cannot reach the service it exposes";
    let log_text = {
        let log = log.clone();
        chuantou_tests::within("reach's explanation", async move {
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains(why) {
                    return text;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
    };
    drop(reach);
    assert_eq!(curl.status.code(), Some(56), "{said}\n{log_text}");
    let _ = std::fs::remove_file(&log);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_ride_a_direct_path_while_the_rendezvous_is_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = rendezvous().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let echo = chuantou_tests::echo_service().await;
    let (_homes, local, board) =
        chuantou_tests::expose_and_reach(&server, "pc-home", echo, Default::default(), &stop).await;
    let once = |msg: &'static [u8]| async move {
        let mut s = tokio::net::TcpStream::connect(local).await?;
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    // The first connection brokers the session; then a direct path takes over.
    assert_eq!(
        chuantou_tests::within("echo", once(b"first"))
            .await
            .unwrap(),
        b"first"
    );
    chuantou_tests::within("direct path", board.wait_path("pc-home", "direct-udp")).await;
    // The rendezvous (and its relay) goes away; the session does not need it.
    server.shutdown().await;
    for _ in 0..3 {
        let back = chuantou_tests::within("echo without the rendezvous", once(b"again"))
            .await
            .unwrap();
        assert_eq!(back, b"again");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_ones_own_exposed_port_on_that_port_is_refused_not_a_loop() {
    let server = rendezvous().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let home = TempHome::new();
    // A port where nothing listens yet: the reach would take it and feed itself.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    chuantou_tests::expose(&server, &home, "pc-home", port, vec![], &stop);
    chuantou_tests::online(&server, "pc-home").await;
    let signaling = server.addrs().signaling.to_string();
    let mut cmd = peer(&home);
    cmd.args(["reach", "pc-home", "--local", &port.to_string()])
        .args(["--rendezvous", &signaling]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("would forward every connection back into itself"),
        "{err}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_ping_shows_each_path_and_which_carries_traffic() {
    let server = rendezvous().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = chuantou_tests::echo_service().await;
    chuantou_tests::expose(&server, &pc, "pc-home", echo, vec![], &stop);
    chuantou_tests::online(&server, "pc-home").await;
    let mut cmd = peer(&phone);
    cmd.args(["ping", "pc-home", "-c", "4", "--interval", "300"])
        .args(["--rendezvous", &server.addrs().signaling.to_string()]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{text}\n{err}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for (i, l) in lines.iter().enumerate() {
        assert!(l.starts_with(&format!("seq={} pc-home", i + 1)), "{text}");
    }
    // By the last round the session has settled on a path and measured its round trip.
    let last = lines[3];
    assert!(last.contains(" via ") && last.contains(" ms"), "{text}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_status_shows_a_registered_expose_that_has_no_session_yet() {
    let server = rendezvous().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let pc = TempHome::new();
    let echo = chuantou_tests::echo_service().await;
    chuantou_tests::expose(&server, &pc, "pc-home", echo, vec![], &stop);
    chuantou_tests::online(&server, "pc-home").await;
    let (text, all) = {
        let mut status = peer(&pc);
        status.arg("status");
        let mut json = peer(&pc);
        json.args(["status", "--json", "--all"]);
        tokio::task::spawn_blocking(move || (status.output().unwrap(), json.output().unwrap()))
            .await
            .unwrap()
    };
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("pc-home") && text.contains("expose") && text.contains("no sessions yet"),
        "{text}"
    );
    assert!(text.contains(&format!("{}/tcp", echo.port())), "{text}");
    let all: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(all["registrations"][0]["name"], "pc-home", "{all}");
    assert_eq!(all["sessions"], serde_json::json!([]), "{all}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_port_given_as_the_rendezvous_is_named_as_such() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // What an HTTP server says to a TLS ClientHello.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = http.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let home = TempHome::new();
    let mut cmd = peer(&home);
    cmd.args(["ls", "--rendezvous", &addr.to_string()]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("answered in plaintext"), "{err}");
    assert!(err.contains("signaling port (7000 by default)"), "{err}");
    assert!(!err.contains("bytes exceeds"), "{err}");
}
