//! `relay`: a standalone chuantou relay. Admits sessions on tickets signed with the key it
//! shares with a rendezvous and forwards their bytes, opaque. Registering with a
//! rendezvous (so that it hands this relay out) is not built yet: today a standalone relay
//! serves whoever holds tickets for it, e.g. benchmarks; `rendezvous` embeds its own relay.
#![deny(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use relay::server::{RelayConfig, RelayServer};
use relay::ticket::TicketKey;
use tokio_util::sync::CancellationToken;

/// A standalone chuantou relay.
///
/// Admits the two halves of a session on tickets signed with KEY (shared with the
/// rendezvous that issues them) and forwards TCP bytes and UDP datagrams between them,
/// without seeing plaintext (peers' tunnels are end-to-end encrypted).
///
/// Not yet: registering with a rendezvous so that it hands this relay out in tickets.
#[derive(Debug, Parser)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// TCP and UDP address to serve on.
    #[arg(long, default_value = "0.0.0.0:7001", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// Ticket key, 64 hex digits (the rendezvous' --relay-key).
    #[arg(
        long,
        env = "CHUANTOU_RELAY_KEY",
        hide_env_values = true,
        value_name = "HEX"
    )]
    key: String,
    /// Most sessions (paired or waiting) at once.
    #[arg(long, default_value_t = relay::defaults::MAX_SESSIONS, value_name = "N")]
    max_sessions: usize,
    /// Bytes (both directions) after which a session is closed [default: no limit].
    #[arg(long, value_name = "BYTES")]
    max_bytes: Option<u64>,
    /// Bytes per second each session may use [default: no limit].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    rate: Option<u64>,
    /// Seconds of silence after which a session is closed.
    #[arg(long, default_value_t = relay::defaults::IDLE_TIMEOUT.as_secs(), value_name = "SECS")]
    idle_timeout: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(serve(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let key = TicketKey::from_hex(&cli.key)
        .context("--key / CHUANTOU_RELAY_KEY must be 64 hex digits")?;
    let mut config = RelayConfig::new(cli.listen, key);
    config.limits.max_sessions = cli.max_sessions;
    config.max_bytes_per_session = cli.max_bytes;
    config.rate_per_session = cli.rate;
    config.idle_timeout = Duration::from_secs(cli.idle_timeout.max(1));
    let server = RelayServer::bind(config).await?;
    tracing::warn!("{}", relay::STATUS);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    server.run(shutdown).await;
    Ok(())
}
