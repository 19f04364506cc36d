//! The TCP punch agent, sans-IO: simultaneous open from the one local port P (the port the
//! signaling connection leaves from and the peer listens on) towards the other side's TCP
//! candidates, retried until a bounded give-up; connections that complete either way (a
//! connect, a simultaneous open, or an accept on P) are authenticated with the session's
//! probes and the initiator nominates one. It owns no socket and never reads the clock.
//!
//! # Drive loop
//!
//! 1. Make the agent from a [`Config`]; feed it [`Input::Timeout`] at once.
//! 2. Drain [`TcpPunch::poll_output`] until [`Output::Timeout`]: start each
//!    [`Output::Connect`] (from P, SO_REUSEADDR + SO_REUSEPORT) and report its outcome
//!    with [`Input::Connected`] or [`Input::ConnectFailed`]; write each [`Output::Send`];
//!    close each [`Output::Close`]; act on each [`Output::Event`].
//! 3. Report connections accepted on P for this session with [`Input::Accepted`].
//! 4. Read each live connection one [`probe::LEN`]-byte message at a time and report it
//!    with [`Input::Receive`] (or [`Input::Closed`]); read the next one only after the
//!    drain, and never once [`Event::Connected`] named the connection: what follows the
//!    last probe on it is the tunnel's first byte.
//!
//! On every connection both sides first send a `Request`, which proves they hold the
//! session secret. The initiator nominates the first connection whose `Request` arrived;
//! the responder acknowledges the first nomination and closes the others. So on the chosen
//! connection the initiator reads exactly `Request, NominateAck` and the responder exactly
//! `Request, Nominate`, and the tunnel starts right after.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wire::ticket::Side;

use crate::punch::probe::{self, Kind, Probe, ProbeKey};

/// Timings of a TCP punch; defaults in [`TcpTiming::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTiming {
    /// Wait before connecting again to a candidate whose connect failed (a RST from a host
    /// that was not listening yet, EADDRNOTAVAIL while the listener holds the pair): long
    /// enough not to spin, short against the give-up.
    pub retry: Duration,
    /// Gap between first connects to different candidates, so a sequential NAT hands out
    /// ports in candidate order (prediction pairs the k-th mapping of each side).
    pub pace: Duration,
    /// The punch fails this long after the start. A SYN a NAT dropped is retransmitted by
    /// the kernel after 1 s and 3 s, and a crossing SYN completes it at any time; 5 s
    /// covers both, and the relay carries traffic meanwhile.
    pub give_up: Duration,
}

impl Default for TcpTiming {
    fn default() -> TcpTiming {
        TcpTiming {
            retry: Duration::from_millis(100),
            pace: Duration::from_millis(1),
            give_up: Duration::from_secs(5),
        }
    }
}

/// Everything one TCP punch needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The initiator nominates; the responder acknowledges.
    pub role: Side,
    /// Authenticates the probes on each connection.
    pub key: ProbeKey,
    /// The other side's TCP candidates, in the order to connect to them.
    pub remote: Vec<SocketAddr>,
    /// When both sides start (from the rendezvous).
    pub start: Instant,
    /// Timings.
    pub timing: TcpTiming,
    /// Seeds transaction ids (random in the shell, fixed in tests).
    pub seed: u64,
}

/// A connection, as the shell numbers them.
pub type ConnId = u64;

/// One input.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// Time has passed.
    Timeout(Instant),
    /// A connect to `to` succeeded (plain or simultaneous open); the shell calls it `conn`.
    Connected {
        /// When.
        now: Instant,
        /// The candidate.
        to: SocketAddr,
        /// Its number.
        conn: ConnId,
    },
    /// A connect to `to` failed.
    ConnectFailed {
        /// When.
        now: Instant,
        /// The candidate.
        to: SocketAddr,
    },
    /// The listener on P accepted `conn` from `from`.
    Accepted {
        /// When.
        now: Instant,
        /// Its number.
        conn: ConnId,
        /// The other end.
        from: SocketAddr,
    },
    /// One message read from `conn`.
    Receive {
        /// When.
        now: Instant,
        /// The connection.
        conn: ConnId,
        /// The bytes: [`probe::LEN`] of them; anything else closes the connection.
        data: &'a [u8],
    },
    /// `conn` ended or failed.
    Closed {
        /// When.
        now: Instant,
        /// The connection.
        conn: ConnId,
    },
}

