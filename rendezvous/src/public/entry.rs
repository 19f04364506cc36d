//! The public entries' tokio shell: the HTTP and TLS listeners, one listener per handed-out
//! raw port, and per client connection: admission (limits per client IP, per name, in
//! all), reading just enough to route ([`sniff`]), the HTTP answers when there is nothing
//! to route to (404, 401, 503 offline, 502), opening a relay session to the exposer
//! ([`Shared::open_public`]) and splicing, paced when the operator set a rate.
//!
//! [`sniff`]: super::sniff

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::signal::{EntryKind, HttpAuth};

use super::sniff::{self, Sniffed};
use super::{Bucket, PublicConfig, Publications};
use crate::metrics::{self, PublicRefusal};
use crate::server::{OpenError, Shared};

/// Client connections open at once over every public entry.
pub const MAX_OPEN: usize = 4096;

/// The public entries' state beside the server's.
#[derive(Debug)]
pub struct Entries {
    /// How the operator set them up.
    pub config: PublicConfig,
    /// What is published where.
    pub table: Mutex<Publications>,
    /// Open client connections per client IP and per name.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    per_name: Mutex<HashMap<String, usize>>,
    /// Pacing per name, when the operator set a rate.
    buckets: Mutex<HashMap<String, Arc<Mutex<Bucket>>>>,
    /// Raw-port listeners running, to stop when a port is given up.
    ports: Mutex<HashMap<u16, (bool, CancellationToken)>>,
    /// Stops every entry task at shutdown.
    pub stop: CancellationToken,
    open: Arc<tokio::sync::Semaphore>,
    /// "Too many connections" answers being written.
    refusals: Arc<tokio::sync::Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Entries {
    /// Entries as `config` says, none running yet.
    pub fn new(config: PublicConfig) -> Entries {
        Entries {
            config,
            table: Mutex::default(),
            per_ip: Mutex::default(),
            per_name: Mutex::default(),
            buckets: Mutex::default(),
            ports: Mutex::default(),
            stop: CancellationToken::new(),
            open: Arc::new(tokio::sync::Semaphore::new(MAX_OPEN)),
            refusals: Arc::new(tokio::sync::Semaphore::new(64)),
        }
    }

    /// The pacing bucket of `name`, when there is a rate.
    pub(crate) fn bucket(&self, name: &str) -> Option<Arc<Mutex<Bucket>>> {
        let rate = self.config.rate?;
        Some(
            lock(&self.buckets)
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(Mutex::new(Bucket::new(rate, Instant::now()))))
                .clone(),
        )
    }

    /// Starts serving `port` for the table's holder, unless it already runs.
    pub(crate) fn start_port(
        &self,
        shared: &Arc<Shared>,
        port: u16,
        udp: bool,
    ) -> Result<(), std::io::Error> {
        let Some((ip, _)) = &self.config.ports else {
            return Ok(());
        };
        let mut ports = lock(&self.ports);
        match ports.get(&port) {
            Some((was_udp, _)) if *was_udp == udp => return Ok(()),
            // The name now publishes the other protocol there.
            Some((_, stop)) => stop.cancel(),
            None => {}
        }
        let addr = SocketAddr::new(*ip, port);
        let stop = self.stop.child_token();
        let dual = shared.config.dual_stack;
        if udp {
            let sock = wire::dual::udp_socket(addr, dual)?;
            info!(port, "public udp port listening");
            tokio::spawn(super::udp::serve(sock, shared.clone(), port, stop.clone()));
        } else {
            let listener = wire::dual::tcp_listener(addr, dual)?;
            info!(port, "public port listening");
            tokio::spawn(accept_loop(
                listener,
                shared.clone(),
                Kind::Port(port),
                stop.clone(),
            ));
        }
        ports.insert(port, (udp, stop));
        Ok(())
    }

