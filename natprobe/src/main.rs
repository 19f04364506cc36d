//! The `natprobe` binary: parses the command line, runs the probes, prints the report.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use natprobe::defaults::{self, Timing};
use natprobe::probe::{self, Config};

/// What NAT is this machine behind, and what can it expect?
///
/// Runs the RFC 5780 behaviour discovery tests against a STUN server with two IP addresses
/// (a chuantou rendezvous started with --alt-ip, or coturn with two listening IPs):
/// mapping and filtering (RFC 4787), the classic NAT name, port allocation, hairpinning,
/// and with --lifetime how long an idle UDP mapping lives. Against plain STUN servers give
/// two --server to learn whether the mapping depends on the destination.
///
///   natprobe --server stun.example.org
///   natprobe --server 203.0.113.1:3478 --tcp --lifetime --json
#[derive(Parser)]
#[command(name = "natprobe", version = wire::cli::VERSION, verbatim_doc_comment)]
struct Cli {
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell) and exit.
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    /// STUN server HOST[:PORT] (port 3478 by default); give it twice for two plain
    /// servers. Default: the host of $CHUANTOU_RENDEZVOUS, port 3478.
    #[arg(long, value_name = "HOST[:PORT]")]
    server: Vec<String>,
    /// Also probe TCP: the mapping from one local port (SO_REUSEADDR/SO_REUSEPORT) to two
    /// server endpoints, and TCP port allocation. Needs STUN over TCP on the server.
    #[arg(long)]
    tcp: bool,
    /// Measure the UDP mapping lifetime (RFC 5780 §4.6); takes about as long as the
    /// lifetime itself, at most --lifetime-max.
    #[arg(long)]
    lifetime: bool,
    /// Longest mapping lifetime searched for, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = defaults::LIFETIME_MAX.as_secs())]
    lifetime_max: u64,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// IPv6 STUN server HOST[:PORT] for the `ipv6` section. Default: the first server's
    /// IPv6 address, when its name has one.
    #[arg(long, value_name = "HOST[:PORT]")]
    server6: Option<String>,
    /// Do not ask the default gateway about port mapping (PCP, NAT-PMP, UPnP IGD). By
    /// default natprobe asks which it speaks and makes a test mapping, removed at once
    /// (not for a STUN server on loopback).
    #[arg(long)]
    no_port_mapping: bool,
    /// First STUN retransmission timeout in milliseconds (RFC 8489 RTO; doubles per retry).
    #[arg(long, value_name = "MS", default_value_t = defaults::RTO.as_millis() as u64)]
    rto: u64,
}

fn main() -> std::process::ExitCode {
    wire::cli::run("natprobe", |shutdown| async move {
        let cli = Cli::parse();
        if let Some(shell) = cli.completions {
            return wire::cli::completions::<Cli>(shell, "natprobe");
        }
        let mut names = cli.server.clone();
        if names.is_empty() {
            let rv = std::env::var("CHUANTOU_RENDEZVOUS")
                .context("no STUN server: give --server HOST[:PORT] or set CHUANTOU_RENDEZVOUS")?;
            names.push(host_of(&rv).to_owned());
        }
        if names.len() > 2 {
            anyhow::bail!("at most two --server (one RFC 5780 server, or two plain ones)");
        }
        let mut servers = Vec::new();
        for n in &names {
            servers.push(resolve(n).await?);
        }
        let server6 = match &cli.server6 {
            Some(n) => {
                let a = resolve6(n)
                    .await?
                    .with_context(|| format!("--server6 {n} has no IPv6 address"))?;
                Some(a)
            }
            None => resolve6(&names[0]).await.ok().flatten(),
        };
        if cli.rto == 0 {
            anyhow::bail!("--rto must be at least 1 ms");
        }
        let cfg = Config {
            servers,
            tcp: cli.tcp,
            lifetime: cli
                .lifetime
                .then(|| Duration::from_secs(cli.lifetime_max.max(1))),
            timing: Timing {
                rto: Duration::from_millis(cli.rto),
                ..defaults::timing()
            },
            server6,
            port_mapping: !cli.no_port_mapping,
        };
        let report = tokio::select! {
            r = probe::run(&cfg) => r.context("probing")?,
            _ = shutdown.cancelled() => anyhow::bail!("stopped before the probes finished"),
        };
        if cli.json {
            wire::cli::print(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
        } else {
            wire::cli::print(&report.text())?;
        }
        // Nothing measured is not a result: say so in the exit status too, so scripts
        // do not take "UDP blocked" for a finding when the server may just be down.
        if !report.answered() {
            anyhow::bail!(
                "no STUN answer from {}: UDP is blocked here or the server is down",
                report.server
            );
        }
        Ok(())
    })
}

/// `HOST:PORT` → `HOST` (brackets kept off IPv6 literals).
fn host_of(hostport: &str) -> &str {
    match hostport.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h.trim_start_matches('[').trim_end_matches(']'),
        _ => hostport,
    }
}

/// `HOST[:PORT]` → its IPv6 address, port 3478 by default; `None` when it has none.
async fn resolve6(name: &str) -> anyhow::Result<Option<SocketAddr>> {
    if let Ok(a) = name.parse::<SocketAddr>() {
        return Ok(a.is_ipv6().then_some(a));
    }
    if let Ok(ip) = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        return Ok(ip
            .is_ipv6()
            .then(|| SocketAddr::new(ip, defaults::STUN_PORT)));
    }
    let with_port = match name.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => name.to_owned(),
        _ => format!("{name}:{}", defaults::STUN_PORT),
    };
    Ok(tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("resolving STUN server {name}"))?
        .find(SocketAddr::is_ipv6))
}

/// `HOST[:PORT]` → an address, port 3478 by default, IPv4 preferred.
async fn resolve(name: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = name.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse() {
        return Ok(SocketAddr::new(ip, defaults::STUN_PORT));
    }
    let with_port = match name.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => name.to_owned(),
        _ => format!("{name}:{}", defaults::STUN_PORT),
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("resolving STUN server {name}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("STUN server {name} has no address"))
}
