//! Load generator for `scripts/bench/rendezvous`: registers many peers (spread over
//! 127.0.0.x source addresses), measures the server's RSS per registered peer against its
//! idle RSS, then brokered sessions per second against plain lookups per second, both in
//! the same run. Traffic goes to loopback only; every loop is bounded in count.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ed25519_dalek::SigningKey;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use wire::signal::client::{Client, ClientConfig};
use wire::signal::{Proto, Service};

/// Registers peers against a running rendezvous and reports memory and throughput.
#[derive(Debug, Parser)]
struct Args {
    /// The rendezvous signaling address (loopback).
    #[arg(long, default_value = "127.0.0.1:17000")]
    server: SocketAddr,
    /// The rendezvous process, for reading its RSS.
    #[arg(long)]
    server_pid: u32,
    /// Peers to register (half offer a service, half reach them).
    #[arg(long, default_value_t = 10_000)]
    peers: usize,
    /// Source addresses to spread connections over (127.0.0.1 ..= 127.0.0.N).
    #[arg(long, default_value_t = 50)]
    sources: u8,
    /// Requests of each kind in the throughput phase.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

async fn connect_from(server: SocketAddr, src: Ipv4Addr) -> anyhow::Result<Client> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0))
        .with_context(|| format!("binding a source port on {src}"))?;
    let stream = sock
        .connect(server)
        .await
        .with_context(|| format!("connecting from {src} to {server}"))?;
    Ok(Client::over(stream, ClientConfig::default()).await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.peers < 2 || args.sources == 0 {
        bail!("need at least 2 peers and 1 source address");
    }
    // Let the idle server settle, then take its baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_kib(args.server_pid)?;

    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(256));
    let mut set = JoinSet::new();
    for i in 0..args.peers {
        let gate = gate.clone();
        let server = args.server;
        let src = Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(args.sources)) as u8);
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let c = connect_from(server, src).await?;
            let mut seed = [7u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let services = if i % 2 == 0 {
                vec![Service {
                    port: 7274,
                    proto: Proto::Tcp,
                    description: "web".into(),
                }]
            } else {
                vec![]
            };
            c.register(
                &SigningKey::from_bytes(&seed),
                &format!("peer-{i:05}"),
                services,
                vec![],
            )
            .await
            .with_context(|| format!("registering peer-{i:05}"))?;
            anyhow::Ok((i, c))
        });
    }
    let mut clients: Vec<Option<Client>> = (0..args.peers).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r??;
        clients[i] = Some(c);
    }
    let reg_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = rss_kib(args.server_pid)?;
    let per_peer = (loaded.saturating_sub(idle)) as f64 / args.peers as f64;

    // Offering peers (even) only receive pushes: drain them on their own tasks.
    // Reaching peers (odd) issue the requests.
    let mut reachers = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let mut c = c.context("missing client")?;
        if i % 2 == 0 {
            tokio::spawn(async move { while c.next_event().await.is_some() {} });
        } else {
            reachers.push(Arc::new(c));
        }
    }
    let offered = args.peers.div_ceil(2);

    let lookups = throughput(&reachers, args.requests, args.concurrency, offered, false).await?;
    let brokers = throughput(&reachers, args.requests, args.concurrency, offered, true).await?;

    println!(
        "peers registered      {:>10} in {reg_secs:.2} s",
        args.peers
    );
    println!("server RSS idle       {idle:>10} KiB   (baseline)");
    println!(
        "server RSS loaded     {loaded:>10} KiB   ({:.2} x idle)",
        loaded as f64 / idle as f64
    );
    println!(
        "RSS per peer          {per_peer:>10.2} KiB   (goal <= 8 KiB: {})",
        if per_peer <= 8.0 { "met" } else { "NOT met" }
    );
    println!("lookups/s             {lookups:>10.0}       (baseline)");
    println!(
        "brokered sessions/s   {brokers:>10.0}       ({:.2} x lookups)",
        brokers / lookups
    );
    Ok(())
}

/// Runs `total` requests (`connect` when `broker`, else `lookup`) from the reaching peers
/// at `concurrency` in flight; returns requests per second.
async fn throughput(
    reachers: &[Arc<Client>],
    total: usize,
    concurrency: usize,
    offered: usize,
    broker: bool,
) -> anyhow::Result<f64> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    let started = Instant::now();
    for n in 0..total {
        let c = reachers[n % reachers.len()].clone();
        let target = format!("peer-{:05}", (n * 7 % offered) * 2);
        let permit = gate.clone().acquire_owned().await?;
        set.spawn(async move {
            let _permit = permit;
            if broker {
                c.connect_to(&target, None).await.map(|_| ())
            } else {
                c.lookup(&target).await.map(|_| ())
            }
        });
        while let Some(r) = set.try_join_next() {
            r??;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
