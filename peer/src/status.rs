//! `peer status`: what sessions a running peer has. Each `expose`/`reach` process keeps a
//! [`Board`] of its sessions and serves it as JSON on a Unix socket `control-<pid>.sock` in
//! its home (so several processes can share a home); `peer status` asks every live socket
//! there and merges the answers. Stale sockets of dead processes are removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::session::{PathReport, Session};

/// One session as `peer status --json` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// Our registered name the session belongs to.
    #[serde(default)]
    pub local: String,
    /// The other peer's name.
    pub peer: String,
    /// `expose` or `reach`.
    pub role: String,
    /// The path carrying traffic now: `direct-udp`, `direct-tcp`, `relay`, `relay-tcp`, or
    /// `none` while there is none.
    pub path: String,
    /// Round-trip time on that path, null until measured.
    pub rtt_ms: Option<f64>,
    /// Payload bytes sent to the other peer.
    pub bytes_out: u64,
    /// Payload bytes received from it.
    pub bytes_in: u64,
    /// Local connections open through it now.
    pub open_connections: u64,
    /// Unix seconds when it came up.
    pub since: u64,
    /// The process serving it.
    pub pid: u32,
    /// Every path of the session, the active one and those standing by.
    #[serde(default)]
    pub paths: Vec<PathReport>,
}

/// One registration of a running process, for `peer status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationStatus {
    /// The registered name.
    pub name: String,
    /// `expose` or `reach`.
    pub role: String,
    /// The rendezvous it is registered with.
    pub rendezvous: String,
    /// The services it offers (`7274/tcp`), none for a reach.
    pub services: Vec<String>,
    /// Its signaling connection's public address as the rendezvous saw it.
    pub observed_tcp: Option<String>,
    /// Its UDP endpoint's public address as the rendezvous saw it (null without STUN).
    pub observed_udp: Option<String>,
    /// Unix seconds when it registered.
    pub since: u64,
    /// The process.
    pub pid: u32,
    /// Where clients that run no `peer` reach the service (`--public*`), if published.
    #[serde(default)]
    pub public: Vec<String>,
}

/// What one process reports on its control socket (and `peer status --json --all`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its registrations, also those with no session.
    pub registrations: Vec<RegistrationStatus>,
    /// Its live sessions.
    pub sessions: Vec<TunnelStatus>,
}

#[derive(Debug)]
struct Entry {
    /// Our registered name the session belongs to.
    local: String,
    role: &'static str,
    session: Session,
}

/// The sessions of this process.
#[derive(Debug, Clone, Default)]
pub struct Board {
    entries: Arc<Mutex<Vec<Entry>>>,
    added: Arc<tokio::sync::Notify>,
    registrations: Arc<Mutex<Vec<RegistrationStatus>>>,
}

impl Board {
    /// Records a registration (replacing an earlier one of the same name).
    pub fn registered(&self, r: RegistrationStatus) {
        let mut regs = self.registrations.lock().unwrap_or_else(|p| p.into_inner());
        regs.retain(|x| x.name != r.name);
        regs.push(r);
    }

    /// Forgets the registration of `name` (the rendezvous was lost).
    pub fn unregistered(&self, name: &str) {
        let mut regs = self.registrations.lock().unwrap_or_else(|p| p.into_inner());
        regs.retain(|x| x.name != name);
    }

    /// Records a session of our registration `local`; it leaves the board when it closes.
    pub fn add(&self, local: &str, peer: &str, role: &'static str, session: &Session) {
        debug_assert_eq!(peer, session.peer());
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|x| !x.session.closed().is_cancelled());
        e.push(Entry {
            local: local.to_owned(),
            role,
            session: session.clone(),
        });
        drop(e);
        self.added.notify_waiters();
    }

    /// The live sessions of our registration `local`.
    pub fn sessions_of(&self, local: &str) -> Vec<Session> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|x| x.local == local && !x.session.closed().is_cancelled())
            .map(|x| x.session.clone())
            .collect()
    }

    /// Wakes its waiters whenever a session is added.
    pub fn added(&self) -> Arc<tokio::sync::Notify> {
        self.added.clone()
    }

    /// Waits until a live session with `peer` carries its traffic on `path`.
    pub async fn wait_path(&self, peer: &str, path: &str) {
        loop {
            // Made before looking, so a change between the look and the wait still wakes us.
            let added = self.added.notified();
            let mut watches = Vec::new();
            for x in self
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|x| x.session.peer() == peer && !x.session.closed().is_cancelled())
            {
                let mut w = x.session.watch_active();
                if w.borrow_and_update().is_some_and(|k| k.name() == path) {
                    return;
                }
                watches.push(w);
            }
            let changes: Vec<_> = watches.iter_mut().map(|w| Box::pin(w.changed())).collect();
            if changes.is_empty() {
                added.await;
            } else {
                tokio::select! {
                    _ = added => {}
                    _ = futures::future::select_all(changes) => {}
                }
            }
        }
    }

    /// The live sessions now.
    pub fn snapshot(&self) -> Vec<TunnelStatus> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|x| !x.session.closed().is_cancelled());
        e.iter()
            .map(|x| {
                let session = &x.session;
                let s = session.stats();
                TunnelStatus {
                    local: x.local.clone(),
                    peer: session.peer().to_owned(),
                    role: x.role.to_owned(),
                    path: session.active().map_or("none", |k| k.name()).to_owned(),
                    rtt_ms: session.rtt().map(|r| r.as_secs_f64() * 1000.0),
                    bytes_out: s.bytes_out.load(Ordering::Relaxed),
                    bytes_in: s.bytes_in.load(Ordering::Relaxed),
                    open_connections: s.open.load(Ordering::Relaxed),
                    since: session.since(),
                    pid: std::process::id(),
                    paths: session.report(),
                }
            })
            .collect()
    }
}

