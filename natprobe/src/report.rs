//! natprobe's answer: the JSON object scripts read (`--json`) and the text a student reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use serde::Serialize;

use crate::classify::{Allocation, Behaviour, Likelihood, NatType, direct_table};

/// The whole report; its JSON shape is a contract (`udp`, `tcp`, `direct`, `ipv6`,
/// `port_mapping`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// UDP behaviour.
    pub udp: UdpReport,
    /// TCP behaviour, with `--tcp`; `null` otherwise.
    pub tcp: Option<TcpReport>,
    /// For each other NAT type: how likely a direct path is.
    pub direct: BTreeMap<NatType, Likelihood>,
    /// The STUN server probed.
    pub server: SocketAddr,
    /// Its RFC 5780 other address, if it has one.
    pub server_other: Option<SocketAddr>,
    /// What could not be determined, and why, in plain words.
    pub notes: Vec<String>,
    /// IPv6, when an IPv6 STUN server was given or the server's name has an IPv6 address;
    /// `null` otherwise.
    pub ipv6: Option<Ipv6Report>,
    /// What the gateway offers for port mapping; `null` with `--no-port-mapping` or a
    /// STUN server on loopback.
    pub port_mapping: Option<PortMappingReport>,
}

/// What the default gateway offers for port mapping (PCP, NAT-PMP, UPnP IGD), and what a
/// test mapping of the probing socket's port gave (removed again at once).
#[derive(Debug, Clone, Serialize)]
pub struct PortMappingReport {
    /// The default gateway asked; `null` when there is no default route.
    pub gateway: Option<std::net::IpAddr>,
    /// Whether it answers PCP (RFC 6887).
    pub pcp: bool,
    /// Whether it answers NAT-PMP (RFC 6886).
    pub nat_pmp: bool,
    /// Whether a UPnP Internet Gateway Device answered.
    pub upnp: bool,
    /// The protocol the test mapping used (`"PCP"`, `"NAT-PMP"`, `"UPnP"`).
    pub protocol: Option<String>,
    /// The external address the test mapping got; `null` when none was granted.
    pub mapped: Option<SocketAddr>,
    /// Whether the mapping's IP is the public one STUN saw: `false` means the gateway
    /// sits behind another NAT and its mappings reach nobody; `null` when not known.
    pub public: Option<bool>,
    /// What could not be told, in plain words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// IPv6 reachability: whether this host has a route and a global address, whether the
/// server answers over IPv6, and whether the address it sees is this host's own (no NAT).
#[derive(Debug, Clone, Serialize)]
pub struct Ipv6Report {
    /// The IPv6 STUN server probed.
    pub server: SocketAddr,
    /// The local address the system routes towards it from; `null` without a route.
    pub local_addr: Option<SocketAddr>,
    /// The address the server saw; `null` without an answer.
    pub public_addr: Option<SocketAddr>,
    /// Whether the server answered over IPv6.
    pub reachable: bool,
    /// Whether the address the server saw differs from ours (an IPv6 NAT, NPTv6);
    /// `null` without an answer.
    pub translated: Option<bool>,
    /// RFC 4787 filtering over IPv6 (a stateful firewall's is address-and-port-dependent),
    /// when the server is an RFC 5780 one over IPv6; `null` otherwise.
    pub filtering: Option<Behaviour>,
    /// What could not be told, in plain words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// UDP behaviour.
#[derive(Debug, Clone, Serialize)]
pub struct UdpReport {
    /// The classic name; `null` when the tests could not decide.
    pub nat_type: Option<NatType>,
    /// RFC 4787 mapping behaviour; `null` when unknown.
    pub mapping: Option<Behaviour>,
    /// RFC 4787 filtering behaviour; `null` when unknown.
    pub filtering: Option<Behaviour>,
    /// The address the server saw.
    pub public_addr: Option<SocketAddr>,
    /// The probing socket's own address.
    pub local_addr: SocketAddr,
    /// How public ports are picked.
    pub port_allocation: Option<Allocation>,
    /// The step of a sequential allocation.
    pub port_delta: Option<i32>,
    /// Whether a packet to one's own public address comes back in.
    pub hairpin: Option<bool>,
    /// The measured mapping lifetime in seconds (`--lifetime`); when no mapping expired
    /// within the search, the longest age checked.
    pub mapping_lifetime_s: Option<f64>,
    /// How long the lifetime search was allowed to look, when it ran.
    pub mapping_lifetime_searched_s: Option<f64>,
}

/// TCP behaviour.
#[derive(Debug, Clone, Serialize)]
pub struct TcpReport {
    /// Mapping behaviour from one local port to several server endpoints.
    pub mapping: Option<Behaviour>,
    /// The address the server saw.
    pub public_addr: Option<SocketAddr>,
    /// How public ports are picked for new connections.
    pub port_allocation: Option<Allocation>,
    /// The step of a sequential allocation.
    pub port_delta: Option<i32>,
    /// What went wrong, if something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl TcpReport {
    /// No TCP answer at all.
    pub fn unanswered(note: String) -> TcpReport {
        TcpReport {
            mapping: None,
            public_addr: None,
            port_allocation: None,
            port_delta: None,
            note: Some(note),
        }
    }
}

impl Report {
    /// A report from the UDP (and TCP) results.
    pub fn new(
        server: SocketAddr,
        server_other: Option<SocketAddr>,
        udp: UdpReport,
        tcp: Option<TcpReport>,
        notes: Vec<String>,
    ) -> Report {
        let direct = udp
            .nat_type
            .map(|t| direct_table(t, udp.port_allocation))
            .unwrap_or_default();
        Report {
            udp,
            tcp,
            direct,
            server,
            server_other,
            notes,
            ipv6: None,
            port_mapping: None,
        }
    }

