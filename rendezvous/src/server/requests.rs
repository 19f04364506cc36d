//! What the rendezvous answers to each request of a registered connection: register,
//! heartbeat, list, lookup, connect (brokering) and release.

use super::*;

pub(super) fn handle_request(
    shared: &Arc<Shared>,
    conn: ConnId,
    remote: SocketAddr,
    nonce: &[u8; 32],
    req: Request,
) -> Result<Reply, ErrorFrame> {
    let now = Instant::now();
    match req {
        Request::Register(r) => {
            r.validate()?;
            let key = VerifyingKey::from_bytes(&r.key.0).map_err(|_| {
                ErrorFrame::new(
                    ErrorCode::BadSignature,
                    "public key is not a valid ed25519 point",
                )
            })?;
            key.verify_strict(
                &register_payload(nonce, &r.name),
                &DalekSignature::from_bytes(&r.signature.0),
            )
            .map_err(|_| {
                ErrorFrame::new(
                    ErrorCode::BadSignature,
                    "signature over the server nonce does not verify for this key",
                )
            })?;
            let stun = StunCredential {
                username: hex::encode(rand::random::<[u8; 12]>()),
                password: hex::encode(rand::random::<[u8; 16]>()),
            };
            let name = r.name.clone();
            let outcome = {
                let mut st = shared.state();
                let out = st.registry.register(
                    now,
                    Registration {
                        name: r.name,
                        key: r.key,
                        services: r.services,
                        lan_addrs: r.lan_addrs,
                        tcp_addr: remote,
                        conn,
                        stun: stun.clone(),
                        nat: r.nat,
                    },
                );
                if let Ok(reg) = &out
                    && let Some(old) = reg.old_conn
                    && let Some(c) = st.conns.get(&old)
                {
                    let _ = c.tx.try_send(Push::Close(ErrorFrame::new(
                        ErrorCode::Replaced,
                        format!("{name} registered again from another connection"),
                    )));
                }
                out
            };
            shared.expiry_changed.notify_one();
            match outcome {
                Ok(reg) => {
                    metrics::inc(&shared.metrics.registrations_total);
                    record_seen(shared, &name, r.key);
                    if reg.replaced {
                        info!(peer = %name, tcp = %remote, "re-registered");
                    } else {
                        info!(peer = %name, tcp = %remote, key = %r.key, "registered");
                    }
                    Ok(Reply::Registered(wire::signal::Registered {
                        observed_tcp: remote,
                        stun_username: stun.username,
                        stun_password: stun.password,
                        replaced: reg.replaced,
                    }))
                }
                Err(e) => {
                    metrics::inc(&shared.metrics.registrations_refused);
                    info!(peer = %name, tcp = %remote, error = %e, "registration refused");
                    Err(registry_error(e))
                }
            }
        }
        Request::Heartbeat { rtt_ms } => {
            let rtt = rtt_ms.map(|ms| Duration::from_millis(u64::from(ms)));
            let udp = shared
                .state()
                .registry
                .heartbeat(now, conn, rtt)
                .map_err(registry_error)?;
            Ok(Reply::HeartbeatAck { udp_addr: udp })
        }
        Request::List { after } => {
            let st = shared.state();
            may_browse(shared, &st, conn)?;
            let (page, more) = st.registry.page(after.as_deref(), wire::signal::LIST_PAGE);
            // Peers can be large (16 services with long descriptions): stop the page before
            // the reply would outgrow a frame, and let the client continue from there.
            let budget = frame::MAX_FRAME_LEN - 1024;
            let mut used = 0;
            let mut peers = Vec::with_capacity(page.len());
            for (n, e) in &page {
                let info = peer_info(now, n, e);
                used += postcard::experimental::serialized_size(&info).unwrap_or(budget);
                if used > budget && !peers.is_empty() {
                    break;
                }
                peers.push(info);
            }
            let truncated = peers.len() < page.len();
            let next = (more || truncated)
                .then(|| peers.last().map(|p| p.name.clone()))
                .flatten();
            Ok(Reply::Peers { peers, next })
        }
        Request::Lookup { name } => {
            let st = shared.state();
            may_browse(shared, &st, conn)?;
            st.registry
                .get(&name)
                .map(|e| Reply::Peer(peer_info(now, &name, e)))
                .ok_or_else(|| unknown_peer(&name))
        }
        Request::Identify { key, signature } => {
            let valid = VerifyingKey::from_bytes(&key.0).is_ok_and(|k| {
                k.verify_strict(
                    &wire::signal::identify_payload(nonce),
                    &DalekSignature::from_bytes(&signature.0),
                )
                .is_ok()
            });
            if !valid {
                return Err(ErrorFrame::new(
                    ErrorCode::BadSignature,
                    "signature over the server nonce does not verify for this key",
                ));
            }
            let mut st = shared.state();
            let names = st.registry.names_of(&key, wire::signal::LIST_PAGE);
            if names.is_empty() {
                return Err(ErrorFrame::new(
                    ErrorCode::NotRegistered,
                    format!("key {key} holds no name here; register one first"),
                ));
            }
            if let Some(c) = st.conns.get_mut(&conn) {
                c.identified = Some(key);
            }
            Ok(Reply::Identified { names })
        }
        Request::Connect { name, service } => connect(shared, conn, &name, service),
        Request::Publish(p) => super::publish::publish(shared, conn, p),
        Request::Report(r) => {
            r.validate()?;
            let mut st = shared.state();
            let me = st
                .registry
                .name_of(conn)
                .ok_or_else(|| {
                    ErrorFrame::new(ErrorCode::NotRegistered, "register before reporting")
                })?
                .to_owned();
            st.sessions
                .report(now, &me, r)
                .map_err(|e| ErrorFrame::new(ErrorCode::UnknownPeer, e.to_string()))?;
            Ok(Reply::Noted)
        }
        Request::Mapped { addr } => {
            let mut st = shared.state();
            let (name, changed) = st.registry.set_mapped(conn, addr).map_err(|e| {
                let code = match e {
                    registry::MappedError::NotRegistered => ErrorCode::NotRegistered,
                    registry::MappedError::NotObserved(_) => ErrorCode::BadRequest,
                };
                ErrorFrame::new(code, e.to_string())
            })?;
            match addr {
                _ if !changed => {}
                Some(a) => info!(peer = %name, mapped = %a, "port mapping offered to peers"),
                None => info!(peer = %name, "port mapping withdrawn"),
            }
            Ok(Reply::Noted)
        }
        Request::Release { name } => {
            shared
                .state()
                .registry
                .release(conn, &name)
                .map_err(registry_error)?;
            shared.expiry_changed.notify_one();
            record(shared, crate::names::Change::Delete(name.clone()));
            info!(peer = %name, "name released by its owner");
            Ok(Reply::Released)
        }
    }
}

