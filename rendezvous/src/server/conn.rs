//! One signaling connection: TLS handshake, hello, then a peer's requests and the pushes
//! other tasks send it, until it closes.

use super::*;

/// Why a connection ended, for the log and for the last frame sent.
pub(super) enum End {
    /// The peer closed.
    Closed,
    /// We close with this error frame.
    Error(ErrorFrame),
    /// The socket failed; nothing more can be sent.
    Io(std::io::Error),
}

pub(super) async fn serve_conn(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    remote: SocketAddr,
    shutdown: CancellationToken,
) {
    let pending = Pending {
        shared,
        ip: remote.ip(),
    };
    // The TLS handshake counts against the hello timeout and the per-IP pending limit.
    let started = tokio::time::Instant::now();
    let hello_timeout = shared.config.hello_timeout;
    let handshake = async {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            // A TLS record of type handshake (22); anything else is no TLS client.
            Ok(1) if first[0] == 22 => {}
            Ok(1) => {
                metrics::inc(&shared.metrics.frames_rejected);
                debug!(%remote, "plaintext client on the TLS signaling port");
                refuse_plaintext(&mut stream).await;
                return None;
            }
            _ => return None,
        }
        match tokio_rustls::TlsAcceptor::from(shared.tls.clone())
            .accept(stream)
            .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                metrics::inc(&shared.metrics.frames_rejected);
                debug!(%remote, error = %e, "tls handshake failed");
                None
            }
        }
    };
    let tls = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = timeout(hello_timeout, handshake) => r.ok().flatten(),
    };
    let Some(tls) = tls else { return };
    let (rd, mut wr) = tokio::io::split(tls);
    let mut reader = FrameReader::new(rd);
    let left = hello_timeout.saturating_sub(started.elapsed());
    let greeted = hello(shared, &mut reader, &mut wr, remote, &shutdown, left).await;
    drop(pending);
    let end = match greeted {
        Ok(Greeting::Peer(nonce)) => {
            session(shared, &mut reader, &mut wr, remote, nonce, &shutdown).await
        }
        Ok(Greeting::Relay { port, public }) => {
            relay_session(
                shared,
                &mut reader,
                &mut wr,
                remote,
                port,
                public,
                &shutdown,
            )
            .await
        }
        Err(end) => end,
    };
    match end {
        End::Closed => debug!(%remote, "connection closed by peer"),
        End::Io(e) => debug!(%remote, error = %e, "connection failed"),
        End::Error(err) => {
            debug!(%remote, %err, "closing connection");
            if !matches!(
                err.code,
                ErrorCode::ShuttingDown | ErrorCode::Replaced | ErrorCode::Expired
            ) {
                metrics::inc(&shared.metrics.frames_rejected);
            }
            let sent = timeout(
                defaults::WRITE_TIMEOUT,
                frame::write(&mut wr, &ServerFrame::Error(err)),
            )
            .await;
            if matches!(sent, Ok(Ok(()))) {
                // Let the error frame arrive: unread input at close would turn it into RST.
                let _ = timeout(defaults::WRITE_TIMEOUT, wr.shutdown()).await;
                frame::drain(reader.get_mut()).await;
                return;
            }
        }
    }
    let _ = timeout(defaults::WRITE_TIMEOUT, wr.shutdown()).await;
}

/// A client that speaks plaintext to a TLS-only server (an older peer or relay) gets one
/// plaintext error frame saying so, instead of a TLS alert it cannot read.
pub(super) async fn refuse_plaintext(stream: &mut TcpStream) {
    let err = ServerFrame::Error(ErrorFrame::new(
        ErrorCode::VersionMismatch,
        "this rendezvous speaks signaling over TLS 1.3 only; upgrade the peer or relay",
    ));
    let _ = timeout(defaults::WRITE_TIMEOUT, frame::write(stream, &err)).await;
    let _ = timeout(
        defaults::WRITE_TIMEOUT,
        tokio::io::AsyncWriteExt::shutdown(stream),
    )
    .await;
}

/// Maps a frame read failure to how the connection ends.
pub(super) fn read_failure(e: FrameError) -> End {
    match e {
        FrameError::Closed => End::Closed,
        FrameError::Io(e) => End::Io(e),
        FrameError::TooLarge { len, max } => End::Error(ErrorFrame::new(
            ErrorCode::FrameTooLarge,
            format!("frame of {len} bytes exceeds the {max}-byte limit"),
        )),
        e => End::Error(ErrorFrame::new(ErrorCode::BadFrame, e.to_string())),
    }
}

