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

#[derive(Debug)]
struct Entry {
    role: &'static str,
    session: Session,
}

/// The sessions of this process.
#[derive(Debug, Clone, Default)]
pub struct Board {
    entries: Arc<Mutex<Vec<Entry>>>,
    added: Arc<tokio::sync::Notify>,
}

impl Board {
    /// Records a session; it leaves the board when it closes.
    pub fn add(&self, peer: &str, role: &'static str, session: &Session) {
        debug_assert_eq!(peer, session.peer());
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|x| !x.session.closed().is_cancelled());
        e.push(Entry {
            role,
            session: session.clone(),
        });
        drop(e);
        self.added.notify_waiters();
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
    let path = socket_path(home);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let started = Instant::now();
    loop {
        let (mut s, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let json = serde_json::to_vec(&board.snapshot()).unwrap_or_default();
        let _ = s.write_all(&json).await;
        let _ = s.shutdown().await;
        tracing::trace!(uptime = ?started.elapsed(), "status served");
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Asks every peer process of `home` for its tunnels.
pub async fn query(home: &Path) -> std::io::Result<Vec<TunnelStatus>> {
    let mut all = Vec::new();
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
                if let Ok(v) = serde_json::from_slice::<Vec<TunnelStatus>>(&buf) {
                    all.extend(v);
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
}
