//! The relay's pairing table, sans-IO: which tickets are admitted, which half waits for
//! which, which tickets were used, and when a waiting half gives up. The shell feeds it
//! hellos, departures and time, and does what it says.
//!
//! # Drive loop
//!
//! 1. On each hello call [`Pairing::handle_hello`]: it refuses, says wait, or names the
//!    waiting half to pair with.
//! 2. When a waiting half leaves, call [`Pairing::handle_gone`]; when a paired session
//!    ends, [`Pairing::session_ended`].
//! 3. At [`Pairing::poll_timeout`] call [`Pairing::handle_timeout`], then drain
//!    [`Pairing::poll_event`]: halves that waited too long, to be closed.
//!
//! A ticket is good for one admission: it is remembered until it expires, so replaying it
//! (even after its session ended) is refused. Tickets may not live longer than
//! [`Limits::max_ticket_lifetime`], which bounds that memory.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::defaults;
use wire::relay::{Refusal, RefusalCode};
use wire::ticket::{SessionId, Side, Ticket, TicketError, TicketKey};

/// Identifies one half (a TCP connection or a UDP source) in the shell.
pub type ConnId = u64;

/// Admission limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions paired or waiting at once.
    pub max_sessions: usize,
    /// How long a half waits for the other.
    pub pairing_timeout: Duration,
    /// Longest ticket lifetime accepted (bounds the used-ticket memory).
    pub max_ticket_lifetime: Duration,
    /// Halves from one IP address waiting at once.
    pub max_waiting_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: defaults::MAX_SESSIONS,
            pairing_timeout: defaults::PAIRING_TIMEOUT,
            max_ticket_lifetime: defaults::MAX_TICKET_LIFETIME,
            max_waiting_per_ip: defaults::MAX_WAITING_PER_IP,
        }
    }
}

/// What to do with an admitted half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Hold it until the other half arrives.
    Wait,
    /// Join it with the waiting half `other`.
    Pair {
        /// The half that was waiting.
        other: ConnId,
    },
    /// Hold it in place of `old`, which presented the same ticket and has not been
    /// paired: the client's earlier connection broke (or its NAT rebound it) and it came
    /// back. Close `old`.
    Replace {
        /// The half this one takes over from.
        old: ConnId,
    },
}

/// Things decided on a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `conn` waited longer than the pairing timeout; close it.
    PairTimeout {
        /// The waiting half.
        conn: ConnId,
        /// Its session.
        session: SessionId,
    },
}

#[derive(Debug)]
struct Waiter {
    conn: ConnId,
    side: Side,
    deadline: Instant,
    /// Where it came from, when the shell said ([`Pairing::handle_hello_from`]).
    ip: Option<IpAddr>,
}

/// The pairing table.
#[derive(Debug)]
pub struct Pairing {
    key: TicketKey,
    limits: Limits,
    waiting: HashMap<SessionId, Waiter>,
    by_conn: HashMap<ConnId, SessionId>,
    used: HashMap<(SessionId, Side), u64>,
    paired: usize,
    events: VecDeque<Event>,
    /// Waiting halves per source address.
    per_ip: HashMap<IpAddr, usize>,
}

impl Pairing {
    /// An empty table checking tickets with `key`.
    pub fn new(key: TicketKey, limits: Limits) -> Self {
        Pairing {
            key,
            limits,
            waiting: HashMap::new(),
            by_conn: HashMap::new(),
            used: HashMap::new(),
            paired: 0,
            events: VecDeque::new(),
            per_ip: HashMap::new(),
        }
    }

    /// Sessions paired now.
    pub fn paired(&self) -> usize {
        self.paired
    }

    /// Halves waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Admits (or refuses) `conn` presenting `ticket` at `now` (`now_unix` for expiry),
    /// not counting where it came from.
    pub fn handle_hello(
        &mut self,
        now: Instant,
        now_unix: u64,
        conn: ConnId,
        ticket: &Ticket,
    ) -> Result<Admit, Refusal> {
        self.admit(now, now_unix, conn, ticket, None)
    }

    /// [`Pairing::handle_hello`] for a half from `ip`: at most
    /// [`Limits::max_waiting_per_ip`] halves from one address wait at once.
    pub fn handle_hello_from(
        &mut self,
        now: Instant,
        now_unix: u64,
        conn: ConnId,
        ticket: &Ticket,
        ip: IpAddr,
    ) -> Result<Admit, Refusal> {
        self.admit(now, now_unix, conn, ticket, Some(ip))
    }

