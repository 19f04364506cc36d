//! Timers of the registry: expiry of silent peers, and keeping the saved name bindings
//! fresh.

use super::*;

/// Every [`defaults::NAME_REFRESH`], saves that online peers were seen now: after a crash,
/// a name's retention then counts from at most that long before it.
pub(super) async fn refresh_names_task(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(defaults::NAME_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let online: Vec<(String, PublicKey)> = shared
            .state()
            .registry
            .online_bindings()
            .map(|(n, k)| (n.to_owned(), k))
            .collect();
        for (name, key) in online {
            record_seen(&shared, &name, key);
        }
    }
}

pub(super) async fn expiry_task(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let next = shared.state().registry.poll_timeout();
        let sleep = async {
            match next {
                Some(at) => sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = shared.expiry_changed.notified() => continue,
            _ = sleep => {}
        }
        let expiry = shared.config.timing.expiry();
        let mut st = shared.state();
        st.registry.handle_timeout(Instant::now());
        while let Some(ev) = st.registry.poll_event() {
            match ev {
                registry::Event::Offline { name, conn, .. } => {
                    info!(peer = %name, "went offline: no heartbeat for {expiry:?}");
                    if let Some(e) = st.registry.get(&name) {
                        record_seen(&shared, &name, e.key);
                    }
                    if let Some(c) = st.conns.get(&conn) {
                        let _ = c.tx.try_send(Push::Close(ErrorFrame::new(
                            ErrorCode::Expired,
                            format!("no heartbeat for {expiry:?}; register again"),
                        )));
                    }
                }
                registry::Event::Forgotten { name } => {
                    info!(peer = %name, "name released after long absence");
                    record(&shared, crate::names::Change::Delete(name));
                }
            }
        }
    }
}

/// Saves a name change, when bindings are kept.
pub(super) fn record(shared: &Shared, change: crate::names::Change) {
    if let Some(w) = &shared.names {
        w.record(change);
    }
}

/// Saves `name`'s binding to `key`, seen now.
pub(super) fn record_seen(shared: &Shared, name: &str, key: PublicKey) {
    record(
        shared,
        crate::names::Change::Put(crate::names::Binding {
            name: name.to_owned(),
            key,
            last_seen: unix_now(),
        }),
    );
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
