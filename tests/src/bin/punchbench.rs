//! `punchbench`: per NAT pair, over N runs in the NAT lab, the time from starting
//! `peer reach` to the first byte (through the relay, at once) and to the direct path,
//! and how often the direct path comes up, for UDP or TCP punching (`--transport`). Run
//! through `scripts/bench/punch` (root).

use std::path::PathBuf;
use std::time::Duration;

use chuantou_tests::lab_peers::{
    KINDS, matrix_routers, must_relay, must_relay_tcp, run_pair, run_pair_via, start_rendezvous,
    start_rendezvous_on,
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
    /// The IPv6 rows instead (UDP): two hosts behind stateful IPv6 firewalls, and a
    /// dual-stack pair (port-restricted NAT and IPv6 firewall each), with how many runs
    /// ended on IPv6.
    #[arg(long)]
    ipv6: bool,
    /// The rows of the hardest cases instead (UDP): random ↔ sequential symmetric both
    /// ways (prediction × birthday; goal >= 90 % direct within 10 s), random ↔ random
    /// with a port-mapping gateway on one side, and a reaching host that moves to another
    /// network (time from the move until traffic is on a direct path from there).
    #[arg(long)]
    hard: bool,
}

/// The rows of the hardest cases: see [`Cli::hard`].
fn hard_rows(cli: &Cli) -> anyhow::Result<()> {
    let routers = [
        "rndx=symmetric-random",
        "seqy=symmetric-sequential",
        "seqx=symmetric-sequential",
        "rndy=symmetric-random",
        "mapx=symmetric-random,map",
        "ex=port-restricted",
        "home=port-restricted",
        "cafe=address-restricted",
    ]
    .iter()
    .map(|r| r.parse::<Router>())
    .collect::<Result<Vec<_>, _>>()?;
    let lab = Lab::up(Spec::new("pbenchh", routers)?)?;
    let _server = start_rendezvous(&lab, &cli.bin_dir.join("rendezvous"));
    let peer = cli.bin_dir.join("peer");
    println!(
        "{:<20} {:>4} {:>8} {:>16}   goal",
        "pair (udp)", "runs", "direct", "direct path ms"
    );
    println!("{:<20} {:>4} {:>8} {:>16}", "", "", "", "p50 / p90");
    let flush = |routers: &[&str]| {
        for r in routers {
            let _ = lab
                .router_command(r, "conntrack")
                .arg("-F")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    };
    for (label, a, b, goal) in [
        ("symr->syms", "rndx-1", "seqy-1", true),
        ("syms->symr", "seqx-1", "rndy-1", true),
        ("symr(mapped)->symr", "mapx-1", "rndy-1", false),
    ] {
        let mut direct = Vec::new();
        for r in 0..cli.runs {
            // Every run with NATs that forgot every mapping (the sweep leaves many).
            flush(&[&a[..4], &b[..4]]);
            // A mapped exposer's mapping must be known before the other side connects.
            let ready = if a.starts_with("map") {
                "port mapped by the gateway"
            } else {
                "registered"
            };
            let run = chuantou_tests::lab_peers::run_pair_when(
                &lab,
                &peer,
                (chuantou_tests::lab_peers::RENDEZVOUS, ready),
                a,
                b,
                &format!("h{}{r}", &a[..3]),
                "udp",
            );
            if let Some(e) = run.error {
                anyhow::bail!("{e}");
            }
            direct.extend(run.to_direct);
        }
        let within = direct
            .iter()
            .filter(|d| **d <= Duration::from_secs(10))
            .count() as f64
            / cli.runs as f64;
        let rate = direct.len() as f64 / cli.runs as f64;
        let goal = if goal {
            format!(
                ">= 90 % within 10 s: {:.0} % {}",
                within * 100.0,
                if within >= 0.9 { "met" } else { "NOT met" }
            )
        } else {
            String::new()
        };
        println!(
            "{:<20} {:>4} {:>7.0}% {:>7} / {:<7}  {goal}",
            label,
            cli.runs,
            rate * 100.0,
            pct(&mut direct, 0.5),
            pct(&mut direct, 0.9),
        );
    }
    // The move: reach on home-1 (then cafe, back and forth), a session on a direct path,
    // then the host moves; measured until traffic runs on a direct path from there.
    let mut moved = Vec::new();
    let mut at = "home";
    for r in 0..cli.runs {
        let (ha, hb) = (
            chuantou_tests::TempHome::new(),
            chuantou_tests::TempHome::new(),
        );
        let service = chuantou_tests::lab_peers::echo_service(&lab, "ex-1").to_string();
        let name = format!("mv{r}");
        let args = ["expose", &service, "--name", &name, "--transport", "udp"];
        let _expose =
            chuantou_tests::lab_peers::start_peer(&lab, &peer, "ex-1", &ha.0, &args, "registered");
        let local = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 17274));
        let local_arg = local.to_string();
        let args = ["reach", &name, "--local", &local_arg, "--transport", "udp"];
        let mut reach =
            chuantou_tests::lab_peers::start_peer(&lab, &peer, "home-1", &hb.0, &args, "reaching");
        chuantou_tests::lab_peers::echo(&lab, "home-1", local, b"first");
        reach.wait_for(&["direct udp path up"]);
        let to = if at == "home" { "cafe" } else { "home" };
        let t = std::time::Instant::now();
        lab.move_host("home-1", to)?;
        at = to;
        reach.wait_for(&[
            "direct paths from before the move closed",
            "traffic continues on the direct",
        ]);
        moved.push(t.elapsed());
        chuantou_tests::lab_peers::echo(&lab, "home-1", local, b"after the move");
    }
    let within5 = moved
        .iter()
        .filter(|d| **d <= Duration::from_secs(5))
        .count();
    println!(
        "{:<20} {:>4} {:>7.0}% {:>7} / {:<7}  direct within 5 s of the move: {} of {}",
        "moved pr->ar",
        cli.runs,
        100.0 * within5 as f64 / cli.runs as f64,
        pct(&mut moved, 0.5),
        pct(&mut moved, 0.9),
        within5,
        cli.runs
    );
    Ok(())
}

