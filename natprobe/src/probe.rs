//! The probing shell: STUN Binding transactions over UDP (and TCP) against one RFC 5780
//! server or two plain ones, filling the observations that `classify` turns into verdicts.
//!
//! Order matters on a sequential NAT, where every new mapping takes the next port:
//! - Test I on the main socket (no answer at all: UDP is blocked, stop);
//! - fresh mappings one after another (port allocation), nothing else running;
//! - then together, each on its own socket so no answer is confused with another's:
//!   Tests II and III (mapping), the two CHANGE-REQUEST tests (filtering), hairpin;
//! - the mapping lifetime search (`--lifetime`), then TCP (`--tcp`).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tracing::debug;
use wire::stun::{
    BindingError, BindingRequest, BindingResponse, RequestOptions, binding_request_with,
    parse_response,
};

use crate::classify::{self, Lifetime, Mapping, MappingObservations};
use crate::defaults::{self, Timing};
use crate::report::{Report, TcpReport, UdpReport};

/// What to probe.
#[derive(Debug, Clone)]
pub struct Config {
    /// One RFC 5780 server, or up to two plain ones (the first is primary).
    pub servers: Vec<SocketAddr>,
    /// Probe TCP mapping too.
    pub tcp: bool,
    /// Search for the UDP mapping lifetime, up to this long.
    pub lifetime: Option<Duration>,
    /// Retransmission timing.
    pub timing: Timing,
    /// An IPv6 STUN server for the `ipv6` section, if any.
    pub server6: Option<SocketAddr>,
    /// Ask the gateway about port mapping (the `port_mapping` section).
    pub port_mapping: bool,
}

/// Why probing could not even start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// No server was given.
    #[error("no STUN server: give --server HOST:PORT or set CHUANTOU_RENDEZVOUS")]
    NoServer,
    /// A local socket could not be made.
    #[error("{what}: {source}")]
    Socket {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A request could not be encoded (a bug, not a network condition).
    #[error("building a STUN request: {0}")]
    Build(#[from] BindingError),
}

fn sock_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProbeError {
    let what = what.into();
    move |source| ProbeError::Socket { what, source }
}

/// How one transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A success response, and where it came from.
    Answer(BindingResponse, SocketAddr),
    /// Our own request came back (hairpin).
    Echoed,
    /// The server answered with an error (e.g. 420 for an attribute it does not know).
    Refused(String),
    /// Nothing within the retransmission schedule.
    Silent,
}

fn request(opts: RequestOptions<'_>) -> Result<BindingRequest, ProbeError> {
    Ok(binding_request_with(opts)?)
}

/// One transaction: `req` to `dest` from `send`, answer awaited on `recv` (and errors on
/// `send` too), retransmitted per RFC 8489 until answered or given up.
async fn exchange(
    send: &UdpSocket,
    recv: &UdpSocket,
    dest: SocketAddr,
    req: &BindingRequest,
    echo: bool,
    timing: Timing,
) -> Outcome {
    let mut retx = crate::transaction::Retransmit::new(Instant::now(), timing);
    let same = std::ptr::eq(send, recv);
    let mut buf = [0u8; 1500];
    let mut buf2 = [0u8; 1500];
    loop {
        let now = Instant::now();
        if retx.poll_transmit(now) {
            if let Err(e) = send.send_to(&req.bytes, dest).await {
                debug!(%dest, error = %e, "stun send failed");
            }
        }
        if retx.failed(now) {
            return Outcome::Silent;
        }
        let got = tokio::select! {
            _ = tokio::time::sleep_until(retx.poll_timeout().into()) => None,
            r = recv.recv_from(&mut buf) => r.ok().map(|(n, from)| (&buf[..n], wire::dual::canonical(from), true)),
            r = send.recv_from(&mut buf2), if !same => r.ok().map(|(n, from)| (&buf2[..n], wire::dual::canonical(from), false)),
        };
        let Some((data, from, on_recv)) = got else {
            continue;
        };
        if echo {
            if on_recv && data == req.bytes.as_slice() {
                return Outcome::Echoed;
            }
            continue;
        }
        match parse_response(data, &req.tid, None) {
            Ok(resp) if on_recv => return Outcome::Answer(resp, from),
            Ok(_) => {}
            Err(BindingError::Malformed | BindingError::OtherTransaction) => {}
            Err(e) => return Outcome::Refused(e.to_string()),
        }
    }
}

