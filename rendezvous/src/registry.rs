//! The registry: which name belongs to which key, where each peer was last seen, and who is
//! online. Sans-IO: it owns no socket and never reads the clock; every call that depends on
//! time takes `now`.
//!
//! # Drive loop
//!
//! 1. Feed what happens: [`Registry::register`], [`Registry::heartbeat`],
//!    [`Registry::observe_udp`], [`Registry::disconnect`].
//! 2. Call [`Registry::handle_timeout`] when the instant from [`Registry::poll_timeout`]
//!    has come (calling it early or twice is harmless).
//! 3. Drain [`Registry::poll_event`] until `None`: peers that went offline because their
//!    heartbeats stopped (the shell closes their connections), names forgotten.
//!
//! Rules: a name is bound to the first key that registers it and stays bound while the peer
//! is offline, for [`Timing::name_retention`]; the same key registering again replaces the
//! old entry (a reconnect, and the old connection is handed back to be closed); another key
//! gets [`RegistryError::NameTaken`]. Every binding was proved (a signature by its key), so
//! none is ever evicted to make room: a full registry refuses new names. Bindings a
//! restarted server read back from its store ([`Registry::restore`]) are held the same way
//! until their peers register again or their retention runs out; the owner may give a name
//! up ([`Registry::release`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Bound;
use std::time::{Duration, Instant};

use crate::defaults;
use wire::signal::{PublicKey, Service};

/// Identifies one signaling connection in the shell.
pub type ConnId = u64;

/// Liveness settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often peers heartbeat.
    pub heartbeat_interval: Duration,
    /// Heartbeats that may be missed before a peer goes offline.
    pub missed_heartbeats: u32,
    /// How long an offline peer keeps its name.
    pub name_retention: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_interval: defaults::HEARTBEAT_INTERVAL,
            missed_heartbeats: defaults::MISSED_HEARTBEATS,
            name_retention: defaults::NAME_RETENTION,
        }
    }
}

impl Timing {
    /// Silence after which a peer goes offline.
    pub fn expiry(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats
    }
}

/// Why the registry refused something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The name is bound to another key.
    #[error("name {name:?} is taken by another key ({owner})")]
    NameTaken {
        /// The contested name.
        name: String,
        /// The key that holds it.
        owner: PublicKey,
    },
    /// The registry holds its maximum of names and none can be evicted.
    #[error("registry is full ({max} names)")]
    Full {
        /// The limit.
        max: usize,
    },
    /// This connection already holds another name.
    #[error("this connection is already registered as {0:?}")]
    OtherName(String),
    /// The connection has no registration.
    #[error("not registered: register before heartbeats or connects")]
    NotRegistered,
    /// The address the name is registered from already holds its share of names.
    #[error(
        "{prefix} already holds {max} names (the most one address may); release one with `peer release`"
    )]
    TooManyNames {
        /// The address (IPv4) or /64 (IPv6).
        prefix: String,
        /// The limit.
        max: usize,
    },
    /// Only the name's owner, registered under it, may release it.
    #[error("only {0:?}'s owner, registered under that name on this connection, may release it")]
    NotOwner(String),
}

/// What a peer registers with.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The name to bind.
    pub name: String,
    /// Its verified public key.
    pub key: PublicKey,
    /// What it offers.
    pub services: Vec<Service>,
    /// LAN addresses it reported.
    pub lan_addrs: Vec<SocketAddr>,
    /// The signaling connection's remote address.
    pub tcp_addr: SocketAddr,
    /// The connection it came on.
    pub conn: ConnId,
    /// STUN credential for this registration (chosen by the shell, random).
    pub stun: StunCredential,
    /// What the peer measured of its NAT.
    pub nat: Option<wire::signal::NatInfo>,
}

/// A STUN short-term credential linking Binding requests to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunCredential {
    /// Sent in USERNAME.
    pub username: String,
    /// Keys MESSAGE-INTEGRITY.
    pub password: String,
}

/// Why a port mapping was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappedError {
    /// The connection holds no name.
    #[error("register before telling a port mapping")]
    NotRegistered,
    /// The mapping's IP is not where the server sees the peer.
    #[error(
        "port mapping {0} is not at an address this server sees you at (a gateway behind \
         another NAT?): not offered to peers"
    )]
    NotObserved(SocketAddr),
}

