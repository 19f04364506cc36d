//! `peer up`: one process serves every `[[expose]]` of its config.toml (TCP, UDP, and a
//! second TCP service), another every `[[reach]]`; SIGHUP to both adds a fourth service
//! while a transfer through the first runs on, and that transfer arrives intact.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chuantou_tests::{
    TempHome, echo_service, online, rendezvous, udp_echo_service, within, workspace_bin,
};
use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn hangup(&self) {
        let pid = Pid::from_raw(self.0.id() as i32).expect("pid");
        kill_process(pid, Signal::HUP).expect("SIGHUP");
    }
}

fn free() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn up(home: &TempHome) -> Proc {
    Proc(
        Command::new(workspace_bin("peer"))
            .arg("--home")
            .arg(&home.0)
            .arg("up")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn write_config(home: &TempHome, text: &str) {
    std::fs::create_dir_all(&home.0).unwrap();
    std::fs::write(home.0.join("config.toml"), text).unwrap();
}

async fn tcp_echo(local: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    back
}

/// Connects to `local` until a listener is there (the reach process starts it).
async fn connected(local: SocketAddr) -> tokio::net::TcpStream {
    within("local port listening", async {
        loop {
            if let Ok(s) = tokio::net::TcpStream::connect(local).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_serves_every_listed_service_and_sighup_adds_one_without_a_hiccup() {
    let server = rendezvous().await;
    let rv = format!("{}#{}", server.addrs().signaling, server.key());
    let (a, b, c, d) = (
        echo_service().await,
        udp_echo_service().await,
        echo_service().await,
        echo_service().await,
    );
    let (la, lb, lc, ld) = (free(), free_udp(), free(), free());
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let exposes = format!(
        "rendezvous = \"{rv}\"\n\n\
         [[expose]]\nport = {}\nname = \"up-a\"\n\n\
         [[expose]]\nport = {}\nname = \"up-b\"\nproto = \"udp\"\n\n\
         [[expose]]\nport = {}\nname = \"up-c\"\n",
        a.port(),
        b.port(),
        c.port()
    );
    let reaches = format!(
        "rendezvous = \"{rv}\"\n\n\
         [[reach]]\nname = \"up-a\"\nlocal = \"{la}\"\n\n\
         [[reach]]\nname = \"up-b\"\nlocal = \"{lb}\"\nproto = \"udp\"\n\n\
         [[reach]]\nname = \"up-c\"\nlocal = \"{lc}\"\n"
    );
    write_config(&pc, &exposes);
    write_config(&phone, &reaches);
    let exposer = up(&pc);
    for name in ["up-a", "up-b", "up-c"] {
        online(&server, name).await;
    }
    let reacher = up(&phone);

    // Every service answers through the one reaching process.
    drop(connected(la).await);
    assert_eq!(within("echo a", tcp_echo(la, b"to a")).await, b"to a");
    assert_eq!(within("echo c", tcp_echo(lc, b"to c")).await, b"to c");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    let got = within("udp echo b", async {
        loop {
            udp.send_to(b"to b", lb).await.unwrap();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(300), udp.recv(&mut buf)).await
            {
                return buf[..n].to_vec();
            }
        }
    })
    .await;
    assert_eq!(got, b"to b");

    // A transfer through a runs on while both processes reload.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let transfer = {
        let (stop, sent) = (stop.clone(), sent.clone());
        tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(la).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let writer = async {
                // At most 256 MiB, and only until told: the run stays bounded.
                for i in 0..4096u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let chunk: Vec<u8> = (0..65_536u64).map(|k| ((i + k) % 251) as u8).collect();
                    w.write_all(&chunk).await.unwrap();
                    sent.fetch_add(65_536, Ordering::Relaxed);
                }
                w.shutdown().await.unwrap();
            };
            let reader = async {
                let mut all = Vec::new();
                r.read_to_end(&mut all).await.unwrap();
                all
            };
            let ((), back) = tokio::join!(writer, reader);
            back
        })
    };
    within("the transfer under way", async {
        while sent.load(Ordering::Relaxed) < 4 * 1024 * 1024 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    write_config(
        &pc,
        &format!(
            "{exposes}\n[[expose]]\nport = {}\nname = \"up-d\"\n",
            d.port()
        ),
    );
    write_config(
        &phone,
        &format!("{reaches}\n[[reach]]\nname = \"up-d\"\nlocal = \"{ld}\"\n"),
    );
    exposer.hangup();
    online(&server, "up-d").await;
    reacher.hangup();
    drop(connected(ld).await);
    assert_eq!(within("echo d", tcp_echo(ld, b"to d")).await, b"to d");
    stop.store(true, Ordering::Relaxed);

    let back = within("the transfer ends", transfer).await.unwrap();
    let total = sent.load(Ordering::Relaxed);
    assert_eq!(back.len() as u64, total, "bytes lost across the reload");
    for (i, chunk) in back.chunks(65_536).enumerate() {
        let want: Vec<u8> = (0..65_536u64)
            .map(|k| ((i as u64 + k) % 251) as u8)
            .collect();
        assert!(chunk == &want[..], "chunk {i} damaged across the reload");
    }
    // The first three still answer after the reload.
    assert_eq!(
        within("echo c again", tcp_echo(lc, b"again")).await,
        b"again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expose_and_reach_without_arguments_serve_their_lists() {
    let server = rendezvous().await;
    let rv = format!("{}#{}", server.addrs().signaling, server.key());
    let a = echo_service().await;
    let la = free();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    // Each file has both lists; each command takes only its own.
    write_config(
        &pc,
        &format!(
            "rendezvous = \"{rv}\"\n[[expose]]\nport = {}\nname = \"bare-a\"\n\
             [[reach]]\nname = \"nobody\"\n",
            a.port()
        ),
    );
    write_config(
        &phone,
        &format!(
            "rendezvous = \"{rv}\"\n[[reach]]\nname = \"bare-a\"\nlocal = \"{la}\"\n\
             [[expose]]\nport = 1\nname = \"not-this\"\n"
        ),
    );
    let bare = |home: &TempHome, cmd: &str| {
        Proc(
            Command::new(workspace_bin("peer"))
                .arg("--home")
                .arg(&home.0)
                .arg(cmd)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _exposer = bare(&pc, "expose");
    online(&server, "bare-a").await;
    let _reacher = bare(&phone, "reach");
    drop(connected(la).await);
    assert_eq!(within("echo", tcp_echo(la, b"bare")).await, b"bare");
    // The other list of each file was left alone.
    let watcher = wire::signal::client::Client::connect(
        &server.addrs().signaling.to_string(),
        Default::default(),
    )
    .await
    .unwrap();
    watcher
        .register(
            &ed25519_dalek::SigningKey::from_bytes(&[5; 32]),
            "watcher",
            vec![],
            vec![],
        )
        .await
        .unwrap();
    assert!(watcher.lookup("not-this").await.is_err());
}
