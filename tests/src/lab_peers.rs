//! Peers in the NAT lab as real processes: a rendezvous on the server host, `peer expose`
//! of an echo service behind one NAT and `peer reach` behind another, with their logs read
//! line by line so a test waits for events ("direct udp path up"), never for time. Used by the
//! punching matrix test and by `scripts/bench/punch`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::natlab::{Lab, SERVER_ALT_IP, SERVER_IP};
use crate::{BOUND, TempHome};

/// Every NAT kind of the lab: (short router name, kind).
pub const KINDS: [(&str, &str); 6] = [
    ("pub", "none"),
    ("fc", "full-cone"),
    ("ar", "address-restricted"),
    ("pr", "port-restricted"),
    ("symr", "symmetric-random"),
    ("syms", "symmetric-sequential"),
];

/// Whether the pair (by short names) must use the relay over UDP: random symmetric with
/// random symmetric (no port mapping in the matrix).
pub fn must_relay(a: &str, b: &str) -> bool {
    a == "symr" && b == "symr"
}

/// Whether the pair goes direct over UDP only by chance: random ↔ sequential symmetric
/// (prediction × birthday, about 95 % by design; `tests/tests/hard_pairs.rs` measures
/// it), so the matrix accepts either path for it.
pub fn by_chance(a: &str, b: &str) -> bool {
    matches!((a, b), ("symr", "syms") | ("syms", "symr"))
}

/// Routers for a matrix of every ordered pair of kinds: two of each kind, `{short}x` for
/// the exposing side and `{short}y` for the reaching one, hosts `{short}x-1`, `{short}y-1`.
pub fn matrix_routers() -> Vec<String> {
    KINDS
        .iter()
        .flat_map(|(s, k)| [format!("{s}x={k}"), format!("{s}y={k}")])
        .collect()
}

/// In a lab of [`matrix_routers`] with a rendezvous, runs [`run_pair`] for every ordered pair of kinds with
/// `transport`, and compares each path with the one it must get: `direct` unless
/// `must_relay(expose, reach)`; either for [`by_chance`] pairs over UDP. Prints the table;
/// panics with every mismatch and its log.
pub fn run_matrix(transport: &str, direct: &str, must_relay: fn(&str, &str) -> bool) {
    let routers = matrix_routers();
    let refs: Vec<&str> = routers.iter().map(String::as_str).collect();
    let Some(lab) = Lab::for_test(&refs) else {
        return;
    };
    let (lab, peer) = (&lab, &crate::workspace_bin("peer"));
    let server = &mut start_rendezvous(lab, &crate::workspace_bin("rendezvous"));
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for (i, (a, _)) in KINDS.iter().enumerate() {
        for (j, (b, _)) in KINDS.iter().enumerate() {
            let (host_a, host_b) = (format!("{a}x-1"), format!("{b}y-1"));
            let name = format!("{}{i}{j}", &transport[..1]);
            let run = run_pair(lab, peer, &host_a, &host_b, &name, transport);
            if let Some(e) = run.error {
                panic!("{e}\n--- rendezvous and relay:\n{}", server.finish());
            }
            let chance = direct == "direct-udp" && by_chance(a, b);
            let want = if must_relay(a, b) || (chance && !run.direct) {
                "relay"
            } else {
                direct
            };
            let ms = run
                .to_direct
                .map_or("-".to_owned(), |d| d.as_millis().to_string());
            table.push(format!("{a:>5} -> {b:<5} {:<11} {ms:>6} ms", run.path));
            // A connection says its path, and on the relay why, once the punch is over.
            let line = &run.connection;
            let unexplained = if want == "relay" {
                !line.contains("via the relay") || line.contains("still punching")
            } else {
                line.contains("via the relay")
            };
            if run.direct != (want == direct) || run.path != want || unexplained {
                failures.push(format!(
                    "{a} -> {b}: got {} ({}; {}), want {want}\n{}",
                    run.path, run.outcome, run.connection, run.log
                ));
            }
        }
    }
    println!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The lab for [`direct_path_dies`]: two port-restricted cones, `a` and `b`.
pub const DIES_ROUTERS: [&str; 2] = ["a=port-restricted", "b=port-restricted"];

/// `expose` on `a-1` and `reach` on `b-1` with `transport`; once a connection has taken the
/// direct path, router `a` starts dropping what `drop` matches (an nft match, e.g.
/// `meta l4proto udp`), silently; reach must log the path as lost, and the next connection
/// must take the relay.
pub fn direct_path_dies(lab: &Lab, peer: &Path, transport: &str, drop: &str) {
    let (up, _) = verdicts(transport);
    let (via, lost) = match transport {
        "tcp" => ("connection via the direct tcp path", "direct tcp path lost"),
        _ => ("connection via the direct path", "direct udp path lost"),
    };
    let (home_a, home_b) = (TempHome::new(), TempHome::new());
    let service = echo_service(lab, "a-1");
    let _expose = start_expose(lab, peer, "a-1", &home_a.0, service, "pc", transport);
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 17274));
    let mut reach = start_reach(lab, peer, "b-1", &home_b.0, "pc", local, transport);
    echo(lab, "b-1", local, b"first");
    reach.wait_for(&[up]);
    echo(lab, "b-1", local, b"direct");
    reach.wait_for(&[via]);
    let cut = format!(
        "table ip cut {{\n  chain f {{ type filter hook forward priority filter - 10; \
         policy accept;\n    {drop} drop\n  }}\n}}\n"
    );
    lab.nft("a", &cut).unwrap();
    reach.wait_for(&[lost]);
    echo(lab, "b-1", local, b"after");
    let line = reach.wait_for(&["connection via the"]);
    assert!(line.contains("via the relay"), "{line}");
}

