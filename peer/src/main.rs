//! `peer`: expose a local service under a name, or reach a named peer's service through an
//! end-to-end encrypted tunnel. Parses flags, merges them with the home's config.toml, and
//! runs the library's commands.
#![deny(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use peer::expose::{self, Expose};
use peer::home::Home;
use peer::presence::signal::Signaling;
use peer::presence::trust::Trust;
use peer::reach::{Reach, Reacher};
use peer::status::{self, Board};
use peer::transport::Transport;
use tokio_util::sync::CancellationToken;
use wire::signal::{Proto, PublicKey, Service};

/// Prints a line to stdout; a reader that went away (`peer status | head -1`) ends the
/// command quietly instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(anyhow::Error::new(e).context("writing to stdout"));
        }
    }};
}

/// chuantou peer: reach services behind NATs.
///
///   on the PC:     peer expose 7274 --name pc-home
///   on the phone:  peer reach pc-home          # then open http://127.0.0.1:7274/
///
/// Every connection is a stream of one end-to-end encrypted session with the other peer
/// (QUIC, TLS 1.3, keys pinned on first contact in known_peers). The session's traffic
/// takes the best path at each moment: through the relay at once, over a punched path
/// (UDP, or TCP simultaneous open) as soon as one is proven — open connections included —
/// and back to the relay if that path dies. `peer status` shows every path.
#[derive(Debug, Parser)]
#[command(version = wire::cli::VERSION, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// Directory with this peer's key, config.toml and known_peers
    /// [default: $XDG_CONFIG_HOME/chuantou or ~/.config/chuantou].
    #[arg(long, env = "CHUANTOU_HOME", global = true, value_name = "DIR")]
    home: Option<PathBuf>,

    /// The rendezvous server (also `rendezvous = "HOST:PORT"` in config.toml). Append
    /// `#KEY` (what `rendezvous key` prints on the server) to pin its key; without one, the
    /// key seen at first contact is pinned in known_rendezvous.
    #[arg(
        long,
        env = "CHUANTOU_RENDEZVOUS",
        global = true,
        value_name = "HOST:PORT[#KEY]"
    )]
    rendezvous: Option<String>,

    /// The rendezvous' key, pinned instead of learned at first contact (also
    /// `rendezvous_key` in config.toml, or `#KEY` after the address).
    #[arg(
        long,
        env = "CHUANTOU_RENDEZVOUS_KEY",
        global = true,
        value_name = "KEY"
    )]
    rendezvous_key: Option<String>,

    /// The rendezvous token, if it needs one (also `token` in config.toml).
    #[arg(long, env = "CHUANTOU_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,

    /// Never ask the gateway for a port mapping (PCP, NAT-PMP, UPnP IGD); also
    /// `port_mapping = false` in config.toml. By default the UDP endpoint's port is mapped
    /// where the gateway allows it (never for a rendezvous on loopback), which lets peers
    /// behind even the hardest NATs reach it directly, and the mapping is removed on exit.
    #[arg(long, env = "CHUANTOU_NO_PORT_MAPPING", global = true)]
    no_port_mapping: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this peer's public key (what others put in --allow).
    Id,
    /// Print a shell completion script: `peer completions bash > /etc/bash_completion.d/peer`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Keep a local service reachable under a name.
    Expose {
        /// The service's port [default: every [[expose]] of config.toml, as `peer up`].
        port: Option<u16>,
        /// The name to register [default: this machine's hostname].
        #[arg(long)]
        name: Option<String>,
        /// Expose a UDP service instead of TCP.
        #[arg(long)]
        udp: bool,
        /// The host the service runs on, if not this one.
        #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
        to: String,
        /// Accept only this peer key (repeat for several) [default: any brokered peer].
        #[arg(long, value_name = "KEY")]
        allow: Vec<String>,
        /// Which direct paths to punch for reaching peers: auto (UDP and TCP), udp, tcp,
        /// or relay (none). The relay is the fallback unless --no-relay.
        #[arg(long, value_enum, default_value_t = Transport::Auto)]
        transport: Transport,
        /// Never use the relay: sessions live on punched paths only (and reaching peers
        /// whose NATs allow none get nothing).
        #[arg(long)]
        no_relay: bool,
        /// Most reaching peers served at once (each key is one session); brokers for
        /// further keys are refused until one ends.
        #[arg(long, default_value_t = peer::defaults::MAX_SESSIONS, value_name = "N")]
        max_sessions: usize,
        /// Publish the service to clients that run no `peer` (a browser, a phone app, a
        /// webhook) at http://NAME.DOMAIN/ on the rendezvous' public HTTP entry (its
        /// operator turns it on with --public-http). The URL is logged and shown by
        /// `peer status`.
        #[arg(long, help_heading = "Public entry")]
        public: bool,
        /// Publish by TLS server name NAME.DOMAIN on the rendezvous' TLS entry: passed
        /// through undecrypted, so the service serves its own certificate (end to end).
        #[arg(long, help_heading = "Public entry")]
        public_tls: bool,
        /// Publish on a raw TCP port of the rendezvous: N, or any free one without N.
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "0", help_heading = "Public entry")]
        public_port: Option<u16>,
        /// Ask public HTTP clients for USER:PASS (basic auth; a browser prompts), or for
        /// a bearer secret with bearer:SECRET.
        #[arg(long, value_name = "USER:PASS", help_heading = "Public entry")]
        public_auth: Option<String>,
    },
    /// Open a local port that is a named peer's service.
    Reach {
        /// The peer's name [default: every [[reach]] of config.toml, as `peer up`].
        name: Option<String>,
        /// Which of its services (port) [default: its only one].
        #[arg(long, value_name = "PORT")]
        service: Option<u16>,
        /// Local address to listen on [default: 127.0.0.1:<service port>].
        #[arg(long, value_name = "ADDR:PORT")]
        local: Option<SocketAddr>,
        /// Reach a UDP service.
        #[arg(long)]
        udp: bool,
        /// Our own name at the rendezvous [default: reach-<key prefix>-<name>].
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// Paths the session may use: auto punches UDP and TCP and carries traffic on
        /// direct UDP, else direct TCP, else the relay; udp or tcp punch only that one;
        /// relay punches nothing. The relay is the fallback unless --no-relay.
        #[arg(long, value_enum, default_value_t = Transport::Auto)]
        transport: Transport,
        /// Never use the relay: connections wait for a punched path (a few seconds) and
        /// are closed when none works.
        #[arg(long)]
        no_relay: bool,
    },
    /// Serve every [[expose]] and [[reach]] of the home's config.toml in this one process,
    /// with one identity. SIGHUP reloads the lists: what left stops, what came starts,
    /// what stayed (and its sessions) goes on.
    Up,
    /// Open a session with a named peer (brokered through the rendezvous) and show every
    /// path it has, with round trips, and which one carries traffic, as `tailscale ping`.
    Ping {
        /// The peer's name.
        name: String,
        /// Rounds to show.
        #[arg(long, short = 'c', default_value_t = 5, value_name = "N")]
        count: u32,
        /// Milliseconds between rounds.
        #[arg(long, default_value_t = 1000, value_name = "MS")]
        interval: u64,
        /// Paths to try, as for `reach`.
        #[arg(long, value_enum, default_value_t = Transport::Auto)]
        transport: Transport,
    },
    /// Give a name up at the rendezvous (it must be this peer's: same key). Stop the
    /// `expose` that uses it first, or it takes the name again.
    Release {
        /// The name.
        name: String,
    },
    /// List the peers the rendezvous knows.
    Ls {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show this peer's sessions and their paths.
    Status {
        /// JSON instead of text: the sessions, an array.
        #[arg(long)]
        json: bool,
        /// With --json: one object with `registrations` (also those with no session) and
        /// `sessions`.
        #[arg(long, requires = "json")]
        all: bool,
    },
}

