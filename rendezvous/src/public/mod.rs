//! Public entries: services that peers publish to clients running no `peer`. The operator
//! turns each kind on (`--public-http`, `--public-tls`, `--public-ports`) and says who may
//! publish (`--publish-allow`, or every holder of the token); an exposer asks with
//! `Request::Publish`. [`Publications`] is the sans-IO table of what is published where;
//! [`entry`] is the shell that accepts clients, routes them, opens a relay session to the
//! exposer and splices; [`udp`] does the same for published UDP ports, a flow per client.
//!
//! A publication lives as long as the name: when its exposer goes offline its clients get
//! "offline" (HTTP 503), and its port stays reserved for it, until the name is released or
//! bound to another key.

pub mod entry;
pub mod sniff;
pub mod udp;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use wire::signal::{ErrorCode, ErrorFrame, HttpAuth, PublicKey, Publish, ServiceRef};

/// How the operator set public entries up.
#[derive(Debug, Clone, Default)]
pub struct PublicConfig {
    /// HTTP routed by Host (`NAME.DOMAIN`).
    pub http: Option<SocketAddr>,
    /// TLS routed by server name, passed through.
    pub tls: Option<SocketAddr>,
    /// The domain under which names are published; needed for `http` and `tls`.
    pub domain: Option<String>,
    /// Raw TCP ports handed out on request, on this IP.
    pub ports: Option<(IpAddr, RangeInclusive<u16>)>,
    /// Keys that may publish. Empty: every peer when the server has a token, none without.
    pub allow: Vec<PublicKey>,
    /// Every registered peer may publish, token or not.
    pub allow_any: bool,
    /// Client connections one published name may have open.
    pub max_conns: usize,
    /// Client connections one client IP may have open, to all entries together.
    pub max_conns_per_ip: usize,
    /// Bytes per second one published name may move (both directions, all its clients).
    pub rate: Option<u64>,
    /// Time a client has to send its request head or ClientHello.
    pub head_timeout: Duration,
}

impl PublicConfig {
    /// Whether any entry is on.
    pub fn enabled(&self) -> bool {
        self.http.is_some() || self.tls.is_some() || self.ports.is_some()
    }

    /// Parses `--public-ports`: `LOW-HIGH` or `IP:LOW-HIGH` (IPv6: `[IP]:LOW-HIGH`), or
    /// one port.
    pub fn parse_ports(spec: &str) -> Result<(IpAddr, RangeInclusive<u16>), String> {
        let (ip, range) = match spec.rsplit_once(':') {
            Some((ip, r)) => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| format!("{ip:?} in {spec:?} is not an IP address"))?;
                (ip, r)
            }
            None => (IpAddr::from([0, 0, 0, 0]), spec),
        };
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{p:?} in {spec:?} is not a port (1-65535)"))
        };
        let (lo, hi) = (port(lo)?, port(hi)?);
        if lo > hi {
            return Err(format!("{spec:?}: the range runs backwards"));
        }
        Ok((ip, lo..=hi))
    }
}

/// One published service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The key that published it: a name later bound to another key loses it.
    pub key: PublicKey,
    /// Which service.
    pub service: ServiceRef,
    /// By host name over HTTP.
    pub http: bool,
    /// By TLS server name.
    pub tls: bool,
    /// The raw port, if one.
    pub port: Option<u16>,
    /// The service is UDP: its raw port is a UDP port.
    pub udp: bool,
    /// What HTTP clients must present.
    pub auth: Option<HttpAuth>,
}

/// Why a publication was refused (the shell turns it into an error frame).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Not allowed at all, or not this way.
    #[error("{0}")]
    NotAllowed(String),
    /// The port is taken or none is free.
    #[error("{0}")]
    PortTaken(String),
}

impl From<PublishError> for ErrorFrame {
    fn from(e: PublishError) -> ErrorFrame {
        let code = match e {
            PublishError::NotAllowed(_) => ErrorCode::NotAllowed,
            PublishError::PortTaken(_) => ErrorCode::PortTaken,
        };
        ErrorFrame::new(code, e.to_string())
    }
}

/// What is published where.
#[derive(Debug, Default)]
pub struct Publications {
    by_name: HashMap<String, Publication>,
    /// Port → the name holding it.
    ports: BTreeMap<u16, String>,
}

/// The registry's view, for deciding what is still valid: the key bound to a name now.
pub trait Names {
    /// The key holding `name`, if any.
    fn key_of(&self, name: &str) -> Option<PublicKey>;
}

