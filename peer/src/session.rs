//! One end-to-end encrypted session per peer pair: a multipath QUIC connection whose paths
//! are every way the two peers can reach each other now — a punched UDP pair, a punched
//! TCP connection, the relay over UDP or TCP. Every local TCP connection is a stream of it
//! and every local UDP flow a datagram flow, so none is bound to the path it opened on.
//!
//! The [`Session`] owns the paths: it keeps the links under them alive, watches QUIC's path
//! events, and after each event asks [`choose`] which path carries traffic; that one is
//! marked `Available` and the others `Backup`, so QUIC moves the bytes of open streams to
//! a direct path the moment one is validated and back to the relay the moment it is
//! abandoned (a direct path that hears nothing for [`DIRECT_PATH_IDLE`] is). Each change
//! is one log line. The side that dialled (the exposing one) opens new paths with
//! [`Session::open_path`]; both sides choose, each for what it sends.
//!
//! [`choose`]: crate::path::choose
//! [`DIRECT_PATH_IDLE`]: crate::defaults::DIRECT_PATH_IDLE

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use noq::{PathEvent, PathId, PathStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::defaults;
use crate::forward::tcp::TunnelStats;
use crate::path::choose::{Candidate, choose};
use crate::path::link::Link;
use crate::path::{PathKind, canonical, is_mapped};
use crate::transport::Policy;

/// One path as `peer status --json` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathReport {
    /// `direct-udp`, `direct-tcp`, `relay` or `relay-tcp`.
    pub kind: String,
    /// The other end: the peer's address for a direct path, the relay's for a relay.
    pub remote: String,
    /// `active` (carries traffic now) or `standby` (validated, kept alive, unused).
    pub state: String,
    /// Smoothed round trip on this path.
    pub rtt_ms: Option<f64>,
    /// Bytes sent on this path (QUIC packets, headers and encryption included).
    pub bytes_out: u64,
    /// Bytes received on it.
    pub bytes_in: u64,
}

#[derive(Debug)]
struct Known {
    id: PathId,
    kind: PathKind,
    /// The real other end (the peer, or the relay).
    remote: SocketAddr,
    /// The address QUIC knows it by (made up for a link).
    addr: SocketAddr,
    /// When it came up.
    up_at: std::time::Instant,
}

#[derive(Debug, Default)]
struct Table {
    /// When we last moved to another network, until a direct path comes up from there.
    moved_at: Option<std::time::Instant>,
    known: Vec<Known>,
    active: Option<PathId>,
    /// Links under paths (or about to be): alive while held here.
    links: Vec<Link>,
    /// A direct path was lost and none has come back yet (for the "re-punched" line).
    lost_direct: bool,
    /// Paths over a link not (yet) held: a link's first datagrams can reach QUIC a moment
    /// before its maker hands it to the session.
    orphans: Vec<PathId>,
}

#[derive(Debug)]
struct Inner {
    conn: noq::Connection,
    peer: String,
    policy: Policy,
    table: Mutex<Table>,
    stats: Arc<TunnelStats>,
    /// The kind of the path carrying traffic now.
    active: watch::Sender<Option<PathKind>>,
    closed: CancellationToken,
    since: u64,
}

