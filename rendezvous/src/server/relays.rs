//! Standalone relays registering with the rendezvous: their proof of the shared key and
//! their load reports.

use super::*;

/// A standalone relay's registration: challenge, proof with the shared ticket key, then
/// load reports until it leaves or falls silent.
pub(super) async fn relay_session(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<Rd>,
    wr: &mut Wr,
    remote: SocketAddr,
    port: u16,
    public: Option<SocketAddr>,
    shutdown: &CancellationToken,
) -> End {
    let Some(key) = shared.config.shared_relay_key.as_ref() else {
        return End::Error(ErrorFrame::new(
            ErrorCode::RelayRefused,
            "this rendezvous has no --relay-key, so standalone relays cannot register",
        ));
    };
    let nonce: [u8; 32] = rand::random();
    if let Err(end) = write_frame(wr, &ServerFrame::Relay(RelayReply::Challenge { nonce })).await {
        return end;
    }
    match timeout(shared.config.hello_timeout, reader.read::<ClientFrame>()).await {
        Ok(Ok(ClientFrame::Relay(RelayMsg::Proof { mac }))) => {
            if !constant_time_eq(&mac, &relay::announce::proof(key, &nonce, port)) {
                warn!(%remote, "relay refused: its key differs from --relay-key");
                return End::Error(ErrorFrame::new(
                    ErrorCode::RelayRefused,
                    "proof does not verify: the relay's key differs from this rendezvous' --relay-key",
                ));
            }
        }
        Ok(Ok(_)) => {
            return End::Error(ErrorFrame::new(
                ErrorCode::BadRequest,
                "expected the relay's proof",
            ));
        }
        Ok(Err(e)) => return read_failure(e),
        Err(_) => {
            return End::Error(ErrorFrame::new(ErrorCode::Timeout, "no proof in time"));
        }
    }
    let advertised = public.unwrap_or_else(|| SocketAddr::new(remote.ip(), port));
    let id = shared
        .next_relay
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .relays
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, (advertised, 0));
    info!(relay = %advertised, "relay registered");
    let end = match write_frame(wr, &ServerFrame::Relay(RelayReply::Accepted { advertised })).await
    {
        Err(end) => end,
        Ok(()) => loop {
            let silent = relay::announce::LOAD_INTERVAL * 3;
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break End::Error(shutting_down()),
                m = timeout(silent, reader.read::<ClientFrame>()) => m,
            };
            match msg {
                Ok(Ok(ClientFrame::Relay(RelayMsg::Load { sessions }))) => {
                    if let Some(r) = shared
                        .relays
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&id)
                    {
                        r.1 = sessions;
                    }
                }
                Ok(Ok(_)) => {
                    break End::Error(ErrorFrame::new(
                        ErrorCode::BadRequest,
                        "expected a load report",
                    ));
                }
                Ok(Err(e)) => break read_failure(e),
                Err(_) => {
                    break End::Error(ErrorFrame::new(
                        ErrorCode::Timeout,
                        format!("relay silent for {silent:?}"),
                    ));
                }
            }
        },
    };
    shared
        .relays
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    info!(relay = %advertised, "relay left");
    end
}
