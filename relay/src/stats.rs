//! Relay accounting: counters shared by every session task and their Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Lock-free relay counters.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes forwarded, both directions, TCP and UDP.
    pub bytes_total: AtomicU64,
    /// Sessions paired now.
    pub sessions_active: AtomicU64,
    /// Sessions paired since start.
    pub sessions_total: AtomicU64,
    /// Hellos refused (bad, expired or reused tickets; limits).
    pub refused_total: AtomicU64,
    /// Halves admitted to wait for their partner since start.
    pub halves_total: AtomicU64,
}

impl RelayStats {
    /// Prometheus text exposition of the relay metrics.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rows = [
            (
                "chuantou_relay_bytes_total",
                "counter",
                "Bytes forwarded by the relay, both directions.",
                get(&self.bytes_total),
            ),
            (
                "chuantou_relay_sessions",
                "gauge",
                "Relay sessions paired now.",
                get(&self.sessions_active),
            ),
            (
                "chuantou_relay_sessions_total",
                "counter",
                "Relay sessions paired since start.",
                get(&self.sessions_total),
            ),
            (
                "chuantou_relay_refused_total",
                "counter",
                "Relay hellos refused (bad, expired or reused tickets; limits).",
                get(&self.refused_total),
            ),
            (
                "chuantou_relay_halves_total",
                "counter",
                "Relay halves admitted to wait for their partner since start.",
                get(&self.halves_total),
            ),
        ];
        prometheus(&rows)
    }
}

/// Renders `(name, type, help, value)` rows in the Prometheus text format (0.0.4); shared
/// by every chuantou server's `/metrics`.
pub fn prometheus(rows: &[(&str, &str, &str, u64)]) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out
}