/// The connection both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpPath {
    /// The connection: run the tunnel on it.
    pub conn: ConnId,
    /// Its other end.
    pub remote: SocketAddr,
    /// Whether we accepted it (rather than connected).
    pub accepted: bool,
    /// Time from the start to the agreement.
    pub elapsed: Duration,
}

/// What the agent tells the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A direct TCP path works.
    Connected(TcpPath),
    /// Nothing worked within [`TcpTiming::give_up`].
    Failed {
        /// Connects started, for the log line.
        attempts: u32,
        /// Connections that completed but were not agreed on.
        connections: u32,
    },
}

/// One output; [`Output::Timeout`] ends a drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Connect from P to this address.
    Connect(SocketAddr),
    /// Write this on the connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// The probe.
        payload: [u8; probe::LEN],
    },
    /// Close the connection (and forget any connect outcome for it).
    Close(ConnId),
    /// Act on this.
    Event(Event),
    /// Call again by then (or when something happens).
    Timeout(Instant),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// Connect again at this time.
    Idle(Instant),
    /// A connect is under way.
    Connecting,
    /// A connection to it exists (or the punch is over).
    Done,
}

#[derive(Debug, Clone, Copy)]
struct Conn {
    remote: SocketAddr,
    accepted: bool,
    /// The other side proved the secret on it.
    heard: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Punching,
    /// The initiator nominated `conn` and waits for the ack.
    Nominated {
        conn: ConnId,
        transaction: u64,
    },
    Done,
}

/// Connections at most: only completed handshakes count, and a candidate list is short,
/// but accepted connections come from outside, so the table is bounded anyway.
const MAX_CONNS: usize = 64;

/// The agent. After every [`TcpPunch::handle_input`], drain [`TcpPunch::poll_output`]
/// until it yields [`Output::Timeout`].
#[derive(Debug)]
pub struct TcpPunch {
    cfg: Config,
    now: Instant,
    attempts: Vec<(SocketAddr, Attempt)>,
    conns: BTreeMap<ConnId, Conn>,
    state: State,
    out: VecDeque<Output>,
    next_tid: u64,
    started: u32,
    completed: u32,
}

impl TcpPunch {
    /// A punch that starts at `cfg.start`.
    pub fn new(cfg: Config) -> TcpPunch {
        let mut attempts = Vec::new();
        for (i, r) in cfg.remote.iter().enumerate() {
            if !attempts.iter().any(|(a, _)| a == r) {
                let at = cfg.start + cfg.timing.pace * u32::try_from(i).unwrap_or(u32::MAX);
                attempts.push((*r, Attempt::Idle(at)));
            }
        }
        TcpPunch {
            now: cfg.start,
            next_tid: cfg.seed | 1,
            cfg,
            attempts,
            conns: BTreeMap::new(),
            state: State::Punching,
            out: VecDeque::new(),
            started: 0,
            completed: 0,
        }
    }

    fn tid(&mut self) -> u64 {
        // xorshift: distinct per connection, unpredictable enough with a random seed.
        let mut x = self.next_tid;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.next_tid = x;
        x
    }

