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
