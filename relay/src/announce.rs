//! Standalone relays registering with a rendezvous, so that it hands them out in tickets:
//! the task. The messages are in `wire::announce`.
//!
//! It registers, answers the challenge, and reports its load every [`LOAD_INTERVAL`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::stats::RelayStats;
use wire::frame::{self, FrameError, FrameReader};
use wire::ticket::TicketKey;

pub use wire::announce::*;
use wire::signal::client::{ClientError, Tls};
use wire::signal::{ClientFrame, PublicKey, ServerFrame};

/// Bound on the TLS handshake with the rendezvous.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The TLS handshake failed, or the rendezvous proved another key than the pinned one.
    #[error(transparent)]
    Signal(#[from] ClientError),
}

async fn read_reply(r: &mut FrameReader<Tls>) -> Result<RelayReply, AnnounceError> {
    match r.read::<ServerFrame>().await? {
        ServerFrame::Relay(reply) => Ok(reply),
        ServerFrame::Error(e) => Err(AnnounceError::Refused(e.to_string())),
        other => Err(AnnounceError::Refused(format!(
            "unexpected frame {other:?}"
        ))),
    }
}

/// Registers once and then reports load until the connection ends or `shutdown`.
/// Signaling is TLS: with `pin`, the rendezvous must prove that key; without, the key it
/// proves is pinned into `pin` (for the rest of this process).
pub async fn announce_once(
    rendezvous: &str,
    pin: &mut Option<PublicKey>,
    key: &TicketKey,
    port: u16,
    public: Option<SocketAddr>,
    stats: &RelayStats,
    shutdown: &CancellationToken,
) -> Result<(), AnnounceError> {
    let stream = TcpStream::connect(rendezvous)
        .await
        .map_err(|e| AnnounceError::Connect(rendezvous.to_owned(), e))?;
    let addr = stream
        .peer_addr()
        .map_err(|e| AnnounceError::Connect(rendezvous.to_owned(), e))?;
    let (tls, proved) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        wire::signal::client::handshake(stream, addr),
    )
    .await
    .map_err(|_| ClientError::Timeout(HANDSHAKE_TIMEOUT))??;
    match *pin {
        Some(pinned) if pinned != proved => {
            return Err(ClientError::KeyMismatch {
                addr,
                presented: proved,
                pinned,
            }
            .into());
        }
        Some(_) => {}
        None => {
            warn!(
                %rendezvous,
                key = %proved,
                "pinned the rendezvous' key for this run (first contact); give the relay \
                 {rendezvous}#{proved} to check it instead"
            );
            *pin = Some(proved);
        }
    }
    let mut r = FrameReader::new(tls);
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

async fn send(r: &mut FrameReader<Tls>, msg: &RelayMsg) -> Result<(), AnnounceError> {
    frame::write(r.get_mut(), &ClientFrame::Relay(msg.clone())).await?;
    Ok(())
}

/// Keeps the relay registered: re-registers with jittered backoff (1 s doubling to 30 s) whenever
/// the rendezvous goes away, until `shutdown`.
pub async fn announce(
    rendezvous: String,
    mut pin: Option<PublicKey>,
    key: TicketKey,
    port: u16,
    public: Option<SocketAddr>,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) {
    let mut wait = Duration::from_secs(1);
    while !shutdown.is_cancelled() {
        // Jitter (0.5x to 1.5x): relays that lost a restarted rendezvous come back spread
        // out, not in lockstep.
        let pause = wire::cli::jitter(wait, rand::random());
        match announce_once(&rendezvous, &mut pin, &key, port, public, &stats, &shutdown).await {
            Ok(()) => return,
            Err(e @ AnnounceError::Signal(ClientError::KeyMismatch { .. })) => {
                tracing::error!(error = %e, "relay registration refused; retrying in {pause:.1?}")
            }
            Err(e) => warn!(error = %e, "relay registration lost; retrying in {pause:.1?}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}
