//! The NAT lab's port-mapping gateway: a NAT-PMP (RFC 6886) and PCP (RFC 6887) responder
//! that a router with the `map` option runs on its LAN address, port 5351, installing
//! real nftables rules for each mapping (Debian's miniupnpd refuses the lab's reserved
//! WAN addresses; NATLAB.md). Peers talk to it with the real client crate.
//!
//! A mapping is what RFC 6887 §11 asks of a MAP: inbound packets to the external port
//! reach the internal endpoint from anyone, and the internal endpoint's own outbound
//! packets leave from that external port (endpoint-independent both ways), whatever the
//! router's NAT kind does to other traffic. [`Gateway`] is the sans-IO state (requests in,
//! answers and rules out, expiry in virtual time); [`serve`] is the thread that runs it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The port both protocols listen on.
pub const SERVER_PORT: u16 = 5351;
/// The longest lifetime granted (RFC 6886 recommends clients ask for 2 hours).
pub const MAX_LIFETIME: u32 = 7200;
/// External ports handed out when the suggested one is taken.
const FIRST_EXTERNAL: u16 = 40000;
/// Mappings at most, all clients together.
const MAX_MAPPINGS: usize = 1024;

/// Transport protocol of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// UDP (NAT-PMP opcode 1, IANA protocol 17).
    Udp,
    /// TCP (NAT-PMP opcode 2, IANA protocol 6).
    Tcp,
}

impl Proto {
    fn nft(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }

    fn iana(self) -> u8 {
        match self {
            Proto::Udp => 17,
            Proto::Tcp => 6,
        }
    }

    fn from_iana(p: u8) -> Option<Proto> {
        match p {
            17 => Some(Proto::Udp),
            6 => Some(Proto::Tcp),
            _ => None,
        }
    }
}

/// One granted mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The external port on the router's WAN address.
    pub external: u16,
    /// When it lapses unless renewed.
    pub expires: Instant,
}

/// Which internal endpoint a mapping is for.
type Key = (Proto, Ipv4Addr, u16);

/// The gateway's state.
#[derive(Debug)]
pub struct Gateway {
    wan: Ipv4Addr,
    started: Instant,
    pcp: bool,
    mappings: BTreeMap<Key, Mapping>,
    /// The longest lifetime it grants (a short one makes clients renew often).
    max_lifetime: u32,
    /// Requests that extended a mapping still in force.
    renewals: u64,
    /// Mappings that lapsed unrenewed.
    lapsed: u64,
}

/// PCP result codes (RFC 6887 §7.4).
mod pcp {
    pub(super) const SUCCESS: u8 = 0;
    pub(super) const MALFORMED_REQUEST: u8 = 3;
    pub(super) const UNSUPP_OPCODE: u8 = 4;
    pub(super) const NO_RESOURCES: u8 = 8;
    pub(super) const UNSUPP_PROTOCOL: u8 = 9;
    pub(super) const ADDRESS_MISMATCH: u8 = 12;
    pub(super) const ANNOUNCE: u8 = 0;
    pub(super) const MAP: u8 = 1;
}

/// NAT-PMP result codes (RFC 6886 §3.5).
mod pmp {
    pub(super) const SUCCESS: u16 = 0;
    pub(super) const UNSUPP_VERSION: u16 = 1;
    pub(super) const OUT_OF_RESOURCES: u16 = 4;
    pub(super) const UNSUPP_OPCODE: u16 = 5;
}

impl Gateway {
    /// A gateway for a router whose WAN address is `wan`; `pcp: false` makes it a
    /// NAT-PMP-only gateway (PCP requests get UNSUPP_VERSION, as RFC 6887 §9 has it).
    pub fn new(wan: Ipv4Addr, pcp: bool, now: Instant) -> Gateway {
        Gateway {
            wan,
            started: now,
            pcp,
            mappings: BTreeMap::new(),
            max_lifetime: MAX_LIFETIME,
            renewals: 0,
            lapsed: 0,
        }
    }

    /// Grants at most `seconds` per mapping (at least 1).
    pub fn with_max_lifetime(mut self, seconds: u32) -> Gateway {
        self.max_lifetime = seconds.clamp(1, MAX_LIFETIME);
        self
    }

    /// How many requests extended a mapping still in force, and how many mappings lapsed
    /// because none came in time.
    pub fn renewals(&self) -> (u64, u64) {
        (self.renewals, self.lapsed)
    }