async fn bind_udp(ip: IpAddr) -> Result<UdpSocket, ProbeError> {
    UdpSocket::bind((ip, 0))
        .await
        .map_err(sock_err(format!("binding a UDP socket on {ip}")))
}

/// The local IP the system routes towards `server` from.
fn route_ip(server: SocketAddr) -> Result<IpAddr, ProbeError> {
    let unspecified: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(unspecified).map_err(sock_err("binding a UDP socket"))?;
    s.connect(server)
        .map_err(sock_err(format!("finding a route to {server}")))?;
    Ok(s.local_addr()
        .map_err(sock_err("reading a local address"))?
        .ip())
}

/// A fresh socket's Test I: its local and mapped addresses, or `None` without an answer.
async fn fresh_mapping(
    ip: IpAddr,
    server: SocketAddr,
    timing: Timing,
) -> Result<Option<(UdpSocket, SocketAddr, Instant)>, ProbeError> {
    let s = bind_udp(ip).await?;
    let req = request(RequestOptions::default())?;
    Ok(match exchange(&s, &s, server, &req, false, timing).await {
        Outcome::Answer(r, _) => Some((s, r.mapped, Instant::now())),
        _ => None,
    })
}

/// A CHANGE-REQUEST filtering test on a socket that talks to the primary address only:
/// `Some(answered)`, or `None` when the test means nothing (no Test I answer, or the
/// server answered from the address we sent to, ignoring CHANGE-REQUEST).
async fn filtering_test(
    ip: IpAddr,
    primary: SocketAddr,
    change: (bool, bool),
    timing: Timing,
    notes: &std::sync::Mutex<Vec<String>>,
) -> Result<Option<bool>, ProbeError> {
    let Some((s, _, _)) = fresh_mapping(ip, primary, timing).await? else {
        return Ok(None);
    };
    let req = request(RequestOptions {
        change: Some(change),
        ..Default::default()
    })?;
    Ok(match exchange(&s, &s, primary, &req, false, timing).await {
        Outcome::Answer(_, from) if from == primary => {
            let mut n = notes.lock().unwrap_or_else(|e| e.into_inner());
            n.push(format!(
                "the server answered a CHANGE-REQUEST from {from}, the address asked: it \
                 ignores CHANGE-REQUEST, so filtering is unknown"
            ));
            None
        }
        Outcome::Answer(..) => Some(true),
        Outcome::Silent => Some(false),
        Outcome::Refused(why) => {
            let mut n = notes.lock().unwrap_or_else(|e| e.into_inner());
            n.push(format!("the server refused CHANGE-REQUEST ({why})"));
            None
        }
        Outcome::Echoed => None,
    })
}

/// OTHER-ADDRESS, when it is useful: both IP and port must differ (RFC 5780 §4.1).
fn usable_other(other: Option<SocketAddr>, primary: SocketAddr) -> Option<SocketAddr> {
    other.filter(|o| o.ip() != primary.ip() && o.port() != primary.port())
}

/// Runs every probe `cfg` asks for.
pub async fn run(cfg: &Config) -> Result<Report, ProbeError> {
    let mut report = run_ipv4(cfg).await?;
    if let Some(server) = cfg.server6 {
        report.ipv6 = Some(ipv6(server, cfg.timing).await);
    }
    let primary = cfg.servers.first().ok_or(ProbeError::NoServer)?;
    if cfg.port_mapping && !primary.ip().is_loopback() {
        let public = report.udp.public_addr.map(|a| a.ip());
        report.port_mapping = Some(port_mapping(public).await);
    }
    Ok(report)
}

/// How long the gateway has to answer the protocol probe (UPnP's search takes 1 s).
const PORT_MAPPING_PROBE: Duration = Duration::from_secs(3);
/// How long a granted test mapping may take.
const PORT_MAPPING_GRANT: Duration = Duration::from_secs(3);

