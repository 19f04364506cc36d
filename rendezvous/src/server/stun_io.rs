//! The STUN responder's sockets: binding them (UDP and TCP on each RFC 5780 slot) and the
//! task serving each; the answers come from the sans-IO [`Responder`].

use super::*;
use wire::batch::BatchSocket;

/// The STUN responder's UDP sockets, TCP listeners and layout.
type StunSockets = (Vec<(Slot, UdpSocket)>, Vec<(Slot, TcpListener)>, Layout);

/// Binds the STUN responder: UDP and TCP (RFC 8489 §6.2.2) on each slot's address.
/// `relay_port`: the embedded relay's UDP port, which a default second STUN port must
/// not take.
pub(super) async fn bind_stun(
    primary: SocketAddr,
    (alt_ip, alt_port): (Option<IpAddr>, Option<u16>),
    relay_port: Option<u16>,
    dual: bool,
) -> Result<StunSockets, ServerError> {
    // RFC 5780's four addresses are concrete IPs of one family; a plain responder on every
    // address takes both families on one socket.
    let dual = dual && alt_ip.is_none();
    let bind = |addr: SocketAddr| async move {
        wire::dual::udp_socket(addr, dual).map_err(|source| ServerError::Bind {
            what: "stun",
            addr,
            source,
        })
    };
    let bind_tcp = |addr: SocketAddr| async move {
        wire::dual::tcp_listener(addr, dual).map_err(|source| ServerError::Bind {
            what: "stun (tcp)",
            addr,
            source,
        })
    };
    let Some(alt_ip) = alt_ip else {
        // With port 0 the UDP socket picks the port and TCP must get the same one; a
        // port free for UDP can be taken for TCP, so try a few.
        let mut attempts = if primary.port() == 0 { 8 } else { 1 };
        loop {
            attempts -= 1;
            let sock = bind(primary).await?;
            let bound = sock.local_addr().map_err(|source| ServerError::Bind {
                what: "stun",
                addr: primary,
                source,
            })?;
            match bind_tcp(bound).await {
                Ok(l) => {
                    let mut socks = vec![(Slot::PRIMARY, sock)];
                    let port2 =
                        bind_port2(bound, primary.port() == 0, (alt_port, relay_port), dual)
                            .await?;
                    let second = port2.map(|(p, sock)| {
                        socks.push((Slot::PRIMARY.changed(false, true), sock));
                        p
                    });
                    return Ok((
                        socks,
                        vec![(Slot::PRIMARY, l)],
                        Layout {
                            primary: bound,
                            alternate: None,
                            port2: second,
                        },
                    ));
                }
                Err(e) if attempts == 0 => return Err(e),
                Err(_) => continue,
            }
        }
    };
    if primary.ip().is_unspecified() {
        return Err(ServerError::Config(format!(
            "--alt-ip {alt_ip} needs --stun on a concrete IP of this host (e.g. --stun \
             203.0.113.1:{}), not {}: RFC 5780 replies must come from a known address",
            primary.port(),
            primary.ip()
        )));
    }
    if alt_ip == primary.ip() || alt_ip.is_ipv4() != primary.is_ipv4() {
        return Err(ServerError::Config(format!(
            "--alt-ip {alt_ip} must be a second address of the same family as {}",
            primary.ip()
        )));
    }
    if primary.port() == 0 {
        return Err(ServerError::Config(
            "--alt-ip needs a fixed STUN port (not 0)".into(),
        ));
    }
    let alt_port = alt_port.unwrap_or(primary.port().wrapping_add(1).max(1));
    if alt_port == primary.port() {
        return Err(ServerError::Config(format!(
            "--alt-port {alt_port} must differ from the STUN port"
        )));
    }
    let layout = Layout {
        primary,
        alternate: Some(SocketAddr::new(alt_ip, alt_port)),
        port2: None,
    };
    let mut socks = Vec::new();
    let mut listeners = Vec::new();
    for slot in layout.slots() {
        socks.push((slot, bind(layout.addr(slot)).await?));
        listeners.push((slot, bind_tcp(layout.addr(slot)).await?));
    }
    Ok((socks, listeners, layout))
}

/// A one-IP server's second STUN port (UDP only): `--alt-port`, else the STUN port + 1
/// (+ 2 where + 1 is the relay's; any free port when the STUN port was 0). An explicit
/// port that cannot be bound is an error; the default one is skipped with a warning
/// (peers then cannot tell a symmetric NAT from a cone, and punch such pairs as cones).
async fn bind_port2(
    bound: SocketAddr,
    any: bool,
    (asked, relay_port): (Option<u16>, Option<u16>),
    dual: bool,
) -> Result<Option<(u16, UdpSocket)>, ServerError> {
    let port = match asked {
        Some(p) => p,
        None if any => 0,
        None => [1, 2, u16::MAX, u16::MAX - 1]
            .into_iter()
            .map(|d| bound.port().wrapping_add(d))
            .find(|&p| p != 0 && p != bound.port() && Some(p) != relay_port)
            .unwrap_or(0),
    };
    let addr = SocketAddr::new(bound.ip(), port);
    if asked.is_some() && port == bound.port() {
        return Err(ServerError::Config(format!(
            "--alt-port {port} must differ from the STUN port"
        )));
    }
    match wire::dual::udp_socket(addr, dual) {
        Ok(sock) => {
            let port = sock.local_addr().map_or(port, |a| a.port());
            Ok(Some((port, sock)))
        }
        Err(source) if asked.is_some() => Err(ServerError::Bind {
            what: "stun (second port)",
            addr,
            source,
        }),
        Err(e) => {
            warn!(%addr, error = %e, "no second STUN port: peers will not tell symmetric NATs from cones (free it, or pick one with --alt-port)");
            Ok(None)
        }
    }
}

