//! The NAT lab: real kernel NATs of every kind, built from network namespaces, veths and
//! nftables, for `scripts/natlab` and for tests that need a NAT between two peers.
//!
//! # Topology
//!
//! - `server`: the "internet" namespace. It holds the bridge every WAN side plugs into and
//!   the server host's two IPs ([`SERVER_IP`], [`SERVER_ALT_IP`]), so an RFC 5780 STUN
//!   server can answer from a second address.
//! - `third`: another public host ([`THIRD_IP`]), for "does a stranger get in" checks.
//! - one namespace per router (named as given), its WAN side on the bridge at
//!   198.18.1.N, its LAN a bridge `lan0` at 198.19.N.1/24;
//! - hosts behind it, `ROUTER-1`, `ROUTER-2`, … at 198.19.N.2, .3, … A router of kind
//!   `none` has no namespace: its hosts sit on the bridge with public addresses 198.18.(10+N).x.
//!
//! Every address, LAN sides too, is in 198.18.0.0/15. Veths are made directly inside the
//! lab's namespaces, so the root namespace is never touched and deleting the namespaces
//! removes everything.
//!
//! # The NATs (RFC 4787 terms; NATLAB.md has the kernel facts behind them)
//!
//! Every router records, after source NAT, which WAN port belongs to which internal
//! ip:port (the nft map `mapping`) and reuses that port for the same internal endpoint, so
//! mapping is strictly endpoint-independent for the cone kinds. Filtering:
//!
//! | kind | mapping | filtering |
//! |---|---|---|
//! | `full-cone` | endpoint-independent | endpoint-independent (inbound DNAT through the map) |
//! | `address-restricted` | endpoint-independent | address-dependent (a set of mapped port . remote IP) |
//! | `port-restricted` | endpoint-independent | address-and-port-dependent (conntrack) |
//! | `symmetric-random` | address-and-port-dependent, random ports | address-and-port-dependent |
//! | `symmetric-sequential` | address-and-port-dependent, port + delta per mapping (UDP and TCP counted apart) | address-and-port-dependent |
//! | `one-to-one` | the first host *is* the WAN address, every port both ways (a cloud VM's 1:1 NAT: the host does not know its public address) | none |
//! | `firewall` | IPv6 only, no NAT: hosts have global addresses | stateful: in only what answers something sent out (address-and-port-dependent) |
//!
//! # IPv6
//!
//! A router with the `v6` option (always on for `firewall`) is dual stack: besides its
//! IPv4 NAT, its LAN has 2001:2:0:N::/64 (router `::1`, hosts `::2`, …), routed without
//! translation through a stateful firewall (`table inet natlab6`), its WAN side
//! 2001:2::1:N on the internet bridge; `server` then has 2001:2::1 ([`SERVER_IP6`]) and
//! 2001:2::2 ([`SERVER_ALT_IP6`], for an RFC 5780 server over IPv6) and
//! `third` 2001:2::3, and every public namespace routes each such LAN prefix to its
//! router. IPv6 global addresses are all in 2001:2::/48 (RFC 5180); links also get
//! fe80:: link-local addresses, which neighbour discovery needs and which never leave
//! their veth. Namespaces without IPv6 routers keep IPv6 off.
//!
//! Options per router: `hairpin` (LAN packets to the WAN address are sent back in through
//! the map), `timeout=S` (UDP conntrack and map entries), `loss=PCT` (dropped at random in
//! the forward path), `delta=D` (sequential step), `hosts=N`, `v6` (dual stack, below),
//! `map` (a NAT-PMP and PCP gateway on its LAN address, port 5351, that installs real
//! DNAT/SNAT rules per mapping: [`crate::portmapd`]; `map=pmp` speaks NAT-PMP only;
//! `maplife=S` grants at most S seconds, so clients renew often). The gateway is a thread of the process holding the [`Lab`] (a test, punchbench), so a lab
//! made by `scripts/natlab up` has none.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// The STUN server host's primary address, in the `server` namespace.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The server host's second address (RFC 5780 OTHER-ADDRESS).
pub const SERVER_ALT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A third public endpoint, in the `third` namespace.
pub const THIRD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The server host's IPv6 address, when a router of the lab has IPv6 (2001:2::/48, RFC
/// 5180's benchmarking prefix, as every IPv6 address of the lab).
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// The server host's second IPv6 address (an RFC 5780 server over IPv6).
pub const SERVER_ALT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// The third host's IPv6 address.
pub const THIRD_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 3);

/// One router of every kind, plus a second port-restricted one with hairpinning and a
/// sequential NAT with delta 3: what the lab's self-test and natprobe's lab test classify.
pub const EVERY_KIND_ROUTERS: [&str; 7] = [
    "pub=none",
    "fc=full-cone",
    "ar=address-restricted",
    "pr=port-restricted,hairpin",
    "pr0=port-restricted",
    "symr=symmetric-random",
    "syms=symmetric-sequential,delta=3",
];

/// Prefix of every namespace the lab makes: `natlab-<lab>-<host>`.
const NS_PREFIX: &str = "natlab-";
/// The "internet" is one /16 on the bridge: servers in 198.18.0.x, router WANs in
/// 198.18.1.x, public hosts in 198.18.(10+N).x.
const INTERNET_PREFIX: u8 = 16;
/// The ports a sequential NAT hands out, as Linux does for sources above 1023: it walks
/// 1024–65535 and wraps. The whole range, so that a test run rarely wraps (a wrap hands
/// out ports whose old conntrack entries may still live) and a prediction across the
/// wrap is tested like a real one: an earlier table of 4096 ports wrapped several times
/// in one hard-pair test and sent the predicted ports past its end.
const SEQUENTIAL_FIRST: u32 = 1024;
const SEQUENTIAL_PORTS: u32 = 65536 - SEQUENTIAL_FIRST;
/// Default mapping timeout: one minute, within what home routers use (RFC 4787 asks for
/// two minutes; many NATs give less, and peers must cope).
pub const DEFAULT_TIMEOUT_S: u32 = 60;

/// What a router does to traffic crossing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// No NAT: hosts with public addresses.
    None,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    AddressRestricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// A new random port for every destination.
    SymmetricRandom,
    /// A new port for every destination, each `delta` above the last.
    SymmetricSequential,
    /// Static 1:1 NAT of the first host: a cloud server's public address that is not on
    /// the machine. Not among [`Kind::ALL`] (those are what peers sit behind).
    OneToOne,
    /// IPv6 only, no NAT: a stateful firewall that lets out anything and in only what
    /// answers it (the v6 analogue of address-and-port-dependent filtering). Its hosts have
    /// no IPv4 way out. Not among [`Kind::ALL`].
    Firewall,
}