/// The `port_mapping` section: which protocols the default gateway speaks, and a test
/// mapping of a fresh UDP port (removed before returning). `public` is the IP STUN saw,
/// to tell a gateway behind a second NAT.
pub async fn port_mapping(public: Option<std::net::IpAddr>) -> crate::report::PortMappingReport {
    let mut r = crate::report::PortMappingReport {
        gateway: netwatch::interfaces::HomeRouter::new().map(|h| h.gateway),
        pcp: false,
        nat_pmp: false,
        upnp: false,
        protocol: None,
        mapped: None,
        public: None,
        note: None,
    };
    if r.gateway.is_none() {
        r.note = Some("no default gateway to ask".into());
        return r;
    }
    let client = portmapper::Client::new(portmapper::Config::default());
    match tokio::time::timeout(PORT_MAPPING_PROBE, client.probe()).await {
        Ok(Ok(Ok(o))) => (r.pcp, r.nat_pmp, r.upnp) = (o.pcp, o.nat_pmp, o.upnp),
        _ => {
            r.note = Some("the gateway did not answer about port mapping".into());
            return r;
        }
    }
    r.protocol = if r.pcp {
        Some("PCP".into())
    } else if r.nat_pmp {
        Some("NAT-PMP".into())
    } else if r.upnp {
        Some("UPnP".into())
    } else {
        r.note = Some("the gateway speaks none of PCP, NAT-PMP and UPnP IGD".into());
        return r;
    };
    // A port of our own to map: held while the mapping lives, so nobody else gets it.
    let sock = match tokio::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).await {
        Ok(s) => s,
        Err(e) => {
            r.note = Some(format!("no local UDP port to map: {e}"));
            return r;
        }
    };
    let Some(port) = sock
        .local_addr()
        .ok()
        .and_then(|a| std::num::NonZeroU16::new(a.port()))
    else {
        return r;
    };
    let mut external = client.watch_external_address();
    client.update_local_port(port);
    let granted = tokio::time::timeout(PORT_MAPPING_GRANT, async {
        loop {
            if let Some(a) = *external.borrow_and_update() {
                return Some(a);
            }
            if external.changed().await.is_err() {
                return None;
            }
        }
    })
    .await;
    match granted {
        Ok(Some(a)) => {
            r.mapped = Some(SocketAddr::V4(a));
            r.public = public.map(|p| p == std::net::IpAddr::V4(*a.ip()));
            // Removed again; a probe asked after the removal is answered only once the
            // removal went out (the client handles requests in order).
            client.deactivate();
            let _ = tokio::time::timeout(PORT_MAPPING_PROBE, client.probe()).await;
        }
        _ => {
            r.note = Some(format!(
                "the gateway speaks {} but granted no mapping",
                r.protocol.as_deref().unwrap_or("?")
            ));
        }
    }
    drop(sock);
    r
}

/// The `ipv6` section: a route, an answer, and whether the address seen is ours. Behind an
/// IPv6 firewall (no NAT) the public address is the local one. Filtering (a firewall's,
/// or an IPv6 NAT's) is told when the server is an RFC 5780 one over IPv6 (OTHER-ADDRESS
/// in its answer): the two CHANGE-REQUEST tests, as over IPv4.
pub async fn ipv6(server: SocketAddr, timing: Timing) -> crate::report::Ipv6Report {
    let mut r = crate::report::Ipv6Report {
        server,
        local_addr: None,
        public_addr: None,
        reachable: false,
        translated: None,
        filtering: None,
        note: None,
    };
    let ip = match route_ip(server) {
        Ok(ip) => ip,
        Err(e) => {
            r.note = Some(format!("no IPv6 route to {server}: {e}"));
            return r;
        }
    };
    let sock = match bind_udp(ip).await {
        Ok(s) => s,
        Err(e) => {
            r.note = Some(e.to_string());
            return r;
        }
    };
    r.local_addr = sock.local_addr().ok();
    let Ok(req) = request(RequestOptions::default()) else {
        return r;
    };
    match exchange(&sock, &sock, server, &req, false, timing).await {
        Outcome::Answer(resp, _) => {
            r.reachable = true;
            r.public_addr = Some(resp.mapped);
            r.translated = r.local_addr.map(|l| l != resp.mapped);
            if usable_other(resp.other, server).is_some() {
                let notes = std::sync::Mutex::new(Vec::new());
                let (both, port) = tokio::join!(
                    filtering_test(ip, server, (true, true), timing, &notes),
                    filtering_test(ip, server, (false, true), timing, &notes),
                );
                r.filtering = crate::classify::filtering(both.ok().flatten(), port.ok().flatten());
                if r.filtering.is_none() {
                    let n = notes.into_inner().unwrap_or_else(|e| e.into_inner());
                    r.note = Some(if n.is_empty() {
                        "filtering over IPv6 could not be told".into()
                    } else {
                        n.join("; ")
                    });
                }
            } else {
                r.note = Some(format!(
                    "filtering over IPv6 needs an RFC 5780 server there (two IPv6 \
                     addresses); {server} has one only"
                ));
            }
        }
        _ => {
            r.note = Some(format!(
                "no STUN answer from {server} over IPv6: IPv6 is blocked here or the server \
                 does not listen on IPv6"
            ));
        }
    }
    r
}

