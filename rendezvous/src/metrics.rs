//! Counters the server keeps and their Prometheus text rendering for `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lock-free counters shared by every task of the server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Sessions brokered since start.
    pub sessions_brokered: AtomicU64,
    /// Frames refused: undecodable, oversized, out of order, timed out half way.
    pub frames_rejected: AtomicU64,
    /// Signaling connections accepted since start.
    pub connections_total: AtomicU64,
    /// Signaling connections open now.
    pub connections_open: AtomicU64,
    /// Connections refused at the connection limit.
    pub connections_refused: AtomicU64,
    /// Successful registrations since start.
    pub registrations_total: AtomicU64,
    /// Registrations refused: the name taken by another key, or the registry full.
    pub registrations_refused: AtomicU64,
    /// Connect requests refused by the quotas.
    pub connects_refused: AtomicU64,
    /// STUN responses sent.
    pub stun_responses: AtomicU64,
    /// STUN datagrams dropped unanswered (malformed, not a request, rate limited).
    pub stun_dropped: AtomicU64,
    /// Public entries' client connections (UDP: flows) carried to an exposer, by [`ENTRIES`].
    pub public_connections: [AtomicU64; 4],
    /// Public client connections turned away, by [`PUBLIC_REFUSALS`].
    pub public_refused: [AtomicU64; 6],
    /// Public client connections open now.
    pub public_open: AtomicU64,
    /// Bytes public clients sent to services.
    pub public_bytes_to_service: AtomicU64,
    /// Bytes services sent back to public clients.
    pub public_bytes_to_client: AtomicU64,
}

/// The public entries, in the order of [`Metrics::public_connections`].
pub const ENTRIES: [&str; 4] = ["http", "tls", "port", "udp"];

/// Why a public client was turned away, in the order of [`Metrics::public_refused`].
pub const PUBLIC_REFUSALS: [&str; 6] = [
    "not_found",
    "unauthorized",
    "offline",
    "busy",
    "bad_request",
    "failed",
];

/// Index into [`Metrics::public_refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicRefusal {
    /// No such published name (or not by this entry).
    NotFound = 0,
    /// HTTP auth missing or wrong.
    Unauthorized = 1,
    /// The exposer is offline.
    Offline = 2,
    /// A connection limit.
    Busy = 3,
    /// Not HTTP, not TLS, too large, too slow.
    BadRequest = 4,
    /// The exposer, the relay or the service did not take the connection.
    Failed = 5,
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Subtracts one from a gauge.
pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl Metrics {
    /// Prometheus text exposition (format 0.0.4). `registered` and `names` come from the
    /// registry: peers online now, and names bound (online or retained).
    pub fn render(&self, registered: usize, names: usize) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 12] = [
            (
                "chuantou_registered_peers",
                "gauge",
                "Peers registered and online now.",
                registered as u64,
            ),
            (
                "chuantou_known_names",
                "gauge",
                "Names bound to a key, online or retained offline.",
                names as u64,
            ),
            (
                "chuantou_sessions_brokered_total",
                "counter",
                "Sessions brokered between two peers.",
                get(&self.sessions_brokered),
            ),
            (
                "chuantou_frames_rejected_total",
                "counter",
                "Signaling frames refused (bad, oversized, out of order, incomplete).",
                get(&self.frames_rejected),
            ),
            (
                "chuantou_connections_total",
                "counter",
                "Signaling connections accepted.",
                get(&self.connections_total),
            ),
            (
                "chuantou_connections_open",
                "gauge",
                "Signaling connections open now.",
                get(&self.connections_open),
            ),
            (
                "chuantou_connections_refused_total",
                "counter",
                "Signaling connections refused at the connection limit.",
                get(&self.connections_refused),
            ),
            (
                "chuantou_registrations_total",
                "counter",
                "Successful registrations, reconnects included.",
                get(&self.registrations_total),
            ),
            (
                "chuantou_registrations_refused_total",
                "counter",
                "Registrations refused: the name is another key's, or the registry is full.",
                get(&self.registrations_refused),
            ),
            (
                "chuantou_connects_refused_total",
                "counter",
                "Connect requests refused: a requester or a target over its quota.",
                get(&self.connects_refused),
            ),
            (
                "chuantou_stun_responses_total",
                "counter",
                "STUN responses sent.",
                get(&self.stun_responses),
            ),
            (
                "chuantou_stun_dropped_total",
                "counter",
                "STUN datagrams dropped unanswered (malformed, not requests, rate limited).",
                get(&self.stun_dropped),
            ),
        ];
        let mut text = relay::stats::prometheus(&rows);
        let mut labelled = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in rows {
                text.push_str(&format!("{name}{{{labels}}} {v}\n"));
            }
        };
        labelled(
            "chuantou_public_connections_total",
            "counter",
            "Public clients carried to an exposer, by entry.",
            ENTRIES
                .iter()
                .zip(&self.public_connections)
                .map(|(e, c)| (format!("entry=\"{e}\""), get(c)))
                .collect(),
        );
        labelled(
            "chuantou_public_refused_total",
            "counter",
            "Public clients turned away, by reason.",
            PUBLIC_REFUSALS
                .iter()
                .zip(&self.public_refused)
                .map(|(r, c)| (format!("reason=\"{r}\""), get(c)))
                .collect(),
        );
        labelled(
            "chuantou_public_bytes_total",
            "counter",
            "Bytes carried for public clients, by direction.",
            vec![
                (
                    "direction=\"to_service\"".into(),
                    get(&self.public_bytes_to_service),
                ),
                (
                    "direction=\"to_client\"".into(),
                    get(&self.public_bytes_to_client),
                ),
            ],
        );
        text.push_str(&format!(
            "# HELP chuantou_public_connections_open Public client connections open now.\n\
             # TYPE chuantou_public_connections_open gauge\n\
             chuantou_public_connections_open {}\n",
            get(&self.public_open)
        ));
        text
    }

    /// Counts a public client turned away.
    pub fn public_refused(&self, why: PublicRefusal) {
        inc(&self.public_refused[why as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_required_metric_with_its_value() {
        let m = Metrics::default();
        inc(&m.sessions_brokered);
        inc(&m.frames_rejected);
        inc(&m.frames_rejected);
        let text = m.render(3, 5);
        for line in [
            "chuantou_registered_peers 3",
            "chuantou_known_names 5",
            "chuantou_sessions_brokered_total 1",
            "chuantou_frames_rejected_total 2",
            "# TYPE chuantou_sessions_brokered_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
