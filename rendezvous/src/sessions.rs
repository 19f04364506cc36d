//! The rendezvous' view of sessions between peers, sans-IO: which pairs it brokered, what
//! each side reports of its paths (which carries traffic, round trips, bytes), and, by
//! pair of NAT types, how often punching gave a direct path and how long it took. The
//! dashboard and `/metrics` read it; the shell feeds it brokers, reports and time.
//!
//! A peer pair has one session however often it re-punches, so records are keyed by the
//! pair of names. A record counts as one try for its NAT pair when brokered, and as direct
//! (with the time from brokering) when either side first reports a direct path carrying
//! traffic. Only the two peers of a brokered pair may report on it, so the book holds at
//! most what brokering made, and it is capped and swept besides.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use wire::signal::{NatAllocation, NatInfo, NatMapping, PathStat, Report};

/// Records kept at most; the least recently touched goes first.
pub const MAX_RECORDS: usize = 10_000;

/// A record untouched this long is dropped.
pub const RECORD_IDLE: Duration = Duration::from_secs(10 * 60);

/// A closed record is kept this long (the dashboard shows it ending), then dropped.
pub const CLOSED_LINGER: Duration = Duration::from_secs(60);

/// Times to direct kept per NAT pair, for the quantiles.
const TIMES_KEPT: usize = 1000;

/// A short name for what a peer measured of its NAT.
pub fn nat_label(nat: Option<NatInfo>) -> &'static str {
    match nat {
        None => "unknown",
        Some(n) => match (n.mapping, n.allocation) {
            (NatMapping::None, _) => "open",
            (NatMapping::EndpointIndependent, _) => "cone",
            (NatMapping::Varies, NatAllocation::Sequential) => "symmetric-seq",
            (NatMapping::Varies, NatAllocation::Random) => "symmetric-rnd",
            (NatMapping::Varies, _) => "symmetric",
            (NatMapping::Unknown, _) => "unknown",
        },
    }
}

/// The pair label: both NAT names, sorted, joined by `/`.
pub fn pair_label(a: &str, b: &str) -> String {
    if a <= b {
        format!("{a}/{b}")
    } else {
        format!("{b}/{a}")
    }
}

/// One side's last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideReport {
    /// Its paths.
    pub paths: Vec<PathStat>,
    /// When it came.
    pub at: Instant,
}

impl SideReport {
    /// The kind of the path carrying traffic, if any.
    pub fn active(&self) -> Option<&str> {
        self.paths
            .iter()
            .find(|p| p.active)
            .map(|p| p.kind.as_str())
    }
}

/// What the book knows of one peer pair's session.
#[derive(Debug, Clone)]
pub struct Record {
    /// The two names, sorted.
    pub names: [String; 2],
    /// Their NAT pair's label.
    pub pair: String,
    /// When it was brokered (the first time).
    pub brokered: Instant,
    /// Brokers since (re-punches).
    pub repunches: u32,
    /// Time from brokering to the first direct path carrying traffic.
    pub direct_after: Option<Duration>,
    /// Each side's last report, in the order of `names`.
    pub sides: [Option<SideReport>; 2],
    /// Times the active path changed, as the sides reported.
    pub switches: u32,
    /// Either side said it ended.
    pub closed: bool,
    touched: Instant,
}

/// Punching outcomes for one NAT pair.
#[derive(Debug, Clone, Default)]
pub struct PairStats {
    /// Sessions brokered.
    pub tries: u64,
    /// Those that went direct.
    pub direct: u64,
    times: VecDeque<Duration>,
}

impl PairStats {
    /// The `q` quantile (0..=1) of the kept times to direct.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.times.is_empty() {
            return None;
        }
        let mut v: Vec<Duration> = self.times.iter().copied().collect();
        v.sort();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v.get(i).copied()
    }
}

/// Why a report was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// No session between the two was brokered (or it was forgotten).
    #[error("no session between {0} and {1} was brokered here")]
    NoSession(String, String),
}

/// Every session record and the punching statistics.
#[derive(Debug, Default)]
pub struct SessionBook {
    records: HashMap<(String, String), Record>,
    stats: HashMap<String, PairStats>,
    /// Active-path changes reported, all sessions.
    pub switches_total: u64,
    last_sweep: Option<Instant>,
}