/// Serves `peer status` for this process; a failure only costs status, so it is logged.
async fn serve_status(dir: PathBuf, board: Board, shutdown: CancellationToken) {
    if let Err(e) = status::serve(&dir, board, shutdown).await {
        tracing::warn!(error = %e, "status socket unavailable; `peer status` will not see this process");
    }
}

/// `peer up` (or `expose`/`reach` with no arguments): the lists of config.toml, one
/// process; SIGHUP reloads them.
async fn serve_lists(
    lists: peer::up::Lists,
    home: Home,
    key: ed25519_dalek::SigningKey,
    with: Signaling,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let board = Board::default();
    tokio::spawn(serve_status(
        home.dir().to_owned(),
        board.clone(),
        shutdown.clone(),
    ));
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let on_hangup = reload.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            on_hangup.notify_one();
        }
    });
    let up = peer::up::Up {
        home,
        key: std::sync::Arc::new(key),
        rendezvous: with.rendezvous,
        token: with.token,
        trust: with.trust,
        port_mapping: with.port_mapping,
        default_name: hostname(),
        board,
        lists,
    };
    up.run(reload, shutdown).await
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| wire::signal::validate_name(h).is_ok())
        .unwrap_or_else(|| "peer".to_owned())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    wire::cli::run_with("peer", Some(peer::defaults::WORKER_THREADS), |shutdown| {
        run(cli, shutdown)
    })
}