impl Kind {
    /// Every kind, in the order of the table above.
    pub const ALL: [Kind; 6] = [
        Kind::None,
        Kind::FullCone,
        Kind::AddressRestricted,
        Kind::PortRestricted,
        Kind::SymmetricRandom,
        Kind::SymmetricSequential,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::FullCone => "full-cone",
            Kind::AddressRestricted => "address-restricted",
            Kind::PortRestricted => "port-restricted",
            Kind::SymmetricRandom => "symmetric-random",
            Kind::SymmetricSequential => "symmetric-sequential",
            Kind::OneToOne => "one-to-one",
            Kind::Firewall => "firewall",
        }
    }

    /// A short router name for the kind, used by [`Spec::every_kind`].
    pub fn short(self) -> &'static str {
        match self {
            Kind::None => "pub",
            Kind::FullCone => "fc",
            Kind::AddressRestricted => "ar",
            Kind::PortRestricted => "pr",
            Kind::SymmetricRandom => "symr",
            Kind::SymmetricSequential => "syms",
            Kind::OneToOne => "vps",
            Kind::Firewall => "fw",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Kind, LabError> {
        Kind::ALL
            .into_iter()
            .chain([Kind::OneToOne, Kind::Firewall])
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                LabError::Spec(format!(
                    "unknown router kind {s:?}: one of none, full-cone, address-restricted, \
                 port-restricted, symmetric-random, symmetric-sequential, one-to-one, firewall"
                ))
            })
    }
}

/// One router and the hosts behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    /// Its name; hosts are `NAME-1`, `NAME-2`, …
    pub name: String,
    /// What NAT it is.
    pub kind: Kind,
    /// Whether LAN packets to the WAN address come back in (hairpinning).
    pub hairpin: bool,
    /// UDP mapping timeout in seconds.
    pub timeout_s: u32,
    /// Percentage of forwarded packets dropped, each direction.
    pub loss_pct: u8,
    /// Port step of a sequential NAT.
    pub delta: u16,
    /// How many hosts sit behind it.
    pub hosts: u8,
    /// Dual stack: its LAN also has IPv6 (2001:2:0:N::/64, no NAT) behind a stateful
    /// firewall. Always on for [`Kind::Firewall`].
    pub v6: bool,
    /// A port-mapping gateway on its LAN address (NAT-PMP, and PCP unless `map_pcp` is
    /// off): [`crate::portmapd`].
    pub map: bool,
    /// Whether the gateway speaks PCP besides NAT-PMP.
    pub map_pcp: bool,
    /// The longest lifetime (seconds) its gateway grants; short ones make clients renew.
    pub map_lifetime: u32,
}

impl Router {
    /// A router with default options: no hairpin, 60 s timeout, no loss, delta 1, one host.
    pub fn new(name: &str, kind: Kind) -> Router {
        Router {
            name: name.to_owned(),
            kind,
            hairpin: false,
            timeout_s: DEFAULT_TIMEOUT_S,
            loss_pct: 0,
            delta: 1,
            hosts: 1,
            v6: kind == Kind::Firewall,
            map: false,
            map_pcp: true,
            map_lifetime: crate::portmapd::MAX_LIFETIME,
        }
    }
}

/// `NAME=KIND[,hairpin][,timeout=S][,loss=PCT][,delta=D][,hosts=N][,v6][,map[=pmp]][,maplife=S]`
impl FromStr for Router {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Router, LabError> {
        let bad = |why: String| LabError::Spec(format!("router {s:?}: {why}"));
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=KIND[,option…]".into()))?;
        let valid = !name.is_empty()
            && name.len() <= 12
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && !["server", "third"].contains(&name);
        if !valid {
            return Err(bad(
                "names are 1-12 lowercase letters or digits, not server or third".into(),
            ));
        }
        let mut parts = rest.split(',');
        let kind: Kind = parts.next().unwrap_or_default().parse()?;
        let mut r = Router::new(name, kind);
        for opt in parts {
            let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
            let num = |max: u32| -> Result<u32, LabError> {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| bad(format!("{k} takes a number 1..={max}, not {v:?}")))
            };
            match k {
                "hairpin" if v.is_empty() || v == "on" => r.hairpin = true,
                "hairpin" if v == "off" => r.hairpin = false,
                "timeout" => r.timeout_s = num(3600)?,
                "loss" => r.loss_pct = num(99)? as u8,
                "delta" => r.delta = num(1000)? as u16,
                "hosts" => r.hosts = num(200)? as u8,
                "v6" if v.is_empty() || v == "on" => r.v6 = true,
                "map" if v.is_empty() || v == "on" => r.map = true,
                "map" if v == "pmp" => (r.map, r.map_pcp) = (true, false),
                "maplife" => r.map_lifetime = num(crate::portmapd::MAX_LIFETIME)?,
                _ => {
                    return Err(bad(format!(
                        "unknown option {opt:?}: hairpin[=on|off], timeout=S, loss=PCT, \
                         delta=D, hosts=N, v6, map[=pmp], maplife=S"
                    )));
                }
            }
        }
        Ok(r)
    }
}

impl fmt::Display for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.kind)?;
        if self.hairpin {
            f.write_str(",hairpin")?;
        }
        if self.timeout_s != DEFAULT_TIMEOUT_S {
            write!(f, ",timeout={}", self.timeout_s)?;
        }
        if self.loss_pct > 0 {
            write!(f, ",loss={}", self.loss_pct)?;
        }
        if self.delta != 1 {
            write!(f, ",delta={}", self.delta)?;
        }
        if self.hosts != 1 {
            write!(f, ",hosts={}", self.hosts)?;
        }
        if self.v6 && self.kind != Kind::Firewall {
            f.write_str(",v6")?;
        }
        match (self.map, self.map_pcp) {
            (true, true) => f.write_str(",map")?,
            (true, false) => f.write_str(",map=pmp")?,
            _ => {}
        }
        if self.map_lifetime != crate::portmapd::MAX_LIFETIME {
            write!(f, ",maplife={}", self.map_lifetime)?;
        }
        Ok(())
    }
}

/// A whole lab: its name (namespaces are `natlab-<name>-<host>`) and its routers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Short name, so several labs can exist side by side.
    pub lab: String,
    /// The routers, each with its hosts.
    pub routers: Vec<Router>,
}

impl Spec {
    /// A lab with the given routers; checks names are unique and fit.
    pub fn new(lab: &str, routers: Vec<Router>) -> Result<Spec, LabError> {
        let ok = !lab.is_empty()
            && lab.len() <= 16
            && lab
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !ok {
            return Err(LabError::Spec(format!(
                "lab name {lab:?}: 1-16 lowercase letters or digits"
            )));
        }
        if routers.len() > 200 {
            return Err(LabError::Spec("at most 200 routers".into()));
        }
        for (i, r) in routers.iter().enumerate() {
            if routers[..i].iter().any(|o| o.name == r.name) {
                return Err(LabError::Spec(format!("router {:?} given twice", r.name)));
            }
        }
        Ok(Spec {
            lab: lab.to_owned(),
            routers,
        })
    }