    /// No UDP answer: `why` says so plainly.
    pub fn blocked(
        server: SocketAddr,
        local: SocketAddr,
        why: String,
        tcp: Option<TcpReport>,
    ) -> Report {
        Report::new(
            server,
            None,
            UdpReport {
                nat_type: Some(NatType::UdpBlocked),
                mapping: None,
                filtering: None,
                public_addr: None,
                local_addr: local,
                port_allocation: None,
                port_delta: None,
                hairpin: None,
                mapping_lifetime_s: None,
                mapping_lifetime_searched_s: None,
            },
            tcp,
            vec![why],
        )
        .with_server_unknown()
    }

    fn with_server_unknown(mut self) -> Report {
        self.server_other = None;
        self
    }

    /// Whether the server answered at all (over UDP, or over TCP when asked): without an
    /// answer nothing was measured, and the report says why.
    pub fn answered(&self) -> bool {
        self.udp.public_addr.is_some()
            || self.tcp.as_ref().is_some_and(|t| t.public_addr.is_some())
            || self.ipv6.as_ref().is_some_and(|v| v.reachable)
    }

    /// The text report: what the NAT is, what it means, what to expect.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let u = &self.udp;
        let _ = writeln!(s, "natprobe: UDP through STUN server {}", self.server);
        let name = match u.nat_type {
            Some(t) => pretty(t).to_string(),
            None => "could not be determined (see notes)".into(),
        };
        let _ = writeln!(s, "  NAT type          {name}");
        if let Some(p) = u.public_addr {
            let same = if p == u.local_addr {
                " (the machine's own address: no NAT)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "  public address    {p}{same}   (this socket: {})",
                u.local_addr
            );
        }
        let behaviour = |b: Option<Behaviour>, mapping: bool| match (b, mapping) {
            (None, _) => "unknown".to_string(),
            (Some(Behaviour::EndpointIndependent), true) => {
                "endpoint-independent: one public port for every destination".into()
            }
            (Some(Behaviour::AddressDependent), true) => {
                "address-dependent: a new public port for every destination IP".into()
            }
            (Some(Behaviour::AddressAndPortDependent), true) => {
                "address-and-port-dependent: a new public port for every destination".into()
            }
            (Some(Behaviour::EndpointIndependent), false) => {
                "endpoint-independent: anyone may send to your public port".into()
            }
            (Some(Behaviour::AddressDependent), false) => {
                "address-dependent: only IPs you sent to may send back".into()
            }
            (Some(Behaviour::AddressAndPortDependent), false) => {
                "address-and-port-dependent: only the exact IP and port you sent to".into()
            }
        };
        if u.nat_type != Some(NatType::UdpBlocked) {
            let _ = writeln!(s, "  mapping           {}", behaviour(u.mapping, true));
            let _ = writeln!(s, "  filtering         {}", behaviour(u.filtering, false));
            let alloc = match (u.port_allocation, u.port_delta) {
                (Some(Allocation::Preserved), _) => "preserved (public port = local port)".into(),
                (Some(Allocation::Sequential), Some(d)) => {
                    format!("sequential, each new mapping {d:+} (predictable)")
                }
                (Some(Allocation::Sequential), None) => "sequential".into(),
                (Some(Allocation::Random), _) => "random (unpredictable)".into(),
                (None, _) => "unknown".to_string(),
            };
            let _ = writeln!(s, "  port allocation   {alloc}");
            let hp = match u.hairpin {
                Some(true) => "yes: peers behind this NAT can reach your public address",
                Some(false) => "no: peers behind this same NAT must use LAN addresses",
                None => "unknown",
            };
            let _ = writeln!(s, "  hairpin           {hp}");
            let life = match (u.mapping_lifetime_s, u.mapping_lifetime_searched_s) {
                (Some(l), Some(max)) if l >= max => {
                    format!("at least {l:.0} s (the search stopped there)")
                }
                (Some(l), _) => format!("about {l:.1} s: keep-alives must come more often"),
                (None, Some(_)) => "unknown (see notes)".into(),
                (None, None) => "not measured (add --lifetime)".into(),
            };
            let _ = writeln!(s, "  mapping lifetime  {life}");
        }
        if let Some(t) = &self.tcp {
            let _ = writeln!(s, "TCP");
            if let Some(p) = t.public_addr {
                let _ = writeln!(s, "  public address    {p}");
            }
            let _ = writeln!(s, "  mapping           {}", behaviour(t.mapping, true));
            let alloc = match (t.port_allocation, t.port_delta) {
                (Some(Allocation::Preserved), _) => "preserved".to_string(),
                (Some(Allocation::Sequential), Some(d)) => format!("sequential, {d:+}"),
                (Some(a), _) => format!("{a:?}").to_lowercase(),
                (None, _) => "unknown".into(),
            };
            let _ = writeln!(s, "  port allocation   {alloc}");
            if let Some(n) = &t.note {
                let _ = writeln!(s, "  note              {n}");
            }
        }
        if let Some(t) = u.nat_type {
            let _ = writeln!(s, "\nWhat it means: {}", meaning(t, u.port_allocation));
        }
        if !self.direct.is_empty() {
            let _ = writeln!(s, "\nA direct connection with a peer behind:");
            for (t, l) in &self.direct {
                let l = match l {
                    Likelihood::Likely => "likely",
                    Likelihood::Possible => "possible (prediction or birthday punching)",
                    Likelihood::Unlikely => "unlikely: chuantou uses the relay",
                };
                let _ = writeln!(s, "  {:<22} {l}", t.name());
            }
        }
        if let Some(v6) = &self.ipv6 {
            let _ = writeln!(s, "\nIPv6 through STUN server {}", v6.server);
            match (v6.public_addr, v6.translated) {
                (Some(public), Some(false)) => {
                    let _ = writeln!(
                        s,
                        "  reachable, no NAT: the server saw {public}, this host's own address \
                         (behind a stateful firewall, peers still punch by sending together)"
                    );
                    if let Some(f) = v6.filtering {
                        let _ = writeln!(s, "  filtering: {}", f.name());
                    }
                }
                (Some(public), _) => {
                    let _ = writeln!(
                        s,
                        "  reachable through an IPv6 NAT: the server saw {public}, not {}",
                        v6.local_addr.map_or("-".into(), |l| l.to_string())
                    );
                }
                (None, _) => {
                    let _ = writeln!(
                        s,
                        "  not reachable: {}",
                        v6.note.as_deref().unwrap_or("no answer")
                    );
                }
            }
        }
        if let Some(pm) = &self.port_mapping {
            let gw = pm
                .gateway
                .map_or("no default gateway".to_owned(), |g| g.to_string());
            let _ = writeln!(s, "\nPort mapping (gateway {gw})");
            let yes = |b: bool| if b { "yes" } else { "no" };
            let _ = writeln!(
                s,
                "  PCP {}, NAT-PMP {}, UPnP {}",
                yes(pm.pcp),
                yes(pm.nat_pmp),
                yes(pm.upnp)
            );
            match (pm.mapped, pm.public) {
                (Some(m), Some(false)) => {
                    let _ = writeln!(
                        s,
                        "  mapped {m}, but that is not the public address STUN saw: the \
                         gateway is behind another NAT, so its mappings do not help"
                    );
                }
                (Some(m), _) => {
                    let _ = writeln!(
                        s,
                        "  a test mapping got {m} ({}), removed again: peers behind any NAT \
                         can reach this host directly",
                        pm.protocol.as_deref().unwrap_or("?")
                    );
                }
                (None, _) => {
                    let _ = writeln!(
                        s,
                        "  no mapping: {}",
                        pm.note.as_deref().unwrap_or("the gateway granted none")
                    );
                }
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nNotes:");
            for n in &self.notes {
                let _ = writeln!(s, "  - {n}");
            }
        }
        s
    }
}

fn pretty(t: NatType) -> &'static str {
    match t {
        NatType::Open => "open (no NAT, no filtering)",
        NatType::FullCone => "full cone",
        NatType::RestrictedCone => "restricted cone (address-restricted)",
        NatType::PortRestrictedCone => "port-restricted cone",
        NatType::Symmetric => "symmetric",
        NatType::UdpBlocked => "UDP blocked",
    }
}

fn meaning(t: NatType, alloc: Option<Allocation>) -> &'static str {
    match (t, alloc) {
        (NatType::Open, _) => {
            "your machine is directly reachable; peers anywhere can connect to it directly."
        }
        (NatType::FullCone, _) => {
            "once you have sent anything out, anyone can reach you at your public address: \
             direct connections work with every other kind."
        }
        (NatType::RestrictedCone, _) => {
            "peers can reach you after you have sent to their IP; hole punching works with \
             every kind of NAT."
        }
        (NatType::PortRestrictedCone, _) => {
            "the most common home NAT: hole punching works with cone NATs; against a \
             symmetric NAT it needs port prediction or birthday punching."
        }
        (NatType::Symmetric, Some(Allocation::Sequential)) => {
            "each destination gets a new public port, but predictably: chuantou predicts the \
             next one, so most peers still get a direct path."
        }
        (NatType::Symmetric, _) => {
            "each destination gets a new, unpredictable public port: direct paths work with \
             cone NATs (and by birthday punching with port-restricted ones); two such NATs \
             need the relay."
        }
        (NatType::UdpBlocked, _) => "UDP is blocked: only TCP or the relay will work.",
    }
}