/// The outcome of a successful registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Whether the name was already bound to this key (a reconnect or an update).
    pub replaced: bool,
    /// An older connection of the same key that the shell should close.
    pub old_conn: Option<ConnId>,
}

/// A registered peer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The address (or IPv6 /64) the name was first bound from.
    pub origin: std::net::IpAddr,
    /// Its key.
    pub key: PublicKey,
    /// What it offers.
    pub services: Vec<Service>,
    /// LAN addresses it reported.
    pub lan_addrs: Vec<SocketAddr>,
    /// Last observed signaling address.
    pub tcp_addr: SocketAddr,
    /// Last observed STUN address in its signaling connection's address family, if any.
    pub udp_addr: Option<SocketAddr>,
    /// Last observed STUN address in the other family (IPv6 beside IPv4, or the reverse).
    pub udp_alt: Option<SocketAddr>,
    /// Its connection while online.
    pub conn: Option<ConnId>,
    /// When it was last heard from.
    pub last_seen: Instant,
    /// Its last reported round trip to the server.
    pub rtt: Option<Duration>,
    stun: StunCredential,
    /// The highest freshness counter a credentialed STUN request of this registration has
    /// carried: an observation needs a higher one, so a replayed request moves nothing.
    stun_counter: u64,
    /// What the peer measured of its NAT.
    pub nat: Option<wire::signal::NatInfo>,
    /// The TCP port's latest mapping, from a credentialed STUN Binding over TCP.
    pub tcp_seen: Option<SocketAddr>,
    /// TCP behaviour, from `tcp_addr` and `tcp_seen`.
    pub tcp_nat: Option<wire::signal::NatInfo>,
    /// The port its gateway mapped for its UDP endpoint, as the peer said.
    pub mapped: Option<SocketAddr>,
}

impl Entry {
    /// Where its TCP port is reachable now: the latest mapping seen.
    pub fn tcp_candidate(&self) -> SocketAddr {
        self.tcp_seen.unwrap_or(self.tcp_addr)
    }

    /// Online means connected and heartbeating.
    pub fn online(&self) -> bool {
        self.conn.is_some()
    }
}

/// Why a peer went offline on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineReason {
    /// Its heartbeats stopped.
    Expired,
}

/// Things the registry decided on a timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer went offline; the shell should close `conn`.
    Offline {
        /// The peer.
        name: String,
        /// Its connection.
        conn: ConnId,
        /// Why.
        reason: OfflineReason,
    },
    /// An offline peer's name was released.
    Forgotten {
        /// The released name.
        name: String,
    },
}

/// The registry core.
#[derive(Debug)]
pub struct Registry {
    timing: Timing,
    max_peers: usize,
    peers: BTreeMap<String, Entry>,
    /// Bindings restored from the store whose peers have not registered since: the key and
    /// when the peer was last seen.
    held: BTreeMap<String, (PublicKey, Instant)>,
    /// Names bound from each address (IPv4) or /64 (IPv6), by where they were first
    /// registered from, and the most one may hold.
    by_origin: HashMap<std::net::IpAddr, usize>,
    max_per_origin: usize,
    by_conn: HashMap<ConnId, String>,
    by_stun: HashMap<String, String>,
    next_wake: Option<Instant>,
    events: VecDeque<Event>,
}

impl Registry {
    /// An empty registry.
    pub fn new(timing: Timing, max_peers: usize) -> Self {
        Registry {
            timing,
            max_peers,
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
            by_origin: HashMap::new(),
            max_per_origin: defaults::MAX_NAMES_PER_IP,
            by_conn: HashMap::new(),
            by_stun: HashMap::new(),
            next_wake: None,
            events: VecDeque::new(),
        }
    }

    /// Sets the most names one address (IPv4) or /64 (IPv6) may bind.
    pub fn with_max_names_per_ip(mut self, max: usize) -> Self {
        self.max_per_origin = max.max(1);
        self
    }

