//! The server's side of public entries: the `Publish` request, what an entry needs to know
//! of a name (its publication, whether it is online), and opening a relay session from a
//! public client to the exposer: two tickets, a push to the exposer, our own join, and the
//! exposer's first byte saying whether its service took the connection.

use super::*;

use wire::relay::client::{JoinError, join_tcp};
use wire::signal::public::{OPEN_OK, OPEN_REFUSED};
use wire::signal::{EntryKind, PublicOpen, Publish, Published, RelayOffer, ServiceRef};
use wire::ticket::Side as TicketSide;

use crate::public::{Names, Publication};

impl Names for Registry {
    fn key_of(&self, name: &str) -> Option<PublicKey> {
        self.get(name).map(|e| e.key)
    }
}

/// What an entry knows of a published name.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) publication: Publication,
    pub(crate) online: bool,
}

/// Why a public client could not be carried to the exposer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("the publishing machine went offline")]
    Offline,
    #[error("this server has no relay to carry public clients")]
    NoRelay,
    #[error("the publishing machine is not keeping up with its connection")]
    ExposerBusy,
    #[error("the publishing machine did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the relay did not carry the connection: {0}")]
    Relay(JoinError),
    #[error("nothing listens on the published port on the publishing machine")]
    ServiceRefused,
}

/// Our side of a public client's relay session, from [`Shared::push_open`].
struct Opening {
    mine: wire::ticket::Ticket,
    secret: wire::ticket::JoinSecret,
    /// Where we dial the relay.
    relay: SocketAddr,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// Time the exposer has to join and say whether its service took the connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Public relay tickets live this long: only the join happens within it.
const PUBLIC_TICKET_LIFETIME: u64 = 60;
/// Opens in flight at once: each holds up to two relay halves waiting, which the relay
/// bounds per IP ([`relay::defaults::MAX_WAITING_PER_IP`]).
const OPENING: usize = 24;

static OPENING_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(OPENING);

pub(super) fn publish(
    shared: &Arc<Shared>,
    conn: ConnId,
    req: Publish,
) -> Result<Reply, ErrorFrame> {
    req.validate()?;
    let (name, publication, gave_up) = {
        let st = shared.state();
        let name = st
            .registry
            .name_of(conn)
            .ok_or_else(|| ErrorFrame::new(ErrorCode::NotRegistered, "register before publishing"))?
            .to_owned();
        let entry = st
            .registry
            .get(&name)
            .ok_or_else(|| ErrorFrame::new(ErrorCode::NotRegistered, "registration vanished"))?;
        let service = entry
            .services
            .iter()
            .find(|s| s.reference() == req.service)
            .ok_or_else(|| {
                ErrorFrame::new(
                    ErrorCode::NoSuchService,
                    format!("{name} registered no service {}", req.service),
                )
            })?;
        if service.proto != wire::signal::Proto::Tcp && (req.http || req.tls) {
            return Err(ErrorFrame::new(
                ErrorCode::NotAllowed,
                format!(
                    "{}: a UDP service is published on a raw port only (--public-port)",
                    req.service
                ),
            ));
        }
        let key = entry.key;
        let mut table = shared
            .public
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (publication, gave_up) = table
            .publish(
                &shared.public.config,
                &st.registry,
                shared.config.token.is_some(),
                &name,
                key,
                &req,
            )
            .map_err(ErrorFrame::from)?;
        (name, publication, gave_up)
    };
    if let Some(p) = gave_up {
        shared.public.stop_port(p);
    }
    if let Some(port) = publication.port
        && let Err(e) = shared.public.start_port(shared, port, publication.udp)
    {
        shared
            .public
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        return Err(ErrorFrame::new(
            ErrorCode::PortTaken,
            format!("cannot listen on public port {port}: {e}"),
        ));
    }
    let published = shared.published(&name, &publication);
    info!(peer = %name, service = %publication.service, urls = ?published.urls(), "published");
    Ok(Reply::Published(published))
}

impl Shared {
    /// Where clients reach `name`'s publication.
    fn published(&self, name: &str, p: &Publication) -> Published {
        let c = &self.public.config;
        let domain = c.domain.as_deref().unwrap_or("localhost");
        let host = crate::public::host_of(name, domain);
        let with_port = |default: u16, port: u16| {
            if port == default {
                host.clone()
            } else {
                format!("{host}:{port}")
            }
        };
        let bound = |a: Option<SocketAddr>| a.map(|a| a.port()).unwrap_or(0);
        let port_host = match (&c.domain, &c.ports) {
            (Some(d), _) => d.clone(),
            (None, Some((ip, _))) if !ip.is_unspecified() => ip.to_string(),
            _ => self
                .config
                .advertise
                .first()
                .map_or_else(|| "SERVER".to_owned(), IpAddr::to_string),
        };
        Published {
            http: p
                .http
                .then(|| format!("http://{}/", with_port(80, bound(self.public_addrs.http)))),
            tls: p.tls.then(|| with_port(443, bound(self.public_addrs.tls))),
            port: p
                .port
                .filter(|_| !p.udp)
                .map(|port| format!("{port_host}:{port}")),
            udp_port: p
                .port
                .filter(|_| p.udp)
                .map(|port| format!("{port_host}:{port}")),
        }
    }

