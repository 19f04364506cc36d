//! Public entries: a peer asks the rendezvous to publish one of its services to clients that
//! run no `peer` (a browser, a phone app, a webhook sender), by host name over HTTP
//! (`http://NAME.DOMAIN/`), by TLS server name (passed through, so the service's own
//! certificate reaches the client), or on a raw TCP port of the server. For each client
//! connection the rendezvous pushes [`PublicOpen`] with a relay ticket; the exposer joins
//! that relay session, connects the session to its service, says [`OPEN_OK`] or
//! [`OPEN_REFUSED`], and the bytes flow.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{ErrorCode, ErrorFrame, RelayOffer, ServiceRef};

/// The exposer's first byte on a public relay stream: its service accepted the connection.
pub const OPEN_OK: u8 = 0;
/// The exposer's first byte on a public relay stream: its service refused the connection
/// (nothing listens there); the stream closes after it.
pub const OPEN_REFUSED: u8 = 1;

/// The first byte of every datagram of a public UDP flow on the relay, so that no client
/// datagram can look like relay control (whose first byte is 0); both ends strip it.
pub const UDP_DATA: u8 = 0x40;

/// Longest basic-auth user name or password, or bearer secret, in bytes.
pub const MAX_SECRET_LEN: usize = 256;

/// `Request::Publish`: publish one service of this registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// Which of the registered services.
    pub service: ServiceRef,
    /// By host name over HTTP: `http://NAME.DOMAIN/`.
    pub http: bool,
    /// By TLS server name (SNI), passed through undecrypted: `NAME.DOMAIN`.
    pub tls: bool,
    /// On a raw port of the server (TCP, or UDP for a UDP service): `Some(None)` any free
    /// one, `Some(Some(n))` port n.
    pub port: Option<Option<u16>>,
    /// What HTTP clients must present (HTTP only: TLS and raw ports are not read).
    pub auth: Option<HttpAuth>,
}

/// Protection of an HTTP entry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpAuth {
    /// `Authorization: Basic` with this user and password (a browser asks for them).
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// `Authorization: Bearer SECRET`.
    Bearer(String),
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpAuth::Basic { user, .. } => write!(f, "Basic({user}:..)"),
            HttpAuth::Bearer(_) => f.write_str("Bearer(..)"),
        }
    }
}

impl HttpAuth {
    /// Parses the `--public-auth` form: `USER:PASS` for basic auth, `bearer:SECRET` for a
    /// bearer secret.
    pub fn parse(spec: &str) -> Result<HttpAuth, String> {
        let (user, secret) = spec
            .split_once(':')
            .ok_or_else(|| "give USER:PASS (basic auth) or bearer:SECRET".to_owned())?;
        let auth = if user.eq_ignore_ascii_case("bearer") {
            HttpAuth::Bearer(secret.to_owned())
        } else {
            HttpAuth::Basic {
                user: user.to_owned(),
                password: secret.to_owned(),
            }
        };
        auth.validate().map_err(|e| e.message)?;
        Ok(auth)
    }

    fn validate(&self) -> Result<(), ErrorFrame> {
        let bad = |m: &str| Err(ErrorFrame::new(ErrorCode::BadRequest, m));
        match self {
            HttpAuth::Basic { user, password } => {
                if user.is_empty() || password.is_empty() {
                    return bad("basic auth needs a user name and a password");
                }
                if user.len() > MAX_SECRET_LEN || password.len() > MAX_SECRET_LEN {
                    return bad("basic auth user name or password longer than 256 bytes");
                }
                if user.contains(':') || user.chars().chain(password.chars()).any(char::is_control)
                {
                    return bad(
                        "basic auth user names hold no ':' and neither holds control characters",
                    );
                }
            }
            HttpAuth::Bearer(s) => {
                if s.is_empty() || s.len() > MAX_SECRET_LEN {
                    return bad("a bearer secret is 1 to 256 bytes");
                }
                if !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return bad("a bearer secret is printable ASCII without spaces");
                }
            }
        }
        Ok(())
    }
}

