//! The TCP punch shell: runs the sans-IO [`punch_tcp`](crate::punch::tcp) agent for one
//! brokered session on the shared TCP port — connects from P, connections accepted on P
//! for this session, one probe read at a time — and hands back the agreed connection, which
//! the session then runs a path on (a [`Link`](crate::path::link::Link)).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tracing::{debug, info};
use wire::signal::Broker;

use crate::defaults::{TCP_KEEPALIVE_EVERY, TCP_KEEPALIVE_IDLE};
use crate::presence::signal::Tcp;
use crate::punch::probe::{self, ProbeKey};
use crate::punch::strategy::{Strategy, plan_tcp};
use crate::punch::tcp::{Config, ConnId, Event, Input, Output, TcpPunch, TcpTiming};
use crate::punch::udp_shell::{DirectError, profile};

/// A punched TCP connection, both sides agreed.
#[derive(Debug)]
pub struct TcpDirect {
    /// The connection.
    pub stream: TcpStream,
    /// Its other end.
    pub remote: SocketAddr,
    /// How the pair was found, for the log.
    pub why: String,
    /// From the punch's start to the agreement.
    pub elapsed: Duration,
}

type Read = (ConnId, OwnedReadHalf, io::Result<[u8; probe::LEN]>);

/// TCP keepalive on a punched connection: probes after [`TCP_KEEPALIVE_IDLE`] of
/// silence, every [`TCP_KEEPALIVE_EVERY`], dead after 3 unanswered (the session's own
/// keep-alives keep a live one from ever idling; this catches a half-dead socket).
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(TCP_KEEPALIVE_IDLE)
    .with_interval(TCP_KEEPALIVE_EVERY)
    .with_retries(3);

fn read_one(conn: ConnId, mut rd: OwnedReadHalf) -> BoxFuture<'static, Read> {
    Box::pin(async move {
        let mut buf = [0u8; probe::LEN];
        let r = rd.read_exact(&mut buf).await.map(|_| buf);
        (conn, rd, r)
    })
}

/// Punches TCP for session `b` from `tcp`'s port.
pub async fn establish_tcp(
    tcp: &std::sync::Arc<Tcp>,
    b: &Broker,
    relay_tcp: bool,
) -> Result<TcpDirect, DirectError> {
    let started = Instant::now();
    // When the relay is joined over TCP, both sides open that connection (a TCP mapping
    // of its own) before punching.
    let between = i32::from(relay_tcp);
    let strategy = plan_tcp(
        &profile(tcp.nat),
        &profile(b.candidates.tcp_nat),
        b.candidates.tcp,
        between,
    );
    let (remote, why) = match strategy {
        Strategy::Direct { remote, why, .. } => (remote, why),
        Strategy::Relay { why } => return Err(DirectError::Hopeless(why)),
    };
    debug!(session = %b.session, %why, candidates = ?remote, port = tcp.port.port(), "punching tcp");
    let expect = remote.iter().map(|r| r.ip()).collect();
    let mut route = tcp.port.route(b.session.0, expect);
    let mut agent = TcpPunch::new(Config {
        role: b.role,
        key: ProbeKey::new(b.session.0, b.secret),
        remote,
        start: Instant::now() + Duration::from_millis(u64::from(b.start_in_ms)),
        timing: TcpTiming::default(),
        seed: rand::random(),
    });
    let mut connects: FuturesUnordered<BoxFuture<'static, (SocketAddr, io::Result<TcpStream>)>> =
        FuturesUnordered::new();
    let mut reads: FuturesUnordered<BoxFuture<'static, Read>> = FuturesUnordered::new();
    let mut writers: HashMap<ConnId, OwnedWriteHalf> = HashMap::new();
    let mut parked: HashMap<ConnId, OwnedReadHalf> = HashMap::new();
    let mut next_id: ConnId = 0;
    let mut later: Vec<ConnId> = Vec::new();
    agent.handle_input(Input::Timeout(Instant::now()));
    loop {
        let deadline = loop {
            match agent.poll_output() {
                Output::Connect(to) => {
                    let tcp = tcp.clone();
                    connects.push(Box::pin(async move { (to, tcp.port.connect(to).await) }));
                }
                Output::Send { conn, payload } => {
                    if let Some(w) = writers.get_mut(&conn)
                        && w.write_all(&payload).await.is_err()
                    {
                        later.push(conn);
                    }
                }
                Output::Close(conn) => {
                    writers.remove(&conn);
                    parked.remove(&conn);
                }
                Output::Event(Event::Connected(p)) => {
                    let (Some(rd), Some(wr)) = (parked.remove(&p.conn), writers.remove(&p.conn))
                    else {
                        return Err(DirectError::Io(io::Error::other(
                            "the agreed connection is gone",
                        )));
                    };
                    let stream = rd
                        .reunite(wr)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    let _ = stream.set_nodelay(true);
                    // The reaching side's pings find a dead path; keepalives let the
                    // exposing side's kernel find it too, so its session ends.
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&KEEPALIVE);
                    info!(
                        session = %b.session,
                        peer = %b.peer,
                        remote = %p.remote,
                        how = if p.accepted { "accepted" } else { "connected" },
                        "punched via tcp in {:.0} ms ({why})",
                        p.elapsed.as_secs_f64() * 1000.0
                    );
                    return Ok(TcpDirect {
                        stream,
                        remote: p.remote,
                        why,
                        elapsed: started.elapsed(),
                    });
                }
                Output::Event(Event::Failed {
                    attempts,
                    connections,
                }) => {
                    debug!(session = %b.session, attempts, connections, "tcp punch gave up");
                    return Err(DirectError::Unanswered {
                        probes: attempts,
                        secs: started.elapsed().as_secs_f64(),
                    });
                }
                Output::Timeout(at) => break at,
            }
        };
        for conn in later.drain(..) {
            agent.handle_input(Input::Closed {
                now: Instant::now(),
                conn,
            });
        }
        for (conn, rd) in parked.drain() {
            reads.push(read_one(conn, rd));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {
                agent.handle_input(Input::Timeout(Instant::now()));
            }
            Some((to, r)) = connects.next() => match r {
                Ok(s) => {
                    next_id += 1;
                    let (rd, wr) = s.into_split();
                    writers.insert(next_id, wr);
                    parked.insert(next_id, rd);
                    agent.handle_input(Input::Connected { now: Instant::now(), to, conn: next_id });
                }
                Err(e) => {
                    debug!(%to, error = %e, "tcp punch connect failed");
                    agent.handle_input(Input::ConnectFailed { now: Instant::now(), to });
                }
            },
            Some((s, from, first)) = route.rx.recv() => {
                next_id += 1;
                let (rd, wr) = s.into_split();
                writers.insert(next_id, wr);
                parked.insert(next_id, rd);
                let now = Instant::now();
                agent.handle_input(Input::Accepted { now, conn: next_id, from });
                agent.handle_input(Input::Receive { now, conn: next_id, data: &first });
            }
            Some((conn, rd, r)) = reads.next() => {
                if !writers.contains_key(&conn) {
                    continue;
                }
                match r {
                    Ok(msg) => {
                        parked.insert(conn, rd);
                        agent.handle_input(Input::Receive { now: Instant::now(), conn, data: &msg });
                    }
                    Err(_) => agent.handle_input(Input::Closed { now: Instant::now(), conn }),
                }
            }
        }
    }
}