impl Publications {
    /// Publishes `req` for `name` held by `key`, replacing what the name published before.
    /// Returns the publication, and the port the name held before and gave up (for the
    /// shell to close).
    pub fn publish(
        &mut self,
        config: &PublicConfig,
        names: &impl Names,
        has_token: bool,
        name: &str,
        key: PublicKey,
        req: &Publish,
    ) -> Result<(Publication, Option<u16>), PublishError> {
        let allowed = config.allow_any
            || config.allow.contains(&key)
            || (config.allow.is_empty() && has_token);
        if !config.enabled() {
            return Err(PublishError::NotAllowed(
                "this rendezvous publishes nothing (its operator has not given --public-http, \
                 --public-tls or --public-ports)"
                    .into(),
            ));
        }
        if !allowed {
            return Err(PublishError::NotAllowed(format!(
                "key {key} may not publish here (the operator lists keys with --publish-allow)"
            )));
        }
        let host_entry = req.http || req.tls;
        if host_entry && !wire::signal::public::is_host_label(name) {
            return Err(PublishError::NotAllowed(format!(
                "{name:?} cannot be a host name: HTTP and TLS entries need a name of lowercase \
                 letters, digits and '-' (or publish on a port)"
            )));
        }
        if req.http && config.http.is_none() {
            return Err(PublishError::NotAllowed(
                "this rendezvous has no HTTP entry (--public-http)".into(),
            ));
        }
        if req.tls && config.tls.is_none() {
            return Err(PublishError::NotAllowed(
                "this rendezvous has no TLS entry (--public-tls)".into(),
            ));
        }
        let held = self.by_name.get(name).and_then(|p| p.port);
        let port = match req.port {
            None => None,
            Some(wish) => {
                let Some((_, range)) = &config.ports else {
                    return Err(PublishError::NotAllowed(
                        "this rendezvous hands out no ports (--public-ports)".into(),
                    ));
                };
                Some(self.pick_port(names, range, name, wish.or(held))?)
            }
        };
        let gave_up = held.filter(|&h| Some(h) != port);
        if let Some(h) = gave_up {
            self.ports.remove(&h);
        }
        if let Some(p) = port {
            self.ports.insert(p, name.to_owned());
        }
        let publication = Publication {
            key,
            service: req.service,
            http: req.http,
            tls: req.tls,
            port,
            udp: req.service.proto == wire::signal::Proto::Udp,
            auth: req.auth.clone(),
        };
        self.by_name.insert(name.to_owned(), publication.clone());
        Ok((publication, gave_up))
    }

    /// A port of `range` for `name`: `wish` if free (or held by a name that no longer
    /// owns it), else, when it was only what the name held before, the lowest free one.
    fn pick_port(
        &mut self,
        names: &impl Names,
        range: &RangeInclusive<u16>,
        name: &str,
        wish: Option<u16>,
    ) -> Result<u16, PublishError> {
        let free = |p: &Publications, port: u16| match p.ports.get(&port) {
            None => true,
            Some(holder) if holder == name => true,
            Some(holder) => !p.valid(names, holder),
        };
        if let Some(w) = wish {
            if !range.contains(&w) {
                return Err(PublishError::PortTaken(format!(
                    "port {w} is outside the public ports {}-{}",
                    range.start(),
                    range.end()
                )));
            }
            if free(self, w) {
                self.drop_holder(w);
                return Ok(w);
            }
            return Err(PublishError::PortTaken(format!(
                "public port {w} is held by another name"
            )));
        }
        let port = range.clone().find(|&p| free(self, p)).ok_or_else(|| {
            PublishError::PortTaken(format!(
                "every public port ({}-{}) is taken",
                range.start(),
                range.end()
            ))
        })?;
        self.drop_holder(port);
        Ok(port)
    }

    /// Forgets the stale holder of `port`, if another name held it.
    fn drop_holder(&mut self, port: u16) {
        if let Some(holder) = self.ports.remove(&port)
            && let Some(p) = self.by_name.get_mut(&holder)
        {
            p.port = None;
        }
    }

