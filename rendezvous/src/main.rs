//! `rendezvous`: the public meeting point of chuantou peers. Parses flags, sets up logging,
//! binds, and runs the server until SIGINT or SIGTERM.

#![deny(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ed25519_dalek::SigningKey;
use rendezvous::registry::Timing;
use rendezvous::server::{Server, ServerConfig};
use rendezvous::state::State;
use tokio_util::sync::CancellationToken;
use tracing::info;
use wire::signal::PublicKey;

/// The chuantou rendezvous server.
///
/// Peers behind NATs connect here over TCP, register under a name with their ed25519 key,
/// keep alive with heartbeats, look each other up, and ask to be brokered to each other's
/// services. A STUN responder on UDP tells each peer its NAT-mapped address; with --alt-ip
/// it is a full RFC 5780 server that `natprobe` can classify NATs against. A read-only
/// HTTP API answers "where is my PC now" (GET /v1/peers/NAME) and serves /metrics.
///
/// Example on a server with two public addresses:
///
///   rendezvous --stun 203.0.113.1:3478 --alt-ip 203.0.113.2 --token "$(cat token)"
///
/// On a cloud VM whose public address is not on the machine (a 1:1 NAT, as most cheap
/// VPS offers have), say which it is:
///
///   rendezvous --advertise 203.0.113.1
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
        env = "CHUANTOU_RENDEZVOUS_CONFIG",
        value_name = "FILE",
        global = true
    )]
    config: Option<std::path::PathBuf>,
    /// Directory kept across restarts: the server's identity key, which peers pin
    /// [default: $STATE_DIRECTORY, else $XDG_STATE_HOME/chuantou-rendezvous, else
    /// ~/.local/state/chuantou-rendezvous].
    #[arg(long, env = "CHUANTOU_STATE_DIR", global = true, value_name = "DIR")]
    state: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,

    /// TCP address for peer signaling connections.
    #[arg(long, default_value = "0.0.0.0:7000", value_name = "ADDR:PORT")]
    listen: SocketAddr,

    /// UDP address of the STUN responder (primary IP and port). Must be a concrete IP
    /// of this host when --alt-ip is given.
    #[arg(long, default_value = "0.0.0.0:3478", value_name = "ADDR:PORT")]
    stun: SocketAddr,

    /// Turn the STUN responder off.
    #[arg(long, conflicts_with_all = ["alt_ip", "alt_port"])]
    no_stun: bool,

    /// A second IP address of this host. Makes the STUN responder an RFC 5780 server: it
    /// also listens on this IP and on the alternate port, returns OTHER-ADDRESS and
    /// RESPONSE-ORIGIN, and honours CHANGE-REQUEST, which NAT classification needs.
    #[arg(long, value_name = "IP")]
    alt_ip: Option<IpAddr>,

    /// The second STUN port [default: the STUN port + 1; without --alt-ip, + 2 where + 1
    /// is the relay's]. With --alt-ip, RFC 5780's
    /// alternate port; without, a second port on the STUN address (UDP) that lets peers
    /// tell a symmetric NAT (its mapping changes with the destination) from a cone, so
    /// that they punch it as one.
    #[arg(long, value_name = "PORT")]
    alt_port: Option<u16>,

    /// This host's public address(es) when they are not on the machine (a cloud's 1:1
    /// NAT): peers are told to use IP for STUN and the embedded relay, and STUN answers
    /// name IP (and IP2, the public side of --alt-ip) in OTHER-ADDRESS and RESPONSE-ORIGIN.
    /// One IPv4 and one IPv6 address (`203.0.113.1,2001:db8::1`) are this host in each
    /// family: each peer is told the one of its own family, and, on a dual-stack server,
    /// the other one as a second STUN server, so that it learns its mapping in both
    /// families and peers punch in both (IPv6 preferred). [default: the bound addresses;
    /// bound to every address, peers use the host they reached this server on]
    #[arg(long, value_name = "IP[,IP2]", value_delimiter = ',', num_args = 1)]
    advertise: Vec<IpAddr>,

    /// Address of the dashboard (/), the read-only JSON API and /metrics. It lists every
    /// registered peer: off loopback it needs --http-token.
    #[arg(long, default_value = "127.0.0.1:7080", value_name = "ADDR:PORT")]
    http: SocketAddr,

    /// Token the HTTP API and dashboard ask for (`Authorization: Bearer TOKEN`, or basic
    /// auth with it as the password); required when --http is not on loopback.
    #[arg(
        long,
        env = "CHUANTOU_HTTP_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    http_token: Option<String>,

    /// Turn the HTTP API off.
    #[arg(long)]
    no_http: bool,

    /// Take IPv4 clients only. By default every socket bound to every address (0.0.0.0,
    /// as the defaults are) takes IPv6 clients too, where the host has IPv6: signaling,
    /// STUN (without --alt-ip), the embedded relay, public entries.
    #[arg(long)]
    ipv4_only: bool,

    /// Shared secret peers must present to connect. Prefer the environment variable, which
    /// other users of the machine cannot read from the process list.
    #[arg(long, env = "CHUANTOU_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// How often peers must heartbeat, in seconds.
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    heartbeat_interval: u64,

    /// Heartbeats a peer may miss before it is shown offline.
    #[arg(long, default_value_t = 3, value_name = "N")]
    missed_heartbeats: u32,

    /// Hours an offline peer keeps its name before another key may take it (default: 30
    /// days). Bindings are kept in the state directory, so a restart loses none.
    #[arg(long, default_value_t = rendezvous::defaults::NAME_RETENTION.as_secs() / 3600, value_name = "HOURS")]
    name_retention: u64,

    /// Connect requests a registered peer may make per second (bursts of ten times this);
    /// one target may receive five times as many from everyone together. Each request
    /// makes the target join a relay and probe the requester, so this bounds what a peer
    /// can make another send.
    #[arg(long, default_value_t = rendezvous::defaults::CONNECT_RATE, value_name = "PER_SEC")]
    connect_rate: u32,

    /// Names one address (IPv6: one /64) may bind. Generous by default: a campus or
    /// carrier NAT puts many honest users behind one address.
    #[arg(long, default_value_t = rendezvous::defaults::MAX_NAMES_PER_IP, value_name = "N")]
    max_names_per_ip: usize,

    /// Most names the server keeps (online or offline). Names are never evicted to make
    /// room: when full, new names are refused until one is released or expires.
    #[arg(long, default_value_t = rendezvous::defaults::MAX_PEERS, value_name = "N")]
    max_peers: usize,

    /// Most simultaneous signaling connections.
    #[arg(long, default_value_t = rendezvous::defaults::MAX_CONNECTIONS, value_name = "N")]
    max_connections: usize,

    /// TCP and UDP address of the embedded relay, which carries sessions whose peers
    /// cannot punch through their NATs.
    #[arg(long, default_value = "0.0.0.0:7001", value_name = "ADDR:PORT")]
    relay: SocketAddr,

    /// Run no embedded relay: sessions then go to registered standalone relays, or get no
    /// relay offer.
    #[arg(long, conflicts_with_all = ["relay_max_sessions", "relay_max_bytes", "relay_rate", "relay_idle_timeout"])]
    no_relay: bool,

    /// Key (64 hex digits) for signing relay tickets, shared with standalone relays: with it,
    /// relays started with the same key can register here and carry sessions. Without it a
    /// random key is made at each start, right for the embedded relay alone.
    #[arg(
        long,
        env = "CHUANTOU_RELAY_KEY",
        hide_env_values = true,
        value_name = "HEX"
    )]
    relay_key: Option<String>,

    /// Most relay sessions (paired or waiting) at once.
    #[arg(long, default_value_t = relay::defaults::MAX_SESSIONS, value_name = "N")]
    relay_max_sessions: usize,

    /// Bytes (both directions) after which a relay session is closed [default: no limit].
    #[arg(long, value_name = "BYTES")]
    relay_max_bytes: Option<u64>,

    /// Bytes per second each relay session may use [default: no limit].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    relay_rate: Option<u64>,

    /// Seconds of silence after which a relay session is closed.
    #[arg(long, default_value_t = relay::defaults::IDLE_TIMEOUT.as_secs(), value_name = "SECS")]
    relay_idle_timeout: u64,

    /// Most connections from one IP address that may be waiting to say hello.
    #[arg(long, default_value_t = rendezvous::defaults::MAX_PENDING_PER_IP, value_name = "N")]
    max_pending_per_ip: usize,

    /// Most signaling connections one IP address may hold open.
    #[arg(long, default_value_t = rendezvous::defaults::MAX_CONNECTIONS_PER_IP, value_name = "N")]
    max_connections_per_ip: usize,

    /// Public HTTP entry: clients that run no `peer` reach a service published with
    /// `peer expose … --public` at http://NAME.DOMAIN/ (routed by the Host header). Point
    /// a wildcard DNS record *.DOMAIN at this host. Needs --public-domain.
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Public entries")]
    public_http: Option<SocketAddr>,

    /// Public TLS entry: TLS connections for NAME.DOMAIN (by SNI) are passed through
    /// undecrypted to services published with `--public-tls`, which serve their own
    /// certificate: end-to-end encrypted. Needs --public-domain.
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Public entries")]
    public_tls: Option<SocketAddr>,

    /// The domain public names live under (NAME.DOMAIN), also shown as the host of
    /// public ports.
    #[arg(long, value_name = "DOMAIN", help_heading = "Public entries")]
    public_domain: Option<String>,

    /// Raw TCP ports handed out to `peer expose … --public-port [N]`: LOW-HIGH, or
    /// IP:LOW-HIGH to listen on one address (default every address).
    #[arg(long, value_name = "[IP:]LOW-HIGH", value_parser = rendezvous::public::PublicConfig::parse_ports, help_heading = "Public entries")]
    public_ports: Option<(IpAddr, std::ops::RangeInclusive<u16>)>,

    /// Keys allowed to publish (repeat, or comma-separated); `any` lets every registered
    /// peer. [default: every peer when the server has a token, none without]
    #[arg(
        long,
        value_name = "KEY",
        value_delimiter = ',',
        help_heading = "Public entries"
    )]
    publish_allow: Vec<String>,

    /// Client connections one published service may have open at once.
    #[arg(long, default_value_t = rendezvous::defaults::PUBLIC_MAX_CONNS, value_name = "N", help_heading = "Public entries")]
    public_max_conns: usize,

    /// Client connections one client IP may have open at once, over every public entry.
    #[arg(long, default_value_t = rendezvous::defaults::PUBLIC_MAX_CONNS_PER_IP, value_name = "N", help_heading = "Public entries")]
    public_max_conns_per_ip: usize,

    /// Bytes per second one published service may move, all its clients together
    /// [default: no limit].
    #[arg(long, value_name = "BYTES_PER_SEC", help_heading = "Public entries")]
    public_rate: Option<u64>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print this server's public key (making the identity if there is none yet): give it
    /// to peers as `HOST:PORT#KEY` (or `--rendezvous-key`) so that they check the server
    /// instead of trusting the first answer.
    Key,
    /// Print a shell completion script: `rendezvous completions bash >
    /// /etc/bash_completion.d/rendezvous`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> std::process::ExitCode {
    let cli: Cli = wire::cli::parse_with_config("rendezvous", "CHUANTOU_RENDEZVOUS_CONFIG");
    wire::cli::run("rendezvous", |shutdown| async move {
        match cli.command {
            Some(Command::Completions { shell }) => {
                wire::cli::completions::<Cli>(shell, "rendezvous")
            }
            Some(Command::Key) => {
                let (key, _) = identity(cli.state.clone())?;
                wire::cli::print(&format!("{}\n", PublicKey(key.verifying_key().to_bytes())))
            }
            None => serve(cli, shutdown).await,
        }
    })
}