/// A live session; cloning shares it. It ends when its connection does.
#[derive(Debug, Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl Session {
    /// Starts keeping `conn`'s paths: `links` are the links its first path may run on
    /// (held until their path is gone), `policy` the kinds it may use.
    pub fn start(conn: noq::Connection, peer: &str, policy: Policy, links: Vec<Link>) -> Session {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let inner = Arc::new(Inner {
            conn,
            peer: peer.to_owned(),
            policy,
            table: Mutex::new(Table {
                links,
                ..Table::default()
            }),
            stats: Arc::default(),
            active: watch::Sender::new(None),
            closed: CancellationToken::new(),
            since,
        });
        let events = inner.conn.path_events();
        for link in inner.table().links.iter() {
            watch_link(&inner, link);
        }
        inner.add_path(PathId::ZERO);
        inner.rechoose(Some(PathId::ZERO));
        tokio::spawn(watch_paths(inner.clone(), events));
        Session { inner }
    }

    /// The QUIC connection.
    pub fn conn(&self) -> &noq::Connection {
        &self.inner.conn
    }

    /// Byte counters of the local connections it carries.
    pub fn stats(&self) -> &Arc<TunnelStats> {
        &self.inner.stats
    }

    /// Cancelled when the session is over.
    pub fn closed(&self) -> &CancellationToken {
        &self.inner.closed
    }

    /// The other peer's name.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// Unix seconds when it came up.
    pub fn since(&self) -> u64 {
        self.inner.since
    }

    /// The kind of the path carrying traffic now (`None` while there is none).
    pub fn active(&self) -> Option<PathKind> {
        *self.inner.active.borrow()
    }

    /// Watches the kind of the path carrying traffic.
    pub fn watch_active(&self) -> watch::Receiver<Option<PathKind>> {
        self.inner.active.subscribe()
    }

    /// Keeps `link` alive while the session lives (a path over it may be opened, or the
    /// other side may open one to it).
    pub fn hold(&self, link: Link) {
        watch_link(&self.inner, &link);
        let orphans = {
            let mut t = self.inner.table();
            t.links.retain(|l| !l.closed().is_cancelled());
            t.links.push(link);
            std::mem::take(&mut t.orphans)
        };
        for id in orphans {
            self.inner.add_path(id);
            self.inner.rechoose(Some(id));
        }
    }

    /// Opens a path to `addr` (a peer's address or a held link's made-up one); it carries
    /// traffic once QUIC has validated it and [`choose`] prefers it. Only the side that
    /// dialled may open paths.
    pub fn open_path(&self, addr: SocketAddr) {
        let addr = crate::path::for_quic(addr);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            // Right after the handshake (or after paths were abandoned) the other side may
            // not yet have issued connection ids or path ids for one more path: those
            // come within a round trip, so ask again shortly.
            let give_up = tokio::time::Instant::now() + defaults::HANDSHAKE;
            loop {
                let open = inner.conn.open_path_ensure(addr, PathStatus::Backup);
                match open.await {
                    Ok(_) => return,
                    Err(noq::PathError::RemoteCidsExhausted | noq::PathError::MaxPathIdReached)
                        if tokio::time::Instant::now() < give_up =>
                    {
                        tokio::select! {
                            _ = inner.closed.cancelled() => return,
                            _ = tokio::time::sleep(defaults::PATH_RETRY) => {}
                        }
                    }
                    Err(e) => {
                        return warn!(peer = %inner.peer, addr = %canonical(addr), error = %e, "could not open a path");
                    }
                }
            }
        });
    }

    /// Every path now, for `peer status`.
    pub fn report(&self) -> Vec<PathReport> {
        let t = self.inner.table();
        t.known
            .iter()
            .map(|k| {
                let stats = self.inner.conn.path_stats(k.id);
                PathReport {
                    kind: k.kind.name().to_owned(),
                    remote: k.remote.to_string(),
                    state: if t.active == Some(k.id) {
                        "active"
                    } else {
                        "standby"
                    }
                    .to_owned(),
                    rtt_ms: stats.map(|s| s.rtt.as_secs_f64() * 1000.0),
                    bytes_out: stats.map_or(0, |s| s.udp_tx.bytes),
                    bytes_in: stats.map_or(0, |s| s.udp_rx.bytes),
                }
            })
            .collect()
    }

    /// The round trip of the path carrying traffic.
    pub fn rtt(&self) -> Option<Duration> {
        let id = self.inner.table().active?;
        self.inner.conn.rtt(id)
    }

    /// We moved to another network: the direct paths we have were punched from the old
    /// one. The first direct path that comes up from the new one takes over at once, and
    /// the old ones are closed then (not after their idle timeout).
    pub fn moved(&self) {
        self.inner.table().moved_at = Some(std::time::Instant::now());
    }

    /// Ends the session, telling the other side why.
    pub fn close(&self, why: &str) {
        self.inner.conn.close(0u32.into(), why.as_bytes());
    }
}

impl Inner {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records path `id` (just validated) with what carries it.
    fn add_path(&self, id: PathId) {
        let Some(path) = self.conn.path(id) else {
            return;
        };
        let Ok(addr) = path.remote_address() else {
            return;
        };
        let mut t = self.table();
        let (kind, remote) = if is_mapped(&addr) {
            match t.links.iter().find(|l| l.addr == addr) {
                Some(l) => (l.kind, l.remote),
                None => {
                    debug!(peer = %self.peer, %addr, "a path over a link not held (yet)");
                    if !t.orphans.contains(&id) {
                        t.orphans.push(id);
                    }
                    return;
                }
            }
        } else {
            (PathKind::DirectUdp, canonical(addr))
        };
        if !kind.is_direct() {
            // The relay is never given up for silence, only when its link closes or the
            // whole session idles out. When every path fell silent at once (a laptop
            // waking from sleep with every timer overdue) it must be the one left: QUIC
            // never abandons the last path, and a dead direct path left last would carry
            // traffic into nothing, with no re-punch, until the session died. A relay
            // that is gone costs a keep-alive while a direct path carries traffic.
            let _ = path.set_max_idle_timeout(None);
        }
        t.known.retain(|k| k.id != id);
        t.known.push(Known {
            id,
            kind,
            remote,
            addr,
            up_at: std::time::Instant::now(),
        });
    }

