//! Signaling messages between peers and the rendezvous: the types that travel inside frames.
//!
//! Every connection follows this flow:
//!
//! - client → `ClientFrame::Hello { version, token }` (must be the first frame);
//! - server → `ServerFrame::Welcome { nonce, .. }`, or `ServerFrame::Error` and close;
//! - client → `ClientFrame::Request { id, body }`, any number, any order;
//!   server → `ServerFrame::Response { id, body }` for each, in order;
//! - `Request::Register` carries an ed25519 signature over the welcome nonce
//!   ([`register_payload`]), proving the client holds the key it registers;
//! - `Request::Connect` makes the server broker a session: the requester gets
//!   `Reply::Brokered(Broker)` and the named peer is pushed `ServerFrame::Broker(Broker)`,
//!   each carrying the *other* side's key and candidates and the same session id and secret;
//! - the server may send `ServerFrame::Error` at any time, then closes the connection.
//!
//! The encoding is postcard, so field order is wire order: append, never reorder, and bump
//! [`PROTOCOL_VERSION`] for anything else.

pub mod client;
pub mod public;
pub mod report;

pub use public::{EntryKind, HttpAuth, PublicOpen, Publish, Published};
pub use report::{PathStat, Report};

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The signaling protocol version carried in `Hello`; a mismatch is refused.
pub const PROTOCOL_VERSION: u16 = 6;

/// Longest peer name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most services one peer may offer.
pub const MAX_SERVICES: usize = 16;
/// Longest service description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 128;
/// Most LAN addresses one peer may report.
pub const MAX_LAN_ADDRS: usize = 8;
/// Longest token, in bytes.
pub const MAX_TOKEN_LEN: usize = 256;
/// Most peers in one `Reply::Peers` page; clients page with `List { after }`.
pub const LIST_PAGE: usize = 32;

/// A frame sent by a peer to the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Opens the connection; anything else first is refused.
    Hello(Hello),
    /// A request; answered by a `ServerFrame::Response` with the same id.
    Request {
        /// Chosen by the client to match the response.
        id: u32,
        /// What is asked.
        body: Request,
    },
    /// A standalone relay registering ([`crate::announce`]).
    Relay(crate::announce::RelayMsg),
}

/// The first frame of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal the server's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The server token, when the server requires one.
    pub token: Option<String>,
}

/// What a peer can ask of the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Bind `name` to this connection and key.
    Register(Register),
    /// Keeps a registration alive; `rtt_ms` is the client's last measured round trip,
    /// which the server uses to schedule punches.
    Heartbeat {
        /// Round-trip time the client measured on its previous heartbeat.
        rtt_ms: Option<u32>,
    },
    /// One page of known peers, names sorted, starting after `after`.
    List {
        /// The last name of the previous page.
        after: Option<String>,
    },
    /// One peer by name.
    Lookup {
        /// The peer's registered name.
        name: String,
    },
    /// Ask to be brokered to a named peer's service.
    Connect {
        /// The peer to reach.
        name: String,
        /// Which of its services; `None` picks its only one.
        service: Option<ServiceRef>,
    },
    /// Give `name` up (the connection must be registered under it): anyone may take it
    /// afterwards.
    Release {
        /// The name to free.
        name: String,
    },
    /// Prove this connection holds `key` without registering (a signature of
    /// [`identify_payload`]): a key that holds a name here may then list and look up peers.
    Identify {
        /// The key proved.
        key: PublicKey,
        /// Ed25519 signature of [`identify_payload`]`(nonce)`.
        signature: Signature,
    },
    /// Publish one of this registration's services to plain clients
    /// ([`public`](self::public)); answered by `Reply::Published`. Again after every
    /// reconnect: publications live as long as the registration.
    Publish(Publish),
    /// How our session with another peer goes ([`report`](self::report)), for the
    /// rendezvous' dashboard and metrics; answered by `Reply::Noted`.
    Report(Report),
    /// The port mapping our gateway granted for the UDP endpoint (PCP, NAT-PMP or UPnP),
    /// or `None` when it is gone; answered by `Reply::Noted`. The server keeps it only
    /// when its IP is the one it observes the peer at (a mapping behind a second NAT
    /// reaches nobody, and a made-up one must not aim other peers' probes anywhere).
    Mapped {
        /// The gateway's external address and port for our UDP endpoint.
        addr: Option<SocketAddr>,
    },
}