/// The server's identity from its state directory, made there on first use.
fn identity(dir: Option<std::path::PathBuf>) -> anyhow::Result<(SigningKey, std::path::PathBuf)> {
    let dir = match dir {
        Some(d) => d,
        None => State::default_dir()?,
    };
    let state = State::open(dir)?;
    let (key, made) = state.identity()?;
    if made {
        info!(dir = %state.dir().display(), "made a new identity");
    }
    Ok((key, state.dir().to_owned()))
}

async fn serve(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(
        cli.heartbeat_interval > 0 && cli.missed_heartbeats > 0,
        "--heartbeat-interval and --missed-heartbeats must be at least 1"
    );
    if cli.token.as_deref() == Some("") {
        anyhow::bail!("the token is empty; unset CHUANTOU_TOKEN or give a real one");
    }
    let shared_relay_key = match &cli.relay_key {
        Some(hex) => Some(
            wire::ticket::TicketKey::from_hex(hex)
                .context("--relay-key / CHUANTOU_RELAY_KEY must be 64 hex digits (32 bytes)")?,
        ),
        None => None,
    };
    let relay = if cli.no_relay {
        None
    } else {
        let key = shared_relay_key
            .clone()
            .unwrap_or_else(wire::ticket::TicketKey::random);
        let mut rc = relay::server::RelayConfig::new(cli.relay, key);
        rc.limits.max_sessions = cli.relay_max_sessions;
        rc.max_bytes_per_session = cli.relay_max_bytes;
        rc.rate_per_session = cli.relay_rate;
        rc.idle_timeout = Duration::from_secs(cli.relay_idle_timeout.max(1));
        rc.dual_stack = !cli.ipv4_only;
        Some(rc)
    };
    let mut allow = Vec::new();
    let mut allow_any = false;
    for k in &cli.publish_allow {
        if k.eq_ignore_ascii_case("any") {
            allow_any = true;
        } else {
            allow.push(
                k.parse::<PublicKey>()
                    .map_err(anyhow::Error::msg)
                    .context("--publish-allow takes peer keys (`peer key`) or `any`")?,
            );
        }
    }
    let public = rendezvous::public::PublicConfig {
        http: cli.public_http,
        tls: cli.public_tls,
        domain: cli
            .public_domain
            .map(|d| d.trim_matches('.').to_ascii_lowercase()),
        ports: cli.public_ports,
        allow,
        allow_any,
        max_conns: cli.public_max_conns.max(1),
        max_conns_per_ip: cli.public_max_conns_per_ip.max(1),
        rate: cli.public_rate,
        head_timeout: rendezvous::defaults::HTTP_TIMEOUT,
    };
    if public.enabled() && public.allow.is_empty() && !public.allow_any && cli.token.is_none() {
        info!(
            "public entries are on but no key may publish: give --publish-allow KEY (or a token)"
        );
    }
    let (identity, state_dir) = identity(cli.state.clone())?;
    let config = ServerConfig {
        identity,
        names_db: Some(state_dir.join("names.redb")),
        connect_rate: cli.connect_rate.max(1),
        max_names_per_ip: cli.max_names_per_ip.max(1),
        relay,
        shared_relay_key,
        listen: cli.listen,
        stun: (!cli.no_stun).then_some(cli.stun),
        alt_ip: cli.alt_ip,
        alt_port: cli.alt_port,
        advertise: cli.advertise,
        http_token: cli.http_token,
        http: (!cli.no_http).then_some(cli.http),
        token: cli.token,
        timing: Timing {
            heartbeat_interval: Duration::from_secs(cli.heartbeat_interval),
            missed_heartbeats: cli.missed_heartbeats,
            name_retention: Duration::from_secs(cli.name_retention * 3600),
        },
        max_peers: cli.max_peers,
        max_connections: cli.max_connections,
        max_pending_per_ip: cli.max_pending_per_ip,
        max_connections_per_ip: cli.max_connections_per_ip.max(1),
        public,
        dual_stack: !cli.ipv4_only,
        ..ServerConfig::default()
    };
    if config.token.is_none() {
        info!("no token set: anyone who can reach this server may register");
    }
    let server = Server::bind(config).await.context("starting rendezvous")?;
    info!(
        key = %server.key(),
        state = %state_dir.display(),
        "rendezvous key: peers pin it; give them HOST:{}#{}",
        server.addrs().signaling.port(),
        server.key()
    );
    server.run(shutdown).await;
    Ok(())
}