pub(super) fn connect(
    shared: &Arc<Shared>,
    conn: ConnId,
    target: &str,
    service: Option<wire::signal::ServiceRef>,
) -> Result<Reply, ErrorFrame> {
    let session = SessionId(rand::random());
    let secret: [u8; 32] = rand::random();
    let mut st = shared.state();
    let me = st
        .registry
        .name_of(conn)
        .ok_or_else(|| {
            ErrorFrame::new(
                ErrorCode::NotRegistered,
                "register before asking to connect",
            )
        })?
        .to_owned();
    if me == target {
        return Err(ErrorFrame::new(
            ErrorCode::SelfConnect,
            "a peer cannot connect to itself",
        ));
    }
    let my_key = st
        .registry
        .get(&me)
        .ok_or_else(|| ErrorFrame::new(ErrorCode::NotRegistered, "registration vanished"))?
        .key;
    // Quotas: each request makes the target join a relay and probe us, so neither one
    // requester nor all of them together may ask without limit.
    let now = Instant::now();
    let by_me = st.connects_by.allow(now, &my_key);
    if !by_me || !st.connects_to.allow(now, &target.to_owned()) {
        metrics::inc(&shared.metrics.connects_refused);
        let rate = shared.config.connect_rate;
        let why = if by_me {
            format!("{target} is asked for too often right now; try again in a few seconds")
        } else {
            format!("too many connect requests from {me} (at most {rate} a second); slow down")
        };
        return Err(ErrorFrame::new(ErrorCode::Busy, why));
    }
    let me = me.as_str();
    let them = st
        .registry
        .get(target)
        .ok_or_else(|| unknown_peer(target))?;
    let Some(their_conn) = them.conn else {
        return Err(ErrorFrame::new(
            ErrorCode::PeerOffline,
            format!("{target} is registered but offline"),
        ));
    };
    let svc = broker::select_service(target, &them.services, service)?;
    let mine = st
        .registry
        .get(me)
        .ok_or_else(|| ErrorFrame::new(ErrorCode::NotRegistered, "registration vanished"))?;
    let side = |name, e: &registry::Entry| Side {
        name,
        key: e.key,
        candidates: Candidates {
            tcp: Some(e.tcp_candidate()),
            udp: e.udp_addr,
            udp_alt: e.udp_alt,
            lan: e.lan_addrs.clone(),
            nat: e.nat,
            tcp_nat: e.tcp_nat,
            mapped: e.mapped,
        },
        rtt: e.rtt,
    };
    let their = st.conns.get(&their_conn).ok_or_else(|| {
        ErrorFrame::new(
            ErrorCode::PeerOffline,
            format!("{target} just went offline"),
        )
    })?;
    let embedded = shared.relay.as_ref().map(|r| (r.addr, &r.key));
    let standalone = shared
        .least_loaded_relay()
        .zip(shared.config.shared_relay_key.as_ref());
    let relay = broker::choose_relay(
        broker::Relays {
            standalone,
            embedded,
        },
        (
            shared.config.advertised_for(mine.tcp_addr.is_ipv6()),
            shared.config.advertised_for(them.tcp_addr.is_ipv6()),
        ),
        unix_now() + shared.config.ticket_lifetime.as_secs(),
    );
    let (to_me, to_them) = broker::broker(
        session,
        secret,
        side(me, mine),
        side(target, them),
        svc,
        relay,
    );
    their
        .tx
        .try_send(Push::Frame(Box::new(ServerFrame::Broker(Box::new(
            to_them,
        )))))
        .map_err(|_| {
            ErrorFrame::new(
                ErrorCode::Busy,
                format!("{target} is not keeping up with its connection; try again"),
            )
        })?;
    let nat = |e: &registry::Entry| crate::sessions::nat_label(e.nat.or(e.tcp_nat));
    let (nat_me, nat_them) = (nat(mine), nat(them));
    st.sessions.brokered(now, me, target, nat_me, nat_them);
    metrics::inc(&shared.metrics.sessions_brokered);
    info!(%session, from = %me, to = %target, service = %to_me.service.reference(), "brokered session");
    Ok(Reply::Brokered(Box::new(to_me)))
}