    fn count(&mut self, ip: Option<IpAddr>, up: bool) {
        let Some(ip) = ip else { return };
        let n = self.per_ip.entry(ip).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// Removes the waiter of `session`, keeping the per-address counts.
    fn unwait(&mut self, session: &SessionId) -> Option<Waiter> {
        let w = self.waiting.remove(session)?;
        self.count(w.ip, false);
        Some(w)
    }

    fn admit(
        &mut self,
        now: Instant,
        now_unix: u64,
        conn: ConnId,
        ticket: &Ticket,
        ip: Option<IpAddr>,
    ) -> Result<Admit, Refusal> {
        self.key.verify(ticket, now_unix).map_err(|e| match e {
            TicketError::BadMac => Refusal::new(RefusalCode::BadTicket, e.to_string()),
            TicketError::Expired(_) => Refusal::new(RefusalCode::Expired, e.to_string()),
            _ => Refusal::new(RefusalCode::BadTicket, e.to_string()),
        })?;
        let lifetime = ticket.expires.saturating_sub(now_unix);
        if lifetime > self.limits.max_ticket_lifetime.as_secs() {
            return Err(Refusal::new(
                RefusalCode::TicketTooLong,
                format!(
                    "ticket valid for {lifetime} s; this relay accepts at most {} s",
                    self.limits.max_ticket_lifetime.as_secs()
                ),
            ));
        }
        let key = (ticket.session, ticket.side);
        if let Some(w) = self.waiting.get_mut(&ticket.session)
            && w.side == ticket.side
        {
            // Only the holder of the ticket can be here, and no byte has passed yet, so
            // the newer connection is the one to keep. The deadline stays: coming back
            // does not buy more waiting.
            let old = std::mem::replace(&mut w.conn, conn);
            let old_ip = std::mem::replace(&mut w.ip, ip);
            self.by_conn.remove(&old);
            self.by_conn.insert(conn, ticket.session);
            self.count(old_ip, false);
            self.count(ip, true);
            return Ok(Admit::Replace { old });
        }
        if self.used.contains_key(&key) {
            return Err(Refusal::new(
                RefusalCode::Reused,
                format!("ticket for session {} was already used", ticket.session),
            ));
        }
        if let Some(w) = self.waiting.get(&ticket.session)
            && w.side != ticket.side
        {
            let other = w.conn;
            self.unwait(&ticket.session);
            self.by_conn.remove(&other);
            self.used.insert(key, ticket.expires);
            self.paired += 1;
            return Ok(Admit::Pair { other });
        }
        if self.paired + self.waiting.len() >= self.limits.max_sessions {
            return Err(Refusal::new(
                RefusalCode::Busy,
                format!(
                    "relay at its limit of {} sessions",
                    self.limits.max_sessions
                ),
            ));
        }
        if let Some(ip) = ip
            && self.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_waiting_per_ip
        {
            return Err(Refusal::new(
                RefusalCode::Busy,
                format!(
                    "{} halves from {ip} are already waiting, the most one address may",
                    self.limits.max_waiting_per_ip
                ),
            ));
        }
        self.used.insert(key, ticket.expires);
        self.by_conn.insert(conn, ticket.session);
        self.count(ip, true);
        self.waiting.insert(
            ticket.session,
            Waiter {
                conn,
                side: ticket.side,
                deadline: now + self.limits.pairing_timeout,
                ip,
            },
        );
        Ok(Admit::Wait)
    }

    /// A waiting half left before its partner came. Its ticket is good again: nothing
    /// was relayed on it, and its holder may be retrying over a fresh connection.
    pub fn handle_gone(&mut self, conn: ConnId) {
        if let Some(session) = self.by_conn.remove(&conn)
            && let Some(w) = self.unwait(&session)
        {
            self.used.remove(&(session, w.side));
        }
    }

    /// A paired session ended.
    pub fn session_ended(&mut self) {
        self.paired = self.paired.saturating_sub(1);
    }

    /// The next waiting deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.waiting.values().map(|w| w.deadline).min()
    }

