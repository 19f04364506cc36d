//! `relay`: a standalone chuantou relay. Registers with a rendezvous (proving it holds the
//! shared ticket key), which then hands it out in tickets; admits sessions on those tickets
//! and forwards their bytes, opaque.
#![deny(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use relay::server::{RelayConfig, RelayServer};
use tokio_util::sync::CancellationToken;
use wire::ticket::TicketKey;

/// A standalone chuantou relay.
///
/// Admits the two halves of a session on tickets signed with KEY (shared with the
/// rendezvous that issues them) and forwards TCP bytes and UDP datagrams between them,
/// without seeing plaintext (peers' tunnels are end-to-end encrypted).
///
/// With --rendezvous it registers there (the rendezvous must run with the same
/// --relay-key) and is handed out to peers; without, it serves whoever holds tickets for it.
///
///   rendezvous --relay-key "$KEY" ...            # on the rendezvous host
///   relay --rendezvous rv.example:7000 --key "$KEY"   # on each relay host
#[derive(Debug, Parser)]
#[command(
    version = wire::cli::VERSION,
    about,
    long_about,
    verbatim_doc_comment,
    args_override_self = true
)]
struct Cli {
    /// A TOML file of settings: the long flags without their dashes (`listen =
    /// "0.0.0.0:7000"`, `no-http = true`, `advertise = ["203.0.113.1"]`). Flags given on
    /// the command line win over the file.
    #[arg(
        long,
        env = "CHUANTOU_RELAY_CONFIG",
        value_name = "FILE",
        global = true
    )]
    config: Option<std::path::PathBuf>,
    /// TCP and UDP address to serve on.
    #[arg(long, default_value = "0.0.0.0:7001", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The rendezvous to register with (its signaling address). Append `#KEY` (what
    /// `rendezvous key` prints) to pin its key; without one, the key it proves at first
    /// contact is pinned for the life of this process.
    #[arg(long, env = "CHUANTOU_RENDEZVOUS", value_name = "HOST:PORT[#KEY]")]
    rendezvous: Option<String>,
    /// The rendezvous' key (instead of `#KEY` after the address).
    #[arg(
        long,
        env = "CHUANTOU_RENDEZVOUS_KEY",
        value_name = "KEY",
        requires = "rendezvous"
    )]
    rendezvous_key: Option<String>,
    /// The address peers should use, when the rendezvous cannot see it (e.g. behind a load
    /// balancer) [default: the address the rendezvous sees, with this relay's port].
    #[arg(long, value_name = "ADDR:PORT", requires = "rendezvous")]
    public: Option<SocketAddr>,
    /// Ticket key, 64 hex digits (the rendezvous' --relay-key).
    #[arg(
        long,
        env = "CHUANTOU_RELAY_KEY",
        hide_env_values = true,
        value_name = "HEX",
        required_unless_present = "completions"
    )]
    key: Option<String>,
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell) and exit.
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    /// Most sessions (paired or waiting) at once.
    #[arg(long, default_value_t = relay::defaults::MAX_SESSIONS, value_name = "N")]
    max_sessions: usize,
    /// Most halves from one IP address waiting for their partner at once.
    #[arg(long, default_value_t = relay::defaults::MAX_WAITING_PER_IP, value_name = "N")]
    max_waiting_per_ip: usize,
    /// Bytes (both directions) after which a session is closed [default: no limit].
    #[arg(long, value_name = "BYTES")]
    max_bytes: Option<u64>,
    /// Bytes per second each session may use [default: no limit].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    rate: Option<u64>,
    /// Seconds of silence after which a session is closed.
    #[arg(long, default_value_t = relay::defaults::IDLE_TIMEOUT.as_secs(), value_name = "SECS")]
    idle_timeout: u64,
    /// Take IPv4 halves only. By default a relay on every address (0.0.0.0) takes IPv6
    /// halves too, where the host has IPv6.
    #[arg(long)]
    ipv4_only: bool,
}

fn main() -> std::process::ExitCode {
    let cli: Cli = wire::cli::parse_with_config("relay", "CHUANTOU_RELAY_CONFIG");
    wire::cli::run("relay", |shutdown| serve(cli, shutdown))
}

async fn serve(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(shell) = cli.completions {
        return wire::cli::completions::<Cli>(shell, "relay");
    }
    let key = cli
        .key
        .as_deref()
        .and_then(TicketKey::from_hex)
        .context("--key / CHUANTOU_RELAY_KEY must be 64 hex digits")?;
    let mut config = RelayConfig::new(cli.listen, key);
    config.limits.max_sessions = cli.max_sessions;
    config.limits.max_waiting_per_ip = cli.max_waiting_per_ip.max(1);
    config.max_bytes_per_session = cli.max_bytes;
    config.rate_per_session = cli.rate;
    config.idle_timeout = Duration::from_secs(cli.idle_timeout.max(1));
    config.dual_stack = !cli.ipv4_only;
    let server = RelayServer::bind(config.clone()).await?;
    match cli.rendezvous {
        Some(spec) => {
            let (rv, inline) =
                wire::signal::client::split_pinned(&spec).map_err(anyhow::Error::msg)?;
            let given = cli
                .rendezvous_key
                .map(|k| k.parse::<wire::signal::PublicKey>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("--rendezvous-key: {e}"))?;
            let pin = match (inline, given) {
                (Some(a), Some(b)) if a != b => anyhow::bail!(
                    "two different rendezvous keys given: {a} after '#' and {b} by --rendezvous-key"
                ),
                (a, b) => a.or(b),
            };
            tokio::spawn(relay::announce::announce(
                rv,
                pin,
                config.key,
                server.local_addr().port(),
                cli.public,
                server.stats(),
                shutdown.clone(),
            ));
        }
        None => tracing::warn!("no --rendezvous: serving only holders of tickets for this relay"),
    }
    server.run(shutdown).await;
    Ok(())
}
