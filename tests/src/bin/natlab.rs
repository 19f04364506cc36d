//! `natlab`: builds, uses and removes the NAT lab (run through `scripts/natlab`, as root).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use chuantou_tests::natlab::{self, Lab, Router, Spec};
use clap::{Parser, Subcommand};

/// The NAT lab: real kernel NATs of every kind in network namespaces, every address in
/// 198.18.0.0/15.
///
/// Hosts: `server` (the "internet", with 198.18.0.1 and 198.18.0.2 for RFC 5780), `third`
/// (198.18.0.3), each router by its name, and the hosts behind it as ROUTER-1, ROUTER-2, …
///
///   scripts/natlab up                         # one router of every kind
///   scripts/natlab up pr=port-restricted,hairpin seq=symmetric-sequential,delta=2
///   scripts/natlab exec pr-1 -- natprobe --server 198.18.0.1:3478
///   scripts/natlab down
#[derive(Parser)]
#[command(name = "natlab", verbatim_doc_comment)]
struct Cli {
    /// Lab name: namespaces are natlab-<LAB>-<host>, so labs can live side by side.
    #[arg(long, global = true, default_value = "lab")]
    lab: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab (removing any older one of the same name first).
    ///
    /// Each ROUTER is NAME=KIND[,hairpin][,timeout=S][,loss=PCT][,delta=D][,hosts=N], KIND one
    /// of none, full-cone, address-restricted, port-restricted, symmetric-random,
    /// symmetric-sequential. Defaults: no hairpin, timeout 60 s, no loss, delta 1, one host.
    /// Without routers: pub=none fc=full-cone ar=address-restricted pr=port-restricted
    /// symr=symmetric-random syms=symmetric-sequential.
    Up { routers: Vec<String> },
    /// Run a command on a host of the lab.
    Exec {
        /// The host (server, third, a router, or ROUTER-N).
        host: String,
        /// The command and its arguments (after --).
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Print the hosts of the lab and their addresses.
    Show,
    /// Remove every namespace (and so every veth) the lab made.
    Down,
}

fn spec_file(lab: &str) -> String {
    format!("/run/natlab-{lab}.routers")
}

fn saved(lab: &str) -> anyhow::Result<Spec> {
    let text = std::fs::read_to_string(spec_file(lab))
        .map_err(|e| anyhow::anyhow!("lab {lab:?} is not up (scripts/natlab up): {e}"))?;
    let routers = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<Router>, _>>()?;
    Ok(Spec::new(lab, routers)?)
}

fn show(spec: &Spec) {
    println!(
        "{:<14} {:<16} {:<22} namespace",
        "host", "address", "behind"
    );
    for h in spec.hosts() {
        let behind = match &h.router {
            Some(r) => match spec.wan(&r.name) {
                Some(wan) => format!("{} ({wan})", r.kind),
                None => r.kind.to_string(),
            },
            None => "-".into(),
        };
        println!("{:<14} {:<16} {:<22} {}", h.name, h.addr, behind, h.ns);
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("natlab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Up { routers } => {
            natlab::namespaces_allowed()
                .map_err(|why| anyhow::anyhow!("cannot make network namespaces: {why}"))?;
            let spec = if routers.is_empty() {
                Spec::every_kind(&cli.lab)?
            } else {
                let routers = routers
                    .iter()
                    .map(|r| r.parse())
                    .collect::<Result<Vec<Router>, _>>()?;
                Spec::new(&cli.lab, routers)?
            };
            let lab = Lab::up(spec)?;
            let text: Vec<String> = lab.spec.routers.iter().map(|r| r.to_string()).collect();
            std::fs::write(spec_file(&cli.lab), text.join("\n") + "\n")?;
            show(&lab.spec);
            // Keep what was built: the lab outlives this command.
            let spec = lab.spec.clone();
            std::mem::forget(lab);
            eprintln!("lab {:?} is up: scripts/natlab exec HOST -- CMD", spec.lab);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec { host, cmd } => {
            let ns = format!("natlab-{}-{host}", cli.lab);
            if !natlab::existing(&cli.lab).contains(&ns) {
                let known = saved(&cli.lab).map(|s| {
                    s.hosts()
                        .into_iter()
                        .map(|h| h.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                })?;
                anyhow::bail!("no host {host:?} in lab {:?}; hosts: {known}", cli.lab);
            }
            let err = Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(&cmd)
                .exec();
            anyhow::bail!("running {cmd:?} on {host}: {err}")
        }
        Cmd::Show => {
            show(&saved(&cli.lab)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down => {
            let n = natlab::down(&cli.lab);
            let _ = std::fs::remove_file(spec_file(&cli.lab));
            eprintln!("lab {:?}: removed {n} namespaces", cli.lab);
            Ok(ExitCode::SUCCESS)
        }
    }
}