    /// Chooses the path to carry traffic (after path `about` came up, if any), marks it
    /// and logs what changed.
    fn rechoose(&self, about: Option<PathId>) {
        if let Some(id) = about {
            self.retire_before_move(id);
        }
        let mut t = self.table();
        let candidates: Vec<Candidate<PathId>> = t
            .known
            .iter()
            .map(|k| Candidate {
                id: k.id,
                kind: k.kind,
                rtt: self.conn.rtt(k.id),
            })
            .collect();
        let before = t.active;
        let before_kind = before.and_then(|id| t.known.iter().find(|k| k.id == id).map(|k| k.kind));
        let chosen = choose(&candidates, before, |k| self.policy.allows(k));
        let kind_of = |id: PathId| t.known.iter().find(|k| k.id == id).map(|k| k.kind);
        let chosen_kind = chosen.and_then(kind_of);
        let rtt = |id: PathId| {
            self.conn.rtt(id).map_or_else(
                || "unmeasured".to_owned(),
                |r| format!("{} ms", r.as_millis()),
            )
        };
        let peer = &self.peer;
        // One line per path that comes up; losses are told by `lose_path`.
        match about {
            Some(id) if chosen == Some(id) && before.is_some() && before != chosen => {
                let k = chosen_kind.unwrap_or(PathKind::Relay);
                let from = before_kind.map_or("nothing", say);
                let again = if k.is_direct() && std::mem::take(&mut t.lost_direct) {
                    "re-punched: "
                } else {
                    ""
                };
                info!(%peer, path = k.name(), "{again}{} path up (rtt {}): traffic moves off the {from}", say(k), rtt(id));
            }
            Some(id) => {
                if let Some(k) = kind_of(id) {
                    let role = if chosen == Some(id) {
                        "traffic flows on it".to_owned()
                    } else {
                        format!(
                            "standing by ({} carries traffic)",
                            chosen_kind.map_or("nothing", say)
                        )
                    };
                    info!(%peer, path = k.name(), "{} path up (rtt {}): {role}", say(k), rtt(id));
                }
            }
            _ => {}
        }
        t.active = chosen;
        // Mark the chosen path for sending and keep the others as warm backups.
        for k in &t.known {
            let status = if Some(k.id) == chosen {
                PathStatus::Available
            } else {
                PathStatus::Backup
            };
            if let Some(p) = self.conn.path(k.id) {
                let _ = p.set_status(status);
            }
        }
        drop(t);
        self.active.send_if_modified(|a| {
            let changed = *a != chosen_kind;
            *a = chosen_kind;
            changed
        });
    }

    /// When path `id` is a direct one that came up after a move, closes the direct paths
    /// from before it: they lead from an address we no longer have.
    fn retire_before_move(&self, id: PathId) {
        let mut t = self.table();
        let Some(moved) = t.moved_at else { return };
        let fresh = t
            .known
            .iter()
            .any(|k| k.id == id && k.kind.is_direct() && k.up_at > moved);
        if !fresh {
            return;
        }
        t.moved_at = None;
        let stale: Vec<PathId> = t
            .known
            .iter()
            .filter(|k| k.kind.is_direct() && k.up_at <= moved)
            .map(|k| k.id)
            .collect();
        t.known.retain(|k| !stale.contains(&k.id));
        if t.active.is_some_and(|a| stale.contains(&a)) {
            t.active = None;
        }
        drop(t);
        self.close_paths(&stale);
        if !stale.is_empty() {
            info!(peer = %self.peer, closed = stale.len(), "direct paths from before the move closed");
        }
    }

    /// Closes paths `ids` (already forgotten by the table); QUIC tells the other side.
    fn close_paths(&self, ids: &[PathId]) {
        for id in ids {
            if let Some(p) = self.conn.path(*id) {
                let _ = p.close();
            }
        }
    }

