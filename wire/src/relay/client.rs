//! The client half: present a ticket to a relay over TCP or UDP and wait until the other
//! half is there. After that the TCP stream, or the UDP socket towards the relay, carries
//! the session's bytes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout, timeout_at};

use crate::frame::{self, FrameError, FrameReader};
use crate::relay::{
    Hello, Proof, RELAY_VERSION, Refusal, Status, UdpControl, decode_udp, encode_udp,
};
use crate::ticket::{JoinSecret, Ticket};

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
    secret: JoinSecret,
    within: Duration,
) -> Result<TcpStream, JoinError> {
    let work = async {
        let mut attempt = 1;
        loop {
            match join_once(relay, ticket.clone(), secret).await {
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

async fn join_once(
    relay: SocketAddr,
    ticket: Ticket,
    secret: JoinSecret,
) -> Result<TcpStream, JoinError> {
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
            Status::Challenge { nonce } => {
                let proof = Proof {
                    mac: secret.prove(b"tcp", &nonce),
                };
                frame::write(reader.get_mut(), &proof).await?;
            }
            Status::Waiting => {}
            Status::Paired => return Ok(reader.into_inner()),
            Status::Refused(r) => return Err(JoinError::Refused(r)),
        }
    }
}

/// A half's UDP join: the hello it sends (until paired, and again whenever its address
/// may have changed, so that the relay follows it), and its answers to the relay's
/// challenges.
#[derive(Debug, Clone)]
pub struct UdpJoin {
    hello: Hello,
    secret: JoinSecret,
}

impl UdpJoin {
    /// The join for `ticket`, proving `secret`.
    pub fn new(ticket: Ticket, secret: JoinSecret) -> UdpJoin {
        UdpJoin {
            hello: Hello {
                version: RELAY_VERSION,
                ticket,
            },
            secret,
        }
    }

    /// The hello datagram.
    pub fn hello(&self) -> Vec<u8> {
        encode_udp(&UdpControl::Hello(self.hello.clone()))
    }

    /// The answer to `datagram`, if it is the relay's challenge.
    pub fn answer(&self, datagram: &[u8]) -> Option<Vec<u8>> {
        match decode_udp(datagram)? {
            Ok(UdpControl::Status(Status::Challenge { nonce })) => {
                Some(encode_udp(&UdpControl::Proven {
                    hello: self.hello.clone(),
                    nonce,
                    mac: self.secret.prove(b"udp", &nonce),
                }))
            }
            _ => None,
        }
    }
}

/// Joins `join`'s session from `sock` at `relay` over UDP: hellos every `every`, answers to
/// challenges, until the relay says both halves are in. Datagrams from elsewhere are
/// ignored.
pub async fn join_udp(
    sock: &UdpSocket,
    relay: SocketAddr,
    join: &UdpJoin,
    every: Duration,
    within: Duration,
) -> Result<(), JoinError> {
    let hello = join.hello();
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
            if crate::dual::canonical(from) != relay {
                continue;
            }
            if let Some(answer) = join.answer(&buf[..n]) {
                sock.send_to(&answer, relay).await.map_err(JoinError::Io)?;
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
