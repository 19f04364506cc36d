//! Which paths a session may use: `--transport auto|udp|tcp|relay` and `--no-relay`.
//! `auto` punches UDP and TCP beside the relay, and the session's traffic takes the best
//! path up at each moment (direct UDP, then direct TCP, then the relay; see
//! [`choose`](crate::path::choose)). The others punch only the one direct path named (or
//! none); the relay stays the fallback unless `--no-relay`.

use crate::path::PathKind;

/// The `--transport` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Transport {
    /// Direct UDP, then direct TCP, then the relay, for each new connection.
    #[default]
    Auto,
    /// Only a punched UDP path (QUIC), else the relay.
    Udp,
    /// Only a punched TCP path (TLS + yamux), else the relay.
    Tcp,
    /// Only the relay: no punching.
    Relay,
}

impl Transport {
    /// Whether to punch UDP.
    pub fn udp(self) -> bool {
        matches!(self, Transport::Auto | Transport::Udp)
    }

    /// Whether to punch TCP.
    pub fn tcp(self) -> bool {
        matches!(self, Transport::Auto | Transport::Tcp)
    }
}

/// What `--transport` and `--no-relay` leave a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// `--transport`.
    pub transport: Transport,
    /// `--no-relay`.
    pub no_relay: bool,
}

impl Policy {
    /// Whether a path of `kind` may carry traffic.
    pub fn allows(self, kind: PathKind) -> bool {
        match kind {
            PathKind::DirectUdp => self.transport.udp(),
            PathKind::DirectTcp => self.transport.tcp(),
            PathKind::Relay | PathKind::RelayTcp => !self.no_relay,
        }
    }
}