impl Publish {
    /// Checks the request's own consistency (what the server allows is its business).
    pub fn validate(&self) -> Result<(), ErrorFrame> {
        if !self.http && !self.tls && self.port.is_none() {
            return Err(ErrorFrame::new(
                ErrorCode::BadRequest,
                "publish asks for no entry: choose http, tls or a port",
            ));
        }
        if let Some(a) = &self.auth {
            if !self.http {
                return Err(ErrorFrame::new(
                    ErrorCode::BadRequest,
                    "auth protects the HTTP entry only; TLS and raw ports are never read",
                ));
            }
            a.validate()?;
        }
        Ok(())
    }
}

/// `Reply::Published`: where plain clients now reach the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// `http://NAME.DOMAIN[:PORT]/`.
    pub http: Option<String>,
    /// `NAME.DOMAIN[:PORT]`, for TLS clients (`https://` when the service speaks HTTPS).
    pub tls: Option<String>,
    /// `HOST:PORT` of the raw TCP port.
    pub port: Option<String>,
    /// `HOST:PORT` of the raw UDP port (a UDP service's `port` entry).
    pub udp_port: Option<String>,
}

impl Published {
    /// Every address, for logs and `peer status`.
    pub fn urls(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(self.http.clone());
        out.extend(self.tls.as_ref().map(|t| format!("tls://{t}")));
        out.extend(self.port.as_ref().map(|p| format!("tcp://{p}")));
        out.extend(self.udp_port.as_ref().map(|p| format!("udp://{p}")));
        out
    }
}

/// How a public client came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// By host name over HTTP.
    Http,
    /// By TLS server name.
    Tls,
    /// On a raw TCP port.
    Port,
    /// On a raw UDP port: a flow per client address, datagrams each prefixed with
    /// [`UDP_DATA`] on the relay.
    UdpPort,
}

impl EntryKind {
    /// Lower-case name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Http => "http",
            EntryKind::Tls => "tls",
            EntryKind::Port => "port",
            EntryKind::UdpPort => "udp",
        }
    }
}

/// `ServerFrame::Open`: a public client wants the service; join the relay session with
/// this ticket, connect it to the service, and send [`OPEN_OK`] or [`OPEN_REFUSED`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicOpen {
    /// Which service (one the exposer published).
    pub service: ServiceRef,
    /// How the client came in.
    pub entry: EntryKind,
    /// The client's address, for the exposer's logs.
    pub client: SocketAddr,
    /// The relay session and this side's ticket.
    pub relay: RelayOffer,
}

/// Whether `name` can be a host name label under the public domain: lowercase letters,
/// digits and '-', at most 63 bytes, not starting or ending with '-' (RFC 1123).
pub fn is_host_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            HttpAuth::parse("amy:s3cret:x").unwrap(),
            HttpAuth::Basic {
                user: "amy".into(),
                password: "s3cret:x".into()
            }
        );
        assert_eq!(
            HttpAuth::parse("bearer:tok-123").unwrap(),
            HttpAuth::Bearer("tok-123".into())
        );
        assert!(HttpAuth::parse("nocolon").is_err());
        assert!(HttpAuth::parse(":pass").is_err());
        assert!(HttpAuth::parse("bearer:has space").is_err());
        assert!(!format!("{:?}", HttpAuth::parse("amy:s3cret").unwrap()).contains("s3cret"));
    }

    #[test]
    fn host_labels() {
        assert!(is_host_label("pc-home"));
        assert!(is_host_label("a1"));
        assert!(!is_host_label("PC-home"));
        assert!(!is_host_label("pc_home"));
        assert!(!is_host_label("pc.home"));
        assert!(!is_host_label("-pc"));
        assert!(!is_host_label(&"a".repeat(64)));
    }
}
