//! `punchbench`: per NAT pair, over N runs in the NAT lab, the time from starting
//! `peer reach` to the first byte (through the relay, at once) and to the direct path,
//! and how often the direct path comes up, for UDP or TCP punching (`--transport`). Run
//! through `scripts/bench/punch` (root).

use std::path::PathBuf;
use std::time::Duration;

use chuantou_tests::lab_peers::{
    KINDS, matrix_routers, must_relay, must_relay_tcp, run_pair, start_rendezvous,
};
use chuantou_tests::natlab::{Lab, Router, Spec};
use clap::Parser;

/// Punching benchmark in the NAT lab.
#[derive(Parser)]
struct Cli {
    /// Directory with the `peer` and `rendezvous` binaries to measure.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Runs per pair.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Pairs as EXPOSE:REACH short kinds (pub fc ar pr symr syms), comma separated.
    #[arg(
        long,
        default_value = "pr:pr,fc:pr,ar:pr,pub:pr,pr:syms,syms:syms,pr:symr,symr:pr,symr:symr"
    )]
    pairs: String,
    /// What to punch: udp (QUIC) or tcp (simultaneous open).
    #[arg(long, default_value = "udp", value_parser = ["udp", "tcp"])]
    transport: String,
}

fn pct(v: &mut [Duration], p: f64) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    format!("{:.0}", v[i].as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let pairs: Vec<(String, String)> = cli
        .pairs
        .split(',')
        .map(|p| {
            let (a, b) = p.split_once(':').unwrap_or((p, p));
            (a.to_owned(), b.to_owned())
        })
        .collect();
    let kind = |short: &str| {
        KINDS
            .iter()
            .find(|(s, _)| *s == short)
            .map(|(_, k)| *k)
            .ok_or_else(|| anyhow::anyhow!("unknown kind {short}"))
    };
    let routers = matrix_routers()
        .iter()
        .map(|r| r.parse::<Router>())
        .collect::<Result<Vec<_>, _>>()?;
    for (a, b) in &pairs {
        kind(a)?;
        kind(b)?;
    }
    let lab = Lab::up(Spec::new("pbench", routers)?)?;
    let _server = start_rendezvous(&lab, &cli.bin_dir.join("rendezvous"));
    let peer = cli.bin_dir.join("peer");
    println!(
        "{:<12} {:>4} {:>8} {:>14} {:>16}   goal",
        "pair", "runs", "direct", "first byte ms", "direct path ms"
    );
    println!(
        "{:<12} {:>4} {:>8} {:>14} {:>16}",
        "", "", "", "p50 / p90", "p50 / p90"
    );
    for (a, b) in &pairs {
        let mut first = Vec::new();
        let mut direct = Vec::new();
        for r in 0..cli.runs {
            let run = run_pair(
                &lab,
                &peer,
                &format!("{a}x-1"),
                &format!("{b}y-1"),
                &format!("b{}{a}{b}{r}", cli.transport),
                &cli.transport,
            );
            if let Some(e) = run.error {
                anyhow::bail!("{e}");
            }
            first.push(run.first_byte);
            if let Some(d) = run.to_direct {
                direct.push(d);
            }
        }
        let rate = direct.len() as f64 / cli.runs as f64;
        let cone = |k: &str| matches!(k, "pub" | "fc" | "ar" | "pr");
        let tcp = cli.transport == "tcp";
        let birthday = !tcp && ((a == "pr" && b == "symr") || (a == "symr" && b == "pr"));
        let relay = if tcp {
            must_relay_tcp(a, b)
        } else {
            must_relay(a, b)
        };
        let goal = if relay {
            format!(
                "relay expected: {}",
                if direct.is_empty() { "ok" } else { "DIRECT?" }
            )
        } else if birthday {
            let within5 = direct
                .iter()
                .filter(|d| **d <= Duration::from_secs(5))
                .count();
            let r = within5 as f64 / cli.runs as f64;
            format!(
                "birthday >= 95 % within 5 s: {:.0} % {}",
                r * 100.0,
                if r >= 0.95 { "met" } else { "NOT met" }
            )
        } else if cone(a) && cone(b) {
            let p50 = {
                let mut d = direct.clone();
                d.sort();
                d.get(d.len() / 2).copied()
            };
            let met = rate == 1.0 && p50.is_some_and(|p| p <= Duration::from_millis(300));
            format!(
                "cone p50 <= 300 ms: {}",
                if met { "met" } else { "NOT met" }
            )
        } else {
            String::new()
        };
        println!(
            "{:<12} {:>4} {:>7.0}% {:>6} / {:<6} {:>7} / {:<7}  {}",
            format!("{a}->{b}"),
            cli.runs,
            rate * 100.0,
            pct(&mut first, 0.5),
            pct(&mut first, 0.9),
            pct(&mut direct, 0.5),
            pct(&mut direct, 0.9),
            goal
        );
    }
    Ok(())
}
