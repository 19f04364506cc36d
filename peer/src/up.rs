//! `peer up`: every `[[expose]]` and `[[reach]]` of the home's `config.toml` served by one
//! process with one identity, as frp serves its `[[proxies]]`. SIGHUP reloads the lists:
//! what left is stopped, what came is started, and what stayed (with its sessions and
//! open connections) is left alone. Deciding what to stop and start is [`plan`], pure; the
//! rest runs one task per unit.
//!
//! ```toml
//! rendezvous = "rv.example.org:7000#KEY"
//!
//! [[expose]]
//! port = 7274
//! name = "pc-home"
//!
//! [[expose]]
//! port = 5353
//! name = "pc-dns"
//! proto = "udp"
//!
//! [[reach]]
//! name = "nas"
//! local = "127.0.0.1:8080"
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wire::signal::{Proto, PublicKey, Service};

use crate::expose::{self, Expose};
use crate::home::Home;
use crate::presence::signal::Signaling;
use crate::presence::trust::Trust;
use crate::reach::{Reach, Reacher};
use crate::status::Board;
use crate::transport::Transport;

/// `tcp` or `udp`, as `proto = "udp"` in an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryProto {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// One `[[expose]]`: `peer expose PORT --name NAME [--udp] [--to HOST] [--allow KEY]...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeEntry {
    /// The service's port.
    pub port: u16,
    /// The name to register [default: this machine's hostname].
    pub name: Option<String>,
    /// `tcp` (the default) or `udp`.
    #[serde(default)]
    pub proto: EntryProto,
    /// The host the service runs on [default: 127.0.0.1].
    pub to: Option<String>,
    /// Keys allowed in [default: any brokered peer].
    #[serde(default)]
    pub allow: Vec<String>,
    /// Publish at http://NAME.DOMAIN/ of the rendezvous' public HTTP entry (`--public`).
    #[serde(default)]
    pub public: bool,
    /// Publish by TLS server name (`--public-tls`).
    #[serde(default)]
    pub public_tls: bool,
    /// Publish on a raw TCP port of the rendezvous: a port, or 0 for any (`--public-port`).
    pub public_port: Option<u16>,
    /// `USER:PASS` or `bearer:SECRET` for the HTTP entry (`--public-auth`).
    pub public_auth: Option<String>,
}

/// One `[[reach]]`: `peer reach NAME [--service PORT] [--local ADDR:PORT] [--udp]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReachEntry {
    /// The peer's name.
    pub name: String,
    /// Which of its services (port) [default: its only one].
    pub service: Option<u16>,
    /// Where to listen [default: 127.0.0.1:<service port>].
    pub local: Option<SocketAddr>,
    /// `tcp` (the default) or `udp`.
    #[serde(default)]
    pub proto: EntryProto,
}

/// What `peer up` runs: one expose or one reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Unit {
    /// An `[[expose]]`, its name filled in.
    Expose(ExposeEntry),
    /// A `[[reach]]`.
    Reach(ReachEntry),
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Expose(e) => write!(
                f,
                "expose {}{} as {}",
                e.port,
                if e.proto == EntryProto::Udp {
                    "/udp"
                } else {
                    ""
                },
                e.name.as_deref().unwrap_or("?")
            ),
            Unit::Reach(r) => write!(
                f,
                "reach {}{}",
                r.name,
                r.service.map(|p| format!(" {p}")).unwrap_or_default()
            ),
        }
    }
}

/// The units of a config file's lists, names filled in with `default_name`; an error
/// when two would register one name (they would take it from each other).
pub fn units(
    expose: &[ExposeEntry],
    reach: &[ReachEntry],
    default_name: &str,
) -> Result<Vec<Unit>, String> {
    let mut out = Vec::new();
    let mut names: HashMap<String, u16> = HashMap::new();
    for e in expose {
        let name = e.name.clone().unwrap_or_else(|| default_name.to_owned());
        wire::signal::validate_name(&name).map_err(|why| format!("[[expose]] {name:?}: {why}"))?;
        if let Some(port) = names.insert(name.clone(), e.port) {
            return Err(format!(
                "two [[expose]] with the name {name:?} (ports {port} and {}): give each its \
                 own name",
                e.port
            ));
        }
        out.push(Unit::Expose(ExposeEntry {
            name: Some(name),
            ..e.clone()
        }));
    }
    for r in reach {
        wire::signal::validate_name(&r.name)
            .map_err(|why| format!("[[reach]] {:?}: {why}", r.name))?;
        let u = Unit::Reach(r.clone());
        if out.contains(&u) {
            return Err(format!("[[reach]] {:?} given twice", r.name));
        }
        out.push(u);
    }
    Ok(out)
}