fn socket_path(home: &Path) -> PathBuf {
    home.join(format!("control-{}.sock", std::process::id()))
}

/// Serves `board` on this process's control socket until `shutdown`; removes the socket.
pub async fn serve(home: &Path, board: Board, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = bind(home)?;
    serve_on(listener, home, board, shutdown).await
}

/// Binds this process's control socket in `home` (inside a runtime), so that it exists
/// before anything is started that `peer status` should see.
pub fn bind(home: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(home);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path)
}

/// Serves `board` on `listener` (from [`bind`] in `home`) until `shutdown`; removes the
/// socket.
pub async fn serve_on(
    listener: UnixListener,
    home: &Path,
    board: Board,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let path = socket_path(home);
    let started = Instant::now();
    loop {
        let (mut s, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let snapshot = Snapshot {
            registrations: board
                .registrations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            sessions: board.snapshot(),
        };
        let json = serde_json::to_vec(&snapshot).unwrap_or_default();
        let _ = s.write_all(&json).await;
        let _ = s.shutdown().await;
        tracing::trace!(uptime = ?started.elapsed(), "status served");
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Asks every peer process of `home` for its tunnels.
pub async fn query(home: &Path) -> std::io::Result<Vec<TunnelStatus>> {
    Ok(query_all(home).await?.sessions)
}

/// Asks every peer process of `home` for its registrations and tunnels.
pub async fn query_all(home: &Path) -> std::io::Result<Snapshot> {
    let mut all = Snapshot::default();
    // A handful of entries: reading the directory synchronously is fine.
    for entry in std::fs::read_dir(home)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("control-") && name.ends_with(".sock")) {
            continue;
        }
        match tokio::net::UnixStream::connect(entry.path()).await {
            Ok(mut s) => {
                let mut buf = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await?;
                if let Ok(v) = serde_json::from_slice::<Snapshot>(&buf) {
                    all.registrations.extend(v.registrations);
                    all.sessions.extend(v.sessions);
                } else if let Ok(v) = serde_json::from_slice::<Vec<TunnelStatus>>(&buf) {
                    // A process of the version before registrations were reported.
                    all.sessions.extend(v);
                }
            }
            // A socket nobody listens on belongs to a process that died: clean it up.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(entry.path());
            }
            Err(_) => {}
        }
    }
    Ok(all)
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl RegistrationStatus {
    /// `name` registered just now as `role` with `rendezvous`, as `r` tells.
    pub fn of(
        name: &str,
        role: &str,
        rendezvous: &str,
        services: &[wire::signal::Service],
        r: &crate::presence::signal::Registration,
    ) -> RegistrationStatus {
        RegistrationStatus {
            name: name.to_owned(),
            role: role.to_owned(),
            rendezvous: rendezvous.to_owned(),
            services: services.iter().map(|s| s.reference().to_string()).collect(),
            observed_tcp: r.tcp.as_ref().map(|t| t.observed.to_string()),
            observed_udp: r
                .udp
                .as_ref()
                .and_then(|u| u.observed)
                .map(|a| a.to_string()),
            since: unix_now(),
            pid: std::process::id(),
            public: Vec::new(),
        }
    }
}

/// A byte count in human units: `812 B`, `4.2 KiB`, `17.9 MiB`, `1.3 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// How long ago unix second `since` was, at `now`: `42 s`, `3 min`, `5 h`, `2 d`.
pub fn age(since: u64, now: u64) -> String {
    let s = now.saturating_sub(since);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// One line of `peer ping`: round `seq`, the path carrying traffic with its round trip,
/// then the paths standing by.
pub fn ping_line(peer: &str, seq: u32, paths: &[PathReport]) -> String {
    let rtt = |p: &PathReport| p.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms"));
    let active = paths.iter().find(|p| p.state == "active");
    let mut line = match active {
        Some(p) => format!("seq={seq} {peer} via {} ({}) {}", p.kind, p.remote, rtt(p)),
        None => format!("seq={seq} {peer}: no path carries traffic yet"),
    };
    let standby: Vec<String> = paths
        .iter()
        .filter(|p| p.state != "active")
        .map(|p| format!("{} {}", p.kind, rtt(p)))
        .collect();
    if !standby.is_empty() {
        line += &format!(" | standby: {}", standby.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_line_names_the_active_path_first_and_the_others_after() {
        let path = |kind: &str, state: &str, rtt| PathReport {
            kind: kind.into(),
            remote: "198.18.1.2:40000".into(),
            state: state.into(),
            rtt_ms: rtt,
            bytes_out: 0,
            bytes_in: 0,
        };
        let paths = [
            path("relay", "standby", Some(3.0)),
            path("direct-udp", "active", Some(0.5)),
            path("direct-tcp", "standby", None),
        ];
        assert_eq!(
            ping_line("pc-home", 2, &paths),
            "seq=2 pc-home via direct-udp (198.18.1.2:40000) 0.50 ms | standby: relay 3.00 ms, direct-tcp -"
        );
        assert_eq!(
            ping_line("pc-home", 0, &[]),
            "seq=0 pc-home: no path carries traffic yet"
        );
    }

    #[test]
    fn bytes_and_ages_read_as_people_say_them() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(4300), "4.2 KiB");
        assert_eq!(bytes(18_769_000), "17.9 MiB");
        assert_eq!(bytes(1_395_864_371), "1.3 GiB");
        assert_eq!(age(100, 142), "42 s");
        assert_eq!(age(0, 200), "3 min");
        assert_eq!(age(0, 5 * 3600 + 10), "5 h");
        assert_eq!(age(0, 2 * 86_400 + 1), "2 d");
        assert_eq!(age(10, 5), "0 s");
    }
}
