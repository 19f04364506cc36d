//! QUIC configuration of the session (noq, the multipath fork of quinn): mutual TLS 1.3
//! with the same pinned ed25519 identities as everywhere ([`tls`]), the multipath extension
//! on, and per-path keep-alives and idle timeouts from [`defaults`], so that a dead path is
//! noticed in seconds and its traffic moves to the next one.
//!
//! [`tls`]: crate::tls
//! [`defaults`]: crate::defaults

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use noq::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use wire::signal::PublicKey;

use crate::defaults;
use wire::tls::{self, TlsError};

/// The ALPN both sides insist on, so a stray QUIC client of another protocol is refused.
pub const ALPN: &[u8] = b"chuantou/2";

/// Why a QUIC configuration could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// noq refused the crypto configuration.
    #[error("quic crypto configuration: {0}")]
    Crypto(String),
}

/// The transport every session uses.
pub fn transport() -> Arc<noq::TransportConfig> {
    let mut t = noq::TransportConfig::default();
    t.max_concurrent_multipath_paths(defaults::MAX_PATHS);
    t.keep_alive_interval(Some(defaults::PATH_KEEPALIVE));
    t.default_path_keep_alive_interval(Some(defaults::PATH_KEEPALIVE));
    t.default_path_max_idle_timeout(Some(defaults::DIRECT_PATH_IDLE));
    // Idle timeout: a VarInt of milliseconds; 30 s always fits.
    t.max_idle_timeout(noq::IdleTimeout::try_from(defaults::SESSION_IDLE).ok());
    // Bulk transfers over one stream want a large window (one stream's rate is at most
    // window / RTT: 2 MiB carries 5 Gbit/s at 3 ms, 330 Mbit/s at 50 ms), but noq's
    // receive side keeps at most 1,024 separate pieces per stream and closes the
    // connection past that ("too many gaps in stream buffer"). When a direct path dies
    // with a window's worth in flight, the lost data comes back over the relay in pieces:
    // with 4 MiB windows the path-switch test hit the limit every time. 2 MiB is the most
    // that stays under it whatever is lost: a piece is at least a 1,200-byte packet, and
    // 1,024 pieces with a gap between each span over 2.4 MiB.
    t.stream_receive_window(noq::VarInt::from_u32(2 * 1024 * 1024));
    t.receive_window(noq::VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    t.max_concurrent_bidi_streams(noq::VarInt::from_u32(1024));
    // Let path MTU discovery find large MTUs where the path has them (loopback, links over
    // TCP); on ordinary paths the probes fail and it settles near 1,500.
    let mut mtu = noq::MtuDiscoveryConfig::default();
    mtu.upper_bound(defaults::MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// Endpoint configuration. The QUIC bit stays set (RFC 9287 greasing off): the shared
/// socket tells QUIC from STUN and punch probes by the first byte (RFC 9443), and a greased
/// packet would look like one of those.
pub fn endpoint_config() -> noq::EndpointConfig {
    let mut c = noq::EndpointConfig::default();
    c.grease_quic_bit(false);
    // In range (1,200..=65,527) by construction of the constant.
    let _ = c.max_udp_payload_size(defaults::MAX_UDP_PAYLOAD);
    c
}

/// QUIC client configuration: our identity, accepting only `peer`'s key.
pub fn client_config(me: &SigningKey, peer: PublicKey) -> Result<noq::ClientConfig, QuicError> {
    let mut tls = tls::client_config(me, peer)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = noq::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// QUIC server configuration: our identity, requiring `peer`'s key from the client.
pub fn server_config(me: &SigningKey, peer: PublicKey) -> Result<noq::ServerConfig, QuicError> {
    let mut tls = tls::server_config(me, peer)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = noq::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    // Bounds what stray Initials can make the endpoint hold (memory, not just CPU).
    config
        .max_incoming(defaults::MAX_INCOMING)
        .incoming_buffer_size(defaults::INCOMING_BUFFER)
        .incoming_buffer_size_total(defaults::INCOMING_BUFFER_TOTAL);
    Ok(config)
}