    /// One router of every kind, named by [`Kind::short`], default options.
    pub fn every_kind(lab: &str) -> Result<Spec, LabError> {
        Spec::new(
            lab,
            Kind::ALL
                .iter()
                .map(|k| Router::new(k.short(), *k))
                .collect(),
        )
    }

    /// Whether any router has IPv6 (then `server` and `third` have it too).
    pub fn has_v6(&self) -> bool {
        self.routers.iter().any(|r| r.v6)
    }

    /// Every host in the lab, `server` and `third` first.
    pub fn hosts(&self) -> Vec<Host> {
        let mut v = vec![
            Host {
                name: "server".into(),
                ns: self.ns("server"),
                addr: SERVER_IP,
                router: None,
                addr6: self.has_v6().then_some(SERVER_IP6),
            },
            Host {
                name: "third".into(),
                ns: self.ns("third"),
                addr: THIRD_IP,
                router: None,
                addr6: self.has_v6().then_some(THIRD_IP6),
            },
        ];
        for (i, r) in self.routers.iter().enumerate() {
            for j in 0..r.hosts {
                let name = format!("{}-{}", r.name, j + 1);
                v.push(Host {
                    ns: self.ns(&name),
                    addr: host_addr(i, r.kind, j),
                    router: Some(r.clone()),
                    addr6: r.v6.then(|| lan6(i, u16::from(j) + 2)),
                    name,
                });
            }
        }
        v
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<Host, LabError> {
        self.hosts()
            .into_iter()
            .find(|h| h.name == name)
            .ok_or_else(|| {
                LabError::Spec(format!(
                    "no host {name:?} in lab {}; hosts: {}",
                    self.lab,
                    self.hosts()
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// The WAN address of router number `i`.
    pub fn wan(&self, router: &str) -> Option<Ipv4Addr> {
        let i = self.routers.iter().position(|r| r.name == router)?;
        (self.routers[i].kind != Kind::None).then(|| router_wan(i))
    }

    fn ns(&self, host: &str) -> String {
        format!("{NS_PREFIX}{}-{host}", self.lab)
    }

    /// Every command that builds the lab, in order (sans-IO: [`Lab::up`] runs them).
    pub fn plan(&self) -> Vec<Step> {
        let mut p = Vec::new();
        let inet = self.ns("server");
        let third = self.ns("third");
        let v6 = self.has_v6();
        for ns in [&inet, &third] {
            p.extend(Step::netns_v6(ns, v6));
        }
        p.push(Step::ip(&inet, "link add br0 type bridge"));
        p.push(Step::ip(&inet, "link set br0 up"));
        p.push(Step::Sysctl {
            ns: inet.clone(),
            key: "net.bridge.bridge-nf-call-iptables".into(),
            value: "0".into(),
            optional: true,
        });
        for ip in [SERVER_IP, SERVER_ALT_IP] {
            p.push(Step::ip(
                &inet,
                &format!("addr add {ip}/{INTERNET_PREFIX} dev br0"),
            ));
        }
        let mut port = 0;
        let mut plug = |p: &mut Vec<Step>, ns: &str, ifname: &str| {
            port += 1;
            p.push(Step::Ip(vec![
                "link".into(),
                "add".into(),
                ifname.into(),
                "netns".into(),
                ns.into(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                format!("v{port}"),
                "netns".into(),
                inet.clone(),
            ]));
            p.push(Step::ip(&inet, &format!("link set v{port} master br0")));
            p.push(Step::ip(&inet, &format!("link set v{port} up")));
            p.push(Step::ip(ns, &format!("link set {ifname} up")));
        };
        plug(&mut p, &third, "eth0");
        p.push(Step::ip(
            &third,
            &format!("addr add {THIRD_IP}/{INTERNET_PREFIX} dev eth0"),
        ));
        if v6 {
            p.push(Step::ip(
                &inet,
                &format!("-6 addr add {SERVER_IP6}/64 dev br0 nodad"),
            ));
            // A second address, as many servers have: the kernel's source for packets to
            // the lab's hosts is this newer one, so servers on [::] must answer from the
            // address each request was sent to (their replies from this one would be
            // dropped by the hosts' stateful firewalls).
            p.push(Step::ip(
                &inet,
                &format!("-6 addr add {SERVER_ALT_IP6}/64 dev br0 nodad"),
            ));
            p.push(Step::ip(
                &third,
                &format!("-6 addr add {THIRD_IP6}/64 dev eth0 nodad"),
            ));
        }
        for (i, r) in self.routers.iter().enumerate() {
            let hosts: Vec<Host> = (0..r.hosts)
                .map(|j| {
                    let name = format!("{}-{}", r.name, j + 1);
                    Host {
                        ns: self.ns(&name),
                        addr: host_addr(i, r.kind, j),
                        router: Some(r.clone()),
                        addr6: r.v6.then(|| lan6(i, u16::from(j) + 2)),
                        name,
                    }
                })
                .collect();
            if r.kind == Kind::None {
                for h in &hosts {
                    p.extend(Step::netns(&h.ns));
                    plug(&mut p, &h.ns, "eth0");
                    p.push(Step::ip(
                        &h.ns,
                        &format!("addr add {}/{INTERNET_PREFIX} dev eth0", h.addr),
                    ));
                }
                continue;
            }
            let rns = self.ns(&r.name);
            let wan = router_wan(i);
            p.extend(Step::netns_v6(&rns, r.v6));
            plug(&mut p, &rns, "wan0");
            p.push(Step::ip(
                &rns,
                &format!("addr add {wan}/{INTERNET_PREFIX} dev wan0"),
            ));
            p.push(Step::ip(&rns, "link add lan0 type bridge"));
            p.push(Step::ip(&rns, "link set lan0 up"));
            p.push(Step::ip(
                &rns,
                &format!("addr add {}/24 dev lan0", router_lan(i)),
            ));
            for (key, value, optional) in [
                ("net.ipv4.ip_forward", "1".to_string(), false),
                ("net.bridge.bridge-nf-call-iptables", "0".into(), true),
                (
                    "net.netfilter.nf_conntrack_udp_timeout",
                    r.timeout_s.to_string(),
                    false,
                ),
                (
                    "net.netfilter.nf_conntrack_udp_timeout_stream",
                    r.timeout_s.to_string(),
                    false,
                ),
            ] {
                p.push(Step::Sysctl {
                    ns: rns.clone(),
                    key: key.into(),
                    value,
                    optional,
                });
            }
            p.push(Step::Nft {
                ns: rns.clone(),
                script: nft_script(r, wan, i),
            });
            if r.v6 {
                p.push(Step::ip(
                    &rns,
                    &format!("-6 addr add {}/64 dev wan0 nodad", router_wan6(i)),
                ));
                p.push(Step::ip(
                    &rns,
                    &format!("-6 addr add {}/64 dev lan0 nodad", lan6(i, 1)),
                ));
                p.push(Step::Sysctl {
                    ns: rns.clone(),
                    key: "net.ipv6.conf.all.forwarding".into(),
                    value: "1".into(),
                    optional: false,
                });
            }
            for (j, h) in hosts.iter().enumerate() {
                p.extend(Step::netns_v6(&h.ns, r.v6));
                p.push(Step::Ip(
                    [
                        "link", "add", "eth0", "netns", &h.ns, "type", "veth", "peer", "name",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([format!("h{}", j + 1), "netns".into(), rns.clone()])
                    .collect(),
                ));
                p.push(Step::ip(&rns, &format!("link set h{} master lan0", j + 1)));
                p.push(Step::ip(&rns, &format!("link set h{} up", j + 1)));
                p.push(Step::ip(&h.ns, "link set eth0 up"));
                p.push(Step::ip(&h.ns, &format!("addr add {}/24 dev eth0", h.addr)));
                p.push(Step::ip(
                    &h.ns,
                    &format!("route add default via {}", router_lan(i)),
                ));
                if let Some(a6) = h.addr6 {
                    p.push(Step::ip(
                        &h.ns,
                        &format!("-6 addr add {a6}/64 dev eth0 nodad"),
                    ));
                    p.push(Step::ip(
                        &h.ns,
                        &format!("-6 route add default via {}", lan6(i, 1)),
                    ));
                }
            }
        }
        // No NAT on IPv6: every public namespace routes each router's LAN prefix to it.
        for (k, r) in self.routers.iter().enumerate() {
            if !r.v6 || r.kind == Kind::None {
                continue;
            }
            let mut on = vec![inet.clone(), third.clone()];
            on.extend(
                self.routers
                    .iter()
                    .filter(|o| o.v6 && o.kind != Kind::None && o.name != r.name)
                    .map(|o| self.ns(&o.name)),
            );
            for ns in on {
                p.push(Step::ip(
                    &ns,
                    &format!("-6 route add {}/64 via {}", lan6(k, 0), router_wan6(k)),
                ));
            }
        }
        p
    }
}

/// One host of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Its name for `scripts/natlab exec`.
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its own address (the LAN address behind a NAT).
    pub addr: Ipv4Addr,
    /// The router it sits behind; `None` for `server` and `third`.
    pub router: Option<Router>,
    /// Its IPv6 address, behind a router with IPv6 (and `server`, `third` in such a lab).
    pub addr6: Option<Ipv6Addr>,
}

/// Router `i`'s IPv6 WAN address on the internet bridge (2001:2::/64).
fn router_wan6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 1, i as u16 + 1)
}

/// An address in router `i`'s IPv6 LAN prefix, 2001:2:0:N::/64: `::1` the router's,
/// `::2`, `::3`, … its hosts'.
fn lan6(i: usize, h: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, i as u16 + 1, 0, 0, 0, h)
}

fn router_wan(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, i as u8 + 1)
}

fn router_lan(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, i as u8 + 1, 1)
}

fn host_addr(i: usize, kind: Kind, j: u8) -> Ipv4Addr {
    if kind == Kind::None {
        Ipv4Addr::new(198, 18, 10 + i as u8, j + 1)
    } else {
        Ipv4Addr::new(198, 19, i as u8 + 1, j + 2)
    }
}

/// The nftables ruleset of one router (see the module doc for what each kind does).
fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn nft_script(r: &Router, wan: Ipv4Addr, i: usize) -> String {
    let t = r.timeout_s;
    let lan = format!("198.19.{}.0/24", i + 1);
    let mut s = String::new();
    s += "table ip natlab {\n";
    // Which WAN port belongs to which internal endpoint, and (reverse) which port an
    // internal endpoint already has: the reverse map makes the mapping strictly
    // endpoint-independent even when two hosts use the same source port.
    s += &format!(
        "  map mapping {{ typeof meta l4proto . th dport : ip saddr . th sport; \
         flags dynamic,timeout; timeout {t}s; size 65535; }}\n"
    );
    s += &format!(
        "  map reverse {{ typeof meta l4proto . ip saddr . th sport : th dport; \
         flags dynamic,timeout; timeout {t}s; size 65535; }}\n"
    );
    s += &format!(
        "  set peers {{ typeof meta l4proto . th dport . ip saddr; \
         flags dynamic,timeout; timeout {t}s; size 65535; }}\n"
    );
    if r.map {
        s += &crate::portmapd::chains();
    }
    s += "  chain post { type nat hook postrouting priority srcnat; policy accept;\n";
    if r.hairpin {
        // A hairpinned packet leaves on the LAN again; make it come from the WAN address
        // so the receiver answers through the NAT, as on a real router.
        s += &format!("    iifname \"lan0\" oifname \"lan0\" ct status dnat snat to {wan}\n");
    }
    match r.kind {
        Kind::FullCone | Kind::AddressRestricted | Kind::PortRestricted => {
            // UDP keeps its mapping through the table. TCP keeps it too while the port is
            // free (plain source NAT preserves it); forcing the recorded port on TCP could
            // collide with a closing connection's conntrack entry and kill the new one.
            s += &format!(
                "    oifname \"wan0\" meta l4proto udp snat ip to {wan} : \
                 meta l4proto . ip saddr . th sport map @reverse\n"
            );
            s += &format!("    oifname \"wan0\" snat ip to {wan}\n");
        }
        Kind::SymmetricRandom => {
            s += &format!("    oifname \"wan0\" snat ip to {wan} fully-random\n");
        }
        Kind::SymmetricSequential => {
            // Port k·delta past the first, around the range: with a delta that divides
            // the range the counter comes back to the first port after fewer slots.
            let delta = u32::from(r.delta).max(1);
            let slots = SEQUENTIAL_PORTS / gcd(delta, SEQUENTIAL_PORTS);
            let ports: Vec<String> = (0..slots)
                .map(|k| {
                    format!(
                        "{k} : {}",
                        SEQUENTIAL_FIRST + (k * delta) % SEQUENTIAL_PORTS
                    )
                })
                .collect();
            // One counter per protocol, as most sequential NATs keep: a TCP connection
            // does not move the next UDP port.
            for proto in ["udp", "tcp"] {
                s += &format!(
                    "    oifname \"wan0\" meta l4proto {proto} snat ip to {wan} : \
                     numgen inc mod {slots} map {{ {} }}\n",
                    ports.join(", ")
                );
            }
            s += &format!("    oifname \"wan0\" snat ip to {wan}\n");
        }
        Kind::OneToOne => {
            // The host's own connections leave from the WAN address, ports kept.
            s += &format!(
                "    oifname \"wan0\" ip saddr {} snat ip to {wan}\n",
                host_addr(i, r.kind, 0)
            );
        }
        Kind::None | Kind::Firewall => {}
    }
    s += "  }\n";
    // After source NAT the conntrack reply tuple holds the WAN port: remember it.
    s += "  chain record { type filter hook postrouting priority srcnat + 10; policy accept;\n";
    s += "    oifname \"wan0\" ct direction original meta l4proto { udp, tcp } \
          update @mapping { meta l4proto . ct reply proto-dst : ct original ip saddr . ct original proto-src } \
          update @reverse { meta l4proto . ct original ip saddr . ct original proto-src : ct reply proto-dst } \
          update @peers { meta l4proto . ct reply proto-dst . ip daddr }\n";
    s += "  }\n";
    s += "  chain pre { type nat hook prerouting priority dstnat; policy accept;\n";
    match r.kind {
        Kind::FullCone => {
            s += "    iifname \"wan0\" meta l4proto { udp, tcp } \
                  dnat ip to meta l4proto . th dport map @mapping\n";
        }
        Kind::AddressRestricted => {
            s += "    iifname \"wan0\" meta l4proto { udp, tcp } meta l4proto . th dport . ip saddr @peers \
                  dnat ip to meta l4proto . th dport map @mapping\n";
        }
        Kind::OneToOne => {
            s += &format!(
                "    iifname \"wan0\" dnat ip to {}\n",
                host_addr(i, r.kind, 0)
            );
        }
        _ => {}
    }
    if r.hairpin {
        s += &format!(
            "    iifname \"lan0\" ip saddr {lan} ip daddr {wan} meta l4proto {{ udp, tcp }} \
             dnat ip to meta l4proto . th dport map @mapping\n"
        );
    }
    s += "  }\n";
    // An unsolicited packet to the WAN address that no rule let in is refused or dropped
    // before conntrack confirms an entry for it. Otherwise that entry would hold the
    // mapped port towards its sender, so a later outbound packet to the same sender could
    // not use its own mapping: Linux would drop or re-map it, which is not how an RFC 4787
    // NAT behaves and would break hole punching in the lab only.
    //
    // UDP gets a port unreachable, so tests see a refusal at once. An unsolicited SYN is
    // dropped silently, as RFC 5382 REQ-4 demands (no answer for at least 6 s): a RST
    // would put the sender's own NAT entry in CLOSE, where the other side's crossing SYN
    // is invalid and drawn a RST in turn, and TCP simultaneous open would never converge.
    s += "  chain input { type filter hook input priority filter; policy accept;\n";
    s += "    iifname \"wan0\" ct state new meta l4proto udp reject\n";
    s += "    iifname \"wan0\" ct state new meta l4proto tcp drop\n";
    s += "  }\n";
    if r.loss_pct > 0 {
        s += &format!(
            "  chain loss {{ type filter hook forward priority filter; policy accept;\n    \
             numgen random mod 100 < {} drop\n  }}\n",
            r.loss_pct
        );
    }
    s += "}\n";
    if r.v6 {
        // IPv6 is routed, not translated: a stateful firewall lets out anything and in
        // only what answers something let out.
        s += "table inet natlab6 {\n";
        s += "  chain forward { type filter hook forward priority filter; policy accept;\n";
        s += "    meta nfproto ipv6 ct state established,related accept\n";
        s += "    meta nfproto ipv6 iifname \"lan0\" accept\n";
        s += "    meta nfproto ipv6 drop\n";
        if r.kind == Kind::Firewall {
            // IPv6 only: nothing of IPv4 crosses.
            s += "    meta nfproto ipv4 drop\n";
        }
        s += "  }\n}\n";
    }
    s
}

/// One command of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `ip ARGS…`
    Ip(Vec<String>),
    /// `sysctl -w KEY=VALUE` inside a namespace; `optional` ones may be missing (a kernel
    /// without br_netfilter has no `net.bridge`).
    Sysctl {
        /// The namespace.
        ns: String,
        /// The sysctl key.
        key: String,
        /// Its value.
        value: String,
        /// Whether a failure is ignored.
        optional: bool,
    },
    /// `nft -f -` with this script, inside a namespace.
    Nft {
        /// The namespace.
        ns: String,
        /// The ruleset.
        script: String,
    },
}

impl Step {
    /// A namespace with its loopback up (local delivery, to one's own address too, needs
    /// it) and IPv6 off, so not even a link-local address exists outside 198.18.0.0/15.
    fn netns(ns: &str) -> [Step; 4] {
        let v6 = |key: &str| Step::Sysctl {
            ns: ns.into(),
            key: format!("net.ipv6.conf.{key}.disable_ipv6"),
            value: "1".into(),
            optional: true,
        };
        [
            Step::Ip(vec!["netns".into(), "add".into(), ns.into()]),
            v6("all"),
            v6("default"),
            Step::ip(ns, "link set lo up"),
        ]
    }

