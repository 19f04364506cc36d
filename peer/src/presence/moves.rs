//! Noticing that we moved: the system's interfaces, addresses or default route changed
//! (netlink, through `netwatch`'s monitor, which also re-checks after the wall clock
//! jumps, as after a suspend). The caller then registers again from the new network and
//! punches anew, keeping its sessions; a changed NAT mapping, which the STUN refresher
//! sees, is the other reason to.

use n0_watcher::Watcher as _;
use netwatch::netmon::{Monitor, State};
use tracing::{debug, warn};

/// A stream of network changes that matter.
#[derive(Debug)]
pub struct Moves {
    watch: Option<(Monitor, n0_watcher::Direct<State>)>,
    last: Option<State>,
}

impl Moves {
    /// Starts watching; without a monitor (no netlink here) it never fires, and says so.
    pub async fn start() -> Moves {
        match Monitor::new().await {
            Ok(m) => {
                let mut w = m.interface_state();
                let last = Some(w.get());
                Moves {
                    watch: Some((m, w)),
                    last,
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot watch the network for changes; a move is noticed only when paths fail");
                Moves {
                    watch: None,
                    last: None,
                }
            }
        }
    }

    /// The next change that matters (addresses or the default route), described for the
    /// log. Changes that do not (a link-local address, a down interface we never used)
    /// are skipped.
    pub async fn next(&mut self) -> String {
        let Some((_, w)) = &mut self.watch else {
            return std::future::pending().await;
        };
        loop {
            let Ok(now) = w.updated().await else {
                return std::future::pending().await;
            };
            let major = self
                .last
                .as_ref()
                .is_none_or(|old| now.is_major_change(old));
            let why = describe(self.last.as_ref(), &now);
            self.last = Some(now);
            if major {
                return why;
            }
            debug!("a network change that does not matter: {why}");
        }
    }
}

/// What changed, in a few words: the default route's interface, or the addresses.
fn describe(old: Option<&State>, now: &State) -> String {
    let route = |s: &State| {
        s.default_route_interface
            .clone()
            .unwrap_or_else(|| "none".into())
    };
    match old {
        Some(o) if route(o) != route(now) => {
            format!("default route via {} instead of {}", route(now), route(o))
        }
        _ => "addresses changed".into(),
    }
}