    /// Stops serving `port`.
    pub(crate) fn stop_port(&self, port: u16) {
        if let Some((_, t)) = lock(&self.ports).remove(&port) {
            info!(port, "public port closed");
            t.cancel();
        }
    }
}

/// Which listener a client came in on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Http,
    Tls,
    Port(u16),
}

impl Kind {
    fn entry(self) -> EntryKind {
        match self {
            Kind::Http => EntryKind::Http,
            Kind::Tls => EntryKind::Tls,
            Kind::Port(_) => EntryKind::Port,
        }
    }
}

/// Accepts clients on one public listener until `stop`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    kind: Kind,
    stop: CancellationToken,
) {
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, remote)) => (s, wire::dual::canonical(remote)),
                Err(e) => {
                    warn!(error = %e, "public accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(admitted) = Admitted::new(&shared, remote.ip()) else {
            shared.metrics.public_refused(PublicRefusal::Busy);
            debug!(client = %remote, "public client over the limits; closed");
            // Saying why costs a task: only a few at a time, the rest are just closed.
            if let Kind::Http = kind
                && let Ok(permit) = shared.public.refusals.clone().try_acquire_owned()
            {
                tokio::spawn(async move {
                    let _permit = permit;
                    let mut stream = stream;
                    let _ = respond(
                        &mut stream,
                        503,
                        "Service Unavailable",
                        "Too many connections from your address; try again shortly.",
                        &[("Retry-After", "5")],
                    )
                    .await;
                });
            }
            continue;
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve(&shared, stream, remote, kind) => {}
            }
        });
    }
}