    /// [`Step::netns`], or with `v6` a namespace with IPv6 on: the global addresses are
    /// the plan's (2001:2::/48), no router advertisement is taken and no duplicate
    /// detection waited for. Links get their fe80:: link-local addresses: a router
    /// resolves its neighbours for forwarded packets from one (Linux sends no neighbour
    /// solicitation without), and they never leave their veth.
    fn netns_v6(ns: &str, v6: bool) -> Vec<Step> {
        if !v6 {
            return Step::netns(ns).to_vec();
        }
        let set = |key: &str, value: &str| Step::Sysctl {
            ns: ns.into(),
            key: key.into(),
            value: value.into(),
            optional: false,
        };
        let mut steps = vec![Step::Ip(vec!["netns".into(), "add".into(), ns.into()])];
        for scope in ["all", "default"] {
            steps.push(set(&format!("net.ipv6.conf.{scope}.accept_ra"), "0"));
            steps.push(set(&format!("net.ipv6.conf.{scope}.accept_dad"), "0"));
            steps.push(set(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "0"));
        }
        steps.push(Step::ip(ns, "link set lo up"));
        steps
    }

    fn ip(ns: &str, args: &str) -> Step {
        Step::Ip(
            ["-n", ns]
                .into_iter()
                .chain(args.split(' '))
                .map(str::to_owned)
                .collect(),
        )
    }

