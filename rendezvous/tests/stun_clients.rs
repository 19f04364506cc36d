//! The STUN responder against clients that are not ours (coturn's turnutils, Python's
//! pystun3 speaking classic RFC 3489), and RFC 5780 CHANGE-REQUEST answers arriving from
//! the alternate IP and port (127.0.0.2 is a second loopback address on Linux).

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use rendezvous::server::{ServerConfig, ServerHandle};
use tokio::net::UdpSocket;
use wire::stun::{binding_request, parse_response};

/// A server with an RFC 5780 layout on 127.0.0.1 / 127.0.0.2. The alternate needs fixed
/// ports, so pick a free one and retry if another process takes it first.
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
            ..loopback_config()
        };
        if let Ok(s) = rendezvous::server::Server::bind(config).await {
            return s.spawn();
        }
    }
    panic!("no free STUN port pair on loopback");
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run scripts/test (it installs coturn and pystun3), \
         or apt-get install coturn"
    );
    Command::new(name)
}

async fn run(mut cmd: Command) -> String {
    let out = within(
        "third-party client",
        tokio::task::spawn_blocking(move || cmd.output().expect("run client")),
    )
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "client failed:\n{text}");
    text
}

#[tokio::test]
async fn coturn_stunclient_gets_mapped_and_other_address() {
    let server = rfc5780_server().await;
    let layout = server.addrs().stun.unwrap();
    let mut cmd = tool("turnutils_stunclient");
    cmd.args(["-p", &layout.primary.port().to_string(), "127.0.0.1"]);
    let out = run(with_timeout(cmd)).await;
    // Three exchanges: plain; RESPONSE-PORT with CHANGE-REQUEST (answered from the
    // alternate address to another local port); PADDING with CHANGE-REQUEST.
    assert!(out.contains("RFC 5780 response 3"), "{out}");
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
    let alt = layout.alternate.unwrap();
    assert!(out.contains(&format!("Other addr: : {alt}")), "{out}");
    assert!(
        out.contains(&format!("Response origin: : {}", layout.primary)),
        "{out}"
    );
}

#[tokio::test]
async fn coturn_natdiscovery_sees_no_nat_on_loopback() {
    let server = rfc5780_server().await;
    let port = server.addrs().stun.unwrap().primary.port();
    let mut cmd = tool("turnutils_natdiscovery");
    cmd.args(["-m", "-f", "-p", &port.to_string(), "127.0.0.1"]);
    let out = run(with_timeout(cmd)).await;
    // Mapping and filtering discovery both need the CHANGE-REQUEST answers from the
    // alternate IP and port to arrive.
    assert!(
        out.contains("NAT with Endpoint Independent Mapping"),
        "{out}"
    );
    assert!(
        out.contains("NAT with Endpoint Independent Filtering"),
        "{out}"
    );
    assert!(out.contains("Response origin: : 127.0.0.2:"), "{out}");
}

#[tokio::test]
async fn pystun3_classic_client_sees_open_internet() {
    let server = rfc5780_server().await;
    let port = server.addrs().stun.unwrap().primary.port();
    let mut cmd = tool("python3");
    cmd.args([
        "-c",
        &format!(
            "import stun; t, ip, p = stun.get_ip_info(source_ip='127.0.0.1', source_port=0, \
             stun_host='127.0.0.1', stun_port={port}); print(t, ip, p)"
        ),
    ]);
    let out = run(with_timeout(cmd)).await;
    assert!(
        out.starts_with("Open Internet 127.0.0.1 "),
        "pystun3 (RFC 3489) said: {out}\n(if it says No module named 'stun': pip install pystun3)"
    );
}

#[tokio::test]
async fn change_request_replies_come_from_the_alternate_ip_and_port() {
    let server = rfc5780_server().await;
    let layout = server.addrs().stun.unwrap();
    let alt = layout.alternate.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for (ip, port) in [(false, false), (false, true), (true, false), (true, true)] {
        let want = SocketAddr::new(
            if ip { alt.ip() } else { layout.primary.ip() },
            if port {
                alt.port()
            } else {
                layout.primary.port()
            },
        );
        let req = binding_request(None, Some((ip, port))).unwrap();
        sock.send_to(&req.bytes, layout.primary).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = within("change-request reply", sock.recv_from(&mut buf))
            .await
            .unwrap();
        assert_eq!(from, want, "change ip={ip} port={port}");
        let resp = parse_response(&buf[..n], &req.tid, None).unwrap();
        assert_eq!(resp.origin, Some(want));
        assert_eq!(resp.mapped, sock.local_addr().unwrap());
        assert_eq!(resp.other, Some(alt));
    }
}

/// Wraps a command in coreutils `timeout` so a client that waits forever cannot hang the
/// test run (its own retransmissions end well before).
fn with_timeout(cmd: Command) -> Command {
    let mut w = Command::new("timeout");
    w.arg("15").arg(cmd.get_program()).args(cmd.get_args());
    w
}

/// A one-IP server's second STUN port: named to peers at `Welcome`, answering Binding
/// requests as the first does, and never the embedded relay's port (here the STUN port
/// + 1, so it goes one further).
#[tokio::test]
async fn the_second_stun_port_is_named_at_welcome_answers_and_skips_the_relays() {
    let mut found = None;
    for _ in 0..20 {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        if port > u16::MAX - 2 {
            continue;
        }
        let mut config = ServerConfig {
            stun: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            ..loopback_config()
        };
        if let Some(r) = config.relay.as_mut() {
            r.listen = SocketAddr::from(([127, 0, 0, 1], port + 1));
        }
        // Another process may hold one of the three ports: try another.
        match rendezvous::server::Server::bind(config).await {
            Ok(s) if s.addrs().stun.and_then(|l| l.port2) == Some(port + 2) => {
                found = Some((s.spawn(), port));
                break;
            }
            _ => continue,
        }
    }
    let (server, port) = found.expect("no three free ports in a row on loopback");
    let c = client(&server).await;
    assert_eq!(c.welcome().stun_port2, Some(port + 2));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let req = binding_request(None, None).unwrap();
    sock.send_to(&req.bytes, ("127.0.0.1", port + 2))
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = within("second port answers", sock.recv_from(&mut buf))
        .await
        .unwrap();
    assert_eq!(from, SocketAddr::from(([127, 0, 0, 1], port + 2)));
    let resp = parse_response(&buf[..n], &req.tid, None).unwrap();
    assert_eq!(resp.mapped, sock.local_addr().unwrap());
    assert_eq!(resp.other, None, "no RFC 5780 OTHER-ADDRESS from one IP");
}