/// A client connection counted against the limits until dropped.
pub(crate) struct Admitted {
    shared: Arc<Shared>,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Admitted {
    pub(crate) fn new(shared: &Arc<Shared>, ip: IpAddr) -> Option<Admitted> {
        let e = &shared.public;
        let permit = e.open.clone().try_acquire_owned().ok()?;
        let mut per_ip = lock(&e.per_ip);
        let n = per_ip.entry(ip).or_default();
        if *n >= e.config.max_conns_per_ip {
            return None;
        }
        *n += 1;
        metrics::inc(&shared.metrics.public_open);
        Some(Admitted {
            shared: shared.clone(),
            ip,
            _permit: permit,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_ip = lock(&self.shared.public.per_ip);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        metrics::dec(&self.shared.metrics.public_open);
    }
}

/// A connection counted against its name's limit until dropped.
pub(crate) struct NameSlot {
    shared: Arc<Shared>,
    name: String,
}

impl NameSlot {
    pub(crate) fn new(shared: &Arc<Shared>, name: &str) -> Option<NameSlot> {
        let mut per_name = lock(&shared.public.per_name);
        let n = per_name.entry(name.to_owned()).or_default();
        if *n >= shared.public.config.max_conns {
            return None;
        }
        *n += 1;
        Some(NameSlot {
            shared: shared.clone(),
            name: name.to_owned(),
        })
    }
}

impl Drop for NameSlot {
    fn drop(&mut self) {
        let mut per_name = lock(&self.shared.public.per_name);
        if let Some(n) = per_name.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                per_name.remove(&self.name);
            }
        }
    }
}

/// Open connections of `name` now.
pub(crate) fn open_of(shared: &Shared, name: &str) -> usize {
    lock(&shared.public.per_name)
        .get(name)
        .copied()
        .unwrap_or(0)
}

/// Why a connection got no service, and what an HTTP client is told.
struct Refused {
    why: PublicRefusal,
    status: u16,
    title: &'static str,
    text: String,
    headers: Vec<(&'static str, String)>,
}

impl Refused {
    fn new(why: PublicRefusal, status: u16, title: &'static str, text: String) -> Refused {
        Refused {
            why,
            status,
            title,
            text,
            headers: Vec::new(),
        }
    }
}

async fn serve(shared: &Arc<Shared>, mut stream: TcpStream, client: SocketAddr, kind: Kind) {
    match route_and_open(shared, &mut stream, client, kind).await {
        Ok((name, head, upstream, slot)) => {
            metrics::inc(&shared.metrics.public_connections[kind.entry() as usize]);
            debug!(%client, peer = %name, entry = kind.entry().as_str(), "public client carried to the exposer");
            splice(shared, &name, stream, upstream, head).await;
            drop(slot);
        }
        Err(r) => {
            shared.metrics.public_refused(r.why);
            debug!(%client, entry = kind.entry().as_str(), why = %r.text, "public client turned away");
            if let Kind::Http = kind {
                let headers: Vec<(&str, &str)> =
                    r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let _ = respond(&mut stream, r.status, r.title, &r.text, &headers).await;
            }
        }
    }
}

type Opened = (String, Vec<u8>, TcpStream, NameSlot);

async fn route_and_open(
    shared: &Arc<Shared>,
    stream: &mut TcpStream,
    client: SocketAddr,
    kind: Kind,
) -> Result<Opened, Refused> {
    let config = &shared.public.config;
    let domain = config.domain.as_deref().unwrap_or_default();
    let (name, head, auth_header) = match kind {
        Kind::Http => {
            let (buf, head) = read_head(stream, config.head_timeout, sniff::http_head).await?;
            let name = super::name_of_host(&head.host, domain).ok_or_else(|| {
                Refused::new(
                    PublicRefusal::NotFound,
                    404,
                    "Not Found",
                    format!(
                        "This is a chuantou public entry: services are published at \
                         http://NAME.{domain}/, and {:?} names none.",
                        head.host
                    ),
                )
            })?;
            (name.to_owned(), buf, Some(head.authorization))
        }
        Kind::Tls => {
            let (buf, sni) = read_head(stream, config.head_timeout, sniff::tls_server_name).await?;
            let name = sni
                .as_deref()
                .and_then(|h| super::name_of_host(h, domain))
                .ok_or_else(|| {
                    Refused::new(
                        PublicRefusal::NotFound,
                        404,
                        "Not Found",
                        format!("TLS server name {sni:?} names no service"),
                    )
                })?;
            (name.to_owned(), buf, None)
        }
        Kind::Port(port) => {
            let name = shared.public_port_holder(port).ok_or_else(|| {
                Refused::new(
                    PublicRefusal::NotFound,
                    404,
                    "Not Found",
                    format!("port {port} is published by no one now"),
                )
            })?;
            (name, Vec::new(), None)
        }
    };
    let not_found = || {
        Refused::new(
            PublicRefusal::NotFound,
            404,
            "Not Found",
            format!("No service is published as {name} here."),
        )
    };
    let route = shared.public_route(&name).ok_or_else(not_found)?;
    let published_here = match kind {
        Kind::Http => route.publication.http,
        Kind::Tls => route.publication.tls,
        Kind::Port(p) => route.publication.port == Some(p),
    };
    if !published_here {
        return Err(not_found());
    }
    if let (Some(auth), Some(header)) = (&route.publication.auth, &auth_header)
        && !super::authorized(auth, header.as_deref())
    {
        let mut r = Refused::new(
            PublicRefusal::Unauthorized,
            401,
            "Unauthorized",
            format!("{name} asks for credentials."),
        );
        r.headers.push((
            "WWW-Authenticate",
            match auth {
                HttpAuth::Basic { .. } => format!("Basic realm=\"{name}\", charset=\"UTF-8\""),
                HttpAuth::Bearer(_) => format!("Bearer realm=\"{name}\""),
            },
        ));
        return Err(r);
    }
    if !route.online {
        let mut r = Refused::new(
            PublicRefusal::Offline,
            503,
            "Service Unavailable",
            format!(
                "{name} is offline: the machine that publishes it is not connected now. Try again later."
            ),
        );
        r.headers.push(("Retry-After", "30".into()));
        return Err(r);
    }
    let slot = NameSlot::new(shared, &name).ok_or_else(|| {
        let mut r = Refused::new(
            PublicRefusal::Busy,
            503,
            "Service Unavailable",
            format!(
                "{name} has {} connections open, the most this server carries for one service.",
                config.max_conns
            ),
        );
        r.headers.push(("Retry-After", "5".into()));
        r
    })?;
    let upstream = shared
        .open_public(&name, route.publication.service, kind.entry(), client)
        .await
        .map_err(|e| {
            let (status, title) = match e {
                OpenError::Timeout(_) => (504, "Gateway Timeout"),
                _ => (502, "Bad Gateway"),
            };
            info!(peer = %name, %client, error = %e, "public client not carried");
            Refused::new(
                PublicRefusal::Failed,
                status,
                title,
                format!("{name}: {e}."),
            )
        })?;
    Ok((name, head, upstream, slot))
}

/// Reads until `parse` decides, within `limit`.
async fn read_head<T>(
    stream: &mut TcpStream,
    limit: Duration,
    parse: fn(&[u8]) -> Sniffed<T>,
) -> Result<(Vec<u8>, T), Refused> {
    let mut buf = Vec::with_capacity(2048);
    let work = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return Err(Refused::new(
                    PublicRefusal::BadRequest,
                    400,
                    "Bad Request",
                    "the connection closed before the request was complete".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse(&buf) {
                Sniffed::More => continue,
                Sniffed::Done(t) => return Ok(t),
                Sniffed::Bad(why) => {
                    let status = if why.contains("too large") { 431 } else { 400 };
                    return Err(Refused::new(
                        PublicRefusal::BadRequest,
                        status,
                        if status == 431 {
                            "Request Header Fields Too Large"
                        } else {
                            "Bad Request"
                        },
                        why.to_owned(),
                    ));
                }
            }
        }
    };
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(t)) => Ok((buf, t)),
        Ok(Err(r)) => Err(r),
        Err(_) => Err(Refused::new(
            PublicRefusal::BadRequest,
            408,
            "Request Timeout",
            format!("no complete request within {limit:?}"),
        )),
    }
}