    /// Whether `name`'s publication still belongs to the key that holds the name.
    fn valid(&self, names: &impl Names, name: &str) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|p| names.key_of(name) == Some(p.key))
    }

    /// Forgets `name`'s publication; returns the port it held.
    pub fn remove(&mut self, name: &str) -> Option<u16> {
        let port = self.by_name.remove(name)?.port?;
        self.ports.remove(&port);
        Some(port)
    }

    /// The publication of `name`, if it is still the name holder's.
    pub fn get(&self, names: &impl Names, name: &str) -> Option<&Publication> {
        self.by_name
            .get(name)
            .filter(|p| names.key_of(name) == Some(p.key))
    }

    /// The name published on `port`, if still valid.
    pub fn on_port(&self, names: &impl Names, port: u16) -> Option<&str> {
        let name = self.ports.get(&port)?;
        self.valid(names, name).then_some(name.as_str())
    }

    /// Drops publications whose name is gone or held by another key; returns the ports
    /// they held (for the shell to close).
    pub fn sweep(&mut self, names: &impl Names) -> Vec<u16> {
        let stale: Vec<String> = self
            .by_name
            .iter()
            .filter(|(n, p)| names.key_of(n) != Some(p.key))
            .map(|(n, _)| n.clone())
            .collect();
        let mut ports = Vec::new();
        for n in stale {
            if let Some(p) = self.by_name.remove(&n).and_then(|p| p.port) {
                self.ports.remove(&p);
                ports.push(p);
            }
        }
        ports
    }

    /// Every publication, sorted by name.
    pub fn list(&self, names: &impl Names) -> Vec<(&str, &Publication)> {
        let mut v: Vec<_> = self
            .by_name
            .iter()
            .filter(|(n, p)| names.key_of(n) == Some(p.key))
            .map(|(n, p)| (n.as_str(), p))
            .collect();
        v.sort_by_key(|(n, _)| *n);
        v
    }
}

/// Whether an `Authorization` header value satisfies `auth` (constant time in the secret).
pub fn authorized(auth: &HttpAuth, header: Option<&str>) -> bool {
    let Some(header) = header else { return false };
    let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
    let value = value.trim();
    let eq = |a: &[u8], b: &[u8]| {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    };
    match auth {
        HttpAuth::Basic { user, password } if scheme.eq_ignore_ascii_case("basic") => {
            let Some(decoded) = crate::http::base64_decode(value) else {
                return false;
            };
            let want = format!("{user}:{password}");
            eq(&decoded, want.as_bytes())
        }
        HttpAuth::Bearer(secret) if scheme.eq_ignore_ascii_case("bearer") => {
            eq(value.as_bytes(), secret.as_bytes())
        }
        _ => false,
    }
}

/// Paces one published name to `rate` bytes a second over all its clients, with a burst
/// of one second's worth.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket for `rate` bytes a second.
    pub fn new(rate: u64, now: Instant) -> Bucket {
        let rate = rate.max(1) as f64;
        Bucket {
            rate,
            tokens: rate,
            last: now,
        }
    }

    /// Takes `n` bytes at `now`; returns how long to wait before sending them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.rate) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// The host a published name is reached at, `NAME.DOMAIN`.
pub fn host_of(name: &str, domain: &str) -> String {
    format!("{name}.{domain}")
}