async fn run_ipv4(cfg: &Config) -> Result<Report, ProbeError> {
    let primary = *cfg.servers.first().ok_or(ProbeError::NoServer)?;
    let timing = cfg.timing;
    let ip = route_ip(primary)?;
    let notes = std::sync::Mutex::new(Vec::new());

    // Test I.
    let main = bind_udp(ip).await?;
    let local = main
        .local_addr()
        .map_err(sock_err("reading a local address"))?;
    let t1 = request(RequestOptions::default())?;
    let first = match exchange(&main, &main, primary, &t1, false, timing).await {
        Outcome::Answer(r, _) => r,
        other => {
            let why = match other {
                Outcome::Refused(e) => format!("{primary} refused a plain Binding request: {e}"),
                _ => format!(
                    "no STUN answer from {primary} over UDP within {:.1} s: either UDP is \
                     blocked on this network or the server is down. Only TCP or the relay \
                     will work",
                    timing.give_up_after().as_secs_f64()
                ),
            };
            let tcp = if cfg.tcp {
                Some(probe_tcp(cfg, ip, None).await?)
            } else {
                None
            };
            return Ok(Report::blocked(primary, local, why, tcp));
        }
    };
    let m1 = first.mapped;
    // OTHER-ADDRESS is only useful when both IP and port differ (RFC 5780 §4.1).
    let other = usable_other(first.other, primary);
    if other.is_none() {
        let n = &mut notes.lock().unwrap_or_else(|e| e.into_inner());
        n.push(if first.other.is_some() {
            format!("{primary} gives an OTHER-ADDRESS that does not differ in IP and port")
        } else {
            format!("{primary} is not an RFC 5780 server (no OTHER-ADDRESS)")
        });
        n.push(
            "filtering cannot be tested without one (RFC 5780 CHANGE-REQUEST); against \
             plain servers, give two --server to test whether the mapping depends on the \
             destination"
                .into(),
        );
    }

    // Port allocation: fresh mappings, strictly one after another.
    let mut fresh = Vec::new();
    for _ in 0..defaults::FRESH_MAPPINGS {
        if let Some((s, mapped, _)) = fresh_mapping(ip, primary, timing).await? {
            let port = s
                .local_addr()
                .map_err(sock_err("reading a local address"))?
                .port();
            fresh.push((port, mapped.port()));
        }
    }

    // Mapping, filtering and hairpin, each on its own socket(s), together.
    let mapping_tests = async {
        let mut obs = MappingObservations {
            local: Some(local),
            primary: Some(m1),
            ..Default::default()
        };
        let ask = |dest: SocketAddr| {
            let main = &main;
            async move {
                let req = request(RequestOptions::default())?;
                Ok::<_, ProbeError>(
                    match exchange(main, main, dest, &req, false, timing).await {
                        Outcome::Answer(r, _) => Some(r.mapped),
                        _ => None,
                    },
                )
            }
        };
        if let Some(o) = other {
            obs.alt_ip = ask(SocketAddr::new(o.ip(), primary.port())).await?;
            if obs.alt_ip.is_some_and(|m2| m2 != m1) {
                obs.alt_ip_port = ask(o).await?;
            }
        } else if let Some(&second) = cfg.servers.get(1) {
            obs.second_server = ask(second).await?;
            if obs.second_server.is_none() {
                let n = &mut notes.lock().unwrap_or_else(|e| e.into_inner());
                n.push(format!("no answer from the second server {second}"));
            }
        } else if let Some(port2) = primary.port().checked_add(1) {
            // A one-IP chuantou rendezvous answers on its STUN port + 1 too: a changed
            // mapping there is a symmetric NAT. Other servers do not answer; asked briefly.
            let dest = SocketAddr::new(primary.ip(), port2);
            let req = request(RequestOptions::default())?;
            if let Outcome::Answer(r, _) =
                exchange(&main, &main, dest, &req, false, QUICK_TIMING).await
            {
                obs.second_port = Some(r.mapped);
                let n = &mut notes.lock().unwrap_or_else(|e| e.into_inner());
                n.push(format!(
                    "mapping compared with the server's second port {dest}: {}",
                    if r.mapped == m1 {
                        "the same (endpoint-independent or address-dependent: one IP cannot tell)"
                    } else {
                        "it changed with the destination port (symmetric)"
                    }
                ));
            }
        }
        Ok::<_, ProbeError>(obs)
    };
    let filter_both = async {
        match other {
            Some(_) => filtering_test(ip, primary, (true, true), timing, &notes).await,
            None => Ok(None),
        }
    };
    let filter_port = async {
        match other {
            Some(_) => filtering_test(ip, primary, (false, true), timing, &notes).await,
            None => Ok(None),
        }
    };
    let hairpin = async {
        let Some((s, mapped, _)) = fresh_mapping(ip, primary, timing).await? else {
            return Ok::<_, ProbeError>(None);
        };
        let req = request(RequestOptions::default())?;
        Ok(Some(
            exchange(&s, &s, mapped, &req, true, timing).await == Outcome::Echoed,
        ))
    };
    let (obs, both, port, hairpin) = tokio::join!(mapping_tests, filter_both, filter_port, hairpin);
    let (obs, both, port, hairpin) = (obs?, both?, port?, hairpin?);

    let lifetime = match cfg.lifetime {
        // No translation: the "mapping" is this socket's own address, which never
        // expires; a search would only measure something else (a firewall, the server).
        Some(max) if m1 == local => {
            let n = &mut notes.lock().unwrap_or_else(|e| e.into_inner());
            n.push(
                "no NAT in the way: the address the server sees is this socket's own, so \
                    it does not expire"
                    .to_string(),
            );
            Some(Lifetime {
                alive_at: Some(max.as_secs_f64()),
                gone_at: None,
            })
        }
        Some(max) => lifetime(ip, primary, max, timing, &notes).await?,
        None => None,
    };
    let tcp = if cfg.tcp {
        Some(probe_tcp(cfg, ip, other).await?)
    } else {
        None
    };

    let mapping = classify::mapping(&obs);
    if mapping == Mapping::Varies {
        let n = &mut notes.lock().unwrap_or_else(|e| e.into_inner());
        n.push(
            "the mapping varies by destination; whether by address alone or by address and \
             port needs an RFC 5780 server"
                .into(),
        );
    }
    let filtering = classify::filtering(both, port);
    let (port_allocation, port_delta) = classify::allocation(&fresh);
    let nat_type = classify::nat_type(true, m1 != local, mapping, filtering);
    let udp = UdpReport {
        nat_type,
        mapping: match mapping {
            Mapping::Known(b) => Some(b),
            _ => None,
        },
        filtering,
        public_addr: Some(m1),
        local_addr: local,
        port_allocation,
        port_delta,
        hairpin,
        mapping_lifetime_s: lifetime.and_then(|l| l.estimate()),
        mapping_lifetime_searched_s: cfg.lifetime.map(|d| d.as_secs_f64()),
    };
    let notes = notes.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(Report::new(primary, other, udp, tcp, notes))
}

