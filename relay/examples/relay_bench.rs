//! Helper for `scripts/bench/relay`, talking to a standalone `relay` that shares its key:
//!
//! - `pipe`: a plain TCP forwarder through the relay. Each connection accepted on
//!   `--listen` gets a fresh session: one half joins with the initiator ticket and carries
//!   the accepted connection, the other joins with the responder ticket and carries a
//!   connection to `--target`. This is "the relay alone between two plain TCP clients".
//! - `idle`: opens `--sessions` paired sessions, leaves them idle, and prints the relay's
//!   RSS per session against its RSS before, in the same run.
//!
//! Loopback only; every loop is bounded by its count.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::{TcpListener, TcpStream};
use wire::relay::client::join_tcp;
use wire::ticket::{SessionId, Side, Ticket, TicketKey};

#[derive(Debug, Parser)]
struct Args {
    /// The relay.
    #[arg(long)]
    relay: SocketAddr,
    /// Its ticket key (hex).
    #[arg(long)]
    key: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Forward connections on `listen` to `target` through the relay.
    Pipe {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        target: SocketAddr,
    },
    /// Hold idle sessions and report the relay's RSS per session.
    Idle {
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        #[arg(long)]
        relay_pid: u32,
    },
}

/// Copy buffer of the forwarders: large, so they cost the measurement as little as possible.
const BUF: usize = 256 * 1024;

fn tickets(key: &TicketKey) -> (Ticket, Ticket) {
    let id = SessionId(rand::random());
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 600;
    (
        key.issue(id, Side::Initiator, exp),
        key.issue(id, Side::Responder, exp),
    )
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

async fn pair(relay: SocketAddr, key: &TicketKey) -> anyhow::Result<(TcpStream, TcpStream)> {
    let (a, b) = tickets(key);
    let t = Duration::from_secs(10);
    let (sa, sb) = (key.join_secret(&a), key.join_secret(&b));
    let (x, y) = tokio::join!(join_tcp(relay, a, sa, t), join_tcp(relay, b, sb, t));
    Ok((x?, y?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let key = TicketKey::from_hex(&args.key).context("--key: 64 hex digits")?;
    match args.mode {
        Mode::Pipe { listen, target } => {
            let l = TcpListener::bind(listen).await?;
            loop {
                let (mut local, _) = l.accept().await?;
                let key = key.clone();
                tokio::spawn(async move {
                    let Ok((mut near, mut far)) = pair(args.relay, &key).await else {
                        return;
                    };
                    let Ok(mut service) = TcpStream::connect(target).await else {
                        return;
                    };
                    for s in [&local, &near, &far, &service] {
                        let _ = s.set_nodelay(true);
                    }
                    // Each copy ends when its side closes; errors just end the connection.
                    let _ = tokio::join!(
                        tokio::io::copy_bidirectional_with_sizes(&mut local, &mut near, BUF, BUF),
                        tokio::io::copy_bidirectional_with_sizes(&mut far, &mut service, BUF, BUF),
                    );
                });
            }
        }
        Mode::Idle {
            sessions,
            relay_pid,
        } => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = rss_kib(relay_pid)?;
            let mut held = Vec::with_capacity(sessions);
            for _ in 0..sessions {
                held.push(pair(args.relay, &key).await?);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = rss_kib(relay_pid)?;
            let per = after.saturating_sub(before) as f64 / sessions as f64;
            println!("relay RSS idle            {before:>8} KiB   (baseline)");
            println!("relay RSS, {sessions} sessions {after:>8} KiB");
            println!(
                "per idle relay session    {per:>8.2} KiB   (goal <= 32 KiB: {})",
                if per <= 32.0 { "met" } else { "NOT met" }
            );
            drop(held);
            Ok(())
        }
    }
}