/// A registration: who the peer is and what it offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The name to bind (see [`validate_name`]).
    pub name: String,
    /// The peer's ed25519 public key.
    pub key: PublicKey,
    /// The services it offers.
    pub services: Vec<Service>,
    /// Addresses on its own networks, offered as candidates to peers behind the same NAT.
    pub lan_addrs: Vec<SocketAddr>,
    /// Ed25519 signature of [`register_payload`]`(nonce, name)`.
    pub signature: Signature,
    /// What the peer measured of its NAT (mapping, port allocation), for punch planning;
    /// `None` when it could not tell (no STUN answer).
    pub nat: Option<NatInfo>,
}

/// What a peer measured of its NAT with STUN before registering: enough to plan a punch
/// (who sprays, who predicts), not a full natprobe report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatInfo {
    /// Whether the public mapping depends on the destination.
    pub mapping: NatMapping,
    /// How new mappings get their public port.
    pub allocation: NatAllocation,
    /// The step between consecutive new mappings, for `Sequential`.
    pub delta: i32,
}

/// A step between two mappings at most this large (and not zero) is taken for a
/// sequential allocator; a random one lands this close once in ~500 tries.
pub const MAX_SEQUENTIAL_STEP: i32 = 64;

impl NatInfo {
    /// What two TCP mappings of one local port tell: `first` towards the signaling port,
    /// `second` (made after it) towards the STUN port. Equal means endpoint-independent;
    /// a small step, a sequential allocator with that delta; anything else, random. Two
    /// points cannot tell sequential from random for certain, but a wrong guess only costs
    /// a punch that falls back to the relay.
    pub fn from_tcp_mappings(first: SocketAddr, second: SocketAddr) -> NatInfo {
        if first == second {
            return NatInfo {
                mapping: NatMapping::EndpointIndependent,
                allocation: NatAllocation::Unknown,
                delta: 0,
            };
        }
        let step = i32::from(second.port()) - i32::from(first.port());
        let sequential = first.ip() == second.ip() && step.abs() <= MAX_SEQUENTIAL_STEP;
        NatInfo {
            mapping: NatMapping::Varies,
            allocation: if sequential {
                NatAllocation::Sequential
            } else {
                NatAllocation::Random
            },
            delta: if sequential { step } else { 0 },
        }
    }
}

/// Mapping behaviour (RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NatMapping {
    /// Not measured (the STUN server has no second address).
    Unknown,
    /// No NAT at all: the public address is the local one.
    None,
    /// The same public address for every destination.
    EndpointIndependent,
    /// A new public address per destination (a symmetric NAT).
    Varies,
}

/// Port allocation of new mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NatAllocation {
    /// Not measured.
    Unknown,
    /// The public port is the local port.
    Preserved,
    /// Each new mapping's port is the previous one plus `delta`.
    Sequential,
    /// No pattern.
    Random,
}

/// A service a peer offers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Service {
    /// The port on the exposing machine.
    pub port: u16,
    /// TCP or UDP.
    pub proto: Proto,
    /// Free text for humans (`peer ls`).
    pub description: String,
}

impl Service {
    /// The reference that selects this service.
    pub fn reference(&self) -> ServiceRef {
        ServiceRef {
            port: self.port,
            proto: self.proto,
        }
    }
}

/// Names one service of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    /// The port on the exposing machine.
    pub port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Proto {
    /// A TCP service.
    Tcp,
    /// A UDP service.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A frame sent by the rendezvous to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The answer to a good `Hello`.
    Welcome(Welcome),
    /// The answer to `ClientFrame::Request { id, .. }`.
    Response {
        /// The request's id.
        id: u32,
        /// The reply, or why the request failed (the connection stays open).
        body: Result<Reply, ErrorFrame>,
    },
    /// Pushed to a peer another peer has asked to reach.
    Broker(Box<Broker>),
    /// A fatal error; the server closes the connection after sending it.
    Error(ErrorFrame),
    /// To a standalone relay ([`crate::announce`]).
    Relay(crate::announce::RelayReply),
    /// Pushed to an exposer: a public client wants one of its published services.
    Open(Box<PublicOpen>),
}

