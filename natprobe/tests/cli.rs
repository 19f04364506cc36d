//! The natprobe binary on this machine (no NAT) against a loopback rendezvous, against a
//! plain STUN server, against nothing at all, and with bad arguments.

use std::net::SocketAddr;
use std::process::{Command, Output};

use rendezvous::server::{Server, ServerConfig, ServerHandle};
use serde_json::Value;

fn natprobe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_natprobe"))
        .args(args)
        .env_remove("CHUANTOU_RENDEZVOUS")
        .output()
        .unwrap()
}

async fn natprobe_json(mut args: Vec<String>) -> Value {
    args.push("--json".into());
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        natprobe(&args)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "natprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn plain_config() -> ServerConfig {
    let mut c = ServerConfig::loopback();
    c.http = None;
    c.relay = None;
    c
}

/// A rendezvous whose STUN responder is RFC 5780 on 127.0.0.1 and 127.0.0.2 (fixed ports,
/// so pick a free one and retry if another process takes it first).
async fn rfc5780_server() -> ServerHandle {
    for _ in 0..20 {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        if port == u16::MAX {
            continue;
        }
        let config = ServerConfig {
            stun: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            alt_ip: Some("127.0.0.2".parse().unwrap()),
            ..plain_config()
        };
        if let Ok(s) = Server::bind(config).await {
            return s.spawn();
        }
    }
    panic!("no free STUN port pair on loopback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_machine_without_nat_is_open() {
    let server = rfc5780_server().await;
    let stun = server.addrs().stun.unwrap().primary;
    let r = natprobe_json(vec!["--server".into(), stun.to_string(), "--tcp".into()]).await;
    let u = &r["udp"];
    assert_eq!(u["nat_type"], "open", "{r}");
    assert_eq!(u["mapping"], "endpoint-independent", "{r}");
    assert_eq!(u["filtering"], "endpoint-independent", "{r}");
    assert_eq!(u["public_addr"], u["local_addr"], "{r}");
    assert_eq!(u["port_allocation"], "preserved", "{r}");
    assert_eq!(u["hairpin"], true, "{r}");
    assert_eq!(r["tcp"]["mapping"], "endpoint-independent", "{r}");
    for (_, v) in r["direct"].as_object().unwrap() {
        assert!(v == "likely" || v == "unlikely", "{r}");
    }
    assert_eq!(r["direct"]["symmetric"], "likely");
    assert_eq!(r["direct"]["udp-blocked"], "unlikely");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_server_gives_what_it_can_and_says_what_it_cannot() {
    let server = Server::bind(plain_config()).await.unwrap().spawn();
    let stun = server.addrs().stun.unwrap().primary;
    let r = natprobe_json(vec!["--server".into(), stun.to_string()]).await;
    let u = &r["udp"];
    // No translation is visible without RFC 5780; filtering is not.
    assert_eq!(u["mapping"], "endpoint-independent", "{r}");
    assert_eq!(u["filtering"], Value::Null, "{r}");
    assert_eq!(u["nat_type"], Value::Null, "{r}");
    let notes = r["notes"].to_string();
    assert!(notes.contains("not an RFC 5780 server"), "{r}");
    assert!(notes.contains("two --server"), "{r}");

    // The text report says the same in words.
    let out = natprobe(&["--server", &stun.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("could not be determined"), "{text}");
    assert!(text.contains("not an RFC 5780 server"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_is_reported_not_a_hang_and_not_a_success() {
    // A port where nothing listens: no answer ever comes.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let server = addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        natprobe(&["--server", &server, "--rto", "100", "--json"])
    })
    .await
    .unwrap();
    // The report still says what was seen, naming the server asked (not a local port)...
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["udp"]["nat_type"], "udp-blocked", "{r}");
    assert_eq!(r["server"], addr.to_string(), "{r}");
    assert!(
        r["notes"][0]
            .as_str()
            .unwrap()
            .contains("Only TCP or the relay"),
        "{r}"
    );
    assert_eq!(r["tcp"], Value::Null);
    // ...and the exit status says nothing was measured.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("no STUN answer from {addr}")),
        "{err}"
    );
}

#[test]
fn bad_arguments_get_clear_errors() {
    let out = natprobe(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("give --server HOST[:PORT] or set CHUANTOU_RENDEZVOUS")
    );
    let out = natprobe(&["--server", "a", "--server", "b", "--server", "c"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most two --server"));
    let out = natprobe(&["--server", "no-such-host.invalid"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resolving STUN server no-such-host.invalid")
    );
    let out = natprobe(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("RFC 5780"));
}