    /// Its liveness settings.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Binds `reg.name` to `reg.key` on `reg.conn`.
    pub fn register(
        &mut self,
        now: Instant,
        reg: Registration,
    ) -> Result<Registered, RegistryError> {
        if let Some(held) = self.by_conn.get(&reg.conn)
            && *held != reg.name
        {
            return Err(RegistryError::OtherName(held.clone()));
        }
        let owner = self
            .peers
            .get(&reg.name)
            .map(|e| e.key)
            .or_else(|| self.held.get(&reg.name).map(|h| h.0));
        let replaced = match owner {
            Some(owner) if owner != reg.key => {
                return Err(RegistryError::NameTaken {
                    name: reg.name,
                    owner,
                });
            }
            Some(_) => true,
            None => {
                if self.len() >= self.max_peers {
                    return Err(RegistryError::Full {
                        max: self.max_peers,
                    });
                }
                let origin = origin_of(reg.tcp_addr.ip());
                if self.by_origin.get(&origin).copied().unwrap_or(0) >= self.max_per_origin {
                    return Err(RegistryError::TooManyNames {
                        prefix: match origin {
                            std::net::IpAddr::V6(_) => format!("{origin}/64"),
                            std::net::IpAddr::V4(_) => origin.to_string(),
                        },
                        max: self.max_per_origin,
                    });
                }
                false
            }
        };
        self.held.remove(&reg.name);
        // Where the binding was first made from: it counts against that address for as
        // long as it lasts, wherever its peer registers from later.
        let origin = self
            .peers
            .get(&reg.name)
            .map_or_else(|| origin_of(reg.tcp_addr.ip()), |e| e.origin);
        if !replaced {
            *self.by_origin.entry(origin).or_default() += 1;
        }
        let entry = Entry {
            origin,
            key: reg.key,
            services: reg.services,
            lan_addrs: reg.lan_addrs,
            tcp_addr: reg.tcp_addr,
            udp_addr: None,
            udp_alt: None,
            conn: Some(reg.conn),
            last_seen: now,
            rtt: None,
            stun: reg.stun,
            stun_counter: 0,
            nat: reg.nat,
            tcp_seen: None,
            tcp_nat: None,
            mapped: None,
        };
        self.by_stun
            .insert(entry.stun.username.clone(), reg.name.clone());
        self.by_conn.insert(reg.conn, reg.name.clone());
        let mut old_conn = None;
        if let Some(old) = self.peers.insert(reg.name, entry) {
            self.by_stun.remove(&old.stun.username);
            if let Some(c) = old.conn.filter(|c| *c != reg.conn) {
                self.by_conn.remove(&c);
                old_conn = Some(c);
            }
        }
        self.wake_by(now + self.timing.expiry());
        Ok(Registered { replaced, old_conn })
    }

    /// Records a heartbeat on `conn`; returns the peer's observed UDP address.
    pub fn heartbeat(
        &mut self,
        now: Instant,
        conn: ConnId,
        rtt: Option<Duration>,
    ) -> Result<Option<SocketAddr>, RegistryError> {
        let entry = self.entry_of_conn(conn)?;
        entry.last_seen = now;
        if rtt.is_some() {
            entry.rtt = rtt;
        }
        Ok(entry.udp_addr)
    }

    /// The STUN password of a registration's username, if it is current.
    pub fn stun_password(&self, username: &str) -> Option<&str> {
        let name = self.by_stun.get(username)?;
        Some(self.peers.get(name)?.stun.password.as_str())
    }

    /// Records the address a credentialed STUN request came from, if its freshness
    /// `counter` is higher than any before (else it is a replay: `None`); returns the
    /// peer's name and whether the address differs from the one seen before.
    pub fn observe_udp(
        &mut self,
        username: &str,
        counter: u64,
        addr: SocketAddr,
    ) -> Option<(&str, bool)> {
        let name = self.by_stun.get(username)?;
        let entry = self.peers.get_mut(name)?;
        if counter <= entry.stun_counter {
            return None;
        }
        entry.stun_counter = counter;
        // A dual-stack peer asks in both families: each family keeps its own mapping.
        let slot = if addr.is_ipv6() == entry.tcp_addr.is_ipv6() {
            &mut entry.udp_addr
        } else {
            &mut entry.udp_alt
        };
        let changed = *slot != Some(addr);
        *slot = Some(addr);
        Some((name.as_str(), changed))
    }

