//! The direct tunnel over a punched UDP path: a QUIC connection (quinn) on the very socket
//! that punched the hole, so the NAT mapping the probes opened is the one QUIC uses.
//! Mutual TLS 1.3 with the same pinned ed25519 identities as the relayed tunnel ([`tls`]);
//! local TCP connections ride as bidirectional streams, UDP flows as QUIC datagrams;
//! keep-alives go out at under half the NAT mapping lifetime.
//!
//! [`tls`]: crate::tls

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rendezvous::proto::PublicKey;

use crate::tls::{self, SERVER_NAME, TlsError};

/// The ALPN both sides insist on, so a stray QUIC client of another protocol is refused.
pub const ALPN: &[u8] = b"chuantou/1";

/// Keep-alive interval: the lab's and many home routers' UDP mappings last 30–60 s, RFC
/// 4787 asks for at least 2 minutes; 10 s stays under half of the shortest common one.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// A path with no packet for this long is dead (three keep-alives lost).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a direct tunnel could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// quinn refused the crypto configuration.
    #[error("quic crypto configuration: {0}")]
    Crypto(String),
    /// The socket could not become an endpoint.
    #[error("quic endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
    /// Connecting failed before the handshake started.
    #[error("quic connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake or the connection failed (wrong key, timeout, reset).
    #[error("quic connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The endpoint closed before any peer came.
    #[error("no peer connected")]
    NoPeer,
}

fn transport(keepalive: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keepalive));
    // Idle timeout: a VarInt of milliseconds; 30 s always fits.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    // Bulk transfers over one stream: let the windows grow past quinn's defaults.
    t.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    // Let path MTU discovery find large MTUs where the path has them (loopback, jumbo
    // frames); on ordinary paths the probes fail and it settles near 1,500 as before.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(16_384);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// Endpoint configuration for every direct tunnel. The QUIC bit stays set (RFC 9287
/// greasing off): the shared socket tells QUIC from STUN and punch probes by the first
/// byte (RFC 9443), and a greased packet would look like one of those.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.grease_quic_bit(false);
    c
}

/// QUIC client configuration: our identity, accepting only `peer`'s key.
pub fn client_config(me: &SigningKey, peer: PublicKey) -> Result<quinn::ClientConfig, QuicError> {
    let mut tls = tls::client_config(me, peer)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(KEEPALIVE));
    Ok(config)
}

/// QUIC server configuration: our identity, requiring `peer`'s key from the client.
pub fn server_config(me: &SigningKey, peer: PublicKey) -> Result<quinn::ServerConfig, QuicError> {
    let mut tls = tls::server_config(me, peer)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(KEEPALIVE));
    Ok(config)
}

/// One direct tunnel: the endpoint on the punched socket and its single connection.
#[derive(Debug)]
pub struct QuicTunnel {
    endpoint: quinn::Endpoint,
    /// The connection to the other peer.
    pub conn: quinn::Connection,
}

impl QuicTunnel {
    /// The reaching side: connects from `socket` to `remote`, accepting only `peer`'s key.
    pub async fn connect(
        socket: std::net::UdpSocket,
        remote: SocketAddr,
        me: &SigningKey,
        peer: PublicKey,
        keepalive: Duration,
    ) -> Result<QuicTunnel, QuicError> {
        let mut config = client_config(me, peer)?;
        config.transport_config(transport(keepalive));
        let endpoint = quinn::Endpoint::new(
            endpoint_config(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let conn = endpoint.connect_with(config, remote, SERVER_NAME)?.await?;
        Ok(QuicTunnel { endpoint, conn })
    }

    /// The exposing side: accepts on `socket` the first connection whose TLS proves
    /// `peer`'s key; others fail their handshake and are ignored.
    pub async fn accept(
        socket: std::net::UdpSocket,
        me: &SigningKey,
        peer: PublicKey,
        keepalive: Duration,
    ) -> Result<QuicTunnel, QuicError> {
        let mut config = server_config(me, peer)?;
        config.transport_config(transport(keepalive));
        let endpoint = quinn::Endpoint::new(
            endpoint_config(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        loop {
            let incoming = endpoint.accept().await.ok_or(QuicError::NoPeer)?;
            match incoming.await {
                Ok(conn) => {
                    // One tunnel per punched socket: turn away later newcomers.
                    endpoint.set_server_config(None);
                    return Ok(QuicTunnel { endpoint, conn });
                }
                Err(e) => tracing::debug!(error = %e, "direct handshake failed; waiting on"),
            }
        }
    }

    /// The local address of the punched socket.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The smoothed round trip of the path.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Closes the tunnel with a reason the other side can log.
    pub fn close(&self, why: &str) {
        self.conn.close(quinn::VarInt::from_u32(0), why.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn public(k: &SigningKey) -> PublicKey {
        PublicKey(k.verifying_key().to_bytes())
    }

    fn socket() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    #[tokio::test]
    async fn pinned_keys_connect_and_carry_streams_and_datagrams() {
        let (pc, phone) = (key(1), key(2));
        let server_sock = socket();
        let addr = server_sock.local_addr().unwrap();
        let (pcp, phonep) = (public(&pc), public(&phone));
        let server = tokio::spawn(async move {
            let t = QuicTunnel::accept(server_sock, &pc, phonep, KEEPALIVE)
                .await
                .unwrap();
            let (mut send, mut recv) = t.conn.accept_bi().await.unwrap();
            let buf = recv.read_to_end(1 << 20).await.unwrap();
            send.write_all(&buf).await.unwrap();
            send.finish().unwrap();
            let d = t.conn.read_datagram().await.unwrap();
            t.conn.send_datagram(d).unwrap();
            // Wait for the client to finish before dropping the connection.
            t.conn.closed().await;
        });
        let t = QuicTunnel::connect(socket(), addr, &phone, pcp, KEEPALIVE)
            .await
            .unwrap();
        let (mut send, mut recv) = t.conn.open_bi().await.unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        let back = recv.read_to_end(1 << 20).await.unwrap();
        assert_eq!(back, data);
        t.conn
            .send_datagram(bytes::Bytes::from_static(b"one datagram"))
            .unwrap();
        assert_eq!(&t.conn.read_datagram().await.unwrap()[..], b"one datagram");
        t.close("done");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_key_other_than_the_pinned_one_is_refused() {
        let (pc, phone, mallory) = (key(1), key(2), key(3));
        let server_sock = socket();
        let addr = server_sock.local_addr().unwrap();
        let phonep = public(&phone);
        let server =
            tokio::spawn(
                async move { QuicTunnel::accept(server_sock, &pc, phonep, KEEPALIVE).await },
            );
        // Mallory expects the right server key but presents her own.
        // In TLS 1.3 the client finishes before the server checks its certificate, so her
        // side may think it is connected until the server's refusal closes it.
        match QuicTunnel::connect(socket(), addr, &mallory, public(&key(1)), KEEPALIVE).await {
            Err(_) => {}
            Ok(t) => {
                let why = t.conn.closed().await;
                assert!(
                    why.to_string().contains("peer presented key"),
                    "closed for another reason: {why}"
                );
            }
        }
        // And a client pinning another server key refuses the real server.
        let r = QuicTunnel::connect(socket(), addr, &phone, public(&mallory), KEEPALIVE).await;
        assert!(r.is_err(), "wrong server key accepted");
        // The server accepted nobody: it is still waiting for the right peer.
        assert!(!server.is_finished());
        server.abort();
    }
}