/// RFC 5780 §4.6: mappings opened together, each checked once at a growing age by asking
/// the server (from another socket, with RESPONSE-PORT) to answer to it.
async fn lifetime(
    ip: IpAddr,
    primary: SocketAddr,
    max: Duration,
    timing: Timing,
    notes: &std::sync::Mutex<Vec<String>>,
) -> Result<Option<Lifetime>, ProbeError> {
    let mut ages = Vec::new();
    let mut age = defaults::LIFETIME_FIRST.as_secs_f64();
    while age <= max.as_secs_f64() {
        ages.push(age);
        age *= defaults::LIFETIME_STEP;
    }
    let mut probes = Vec::new();
    for age in ages {
        match fresh_mapping(ip, primary, timing).await? {
            Some((s, mapped, at)) => probes.push((age, s, mapped, at)),
            None => return Ok(None),
        }
    }
    let asker = bind_udp(ip).await?;
    let mut result = Lifetime {
        alive_at: None,
        gone_at: None,
    };
    for (age, s, mapped, at) in probes {
        tokio::time::sleep_until((at + Duration::from_secs_f64(age)).into()).await;
        let req = request(RequestOptions {
            response_port: Some(mapped.port()),
            ..Default::default()
        })?;
        match exchange(&asker, &s, primary, &req, false, timing).await {
            Outcome::Answer(..) => result.alive_at = Some(age),
            Outcome::Silent | Outcome::Echoed => {
                result.gone_at = Some(age);
                break;
            }
            Outcome::Refused(why) => {
                let n = &mut notes.lock().unwrap_or_else(|e| e.into_inner());
                n.push(format!(
                    "the server does not support RESPONSE-PORT ({why}): mapping lifetime unknown"
                ));
                return Ok(None);
            }
        }
        debug!(age, "mapping still alive");
    }
    if result.alive_at.is_none() {
        let n = &mut notes.lock().unwrap_or_else(|e| e.into_inner());
        n.push(format!(
            "mappings lived less than {:.0} s, or the server ignores RESPONSE-PORT",
            defaults::LIFETIME_FIRST.as_secs_f64()
        ));
    }
    Ok(Some(result))
}