    fn send(&mut self, conn: ConnId, kind: Kind, transaction: u64) {
        let payload = self.cfg.key.encode(&Probe {
            kind,
            from: self.cfg.role,
            transaction,
            observed: None,
        });
        self.out.push_back(Output::Send { conn, payload });
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            self.out.push_back(Output::Close(conn));
            // A connection we made ended before it was agreed on: try its candidate again.
            if let Some(a) = self.attempts.iter_mut().find(|(r, _)| *r == c.remote)
                && !c.accepted
                && self.state != State::Done
            {
                a.1 = Attempt::Idle(self.now + self.cfg.timing.retry);
            }
        }
    }

    fn open(&mut self, conn: ConnId, remote: SocketAddr, accepted: bool) {
        if self.state == State::Done || self.conns.len() >= MAX_CONNS {
            self.out.push_back(Output::Close(conn));
            return;
        }
        self.completed += 1;
        self.conns.insert(
            conn,
            Conn {
                remote,
                accepted,
                heard: false,
            },
        );
        let tid = self.tid();
        self.send(conn, Kind::Request, tid);
    }

    fn agree(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn).copied() else {
            return;
        };
        self.state = State::Done;
        let others: Vec<ConnId> = self.conns.keys().copied().filter(|k| *k != conn).collect();
        for o in others {
            self.close(o);
        }
        for a in &mut self.attempts {
            a.1 = Attempt::Done;
        }
        self.out.push_back(Output::Event(Event::Connected(TcpPath {
            conn,
            remote: c.remote,
            accepted: c.accepted,
            elapsed: self.now.saturating_duration_since(self.cfg.start),
        })));
    }

    /// The initiator nominates the first connection it heard the other side on.
    fn maybe_nominate(&mut self) {
        if self.cfg.role != Side::Initiator || self.state != State::Punching {
            return;
        }
        let Some(conn) = self.conns.iter().find(|(_, c)| c.heard).map(|(k, _)| *k) else {
            return;
        };
        let transaction = self.tid();
        self.send(conn, Kind::Nominate, transaction);
        self.state = State::Nominated { conn, transaction };
    }

    fn receive(&mut self, conn: ConnId, data: &[u8]) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        let probe = self.cfg.key.decode(data);
        let Some(p) = probe.filter(|p| p.from != self.cfg.role) else {
            // Not the other side of this session: nothing more is read from it.
            self.close(conn);
            return;
        };
        match (p.kind, self.cfg.role) {
            (Kind::Request, _) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.heard = true;
                }
                self.maybe_nominate();
            }
            (Kind::Nominate, Side::Responder) if self.state == State::Punching => {
                self.send(conn, Kind::NominateAck, p.transaction);
                self.agree(conn);
            }
            (Kind::NominateAck, Side::Initiator) => match self.state {
                State::Nominated {
                    conn: c,
                    transaction,
                } if c == conn && p.transaction == transaction => self.agree(conn),
                _ => self.close(conn),
            },
            _ => self.close(conn),
        }
    }

    /// Feeds one input.
    pub fn handle_input(&mut self, input: Input<'_>) {
        let now = match input {
            Input::Timeout(now)
            | Input::Connected { now, .. }
            | Input::ConnectFailed { now, .. }
            | Input::Accepted { now, .. }
            | Input::Receive { now, .. }
            | Input::Closed { now, .. } => now,
        };
        self.now = self.now.max(now);
        match input {
            Input::Timeout(_) => {}
            Input::Connected { to, conn, .. } => {
                if let Some(a) = self.attempts.iter_mut().find(|(r, _)| *r == to) {
                    a.1 = Attempt::Done;
                }
                self.open(conn, to, false);
            }
            Input::ConnectFailed { to, .. } => {
                let retry = self.now + self.cfg.timing.retry;
                if let Some(a) = self.attempts.iter_mut().find(|(r, _)| *r == to)
                    && a.1 == Attempt::Connecting
                {
                    a.1 = Attempt::Idle(retry);
                }
            }
            Input::Accepted { conn, from, now } => {
                // Before the start (allowing for its error) or from outside the other
                // side's IPs, a connection is not this punch's, whatever it would send.
                let early = now + crate::punch::udp::EARLY_PROBES < self.cfg.start;
                if early || !self.cfg.remote.iter().any(|r| r.ip() == from.ip()) {
                    self.out.push_back(Output::Close(conn));
                } else {
                    self.open(conn, from, true);
                }
            }
            Input::Receive { conn, data, .. } => self.receive(conn, data),
            Input::Closed { conn, .. } => {
                self.close(conn);
                if let State::Nominated { conn: c, .. } = self.state
                    && c == conn
                {
                    self.state = State::Punching;
                    self.maybe_nominate();
                }
            }
        }
        self.tick();
    }

    fn deadline(&self) -> Instant {
        self.cfg.start + self.cfg.timing.give_up
    }

    fn tick(&mut self) {
        if self.state == State::Done {
            return;
        }
        if self.now >= self.deadline() {
            self.state = State::Done;
            let all: Vec<ConnId> = self.conns.keys().copied().collect();
            for c in all {
                self.close(c);
            }
            self.out.push_back(Output::Event(Event::Failed {
                attempts: self.started,
                connections: self.completed,
            }));
            return;
        }
        for i in 0..self.attempts.len() {
            if let (to, Attempt::Idle(at)) = self.attempts[i]
                && at <= self.now
            {
                self.attempts[i].1 = Attempt::Connecting;
                self.started += 1;
                self.out.push_back(Output::Connect(to));
            }
        }
    }

    /// The next thing to do; [`Output::Timeout`] ends the drain.
    pub fn poll_output(&mut self) -> Output {
        if let Some(o) = self.out.pop_front() {
            return o;
        }
        if self.state == State::Done {
            return Output::Timeout(self.now + Duration::from_secs(3600));
        }
        let next = self
            .attempts
            .iter()
            .filter_map(|(_, a)| match a {
                Attempt::Idle(at) => Some(*at),
                _ => None,
            })
            .min()
            .unwrap_or_else(|| self.deadline())
            .min(self.deadline());
        Output::Timeout(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: [u8; 16] = [7; 16];
    const SECRET: [u8; 32] = [9; 32];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn agent(role: Side, remote: &[&str], t0: Instant) -> TcpPunch {
        TcpPunch::new(Config {
            role,
            key: ProbeKey::new(SESSION, SECRET),
            remote: remote.iter().map(|r| addr(r)).collect(),
            start: t0,
            timing: TcpTiming::default(),
            seed: u64::from(role == Side::Initiator) + 11,
        })
    }

    fn drain(a: &mut TcpPunch) -> (Vec<Output>, Instant) {
        let mut v = Vec::new();
        loop {
            match a.poll_output() {
                Output::Timeout(at) => return (v, at),
                o => v.push(o),
            }
        }
    }

    fn sends(out: &[Output], conn: ConnId) -> Vec<[u8; probe::LEN]> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { conn: c, payload } if *c == conn => Some(*payload),
                _ => None,
            })
            .collect()
    }

    fn kind(p: &[u8; probe::LEN]) -> Kind {
        ProbeKey::new(SESSION, SECRET).decode(p).unwrap().kind
    }

    #[test]
    fn connects_to_candidates_in_order_paced_and_retries_failures() {
        let t0 = Instant::now();
        let mut a = agent(
            Side::Initiator,
            &["198.18.1.3:20003", "198.18.1.3:20006"],
            t0,
        );
        a.handle_input(Input::Timeout(t0));
        let (out, next) = drain(&mut a);
        assert_eq!(out, [Output::Connect(addr("198.18.1.3:20003"))]);
        assert_eq!(next, t0 + TcpTiming::default().pace);
        a.handle_input(Input::Timeout(next));
        assert_eq!(drain(&mut a).0, [Output::Connect(addr("198.18.1.3:20006"))]);
        // A refusal: the same candidate again after the retry gap, not before.
        let t1 = t0 + Duration::from_millis(10);
        a.handle_input(Input::ConnectFailed {
            now: t1,
            to: addr("198.18.1.3:20003"),
        });
        let (out, next) = drain(&mut a);
        assert!(out.is_empty());
        assert_eq!(next, t1 + TcpTiming::default().retry);
        a.handle_input(Input::Timeout(next));
        assert_eq!(drain(&mut a).0, [Output::Connect(addr("198.18.1.3:20003"))]);
    }

    #[test]
    fn connections_accepted_too_early_or_from_strangers_are_closed_unanswered() {
        let t0 = Instant::now();
        let start = t0 + Duration::from_secs(2);
        let mut a = agent(Side::Responder, &["198.18.1.3:20003"], start);
        // (The agent's own connects are not what this test is about.)
        let accept = |a: &mut TcpPunch, now, conn, from: &str| {
            a.handle_input(Input::Accepted {
                now,
                conn,
                from: addr(from),
            });
            let mut out = drain(a).0;
            out.retain(|o| !matches!(o, Output::Connect(_)));
            out
        };
        // Long before the start, even from the peer's IP: closed, no request sent.
        assert_eq!(
            accept(&mut a, t0, 1, "198.18.1.3:20003"),
            [Output::Close(1)]
        );
        // At the start, from an IP that is not a candidate's: closed.
        assert_eq!(
            accept(&mut a, start, 2, "198.18.9.9:20003"),
            [Output::Close(2)]
        );
        // From the peer's IP on another port (its NAT's choice): answered with a request.
        let out = accept(&mut a, start, 3, "198.18.1.3:31000");
        assert_eq!(
            sends(&out, 3).iter().map(kind).collect::<Vec<_>>(),
            [Kind::Request]
        );
    }

    /// Runs both agents against each other over `links`: pairs of connection ids (one per
    /// side) that the "network" completed, as a connect on one side and a connect or accept
    /// on the other. Returns both paths.
    fn agree_over(links: &[(ConnId, bool, ConnId, bool)]) -> (TcpPath, TcpPath) {
        let t0 = Instant::now();
        let mut i = agent(Side::Initiator, &["198.18.1.2:40000"], t0);
        let mut r = agent(Side::Responder, &["198.18.1.1:40000"], t0);
        i.handle_input(Input::Timeout(t0));
        r.handle_input(Input::Timeout(t0));
        drain(&mut i);
        drain(&mut r);
        let now = t0 + Duration::from_millis(5);
        for &(ci, acc_i, cr, acc_r) in links {
            let inp = |conn, acc: bool, from: &str| {
                if acc {
                    Input::Accepted {
                        now,
                        conn,
                        from: addr(from),
                    }
                } else {
                    Input::Connected {
                        now,
                        to: addr(from),
                        conn,
                    }
                }
            };
            i.handle_input(inp(ci, acc_i, "198.18.1.2:40000"));
            r.handle_input(inp(cr, acc_r, "198.18.1.1:40000"));
        }
        // Deliver messages until both agree: initiator conn ci <-> responder conn cr.
        let map: Vec<(ConnId, ConnId)> = links.iter().map(|l| (l.0, l.2)).collect();
        let (mut pi, mut pr) = (None, None);
        for _ in 0..10 {
            let (oi, _) = drain(&mut i);
            let (or, _) = drain(&mut r);
            for o in oi {
                match o {
                    Output::Send { conn, payload } => {
                        let cr = map.iter().find(|m| m.0 == conn).unwrap().1;
                        if pr.is_none() {
                            r.handle_input(Input::Receive {
                                now,
                                conn: cr,
                                data: &payload,
                            });
                        }
                    }
                    Output::Event(Event::Connected(p)) => pi = Some(p),
                    _ => {}
                }
            }
            for o in or {
                match o {
                    Output::Send { conn, payload } => {
                        let ci = map.iter().find(|m| m.1 == conn).unwrap().0;
                        if pi.is_none() {
                            i.handle_input(Input::Receive {
                                now,
                                conn: ci,
                                data: &payload,
                            });
                        }
                    }
                    Output::Event(Event::Connected(p)) => pr = Some(p),
                    _ => {}
                }
            }
            if let (Some(a), Some(b)) = (pi, pr) {
                return (a, b);
            }
        }
        panic!("no agreement: {pi:?} {pr:?}");
    }

    #[test]
    fn one_simultaneous_open_is_agreed_on() {
        let (i, r) = agree_over(&[(1, false, 1, false)]);
        assert_eq!((i.conn, r.conn), (1, 1));
        assert!(!i.accepted && !r.accepted);
    }

    #[test]
    fn two_crossing_connections_end_in_one_that_both_name() {
        // Each side's connect was accepted by the other's listener: two connections.
        let (i, r) = agree_over(&[(1, false, 2, true), (3, true, 4, false)]);
        let pairs = [(1, 2), (3, 4)];
        assert!(pairs.contains(&(i.conn, r.conn)), "{i:?} {r:?}");
    }

    #[test]
    fn the_chosen_connection_carries_exactly_two_probes_each_way() {
        let t0 = Instant::now();
        let mut i = agent(Side::Initiator, &["198.18.1.2:40000"], t0);
        let mut r = agent(Side::Responder, &["198.18.1.1:40000"], t0);
        i.handle_input(Input::Connected {
            now: t0,
            to: addr("198.18.1.2:40000"),
            conn: 5,
        });
        r.handle_input(Input::Accepted {
            now: t0,
            conn: 6,
            from: addr("198.18.1.1:40000"),
        });
        let (oi, _) = drain(&mut i);
        let (or, _) = drain(&mut r);
        let (req_i, req_r) = (sends(&oi, 5), sends(&or, 6));
        assert_eq!((req_i.len(), req_r.len()), (1, 1));
        assert_eq!(kind(&req_i[0]), Kind::Request);
        i.handle_input(Input::Receive {
            now: t0,
            conn: 5,
            data: &req_r[0],
        });
        let (oi, _) = drain(&mut i);
        let nom = sends(&oi, 5);
        assert_eq!(nom.len(), 1);
        assert_eq!(kind(&nom[0]), Kind::Nominate);
        r.handle_input(Input::Receive {
            now: t0,
            conn: 6,
            data: &req_i[0],
        });
        r.handle_input(Input::Receive {
            now: t0,
            conn: 6,
            data: &nom[0],
        });
        let (or, _) = drain(&mut r);
        let ack = sends(&or, 6);
        assert_eq!(ack.len(), 1);
        assert_eq!(kind(&ack[0]), Kind::NominateAck);
        assert!(
            or.iter().any(
                |o| matches!(o, Output::Event(Event::Connected(p)) if p.conn == 6 && p.accepted)
            )
        );
        i.handle_input(Input::Receive {
            now: t0,
            conn: 5,
            data: &ack[0],
        });
        let (oi, _) = drain(&mut i);
        assert_eq!(
            oi,
            [Output::Event(Event::Connected(TcpPath {
                conn: 5,
                remote: addr("198.18.1.2:40000"),
                accepted: false,
                elapsed: Duration::ZERO,
            }))]
        );
    }

    #[test]
    fn strangers_and_forgeries_are_closed_and_nothing_is_agreed() {
        let t0 = Instant::now();
        let mut r = agent(Side::Responder, &["198.18.1.1:40000"], t0);
        r.handle_input(Input::Accepted {
            now: t0,
            conn: 1,
            from: addr("198.18.1.1:5555"),
        });
        let other = ProbeKey::new(SESSION, [1; 32]).encode(&Probe {
            kind: Kind::Nominate,
            from: Side::Initiator,
            transaction: 1,
            observed: None,
        });
        r.handle_input(Input::Receive {
            now: t0,
            conn: 1,
            data: &other,
        });
        let (out, _) = drain(&mut r);
        assert!(out.contains(&Output::Close(1)), "{out:?}");
        assert!(!out.iter().any(|o| matches!(o, Output::Event(_))));
        // Our own probe reflected back is not the other side either.
        r.handle_input(Input::Accepted {
            now: t0,
            conn: 2,
            from: addr("198.18.1.1:5556"),
        });
        let (out, _) = drain(&mut r);
        let mine = sends(&out, 2)[0];
        r.handle_input(Input::Receive {
            now: t0,
            conn: 2,
            data: &mine,
        });
        assert!(drain(&mut r).0.contains(&Output::Close(2)));
    }

    #[test]
    fn gives_up_at_the_deadline_and_closes_what_it_has() {
        let t0 = Instant::now();
        let mut i = agent(Side::Initiator, &["198.18.1.2:40000"], t0);
        i.handle_input(Input::Timeout(t0));
        drain(&mut i);
        i.handle_input(Input::Accepted {
            now: t0,
            conn: 9,
            from: addr("198.18.1.2:1"),
        });
        let (_, next) = drain(&mut i);
        assert_eq!(next, t0 + TcpTiming::default().give_up);
        i.handle_input(Input::Timeout(next));
        let (out, _) = drain(&mut i);
        assert!(out.contains(&Output::Close(9)));
        assert!(out.contains(&Output::Event(Event::Failed {
            attempts: 1,
            connections: 1
        })));
    }

    #[test]
    fn a_nominated_connection_that_breaks_hands_over_to_another() {
        let t0 = Instant::now();
        let mut i = agent(Side::Initiator, &["198.18.1.2:40000"], t0);
        let req = ProbeKey::new(SESSION, SECRET).encode(&Probe {
            kind: Kind::Request,
            from: Side::Responder,
            transaction: 3,
            observed: None,
        });
        for conn in [1, 2] {
            i.handle_input(Input::Accepted {
                now: t0,
                conn,
                from: addr("198.18.1.2:40000"),
            });
            i.handle_input(Input::Receive {
                now: t0,
                conn,
                data: &req,
            });
        }
        let (out, _) = drain(&mut i);
        assert_eq!(
            sends(&out, 1).iter().map(kind).collect::<Vec<_>>(),
            [Kind::Request, Kind::Nominate]
        );
        assert_eq!(
            sends(&out, 2).iter().map(kind).collect::<Vec<_>>(),
            [Kind::Request]
        );
        i.handle_input(Input::Closed { now: t0, conn: 1 });
        let (out, _) = drain(&mut i);
        assert_eq!(
            sends(&out, 2).iter().map(kind).collect::<Vec<_>>(),
            [Kind::Nominate]
        );
    }
}