/// Who said hello.
pub(super) enum Greeting {
    /// A peer; the nonce it must sign to register.
    Peer([u8; 32]),
    /// A standalone relay registering.
    Relay {
        port: u16,
        public: Option<SocketAddr>,
    },
}

pub(super) async fn hello(
    shared: &Shared,
    reader: &mut FrameReader<Rd>,
    wr: &mut Wr,
    remote: SocketAddr,
    shutdown: &CancellationToken,
    within: Duration,
) -> Result<Greeting, End> {
    let cfg = &shared.config;
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Err(End::Error(shutting_down())),
        r = timeout(within, reader.read::<ClientFrame>()) => r,
    };
    let hello = match first {
        Err(_) => {
            return Err(End::Error(ErrorFrame::new(
                ErrorCode::Timeout,
                format!("no hello within {:?}", cfg.hello_timeout),
            )));
        }
        Ok(Err(e)) => return Err(read_failure(e)),
        Ok(Ok(ClientFrame::Hello(h))) => h,
        Ok(Ok(ClientFrame::Relay(RelayMsg::Hello {
            version,
            port,
            public,
        }))) => {
            if version != relay::announce::ANNOUNCE_VERSION {
                return Err(End::Error(ErrorFrame::new(
                    ErrorCode::VersionMismatch,
                    format!(
                        "this rendezvous speaks relay registration version {}, the relay {version}",
                        relay::announce::ANNOUNCE_VERSION
                    ),
                )));
            }
            return Ok(Greeting::Relay { port, public });
        }
        Ok(Ok(ClientFrame::Request { .. } | ClientFrame::Relay(_))) => {
            return Err(End::Error(ErrorFrame::new(
                ErrorCode::HelloExpected,
                "the first frame must be hello",
            )));
        }
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(End::Error(ErrorFrame::new(
            ErrorCode::VersionMismatch,
            format!(
                "this server speaks protocol {PROTOCOL_VERSION}, the client {}; upgrade the older side",
                hello.version
            ),
        )));
    }
    if let Some(want) = &cfg.token
        && !hello
            .token
            .as_deref()
            .is_some_and(|got| constant_time_eq(got.as_bytes(), want.as_bytes()))
    {
        return Err(End::Error(ErrorFrame::new(
            ErrorCode::Unauthorized,
            if hello.token.is_some() {
                "wrong token"
            } else {
                "this server needs a token (--token or CHUANTOU_TOKEN)"
            },
        )));
    }
    let nonce: [u8; 32] = rand::random();
    let welcome = ServerFrame::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        nonce,
        heartbeat_interval_ms: u32::try_from(cfg.timing.heartbeat_interval.as_millis())
            .unwrap_or(u32::MAX),
        software: crate::stun::SOFTWARE.into(),
        // Advertised, else bound; bound to every address, the unspecified IP tells the
        // client "the host you reached me on" (wire::signal::same_host).
        stun: stun_primary(shared).map(|primary| match cfg.advertised_for(remote.ip().is_ipv6()) {
            Some(ip) => SocketAddr::new(ip, primary.port()),
            None => primary,
        }),
        // The other family, where the responder's one socket takes both and the operator
        // said this host's address there.
        stun_alt: stun_primary(shared)
            .filter(|p| p.is_ipv6() && p.ip().is_unspecified())
            .and_then(|p| {
                cfg.advertised_for(!remote.ip().is_ipv6())
                    .map(|ip| SocketAddr::new(ip, p.port()))
            }),
        // A one-IP server's second STUN port (same host as `stun`).
        stun_port2: shared.responder.as_ref().and_then(|r| {
            let l = r.lock().unwrap_or_else(|p| p.into_inner()).layout();
            l.port2.filter(|_| l.alternate.is_none())
        }),
    });
    write_frame(wr, &welcome).await?;
    Ok(Greeting::Peer(nonce))
}

/// Where the STUN responder is bound (its primary slot), if it runs.
fn stun_primary(shared: &Shared) -> Option<SocketAddr> {
    shared
        .responder
        .as_ref()
        .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).layout().primary)
}

