//! The RFC 8489 §6.2.1 retransmission schedule of one STUN transaction over UDP, sans-IO:
//! the shell asks when to send and when to give up; no socket, no clock. natprobe and the
//! peer's STUN queries both follow it, with their own [`Timing`].
//!
//! - send at once; resend after RTO, 2·RTO, 4·RTO, … until Rc requests are out;
//! - after the last, wait Rm·RTO; then the transaction has failed (no answer).

use std::time::{Duration, Instant};

/// Retransmission timing of one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// First retransmission timeout; doubles after each request.
    pub rto: Duration,
    /// Requests sent at most.
    pub rc: u32,
    /// Multiple of `rto` waited after the last request.
    pub rm: u32,
}

impl Timing {
    /// RFC 8489 §6.2.1's recommendation: RTO 500 ms, Rc 7, Rm 16 (39.5 s to give up).
    pub const RFC8489: Timing = Timing {
        rto: Duration::from_millis(500),
        rc: 7,
        rm: 16,
    };
}

impl Timing {
    /// How long a transaction with no answer lasts.
    pub fn give_up_after(&self) -> Duration {
        let sends: Duration = (0..self.rc.saturating_sub(1))
            .map(|i| self.rto * 2u32.saturating_pow(i))
            .sum();
        sends + self.rto * self.rm
    }
}

/// Where a transaction is in its schedule. Drive it with [`Retransmit::poll_transmit`]
/// and [`Retransmit::poll_timeout`]; an answer ends it (the shell drops it).
#[derive(Debug, Clone)]
pub struct Retransmit {
    timing: Timing,
    sent: u32,
    next: Instant,
    interval: Duration,
}

impl Retransmit {
    /// A transaction whose first request is due at `now`.
    pub fn new(now: Instant, timing: Timing) -> Retransmit {
        Retransmit {
            timing,
            sent: 0,
            next: now,
            interval: timing.rto,
        }
    }

    /// Whether a request should go out now; each `true` counts as one sent.
    pub fn poll_transmit(&mut self, now: Instant) -> bool {
        if self.sent >= self.timing.rc.max(1) || now < self.next {
            return false;
        }
        self.sent += 1;
        self.next = if self.sent == self.timing.rc.max(1) {
            now + self.timing.rto * self.timing.rm
        } else {
            now + self.interval
        };
        self.interval *= 2;
        true
    }

    /// When to call again: the next request, or the end of the wait after the last.
    pub fn poll_timeout(&self) -> Instant {
        self.next
    }

    /// Whether every request is out and the final wait is over: no answer is coming.
    pub fn failed(&self, now: Instant) -> bool {
        self.sent >= self.timing.rc.max(1) && now >= self.next
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a silent transaction in virtual time; returns the send times and the failure time.
    fn silent(timing: Timing) -> (Vec<Duration>, Duration) {
        let t0 = Instant::now();
        let mut r = Retransmit::new(t0, timing);
        let mut sends = Vec::new();
        let mut now = t0;
        loop {
            while r.poll_transmit(now) {
                sends.push(now - t0);
            }
            if r.failed(now) {
                return (sends, now - t0);
            }
            now = r.poll_timeout();
        }
    }

    #[test]
    fn follows_the_rfc_8489_example() {
        // RFC 8489 §6.2.1: RTO 500 ms, Rc 7, Rm 16: requests at 0, 500, 1500, 3500, 7500,
        // 15500 and 31500 ms, failure at 39500 ms.
        let (sends, end) = silent(Timing::RFC8489);
        let ms: Vec<u128> = sends.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(end.as_millis(), 39500);
    }

    #[test]
    fn a_short_schedule_gives_a_verdict_in_bounded_time() {
        let t = Timing {
            rto: Duration::from_millis(500),
            rc: 4,
            rm: 4,
        };
        let (sends, end) = silent(t);
        assert_eq!(sends.len() as u32, t.rc);
        assert_eq!(end, t.give_up_after());
        assert_eq!(end, Duration::from_millis(5500));
        assert_eq!(
            Timing::RFC8489.give_up_after(),
            Duration::from_millis(39500)
        );
    }

    #[test]
    fn nothing_is_sent_early_and_extra_polls_are_harmless() {
        let t0 = Instant::now();
        let mut r = Retransmit::new(t0, Timing::RFC8489);
        assert!(r.poll_transmit(t0));
        assert!(!r.poll_transmit(t0));
        assert!(!r.poll_transmit(t0 + Duration::from_millis(499)));
        assert!(!r.failed(t0 + Duration::from_secs(100)));
        assert!(r.poll_transmit(t0 + Duration::from_millis(500)));
        assert_eq!(r.sent(), 2);
    }
}