    fn run(&self) -> Result<(), LabError> {
        let (mut cmd, input) = match self {
            Step::Ip(args) => {
                let mut c = Command::new("ip");
                c.args(args);
                (c, None)
            }
            Step::Sysctl { ns, key, value, .. } => {
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    &format!("{key}={value}"),
                ]);
                (c, None)
            }
            Step::Nft { ns, script } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft", "-f", "-"]);
                (c, Some(script.clone()))
            }
        };
        let what = format!("{cmd:?}");
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| LabError::Tool {
            what: what.clone(),
            why: e.to_string(),
        })?;
        if let (Some(script), Some(mut stdin)) = (input, child.stdin.take()) {
            use std::io::Write;
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| LabError::Tool {
                    what: what.clone(),
                    why: e.to_string(),
                })?;
        }
        let out = child.wait_with_output().map_err(|e| LabError::Tool {
            what: what.clone(),
            why: e.to_string(),
        })?;
        let optional = matches!(self, Step::Sysctl { optional: true, .. });
        if !out.status.success() && !optional {
            return Err(LabError::Tool {
                what,
                why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }
}

/// Why the lab could not be built or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A router, host or lab description that does not parse or fit.
    #[error("{0}")]
    Spec(String),
    /// A command failed.
    #[error("{what} failed: {why}")]
    Tool {
        /// The command.
        what: String,
        /// Its error output.
        why: String,
    },
    /// Socket work inside a namespace failed.
    #[error("in namespace {ns}: {source}")]
    Io {
        /// The namespace.
        ns: String,
        /// The error.
        source: io::Error,
    },
}

