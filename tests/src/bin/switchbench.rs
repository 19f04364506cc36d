//! `switchbench`: in the NAT lab, the keep-alive download of the session tests measured
//! over N runs — the PC behind a port-restricted cone, the phone behind a random symmetric
//! NAT, a thin relay — giving per run:
//!
//! - the time from "direct path proven" (the exposing peer's log line for the path it
//!   validated and moved traffic to) to the open connection's bytes flowing on it (the
//!   lab's counter of direct bytes between the two NATs growing by 100 KB), sampled every
//!   few milliseconds;
//! - the relay's share of the download's bytes, by the same counters.
//!
//! Run through `scripts/bench/session` (root).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chuantou_tests::lab_peers::start_rendezvous_with;
use chuantou_tests::natlab::{Counted, Lab};
use chuantou_tests::web::{curl, expose_web, reach_web, sha256_file, site};
use chuantou_tests::{BOUND, TempHome};
use clap::Parser;

/// Path-switch benchmark in the NAT lab.
#[derive(Parser)]
struct Cli {
    /// Directory with the `peer` and `rendezvous` binaries to measure.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Runs.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Size of the download, MiB.
    #[arg(long, default_value_t = 100)]
    mib: usize,
    /// The relay's rate per session, bytes/s (a thin relay: 8 Mbit/s).
    #[arg(long, default_value_t = 1_000_000)]
    relay_rate: u64,
}

/// Seconds since the epoch of a log line's RFC 3339 UTC timestamp
/// (`2026-11-29T13:16:14.396113Z  INFO …`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (peer, rendezvous) = (cli.bin_dir.join("peer"), cli.bin_dir.join("rendezvous"));
    let files = TempHome::new();
    let sha = site(&files.0, cli.mib);
    let (mut switches, mut shares) = (Vec::new(), Vec::new());
    println!(" run  switch ms  relay share");
    for run in 0..cli.runs {
        let lab = Lab::for_test(&["pc=port-restricted", "phone=symmetric-random"])
            .ok_or_else(|| anyhow::anyhow!("the NAT lab needs root"))?;
        let rate = cli.relay_rate.to_string();
        let _server = start_rendezvous_with(&lab, &rendezvous, &["--relay-rate", &rate]);
        let mut exposed = expose_web(&lab, &peer, "pc-1", &files.0, "pc-home");
        let home = TempHome::new();
        let _reach = reach_web(&lab, &peer, "phone-1", &home.0, "pc-home");
        let meter = lab.meter("pc", "phone")?;
        let out = home.0.join("big.out");
        let mut download = curl(&lab, "phone-1", &["small", "small", "big"], &out, &[]).spawn()?;
        let mut samples: Vec<(f64, Counted)> = Vec::new();
        let deadline = std::time::Instant::now() + BOUND;
        let status = loop {
            samples.push((now(), meter.read()));
            if let Some(s) = download.try_wait()? {
                break s;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "download took too long"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        anyhow::ensure!(status.success(), "curl failed in run {run}");
        anyhow::ensure!(sha256_file(&out) == sha, "the download arrived altered");
        let log = exposed.expose.log();
        let proven = log
            .lines()
            .find(|l| l.contains("direct udp path up") && l.contains("traffic moves off"))
            .and_then(log_time);
        let last = samples.last().map(|s| s.1).unwrap_or_default();
        let share = last.relay_b as f64 / (last.relay_b + last.direct_ab) as f64;
        shares.push(share);
        let switch = proven.and_then(|t0| {
            let base = samples
                .iter()
                .rev()
                .find(|(t, _)| *t <= t0)
                .map_or(0, |(_, c)| c.direct_ab);
            samples
                .iter()
                .find(|(t, c)| *t >= t0 && c.direct_ab >= base + 100_000)
                .map(|(t, _)| (t - t0) * 1000.0)
        });
        match switch {
            Some(ms) => {
                switches.push(ms);
                println!("{run:>4}  {ms:9.1}  {:10.2} %", share * 100.0);
            }
            None => println!("{run:>4}  {:>9}  {:10.2} %", "-", share * 100.0),
        }
    }
    anyhow::ensure!(!switches.is_empty(), "no run switched to a direct path");
    let n = switches.len();
    let (p50, p90) = (pct(&mut switches, 0.5), pct(&mut switches, 0.9));
    let worst = shares.iter().copied().fold(0.0, f64::max);
    println!(
        "direct path proven -> bytes on it: p50 {p50:.1} ms, p90 {p90:.1} ms over {n} runs (goal p50 <= 50 ms: {})",
        if p50 <= 50.0 { "met" } else { "NOT met" }
    );
    println!(
        "relay share of a {} MiB keep-alive download: worst {:.2} % over {} runs (goal <= 5 %: {})",
        cli.mib,
        worst * 100.0,
        shares.len(),
        if worst <= 0.05 { "met" } else { "NOT met" }
    );
    Ok(())
}