/// The server's greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub version: u16,
    /// Fresh per connection; `Register` signs it.
    pub nonce: [u8; 32],
    /// How often a registered peer must send `Heartbeat`.
    pub heartbeat_interval_ms: u32,
    /// Server software and version, for logs.
    pub software: String,
    /// The STUN responder's primary address as reachable over this connection, so
    /// peers observe their UDP mapping there; `None` when STUN is off. An unspecified IP
    /// means the host the client reached the server on ([`same_host`]).
    pub stun: Option<SocketAddr>,
    /// The STUN responder in the other address family than this connection's, when the
    /// server knows its address there (`--advertise` names one): a peer observes its
    /// mapping in both families, and punches in both.
    pub stun_alt: Option<SocketAddr>,
    /// A second STUN port on `stun`'s host (a server with one IP, so no RFC 5780
    /// OTHER-ADDRESS): asking it from the same socket tells whether the NAT's mapping
    /// changes with the destination, i.e. whether it is symmetric.
    pub stun_port2: Option<u16>,
}

/// Resolves an address the server gave with an unspecified IP ("on the host you reached me
/// on", what a server that does not know its public address says, behind a cloud's 1:1
/// NAT say) against `server`, the address the client connected to. Other addresses stay.
pub fn same_host(addr: SocketAddr, server: IpAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(server, addr.port())
    } else {
        addr
    }
}

impl Broker {
    /// [`same_host`] on the relay offer's address.
    pub fn resolve(&mut self, server: IpAddr) {
        if let Some(r) = &mut self.relay {
            r.addr = same_host(r.addr, server);
        }
    }
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The registration is in place.
    Registered(Registered),
    /// The heartbeat was recorded.
    HeartbeatAck {
        /// The UDP address the STUN responder last saw for this peer, if any.
        udp_addr: Option<SocketAddr>,
    },
    /// A page of peers.
    Peers {
        /// Sorted by name.
        peers: Vec<PeerInfo>,
        /// Pass as `after` for the next page; `None` at the end.
        next: Option<String>,
    },
    /// One peer.
    Peer(PeerInfo),
    /// The session the server brokered for a `Connect`.
    Brokered(Box<Broker>),
    /// The name is free.
    Released,
    /// The key is proved; these names are bound to it.
    Identified {
        /// Names bound to the key (at most a page of them).
        names: Vec<String>,
    },
    /// The service is published; here is where.
    Published(Published),
    /// The report is recorded.
    Noted,
}

/// What a peer learns when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The signaling connection's address as the server sees it (its NAT mapping).
    pub observed_tcp: SocketAddr,
    /// STUN USERNAME that links Binding requests to this registration.
    pub stun_username: String,
    /// STUN short-term password for MESSAGE-INTEGRITY on those requests.
    pub stun_password: String,
    /// True when this replaced an earlier registration of the same key (a reconnect).
    pub replaced: bool,
}

/// A peer as the rendezvous knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Registered name.
    pub name: String,
    /// Its ed25519 public key.
    pub key: PublicKey,
    /// Whether it is connected and heartbeating.
    pub online: bool,
    /// What it offers.
    pub services: Vec<Service>,
    /// Observed address of its signaling connection.
    pub tcp_addr: Option<SocketAddr>,
    /// Observed address of its STUN socket.
    pub udp_addr: Option<SocketAddr>,
    /// Milliseconds since the server last heard from it.
    pub last_seen_ms: u64,
}

/// A brokered session, as one side sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broker {
    /// Identifies the session to relays and in punch probes.
    pub session: SessionId,
    /// Whether this side asked (`Initiator`) or is being reached (`Responder`).
    pub role: Role,
    /// The other side's name.
    pub peer: String,
    /// The other side's key, to pin in the tunnel handshake.
    pub peer_key: PublicKey,
    /// The service the initiator asked for.
    pub service: Service,
    /// Where the other side may be reached.
    pub candidates: Candidates,
    /// Start punching this many milliseconds after receiving this message; the server
    /// subtracts each side's half round trip so both start together.
    pub start_in_ms: u32,
    /// Key for authenticating punch probes; known only to the two sides and the server.
    pub secret: [u8; 32],
    /// A relay this side may use for the session, with its ticket; `None` when the server
    /// runs no relay.
    pub relay: Option<RelayOffer>,
}