/// The published name a host routes to: `NAME.DOMAIN` (already lower-cased) → `NAME`.
pub fn name_of_host<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let name = host.strip_suffix(domain)?.strip_suffix('.')?;
    wire::signal::public::is_host_label(name).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::signal::Proto;

    struct Reg(HashMap<String, PublicKey>);
    impl Names for Reg {
        fn key_of(&self, name: &str) -> Option<PublicKey> {
            self.0.get(name).copied()
        }
    }

    fn cfg() -> PublicConfig {
        PublicConfig {
            http: Some("127.0.0.1:8080".parse().unwrap()),
            domain: Some("example.com".into()),
            ports: Some(PublicConfig::parse_ports("127.0.0.1:20000-20002").unwrap()),
            allow_any: true,
            ..PublicConfig::default()
        }
    }

    fn req(http: bool, port: Option<Option<u16>>) -> Publish {
        Publish {
            service: ServiceRef {
                port: 80,
                proto: Proto::Tcp,
            },
            http,
            tls: false,
            port,
            auth: None,
        }
    }

    #[test]
    fn ports_are_handed_out_kept_and_reclaimed_from_stale_names() {
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let mut reg = Reg(HashMap::from([("a".into(), a), ("b".into(), b)]));
        let mut p = Publications::default();
        let c = cfg();
        let (pa, _) = p
            .publish(&c, &reg, false, "a", a, &req(false, Some(None)))
            .unwrap();
        assert_eq!(pa.port, Some(20000));
        // Asking again (a reconnect) keeps the port.
        let (pa, gave) = p
            .publish(&c, &reg, false, "a", a, &req(false, Some(None)))
            .unwrap();
        assert_eq!((pa.port, gave), (Some(20000), None));
        assert_eq!(
            p.publish(&c, &reg, false, "b", b, &req(false, Some(Some(20000)))),
            Err(PublishError::PortTaken(
                "public port 20000 is held by another name".into()
            ))
        );
        let (pb, _) = p
            .publish(&c, &reg, false, "b", b, &req(false, Some(None)))
            .unwrap();
        assert_eq!(pb.port, Some(20001));
        assert_eq!(p.on_port(&reg, 20001), Some("b"));
        assert!(matches!(
            p.publish(&c, &reg, false, "b", b, &req(false, Some(Some(30000)))),
            Err(PublishError::PortTaken(_))
        ));
        // "a" is bound to another key now: its port is free for "b", and "a" shows nothing.
        reg.0.insert("a".into(), PublicKey([9; 32]));
        assert!(p.get(&reg, "a").is_none());
        assert_eq!(p.on_port(&reg, 20000), None);
        let (pb, gave) = p
            .publish(&c, &reg, false, "b", b, &req(false, Some(Some(20000))))
            .unwrap();
        assert_eq!((pb.port, gave), (Some(20000), Some(20001)));
        assert_eq!(p.on_port(&reg, 20000), Some("b"));
        assert_eq!(
            p.sweep(&reg),
            Vec::<u16>::new(),
            "a's port went to b already"
        );
        assert!(p.list(&reg).iter().all(|(n, _)| *n == "b"));
    }

    #[test]
    fn who_may_publish_and_how() {
        let k = PublicKey([1; 32]);
        let reg = Reg(HashMap::from([
            ("pc-home".into(), k),
            ("PC_Home".into(), k),
        ]));
        let mut p = Publications::default();
        let mut c = cfg();
        c.allow_any = false;
        let no = |r: Result<_, PublishError>| matches!(r, Err(PublishError::NotAllowed(_)));
        assert!(
            no(p.publish(&c, &reg, false, "pc-home", k, &req(true, None))),
            "no token, no list"
        );
        assert!(
            p.publish(&c, &reg, true, "pc-home", k, &req(true, None))
                .is_ok(),
            "token holders may"
        );
        c.allow = vec![PublicKey([7; 32])];
        assert!(
            no(p.publish(&c, &reg, true, "pc-home", k, &req(true, None))),
            "the list rules"
        );
        c.allow = vec![k];
        assert!(
            p.publish(&c, &reg, false, "pc-home", k, &req(true, None))
                .is_ok()
        );
        assert!(
            no(p.publish(&c, &reg, false, "PC_Home", k, &req(true, None))),
            "not a host label"
        );
        assert!(
            p.publish(&c, &reg, false, "PC_Home", k, &req(false, Some(None)))
                .is_ok()
        );
        c.http = None;
        assert!(
            no(p.publish(&c, &reg, false, "pc-home", k, &req(true, None))),
            "no http entry"
        );
    }

    #[test]
    fn the_bucket_holds_the_rate_after_a_one_second_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, t0);
        assert_eq!(b.take(1000, t0), Duration::ZERO, "the burst");
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // Half a second later the debt is paid; 250 more wait a quarter second.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(250, t1), Duration::from_millis(250));
        // A long idle refills only one second's worth.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.take(1000, t2), Duration::ZERO);
        assert!(b.take(1, t2) > Duration::ZERO);
    }

    #[test]
    fn hosts_and_auth() {
        assert_eq!(
            name_of_host("pc-home.example.com", "example.com"),
            Some("pc-home")
        );
        assert_eq!(name_of_host("example.com", "example.com"), None);
        assert_eq!(name_of_host("a.b.example.com", "example.com"), None);
        assert_eq!(name_of_host("pc-homeexample.com", "example.com"), None);
        let basic = HttpAuth::Basic {
            user: "amy".into(),
            password: "pw".into(),
        };
        assert!(authorized(&basic, Some("Basic YW15OnB3")));
        assert!(authorized(&basic, Some("basic  YW15OnB3")));
        assert!(!authorized(&basic, Some("Basic YW15OnB4")));
        assert!(!authorized(&basic, Some("Bearer pw")));
        assert!(!authorized(&basic, None));
        let bearer = HttpAuth::Bearer("tok".into());
        assert!(authorized(&bearer, Some("Bearer tok")));
        assert!(!authorized(&bearer, Some("Bearer tok2")));
        assert_eq!(
            PublicConfig::parse_ports("20000-20099").unwrap(),
            ("0.0.0.0".parse().unwrap(), 20000..=20099)
        );
        assert_eq!(
            PublicConfig::parse_ports("[::1]:5000").unwrap(),
            ("::1".parse().unwrap(), 5000..=5000)
        );
        assert!(PublicConfig::parse_ports("20099-20000").is_err());
        assert!(PublicConfig::parse_ports("0-10").is_err());
    }
}