    /// Forgets path `id` (abandoned) and moves traffic to the next best one.
    fn lose_path(&self, id: PathId) {
        let mut t = self.table();
        t.orphans.retain(|o| *o != id);
        let Some(pos) = t.known.iter().position(|k| k.id == id) else {
            return;
        };
        let lost = t.known.remove(pos);
        let was_active = t.active == Some(id);
        if was_active {
            t.active = None;
        }
        // The direct path carrying traffic went silent: whatever broke it (a NAT that
        // forgot its mappings, a network change) has likely broken the other direct paths
        // through the same NATs too, though they may not know yet (a punched TCP
        // connection takes writes for seconds after its NAT forgot it). Falling back onto
        // one of them would send into a dead path the very frames that abandon the lost
        // one, and QUIC retransmits what a path had in flight only once both sides have
        // abandoned it: seen in the lab as streams stalled for good. So traffic goes to
        // the relay, and the other direct paths are closed; a re-punch brings direct back.
        // Except those that came up after the lost one went silent (it is given up after
        // DIRECT_PATH_IDLE of silence): they were proven since, as a re-punch after a
        // move to another network proves its path, and take over at once.
        let silent_since = std::time::Instant::now()
            .checked_sub(defaults::DIRECT_PATH_IDLE)
            .unwrap_or_else(std::time::Instant::now);
        let suspects: Vec<PathId> =
            if was_active && lost.kind.is_direct() && t.known.iter().any(|k| !k.kind.is_direct()) {
                t.known
                    .iter()
                    .filter(|k| k.kind.is_direct() && k.up_at <= silent_since)
                    .map(|k| k.id)
                    .collect()
            } else {
                Vec::new()
            };
        t.known.retain(|k| !suspects.contains(&k.id));
        if lost.kind.is_direct() && !t.known.iter().any(|k| k.kind.is_direct()) {
            t.lost_direct = true;
        }
        // A link whose path is gone is of no more use.
        t.links.retain(|l| l.addr != lost.addr);
        drop(t);
        self.close_paths(&suspects);
        if !suspects.is_empty() {
            debug!(peer = %self.peer, closed = suspects.len(), "other direct paths closed with the lost one");
        }
        self.rechoose(None);
        let next = *self.active.borrow();
        let peer = &self.peer;
        if was_active {
            match next {
                Some(k) => {
                    info!(%peer, path = k.name(), "{} path lost: traffic continues on the {}", say(lost.kind), say(k))
                }
                None => warn!(%peer, "{} path lost: no path left", say(lost.kind)),
            }
        } else {
            info!(%peer, "{} path lost (it was standing by)", say(lost.kind));
        }
    }
}

/// When `link`'s connection ends (the relay closed it, the punched TCP connection broke),
/// its path is closed at once instead of after its idle timeout; if it was the last path,
/// the session ends.
fn watch_link(inner: &Arc<Inner>, link: &Link) {
    let (weak, closed, addr) = (Arc::downgrade(inner), link.closed().clone(), link.addr);
    tokio::spawn(async move {
        closed.cancelled().await;
        let Some(inner) = weak.upgrade() else { return };
        let id = inner
            .table()
            .known
            .iter()
            .find(|k| k.addr == addr)
            .map(|k| k.id);
        let Some(path) = id.and_then(|id| inner.conn.path(id)) else {
            return;
        };
        if let Err(noq::ClosePathError::LastOpenPath) = path.close() {
            inner.conn.close(0u32.into(), b"the last path closed");
        }
    });
}

/// How a log line names a path kind.
fn say(k: PathKind) -> &'static str {
    match k {
        PathKind::DirectUdp => "direct udp",
        PathKind::DirectTcp => "direct tcp",
        PathKind::Relay => "relay",
        PathKind::RelayTcp => "relay over tcp",
    }
}

async fn watch_paths(inner: Arc<Inner>, mut events: noq::PathEvents) {
    let mut tick = tokio::time::interval(defaults::STATUS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let conn = inner.conn.clone();
    loop {
        tokio::select! {
            why = conn.closed() => {
                match why {
                    // The other side said why (a refusal, or its user stopping it).
                    noq::ConnectionError::ApplicationClosed(ref c) if !c.reason.is_empty() => warn!(
                        peer = %inner.peer,
                        "{} closed the session: {}",
                        inner.peer,
                        String::from_utf8_lossy(&c.reason)
                    ),
                    ref why => info!(peer = %inner.peer, "session closed: {why}"),
                }
                break;
            }
            e = events.next() => match e {
                Some(Ok(PathEvent::Established { id, .. })) => {
                    inner.add_path(id);
                    inner.rechoose(Some(id));
                }
                Some(Ok(PathEvent::Abandoned { id, reason, .. })) => {
                    debug!(peer = %inner.peer, %id, ?reason, "path abandoned");
                    inner.lose_path(id);
                }
                Some(Ok(_)) => {}
                Some(Err(lagged)) => warn!(peer = %inner.peer, %lagged, "missed path events"),
                None => break,
            },
            // Round trips change: the choice among paths of one kind may too.
            _ = tick.tick() => inner.rechoose(None),
        }
    }
    inner.active.send_replace(None);
    inner.closed.cancel();
    // The links go a moment later: a close of ours is still on its way out through them
    // (noq hands it to the link after `closed()` fired), and dropping a link drops what it
    // has not written yet, so the other side would wait for its idle timeout instead.
    tokio::time::sleep(defaults::LINK_LINGER).await;
    inner.table().links.clear();
}

/// On the way out of a process, after its sessions were closed: lets the closes go out
/// (the endpoint drains each for three PTOs, with the links kept for [`defaults::
/// LINK_LINGER`]), so the other side's connections end now, not at its idle timeout.
pub async fn flush_closes(endpoint: &noq::Endpoint) {
    let _ = tokio::time::timeout(defaults::CLOSE_FLUSH, endpoint.wait_idle()).await;
}