/// Which side of a session this is: `Initiator` sent `Connect`, `Responder` was named in
/// it. The same type tells a relay which half a ticket admits.
pub use crate::ticket::Side as Role;

/// Where to find a relay for a session and the ticket that admits this side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayOffer {
    /// The relay's address (TCP and UDP); an unspecified IP means the host the client
    /// reached the rendezvous on ([`same_host`]).
    pub addr: SocketAddr,
    /// This side's signed admission.
    pub ticket: crate::ticket::Ticket,
    /// The secret a join proves it holds (only this side and the relay know it).
    pub secret: crate::ticket::JoinSecret,
}

/// Addresses at which a peer may be reachable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Candidates {
    /// Its TCP port's public address: the latest mapping the server saw of the port its
    /// signaling connection comes from (a credentialed STUN Binding over TCP from that
    /// port, else the signaling connection itself). The peer listens on that port too.
    pub tcp: Option<SocketAddr>,
    /// Observed address of its STUN socket (credentialed Binding request).
    pub udp: Option<SocketAddr>,
    /// Observed address of its STUN socket in the other address family than its signaling
    /// connection's (IPv6 beside IPv4, or the reverse), when it has one.
    pub udp_alt: Option<SocketAddr>,
    /// LAN addresses it reported.
    pub lan: Vec<SocketAddr>,
    /// What it measured of its NAT.
    pub nat: Option<NatInfo>,
    /// Its NAT's TCP behaviour, from the server's two observations of its TCP port.
    pub tcp_nat: Option<NatInfo>,
    /// The port its gateway mapped for its UDP endpoint (PCP, NAT-PMP or UPnP): reachable
    /// from anywhere, whatever its NAT does to other traffic.
    pub mapped: Option<SocketAddr>,
}

/// An error answer: a machine-readable code and a sentence for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// What went wrong.
    pub code: ErrorCode,
    /// A human explanation, naming the offending value.
    pub message: String,
}

impl ErrorFrame {
    /// Builds an error frame.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorFrame {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $num:literal, $text:literal;)*) => {
        /// Error codes on the wire. Carried as a number so that a client can still read a
        /// code newer than itself (`Other`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
            /// A code this build does not know.
            Other(u16),
        }

        impl ErrorCode {
            /// The wire number.
            pub fn number(self) -> u16 {
                match self { $(ErrorCode::$name => $num,)* ErrorCode::Other(n) => n }
            }
            /// Decodes a wire number.
            pub fn from_number(n: u16) -> Self {
                match n { $($num => ErrorCode::$name,)* n => ErrorCode::Other(n) }
            }
            /// A short snake_case name, for logs and metrics.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$name => $text,)* ErrorCode::Other(_) => "other" }
            }
        }
    };
}

error_codes! {
    /// The bytes did not decode as a frame of this protocol.
    BadFrame = 1, "bad_frame";
    /// The length prefix exceeds the maximum frame size.
    FrameTooLarge = 2, "frame_too_large";
    /// The client speaks another protocol version.
    VersionMismatch = 3, "version_mismatch";
    /// Something other than `Hello` came first, or `Hello` came twice.
    HelloExpected = 4, "hello_expected";
    /// Missing or wrong server token.
    Unauthorized = 5, "unauthorized";
    /// The connection was silent too long, or a frame stopped half way.
    Timeout = 6, "timeout";
    /// The name does not follow the naming rules.
    InvalidName = 7, "invalid_name";
    /// The name belongs to another key.
    NameTaken = 8, "name_taken";
    /// The register signature does not verify.
    BadSignature = 9, "bad_signature";
    /// A request field is out of bounds.
    BadRequest = 10, "bad_request";
    /// The request needs a registration on this connection first.
    NotRegistered = 11, "not_registered";
    /// No peer has that name.
    UnknownPeer = 12, "unknown_peer";
    /// The peer is registered but not connected.
    PeerOffline = 13, "peer_offline";
    /// The peer does not offer that service, or offers several and none was named.
    NoSuchService = 14, "no_such_service";
    /// A server limit was reached (peers, connections).
    Busy = 15, "busy";
    /// The same key registered again from another connection.
    Replaced = 16, "replaced";
    /// The registration expired after missed heartbeats.
    Expired = 17, "expired";
    /// The server is shutting down.
    ShuttingDown = 18, "shutting_down";
    /// A peer may not connect to itself.
    SelfConnect = 19, "self_connect";
    /// A relay could not prove it holds the ticket key, or none is configured.
    RelayRefused = 20, "relay_refused";
    /// Only a name's owner may release it.
    NotOwner = 21, "not_owner";
    /// The server does not publish services, or not for this key, or not this way.
    NotAllowed = 22, "not_allowed";
    /// The public port asked for is taken, or none is free.
    PortTaken = 23, "port_taken";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.number(), self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.number())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u16::deserialize(d).map(ErrorCode::from_number)
    }
}