/// The IPv6 rows: per pair, direct rate, time to direct, and the share on IPv6.
fn ipv6_rows(cli: &Cli) -> anyhow::Result<()> {
    let routers = [
        "fwx=firewall",
        "fwy=firewall",
        "dsx=port-restricted,v6",
        "dsy=port-restricted,v6",
    ]
    .iter()
    .map(|r| r.parse::<Router>())
    .collect::<Result<Vec<_>, _>>()?;
    let lab = Lab::up(Spec::new("pbench6", routers)?)?;
    let mut server_args = chuantou_tests::lab_peers::EVERY_ADDRESS.to_vec();
    server_args.extend(["--advertise", "198.18.0.1,2001:2::1"]);
    let _server = start_rendezvous_on(
        &lab,
        &cli.bin_dir.join("rendezvous"),
        "server",
        &server_args,
    );
    let peer = cli.bin_dir.join("peer");
    println!(
        "{:<22} {:>4} {:>8} {:>16} {:>8}",
        "pair (udp)", "runs", "direct", "direct path ms", "on IPv6"
    );
    println!("{:<22} {:>4} {:>8} {:>16}", "", "", "", "p50 / p90");
    for (label, a, b, via) in [
        ("firewall6->firewall6", "fwx-1", "fwy-1", "[2001:2::1]:7000"),
        ("dual->dual", "dsx-1", "dsy-1", "198.18.0.1:7000"),
    ] {
        let mut direct = Vec::new();
        let mut on_v6 = 0;
        for r in 0..cli.runs {
            let name = format!("b6{}{r}", &a[..3]);
            let run = run_pair_via(&lab, &peer, via, a, b, &name, "udp");
            if let Some(e) = run.error {
                anyhow::bail!("{e}");
            }
            if let Some(d) = run.to_direct {
                direct.push(d);
            }
            let v6 = run
                .log
                .lines()
                .find(|l| l.contains("punched via udp"))
                .is_some_and(|l| l.contains("remote=[2001:2:"));
            on_v6 += usize::from(v6);
        }
        let rate = direct.len() as f64 / cli.runs as f64;
        println!(
            "{:<22} {:>4} {:>7.0}% {:>7} / {:<7} {:>6.0}%",
            label,
            cli.runs,
            rate * 100.0,
            pct(&mut direct, 0.5),
            pct(&mut direct, 0.9),
            100.0 * on_v6 as f64 / cli.runs as f64
        );
    }
    Ok(())
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
    if cli.ipv6 {
        return ipv6_rows(&cli);
    }
    if cli.hard {
        return hard_rows(&cli);
    }
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