    /// The mappings now, as (protocol, internal endpoint, external port).
    pub fn mappings(&self) -> Vec<(Proto, SocketAddrV4, u16)> {
        self.mappings
            .iter()
            .map(|(&(p, ip, port), m)| (p, SocketAddrV4::new(ip, port), m.external))
            .collect()
    }

    fn epoch(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.started).as_secs()).unwrap_or(u32::MAX)
    }

    /// Answers one request from `from` (on the LAN); `None` for what deserves no answer
    /// (a response, or too short to say what it is). Changes the mappings it grants,
    /// renews or deletes.
    pub fn handle(&mut self, now: Instant, from: SocketAddrV4, req: &[u8]) -> Option<Vec<u8>> {
        match req.first()? {
            0 => self.nat_pmp(now, from, req),
            2 if self.pcp => self.pcp(now, from, req),
            _ => {
                // An unknown version: RFC 6886 §3.5 and RFC 6887 §9 both answer with the
                // highest version we speak, in that version's format.
                let op = *req.get(1)?;
                if op & 0x80 != 0 {
                    return None;
                }
                let mut r = vec![0, 0x80 | op];
                r.extend_from_slice(&pmp::UNSUPP_VERSION.to_be_bytes());
                r.extend_from_slice(&self.epoch(now).to_be_bytes());
                Some(r)
            }
        }
    }

    fn nat_pmp(&mut self, now: Instant, from: SocketAddrV4, req: &[u8]) -> Option<Vec<u8>> {
        let op = *req.get(1)?;
        if op & 0x80 != 0 {
            return None;
        }
        let mut r = vec![0, 0x80 | op];
        let head = |r: &mut Vec<u8>, code: u16, epoch: u32| {
            r.extend_from_slice(&code.to_be_bytes());
            r.extend_from_slice(&epoch.to_be_bytes());
        };
        let epoch = self.epoch(now);
        match op {
            0 => {
                head(&mut r, pmp::SUCCESS, epoch);
                r.extend_from_slice(&self.wan.octets());
            }
            1 | 2 if req.len() >= 12 => {
                let proto = if op == 1 { Proto::Udp } else { Proto::Tcp };
                let internal = u16::from_be_bytes([req[4], req[5]]);
                let suggested = u16::from_be_bytes([req[6], req[7]]);
                let lifetime = u32::from_be_bytes([req[8], req[9], req[10], req[11]]);
                let (code, external, lifetime) = if lifetime == 0 {
                    self.delete(proto, *from.ip(), internal);
                    (pmp::SUCCESS, 0, 0)
                } else if internal == 0 {
                    (pmp::UNSUPP_OPCODE, 0, 0)
                } else {
                    match self.map(now, (proto, *from.ip(), internal), suggested, lifetime) {
                        Some((ext, life)) => (pmp::SUCCESS, ext, life),
                        None => (pmp::OUT_OF_RESOURCES, 0, 0),
                    }
                };
                head(&mut r, code, epoch);
                r.extend_from_slice(&internal.to_be_bytes());
                r.extend_from_slice(&external.to_be_bytes());
                r.extend_from_slice(&lifetime.to_be_bytes());
            }
            _ => head(&mut r, pmp::UNSUPP_OPCODE, epoch),
        }
        Some(r)
    }

    fn pcp(&mut self, now: Instant, from: SocketAddrV4, req: &[u8]) -> Option<Vec<u8>> {
        let op = *req.get(1)?;
        if op & 0x80 != 0 {
            return None;
        }
        let epoch = self.epoch(now);
        // Response header (RFC 6887 §7.2): version, R|opcode, reserved, result, lifetime,
        // epoch, 12 reserved bytes; then the opcode's data, echoed back filled in.
        let answer = |code: u8, lifetime: u32, data: &[u8]| {
            let mut r = vec![2, 0x80 | op, 0, code];
            r.extend_from_slice(&lifetime.to_be_bytes());
            r.extend_from_slice(&epoch.to_be_bytes());
            r.extend_from_slice(&[0; 12]);
            r.extend_from_slice(data);
            r
        };
        if req.len() < 24 || req.len() % 4 != 0 || req.len() > 1100 {
            return Some(answer(pcp::MALFORMED_REQUEST, 0, &[]));
        }
        let lifetime = u32::from_be_bytes([req[4], req[5], req[6], req[7]]);
        let client = Ipv6Addr::from(<[u8; 16]>::try_from(&req[8..24]).ok()?);
        if client.to_ipv4_mapped() != Some(*from.ip()) {
            // Behind a NAT of its own the client cannot map anything (§8.1).
            return Some(answer(pcp::ADDRESS_MISMATCH, 0, &[]));
        }
        match op {
            pcp::ANNOUNCE => Some(answer(pcp::SUCCESS, 0, &[])),
            pcp::MAP if req.len() >= 60 => {
                let mut data = req[24..60].to_vec();
                let proto = data[12];
                let internal = u16::from_be_bytes([data[16], data[17]]);
                let suggested = u16::from_be_bytes([data[18], data[19]]);
                let Some(p) = Proto::from_iana(proto) else {
                    return Some(answer(pcp::UNSUPP_PROTOCOL, 0, &data));
                };
                if internal == 0 {
                    // "All ports" mappings are not offered.
                    return Some(answer(pcp::UNSUPP_PROTOCOL, 0, &data));
                }
                let key = (p, *from.ip(), internal);
                if lifetime == 0 {
                    self.delete(p, *from.ip(), internal);
                    return Some(answer(pcp::SUCCESS, 0, &data));
                }
                match self.map(now, key, suggested, lifetime) {
                    Some((ext, life)) => {
                        data[18..20].copy_from_slice(&ext.to_be_bytes());
                        data[20..36].copy_from_slice(&self.wan.to_ipv6_mapped().octets());
                        debug_assert_eq!(p.iana(), proto);
                        Some(answer(pcp::SUCCESS, life, &data))
                    }
                    None => Some(answer(pcp::NO_RESOURCES, 0, &data)),
                }
            }
            pcp::MAP => Some(answer(pcp::MALFORMED_REQUEST, 0, &[])),
            _ => Some(answer(pcp::UNSUPP_OPCODE, 0, &[])),
        }
    }

    /// Grants or renews the mapping for `key`: the suggested external port if free, else
    /// the internal one, else the first free from 40000. Returns (external port, lifetime).
    fn map(&mut self, now: Instant, key: Key, suggested: u16, lifetime: u32) -> Option<(u16, u32)> {
        let life = lifetime.min(self.max_lifetime);
        let expires = now + Duration::from_secs(u64::from(life));
        if let Some(m) = self.mappings.get_mut(&key) {
            m.expires = expires;
            self.renewals += 1;
            return Some((m.external, life));
        }
        if self.mappings.len() >= MAX_MAPPINGS {
            return None;
        }
        let taken = |port: u16, maps: &BTreeMap<Key, Mapping>| {
            maps.iter().any(|(k, m)| k.0 == key.0 && m.external == port)
        };
        let external = [suggested, key.2]
            .into_iter()
            .find(|&p| p >= 1024 && !taken(p, &self.mappings))
            .or_else(|| (FIRST_EXTERNAL..=u16::MAX).find(|&p| !taken(p, &self.mappings)))?;
        self.mappings.insert(key, Mapping { external, expires });
        Some((external, life))
    }

    fn delete(&mut self, proto: Proto, ip: Ipv4Addr, internal: u16) {
        if internal == 0 {
            // NAT-PMP: internal port 0 with lifetime 0 removes all of the client's.
            self.mappings.retain(|k, _| !(k.0 == proto && k.1 == ip));
        } else {
            self.mappings.remove(&(proto, ip, internal));
        }
    }

    /// Drops the mappings that lapsed by `now`; whether any did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.mappings.len();
        self.mappings.retain(|_, m| m.expires > now);
        self.lapsed += (before - self.mappings.len()) as u64;
        self.mappings.len() != before
    }

    /// When the next mapping lapses.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.mappings.values().map(|m| m.expires).min()
    }

    /// The nft script that makes the router's two port-mapping chains hold exactly the
    /// current mappings: inbound DNAT to the internal endpoint, and outbound SNAT from it
    /// to the external port (these chains run just before the router's own NAT chains,
    /// and the first NAT decision for a connection is the one kept).
    pub fn rules(&self) -> String {
        let mut s = String::from("flush chain ip natlab pm_pre\nflush chain ip natlab pm_post\n");
        for (&(p, ip, port), m) in &self.mappings {
            let proto = p.nft();
            let ext = m.external;
            s += &format!(
                "add rule ip natlab pm_pre iifname \"wan0\" {proto} dport {ext} dnat ip to {ip}:{port}\n"
            );
            s += &format!(
                "add rule ip natlab pm_post oifname \"wan0\" ip saddr {ip} {proto} sport {port} \
                 snat ip to {}:{ext}\n",
                self.wan
            );
        }
        s
    }
}