/// An ed25519 public key, 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;

    /// 64 hex digits, as [`fmt::Display`] writes them.
    fn from_str(s: &str) -> Result<PublicKey, String> {
        hex::decode(s.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(PublicKey)
            .ok_or_else(|| format!("{s:?} is not a key (want 64 hex digits)"))
    }
}

/// An ed25519 signature, 64 bytes (serialized as a fixed tuple: no length prefix).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex::encode(self.0))
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(64)?;
        for b in &self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Signature, A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Signature(out))
            }
        }
        d.deserialize_tuple(64, V)
    }
}

pub use crate::ticket::SessionId;

/// The bytes a registering peer signs: a domain tag, the server's nonce and the name, so a
/// signature cannot be replayed on another connection or for another name.
pub fn register_payload(nonce: &[u8; 32], name: &str) -> Vec<u8> {
    const TAG: &[u8] = b"chuantou register v1\0";
    let mut out = Vec::with_capacity(TAG.len() + 32 + name.len());
    out.extend_from_slice(TAG);
    out.extend_from_slice(nonce);
    out.extend_from_slice(name.as_bytes());
    out
}

/// The bytes a peer signs to prove its key without registering ([`Request::Identify`]):
/// another domain tag than [`register_payload`]'s, so neither signature stands for the other.
pub fn identify_payload(nonce: &[u8; 32]) -> Vec<u8> {
    const TAG: &[u8] = b"chuantou identify v1\0";
    let mut out = Vec::with_capacity(TAG.len() + 32);
    out.extend_from_slice(TAG);
    out.extend_from_slice(nonce);
    out
}

/// Checks a peer name: 1 to 64 bytes of ASCII letters, digits, `-`, `_` and `.`, not
/// starting with `-` or `.`, so names are safe in URLs, file names and logs.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name must be 1 to {MAX_NAME_LEN} bytes, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "name {name:?} has {c:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    if name.starts_with(['-', '.']) {
        return Err(format!("name {name:?} must not start with '-' or '.'"));
    }
    Ok(())
}