    /// Records the address a credentialed STUN request over TCP came from (if `counter`
    /// is fresh, as for [`Registry::observe_udp`]): the latest
    /// mapping of the peer's TCP port. Only the first one after registering measures the
    /// NAT (the signaling connection's mapping and this one, in that order); later ones
    /// only move the candidate. Returns the peer's name and its TCP NAT.
    pub fn observe_tcp(
        &mut self,
        username: &str,
        counter: u64,
        addr: SocketAddr,
    ) -> Option<(&str, wire::signal::NatInfo)> {
        let name = self.by_stun.get(username)?;
        let entry = self.peers.get_mut(name)?;
        if counter <= entry.stun_counter {
            return None;
        }
        entry.stun_counter = counter;
        let nat = *entry
            .tcp_nat
            .get_or_insert_with(|| wire::signal::NatInfo::from_tcp_mappings(entry.tcp_addr, addr));
        entry.tcp_seen = Some(addr);
        Some((name.as_str(), nat))
    }

    /// Records the port mapping the peer on `conn` says its gateway granted. Kept only
    /// when the mapping's IP is one the server observes the peer at: a gateway behind a
    /// second NAT maps an address nobody can reach, and a peer must not be able to aim
    /// other peers' probes at an address of its choosing. Returns the peer's name and
    /// whether the mapping changed (a peer may say the same again as often as it likes;
    /// only a change is worth a log line).
    pub fn set_mapped(
        &mut self,
        conn: ConnId,
        addr: Option<SocketAddr>,
    ) -> Result<(&str, bool), MappedError> {
        let name = self.by_conn.get(&conn).ok_or(MappedError::NotRegistered)?;
        let entry = self.peers.get_mut(name).ok_or(MappedError::NotRegistered)?;
        if let Some(a) = addr {
            let seen = [Some(entry.tcp_addr), entry.udp_addr, entry.udp_alt];
            if a.port() == 0 || !seen.iter().flatten().any(|s| s.ip() == a.ip()) {
                return Err(MappedError::NotObserved(a));
            }
        }
        let changed = entry.mapped != addr;
        entry.mapped = addr;
        Ok((name.as_str(), changed))
    }

    /// The connection closed: its peer goes offline (its name stays bound). Returns the name.
    pub fn disconnect(&mut self, now: Instant, conn: ConnId) -> Option<String> {
        let name = self.by_conn.remove(&conn)?;
        if let Some(e) = self.peers.get_mut(&name) {
            e.conn = None;
            e.last_seen = now;
            self.wake_by(now + self.timing.name_retention);
        }
        Some(name)
    }

    /// The name registered on `conn`.
    pub fn name_of(&self, conn: ConnId) -> Option<&str> {
        self.by_conn.get(&conn).map(String::as_str)
    }