/// One STUN Binding over TCP (RFC 8489 §6.2.2: the message on the stream, no framing
/// beyond its own length) from `local` (port 0: any), with SO_REUSEADDR and SO_REUSEPORT
/// so the same port can reach several servers. The stream is returned to keep the mapping.
async fn tcp_binding(
    local: SocketAddr,
    server: SocketAddr,
    timing: Timing,
) -> Result<Option<(SocketAddr, BindingResponse, TcpStream)>, ProbeError> {
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(sock_err("making a TCP socket"))?;
    socket
        .set_reuseaddr(true)
        .map_err(sock_err("SO_REUSEADDR"))?;
    socket
        .set_reuseport(true)
        .map_err(sock_err("SO_REUSEPORT"))?;
    socket
        .bind(local)
        .map_err(sock_err(format!("binding TCP {local}")))?;
    let bound = socket
        .local_addr()
        .map_err(sock_err("reading a local address"))?;
    let req = request(RequestOptions::default())?;
    let exchange = async {
        let mut s = socket.connect(server).await?;
        s.write_all(&req.bytes).await?;
        let mut head = [0u8; 20];
        s.read_exact(&mut head).await?;
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if len > 1024 {
            return Err(std::io::Error::other("oversized STUN message"));
        }
        let mut msg = head.to_vec();
        msg.resize(20 + len, 0);
        s.read_exact(&mut msg[20..]).await?;
        Ok((msg, s))
    };
    match tokio::time::timeout(timing.give_up_after(), exchange).await {
        Ok(Ok((msg, stream))) => match parse_response(&msg, &req.tid, None) {
            Ok(r) => Ok(Some((bound, r, stream))),
            Err(e) => {
                debug!(%server, error = %e, "tcp stun answer unusable");
                Ok(None)
            }
        },
        Ok(Err(e)) => {
            debug!(%server, error = %e, "tcp stun failed");
            Ok(None)
        }
        Err(_) => Ok(None),
    }
}

/// TCP mapping from one local port to the server's two (or the two servers') endpoints,
/// and port allocation from fresh local ports.
async fn probe_tcp(
    cfg: &Config,
    ip: IpAddr,
    other: Option<SocketAddr>,
) -> Result<TcpReport, ProbeError> {
    let primary = cfg.servers[0];
    let timing = cfg.timing;
    let Some((local, first, keep1)) = tcp_binding(SocketAddr::new(ip, 0), primary, timing).await?
    else {
        return Ok(TcpReport::unanswered(format!(
            "no STUN answer over TCP from {primary}"
        )));
    };
    let m1 = first.mapped;
    // Without a UDP answer the TCP one names the server's other address.
    let other = other.or(usable_other(first.other, primary));
    let mut obs = MappingObservations {
        local: Some(local),
        primary: Some(m1),
        ..Default::default()
    };
    let mut keep = vec![keep1];
    let mut ask = async |dest: SocketAddr| -> Result<Option<SocketAddr>, ProbeError> {
        Ok(tcp_binding(local, dest, timing).await?.map(|(_, r, s)| {
            keep.push(s);
            r.mapped
        }))
    };
    if let Some(o) = other {
        obs.alt_ip = ask(SocketAddr::new(o.ip(), primary.port())).await?;
        if obs.alt_ip.is_some_and(|m2| m2 != m1) {
            obs.alt_ip_port = ask(o).await?;
        }
    } else if let Some(&second) = cfg.servers.get(1) {
        obs.second_server = ask(second).await?;
    }
    let mut fresh = Vec::new();
    for _ in 0..defaults::FRESH_MAPPINGS {
        if let Some((l, r, s)) = tcp_binding(SocketAddr::new(ip, 0), primary, timing).await? {
            fresh.push((l.port(), r.mapped.port()));
            keep.push(s);
        }
    }
    drop(keep);
    let (port_allocation, port_delta) = classify::allocation(&fresh);
    let mapping = classify::mapping(&obs);
    Ok(TcpReport {
        mapping: match mapping {
            Mapping::Known(b) => Some(b),
            _ => None,
        },
        public_addr: Some(m1),
        port_allocation,
        port_delta,
        note: (mapping == Mapping::Unknown)
            .then(|| "TCP mapping unknown: the server has no second address over TCP".to_string()),
    })
}

