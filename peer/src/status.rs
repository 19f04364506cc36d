//! `peer status`: what tunnels a running peer has. Each `expose`/`reach` process keeps a
//! [`Board`] of its tunnels and serves it as JSON on a Unix socket `control-<pid>.sock` in
//! its home (so several processes can share a home); `peer status` asks every live socket
//! there and merges the answers. Stale sockets of dead processes are removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::tunnel::{Tunnel, TunnelStats};

/// One tunnel as `peer status --json` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// The other peer's name.
    pub peer: String,
    /// `expose` or `reach`.
    pub role: String,
    /// `relay`, `direct-udp` or `direct-tcp`.
    pub path: String,
    /// Round-trip time through the tunnel (control-stream ping), null until measured.
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
}

#[derive(Debug)]
struct Entry {
    peer: String,
    role: &'static str,
    path: &'static str,
    since: u64,
    stats: Arc<TunnelStats>,
    closed: CancellationToken,
}

/// The tunnels of this process.
#[derive(Debug, Clone, Default)]
pub struct Board {
    entries: Arc<Mutex<Vec<Entry>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Board {
    /// Records a tunnel; it leaves the board when it closes.
    pub fn add(&self, peer: &str, role: &'static str, path: &'static str, tunnel: &Tunnel) {
        self.add_parts(peer, role, path, &tunnel.stats, tunnel.closed());
    }

    /// Records a session counted in `stats` that ends when `closed` is cancelled (one
    /// without a relay tunnel: its paths are direct ones).
    pub fn add_parts(
        &self,
        peer: &str,
        role: &'static str,
        path: &'static str,
        stats: &Arc<TunnelStats>,
        closed: &CancellationToken,
    ) {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|x| !x.closed.is_cancelled());
        e.push(Entry {
            peer: peer.to_owned(),
            role,
            path,
            since,
            stats: stats.clone(),
            closed: closed.clone(),
        });
        drop(e);
        self.changed.notify_waiters();
    }

    /// Changes the path shown for `peer`'s tunnel in `role` (direct when punched, back to
    /// the relay when the direct path dies).
    pub fn set_path(&self, peer: &str, role: &'static str, path: &'static str) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for x in e.iter_mut().filter(|x| x.peer == peer && x.role == role) {
            x.path = path;
        }
        drop(e);
        self.changed.notify_waiters();
    }

    /// Waits until a live tunnel to `peer` shows `path`.
    pub async fn wait_path(&self, peer: &str, path: &str) {
        loop {
            // Made before looking, so a change between the look and the wait still wakes us.
            let changed = self.changed.notified();
            if self
                .snapshot()
                .iter()
                .any(|t| t.peer == peer && t.path == path)
            {
                return;
            }
            changed.await;
        }
    }

    /// The live tunnels now.
    pub fn snapshot(&self) -> Vec<TunnelStatus> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|x| !x.closed.is_cancelled());
        e.iter()
            .map(|x| {
                let s = &x.stats;
                TunnelStatus {
                    peer: x.peer.clone(),
                    role: x.role.to_owned(),
                    path: x.path.to_owned(),
                    rtt_ms: match s.rtt_us.load(Ordering::Relaxed) {
                        0 => None,
                        us => Some(us as f64 / 1000.0),
                    },
                    bytes_out: s.bytes_out.load(Ordering::Relaxed),
                    bytes_in: s.bytes_in.load(Ordering::Relaxed),
                    open_connections: s.open.load(Ordering::Relaxed),
                    since: x.since,
                    pid: std::process::id(),
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