pub(super) async fn write_frame(wr: &mut Wr, f: &ServerFrame) -> Result<(), End> {
    match timeout(defaults::WRITE_TIMEOUT, frame::write(wr, f)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(FrameError::Io(e))) => Err(End::Io(e)),
        Ok(Err(e)) => Err(End::Io(std::io::Error::other(e))),
        Err(_) => Err(End::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer does not read",
        ))),
    }
}

pub(super) fn shutting_down() -> ErrorFrame {
    ErrorFrame::new(
        ErrorCode::ShuttingDown,
        "server shutting down; reconnect later",
    )
}

pub(super) async fn session(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<Rd>,
    wr: &mut Wr,
    remote: SocketAddr,
    nonce: [u8; 32],
    shutdown: &CancellationToken,
) -> End {
    let (tx, mut rx) = mpsc::channel(PUSH_QUEUE);
    let conn = {
        let mut st = shared.state();
        let id = st.next_conn;
        st.next_conn += 1;
        st.conns.insert(
            id,
            Conn {
                tx,
                identified: None,
            },
        );
        id
    };
    let end = session_loop(shared, reader, wr, remote, nonce, conn, &mut rx, shutdown).await;
    let name = {
        let mut st = shared.state();
        st.conns.remove(&conn);
        let name = st.registry.disconnect(Instant::now(), conn);
        if let Some(key) = name
            .as_deref()
            .and_then(|n| st.registry.get(n))
            .map(|e| e.key)
        {
            record_seen(shared, name.as_deref().unwrap_or_default(), key);
        }
        name
    };
    if let Some(name) = name {
        shared.expiry_changed.notify_one();
        info!(peer = %name, %remote, "went offline: connection closed");
    }
    end
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn session_loop(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<Rd>,
    wr: &mut Wr,
    remote: SocketAddr,
    nonce: [u8; 32],
    conn: ConnId,
    rx: &mut mpsc::Receiver<Push>,
    shutdown: &CancellationToken,
) -> End {
    // Twice the registry's expiry: a registered peer that falls silent is closed by the
    // registry ("expired"); this is only the backstop for connections that never register.
    let idle = shared.config.timing.expiry() * 2;
    let mut last_frame = Instant::now();
    let mut frame_started: Option<Instant> = None;
    loop {
        let deadline = match frame_started {
            Some(t) => t + shared.config.frame_timeout,
            None => last_frame + idle,
        };
        let step = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return End::Error(shutting_down()),
            push = rx.recv() => match push {
                Some(Push::Frame(f)) => {
                    if let Err(end) = write_frame(wr, &f).await {
                        return end;
                    }
                    continue;
                }
                Some(Push::Close(e)) => return End::Error(e),
                None => return End::Error(shutting_down()),
            },
            _ = sleep_until(deadline.into()) => {
                return End::Error(match frame_started {
                    Some(_) => ErrorFrame::new(ErrorCode::Timeout, format!(
                        "frame incomplete after {:?}", shared.config.frame_timeout)),
                    None => ErrorFrame::new(ErrorCode::Timeout, format!(
                        "silent for {:?}; heartbeat every {:?}",
                        idle, shared.config.timing.heartbeat_interval)),
                });
            }
            r = reader.step() => r,
        };
        let body = match step {
            Ok(None) => {
                frame_started.get_or_insert_with(Instant::now);
                continue;
            }
            Ok(Some(body)) => body,
            Err(e) => return read_failure(e),
        };
        frame_started = None;
        last_frame = Instant::now();
        let (id, req) = match frame::decode::<ClientFrame>(&body) {
            Ok(ClientFrame::Request { id, body }) => (id, body),
            Ok(ClientFrame::Hello(_)) => {
                return End::Error(ErrorFrame::new(
                    ErrorCode::HelloExpected,
                    "hello sent twice",
                ));
            }
            Ok(ClientFrame::Relay(_)) => {
                return End::Error(ErrorFrame::new(
                    ErrorCode::BadRequest,
                    "relay messages belong on a relay registration",
                ));
            }
            Err(e) => return read_failure(e),
        };
        let result = handle_request(shared, conn, remote, &nonce, req);
        if let Err(end) = write_frame(wr, &ServerFrame::Response { id, body: result }).await {
            return end;
        }
    }
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