/// Whether the pair must use the relay when punching TCP: random symmetric with any
/// symmetric NAT (as for UDP), and random symmetric with a port-restricted cone (TCP has no
/// birthday mode, and the cone lets in only the port it connected to, which the random
/// NAT never uses towards it).
pub fn must_relay_tcp(a: &str, b: &str) -> bool {
    let sym = |k: &str| k.starts_with("sym");
    (sym(a) && sym(b) && (a == "symr" || b == "symr"))
        || matches!((a, b), ("symr", "pr") | ("pr", "symr"))
}

/// The log lines that end a punch of `transport` on the reaching side: up, or not.
pub fn verdicts(transport: &str) -> (&'static str, &'static [&'static str]) {
    match transport {
        "tcp" => (
            "direct tcp path up",
            &["no direct tcp path", "no direct tcp:"],
        ),
        _ => (
            "direct udp path up",
            &["staying on the relay", "relay only"],
        ),
    }
}

/// A process whose stderr lines arrive on a channel; killed on drop.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
    /// A directory of its own (a rendezvous' state), removed with it.
    dir: Option<std::path::PathBuf>,
}

/// A fresh state directory for one rendezvous process: each has its own identity and name
/// database (the database takes a lock, so two servers cannot share one).
pub fn state_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "chuantou-rv-state-{}",
        hex::encode(rand::random::<[u8; 8]>())
    ))
}