impl Register {
    /// Checks the bounds of every field (not the signature).
    pub fn validate(&self) -> Result<(), ErrorFrame> {
        validate_name(&self.name).map_err(|m| ErrorFrame::new(ErrorCode::InvalidName, m))?;
        if self.services.len() > MAX_SERVICES {
            return Err(ErrorFrame::new(
                ErrorCode::BadRequest,
                format!(
                    "{} services offered, at most {MAX_SERVICES} allowed",
                    self.services.len()
                ),
            ));
        }
        if let Some(s) = self
            .services
            .iter()
            .find(|s| s.description.len() > MAX_DESCRIPTION_LEN)
        {
            return Err(ErrorFrame::new(
                ErrorCode::BadRequest,
                format!(
                    "description of service {} is {} bytes, at most {MAX_DESCRIPTION_LEN} allowed",
                    s.reference(),
                    s.description.len()
                ),
            ));
        }
        let mut refs: Vec<ServiceRef> = self.services.iter().map(Service::reference).collect();
        refs.sort_by_key(|r| (r.port, r.proto as u8));
        if let Some(w) = refs.windows(2).find(|w| w[0] == w[1]) {
            return Err(ErrorFrame::new(
                ErrorCode::BadRequest,
                format!("service {} offered twice", w[0]),
            ));
        }
        if self.lan_addrs.len() > MAX_LAN_ADDRS {
            return Err(ErrorFrame::new(
                ErrorCode::BadRequest,
                format!(
                    "{} LAN addresses reported, at most {MAX_LAN_ADDRS} allowed",
                    self.lan_addrs.len()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_tcp_mappings_tell_cone_sequential_and_random() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let n = NatInfo::from_tcp_mappings(a("198.18.1.2:40000"), a("198.18.1.2:40000"));
        assert_eq!(n.mapping, NatMapping::EndpointIndependent);
        let n = NatInfo::from_tcp_mappings(a("198.18.1.2:20003"), a("198.18.1.2:20006"));
        assert_eq!(
            (n.mapping, n.allocation, n.delta),
            (NatMapping::Varies, NatAllocation::Sequential, 3)
        );
        let n = NatInfo::from_tcp_mappings(a("198.18.1.2:20006"), a("198.18.1.2:20004"));
        assert_eq!((n.allocation, n.delta), (NatAllocation::Sequential, -2));
        for (x, y) in [
            ("198.18.1.2:20000", "198.18.1.2:31337"),
            ("198.18.1.2:20000", "198.18.1.3:20001"),
        ] {
            let n = NatInfo::from_tcp_mappings(a(x), a(y));
            assert_eq!(
                (n.mapping, n.allocation, n.delta),
                (NatMapping::Varies, NatAllocation::Random, 0)
            );
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("pc-home").is_ok());
        assert!(validate_name("a.b_c-9").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
        assert!(validate_name(&"x".repeat(64)).is_ok());
        assert!(validate_name("pc home").is_err());
        assert!(validate_name("-pc").is_err());
        assert!(validate_name(".pc").is_err());
        assert!(validate_name("../etc").is_err());
        assert!(validate_name("名字").is_err());
    }

    #[test]
    fn error_code_numbers_round_trip_and_unknown_survives() {
        for n in 0..40u16 {
            assert_eq!(ErrorCode::from_number(n).number(), n);
        }
        assert_eq!(ErrorCode::from_number(8), ErrorCode::NameTaken);
        assert_eq!(ErrorCode::from_number(999), ErrorCode::Other(999));
    }

    #[test]
    fn register_validation_rejects_out_of_bounds() {
        let base = Register {
            name: "pc".into(),
            key: PublicKey([1; 32]),
            services: vec![],
            lan_addrs: vec![],
            signature: Signature([0; 64]),
            nat: None,
        };
        assert!(base.validate().is_ok());
        let svc = |port, d: usize| Service {
            port,
            proto: Proto::Tcp,
            description: "d".repeat(d),
        };
        let mut r = base.clone();
        r.services = (0..17).map(|p| svc(p, 0)).collect();
        assert_eq!(r.validate().unwrap_err().code, ErrorCode::BadRequest);
        let mut r = base.clone();
        r.services = vec![svc(1, 129)];
        assert_eq!(r.validate().unwrap_err().code, ErrorCode::BadRequest);
        let mut r = base.clone();
        r.services = vec![svc(1, 0), svc(1, 3)];
        assert!(
            r.validate()
                .unwrap_err()
                .message
                .contains("1/tcp offered twice")
        );
        let mut r = base.clone();
        r.lan_addrs = vec!["198.18.0.1:1".parse().unwrap(); 9];
        assert_eq!(r.validate().unwrap_err().code, ErrorCode::BadRequest);
        let mut r = base;
        r.name = "bad name".into();
        assert_eq!(r.validate().unwrap_err().code, ErrorCode::InvalidName);
    }
}

#[cfg(test)]
mod wire_tests {
    //! The protocol's bytes, pinned: a change here breaks deployed peers.
    use super::*;
    use crate::frame::{MAX_FRAME_LEN, decode, encode, parse_header};
    use proptest::prelude::*;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
        let bytes = encode(msg).unwrap();
        let len = parse_header(bytes[..4].try_into().unwrap(), MAX_FRAME_LEN).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(&decode::<T>(&bytes[4..]).unwrap(), msg);
    }

    fn hex_of<T: Serialize>(msg: &T) -> String {
        hex::encode(encode(msg).unwrap())
    }

    fn sample_service() -> Service {
        Service {
            port: 7274,
            proto: Proto::Tcp,
            description: "web".into(),
        }
    }

    fn sample_broker() -> Broker {
        Broker {
            session: SessionId([0x5a; 16]),
            role: Role::Responder,
            peer: "phone".into(),
            peer_key: PublicKey([2; 32]),
            service: sample_service(),
            candidates: Candidates {
                tcp: Some("198.18.1.2:40000".parse().unwrap()),
                udp: Some("198.18.1.2:40001".parse().unwrap()),
                udp_alt: None,
                lan: vec!["198.19.0.5:5000".parse().unwrap()],
                mapped: Some("198.18.1.2:40002".parse().unwrap()),
                nat: None,
                tcp_nat: Some(NatInfo {
                    mapping: NatMapping::Varies,
                    allocation: NatAllocation::Sequential,
                    delta: -2,
                }),
            },
            start_in_ms: 300,
            secret: [7; 32],
            relay: None,
        }
    }

    #[test]
    fn an_unspecified_relay_address_means_the_host_the_client_reached() {
        let key = crate::ticket::TicketKey::from_bytes([3; 32]);
        let ticket = key.issue(SessionId([1; 16]), Role::Initiator, 9);
        let offer = |addr: &str| RelayOffer {
            addr: addr.parse().unwrap(),
            secret: key.join_secret(&ticket),
            ticket: ticket.clone(),
        };
        let server: IpAddr = "198.18.1.1".parse().unwrap();
        let mut b = Broker {
            relay: Some(offer("0.0.0.0:7001")),
            ..sample_broker()
        };
        b.resolve(server);
        assert_eq!(b.relay.unwrap().addr, "198.18.1.1:7001".parse().unwrap());
        // A concrete address (a standalone relay, an advertised one) stays as given.
        let mut b = Broker {
            relay: Some(offer("198.18.7.7:7001")),
            ..sample_broker()
        };
        b.resolve(server);
        assert_eq!(b.relay.unwrap().addr, "198.18.7.7:7001".parse().unwrap());
        assert_eq!(
            same_host("0.0.0.0:3478".parse().unwrap(), server),
            "198.18.1.1:3478".parse().unwrap()
        );
    }

    /// Every frame kind, pinned byte for byte: a change here breaks deployed peers, so it
    /// must come with a protocol version bump.
    #[test]
    fn byte_snapshots() {
        let hello = ClientFrame::Hello(Hello {
            version: 1,
            token: Some("t".into()),
        });
        assert_eq!(hex_of(&hello), "0000000500010101 74".replace(' ', ""));
        let register = ClientFrame::Request {
            id: 1,
            body: Request::Register(Register {
                name: "pc".into(),
                key: PublicKey([1; 32]),
                services: vec![sample_service()],
                lan_addrs: vec!["198.18.0.9:7000".parse().unwrap()],
                signature: Signature([3; 64]),
                nat: Some(NatInfo {
                    mapping: NatMapping::Varies,
                    allocation: NatAllocation::Sequential,
                    delta: 2,
                }),
            }),
        };
        assert_eq!(
            hex_of(&register),
            concat!(
                "0000007a",
                "01",
                "01",
                "00",
                "02",
                "7063",
                "0101010101010101010101010101010101010101010101010101010101010101",
                "01",
                "ea38",
                "00",
                "03",
                "776562",
                "01",
                "00",
                "c6120009",
                "d836",
                "03030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303",
                "01030204"
            )
        );
        let requests = [
            (
                Request::Heartbeat { rtt_ms: Some(12) },
                "0000000501020101 0c",
            ),
            (Request::List { after: None }, "00000004010302 00"),
            (
                Request::Lookup { name: "pc".into() },
                "0000000601040302 7063",
            ),
            (
                Request::Connect {
                    name: "pc".into(),
                    service: Some(ServiceRef {
                        port: 7274,
                        proto: Proto::Udp,
                    }),
                },
                "0000000a 0105 04 027063 01 ea38 01",
            ),
        ];
        for (i, (body, want)) in requests.into_iter().enumerate() {
            let frame = ClientFrame::Request {
                id: i as u32 + 2,
                body,
            };
            assert_eq!(hex_of(&frame), want.replace(' ', ""), "{frame:?}");
        }
        let welcome = ServerFrame::Welcome(Welcome {
            version: 1,
            nonce: [9; 32],
            heartbeat_interval_ms: 15000,
            software: "ct".into(),
            stun: Some("198.18.0.1:3478".parse().unwrap()),
            stun_alt: None,
            stun_port2: Some(3479),
        });
        assert_eq!(
            hex_of(&welcome),
            concat!(
                "00000033",
                "00",
                "01",
                "0909090909090909090909090909090909090909090909090909090909090909",
                "9875",
                "02",
                "6374",
                "01",
                "00",
                "c6120001",
                "961b",
                "00",
                "01971b"
            )
        );
        let registered = ServerFrame::Response {
            id: 1,
            body: Ok(Reply::Registered(Registered {
                observed_tcp: "198.18.1.2:40000".parse().unwrap(),
                stun_username: "u".into(),
                stun_password: "p".into(),
                replaced: false,
            })),
        };
        assert_eq!(
            hex_of(&registered),
            "00000011010100 00 00 c6120102 c0b802 0175 0170 00".replace(' ', "")
        );
        let ack = ServerFrame::Response {
            id: 2,
            body: Ok(Reply::HeartbeatAck { udp_addr: None }),
        };
        assert_eq!(hex_of(&ack), "000000050102000100");
        let peers = ServerFrame::Response {
            id: 3,
            body: Ok(Reply::Peers {
                peers: vec![PeerInfo {
                    name: "pc".into(),
                    key: PublicKey([1; 32]),
                    online: true,
                    services: vec![],
                    tcp_addr: None,
                    udp_addr: None,
                    last_seen_ms: 5,
                }],
                next: None,
            }),
        };
        assert_eq!(
            hex_of(&peers),
            concat!(
                "0000002e",
                "01",
                "03",
                "00",
                "02",
                "01",
                "02",
                "7063",
                "0101010101010101010101010101010101010101010101010101010101010101",
                "01",
                "00",
                "00",
                "00",
                "05",
                "00"
            )
        );
        let err = ServerFrame::Response {
            id: 4,
            body: Err(ErrorFrame::new(ErrorCode::NameTaken, "x")),
        };
        assert_eq!(hex_of(&err), "00000006010401 08 0178".replace(' ', ""));
        let broker = ServerFrame::Broker(Box::new(sample_broker()));
        assert_eq!(
            hex_of(&broker),
            concat!(
                "0000008b",
                "02",
                "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
                "01",
                "0570686f6e65",
                "0202020202020202020202020202020202020202020202020202020202020202",
                "ea3800",
                "03776562",
                "01",
                "00",
                "c6120102",
                "c0b802",
                "01",
                "00",
                "c6120102",
                "c1b802",
                "00",
                "01",
                "00",
                "c6130005",
                "8827",
                "00",
                "01",
                "03",
                "02",
                "03",
                // mapped: Some(198.18.1.2:40002), new in protocol 5
                "01",
                "00",
                "c6120102",
                "c2b802",
                "ac02",
                "0707070707070707070707070707070707070707070707070707070707070707",
                "00"
            )
        );
        let fatal = ServerFrame::Error(ErrorFrame::new(ErrorCode::Timeout, "t"));
        assert_eq!(hex_of(&fatal), "00000004030601 74".replace(' ', ""));
    }

    #[test]
    fn round_trips() {
        round_trip(&ServerFrame::Broker(Box::new(sample_broker())));
        round_trip(&ServerFrame::Response {
            id: u32::MAX,
            body: Ok(Reply::Brokered(Box::new(sample_broker()))),
        });
        round_trip(&ServerFrame::Error(ErrorFrame::new(
            ErrorCode::Other(4242),
            "from the future",
        )));
        round_trip(&ClientFrame::Request {
            id: 0,
            body: Request::Connect {
                name: "pc-home".into(),
                service: None,
            },
        });
        round_trip(&ClientFrame::Hello(Hello {
            version: 1,
            token: None,
        }));
    }

    proptest! {
        /// Whatever a peer sends, decoding returns an error or a message; never a panic.
        #[test]
        fn decoder_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ClientFrame>(&body);
            let _ = decode::<ServerFrame>(&body);
        }

        #[test]
        fn lookup_round_trips(name in "[a-z0-9.-]{0,64}", id in any::<u32>()) {
            let f = ClientFrame::Request { id, body: Request::Lookup { name } };
            let bytes = encode(&f).unwrap();
            prop_assert_eq!(decode::<ClientFrame>(&bytes[4..]).unwrap(), f);
        }
    }
}