    /// One peer.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.peers.get(name)
    }

    /// Up to `limit` peers in name order after `after`, and whether more follow.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<(&str, &Entry)>, bool) {
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut it = self
            .peers
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(n, e)| (n.as_str(), e));
        let page: Vec<_> = it.by_ref().take(limit).collect();
        (page, it.next().is_some())
    }

    /// Every peer, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.peers.iter().map(|(n, e)| (n.as_str(), e))
    }

    /// Names bound, online or not.
    pub fn len(&self) -> usize {
        self.peers.len() + self.held.len()
    }

    /// True when no name is bound.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Peers online now.
    pub fn online(&self) -> usize {
        self.by_conn.len()
    }

    /// When [`Registry::handle_timeout`] next has work, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_wake
    }

    /// Expires silent peers and forgets long-offline names whose time has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_wake.is_none_or(|w| now < w) {
            return;
        }
        let expiry = self.timing.expiry();
        let retention = self.timing.name_retention;
        let mut next: Option<Instant> = None;
        let mut forget = Vec::new();
        for (name, e) in self.peers.iter_mut() {
            let deadline = match e.conn {
                Some(conn) if e.last_seen + expiry <= now => {
                    self.by_conn.remove(&conn);
                    e.conn = None;
                    self.events.push_back(Event::Offline {
                        name: name.clone(),
                        conn,
                        reason: OfflineReason::Expired,
                    });
                    e.last_seen + expiry + retention
                }
                Some(_) => e.last_seen + expiry,
                None if e.last_seen + retention <= now => {
                    forget.push(name.clone());
                    continue;
                }
                None => e.last_seen + retention,
            };
            next = Some(next.map_or(deadline, |n| n.min(deadline)));
        }
        for (name, (_, last_seen)) in &self.held {
            let deadline = *last_seen + retention;
            if deadline <= now {
                forget.push(name.clone());
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        for name in forget {
            self.remove(&name);
            self.held.remove(&name);
            self.events.push_back(Event::Forgotten { name });
        }
        self.next_wake = next.map(|n| n.max(now + defaults::SWEEP_GRANULARITY));
    }

    /// The next thing the registry decided, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn entry_of_conn(&mut self, conn: ConnId) -> Result<&mut Entry, RegistryError> {
        let name = self
            .by_conn
            .get(&conn)
            .ok_or(RegistryError::NotRegistered)?;
        self.peers.get_mut(name).ok_or(RegistryError::NotRegistered)
    }

    fn wake_by(&mut self, at: Instant) {
        self.next_wake = Some(self.next_wake.map_or(at, |w| w.min(at)));
    }

    fn remove(&mut self, name: &str) {
        if let Some(e) = self.peers.remove(name) {
            if let Some(n) = self.by_origin.get_mut(&e.origin) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.by_origin.remove(&e.origin);
                }
            }
            self.by_stun.remove(&e.stun.username);
            if let Some(c) = e.conn {
                self.by_conn.remove(&c);
            }
        }
    }

    /// Holds `name` for `key`, as a restarted server reads it back from its store: bound
    /// but offline, last seen at `last_seen` (its retention counts from then).
    pub fn restore(&mut self, name: String, key: PublicKey, last_seen: Instant) {
        if self.peers.contains_key(&name) {
            return;
        }
        self.held.insert(name, (key, last_seen));
        self.wake_by(last_seen + self.timing.name_retention);
    }

    /// Gives `name` up: only its owner, registered under it on `conn`, may. The name is
    /// free at once; the connection stays (unregistered).
    pub fn release(&mut self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        if self.by_conn.get(&conn).map(String::as_str) != Some(name) {
            return Err(RegistryError::NotOwner(name.to_owned()));
        }
        self.remove(name);
        Ok(())
    }

    /// Names bound and online now, with their keys (to refresh the store's last-seen).
    pub fn online_bindings(&self) -> impl Iterator<Item = (&str, PublicKey)> {
        self.peers
            .iter()
            .filter(|(_, e)| e.online())
            .map(|(n, e)| (n.as_str(), e.key))
    }

    /// Up to `limit` names bound to `key`, online, offline or held since a restart.
    pub fn names_of(&self, key: &PublicKey, limit: usize) -> Vec<String> {
        let bound = self.peers.iter().map(|(n, e)| (n, &e.key));
        let held = self.held.iter().map(|(n, (k, _))| (n, k));
        bound
            .chain(held)
            .filter(|(_, k)| *k == key)
            .map(|(n, _)| n.clone())
            .take(limit)
            .collect()
    }

    /// Whether `name` is held for a peer that has not come back since a restart.
    pub fn is_held(&self, name: &str) -> bool {
        self.held.contains_key(name)
    }
}