async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Needs no home, and must not make one.
    if let Command::Completions { shell } = cli.command {
        return wire::cli::completions::<Cli>(shell, "peer");
    }
    let home = Home::open(cli.home.clone())?;
    let file = home.config()?;
    let (rendezvous, inline_key) = match cli.rendezvous.or(file.rendezvous) {
        Some(spec) => {
            let (addr, key) = peer::presence::trust::split(&spec).map_err(anyhow::Error::msg)?;
            (Some(addr), key)
        }
        None => (None, None),
    };
    let given_key = cli
        .rendezvous_key
        .or(file.rendezvous_key)
        .map(|k| k.parse::<PublicKey>())
        .transpose()
        .map_err(|e| anyhow::anyhow!("--rendezvous-key: {e}"))?;
    let rendezvous_key = match (inline_key, given_key) {
        (Some(a), Some(b)) if a != b => anyhow::bail!(
            "two different rendezvous keys given: {a} after '#' and {b} by --rendezvous-key \
             (or rendezvous_key in config.toml); keep one"
        ),
        (a, b) => a.or(b),
    };
    let trust = Trust {
        key: rendezvous_key,
        home: Some(home.clone()),
    };
    let token = cli.token.or(file.token);
    let port_mapping = !cli.no_port_mapping && file.port_mapping.unwrap_or(true);
    // Where and how to register, without a name or services yet.
    let reaching = |rendezvous: String, token: Option<String>| Signaling {
        port_mapping,
        ..Signaling::reaching(rendezvous, token, String::new(), trust.clone())
    };
    let need_rendezvous = || {
        rendezvous.clone().context(
            "no rendezvous configured: pass --rendezvous HOST:PORT, set CHUANTOU_RENDEZVOUS, \
             or put rendezvous = \"HOST:PORT\" in config.toml",
        )
    };
    let key = home.key()?;
    match cli.command {
        Command::Completions { shell } => wire::cli::completions::<Cli>(shell, "peer"),
        Command::Id => {
            out!("{}", PublicKey(key.verifying_key().to_bytes()));
            Ok(())
        }
        Command::Expose {
            port,
            name,
            udp,
            to,
            allow,
            transport,
            no_relay,
            max_sessions,
            public,
            public_tls,
            public_port,
            public_auth,
        } => {
            let Some(port) = port else {
                let rendezvous = need_rendezvous()?;
                let lists = peer::up::Lists::Expose;
                return serve_lists(lists, home, key, reaching(rendezvous, token), shutdown).await;
            };
            if no_relay && transport == Transport::Relay {
                anyhow::bail!("--no-relay with --transport relay leaves no path: drop one of them");
            }
            let allow = allow
                .iter()
                .map(|k| {
                    hex::decode(k.trim())
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .map(PublicKey)
                        .with_context(|| {
                            format!("--allow {k}: want a 64-hex-digit key (see `peer id`)")
                        })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let proto = if udp { Proto::Udp } else { Proto::Tcp };
            let public_http = public;
            let public = expose::public_request(
                wire::signal::ServiceRef { port, proto },
                public_http,
                public_tls,
                public_port,
                public_auth.as_deref(),
            )?;
            anyhow::ensure!(
                !(udp && (public_http || public_tls)),
                "--public and --public-tls need a TCP service; a UDP service is published with --public-port"
            );
            let name = name.unwrap_or_else(hostname);
            let _held = home.hold_name(&name, &format!("peer expose {port} --name {name}"))?;
            let cfg = Expose {
                signaling: Signaling {
                    rendezvous: need_rendezvous()?,
                    token,
                    name,
                    trust: trust.clone(),
                    port_mapping,
                    services: vec![Service {
                        port,
                        proto,
                        description: format!(
                            "exposed by chuantou from {}",
                            expose::target(&to, port)
                        ),
                    }],
                },
                target: expose::target(&to, port),
                allow,
                udp,
                transport,
                no_relay,
                max_sessions: max_sessions.max(1),
                public,
            };
            let board = Board::default();
            tokio::spawn(serve_status(
                home.dir().to_owned(),
                board.clone(),
                shutdown.clone(),
            ));
            expose::run(cfg, key, board, shutdown).await
        }
        Command::Reach {
            name,
            service,
            local,
            udp,
            as_name,
            transport,
            no_relay,
        } => {
            let Some(name) = name else {
                let rendezvous = need_rendezvous()?;
                let lists = peer::up::Lists::Reach;
                return serve_lists(lists, home, key, reaching(rendezvous, token), shutdown).await;
            };
            if no_relay && transport == Transport::Relay {
                anyhow::bail!("--no-relay with --transport relay leaves no path: drop one of them");
            }
            // One name per target by default: two reaches from one home (to different
            // peers) must not take one name from each other.
            let me = as_name.unwrap_or_else(|| peer::up::own_name("reach", &key, &name));
            let _held = home.hold_name(&me, &format!("peer reach {name} --as {me}"))?;
            let cfg = Reach {
                signaling: Signaling {
                    name: me,
                    ..reaching(need_rendezvous()?, token)
                },
                target: name,
                service,
                local,
                udp,
                transport,
                no_relay,
            };
            let board = Board::default();
            let dir = home.dir().to_owned();
            let reacher = Reacher::bind(cfg, home, key, board.clone(), shutdown.clone()).await?;
            tokio::spawn(serve_status(dir, board, shutdown));
            reacher.run().await
        }
        Command::Up => {
            serve_lists(
                peer::up::Lists::Both,
                home,
                key,
                reaching(need_rendezvous()?, token),
                shutdown,
            )
            .await
        }
        Command::Ping {
            name,
            count,
            interval,
            transport,
        } => {
            let me = peer::up::own_name("ping", &key, &name);
            let _held = home.hold_name(&me, &format!("peer ping {name}"))?;
            let cfg = Reach {
                signaling: Signaling {
                    name: me,
                    ..reaching(need_rendezvous()?, token)
                },
                target: name.clone(),
                service: None,
                local: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                udp: false,
                transport,
                no_relay: false,
            };
            let reacher = Reacher::bind(cfg, home, key, Board::default(), shutdown).await?;
            let every = std::time::Duration::from_millis(interval.max(10));
            reacher
                .ping(count, every, |seq, paths| {
                    out!("{}", peer::status::ping_line(&name, seq, paths));
                    Ok(())
                })
                .await
        }
        Command::Release { name } => {
            let client = trust.connect_with_token(&need_rendezvous()?, token).await?;
            client
                .register(&key, &name, vec![], vec![])
                .await
                .with_context(|| format!("proving {name:?} is ours"))?;
            client.release(&name).await?;
            out!("released {name}");
            Ok(())
        }
        Command::Ls { json } => {
            let has_token = token.is_some();
            let client = trust.connect_with_token(&need_rendezvous()?, token).await?;
            if !has_token {
                // Without the token the rendezvous lists peers only to a key that holds
                // a name there.
                client.identify(&key).await.context(
                    "listing peers needs this home's key to hold a name on the rendezvous \
                     (run `peer expose` or `peer reach` once) or the rendezvous' token",
                )?;
            }
            let peers = client.list().await?;
            if json {
                let rows: Vec<_> = peers
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "name": p.name,
                            "key": p.key.to_string(),
                            "online": p.online,
                            "services": p.services.iter().map(|s| serde_json::json!({
                                "port": s.port, "proto": s.proto.to_string(), "description": s.description,
                            })).collect::<Vec<_>>(),
                            "tcp_addr": p.tcp_addr.map(|a| a.to_string()),
                            "udp_addr": p.udp_addr.map(|a| a.to_string()),
                            "last_seen_ms": p.last_seen_ms,
                        })
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                out!("{:<24} {:<8} {:<22} SERVICES", "NAME", "STATE", "ADDRESS");
                for p in peers {
                    out!(
                        "{:<24} {:<8} {:<22} {}",
                        p.name,
                        if p.online { "online" } else { "offline" },
                        p.tcp_addr.map_or("-".into(), |a| a.to_string()),
                        p.services
                            .iter()
                            .map(|s| s.reference().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(())
        }
        Command::Status { json, all } => {
            let snap = status::query_all(home.dir())
                .await
                .with_context(|| format!("reading control sockets in {}", home.dir().display()))?;
            if json && all {
                out!("{}", serde_json::to_string_pretty(&snap)?);
                return Ok(());
            }
            if json {
                out!("{}", serde_json::to_string_pretty(&snap.sessions)?);
                return Ok(());
            }
            if snap.registrations.is_empty() && snap.sessions.is_empty() {
                out!(
                    "nothing running: no `peer expose`, `reach` or `up` uses {}",
                    home.dir().display()
                );
                return Ok(());
            }
            let now = status::unix_now();
            if !snap.registrations.is_empty() {
                out!(
                    "{:<24} {:<7} {:<22} {:<22} {:<22} {:>7}  SERVICES",
                    "REGISTERED AS",
                    "ROLE",
                    "RENDEZVOUS",
                    "PUBLIC TCP",
                    "PUBLIC UDP",
                    "SINCE"
                );
                for r in &snap.registrations {
                    out!(
                        "{:<24} {:<7} {:<22} {:<22} {:<22} {:>7}  {}",
                        r.name,
                        r.role,
                        r.rendezvous,
                        r.observed_tcp.as_deref().unwrap_or("-"),
                        r.observed_udp.as_deref().unwrap_or("-"),
                        status::age(r.since, now),
                        if r.services.is_empty() {
                            "-".to_owned()
                        } else {
                            r.services.join(", ")
                        }
                    );
                    for url in &r.public {
                        out!("{:<24} public at {url}", "");
                    }
                }
            }
            if snap.sessions.is_empty() {
                out!("no sessions yet");
                return Ok(());
            }
            out!(
                "\n{:<20} {:<7} {:<11} {:>8} {:>11} {:>11} {:>5} {:>7}",
                "SESSION WITH",
                "ROLE",
                "PATH",
                "RTT",
                "SENT",
                "RECEIVED",
                "OPEN",
                "UP"
            );
            for t in snap.sessions {
                let rtt = t.rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms"));
                out!(
                    "{:<20} {:<7} {:<11} {:>8} {:>11} {:>11} {:>5} {:>7}",
                    t.peer,
                    t.role,
                    t.path,
                    rtt,
                    status::bytes(t.bytes_out),
                    status::bytes(t.bytes_in),
                    t.open_connections,
                    status::age(t.since, now)
                );
                for p in &t.paths {
                    let rtt = p.rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms"));
                    out!(
                        "  {:<10} {:<26} {:<8} {:>8} {:>11} {:>11}",
                        p.kind,
                        p.remote,
                        p.state,
                        rtt,
                        status::bytes(p.bytes_out),
                        status::bytes(p.bytes_in)
                    );
                }
            }
            Ok(())
        }
    }
}
