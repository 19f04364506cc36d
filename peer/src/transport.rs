//! Which paths a peer tries for its tunnels: `--transport auto|udp|tcp|relay`. `auto`
//! punches UDP and TCP beside the relay, and each new local connection takes the best path
//! up at that moment: direct UDP (QUIC), then direct TCP, then the relay. The others try
//! only the one direct path named (or none); the relay stays the fallback either way.

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

/// The name of the best path among those up, as `peer status` and the logs print it
/// (`none` when no direct path is up and the relay is not used).
pub fn best_path(udp_up: bool, tcp_up: bool, relay: bool) -> &'static str {
    if udp_up {
        "direct-udp"
    } else if tcp_up {
        "direct-tcp"
    } else if relay {
        "relay"
    } else {
        "none"
    }
}