/// Namespaces of lab `lab` that exist now.
pub fn existing(lab: &str) -> Vec<String> {
    let prefix = format!("{NS_PREFIX}{lab}-");
    list_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn list_namespaces() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Removes every namespace of lab `lab` (veths go with them), after killing the processes
/// still running inside (all started in the lab, so all ours). Returns how many it removed.
pub fn down(lab: &str) -> usize {
    let names = existing(lab);
    for ns in &names {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    names.len()
}

/// A built lab. Dropping it kills what it spawned and removes every namespace it made.
pub struct Lab {
    /// What was built.
    pub spec: Spec,
    children: Mutex<Vec<Child>>,
    keep: bool,
    gateways: Vec<Gateway>,
}

/// A router's port-mapping gateway thread.
struct Gateway {
    router: String,
    /// Renewals of mappings in force, and mappings that lapsed.
    counts: std::sync::Arc<Mutex<(u64, u64)>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

static LABS: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Builds `spec`, first removing any lab of the same name (so `up` is idempotent).
    pub fn up(spec: Spec) -> Result<Lab, LabError> {
        down(&spec.lab);
        let mut lab = Lab {
            spec,
            children: Mutex::new(Vec::new()),
            keep: false,
            gateways: Vec::new(),
        };
        for step in lab.spec.plan() {
            step.run()?; // on error, drop tears down what was made
        }
        lab.start_gateways()?;
        Ok(lab)
    }

    /// Builds a lab for a test from router descriptions (`"pr=port-restricted,hairpin"`), named
    /// after this process so parallel tests never collide; labs left by test processes that
    /// no longer exist are removed first. `None` (after saying so on stderr) when this
    /// machine cannot make namespaces; with `CHUANTOU_REQUIRE_LAB=1` (CI) that is a panic.
    pub fn for_test(routers: &[&str]) -> Option<Lab> {
        // Checked once per process: tests run in parallel threads.
        static ALLOWED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        if let Err(why) = ALLOWED.get_or_init(namespaces_allowed) {
            if std::env::var_os("CHUANTOU_REQUIRE_LAB").is_some_and(|v| v == "1") {
                panic!("the NAT lab is required (CHUANTOU_REQUIRE_LAB=1) but: {why}");
            }
            eprintln!("SKIPPED: NAT lab test needs network namespaces (root): {why}");
            return None;
        }
        reap_stale_test_labs();
        let name = format!(
            "t{}x{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let routers = routers
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<Router>, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        let spec = Spec::new(&name, routers).unwrap_or_else(|e| panic!("{e}"));
        Some(Lab::up(spec).unwrap_or_else(|e| panic!("building the NAT lab: {e}")))
    }

    /// Opens an existing lab (made by `scripts/natlab up`) without owning it.
    pub fn attach(spec: Spec) -> Lab {
        Lab {
            spec,
            children: Mutex::new(Vec::new()),
            keep: true,
            gateways: Vec::new(),
        }
    }

    /// Starts the port-mapping gateway of every router with the `map` option.
    fn start_gateways(&mut self) -> Result<(), LabError> {
        for (i, r) in self.spec.routers.iter().enumerate() {
            if !r.map {
                continue;
            }
            let ns = self.spec.ns(&r.name);
            let (lan, wan) = (router_lan(i), router_wan(i));
            let socket =
                self.in_ns(&ns, || UdpSocket::bind((lan, crate::portmapd::SERVER_PORT)))?;
            let gateway = crate::portmapd::Gateway::new(wan, r.map_pcp, std::time::Instant::now())
                .with_max_lifetime(r.map_lifetime);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let counts = std::sync::Arc::new(Mutex::new((0, 0)));
            let (flag, published) = (stop.clone(), counts.clone());
            let thread = std::thread::spawn(move || {
                crate::portmapd::serve(socket, gateway, flag, published, |script| {
                    Step::Nft {
                        ns: ns.clone(),
                        script: script.to_owned(),
                    }
                    .run()
                    .map_err(|e| e.to_string())
                });
            });
            self.gateways.push(Gateway {
                router: r.name.clone(),
                counts,
                stop,
                thread: Some(thread),
            });
        }
        Ok(())
    }

    /// Moves `host` (behind a NAT) onto router `to`'s LAN, as a laptop moves from one
    /// Wi-Fi to another: a second veth into `to`'s LAN bridge with a new address there, the
    /// old address removed, the default route through `to`. Its sockets stay open; what
    /// they send leaves with the new address through the other NAT. Returns the new
    /// address. A host may move again (back, or on); a lab makes at most 50 moves with
    /// distinct addresses.
    pub fn move_host(&self, host: &str, to: &str) -> Result<Ipv4Addr, LabError> {
        static MOVES: AtomicU32 = AtomicU32::new(0);
        let h = self.host(host);
        let (k, r) = self
            .spec
            .routers
            .iter()
            .enumerate()
            .find(|(_, r)| r.name == to)
            .ok_or_else(|| LabError::Spec(format!("no router {to:?}")))?;
        if r.kind == Kind::None || h.router.as_ref().is_none_or(|r| r.kind == Kind::None) {
            return Err(LabError::Spec(
                "only hosts behind a NAT move, onto another NAT's LAN".into(),
            ));
        }
        let n = MOVES.fetch_add(1, Ordering::Relaxed);
        let rns = self.spec.ns(to);
        let (here, there) = (format!("mv{n}"), format!("mvp{n}"));
        let addr = Ipv4Addr::new(198, 19, k as u8 + 1, 200 + (n % 50) as u8);
        let steps = [
            Step::Ip(
                [
                    "link", "add", &here, "netns", &h.ns, "type", "veth", "peer", "name", &there,
                ]
                .iter()
                .map(|s| s.to_string())
                .chain(["netns".into(), rns.clone()])
                .collect(),
            ),
            Step::ip(&rns, &format!("link set {there} master lan0")),
            Step::ip(&rns, &format!("link set {there} up")),
            Step::ip(&h.ns, &format!("link set {here} up")),
            // Every old IPv4 address goes, wherever the host was before (eth0, or the
            // veth of an earlier move).
            Step::ip(&h.ns, "-4 addr flush scope global"),
            Step::ip(&h.ns, &format!("addr add {addr}/24 dev {here}")),
            Step::ip(
                &h.ns,
                &format!("route replace default via {} dev {here}", router_lan(k)),
            ),
        ];
        for s in steps {
            s.run()?;
        }
        Ok(addr)
    }

    /// The port mappings router `router`'s gateway holds now, as its nft chains show them
    /// (`dnat` rules of `pm_pre`): the lab's own view, whatever the peers say.
    pub fn port_mappings(&self, router: &str) -> Result<Vec<String>, LabError> {
        let out = self
            .router_command(router, "nft")
            .args(["list", "chain", "ip", "natlab", "pm_pre"])
            .output()
            .map_err(|source| LabError::Io {
                ns: self.spec.ns(router),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("dnat"))
            .map(|l| l.trim().to_owned())
            .collect())
    }

    /// How many requests to `router`'s gateway renewed a mapping still in force, and how
    /// many of its mappings lapsed unrenewed.
    pub fn port_mapping_renewals(&self, router: &str) -> (u64, u64) {
        self.gateways
            .iter()
            .find(|g| g.router == router)
            .map(|g| *g.counts.lock().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_else(|| panic!("router {router:?} has no gateway (option map)"))
    }

    /// The host called `name`; panics with the list of hosts if there is none.
    pub fn host(&self, name: &str) -> Host {
        self.spec.host(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The WAN address of a router.
    pub fn wan(&self, router: &str) -> Ipv4Addr {
        self.spec
            .wan(router)
            .unwrap_or_else(|| panic!("no NAT router {router:?}"))
    }

    /// A command that runs `program` on `host`.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(host).ns]).arg(program);
        c
    }

    /// A command that runs `program` on router `router` (e.g. `conntrack -F`: the NAT
    /// forgets every mapping, as after a reboot).
    pub fn router_command(&self, router: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.spec.ns(router)])
            .arg(program);
        c
    }

    /// Starts `cmd` (from [`Lab::command`]); it is killed when the lab is dropped.
    pub fn spawn(&self, mut cmd: Command) -> io::Result<u32> {
        let child = cmd.spawn()?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    /// Runs `f` on a thread that has entered `host`'s network namespace: sockets made there
    /// belong to that namespace for life, whichever thread uses them later.
    pub fn inside<T: Send>(
        &self,
        host: &str,
        f: impl FnOnce() -> io::Result<T> + Send,
    ) -> Result<T, LabError> {
        self.in_ns(&self.host(host).ns, f)
    }

    fn in_ns<T: Send>(
        &self,
        ns: &str,
        f: impl FnOnce() -> io::Result<T> + Send,
    ) -> Result<T, LabError> {
        let ns = ns.to_owned();
        let io_err = |source| LabError::Io {
            ns: ns.clone(),
            source,
        };
        let file = File::open(format!("/run/netns/{ns}")).map_err(io_err)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(io::Error::from)?;
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
        .map_err(io_err)
    }

    /// Loads more nftables rules on `host` (a router, usually), e.g. to drop all UDP.
    pub fn nft(&self, host: &str, script: &str) -> Result<(), LabError> {
        Step::Nft {
            ns: self.host_or_router_ns(host),
            script: script.to_owned(),
        }
        .run()
    }

    fn host_or_router_ns(&self, name: &str) -> String {
        match self.spec.routers.iter().find(|r| r.name == name) {
            Some(_) => self.spec.ns(name),
            None => self.host(name).ns,
        }
    }

    /// Starts counting, on the internet bridge, the bytes routers `a` and `b` send each
    /// other directly and what each gets from the server host (the rendezvous and its
    /// relay): the lab's own view of which path carries a session, whatever the peers say.
    pub fn meter(&self, a: &str, b: &str) -> Result<Meter, LabError> {
        let (wa, wb) = (self.wan(a), self.wan(b));
        let script = format!(
            "table bridge tally {{\n\
             counter direct_ab {{}}\n  counter direct_ba {{}}\n\
             counter relay_a {{}}\n  counter relay_b {{}}\n\
             chain f {{ type filter hook forward priority filter - 20; policy accept;\n\
             ip saddr {wa} ip daddr {wb} counter name direct_ab\n\
             ip saddr {wb} ip daddr {wa} counter name direct_ba\n  }}\n\
             chain o {{ type filter hook output priority filter - 20; policy accept;\n\
             ip daddr {wa} counter name relay_a\n\
             ip daddr {wb} counter name relay_b\n  }}\n}}\n"
        );
        self.nft("server", &script)?;
        Ok(Meter {
            ns: self.spec.ns("server"),
        })
    }

    /// Drops everything routers `a` and `b` send each other directly, on the internet
    /// bridge, silently; the rendezvous and relay stay reachable. Lifted when the [`Cut`]
    /// is dropped.
    pub fn cut(&self, a: &str, b: &str) -> Result<Cut, LabError> {
        let (wa, wb) = (self.wan(a), self.wan(b));
        let script = format!(
            "table bridge cut {{\n  chain f {{ type filter hook forward priority filter - 30; \
             policy accept;\n    ip saddr {wa} ip daddr {wb} drop\n    \
             ip saddr {wb} ip daddr {wa} drop\n  }}\n}}\n"
        );
        self.nft("server", &script)?;
        Ok(Cut {
            ns: self.spec.ns("server"),
        })
    }

    /// A UDP socket on `host` bound to `addr`.
    pub fn udp(&self, host: &str, addr: SocketAddr) -> Result<UdpSocket, LabError> {
        self.inside(host, || UdpSocket::bind(addr))
    }

    /// A TCP listener on `host` bound to `addr`.
    pub fn tcp_listener(&self, host: &str, addr: SocketAddr) -> Result<TcpListener, LabError> {
        self.inside(host, || TcpListener::bind(addr))
    }

    /// A TCP connection from `host`, optionally from a fixed local address (with
    /// SO_REUSEADDR and SO_REUSEPORT, so one port can connect to several destinations).
    pub fn tcp_connect(
        &self,
        host: &str,
        from: Option<SocketAddr>,
        to: SocketAddr,
    ) -> Result<TcpStream, LabError> {
        self.tcp_connect_within(host, from, to, std::time::Duration::from_secs(10))
    }

    /// [`Lab::tcp_connect`] giving up (`TimedOut`) after `within`: a NAT drops an
    /// unsolicited SYN silently.
    pub fn tcp_connect_within(
        &self,
        host: &str,
        from: Option<SocketAddr>,
        to: SocketAddr,
        within: std::time::Duration,
    ) -> Result<TcpStream, LabError> {
        self.inside(host, || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            if let Some(from) = from {
                s.set_reuse_address(true)?;
                s.set_reuse_port(true)?;
                s.bind(&from.into())?;
            }
            s.connect_timeout(&to.into(), within)?;
            Ok(s.into())
        })
    }
}

/// Byte counters on the internet bridge (see [`Lab::meter`]).
#[derive(Debug)]
pub struct Meter {
    ns: String,
}

/// What a [`Meter`] counted so far, in bytes (IP packets, headers included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    /// Router a to router b, directly.
    pub direct_ab: u64,
    /// Router b to router a, directly.
    pub direct_ba: u64,
    /// From the server host (rendezvous, relay) to router a.
    pub relay_a: u64,
    /// From the server host to router b.
    pub relay_b: u64,
}

impl Meter {
    /// The counts now (one `nft` call).
    pub fn read(&self) -> Counted {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "nft", "list", "counters", "table", "bridge", "tally",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut c = Counted::default();
        let mut name = "";
        for line in out.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("counter ") {
                name = rest.split_whitespace().next().unwrap_or("");
            } else if let Some(bytes) = line.split("bytes ").nth(1) {
                let n = bytes
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                match name {
                    "direct_ab" => c.direct_ab = n,
                    "direct_ba" => c.direct_ba = n,
                    "relay_a" => c.relay_a = n,
                    "relay_b" => c.relay_b = n,
                    _ => {}
                }
            }
        }
        c
    }
}

/// A cut between two routers (see [`Lab::cut`]); dropping it lifts the cut.
#[derive(Debug)]
pub struct Cut {
    ns: String,
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "nft", "delete", "table", "bridge", "cut",
            ])
            .status();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for g in &mut self.gateways {
            g.stop.store(true, Ordering::Relaxed);
            if let Some(t) = g.thread.take()
                && t.join().is_err()
            {
                eprintln!("the port-mapping gateway of {} panicked", g.router);
            }
        }
        let children = std::mem::take(self.children.get_mut().unwrap_or_else(|e| e.into_inner()));
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.keep {
            down(&self.spec.lab);
        }
    }
}