/// STUN over TCP on one slot: Binding requests on the stream, answered on the stream.
/// CHANGE-REQUEST and RESPONSE-PORT cannot be honoured over a connection, so such requests
/// end it (RFC 5780 defines them for UDP only).
pub(super) async fn stun_tcp_task(
    shared: Arc<Shared>,
    slot: Slot,
    listener: TcpListener,
    limit: Arc<tokio::sync::Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (mut stream, src) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, src)) => (s, wire::dual::canonical(src)),
                Err(e) => { debug!(error = %e, "stun tcp accept"); continue; }
            },
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let serve = async {
                loop {
                    let mut msg = vec![0u8; 20];
                    let read = tokio::time::timeout(defaults::STUN_TCP_IDLE, async {
                        stream.read_exact(&mut msg).await?;
                        let len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
                        if 20 + len > defaults::STUN_MAX_REQUEST {
                            return Err(std::io::Error::other("oversized stun message"));
                        }
                        msg.resize(20 + len, 0);
                        stream.read_exact(&mut msg[20..]).await?;
                        Ok::<_, std::io::Error>(())
                    })
                    .await;
                    match read {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return debug!(%src, error = %e, "stun tcp closed"),
                        Err(_) => return debug!(%src, "stun tcp idle, closed"),
                    }
                    let reply = shared.stun_answer(slot, src, &msg);
                    let reply = match reply {
                        Some(Ok(r)) if r.from == slot && r.to == src => r,
                        Some(Ok(_)) => {
                            return debug!(%src, "stun tcp: CHANGE-REQUEST or RESPONSE-PORT, closed");
                        }
                        Some(Err(why)) => {
                            metrics::inc(&shared.metrics.stun_dropped);
                            return debug!(%src, %why, "stun tcp message dropped, closed");
                        }
                        None => return,
                    };
                    if let Some((user, counter)) =
                        reply.authenticated.as_deref().and_then(wire::stun::unstamp)
                    {
                        let mut st = shared.state();
                        if let Some((name, nat)) = st.registry.observe_tcp(user, counter, src) {
                            info!(peer = %name, tcp = %src, mapping = ?nat.mapping,
                                allocation = ?nat.allocation, delta = nat.delta,
                                "observed tcp mapping");
                        }
                    }
                    if stream.write_all(&reply.bytes).await.is_err() {
                        return;
                    }
                    metrics::inc(&shared.metrics.stun_responses);
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                _ = serve => {}
            }
        });
    }
}

/// Serves STUN on one UDP socket. Answers leave from the address the request was sent
/// to (a socket bound to every address would otherwise let the kernel pick the source,
/// and on a host with several addresses of a family a client's firewall drops an answer
/// from another one than it asked); an answer from another slot (CHANGE-REQUEST) leaves
/// from that slot's own address.
pub(super) async fn stun_task(
    shared: Arc<Shared>,
    sockets: Arc<Vec<(Slot, BatchSocket)>>,
    index: usize,
    shutdown: CancellationToken,
) {
    let (slot, sock) = &sockets[index];
    if shared.responder.is_none() {
        return;
    }
    let mut buf = vec![0u8; wire::batch::BATCH_BUF];
    loop {
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = sock.recv(&mut buf) => match r {
                Ok(b) => b,
                // ICMP errors from earlier sends surface here on some systems; keep serving.
                Err(e) => { debug!(error = %e, "stun recv"); continue; }
            },
        };
        let src = batch.from;
        // The kernel may glue same-size datagrams of one source together: each is a
        // request of its own.
        for data in batch.datagrams(&buf) {
            let Some(reply) = shared.stun_answer(*slot, src, data) else {
                return;
            };
            let reply = match reply {
                Ok(r) => r,
                Err(why) => {
                    metrics::inc(&shared.metrics.stun_dropped);
                    debug!(%src, %why, "stun datagram dropped");
                    continue;
                }
            };
            if let Some((user, counter)) =
                reply.authenticated.as_deref().and_then(wire::stun::unstamp)
            {
                let mut st = shared.state();
                if let Some((name, true)) = st.registry.observe_udp(user, counter, src) {
                    info!(peer = %name, udp = %src, "observed udp mapping");
                }
            }
            let Some((_, out)) = sockets.iter().find(|(s, _)| *s == reply.from) else {
                continue;
            };
            let from = batch.local.filter(|_| reply.from == *slot);
            let sent = out
                .send_from(reply.to, from, &reply.bytes, reply.bytes.len())
                .await;
            match sent {
                Ok(()) => metrics::inc(&shared.metrics.stun_responses),
                Err(e) => debug!(to = %reply.to, error = %e, "stun send failed"),
            }
        }
    }
}