fn key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl SessionBook {
    /// `a` and `b` were brokered at `now`; `nat_a`, `nat_b` label their NATs.
    pub fn brokered(&mut self, now: Instant, a: &str, b: &str, nat_a: &str, nat_b: &str) {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(10))
        {
            self.sweep(now);
            self.last_sweep = Some(now);
        }
        let k = key(a, b);
        if let Some(r) = self.records.get_mut(&k)
            && !r.closed
        {
            r.repunches += 1;
            r.touched = now;
            return;
        }
        if self.records.len() >= MAX_RECORDS && !self.records.contains_key(&k) {
            let oldest = self
                .records
                .iter()
                .min_by_key(|(_, r)| r.touched)
                .map(|(k, _)| k.clone());
            if let Some(o) = oldest {
                self.records.remove(&o);
            }
        }
        let pair = pair_label(nat_a, nat_b);
        self.stats.entry(pair.clone()).or_default().tries += 1;
        self.records.insert(
            k.clone(),
            Record {
                names: [k.0, k.1],
                pair,
                brokered: now,
                repunches: 0,
                direct_after: None,
                sides: [None, None],
                switches: 0,
                closed: false,
                touched: now,
            },
        );
    }

    /// `from` reports its session with `r.peer`.
    pub fn report(&mut self, now: Instant, from: &str, r: Report) -> Result<(), ReportError> {
        let k = key(from, &r.peer);
        let rec = self
            .records
            .get_mut(&k)
            .ok_or_else(|| ReportError::NoSession(from.to_owned(), r.peer.clone()))?;
        let i = usize::from(rec.names[0] != from);
        let before = rec.sides[i]
            .as_ref()
            .and_then(|s| s.active().map(str::to_owned));
        let side = SideReport {
            paths: r.paths,
            at: now,
        };
        let after = side.active().map(str::to_owned);
        if before.is_some() && after.is_some() && before != after {
            rec.switches += 1;
            self.switches_total += 1;
        }
        if rec.direct_after.is_none() && side.paths.iter().any(|p| p.active && p.is_direct()) {
            let t = now.saturating_duration_since(rec.brokered);
            rec.direct_after = Some(t);
            let s = self.stats.entry(rec.pair.clone()).or_default();
            s.direct += 1;
            if s.times.len() >= TIMES_KEPT {
                s.times.pop_front();
            }
            s.times.push_back(t);
        }
        rec.sides[i] = Some(side);
        rec.closed |= r.closed;
        rec.touched = now;
        Ok(())
    }

    /// Drops records idle too long, and closed ones after a short linger.
    pub fn sweep(&mut self, now: Instant) {
        self.records.retain(|_, r| {
            let idle = now.saturating_duration_since(r.touched);
            idle < RECORD_IDLE && !(r.closed && idle >= CLOSED_LINGER)
        });
    }

    /// Every record, newest first.
    pub fn records(&self) -> Vec<&Record> {
        let mut v: Vec<&Record> = self.records.values().collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.brokered));
        v
    }

    /// Statistics by NAT pair, sorted by label.
    pub fn stats(&self) -> Vec<(&str, &PairStats)> {
        let mut v: Vec<(&str, &PairStats)> =
            self.stats.iter().map(|(k, s)| (k.as_str(), s)).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}