impl Proc {
    /// Starts `cmd` with its stderr read line by line.
    pub fn start(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
            dir: None,
        }
    }

    /// The first line containing any of `what`; panics with the log after [`BOUND`].
    pub fn wait_for(&mut self, what: &[&str]) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if what.iter().any(|w| line.contains(w)) {
                        return line;
                    }
                }
                Err(_) => panic!("none of {what:?} in:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Proc {
    /// Every line so far, including those not waited for yet.
    pub fn log(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }

    /// Sends `signal` to the process (SIGSTOP and SIGCONT freeze and thaw it, as a
    /// laptop's sleep does: every timer is overdue when it wakes).
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .expect("a child's pid");
        rustix::process::kill_process(pid, signal).expect("signalling a child");
    }

    /// Stops the process as a service manager would (SIGTERM), waits (bounded) until it
    /// has exited, and returns its whole log and whether it exited on its own in time.
    pub fn terminate(&mut self) -> (String, bool) {
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + BOUND;
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            // Its stderr closing is the event to wait on; lines until then are kept.
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    exited = self.child.wait().is_ok();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        (self.finish(), exited)
    }

    /// Ends the process and returns its whole log (for a failure report).
    pub fn finish(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader thread ends when the pipe closes.
        while let Ok(l) = self.lines.recv_timeout(BOUND) {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Echoes `data` through a connection to `to` made on `host`, checking what comes back.
pub fn echo(lab: &Lab, host: &str, to: SocketAddr, data: &[u8]) {
    try_echo(lab, host, to, data).unwrap_or_else(|e| panic!("{e}"));
}

/// [`echo`], saying what went wrong instead of panicking.
pub fn try_echo(lab: &Lab, host: &str, to: SocketAddr, data: &[u8]) -> Result<(), String> {
    let mut s = lab
        .tcp_connect(host, None, to)
        .map_err(|e| format!("connecting to {to}: {e}"))?;
    s.set_read_timeout(Some(BOUND)).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let out = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&out)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::new();
    let read = s.read_to_end(&mut back);
    let wrote = writer.join().map_err(|_| "writer panicked".to_string())?;
    read.map_err(|e| format!("reading the echo of {} bytes: {e}", data.len()))?;
    wrote.map_err(|e| format!("writing {} bytes: {e}", data.len()))?;
    if back != data {
        return Err(format!(
            "echo came back different ({} of {} bytes)",
            back.len(),
            data.len()
        ));
    }
    Ok(())
}

/// A TCP echo service on `host`'s loopback; returns its port.
pub fn echo_service(lab: &Lab, host: &str) -> u16 {
    let l = lab
        .tcp_listener(host, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

/// `peer status --json` of the processes using `home`.
pub fn status(peer: &Path, home: &Path) -> serde_json::Value {
    let out = Command::new(peer)
        .arg("--home")
        .arg(home)
        .args(["status", "--json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The path carrying the first session's traffic, as `peer status --json` shows it.
pub fn status_path(peer: &Path, home: &Path) -> String {
    status(peer, home)[0]["path"]
        .as_str()
        .unwrap_or("none")
        .to_owned()
}

/// The rendezvous (RFC 5780 STUN, relay) on the lab's server host.
pub fn start_rendezvous(lab: &Lab, rendezvous: &Path) -> Proc {
    start_rendezvous_with(lab, rendezvous, &[])
}

/// [`start_rendezvous`] with more flags (relay limits, say).
pub fn start_rendezvous_with(lab: &Lab, rendezvous: &Path, extra: &[&str]) -> Proc {
    let state = state_dir();
    let mut cmd = lab.command("server", rendezvous);
    cmd.arg("--state").arg(&state);
    cmd.args(["--listen", "198.18.0.1:7000", "--stun"])
        .arg(format!("{SERVER_IP}:3478"))
        .args(["--alt-ip", &SERVER_ALT_IP.to_string(), "--no-http"])
        .args(["--relay", "198.18.0.1:7001"])
        .args(extra);
    cmd.env("RUST_LOG", "info,relay=debug");
    let mut server = Proc::start(cmd);
    server.dir = Some(state);
    server.wait_for(&["relay listening"]);
    server
}

/// A rendezvous on lab host `host` with exactly `args` (and a fresh `--state`), returned
/// once its relay listens.
pub fn start_rendezvous_on(lab: &Lab, rendezvous: &Path, host: &str, args: &[&str]) -> Proc {
    let state = state_dir();
    let mut cmd = lab.command(host, rendezvous);
    cmd.arg("--state").arg(&state).args(args);
    cmd.env("RUST_LOG", "info,relay=debug");
    let mut server = Proc::start(cmd);
    server.dir = Some(state);
    server.wait_for(&["relay listening"]);
    server
}

/// `peer expose SERVICE --name NAME` on `host`, registered when this returns.
pub fn start_expose(
    lab: &Lab,
    peer: &Path,
    host: &str,
    home: &Path,
    service: u16,
    name: &str,
    transport: &str,
) -> Proc {
    let service = service.to_string();
    let args = ["expose", &service, "--name", name, "--transport", transport];
    start_peer(lab, peer, host, home, &args, "registered")
}

/// A rendezvous on every address of its host (signaling 7000, STUN 3478, relay 7001, no
/// HTTP API): dual stack where the host has IPv6, as a server with default flags.
pub const EVERY_ADDRESS: [&str; 7] = [
    "--listen",
    "0.0.0.0:7000",
    "--stun",
    "0.0.0.0:3478",
    "--relay",
    "0.0.0.0:7001",
    "--no-http",
];

/// Where [`start_rendezvous`] serves signaling.
pub const RENDEZVOUS: &str = "198.18.0.1:7000";

/// `peer --home HOME --rendezvous … ARGS` on `host`, returned once its log says `ready`.
pub fn start_peer(
    lab: &Lab,
    peer: &Path,
    host: &str,
    home: &Path,
    args: &[&str],
    ready: &str,
) -> Proc {
    start_peer_via(lab, peer, host, home, RENDEZVOUS, args, ready)
}

/// [`start_peer`] with the rendezvous at `rendezvous`.
pub fn start_peer_via(
    lab: &Lab,
    peer: &Path,
    host: &str,
    home: &Path,
    rendezvous: &str,
    args: &[&str],
    ready: &str,
) -> Proc {
    let mut cmd = lab.command(host, peer);
    cmd.arg("--home")
        .arg(home)
        .args(["--rendezvous", rendezvous])
        .args(args);
    let mut p = Proc::start(cmd);
    p.wait_for(&[ready]);
    p
}

/// `peer reach NAME --local LOCAL` on `host`, listening when this returns.
pub fn start_reach(
    lab: &Lab,
    peer: &Path,
    host: &str,
    home: &Path,
    name: &str,
    local: SocketAddr,
    transport: &str,
) -> Proc {
    let local = local.to_string();
    let args = ["reach", name, "--local", &local, "--transport", transport];
    start_peer(lab, peer, host, home, &args, "reaching")
}

/// `peer expose` of an echo service on `host_a` as `name`, `peer reach name` on `host_b`;
/// echoes through it, waits for the punch's verdict, echoes 256 KiB on whichever path new
/// connections then take. Returns (punched, the verdict line, the status path, reach's log).
pub fn run_pair(
    lab: &Lab,
    peer: &Path,
    host_a: &str,
    host_b: &str,
    name: &str,
    transport: &str,
) -> PairRun {
    run_pair_via(lab, peer, RENDEZVOUS, host_a, host_b, name, transport)
}

/// [`run_pair`] with the rendezvous at `rendezvous`.
pub fn run_pair_via(
    lab: &Lab,
    peer: &Path,
    rendezvous: &str,
    host_a: &str,
    host_b: &str,
    name: &str,
    transport: &str,
) -> PairRun {
    run_pair_when(
        lab,
        peer,
        (rendezvous, "registered"),
        host_a,
        host_b,
        name,
        transport,
    )
}

/// [`run_pair_via`], starting `reach` only once the exposer's log has `ready` (e.g. its
/// gateway's port mapping).
pub fn run_pair_when(
    lab: &Lab,
    peer: &Path,
    (rendezvous, ready): (&str, &str),
    host_a: &str,
    host_b: &str,
    name: &str,
    transport: &str,
) -> PairRun {
    let (home_a, home_b) = (TempHome::new(), TempHome::new());
    let service = echo_service(lab, host_a).to_string();
    let args = ["expose", &service, "--name", name, "--transport", transport];
    let expose = start_peer_via(lab, peer, host_a, &home_a.0, rendezvous, &args, ready);
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 17274));
    let started = Instant::now();
    let local_arg = local.to_string();
    let args = [
        "reach",
        name,
        "--local",
        &local_arg,
        "--transport",
        transport,
    ];
    let mut reach = start_peer_via(lab, peer, host_b, &home_b.0, rendezvous, &args, "reaching");
    // The first connection brokers the session: relay at once, punching beside it.
    let mut expose = expose;
    let fail = |e: String, reach: &mut Proc, expose: &mut Proc| PairRun {
        direct: false,
        outcome: String::new(),
        path: String::new(),
        connection: String::new(),
        log: String::new(),
        first_byte: Duration::ZERO,
        to_direct: None,
        error: Some(format!(
            "{host_a} -> {host_b}: {e}\n--- reach:\n{}\n--- expose:\n{}",
            reach.finish(),
            expose.finish()
        )),
    };
    if let Err(e) = try_echo(lab, host_b, local, b"first") {
        return fail(e, &mut reach, &mut expose);
    }
    let first_byte = started.elapsed();
    let (up, down) = verdicts(transport);
    let mut ends = vec![up];
    ends.extend_from_slice(down);
    let outcome = reach.wait_for(&ends);
    let direct = outcome.contains(up);
    let to_direct = direct.then(|| started.elapsed());
    // Then a bigger exchange, both ways, on whichever path new connections take.
    let data: Vec<u8> = (0..256 * 1024u32).map(|k| (k % 251) as u8).collect();
    if let Err(e) = try_echo(lab, host_b, local, &data) {
        return fail(e, &mut reach, &mut expose);
    }
    let path = status_path(peer, &home_b.0);
    // The big exchange's connection is the second one reach logged: its path and why.
    let is_conn = |l: &String| l.contains("connection via the");
    while reach.seen.iter().filter(|l| is_conn(l)).count() < 2 {
        reach.wait_for(&["connection via the"]);
    }
    let connection = reach
        .seen
        .iter()
        .filter(|l| is_conn(l))
        .nth(1)
        .cloned()
        .unwrap_or_default();
    let log = reach.log();
    drop((expose, reach));
    PairRun {
        direct,
        outcome,
        path,
        connection,
        log,
        first_byte,
        to_direct,
        error: None,
    }
}

/// What one expose/reach pair did.
#[derive(Debug, Clone)]
pub struct PairRun {
    /// Whether the punch worked.
    pub direct: bool,
    /// reach's log line with the punch's verdict.
    pub outcome: String,
    /// The path `peer status` showed after the transfers.
    pub path: String,
    /// reach's log line for the big exchange's connection (its path and why).
    pub connection: String,
    /// reach's whole log.
    pub log: String,
    /// From starting `reach` to the first echoed byte (through the relay, at once).
    pub first_byte: Duration,
    /// From starting `reach` to the direct path being up.
    pub to_direct: Option<Duration>,
    /// Why an echo failed, with both peers' logs.
    pub error: Option<String>,
}
