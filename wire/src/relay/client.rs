//! The client half: present a ticket to a relay over TCP or UDP and wait until the other
//! half is there. After that the TCP stream, or the UDP socket towards the relay, carries
//! the session's bytes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout, timeout_at};

use crate::frame::{self, FrameError, FrameReader};
use crate::relay::{Hello, RELAY_VERSION, Refusal, Status, UdpControl, decode_udp, encode_udp};
use crate::ticket::Ticket;

/// Why joining a relay session failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The relay could not be reached.
    #[error("connecting to relay {addr}: {source}")]
    Connect {
        /// The relay.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The relay refused the ticket or gave up waiting for the other half.
    #[error("relay refused: {0}")]
    Refused(Refusal),
    /// The control exchange broke.
    #[error("relay control: {0}")]
    Frame(#[from] FrameError),
    /// UDP socket trouble.
    #[error("relay udp: {0}")]
    Io(std::io::Error),
    /// No pairing within the time given.
    #[error("relay {0} paired nothing within {1:?}")]
    Timeout(SocketAddr, Duration),
}

/// Connection attempts when the relay connection breaks before the session was paired.
/// The relay keeps an unpaired ticket good for its holder (it forgets a half that left,
/// and lets a half that comes back take over from its dead connection), so a fresh
/// connection may present the same ticket again.
const JOIN_ATTEMPTS: u32 = 3;

/// Pause before another attempt (times the attempt number).
const JOIN_RETRY: Duration = Duration::from_millis(50);

/// Connects to `relay`, presents `ticket`, and returns the stream once both halves are in.
/// A connection that fails or breaks before pairing is tried again (a fresh connection,
/// the same ticket), up to three times within `within`; a refusal is final.
pub async fn join_tcp(
    relay: SocketAddr,
    ticket: Ticket,
    within: Duration,
) -> Result<TcpStream, JoinError> {
    let work = async {
        let mut attempt = 1;
        loop {
            match join_once(relay, ticket.clone()).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    let transient = matches!(e, JoinError::Connect { .. } | JoinError::Frame(_));
                    if !transient || attempt >= JOIN_ATTEMPTS {
                        return Err(e);
                    }
                    tracing::info!(%relay, error = %e, attempt, "relay join broke early; trying again");
                    tokio::time::sleep(JOIN_RETRY * attempt).await;
                    attempt += 1;
                }
            }
        }
    };
    timeout(within, work)
        .await
        .map_err(|_| JoinError::Timeout(relay, within))?
}

async fn join_once(relay: SocketAddr, ticket: Ticket) -> Result<TcpStream, JoinError> {
    let mut stream = TcpStream::connect(relay)
        .await
        .map_err(|source| JoinError::Connect {
            addr: relay,
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let hello = Hello {
        version: RELAY_VERSION,
        ticket,
    };
    frame::write(&mut stream, &hello).await?;
    // The reader never reads past a frame, so no session byte is lost when the stream
    // is handed back.
    let mut reader = FrameReader::new(stream);
    loop {
        match reader.read::<Status>().await? {
            Status::Waiting => {}
            Status::Paired => return Ok(reader.into_inner()),
            Status::Refused(r) => return Err(JoinError::Refused(r)),
        }
    }
}

/// The UDP hello that presents `ticket`: sent until the relay pairs the session, and
/// again whenever the half's address may have changed (the relay then follows it).
pub fn udp_hello(ticket: Ticket) -> Vec<u8> {
    encode_udp(&UdpControl::Hello(Hello {
        version: RELAY_VERSION,
        ticket,
    }))
}

/// Presents `ticket` from `sock` to `relay` over UDP, repeating every `every` until the
/// relay says both halves are in. Datagrams from elsewhere are ignored.
pub async fn join_udp(
    sock: &UdpSocket,
    relay: SocketAddr,
    ticket: Ticket,
    every: Duration,
    within: Duration,
) -> Result<(), JoinError> {
    let hello = udp_hello(ticket);
    let give_up = Instant::now() + within;
    let mut buf = [0u8; 2048];
    loop {
        sock.send_to(&hello, relay).await.map_err(JoinError::Io)?;
        let next = (Instant::now() + every).min(give_up);
        loop {
            let Ok(got) = timeout_at(next, sock.recv_from(&mut buf)).await else {
                break;
            };
            let (n, from) = got.map_err(JoinError::Io)?;
            if from != relay {
                continue;
            }
            match decode_udp(&buf[..n]) {
                Some(Ok(UdpControl::Status(Status::Paired))) => return Ok(()),
                Some(Ok(UdpControl::Status(Status::Refused(r)))) => {
                    return Err(JoinError::Refused(r));
                }
                _ => continue,
            }
        }
        if Instant::now() >= give_up {
            return Err(JoinError::Timeout(relay, within));
        }
    }
}