    /// The publication of `name` and whether its exposer is online.
    pub(crate) fn public_route(&self, name: &str) -> Option<Route> {
        let st = self.state();
        let table = self.public.table.lock().unwrap_or_else(|p| p.into_inner());
        let publication = table.get(&st.registry, name)?.clone();
        let online = st.registry.get(name).is_some_and(|e| e.conn.is_some());
        Some(Route {
            publication,
            online,
        })
    }

    /// The name holding public `port`.
    pub(crate) fn public_port_holder(&self, port: u16) -> Option<String> {
        let st = self.state();
        let table = self.public.table.lock().unwrap_or_else(|p| p.into_inner());
        table.on_port(&st.registry, port).map(str::to_owned)
    }

    /// Drops stale publications; returns their ports.
    pub(crate) fn public_sweep(&self) -> Vec<u16> {
        let st = self.state();
        let mut table = self.public.table.lock().unwrap_or_else(|p| p.into_inner());
        table.sweep(&st.registry)
    }

    /// Every valid publication with its URLs and whether it is online, for the dashboard.
    pub(crate) fn public_list(&self) -> Vec<(String, Published, bool, usize)> {
        let rows: Vec<(String, Publication, bool)> = {
            let st = self.state();
            let table = self.public.table.lock().unwrap_or_else(|p| p.into_inner());
            table
                .list(&st.registry)
                .into_iter()
                .map(|(n, p)| {
                    let online = st.registry.get(n).is_some_and(|e| e.conn.is_some());
                    (n.to_owned(), p.clone(), online)
                })
                .collect()
        };
        rows.into_iter()
            .map(|(n, p, online)| {
                let urls = self.published(&n, &p);
                let open = crate::public::entry::open_of(self, &n);
                (n, urls, online, open)
            })
            .collect()
    }