/// The name a reaching side registers under by default: `ROLE-<key prefix>-TARGET`, one
/// per target, so processes (or units) of one home that reach different peers do not take
/// one name from each other.
pub fn own_name(role: &str, key: &SigningKey, target: &str) -> String {
    let mut n = format!(
        "{role}-{}-{target}",
        &hex::encode(key.verifying_key().to_bytes())[..12]
    );
    n.truncate(wire::signal::MAX_NAME_LEN);
    n
}

/// What a reload does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Running units no longer wanted (or changed): stop them.
    pub stop: Vec<Unit>,
    /// Wanted units not running (new, changed, or ended): start them.
    pub start: Vec<Unit>,
}

/// From the units running to the units wanted. A unit whose settings changed is a
/// different unit: the old one stops and the new one starts; an unchanged one is left
/// alone, sessions and all.
pub fn plan(running: &[Unit], wanted: &[Unit]) -> Plan {
    Plan {
        stop: running
            .iter()
            .filter(|u| !wanted.contains(u))
            .cloned()
            .collect(),
        start: wanted
            .iter()
            .filter(|u| !running.contains(u))
            .cloned()
            .collect(),
    }
}

/// Which lists a run serves: `peer up` both, `peer expose` with no port the `[[expose]]`
/// list only, `peer reach` with no name the `[[reach]]` list only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lists {
    /// Both.
    Both,
    /// `[[expose]]` only.
    Expose,
    /// `[[reach]]` only.
    Reach,
}

/// What every unit shares.
#[derive(Debug, Clone)]
pub struct Up {
    /// The home (identity, pins, config.toml).
    pub home: Home,
    /// The identity.
    pub key: Arc<SigningKey>,
    /// The rendezvous, `HOST:PORT`.
    pub rendezvous: String,
    /// Its token, if it needs one.
    pub token: Option<String>,
    /// How its key is checked.
    pub trust: Trust,
    /// Ask the gateway to map the UDP endpoint's port.
    pub port_mapping: bool,
    /// Name of an `[[expose]]` without one.
    pub default_name: String,
    /// Where `peer status` finds the sessions.
    pub board: Board,
    /// Which lists to serve.
    pub lists: Lists,
}