/// The chains a router with the `map` option gets in its `ip natlab` table, empty until
/// the gateway fills them.
pub fn chains() -> String {
    "  chain pm_pre { type nat hook prerouting priority dstnat - 1; policy accept; }\n  \
     chain pm_post { type nat hook postrouting priority srcnat - 1; policy accept; }\n"
        .to_owned()
}

/// Serves `gateway` on `socket` (bound to the router's LAN address, port 5351, inside its
/// namespace) until `stop` is set, handing every rule change to `apply` (which runs nft
/// in the router's namespace) and its renewal counts to `counts`. Errors from `apply` are printed and the mapping stays
/// granted: the test that needs it will fail with the cause on stderr.
pub fn serve(
    socket: UdpSocket,
    mut gateway: Gateway,
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<(u64, u64)>>,
    apply: impl Fn(&str) -> Result<(), String>,
) {
    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 1100];
    let mut applied = gateway.rules();
    while !stop.load(Ordering::Relaxed) {
        let got = socket.recv_from(&mut buf);
        let now = Instant::now();
        let mut answer = None;
        if let Ok((n, SocketAddr::V4(from))) = got {
            answer = gateway.handle(now, from, &buf[..n]).map(|a| (a, from));
        }
        gateway.expire(now);
        let rules = gateway.rules();
        if rules != applied {
            // Rules first, then the answer: a client told "mapped" may use it at once.
            if let Err(e) = apply(&rules) {
                eprintln!("portmapd: installing mapping rules failed: {e}");
            }
            applied = rules;
        }
        *counts.lock().unwrap_or_else(|e| e.into_inner()) = gateway.renewals();
        if let Some((a, to)) = answer {
            let _ = socket.send_to(&a, to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    const HOST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 2), 50000);

    fn pmp_map(op: u8, internal: u16, suggested: u16, lifetime: u32) -> Vec<u8> {
        let mut r = vec![0, op, 0, 0];
        r.extend_from_slice(&internal.to_be_bytes());
        r.extend_from_slice(&suggested.to_be_bytes());
        r.extend_from_slice(&lifetime.to_be_bytes());
        r
    }

    fn pcp_map(
        client: Ipv4Addr,
        nonce: u8,
        internal: u16,
        suggested: u16,
        lifetime: u32,
    ) -> Vec<u8> {
        let mut r = vec![2, 1, 0, 0];
        r.extend_from_slice(&lifetime.to_be_bytes());
        r.extend_from_slice(&client.to_ipv6_mapped().octets());
        r.extend_from_slice(&[nonce; 12]);
        r.extend_from_slice(&[17, 0, 0, 0]);
        r.extend_from_slice(&internal.to_be_bytes());
        r.extend_from_slice(&suggested.to_be_bytes());
        r.extend_from_slice(&[0; 16]);
        r
    }

    #[test]
    fn nat_pmp_tells_the_address_and_maps_renews_and_deletes() {
        let t0 = Instant::now();
        let mut g = Gateway::new(WAN, true, t0);
        let a = g.handle(t0, HOST, &[0, 0]).unwrap();
        assert_eq!(a, [0, 128, 0, 0, 0, 0, 0, 0, 198, 18, 1, 1]);
        let a = g.handle(t0, HOST, &pmp_map(1, 50000, 0, 100_000)).unwrap();
        // Lifetime capped; the internal port is free, so it is the external one too.
        assert_eq!(a[..4], [0, 129, 0, 0]);
        assert_eq!(u16::from_be_bytes([a[8], a[9]]), 50000);
        assert_eq!(u16::from_be_bytes([a[10], a[11]]), 50000);
        assert_eq!(
            u32::from_be_bytes([a[12], a[13], a[14], a[15]]),
            MAX_LIFETIME
        );
        assert!(
            g.rules()
                .contains("udp dport 50000 dnat ip to 198.19.1.2:50000")
        );
        assert!(
            g.rules()
                .contains("ip saddr 198.19.1.2 udp sport 50000 snat ip to 198.18.1.1:50000")
        );
        // Another host asking for the same port gets the next free one.
        let other = SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 3), 50000);
        let a = g.handle(t0, other, &pmp_map(1, 50000, 50000, 60)).unwrap();
        assert_eq!(u16::from_be_bytes([a[10], a[11]]), FIRST_EXTERNAL);
        // Expiry in virtual time: only the short one lapses.
        assert!(g.expire(t0 + Duration::from_secs(61)));
        assert_eq!(g.mappings().len(), 1);
        // Lifetime 0 deletes.
        let a = g.handle(t0, HOST, &pmp_map(1, 50000, 0, 0)).unwrap();
        assert_eq!(a[2..4], [0, 0]);
        assert!(g.mappings().is_empty());
        assert!(!g.rules().contains("dnat"));
    }

    #[test]
    fn a_short_lifetime_is_granted_and_renewals_and_lapses_are_counted() {
        let t0 = Instant::now();
        let mut g = Gateway::new(WAN, true, t0).with_max_lifetime(4);
        let life = |a: &[u8]| u32::from_be_bytes([a[12], a[13], a[14], a[15]]);
        let a = g.handle(t0, HOST, &pmp_map(1, 50000, 0, 7200)).unwrap();
        assert_eq!(life(&a), 4);
        // Renewed at half its life, it outlives its first grant.
        let t2 = t0 + Duration::from_secs(2);
        let a = g.handle(t2, HOST, &pmp_map(1, 50000, 0, 7200)).unwrap();
        assert_eq!((life(&a), u16::from_be_bytes([a[10], a[11]])), (4, 50000));
        assert!(!g.expire(t0 + Duration::from_secs(5)));
        assert_eq!(g.renewals(), (1, 0));
        // Not renewed again: it lapses.
        assert!(g.expire(t2 + Duration::from_secs(5)));
        assert_eq!(g.renewals(), (1, 1));
    }

    #[test]
    fn pcp_maps_with_its_nonce_and_refuses_a_client_behind_another_nat() {
        let t0 = Instant::now();
        let mut g = Gateway::new(WAN, true, t0);
        let a = g
            .handle(t0, HOST, &pcp_map(*HOST.ip(), 7, 50000, 0, 7200))
            .unwrap();
        assert_eq!(a.len(), 60);
        assert_eq!(a[..4], [2, 0x81, 0, pcp::SUCCESS]);
        assert_eq!(a[24..36], [7; 12]);
        assert_eq!(u16::from_be_bytes([a[42], a[43]]), 50000);
        assert_eq!(
            Ipv6Addr::from(<[u8; 16]>::try_from(&a[44..60]).unwrap()),
            WAN.to_ipv6_mapped()
        );
        // The client address field must be where the request came from.
        let a = g
            .handle(
                t0,
                HOST,
                &pcp_map(Ipv4Addr::new(10, 0, 0, 2), 7, 50000, 0, 7200),
            )
            .unwrap();
        assert_eq!(a[3], pcp::ADDRESS_MISMATCH);
        // Delete.
        let a = g
            .handle(t0, HOST, &pcp_map(*HOST.ip(), 7, 50000, 0, 0))
            .unwrap();
        assert_eq!((a[3], g.mappings().len()), (pcp::SUCCESS, 0));
        // Garbage: malformed, no panic; responses are not answered.
        let a = g.handle(t0, HOST, &[2, 1, 0]).unwrap();
        assert_eq!(a[3], pcp::MALFORMED_REQUEST);
        assert_eq!(g.handle(t0, HOST, &[2, 0x81]), None);
        assert_eq!(g.handle(t0, HOST, &[]), None);
    }

    #[test]
    fn a_nat_pmp_only_gateway_answers_pcp_with_unsupported_version() {
        let t0 = Instant::now();
        let mut g = Gateway::new(WAN, false, t0);
        let a = g
            .handle(t0, HOST, &pcp_map(*HOST.ip(), 1, 50000, 0, 60))
            .unwrap();
        assert_eq!(a[..4], [0, 0x81, 0, 1]);
        assert!(g.mappings().is_empty());
    }
}