/// Writes a small HTML page with `status` and closes.
async fn respond(
    stream: &mut TcpStream,
    status: u16,
    title: &str,
    text: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<()> {
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{status} {title}</title>\
         <style>body{{font:16px system-ui,sans-serif;margin:3em auto;max-width:40em;color:#222}}\
         h1{{font-size:1.4em}}small{{color:#777}}</style></head>\n<body><h1>{status} {title}</h1>\
         <p>{}</p><p><small>chuantou public entry</small></p></body></html>\n",
        html_escape(text)
    );
    let mut head = format!(
        "HTTP/1.1 {status} {title}\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Carries bytes both ways until both sides have finished, `head` (what routing read)
/// first; paced by the name's bucket when there is a rate.
async fn splice(
    shared: &Arc<Shared>,
    name: &str,
    client: TcpStream,
    upstream: TcpStream,
    head: Vec<u8>,
) {
    let bucket = shared.public.bucket(name);
    let m = &shared.metrics;
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async {
        if uw.write_all(&head).await.is_err() {
            return;
        }
        m.public_bytes_to_service
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        pump(
            &mut cr,
            &mut uw,
            bucket.as_ref(),
            &m.public_bytes_to_service,
        )
        .await;
        let _ = uw.shutdown().await;
    };
    let down = async {
        pump(&mut ur, &mut cw, bucket.as_ref(), &m.public_bytes_to_client).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    bucket: Option<&Arc<Mutex<Bucket>>>,
    counter: &std::sync::atomic::AtomicU64,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(b) = bucket {
            let wait = lock(b).take(n as u64, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Drops publications of names gone or rebound every minute, and closes their ports.
pub(crate) async fn sweep_task(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        for port in shared.public_sweep() {
            shared.public.stop_port(port);
        }
    }
}
