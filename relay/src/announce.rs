//! Standalone relays registering with a rendezvous, so that it hands them out in tickets.
//!
//! The messages travel on the rendezvous' signaling port, as their own variants of its
//! frames: a relay's frames are `ClientFrame::Relay(RelayMsg)` (variant [`CLIENT_TAG`]) and
//! the answers `ServerFrame::Relay(RelayReply)` (variant [`SERVER_TAG`]) or
//! `ServerFrame::Error` ([`SERVER_ERROR_TAG`]). postcard writes an enum variant as a varint
//! tag followed by its payload, so this crate, below the rendezvous, can speak them without
//! naming the rendezvous' types; a test there pins that both encodings agree.
//!
//! - relay → `Hello { version, port, public }`
//! - rendezvous → `Challenge { nonce }`
//! - relay → `Proof { mac }`: HMAC with the shared ticket key over the nonce and the
//!   relay's advertised address, so only relays that can verify tickets get handed out
//! - rendezvous → `Accepted { advertised }`
//! - relay → `Load { sessions }` every [`LOAD_INTERVAL`]; silence means gone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::frame::{self, FrameError, FrameReader};
use crate::stats::RelayStats;
use crate::ticket::TicketKey;

/// Version of these messages.
pub const ANNOUNCE_VERSION: u16 = 1;
/// Variant index of `Relay` in the rendezvous' `ClientFrame`.
pub const CLIENT_TAG: u32 = 2;
/// Variant index of `Relay` in the rendezvous' `ServerFrame`.
pub const SERVER_TAG: u32 = 4;
/// Variant index of `Error` in the rendezvous' `ServerFrame`.
pub const SERVER_ERROR_TAG: u32 = 3;
/// How often a registered relay reports its load (and so shows it is alive).
pub const LOAD_INTERVAL: Duration = Duration::from_secs(15);

/// Relay → rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayMsg {
    /// Opens a registration.
    Hello {
        /// [`ANNOUNCE_VERSION`].
        version: u16,
        /// The relay's port (TCP and UDP).
        port: u16,
        /// Its public address, when the rendezvous cannot see it (behind a load balancer).
        public: Option<SocketAddr>,
    },
    /// Answers the challenge.
    Proof {
        /// [`proof`] of the nonce.
        mac: [u8; 32],
    },
    /// Periodic load report.
    Load {
        /// Sessions paired now.
        sessions: u32,
    },
}

/// Rendezvous → relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayReply {
    /// Prove you hold the ticket key.
    Challenge {
        /// Fresh per registration.
        nonce: [u8; 32],
    },
    /// Registered: peers will be sent to `advertised`.
    Accepted {
        /// The address handed out in tickets.
        advertised: SocketAddr,
    },
}

/// The proof a relay gives: HMAC-SHA256 with the ticket key over a tag, the nonce and the
/// port, so it cannot be replayed to another rendezvous or for another port.
pub fn proof(key: &TicketKey, nonce: &[u8; 32], port: u16) -> [u8; 32] {
    key.hmac(&[b"chuantou relay announce v1\0", nonce, &port.to_be_bytes()])
}

/// Encodes a relay frame as the rendezvous' `ClientFrame::Relay(msg)`.
pub fn encode_msg(msg: &RelayMsg) -> Result<Vec<u8>, FrameError> {
    frame::encode(&(CLIENT_TAG, msg))
}

/// Why registering failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnnounceError {
    /// Could not reach the rendezvous.
    #[error("connecting to rendezvous {0}: {1}")]
    Connect(String, std::io::Error),
    /// The rendezvous refused (wrong key, none configured, old version…).
    #[error("rendezvous refused the relay: {0}")]
    Refused(String),
    /// The exchange broke.
    #[error("registration exchange: {0}")]
    Frame(#[from] FrameError),
}

async fn read_reply(r: &mut FrameReader<TcpStream>) -> Result<RelayReply, AnnounceError> {
    let body = r.read_body().await?;
    let (tag, rest): (u32, &[u8]) = postcard::take_from_bytes(&body).map_err(FrameError::from)?;
    match tag {
        SERVER_TAG => Ok(frame::decode(rest)?),
        SERVER_ERROR_TAG => {
            let (code, message): (u16, String) = frame::decode(rest)?;
            Err(AnnounceError::Refused(format!("{message} (code {code})")))
        }
        other => Err(AnnounceError::Refused(format!("unexpected frame {other}"))),
    }
}

/// Registers once and then reports load until the connection ends or `shutdown`.
pub async fn announce_once(
    rendezvous: &str,
    key: &TicketKey,
    port: u16,
    public: Option<SocketAddr>,
    stats: &RelayStats,
    shutdown: &CancellationToken,
) -> Result<(), AnnounceError> {
    let stream = TcpStream::connect(rendezvous)
        .await
        .map_err(|e| AnnounceError::Connect(rendezvous.to_owned(), e))?;
    let mut r = FrameReader::new(stream);
    let hello = RelayMsg::Hello {
        version: ANNOUNCE_VERSION,
        port,
        public,
    };
    send(&mut r, &hello).await?;
    let RelayReply::Challenge { nonce } = read_reply(&mut r).await? else {
        return Err(AnnounceError::Refused("expected a challenge".into()));
    };
    send(
        &mut r,
        &RelayMsg::Proof {
            mac: proof(key, &nonce, port),
        },
    )
    .await?;
    let RelayReply::Accepted { advertised } = read_reply(&mut r).await? else {
        return Err(AnnounceError::Refused("expected acceptance".into()));
    };
    info!(%rendezvous, %advertised, "registered with the rendezvous");
    let mut tick = tokio::time::interval(LOAD_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                let sessions = u32::try_from(stats.sessions_active.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
                send(&mut r, &RelayMsg::Load { sessions }).await?;
            }
            // Anything from the rendezvous now (an error, or EOF) ends this registration.
            reply = read_reply(&mut r) => {
                reply?;
                return Err(AnnounceError::Refused("unexpected message".into()));
            }
        }
    }
}

async fn send(r: &mut FrameReader<TcpStream>, msg: &RelayMsg) -> Result<(), AnnounceError> {
    use tokio::io::AsyncWriteExt;
    r.get_mut()
        .write_all(&encode_msg(msg)?)
        .await
        .map_err(FrameError::from)?;
    Ok(())
}

/// Keeps the relay registered: re-registers with backoff (1 s doubling to 30 s) whenever
/// the rendezvous goes away, until `shutdown`.
pub async fn announce(
    rendezvous: String,
    key: TicketKey,
    port: u16,
    public: Option<SocketAddr>,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) {
    let mut wait = Duration::from_secs(1);
    while !shutdown.is_cancelled() {
        match announce_once(&rendezvous, &key, port, public, &stats, &shutdown).await {
            Ok(()) => return,
            Err(e) => warn!(error = %e, "relay registration lost; retrying in {wait:?}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}