    /// Times out waiting halves and forgets used tickets that have expired.
    pub fn handle_timeout(&mut self, now: Instant, now_unix: u64) {
        let late: Vec<(SessionId, ConnId)> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(s, w)| (*s, w.conn))
            .collect();
        for (session, conn) in late {
            self.unwait(&session);
            self.by_conn.remove(&conn);
            self.events.push_back(Event::PairTimeout { conn, session });
        }
        self.used.retain(|_, expires| *expires >= now_unix);
    }

    /// The next decision, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_UNIX: u64 = 1_800_000_000;

    fn setup() -> (Pairing, TicketKey, Instant) {
        let key = TicketKey::from_bytes([5; 32]);
        (
            Pairing::new(key.clone(), Limits::default()),
            key,
            Instant::now(),
        )
    }

    fn ticket(k: &TicketKey, s: u8, side: Side) -> Ticket {
        k.issue(SessionId([s; 16]), side, NOW_UNIX + 60)
    }

    #[test]
    fn two_halves_pair_in_either_order() {
        let (mut p, k, t0) = setup();
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 1, &ticket(&k, 1, Side::Responder)),
            Ok(Admit::Wait)
        );
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 2, &ticket(&k, 1, Side::Initiator)),
            Ok(Admit::Pair { other: 1 })
        );
        assert_eq!((p.paired(), p.waiting()), (1, 0));
        p.session_ended();
        assert_eq!(p.paired(), 0);
    }

    #[test]
    fn forged_expired_reused_and_same_side_are_refused() {
        let (mut p, k, t0) = setup();
        let forged = TicketKey::from_bytes([6; 32]).issue(
            SessionId([1; 16]),
            Side::Initiator,
            NOW_UNIX + 60,
        );
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 1, &forged).unwrap_err().code,
            RefusalCode::BadTicket
        );
        let old = k.issue(SessionId([1; 16]), Side::Initiator, NOW_UNIX - 1);
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 1, &old).unwrap_err().code,
            RefusalCode::Expired
        );
        let long = k.issue(SessionId([1; 16]), Side::Initiator, NOW_UNIX + 86_400);
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 1, &long).unwrap_err().code,
            RefusalCode::TicketTooLong
        );
        let a = ticket(&k, 1, Side::Initiator);
        assert_eq!(p.handle_hello(t0, NOW_UNIX, 1, &a), Ok(Admit::Wait));
        let b = ticket(&k, 1, Side::Responder);
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 3, &b),
            Ok(Admit::Pair { other: 1 })
        );
        // Once paired, either ticket again is a replay.
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 2, &a).unwrap_err().code,
            RefusalCode::Reused
        );
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 4, &b).unwrap_err().code,
            RefusalCode::Reused
        );
        p.session_ended();
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 5, &a).unwrap_err().code,
            RefusalCode::Reused
        );
    }

    #[test]
    fn waiting_half_times_out_and_its_ticket_stays_spent() {
        let (mut p, k, t0) = setup();
        let a = ticket(&k, 1, Side::Initiator);
        p.handle_hello(t0, NOW_UNIX, 1, &a).unwrap();
        let deadline = p.poll_timeout().unwrap();
        assert_eq!(deadline, t0 + Limits::default().pairing_timeout);
        p.handle_timeout(deadline - Duration::from_millis(1), NOW_UNIX);
        assert_eq!(p.poll_event(), None);
        p.handle_timeout(deadline, NOW_UNIX);
        assert_eq!(
            p.poll_event(),
            Some(Event::PairTimeout {
                conn: 1,
                session: SessionId([1; 16])
            })
        );
        assert_eq!(p.waiting(), 0);
        // The late partner finds nobody and cannot reuse the first ticket either.
        let b = ticket(&k, 1, Side::Responder);
        assert_eq!(p.handle_hello(deadline, NOW_UNIX, 2, &b), Ok(Admit::Wait));
        assert!(p.handle_hello(deadline, NOW_UNIX, 3, &a).is_err());
    }

    #[test]
    fn gone_waiter_frees_its_slot() {
        let (mut p, k, t0) = setup();
        p.handle_hello(t0, NOW_UNIX, 1, &ticket(&k, 1, Side::Initiator))
            .unwrap();
        p.handle_gone(1);
        assert_eq!(p.waiting(), 0);
        assert_eq!(p.poll_timeout(), None);
        // Its partner now waits alone rather than pairing with a closed connection.
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 2, &ticket(&k, 1, Side::Responder)),
            Ok(Admit::Wait)
        );
        // The half that left may come back with its unspent ticket, and pairs.
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 3, &ticket(&k, 1, Side::Initiator)),
            Ok(Admit::Pair { other: 2 })
        );
    }

    #[test]
    fn a_half_that_comes_back_while_still_waiting_takes_over() {
        let (mut p, k, t0) = setup();
        let a = ticket(&k, 1, Side::Initiator);
        assert_eq!(p.handle_hello(t0, NOW_UNIX, 1, &a), Ok(Admit::Wait));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            p.handle_hello(later, NOW_UNIX, 2, &a),
            Ok(Admit::Replace { old: 1 })
        );
        assert_eq!(p.waiting(), 1);
        // Coming back keeps the first deadline.
        assert_eq!(
            p.poll_timeout(),
            Some(t0 + Limits::default().pairing_timeout)
        );
        // The replaced connection closing does not disturb the new one.
        p.handle_gone(1);
        assert_eq!(p.waiting(), 1);
        assert_eq!(
            p.handle_hello(later, NOW_UNIX, 3, &ticket(&k, 1, Side::Responder)),
            Ok(Admit::Pair { other: 2 })
        );
    }

    #[test]
    fn session_limit_refuses_new_sessions_but_completes_waiting_ones() {
        let key = TicketKey::from_bytes([5; 32]);
        let mut p = Pairing::new(
            key.clone(),
            Limits {
                max_sessions: 2,
                ..Limits::default()
            },
        );
        let t0 = Instant::now();
        p.handle_hello(t0, NOW_UNIX, 1, &ticket(&key, 1, Side::Initiator))
            .unwrap();
        p.handle_hello(t0, NOW_UNIX, 2, &ticket(&key, 2, Side::Initiator))
            .unwrap();
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 3, &ticket(&key, 3, Side::Initiator))
                .unwrap_err()
                .code,
            RefusalCode::Busy
        );
        assert_eq!(
            p.handle_hello(t0, NOW_UNIX, 4, &ticket(&key, 1, Side::Responder)),
            Ok(Admit::Pair { other: 1 })
        );
    }

    #[test]
    fn spent_tickets_are_forgotten_after_they_expire() {
        let (mut p, k, t0) = setup();
        for s in 0..100u8 {
            let conn = 2 * u64::from(s);
            p.handle_hello(t0, NOW_UNIX, conn, &ticket(&k, s, Side::Initiator))
                .unwrap();
            p.handle_hello(t0, NOW_UNIX, conn + 1, &ticket(&k, s, Side::Responder))
                .unwrap();
            p.session_ended();
        }
        assert_eq!(p.used.len(), 200);
        p.handle_timeout(t0, NOW_UNIX + 61);
        assert!(p.used.is_empty());
    }

    #[test]
    fn one_address_holds_only_its_share_of_waiting_halves() {
        let key = TicketKey::from_bytes([5; 32]);
        let limits = Limits {
            max_waiting_per_ip: 3,
            ..Limits::default()
        };
        let mut p = Pairing::new(key.clone(), limits);
        let t0 = Instant::now();
        let (hog, other): (IpAddr, IpAddr) = ([198, 18, 0, 66].into(), [198, 18, 0, 7].into());
        for s in 1..=3 {
            let t = ticket(&key, s, Side::Initiator);
            assert_eq!(
                p.handle_hello_from(t0, NOW_UNIX, u64::from(s), &t, hog),
                Ok(Admit::Wait)
            );
        }
        let t = ticket(&key, 4, Side::Initiator);
        let refused = p.handle_hello_from(t0, NOW_UNIX, 4, &t, hog).unwrap_err();
        assert_eq!(refused.code, RefusalCode::Busy);
        // Another address still gets in, and a partner pairs with a waiting half.
        let t = ticket(&key, 5, Side::Initiator);
        assert_eq!(
            p.handle_hello_from(t0, NOW_UNIX, 5, &t, other),
            Ok(Admit::Wait)
        );
        let t = ticket(&key, 1, Side::Responder);
        assert_eq!(
            p.handle_hello_from(t0, NOW_UNIX, 6, &t, other),
            Ok(Admit::Pair { other: 1 })
        );
        // A paired, a gone and a timed-out half each free their address' slot.
        let t = ticket(&key, 4, Side::Initiator);
        assert_eq!(
            p.handle_hello_from(t0, NOW_UNIX, 7, &t, hog),
            Ok(Admit::Wait)
        );
        p.handle_gone(2);
        let t = ticket(&key, 8, Side::Initiator);
        assert_eq!(
            p.handle_hello_from(t0, NOW_UNIX, 8, &t, hog),
            Ok(Admit::Wait)
        );
        p.handle_timeout(t0 + Limits::default().pairing_timeout, NOW_UNIX);
        assert!(p.per_ip.is_empty(), "{:?}", p.per_ip);
    }
}
