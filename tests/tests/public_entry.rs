//! Public entries with real clients that run no `peer`: curl by host name
//! (`http://pc-home.localhost:PORT/`, which curl resolves to loopback) and on a raw public
//! port, Python `websockets` through the public URL, a TLS service reached by server name
//! with its own certificate verified by curl end to end, basic auth, the pages for an
//! offline name, an unknown one and a service where nothing listens, and 100 concurrent
//! clients each fetching 1 MiB intact.

use std::process::{Command, Stdio};
use std::time::Duration;

use chuantou_tests::public::*;
use chuantou_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wire::signal::HttpAuth;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn curl(args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_by_host_name_and_on_a_public_port() {
    let site = published_site(1, |port| publish(port, true, false, true, None)).await;
    let (server, big_sha) = (&site.server, site.big_sha.clone());
    let http = server.addrs().public_http.unwrap();
    let url = format!("http://pc-home.{DOMAIN}:{}/big", http.port());
    let (ok, body, err) = tokio::task::spawn_blocking(move || curl(&[&url]))
        .await
        .unwrap();
    assert!(ok, "curl by host name: {err}");
    assert_eq!(sha(&body), big_sha, "the page by host name arrives intact");

    // The raw port: the rendezvous logged and listed it; find it in the dashboard.
    let api = server.addrs().http.unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&get(api, "127.0.0.1", "/v1/dashboard", "").await.body).unwrap();
    let urls: Vec<String> = v["public"][0]["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    assert!(
        urls.contains(&format!("http://pc-home.{DOMAIN}:{}/", http.port())),
        "{urls:?}"
    );
    let raw = urls
        .iter()
        .find_map(|u| u.strip_prefix("tcp://"))
        .unwrap_or_else(|| panic!("no raw port in {urls:?}"));
    let raw_port = raw.rsplit(':').next().unwrap().to_owned();
    let url = format!("http://127.0.0.1:{raw_port}/small");
    let (ok, body, err) = tokio::task::spawn_blocking(move || curl(&[&url]))
        .await
        .unwrap();
    assert!(ok, "curl on the public port: {err}");
    assert_eq!(body, vec![b'x'; 100]);

    // Metrics count what went through.
    let m = String::from_utf8(get(api, "127.0.0.1", "/metrics", "").await.body).unwrap();
    for line in [
        "chuantou_public_connections_total{entry=\"http\"} 1",
        "chuantou_public_connections_total{entry=\"port\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }
    let to_client: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("chuantou_public_bytes_total{direction=\"to_client\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(to_client > 1 << 20, "{to_client} bytes counted to clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_unknown_names_offline_names_and_dead_services_get_clear_pages() {
    let auth = HttpAuth::Basic {
        user: "amy".into(),
        password: "s3cret".into(),
    };
    let site = published_site(0, |port| publish(port, true, false, false, Some(auth))).await;
    let (server, stop) = (&site.server, site.stop.clone());
    let http = server.addrs().public_http.unwrap();
    let host = format!("pc-home.{DOMAIN}");

    let r = get(http, &host, "/small", "").await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(
        r.head.contains("WWW-Authenticate: Basic realm=\"pc-home\""),
        "{}",
        r.head
    );
    // "amy:wrong" and "amy:s3cret".
    let r = get(
        http,
        &host,
        "/small",
        "Authorization: Basic YW15Ondyb25n\r\n",
    )
    .await;
    assert_eq!(r.status, 401, "a wrong password is refused");
    let r = get(
        http,
        &host,
        "/small",
        "Authorization: Basic YW15OnMzY3JldA==\r\n",
    )
    .await;
    assert_eq!((r.status, r.body.len()), (200, 100), "{}", r.head);

    // A name nobody published, and a host outside the domain.
    let r = get(http, &format!("nobody.{DOMAIN}"), "/", "").await;
    assert_eq!(r.status, 404);
    assert!(String::from_utf8_lossy(&r.body).contains("nobody"));
    let r = get(http, "example.org", "/", "").await;
    assert_eq!(r.status, 404);

    // Malformed requests get 400, not a hang.
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    // A published service where nothing listens: 502 saying so.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let _dead = expose_public(
        server,
        "dead",
        dead_port,
        publish(dead_port, true, false, false, None),
        &stop,
    )
    .await;
    let r = get(http, &format!("dead.{DOMAIN}"), "/", "").await;
    assert_eq!(r.status, 502, "{}", r.head);
    assert!(String::from_utf8_lossy(&r.body).contains("nothing listens"));

    // The exposer stops: its clients get 503 "offline", at once, not a hang.
    stop.cancel();
    let api = server.addrs().http.unwrap();
    within("pc-home offline", async {
        loop {
            let r = get(api, "127.0.0.1", "/v1/peers/pc-home", "").await;
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            if v["online"] == false {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let r = get(
        http,
        &host,
        "/",
        "Authorization: Basic YW15OnMzY3JldA==\r\n",
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.head);
    assert!(r.head.contains("Retry-After"));
    assert!(String::from_utf8_lossy(&r.body).contains("pc-home is offline"));
}

/// Connects to the public URL by name, with the socket going to the entry's address.
const WS_CLIENT: &str = r#"
import asyncio, os, sys, websockets
async def main():
    url, port = sys.argv[1], int(sys.argv[2])
    async with websockets.connect(url, host="127.0.0.1", port=port, max_size=None) as ws:
        for i in range(30):
            msg = os.urandom(997 * i * i + 1)
            await ws.send(msg)
            assert await ws.recv() == msg, f"binary message {i}"
        await ws.send("chuantou ✓ 穿透")
        assert await ws.recv() == "chuantou ✓ 穿透"
    print("ok")
asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_work_through_the_public_url() {
    let (_ws, port) = ws_echo_server().await;
    let (server, _) = public_rendezvous().await;
    let stop = CancellationToken::new();
    let _pc = expose_public(
        &server,
        "ws",
        port,
        publish(port, true, false, false, None),
        &stop,
    )
    .await;
    let http = server.addrs().public_http.unwrap();
    let url = format!("ws://ws.{DOMAIN}:{}/", http.port());
    let out = within(
        "websocket client",
        tokio::task::spawn_blocking(move || {
            Command::new("timeout")
                .args([
                    "60",
                    "python3",
                    "-c",
                    WS_CLIENT,
                    &url,
                    &http.port().to_string(),
                ])
                .output()
                .unwrap()
        }),
    )
    .await
    .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_passed_through_and_the_services_certificate_verifies_end_to_end() {
    let dir = TempHome::new();
    chuantou_tests::web::site(&dir.0, 0);
    let name = "secure";
    let host = format!("{name}.{DOMAIN}");
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={host}")])
        .args(["-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (_srv, port) = file_server(&dir.0, Some((&cert, &key))).await;
    let (server, _) = public_rendezvous().await;
    let stop = CancellationToken::new();
    let _pc = expose_public(
        &server,
        name,
        port,
        publish(port, false, true, false, None),
        &stop,
    )
    .await;
    let tls = server.addrs().public_tls.unwrap();
    let url = format!("https://{host}:{}/small", tls.port());
    let ca = cert.display().to_string();
    // curl checks the chain against the service's own certificate and the name against
    // the URL: only the service holds that key, so this is end to end.
    let (ok, body, err) = tokio::task::spawn_blocking(move || curl(&["--cacert", &ca, &url]))
        .await
        .unwrap();
    assert!(ok, "curl over the TLS entry: {err}");
    assert_eq!(body, vec![b'x'; 100]);
    // Without the service's certificate as a trust anchor, curl refuses it: the entry did
    // not terminate TLS with a certificate of its own.
    let url = format!("https://{host}:{}/small", tls.port());
    let (ok, _, err) = tokio::task::spawn_blocking(move || curl(&[&url]))
        .await
        .unwrap();
    assert!(!ok && err.contains("certificate"), "{err}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_public_clients_each_fetch_a_mebibyte_intact() {
    let site = published_site(1, |port| publish(port, true, false, false, None)).await;
    let (server, big_sha) = (&site.server, site.big_sha.clone());
    let http = server.addrs().public_http.unwrap();
    let host = format!("pc-home.{DOMAIN}");
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move { get(http, &host, "/big", "").await })
        })
        .collect();
    let got = within("100 clients", futures_join(clients)).await;
    for (i, r) in got.into_iter().enumerate() {
        assert_eq!(r.status, 200, "client {i}: {}", r.head);
        assert_eq!(sha(&r.body), big_sha, "client {i}: the body arrives intact");
    }
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_take_the_public_flags_log_the_url_and_show_it_in_peer_status() {
    let dir = TempHome::new();
    let big_sha = chuantou_tests::web::site(&dir.0, 32);
    let (_srv, port) = file_server(&dir.0, None).await;
    let (base, _) = free_ports(5);
    let (signaling, http, raw) = (base, base + 3, base + 4);
    let state = TempHome::new();
    let mut rv = std::process::Command::new(workspace_bin("rendezvous"));
    rv.arg("--state")
        .arg(&state.0)
        .args(["--listen", &format!("127.0.0.1:{signaling}")])
        .args(["--stun", &format!("127.0.0.1:{}", base + 1)])
        .args(["--relay", &format!("127.0.0.1:{}", base + 2)])
        .arg("--no-http")
        .args(["--public-http", &format!("127.0.0.1:{http}")])
        .args(["--public-domain", DOMAIN])
        .args(["--public-ports", &format!("127.0.0.1:{raw}-{raw}")])
        .args(["--publish-allow", "any"])
        .stderr(Stdio::null());
    let _rv = KillOnDrop(rv.spawn().unwrap());
    let pc = TempHome::new();
    let log = pc.0.with_extension("log");
    let mut expose = std::process::Command::new(workspace_bin("peer"));
    expose
        .arg("--home")
        .arg(&pc.0)
        .args([
            "expose",
            &port.to_string(),
            "--name",
            "pc-home",
            "--public",
            "--public-port",
        ])
        .args(["--rendezvous", &format!("127.0.0.1:{signaling}")])
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let _pc = KillOnDrop(expose.spawn().unwrap());
    let url = format!("http://pc-home.{DOMAIN}:{http}/");
    within("the URL in the log", async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(&format!("public at {url}, tcp://{DOMAIN}:{raw}")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let status = std::process::Command::new(workspace_bin("peer"))
        .arg("--home")
        .arg(&pc.0)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("public at {url}")), "{text}");
    assert!(
        text.contains(&format!("public at tcp://{DOMAIN}:{raw}")),
        "{text}"
    );
    // A long download (32 MiB) by the public URL, and a page on the raw port.
    let big = format!("{url}big");
    let (ok, body, err) = tokio::task::spawn_blocking(move || curl(&[&big]))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(sha(&body), big_sha);
    let small = format!("http://127.0.0.1:{raw}/small");
    let (ok, body, err) = tokio::task::spawn_blocking(move || curl(&[&small]))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(body, vec![b'x'; 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_name_keeps_to_its_connection_limit_and_its_rate() {
    let dir = TempHome::new();
    chuantou_tests::web::site(&dir.0, 1);
    let (_srv, port) = file_server(&dir.0, None).await;
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let rate = 256 * 1024;
    let config = rendezvous::server::ServerConfig {
        public: rendezvous::public::PublicConfig {
            http: Some(any),
            domain: Some(DOMAIN.into()),
            allow_any: true,
            max_conns: 2,
            rate: Some(rate),
            ..rendezvous::server::ServerConfig::default().public
        },
        ..rendezvous::server::ServerConfig::loopback()
    };
    let server = rendezvous_with(config).await;
    let stop = CancellationToken::new();
    let _pc = expose_public(
        &server,
        "pc-home",
        port,
        publish(port, true, false, false, None),
        &stop,
    )
    .await;
    let http = server.addrs().public_http.unwrap();
    let host = format!("pc-home.{DOMAIN}");

    // Two kept-alive connections hold both slots; a third gets 503 at once.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(http).await.unwrap();
        s.write_all(format!("GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = within("first answer", s.read(&mut buf)).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.0 200") || buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let r = get(http, &host, "/small", "").await;
    assert_eq!(r.status, 503, "{}", r.head);
    assert!(String::from_utf8_lossy(&r.body).contains("2 connections open"));
    drop(held);
    // Once they close, their slots are free again (as their pumps end): the dashboard
    // counts none open.
    let api = server.addrs().http.unwrap();
    within("the slots freed", async {
        loop {
            let v: serde_json::Value =
                serde_json::from_slice(&get(api, "127.0.0.1", "/v1/dashboard", "").await.body)
                    .unwrap();
            if v["public"][0]["open"] == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(get(http, &host, "/small", "").await.status, 200);

    // 1 MiB at 256 KiB/s with one second's burst takes at least three seconds.
    let started = std::time::Instant::now();
    let r = get(http, &host, "/big", "").await;
    assert_eq!((r.status, r.body.len()), (200, 1 << 20));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2700),
        "1 MiB at 256 KiB/s took only {took:?}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_service_on_a_public_port_echoes_each_clients_datagrams() {
    let echo = udp_echo_service().await;
    let (server, _) = public_rendezvous().await;
    let stop = CancellationToken::new();
    let home = TempHome::new();
    expose_proto(
        &server,
        &home,
        "dns-ish",
        echo,
        ExposeOpts {
            udp: true,
            public: Some(wire::signal::Publish {
                service: wire::signal::ServiceRef {
                    port: echo.port(),
                    proto: wire::signal::Proto::Udp,
                },
                http: false,
                tls: false,
                port: Some(None),
                auth: None,
            }),
            ..ExposeOpts::default()
        },
        &stop,
    );
    let api = server.addrs().http.unwrap();
    let port: u16 = within("the udp port listed", async {
        loop {
            let v: serde_json::Value =
                serde_json::from_slice(&get(api, "127.0.0.1", "/v1/dashboard", "").await.body)
                    .unwrap();
            let url = v["public"].as_array().unwrap().iter().find_map(|p| {
                p["urls"].as_array().unwrap().iter().find_map(|u| {
                    u.as_str()
                        .and_then(|u| u.strip_prefix(&format!("udp://{DOMAIN}:")))
                        .map(|p| p.parse::<u16>().unwrap())
                })
            });
            if let Some(p) = url {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Two clients, each its own flow; one datagram looks like relay control and must pass
    // as data all the same.
    for client in 0..2u8 {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(("127.0.0.1", port)).await.unwrap();
        let mut msgs: Vec<Vec<u8>> = (0..20u8).map(|i| vec![client, i, 7, 7, 7]).collect();
        msgs.push(vec![0, b'C', b'T', b'R', 1, 2, 3]);
        msgs.push(vec![client; 1200]);
        for (i, m) in msgs.iter().enumerate() {
            // UDP may drop while the flow is set up: send again until the echo comes; a
            // late echo of an earlier message is no answer, anything else is wrong.
            let mut buf = vec![0u8; 2048];
            within("echo", async {
                loop {
                    sock.send(m).await.unwrap();
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await
                    {
                        if &buf[..n] == m.as_slice() {
                            return;
                        }
                        assert!(
                            msgs[..i].iter().any(|e| e.as_slice() == &buf[..n]),
                            "client {client}: stray {:?}",
                            &buf[..n]
                        );
                    }
                }
            })
            .await;
        }
    }
    let m = String::from_utf8(get(api, "127.0.0.1", "/metrics", "").await.body).unwrap();
    assert!(
        m.lines()
            .any(|l| l == "chuantou_public_connections_total{entry=\"udp\"} 2"),
        "two flows:\n{m}"
    );
    stop.cancel();
}