/// Listing and looking up peers tells who is online where, so only members may: the token
/// (checked at hello), a registration on this connection, or a proved key holding a name.
fn may_browse(shared: &Shared, st: &State, conn: ConnId) -> Result<(), ErrorFrame> {
    let member = shared.config.token.is_some()
        || st.registry.name_of(conn).is_some()
        || st.conns.get(&conn).is_some_and(|c| c.identified.is_some());
    if member {
        return Ok(());
    }
    Err(ErrorFrame::new(
        ErrorCode::NotRegistered,
        "register (or prove a key that holds a name here) before listing or looking up peers",
    ))
}

pub(super) fn peer_info(now: Instant, name: &str, e: &registry::Entry) -> PeerInfo {
    PeerInfo {
        name: name.to_owned(),
        key: e.key,
        online: e.online(),
        services: e.services.clone(),
        tcp_addr: Some(e.tcp_addr),
        udp_addr: e.udp_addr,
        last_seen_ms: u64::try_from(now.saturating_duration_since(e.last_seen).as_millis())
            .unwrap_or(u64::MAX),
    }
}

pub(super) fn unknown_peer(name: &str) -> ErrorFrame {
    ErrorFrame::new(ErrorCode::UnknownPeer, format!("no peer named {name:?}"))
}

pub(super) fn registry_error(e: RegistryError) -> ErrorFrame {
    let code = match &e {
        RegistryError::NameTaken { .. } => ErrorCode::NameTaken,
        RegistryError::Full { .. } => ErrorCode::Busy,
        RegistryError::OtherName(_) => ErrorCode::BadRequest,
        RegistryError::NotRegistered => ErrorCode::NotRegistered,
        RegistryError::NotOwner(_) => ErrorCode::NotOwner,
        RegistryError::TooManyNames { .. } => ErrorCode::Busy,
    };
    ErrorFrame::new(code, e.to_string())
}