/// What a peer measures before registering: mapping behaviour and port allocation, from
/// answers only (nothing waits for silence), so it takes a few round trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuickProfile {
    /// Mapping behaviour, as far as the server allows telling.
    pub mapping: Mapping,
    /// Whether the main socket's public address is its own (no NAT).
    pub translated: bool,
    /// Port allocation of new mappings.
    pub allocation: Option<classify::Allocation>,
    /// The step of a sequential allocation.
    pub delta: Option<i32>,
    /// The main socket's public address: the newest mapping made, so a sequential NAT's
    /// next one is this port plus the delta.
    pub public: SocketAddr,
}

/// Timing for [`quick`]: a server that answers at all answers within a second.
pub const QUICK_TIMING: Timing = Timing {
    rto: Duration::from_millis(200),
    rc: 3,
    rm: 2,
};

/// Measures the NAT in front of `main` against `server`: fresh mappings one after another
/// (port allocation), one of them also to the server's other address (mapping) — or,
/// from a server without one, to `port2`, a second port of the same server, when it
/// offers one — and last `main`'s own Test I. `None` when the server never answers.
pub async fn quick(
    main: &UdpSocket,
    server: SocketAddr,
    port2: Option<u16>,
    timing: Timing,
) -> Result<Option<QuickProfile>, ProbeError> {
    let local = main
        .local_addr()
        .map_err(sock_err("reading a local address"))?;
    let ip = if local.ip().is_unspecified() {
        route_ip(server)?
    } else {
        local.ip()
    };
    let mut fresh = Vec::new();
    let mut obs = MappingObservations::default();
    for i in 0..defaults::FRESH_MAPPINGS {
        let s = bind_udp(ip).await?;
        let req = request(RequestOptions::default())?;
        let Outcome::Answer(r, _) = exchange(&s, &s, server, &req, false, timing).await else {
            if i == 0 {
                return Ok(None);
            }
            continue;
        };
        let port = s
            .local_addr()
            .map_err(sock_err("reading a local address"))?
            .port();
        fresh.push((port, r.mapped.port()));
        let other = usable_other(r.other, server);
        if i + 1 == defaults::FRESH_MAPPINGS {
            obs.local = Some(SocketAddr::new(ip, port));
            obs.primary = Some(r.mapped);
            if let Some(o) = other {
                let req = request(RequestOptions::default())?;
                let dest = SocketAddr::new(o.ip(), server.port());
                if let Outcome::Answer(r2, _) = exchange(&s, &s, dest, &req, false, timing).await {
                    obs.alt_ip = Some(r2.mapped);
                    let req = request(RequestOptions::default())?;
                    if r2.mapped != r.mapped {
                        if let Outcome::Answer(r3, _) =
                            exchange(&s, &s, o, &req, false, timing).await
                        {
                            obs.alt_ip_port = Some(r3.mapped);
                        }
                    }
                }
            } else if let Some(p) = port2.filter(|&p| p != server.port()) {
                let req = request(RequestOptions::default())?;
                let dest = SocketAddr::new(server.ip(), p);
                if let Outcome::Answer(r2, _) = exchange(&s, &s, dest, &req, false, timing).await {
                    obs.second_port = Some(r2.mapped);
                }
            }
        }
    }
    let req = request(RequestOptions::default())?;
    let Outcome::Answer(r, _) = exchange(main, main, server, &req, false, timing).await else {
        return Ok(None);
    };
    let (allocation, delta) = classify::allocation(&fresh);
    let main_local = SocketAddr::new(ip, local.port());
    Ok(Some(QuickProfile {
        mapping: classify::mapping(&obs),
        translated: r.mapped != main_local,
        allocation,
        delta,
        public: r.mapped,
    }))
}