/// The book's figures in Prometheus text: punching by NAT pair, and path switches.
pub fn render(book: &SessionBook) -> String {
    use std::fmt::Write as _;
    let stats = book.stats();
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = String>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for r in rows {
                let _ = writeln!(out, "{r}");
            }
        };
    family(
        "chuantou_punch_tries_total",
        "counter",
        "Sessions brokered, by the pair of NAT types (re-punches of a live session not counted).",
        &mut stats
            .iter()
            .map(|(p, s)| format!("chuantou_punch_tries_total{{pair=\"{p}\"}} {}", s.tries)),
    );
    family(
        "chuantou_punch_direct_total",
        "counter",
        "Sessions that got a direct path carrying traffic, by the pair of NAT types.",
        &mut stats
            .iter()
            .map(|(p, s)| format!("chuantou_punch_direct_total{{pair=\"{p}\"}} {}", s.direct)),
    );
    family(
        "chuantou_punch_time_to_direct_seconds",
        "summary",
        "Time from brokering to the first direct path carrying traffic (last 1000 sessions per pair).",
        &mut stats.iter().flat_map(|(p, s)| {
            [0.5, 0.9].into_iter().filter_map(move |q| {
                s.quantile(q).map(|d| {
                    format!(
                        "chuantou_punch_time_to_direct_seconds{{pair=\"{p}\",quantile=\"{q}\"}} {:.3}",
                        d.as_secs_f64()
                    )
                })
            })
        }),
    );
    family(
        "chuantou_path_switches_total",
        "counter",
        "Times a session's active path changed (relay to direct or back), as peers reported.",
        &mut std::iter::once(format!(
            "chuantou_path_switches_total {}",
            book.switches_total
        )),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(kind: &str, active: bool) -> PathStat {
        PathStat {
            kind: kind.into(),
            active,
            rtt_us: Some(1000),
            bytes_out: 10,
            bytes_in: 20,
        }
    }

    fn report(peer: &str, paths: Vec<PathStat>) -> Report {
        Report {
            peer: peer.into(),
            closed: false,
            paths,
        }
    }

    #[test]
    fn tries_direct_share_and_time_to_direct_by_nat_pair() {
        let t0 = Instant::now();
        let mut book = SessionBook::default();
        book.brokered(t0, "phone", "pc", "symmetric-rnd", "cone");
        // A re-punch of the live session is no new try.
        book.brokered(
            t0 + Duration::from_secs(1),
            "pc",
            "phone",
            "cone",
            "symmetric-rnd",
        );
        book.report(
            t0 + Duration::from_millis(100),
            "phone",
            report("pc", vec![path("relay", true)]),
        )
        .unwrap();
        book.report(
            t0 + Duration::from_millis(400),
            "pc",
            report(
                "phone",
                vec![path("relay", false), path("direct-udp", true)],
            ),
        )
        .unwrap();
        // The phone sees the switch too.
        book.report(
            t0 + Duration::from_millis(450),
            "phone",
            report("pc", vec![path("relay", false), path("direct-udp", true)]),
        )
        .unwrap();
        book.brokered(t0, "a", "b", "cone", "symmetric-rnd");
        let stats = book.stats();
        assert_eq!(stats.len(), 1);
        let (label, s) = stats[0];
        assert_eq!(label, "cone/symmetric-rnd");
        assert_eq!((s.tries, s.direct), (2, 1));
        assert_eq!(s.quantile(0.5), Some(Duration::from_millis(400)));
        assert_eq!(book.switches_total, 1, "the phone's relay → direct");
        let text = render(&book);
        for line in [
            "chuantou_punch_tries_total{pair=\"cone/symmetric-rnd\"} 2",
            "chuantou_punch_direct_total{pair=\"cone/symmetric-rnd\"} 1",
            "chuantou_punch_time_to_direct_seconds{pair=\"cone/symmetric-rnd\",quantile=\"0.5\"} 0.400",
            "chuantou_path_switches_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let rec = book
            .records()
            .into_iter()
            .find(|r| r.names[0] == "pc")
            .unwrap();
        assert_eq!(rec.repunches, 1);
        assert_eq!(rec.sides[1].as_ref().unwrap().active(), Some("direct-udp"));
    }

    #[test]
    fn only_brokered_pairs_report_and_records_are_swept() {
        let t0 = Instant::now();
        let mut book = SessionBook::default();
        assert!(book.report(t0, "x", report("y", vec![])).is_err());
        book.brokered(t0, "x", "y", "cone", "cone");
        assert!(
            book.report(t0, "z", report("y", vec![])).is_err(),
            "z is not in it"
        );
        let mut closing = report("y", vec![]);
        closing.closed = true;
        book.report(t0, "x", closing).unwrap();
        book.sweep(t0 + Duration::from_secs(30));
        assert_eq!(book.records().len(), 1, "closed records linger a while");
        book.sweep(t0 + CLOSED_LINGER);
        assert!(book.records().is_empty());
        // A new broker after the close is a new try.
        book.brokered(t0, "x", "y", "cone", "cone");
        book.brokered(t0, "x", "y", "cone", "cone");
        assert_eq!(book.stats()[0].1.tries, 2);
        book.sweep(t0 + RECORD_IDLE);
        assert!(book.records().is_empty(), "idle records go");
    }

    #[test]
    fn nat_labels() {
        let n = |mapping, allocation| {
            Some(NatInfo {
                mapping,
                allocation,
                delta: 0,
            })
        };
        assert_eq!(nat_label(None), "unknown");
        assert_eq!(
            nat_label(n(NatMapping::None, NatAllocation::Preserved)),
            "open"
        );
        assert_eq!(
            nat_label(n(NatMapping::EndpointIndependent, NatAllocation::Random)),
            "cone"
        );
        assert_eq!(
            nat_label(n(NatMapping::Varies, NatAllocation::Random)),
            "symmetric-rnd"
        );
        assert_eq!(pair_label("open", "cone"), "cone/open");
    }
}