/// What a binding counts against: the IPv4 address, or the IPv6 /64 (one household or
/// phone gets a whole /64, so its addresses are one origin).
fn origin_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(v4) => std::net::IpAddr::V4(v4),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::signal::Proto;

    const S: Duration = Duration::from_secs(1);

    fn reg(name: &str, key: u8, conn: ConnId) -> Registration {
        Registration {
            name: name.into(),
            key: PublicKey([key; 32]),
            services: vec![Service {
                port: 7274,
                proto: Proto::Tcp,
                description: String::new(),
            }],
            lan_addrs: vec![],
            tcp_addr: SocketAddr::from(([198, 18, 0, key], 40000 + conn as u16)),
            conn,
            stun: StunCredential {
                username: format!("u{conn}"),
                password: format!("p{conn}"),
            },
            nat: None,
        }
    }

    fn events(r: &mut Registry) -> Vec<Event> {
        std::iter::from_fn(|| r.poll_event()).collect()
    }

    /// Runs the registry's clock forward to `until`, waking exactly when it asks.
    fn run_until(r: &mut Registry, until: Instant) -> Vec<Event> {
        while let Some(at) = r.poll_timeout().filter(|at| *at <= until) {
            r.handle_timeout(at);
        }
        events(r)
    }

    #[test]
    fn first_key_wins_and_another_key_is_refused() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 10);
        let ok = r.register(t0, reg("pc-home", 1, 1)).unwrap();
        assert_eq!(
            ok,
            Registered {
                replaced: false,
                old_conn: None
            }
        );
        let err = r.register(t0, reg("pc-home", 2, 2)).unwrap_err();
        assert_eq!(
            err,
            RegistryError::NameTaken {
                name: "pc-home".into(),
                owner: PublicKey([1; 32])
            }
        );
        assert!(err.to_string().contains("taken by another key"));
        assert_eq!(r.get("pc-home").unwrap().tcp_addr.port(), 40001);
        assert_eq!(r.online(), 1);
    }

    #[test]
    fn same_key_reconnect_replaces_and_hands_back_old_connection() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 10);
        r.register(t0, reg("pc", 1, 1)).unwrap();
        r.observe_udp("u1", 1, "198.18.0.1:5000".parse().unwrap());
        let ok = r.register(t0 + S, reg("pc", 1, 2)).unwrap();
        assert_eq!(
            ok,
            Registered {
                replaced: true,
                old_conn: Some(1)
            }
        );
        let e = r.get("pc").unwrap();
        assert_eq!(e.conn, Some(2));
        assert_eq!(e.udp_addr, None, "a new registration observes UDP afresh");
        assert_eq!(r.stun_password("u1"), None, "old credential is void");
        assert_eq!(r.stun_password("u2"), Some("p2"));
        // The old connection closing later must not take the new registration offline.
        assert_eq!(r.disconnect(t0 + 2 * S, 1), None);
        assert!(r.get("pc").unwrap().online());
        assert_eq!(r.online(), 1);
    }

    #[test]
    fn one_connection_holds_one_name() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 10);
        r.register(t0, reg("a", 1, 1)).unwrap();
        assert_eq!(
            r.register(t0, reg("b", 1, 1)).unwrap_err(),
            RegistryError::OtherName("a".into())
        );
        // Re-registering the same name on the same connection updates it.
        let mut again = reg("a", 1, 1);
        again.services.clear();
        assert_eq!(
            r.register(t0, again).unwrap(),
            Registered {
                replaced: true,
                old_conn: None
            }
        );
        assert!(r.get("a").unwrap().services.is_empty());
    }

    #[test]
    fn silent_peer_expires_after_missed_heartbeats_in_virtual_time() {
        let t0 = Instant::now();
        let timing = Timing::default();
        let mut r = Registry::new(timing, 10);
        r.register(t0, reg("pc", 1, 1)).unwrap();
        r.register(t0, reg("phone", 2, 2)).unwrap();
        // phone heartbeats every interval; pc falls silent.
        let mut t = t0;
        while t < t0 + timing.expiry() + 10 * S {
            t += timing.heartbeat_interval;
            assert!(
                run_until(&mut r, t)
                    .iter()
                    .all(|e| matches!(e, Event::Offline { name, .. } if name == "pc"))
            );
            r.heartbeat(t, 2, Some(Duration::from_millis(30))).unwrap();
        }
        assert!(!r.get("pc").unwrap().online());
        assert!(r.get("phone").unwrap().online());
        assert_eq!(r.get("phone").unwrap().rtt, Some(Duration::from_millis(30)));
        assert_eq!(r.heartbeat(t, 1, None), Err(RegistryError::NotRegistered));
    }

    #[test]
    fn expiry_happens_exactly_at_the_deadline() {
        let t0 = Instant::now();
        let timing = Timing::default();
        let mut r = Registry::new(timing, 10);
        r.register(t0, reg("pc", 1, 7)).unwrap();
        let deadline = t0 + timing.expiry();
        assert_eq!(r.poll_timeout(), Some(deadline));
        assert!(run_until(&mut r, deadline - Duration::from_millis(1)).is_empty());
        assert!(r.get("pc").unwrap().online());
        assert_eq!(
            run_until(&mut r, deadline),
            vec![Event::Offline {
                name: "pc".into(),
                conn: 7,
                reason: OfflineReason::Expired
            }]
        );
        // The name stays bound while offline: another key still cannot take it.
        assert!(matches!(
            r.register(deadline, reg("pc", 9, 8)),
            Err(RegistryError::NameTaken { .. })
        ));
        // After the retention the name is free.
        let forgotten = run_until(&mut r, deadline + timing.name_retention);
        assert_eq!(forgotten, vec![Event::Forgotten { name: "pc".into() }]);
        assert!(
            r.register(deadline + timing.name_retention, reg("pc", 9, 8))
                .is_ok()
        );
    }

    #[test]
    fn heartbeats_keep_a_peer_online_indefinitely() {
        let t0 = Instant::now();
        let timing = Timing {
            heartbeat_interval: Duration::from_secs(2),
            missed_heartbeats: 3,
            name_retention: Duration::from_secs(60),
        };
        let mut r = Registry::new(timing, 10);
        r.register(t0, reg("pc", 1, 1)).unwrap();
        for i in 1..1000u32 {
            let t = t0 + timing.heartbeat_interval * i;
            assert!(run_until(&mut r, t).is_empty(), "at heartbeat {i}");
            r.heartbeat(t, 1, None).unwrap();
        }
        assert!(r.get("pc").unwrap().online());
    }

    #[test]
    fn disconnect_goes_offline_and_reconnect_brings_back() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 10);
        r.register(t0, reg("pc", 1, 1)).unwrap();
        assert_eq!(r.disconnect(t0 + S, 1).as_deref(), Some("pc"));
        assert!(!r.get("pc").unwrap().online());
        assert_eq!(r.online(), 0);
        assert_eq!(r.len(), 1);
        let ok = r.register(t0 + 2 * S, reg("pc", 1, 2)).unwrap();
        assert_eq!(
            ok,
            Registered {
                replaced: true,
                old_conn: None
            }
        );
        assert!(r.get("pc").unwrap().online());
    }

    #[test]
    fn udp_observation_needs_the_current_credential() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 10);
        r.register(t0, reg("pc", 1, 1)).unwrap();
        let a: SocketAddr = "198.18.5.5:6000".parse().unwrap();
        assert_eq!(r.observe_udp("nobody", 1, a), None);
        assert_eq!(r.observe_udp("u1", 1, a), Some(("pc", true)));
        assert_eq!(r.observe_udp("u1", 2, a), Some(("pc", false)));
        assert_eq!(r.heartbeat(t0, 1, None), Ok(Some(a)));
    }

    #[test]
    fn a_port_mapping_is_kept_only_at_an_address_the_server_sees() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 10);
        r.register(t0, reg("pc", 1, 1)).unwrap();
        r.observe_udp("u1", 1, "198.18.5.5:6000".parse().unwrap());
        // The signaling connection's IP (198.18.0.1) and the UDP one both count.
        for ok in ["198.18.0.1:40001", "198.18.5.5:41000"] {
            let a: SocketAddr = ok.parse().unwrap();
            assert_eq!(r.set_mapped(1, Some(a)), Ok(("pc", true)));
            assert_eq!(r.get("pc").unwrap().mapped, Some(a));
            // Said again: no change (no log line at the server).
            assert_eq!(r.set_mapped(1, Some(a)), Ok(("pc", false)));
        }
        // Elsewhere (a victim's address, a gateway's private side), or port 0: refused,
        // and the mapping held stays.
        for bad in ["198.18.9.9:40001", "10.0.0.1:40001", "198.18.5.5:0"] {
            let a: SocketAddr = bad.parse().unwrap();
            assert_eq!(r.set_mapped(1, Some(a)), Err(MappedError::NotObserved(a)));
        }
        assert_eq!(r.get("pc").unwrap().mapped.map(|a| a.port()), Some(41000));
        assert_eq!(r.set_mapped(1, None), Ok(("pc", true)));
        assert_eq!(r.get("pc").unwrap().mapped, None);
        assert_eq!(r.set_mapped(2, None), Err(MappedError::NotRegistered));
    }

    #[test]
    fn a_replayed_stun_request_moves_nothing() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 10);
        r.register(t0, reg("pc", 1, 1)).unwrap();
        let real: SocketAddr = "198.18.5.5:6000".parse().unwrap();
        let mallory: SocketAddr = "198.18.6.6:7000".parse().unwrap();
        assert_eq!(r.observe_udp("u1", 5, real), Some(("pc", true)));
        // The same request (counter 5), or an older one (3), from elsewhere: ignored.
        assert_eq!(r.observe_udp("u1", 5, mallory), None);
        assert_eq!(r.observe_udp("u1", 3, mallory), None);
        assert_eq!(r.observe_tcp("u1", 4, mallory).map(|(n, _)| n), None);
        assert_eq!(r.heartbeat(t0, 1, None), Ok(Some(real)));
        // The peer's next refresh (a higher counter) is taken.
        assert_eq!(r.observe_udp("u1", 6, real), Some(("pc", false)));
    }

    #[test]
    fn a_full_registry_refuses_new_names_and_never_evicts_a_proved_one() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 2);
        r.register(t0, reg("a", 1, 1)).unwrap();
        r.register(t0, reg("b", 2, 2)).unwrap();
        assert_eq!(
            r.register(t0, reg("c", 3, 3)).unwrap_err(),
            RegistryError::Full { max: 2 }
        );
        // b going offline frees nothing: its name stays b's.
        r.disconnect(t0 + S, 2);
        assert_eq!(
            r.register(t0 + 2 * S, reg("c", 3, 3)).unwrap_err(),
            RegistryError::Full { max: 2 }
        );
        assert!(r.get("b").is_some());
        // Its owner gives it up: now there is room.
        r.register(t0 + 3 * S, reg("b", 2, 4)).unwrap();
        r.release(4, "b").unwrap();
        r.register(t0 + 4 * S, reg("c", 3, 3)).unwrap();
        assert!(r.get("b").is_none());
    }

    #[test]
    fn one_address_holds_a_bounded_share_of_names() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 100).with_max_names_per_ip(3);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            r.register(t0, reg(name, 1, i as u64 + 1)).unwrap();
        }
        // reg() registers from 198.18.0.KEY: key 1's address is full.
        assert!(matches!(
            r.register(t0, reg("d", 1, 9)).unwrap_err(),
            RegistryError::TooManyNames { max: 3, .. }
        ));
        // Re-registering a name it holds is no new name.
        r.register(t0, reg("a", 1, 10)).unwrap();
        // Another address is not affected; a released name frees a place.
        r.register(t0, reg("e", 2, 11)).unwrap();
        r.release(10, "a").unwrap();
        r.register(t0, reg("d", 1, 12)).unwrap();
    }

    #[test]
    fn an_ipv6_64_is_one_origin() {
        let a = origin_of("2001:2:0:1::5".parse().unwrap());
        let b = origin_of("2001:2:0:1:ffff::9".parse().unwrap());
        let c = origin_of("2001:2:0:2::5".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn only_the_owner_registered_under_a_name_releases_it() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 10);
        r.register(t0, reg("a", 1, 1)).unwrap();
        r.register(t0, reg("b", 2, 2)).unwrap();
        assert_eq!(
            r.release(2, "a").unwrap_err(),
            RegistryError::NotOwner("a".into())
        );
        assert_eq!(
            r.release(9, "a").unwrap_err(),
            RegistryError::NotOwner("a".into())
        );
        r.release(1, "a").unwrap();
        // Free for anyone now.
        r.register(t0 + S, reg("a", 3, 3)).unwrap();
    }

    #[test]
    fn restored_names_are_held_for_their_keys_until_retention_ends() {
        let t0 = Instant::now();
        let timing = Timing::default();
        let mut r = Registry::new(timing, 10);
        // Last seen a day before the restart.
        let seen = t0 + Duration::from_secs(86_400);
        let now = seen + Duration::from_secs(86_400);
        r.restore("pc-home".into(), PublicKey([1; 32]), seen);
        assert!(r.is_held("pc-home"));
        assert_eq!(r.len(), 1);
        assert!(matches!(
            r.register(now, reg("pc-home", 2, 1)).unwrap_err(),
            RegistryError::NameTaken { .. }
        ));
        // Its owner comes back: a reconnect, not a new binding.
        let back = r.register(now, reg("pc-home", 1, 2)).unwrap();
        assert!(back.replaced);
        assert!(!r.is_held("pc-home"));
        // Another restored name nobody claims is forgotten when its retention ends.
        r.restore("old".into(), PublicKey([3; 32]), seen);
        r.handle_timeout(seen + timing.name_retention - S);
        assert!(r.is_held("old"));
        r.handle_timeout(seen + timing.name_retention);
        assert!(!r.is_held("old"));
        assert!(events(&mut r).contains(&Event::Forgotten { name: "old".into() }));
    }

    #[test]
    fn pages_walk_every_name_once_in_order() {
        let t0 = Instant::now();
        let mut r = Registry::new(Timing::default(), 100);
        for i in 0..10u8 {
            r.register(t0, reg(&format!("p{i}"), i, i as u64)).unwrap();
        }
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, more) = r.page(after.as_deref(), 3);
            seen.extend(page.iter().map(|(n, _)| n.to_string()));
            after = page.last().map(|(n, _)| n.to_string());
            if !more {
                break;
            }
        }
        let want: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
        assert_eq!(seen, want);
    }
}