    /// Opens a UDP relay session from public `client` to `name`'s UDP `service`; returns our
    /// half's socket and the relay's address once both halves are in.
    pub(crate) async fn open_public_udp(
        &self,
        name: &str,
        service: ServiceRef,
        client: SocketAddr,
    ) -> Result<(UdpSocket, SocketAddr), OpenError> {
        let o = self
            .push_open(name, service, EntryKind::UdpPort, client)
            .await?;
        let join = wire::relay::client::UdpJoin::new(o.mine, o.secret);
        let any: SocketAddr = match o.relay {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(any)
            .await
            .map_err(|e| OpenError::Relay(JoinError::Io(e)))?;
        wire::relay::client::join_udp(
            &sock,
            o.relay,
            &join,
            Duration::from_millis(200),
            OPEN_TIMEOUT,
        )
        .await
        .map_err(|e| match e {
            JoinError::Timeout(..) => OpenError::Timeout(OPEN_TIMEOUT),
            e => OpenError::Relay(e),
        })?;
        Ok((sock, o.relay))
    }

    /// The exposer's push channel and the relay for a public client of `name`: where we
    /// dial it, and where the exposer does (this host's address in its family, when
    /// advertised).
    #[allow(clippy::type_complexity)]
    fn public_relay_for(
        &self,
        name: &str,
    ) -> Result<(mpsc::Sender<Push>, TicketKey, SocketAddr, SocketAddr), OpenError> {
        let st = self.state();
        let entry = st.registry.get(name).ok_or(OpenError::Offline)?;
        let conn = entry.conn.ok_or(OpenError::Offline)?;
        let tx = st.conns.get(&conn).ok_or(OpenError::Offline)?.tx.clone();
        let embedded = self.relay.as_ref().map(|r| (r.addr, &r.key));
        let standalone = self
            .least_loaded_relay()
            .zip(self.config.shared_relay_key.as_ref());
        let relay = broker::choose_public_relay(
            broker::Relays {
                standalone,
                embedded,
            },
            self.config.advertised_for(entry.tcp_addr.is_ipv6()),
        )
        .ok_or(OpenError::NoRelay)?;
        Ok((tx, relay.key.clone(), relay.for_self, relay.for_exposer))
    }

    /// Signs the two tickets of a public client's relay session and pushes the exposer
    /// its own; returns ours. Holds one of the [`OPENING`] slots until our join is done.
    async fn push_open(
        &self,
        name: &str,
        service: ServiceRef,
        entry: EntryKind,
        client: SocketAddr,
    ) -> Result<Opening, OpenError> {
        let (tx, key, for_self, for_exposer) = self.public_relay_for(name)?;
        let session = SessionId(rand::random());
        let expires = unix_now() + PUBLIC_TICKET_LIFETIME;
        let mine = key.issue(session, TicketSide::Initiator, expires);
        let theirs = key.issue(session, TicketSide::Responder, expires);
        let offer = RelayOffer {
            addr: for_exposer,
            secret: key.join_secret(&theirs),
            ticket: theirs,
        };
        let slot = timeout(OPEN_TIMEOUT, OPENING_SLOTS.acquire())
            .await
            .map_err(|_| OpenError::Timeout(OPEN_TIMEOUT))?
            .map_err(|_| OpenError::Timeout(OPEN_TIMEOUT))?;
        let open = ServerFrame::Open(Box::new(PublicOpen {
            service,
            entry,
            client,
            relay: offer,
        }));
        timeout(Duration::from_secs(5), tx.send(Push::Frame(Box::new(open))))
            .await
            .map_err(|_| OpenError::ExposerBusy)?
            .map_err(|_| OpenError::Offline)?;
        Ok(Opening {
            secret: key.join_secret(&mine),
            mine,
            relay: for_self,
            _slot: slot,
        })
    }

    /// Opens a relay session from public `client` to `name`'s `service` and returns our
    /// half once the exposer's service has taken the connection.
    pub(crate) async fn open_public(
        &self,
        name: &str,
        service: ServiceRef,
        entry: EntryKind,
        client: SocketAddr,
    ) -> Result<TcpStream, OpenError> {
        let o = self.push_open(name, service, entry, client).await?;
        let (mine, my_secret, for_self) = (o.mine.clone(), o.secret, o.relay);
        let work = async {
            let mut stream = join_tcp(for_self, mine, my_secret, OPEN_TIMEOUT)
                .await
                .map_err(|e| match e {
                    JoinError::Timeout(..) => OpenError::Timeout(OPEN_TIMEOUT),
                    e => OpenError::Relay(e),
                })?;
            let mut first = [0u8; 1];
            match stream.read(&mut first).await {
                Ok(1) if first[0] == OPEN_OK => Ok(stream),
                Ok(1) if first[0] == OPEN_REFUSED => Err(OpenError::ServiceRefused),
                _ => Err(OpenError::ServiceRefused),
            }
        };
        timeout(OPEN_TIMEOUT, work)
            .await
            .map_err(|_| OpenError::Timeout(OPEN_TIMEOUT))?
    }
}