impl Up {
    /// Serves the units of `config.toml` until `shutdown`, reloading them whenever
    /// `reload` is notified (the binary notifies it on SIGHUP).
    pub async fn run(
        self,
        reload: Arc<tokio::sync::Notify>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut running: HashMap<Unit, (CancellationToken, JoinHandle<()>)> = HashMap::new();
        let mut first = true;
        loop {
            match self.wanted() {
                Ok(wanted) => {
                    // A unit that ended (its name held elsewhere, say) counts as not running,
                    // so a reload tries it again.
                    running.retain(|_, (_, task)| !task.is_finished());
                    let now: Vec<Unit> = running.keys().cloned().collect();
                    let p = plan(&now, &wanted);
                    for u in &p.stop {
                        if let Some((stop, _)) = running.remove(u) {
                            info!(unit = %u, "stopping {u}: no longer in config.toml");
                            stop.cancel();
                        }
                    }
                    for u in p.start {
                        let stop = shutdown.child_token();
                        let task = tokio::spawn(self.clone().unit(u.clone(), stop.clone()));
                        running.insert(u, (stop, task));
                    }
                    if first && running.is_empty() {
                        anyhow::bail!(
                            "nothing to run: {} has no [[expose]] or [[reach]]",
                            self.home.dir().join("config.toml").display()
                        );
                    }
                    info!(units = running.len(), "serving {} units", running.len());
                }
                Err(e) if first => return Err(e),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "config.toml not reloaded; the running units go on")
                }
            }
            first = false;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = reload.notified() => info!("reloading config.toml"),
            }
        }
        for (_, (_, task)) in running {
            let _ = task.await;
        }
        Ok(())
    }

    fn wanted(&self) -> anyhow::Result<Vec<Unit>> {
        let file = self.home.config()?;
        let (expose, reach) = match self.lists {
            Lists::Both => (&file.expose[..], &file.reach[..]),
            Lists::Expose => (&file.expose[..], &[][..]),
            Lists::Reach => (&[][..], &file.reach[..]),
        };
        units(expose, reach, &self.default_name).map_err(|why| {
            anyhow::anyhow!("{}: {why}", self.home.dir().join("config.toml").display())
        })
    }

    /// Runs one unit until `stop`; its failure is logged, not fatal to the others.
    async fn unit(self, unit: Unit, stop: CancellationToken) {
        info!(unit = %unit, "starting {unit}");
        let result = match &unit {
            Unit::Expose(e) => self.expose(e, stop).await,
            Unit::Reach(r) => self.reach(r, stop).await,
        };
        if let Err(e) = result {
            warn!(unit = %unit, error = %format!("{e:#}"), "{unit} stopped");
        }
    }

    async fn expose(&self, e: &ExposeEntry, stop: CancellationToken) -> anyhow::Result<()> {
        let name = e.name.clone().unwrap_or_else(|| self.default_name.clone());
        let _held = self
            .home
            .hold_name(&name, &format!("peer up: expose {} as {name}", e.port))?;
        let allow = e
            .allow
            .iter()
            .map(|k| {
                k.parse::<PublicKey>()
                    .map_err(|why| anyhow::anyhow!("allow {k:?}: {why}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let target = expose::target(e.to.as_deref().unwrap_or("127.0.0.1"), e.port);
        let cfg = Expose {
            signaling: Signaling {
                rendezvous: self.rendezvous.clone(),
                token: self.token.clone(),
                name,
                trust: self.trust.clone(),
                port_mapping: self.port_mapping,
                services: vec![Service {
                    port: e.port,
                    proto: match e.proto {
                        EntryProto::Tcp => Proto::Tcp,
                        EntryProto::Udp => Proto::Udp,
                    },
                    description: format!("exposed by chuantou from {target}"),
                }],
            },
            target,
            allow,
            udp: e.proto == EntryProto::Udp,
            transport: Transport::Auto,
            no_relay: false,
            max_sessions: crate::defaults::MAX_SESSIONS,
            public: expose::public_request(
                wire::signal::ServiceRef {
                    port: e.port,
                    proto: if e.proto == EntryProto::Udp {
                        Proto::Udp
                    } else {
                        Proto::Tcp
                    },
                },
                e.public,
                e.public_tls,
                e.public_port,
                e.public_auth.as_deref(),
            )?,
        };
        expose::run(cfg, (*self.key).clone(), self.board.clone(), stop).await
    }

    async fn reach(&self, r: &ReachEntry, stop: CancellationToken) -> anyhow::Result<()> {
        let me = own_name("reach", &self.key, &r.name);
        let _held = self
            .home
            .hold_name(&me, &format!("peer up: reach {}", r.name))?;
        let cfg = Reach {
            signaling: Signaling {
                port_mapping: self.port_mapping,
                ..Signaling::reaching(
                    self.rendezvous.clone(),
                    self.token.clone(),
                    me,
                    self.trust.clone(),
                )
            },
            target: r.name.clone(),
            service: r.service,
            local: r.local,
            udp: r.proto == EntryProto::Udp,
            transport: Transport::Auto,
            no_relay: false,
        };
        let reacher = Reacher::bind(
            cfg,
            self.home.clone(),
            (*self.key).clone(),
            self.board.clone(),
            stop,
        )
        .await?;
        reacher.run().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(port: u16, name: Option<&str>) -> ExposeEntry {
        ExposeEntry {
            port,
            name: name.map(str::to_owned),
            proto: EntryProto::Tcp,
            to: None,
            allow: vec![],
            public: false,
            public_tls: false,
            public_port: None,
            public_auth: None,
        }
    }

    fn re(name: &str) -> ReachEntry {
        ReachEntry {
            name: name.into(),
            service: None,
            local: None,
            proto: EntryProto::Tcp,
        }
    }

    #[test]
    fn names_are_filled_in_and_a_name_used_twice_is_refused() {
        let u = units(
            &[ex(7274, None), ex(22, Some("pc-ssh"))],
            &[re("nas")],
            "pc",
        )
        .unwrap();
        assert_eq!(
            u,
            [
                Unit::Expose(ex(7274, Some("pc"))),
                Unit::Expose(ex(22, Some("pc-ssh"))),
                Unit::Reach(re("nas")),
            ]
        );
        let twice = units(&[ex(7274, None), ex(8080, Some("pc"))], &[], "pc").unwrap_err();
        assert!(
            twice.contains("two [[expose]] with the name \"pc\""),
            "{twice}"
        );
        let bad = units(&[ex(1, Some("no spaces"))], &[], "pc").unwrap_err();
        assert!(bad.contains("[[expose]]"), "{bad}");
        assert!(units(&[], &[re("nas"), re("nas")], "pc").is_err());
    }

    #[test]
    fn a_reload_stops_what_left_starts_what_came_and_leaves_the_rest() {
        let a = Unit::Expose(ex(7274, Some("pc")));
        let b = Unit::Reach(re("nas"));
        let c = Unit::Expose(ex(22, Some("pc-ssh")));
        // b's port changes: a new unit, the old one stops.
        let b2 = Unit::Reach(ReachEntry {
            service: Some(8080),
            ..re("nas")
        });
        let p = plan(&[a.clone(), b.clone()], &[a.clone(), b2.clone(), c.clone()]);
        assert_eq!(p.stop, [b]);
        assert_eq!(p.start, [b2, c]);
        let same = [a];
        assert_eq!(plan(&same, &same), Plan::default());
    }
}