/// Whether this process may make network namespaces, and if not, why.
pub fn namespaces_allowed() -> Result<(), String> {
    let probe = format!(
        "{NS_PREFIX}probe{}x{}",
        std::process::id(),
        LABS.fetch_add(1, Ordering::Relaxed)
    );
    let out = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    for tool in ["nft", "sysctl"] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(format!(
                "`{tool}` is not installed (apt-get install nftables procps)"
            ));
        }
    }
    Ok(())
}

/// Removes labs named `t<pid>x<n>` whose test process is gone (killed before its drop ran).
fn reap_stale_test_labs() {
    let mut labs: Vec<String> = list_namespaces()
        .iter()
        .filter_map(|ns| {
            ns.strip_prefix(NS_PREFIX)?
                .split('-')
                .next()
                .map(str::to_owned)
        })
        .collect();
    labs.dedup();
    for lab in labs {
        let pid = lab
            .strip_prefix('t')
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                down(&lab);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers_parse_with_options_and_refuse_nonsense() {
        let r: Router = "seq=symmetric-sequential,delta=2,timeout=5,loss=10,hosts=2,hairpin"
            .parse()
            .unwrap();
        assert_eq!(r.kind, Kind::SymmetricSequential);
        assert_eq!((r.delta, r.timeout_s, r.loss_pct, r.hosts), (2, 5, 10, 2));
        assert!(r.hairpin);
        assert_eq!(r.to_string().parse::<Router>().unwrap(), r);
        for bad in [
            "x",
            "x=cone",
            "X=full-cone",
            "server=none",
            "x=full-cone,loss=100",
            "x=full-cone,delta=0",
            "x=full-cone,colour=red",
            "averyveryverylongname=none",
        ] {
            assert!(bad.parse::<Router>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn every_address_is_in_the_lab_range_and_unique() {
        let mut routers: Vec<Router> = Kind::ALL
            .iter()
            .map(|k| Router::new(k.short(), *k))
            .collect();
        routers.push("many=port-restricted,hosts=200".parse().unwrap());
        let spec = Spec::new("x", routers).unwrap();
        let hosts = spec.hosts();
        let lab = |ip: Ipv4Addr| ip.octets()[0] == 198 && (ip.octets()[1] & 0xfe) == 18;
        let mut seen = std::collections::HashSet::new();
        for h in &hosts {
            assert!(lab(h.addr), "{} at {}", h.name, h.addr);
            assert!(seen.insert(h.addr), "{} duplicates {}", h.name, h.addr);
        }
        for r in &spec.routers {
            if let Some(w) = spec.wan(&r.name) {
                assert!(lab(w) && seen.insert(w));
            }
        }
        // Every address the plan assigns is in range too.
        for step in spec.plan() {
            if let Step::Ip(args) = step {
                if let Some(i) = args.iter().position(|a| a == "addr") {
                    let ip: Ipv4Addr = args[i + 2].split('/').next().unwrap().parse().unwrap();
                    assert!(lab(ip), "{args:?}");
                }
            }
        }
    }

    #[test]
    fn each_kind_gets_its_filtering_rule() {
        let script = |k: Kind, hairpin: bool| {
            let mut r = Router::new("r", k);
            r.hairpin = hairpin;
            nft_script(&r, router_wan(0), 0)
        };
        // Inbound DNAT (the filtering) versus the input chain every kind has.
        let inbound = |s: &str| s.contains("iifname \"wan0\" meta l4proto { udp, tcp }");
        for k in Kind::ALL {
            if k != Kind::None {
                assert!(script(k, false).contains("ct state new meta l4proto udp reject"));
            }
        }
        assert!(inbound(&script(Kind::FullCone, false)));
        assert!(script(Kind::AddressRestricted, false).contains("@peers dnat"));
        assert!(!inbound(&script(Kind::PortRestricted, false)));
        assert!(!inbound(&script(Kind::SymmetricRandom, false)));
        assert!(script(Kind::SymmetricRandom, false).contains("fully-random"));
        assert!(script(Kind::SymmetricSequential, false).contains("numgen inc"));
        assert!(!script(Kind::PortRestricted, false).contains("iifname \"lan0\""));
        assert!(script(Kind::PortRestricted, true).contains("iifname \"lan0\""));
    }
}
