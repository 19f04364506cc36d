//! STUN Binding, both halves, sans-IO: the responder's decisions (RFC 8489, RFC 5780, and
//! the classic RFC 3489 format for old clients) and the client's request/response codec.
//!
//! The responder owns no socket. Its shell binds one socket per [`Slot`] (primary and
//! alternate IP × primary and alternate port when an alternate IP is configured, else just
//! the primary) and feeds each datagram to [`Responder::handle`], which says which slot to
//! answer from and with what bytes, or why it dropped the datagram.
//!
//! Rules the responder keeps:
//! - A datagram that is not a well-formed Binding request is dropped, never answered, so
//!   the server cannot be made to talk to arbitrary ports.
//! - Responses are at most [`defaults::STUN_MAX_RESPONSE`] bytes and each source IP gets a
//!   token bucket: a spoofed source can be reflected only a small, bounded amount.
//! - A request with USERNAME and MESSAGE-INTEGRITY (short-term credential from a
//!   registration) is verified; a good one links the observed address to that peer.
//! - CHANGE-REQUEST, RESPONSE-PORT and PADDING are refused with 420 when the server cannot
//!   honour them (no alternate address; RESPONSE-PORT and PADDING are not supported), as
//!   RFC 5780 §6.1 asks, so a client can tell a plain server from a discovery server.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use stun_rs::attributes::discovery::{
    ChangeRequest, ChangeRequestFlags, OtherAddress, Padding, ResponseOrigin, ResponsePort,
};
use stun_rs::attributes::stun::{
    ErrorCode, Fingerprint, MappedAddress, MessageIntegrity, Software, UnknownAttributes, UserName,
    XorMappedAddress,
};
use stun_rs::methods::BINDING;
use stun_rs::{
    DecoderContextBuilder, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder,
    StunMessage, StunMessageBuilder, TransactionId,
};

use crate::defaults;
use crate::ratelimit::RateLimiter;

/// The SOFTWARE attribute of our responses.
pub const SOFTWARE: &str = concat!("chuantou ", env!("CARGO_PKG_VERSION"));

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const HEADER: usize = 20;
const CLASSIC_BINDING_RESPONSE: u16 = 0x0101;
const CLASSIC_BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_SOURCE_ADDRESS: u16 = 0x0004;
const ATTR_CHANGED_ADDRESS: u16 = 0x0005;
const ATTR_ERROR_CODE: u16 = 0x0009;

/// One of the responder's (up to) four sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// On the alternate IP.
    pub alt_ip: bool,
    /// On the alternate port.
    pub alt_port: bool,
}

impl Slot {
    /// The primary IP and port.
    pub const PRIMARY: Slot = Slot {
        alt_ip: false,
        alt_port: false,
    };

    /// The slot an answer comes from when the client asks to change IP and/or port.
    pub fn changed(self, ip: bool, port: bool) -> Slot {
        Slot {
            alt_ip: self.alt_ip ^ ip,
            alt_port: self.alt_port ^ port,
        }
    }
}

/// Where the responder listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Primary IP and port.
    pub primary: SocketAddr,
    /// Alternate IP and port (RFC 5780); `None` for a plain RFC 8489 server.
    pub alternate: Option<SocketAddr>,
    /// A plain server's second port on the primary IP: answers Binding requests as the
    /// primary does (no OTHER-ADDRESS; CHANGE-REQUEST still gets 420), so that a peer of
    /// a one-IP server can tell whether its NAT's mapping changes with the destination
    /// (a symmetric NAT), which decides how it punches. Its slot is the alternate port's.
    pub port2: Option<u16>,
}

impl Layout {
    /// The address of a slot.
    pub fn addr(&self, slot: Slot) -> SocketAddr {
        let alt = self.alternate.unwrap_or(self.primary);
        SocketAddr::new(
            if slot.alt_ip {
                alt.ip()
            } else {
                self.primary.ip()
            },
            if slot.alt_port {
                match (self.alternate, self.port2) {
                    (None, Some(p)) => p,
                    _ => alt.port(),
                }
            } else {
                self.primary.port()
            },
        )
    }

    /// Every slot this layout has: one (two with a second port), or four with an
    /// alternate.
    pub fn slots(&self) -> Vec<Slot> {
        if self.alternate.is_none() {
            let second = self.port2.map(|_| Slot::PRIMARY.changed(false, true));
            return [Some(Slot::PRIMARY), second]
                .into_iter()
                .flatten()
                .collect();
        }
        [(false, false), (false, true), (true, false), (true, true)]
            .into_iter()
            .map(|(alt_ip, alt_port)| Slot { alt_ip, alt_port })
            .collect()
    }
}

/// A datagram that arrived on one of the responder's sockets.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The socket it arrived on.
    pub slot: Slot,
    /// Who sent it.
    pub src: SocketAddr,
    /// Its bytes.
    pub data: &'a [u8],
}

/// What to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The socket to send from.
    pub from: Slot,
    /// The destination: always the request's source.
    pub to: SocketAddr,
    /// The encoded response.
    pub bytes: Vec<u8>,
    /// The USERNAME of a request whose MESSAGE-INTEGRITY verified.
    pub authenticated: Option<String>,
    /// The STUN error code sent, if the response is an error.
    pub error: Option<u16>,
}

/// Why a datagram got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Dropped {
    /// The source exceeded its rate.
    #[error("source over its rate limit")]
    RateLimited,
    /// Larger than any request we accept.
    #[error("datagram too large")]
    TooLarge,
    /// Not a STUN message, or a malformed one.
    #[error("not a well-formed STUN message")]
    Malformed,
    /// A STUN response or indication: nothing to answer.
    #[error("not a request")]
    NotRequest,
    /// The answer would exceed the response size bound.
    #[error("response would exceed the size bound")]
    ResponseTooLarge,
}

/// The STUN Binding responder core.
#[derive(Debug)]
pub struct Responder {
    layout: Layout,
    /// The layout as clients see it: the same, unless the host sits behind a 1:1 NAT.
    advertised: Layout,
    limiter: RateLimiter<IpAddr>,
}

impl Responder {
    /// A responder for `layout` with the default rate limits.
    pub fn new(layout: Layout) -> Self {
        Self::with_limits(
            layout,
            defaults::STUN_RATE,
            defaults::STUN_BURST,
            defaults::STUN_RATE_TABLE,
        )
    }

    /// A responder with explicit rate limits (`rate`/s, `burst`, sources tracked).
    pub fn with_limits(layout: Layout, rate: u32, burst: u32, table: usize) -> Self {
        Responder {
            layout,
            advertised: layout,
            limiter: RateLimiter::new(rate, burst, table),
        }
    }

    /// Names `advertised` in OTHER-ADDRESS and RESPONSE-ORIGIN instead of the bound
    /// addresses: the public side of a 1:1 NAT, as coturn's `--external-ip PUBLIC/PRIVATE`.
    /// It must have the same slots as the bound layout.
    pub fn with_advertised(mut self, advertised: Layout) -> Self {
        if advertised.alternate.is_some() == self.layout.alternate.is_some() {
            self.advertised = advertised;
        }
        self
    }

    /// Its layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Decides the answer to one datagram. `password_of` maps a USERNAME to its current
    /// short-term password.
    pub fn handle(
        &mut self,
        now: Instant,
        rx: Received<'_>,
        password_of: impl FnOnce(&str) -> Option<String>,
    ) -> Result<Reply, Dropped> {
        if rx.data.len() > defaults::STUN_MAX_REQUEST {
            return Err(Dropped::TooLarge);
        }
        // Cheap shape check before spending a token: only things that look like STUN
        // requests count against (and are limited by) the bucket.
        if rx.data.len() < HEADER
            || rx.data[0] & 0xc0 != 0
            || usize::from(u16::from_be_bytes([rx.data[2], rx.data[3]])) != rx.data.len() - HEADER
            || rx.data.len() % 4 != 0
        {
            return Err(Dropped::Malformed);
        }
        if !self.limiter.allow(now, &rx.src.ip()) {
            return Err(Dropped::RateLimited);
        }
        if rx.data[4..8] != MAGIC_COOKIE {
            return self.handle_classic(rx);
        }
        let (msg, used) = MessageDecoderBuilder::default()
            .build()
            .decode(rx.data)
            .map_err(|_| Dropped::Malformed)?;
        if used != rx.data.len() {
            return Err(Dropped::Malformed);
        }
        if msg.class() != MessageClass::Request {
            return Err(Dropped::NotRequest);
        }
        // A FINGERPRINT that does not verify means this is not really STUN (RFC 8489 §7.3):
        // drop it. (With MESSAGE-INTEGRITY it is checked below together with the HMAC.)
        if msg.get::<Fingerprint>().is_some()
            && msg.get::<MessageIntegrity>().is_none()
            && MessageDecoderBuilder::default()
                .with_context(DecoderContextBuilder::default().with_validation().build())
                .build()
                .decode(rx.data)
                .is_err()
        {
            return Err(Dropped::Malformed);
        }
        let tid = *msg.transaction_id();
        if msg.method() != BINDING {
            return self.error(rx, tid, 400, "only Binding is served here", &[]);
        }

        let mut unknown: Vec<u16> = msg
            .attributes()
            .iter()
            .filter(|a| a.is_unknown() && a.attribute_type().is_comprehension_required())
            .map(|a| a.attribute_type().as_u16())
            .collect();
        let change = msg
            .get::<ChangeRequest>()
            .and_then(|a| a.as_change_request().ok())
            .map(|c| c.flags());
        if change.is_some() && self.layout.alternate.is_none() {
            unknown.push(ATTR_CHANGE_REQUEST);
        }
        if !unknown.is_empty() {
            return self.error(rx, tid, 420, "Unknown Attribute", &unknown);
        }

        let user = msg
            .get::<UserName>()
            .and_then(|a| a.as_user_name().ok())
            .map(|u| u.as_str().to_owned());
        let key = match (&user, msg.get::<MessageIntegrity>().is_some()) {
            (None, false) => None,
            (Some(_), false) | (None, true) => {
                return self.error(
                    rx,
                    tid,
                    400,
                    "USERNAME and MESSAGE-INTEGRITY go together",
                    &[],
                );
            }
            (Some(user), true) => {
                let Some(key) = password_of(user).and_then(|p| HMACKey::new_short_term(p).ok())
                else {
                    return self.error(rx, tid, 401, "Unauthorized", &[]);
                };
                let ctx = DecoderContextBuilder::default()
                    .with_key(key.clone())
                    .with_validation()
                    .build();
                if MessageDecoderBuilder::default()
                    .with_context(ctx)
                    .build()
                    .decode(rx.data)
                    .is_err()
                {
                    return self.error(rx, tid, 401, "Unauthorized", &[]);
                }
                Some(key)
            }
        };

        let authenticated = user.filter(|_| key.is_some());
        let (ip, port) = change.map_or((false, false), |f| {
            (
                f.contains(ChangeRequestFlags::ChangeIp),
                f.contains(ChangeRequestFlags::ChangePort),
            )
        });
        let from = rx.slot.changed(ip, port);
        // RESPONSE-PORT (RFC 5780 §7.5) redirects the answer to another port of the same
        // source IP only, so it reflects nothing the per-IP limit does not already cover.
        let to = match msg
            .get::<ResponsePort>()
            .and_then(|a| a.as_response_port().ok())
            .map(|p| p.as_u16())
        {
            Some(0) => return self.error(rx, tid, 400, "RESPONSE-PORT 0", &[]),
            Some(port) => SocketAddr::new(rx.src.ip(), port),
            None => rx.src,
        };
        let layout = self.advertised;
        let build = |padding: Option<Padding>| {
            let mut b = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
                .with_transaction_id(tid)
                .with_attribute(XorMappedAddress::from(rx.src))
                .with_attribute(MappedAddress::from(rx.src));
            if layout.alternate.is_some() {
                // OTHER-ADDRESS names the slot across from the one the request reached.
                b = b
                    .with_attribute(OtherAddress::from(layout.addr(rx.slot.changed(true, true))))
                    .with_attribute(ResponseOrigin::from(layout.addr(from)));
            }
            if let Ok(sw) = Software::new(SOFTWARE) {
                b = b.with_attribute(sw);
            }
            if let Some(p) = padding {
                b = b.with_attribute(p);
            }
            finish(b, key.clone())
        };
        // PADDING (RFC 5780 §7.6) tests fragmentation: pad the answer too, but never past
        // the request's own size, so padding cannot amplify.
        let mut limit = defaults::STUN_MAX_RESPONSE;
        let mut padding = None;
        if msg.get::<Padding>().is_some() {
            let unpadded = encode(&build(None), limit)?.len();
            let room = rx.data.len().saturating_sub(unpadded + 4) / 4 * 4;
            if room > 0 {
                padding = Padding::new(" ".repeat(room)).ok();
                limit = rx.data.len();
            }
        }
        let bytes = encode(&build(padding), limit)?;
        Ok(Reply {
            from,
            to,
            bytes,
            authenticated,
            error: None,
        })
    }

    fn error(
        &self,
        rx: Received<'_>,
        tid: TransactionId,
        code: u16,
        reason: &str,
        unknown: &[u16],
    ) -> Result<Reply, Dropped> {
        let mut b =
            StunMessageBuilder::new(BINDING, MessageClass::ErrorResponse).with_transaction_id(tid);
        if let Ok(ec) = stun_rs::ErrorCode::new(code, reason) {
            b = b.with_attribute(ErrorCode::new(ec));
        }
        if !unknown.is_empty() {
            b = b.with_attribute(UnknownAttributes::from(unknown));
        }
        if let Ok(sw) = Software::new(SOFTWARE) {
            b = b.with_attribute(sw);
        }
        let bytes = encode(&finish(b, None), defaults::STUN_MAX_RESPONSE)?;
        Ok(Reply {
            from: rx.slot,
            to: rx.src,
            bytes,
            authenticated: None,
            error: Some(code),
        })
    }

    /// RFC 3489 requests have no magic cookie and a 16-byte transaction id; answer in kind
    /// with MAPPED-ADDRESS, SOURCE-ADDRESS and CHANGED-ADDRESS.
    fn handle_classic(&self, rx: Received<'_>) -> Result<Reply, Dropped> {
        let d = rx.data;
        if u16::from_be_bytes([d[0], d[1]]) != 0x0001 {
            return Err(Dropped::Malformed);
        }
        let mut change = None;
        let mut at = HEADER;
        while at < d.len() {
            if at + 4 > d.len() {
                return Err(Dropped::Malformed);
            }
            let ty = u16::from_be_bytes([d[at], d[at + 1]]);
            let len = usize::from(u16::from_be_bytes([d[at + 2], d[at + 3]]));
            let value = d.get(at + 4..at + 4 + len).ok_or(Dropped::Malformed)?;
            if ty == ATTR_CHANGE_REQUEST && len == 4 {
                change = Some((value[3] & 0x04 != 0, value[3] & 0x02 != 0));
            }
            at += 4 + len.next_multiple_of(4);
        }
        let mut out = Vec::with_capacity(HEADER + 3 * 12);
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&d[4..HEADER]);
        if change.is_some() && self.layout.alternate.is_none() {
            out[..2].copy_from_slice(&CLASSIC_BINDING_ERROR.to_be_bytes());
            // ERROR-CODE 420, then UNKNOWN-ATTRIBUTES listing CHANGE-REQUEST (padded by
            // repeating it, as RFC 3489 §11.2.10 says).
            push_attr(&mut out, ATTR_ERROR_CODE, &[0, 0, 4, 20]);
            push_attr(&mut out, 0x000a, &[0, 3, 0, 3]);
            finish_classic(&mut out);
            return Ok(Reply {
                from: rx.slot,
                to: rx.src,
                bytes: out,
                authenticated: None,
                error: Some(420),
            });
        }
        let (ip, port) = change.unwrap_or((false, false));
        let from = rx.slot.changed(ip, port);
        out[..2].copy_from_slice(&CLASSIC_BINDING_RESPONSE.to_be_bytes());
        push_attr(&mut out, ATTR_MAPPED_ADDRESS, &address_value(rx.src));
        push_attr(
            &mut out,
            ATTR_SOURCE_ADDRESS,
            &address_value(self.advertised.addr(from)),
        );
        if self.layout.alternate.is_some() {
            push_attr(
                &mut out,
                ATTR_CHANGED_ADDRESS,
                &address_value(self.advertised.addr(rx.slot.changed(true, true))),
            );
        }
        finish_classic(&mut out);
        Ok(Reply {
            from,
            to: rx.src,
            bytes: out,
            authenticated: None,
            error: None,
        })
    }
}

/// Ends a response: MESSAGE-INTEGRITY when the request was authenticated, then FINGERPRINT.
fn finish(mut b: StunMessageBuilder, key: Option<HMACKey>) -> StunMessage {
    if let Some(key) = key {
        b = b.with_attribute(MessageIntegrity::new(key));
    }
    b.with_attribute(Fingerprint::default()).build()
}

fn encode(msg: &StunMessage, limit: usize) -> Result<Vec<u8>, Dropped> {
    let mut buf = vec![0u8; limit];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, msg)
        .map_err(|_| Dropped::ResponseTooLarge)?;
    buf.truncate(n);
    Ok(buf)
}

fn push_attr(out: &mut Vec<u8>, ty: u16, value: &[u8]) {
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn finish_classic(out: &mut [u8]) {
    let len = (out.len() - HEADER) as u16;
    out[2..4].copy_from_slice(&len.to_be_bytes());
}

fn address_value(a: SocketAddr) -> Vec<u8> {
    let mut v = vec![0u8];
    match a.ip() {
        IpAddr::V4(ip) => {
            v.push(1);
            v.extend_from_slice(&a.port().to_be_bytes());
            v.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            v.push(2);
            v.extend_from_slice(&a.port().to_be_bytes());
            v.extend_from_slice(&ip.octets());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;
    use wire::stun::{BindingError, binding_request, parse_response};

    const CLIENT: &str = "198.18.7.7:40000";

    fn plain() -> Responder {
        Responder::new(Layout {
            primary: "198.18.0.1:3478".parse().unwrap(),
            alternate: None,
            port2: None,
        })
    }

    fn rfc5780() -> Responder {
        Responder::new(Layout {
            primary: "198.18.0.1:3478".parse().unwrap(),
            alternate: Some("198.18.0.2:3479".parse().unwrap()),
            port2: None,
        })
    }

    fn ask(
        r: &mut Responder,
        slot: Slot,
        data: &[u8],
        pass: Option<&str>,
    ) -> Result<Reply, Dropped> {
        let src = CLIENT.parse().unwrap();
        r.handle(Instant::now(), Received { slot, src, data }, |u| {
            (u == "alice").then(|| pass.unwrap_or("secret").to_owned())
        })
    }

    #[test]
    fn plain_binding_reports_the_source_and_no_rfc5780_attributes() {
        let req = binding_request(None, None).unwrap();
        let reply = ask(&mut plain(), Slot::PRIMARY, &req.bytes, None).unwrap();
        assert_eq!(reply.from, Slot::PRIMARY);
        assert_eq!(reply.to, CLIENT.parse().unwrap());
        assert_eq!(reply.authenticated, None);
        let resp = parse_response(&reply.bytes, &req.tid, None).unwrap();
        assert_eq!(resp.mapped, CLIENT.parse().unwrap());
        assert_eq!((resp.other, resp.origin), (None, None));
        // MAPPED-ADDRESS is there too, for RFC 3489-era parsers.
        let (msg, _) = MessageDecoderBuilder::default()
            .build()
            .decode(&reply.bytes)
            .unwrap();
        assert!(msg.get::<MappedAddress>().is_some());
        assert!(msg.get::<Software>().is_some());
        assert!(reply.bytes.len() <= defaults::STUN_MAX_RESPONSE);
    }

    #[test]
    fn a_one_ip_servers_second_port_answers_as_the_primary_and_changes_nothing() {
        let layout = Layout {
            primary: "198.18.0.1:3478".parse().unwrap(),
            alternate: None,
            port2: Some(3479),
        };
        let second = Slot::PRIMARY.changed(false, true);
        assert_eq!(layout.slots(), [Slot::PRIMARY, second]);
        assert_eq!(layout.addr(second), "198.18.0.1:3479".parse().unwrap());
        let mut r = Responder::new(layout);
        let req = binding_request(None, None).unwrap();
        let reply = ask(&mut r, second, &req.bytes, None).unwrap();
        assert_eq!(reply.from, second);
        let resp = parse_response(&reply.bytes, &req.tid, None).unwrap();
        assert_eq!(resp.mapped, CLIENT.parse().unwrap());
        assert_eq!((resp.other, resp.origin), (None, None));
        // Still no RFC 5780 server: a change is refused, whichever port is asked.
        let req = binding_request(None, Some((false, true))).unwrap();
        assert_eq!(
            ask(&mut r, second, &req.bytes, None).unwrap().error,
            Some(420)
        );
    }

    #[test]
    fn change_request_answers_from_the_other_ip_and_port() {
        let mut r = rfc5780();
        for (ip, port, want) in [
            (false, false, "198.18.0.1:3478"),
            (false, true, "198.18.0.1:3479"),
            (true, false, "198.18.0.2:3478"),
            (true, true, "198.18.0.2:3479"),
        ] {
            let req = binding_request(None, Some((ip, port))).unwrap();
            let reply = ask(&mut r, Slot::PRIMARY, &req.bytes, None).unwrap();
            assert_eq!(r.layout().addr(reply.from), want.parse().unwrap());
            let resp = parse_response(&reply.bytes, &req.tid, None).unwrap();
            assert_eq!(resp.origin, Some(want.parse().unwrap()), "RESPONSE-ORIGIN");
            assert_eq!(resp.other, Some("198.18.0.2:3479".parse().unwrap()));
        }
        // A request reaching the alternate slot names the primary as OTHER-ADDRESS.
        let req = binding_request(None, None).unwrap();
        let alt = Slot {
            alt_ip: true,
            alt_port: true,
        };
        let reply = ask(&mut r, alt, &req.bytes, None).unwrap();
        let resp = parse_response(&reply.bytes, &req.tid, None).unwrap();
        assert_eq!(resp.other, Some("198.18.0.1:3478".parse().unwrap()));
        assert_eq!(reply.from, alt);
    }

    #[test]
    fn behind_a_one_to_one_nat_the_public_addresses_are_named() {
        // Bound to private addresses, published as 198.18.1.5/198.18.1.6.
        let public = Layout {
            primary: "198.18.1.5:3478".parse().unwrap(),
            alternate: Some("198.18.1.6:3479".parse().unwrap()),
            port2: None,
        };
        let mut r = rfc5780().with_advertised(public);
        let req = binding_request(None, Some((true, false))).unwrap();
        let reply = ask(&mut r, Slot::PRIMARY, &req.bytes, None).unwrap();
        // Sent from the bound alternate socket...
        assert_eq!(
            r.layout().addr(reply.from),
            "198.18.0.2:3478".parse().unwrap()
        );
        // ...and named by the addresses clients can reach.
        let resp = parse_response(&reply.bytes, &req.tid, None).unwrap();
        assert_eq!(resp.origin, Some("198.18.1.6:3478".parse().unwrap()));
        assert_eq!(resp.other, Some("198.18.1.6:3479".parse().unwrap()));
        assert_eq!(resp.mapped, CLIENT.parse().unwrap());
    }

    #[test]
    fn change_request_without_alternate_is_420_naming_it() {
        let req = binding_request(None, Some((true, true))).unwrap();
        let reply = ask(&mut plain(), Slot::PRIMARY, &req.bytes, None).unwrap();
        assert_eq!(reply.error, Some(420));
        match parse_response(&reply.bytes, &req.tid, None) {
            Err(BindingError::Server {
                code: 420, unknown, ..
            }) => assert_eq!(unknown, vec![3]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_comprehension_required_attribute_is_420() {
        // Hand-built: Binding request with attribute 0x7777 (comprehension-required, unknown).
        let mut d = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
        d.extend_from_slice(&[9; 12]);
        d.extend_from_slice(&[0x77, 0x77, 0x00, 0x04, 1, 2, 3, 4]);
        let reply = ask(&mut rfc5780(), Slot::PRIMARY, &d, None).unwrap();
        assert_eq!(reply.error, Some(420));
        // An unknown comprehension-optional one (0xC0DE) is ignored.
        d[20..22].copy_from_slice(&[0xc0, 0xde]);
        assert_eq!(
            ask(&mut rfc5780(), Slot::PRIMARY, &d, None).unwrap().error,
            None
        );
    }

    #[test]
    fn credentialed_request_links_and_signs_the_response() {
        let req = binding_request(Some(("alice", "secret")), None).unwrap();
        let reply = ask(&mut plain(), Slot::PRIMARY, &req.bytes, None).unwrap();
        assert_eq!(reply.authenticated.as_deref(), Some("alice"));
        let resp = parse_response(&reply.bytes, &req.tid, Some("secret")).unwrap();
        assert_eq!(resp.mapped, CLIENT.parse().unwrap());
        // The client refuses a response signed with another password.
        assert_eq!(
            parse_response(&reply.bytes, &req.tid, Some("other")),
            Err(BindingError::Integrity)
        );
    }

    #[test]
    fn bad_credentials_get_401_or_400_and_link_nothing() {
        let wrong = binding_request(Some(("alice", "guess")), None).unwrap();
        let reply = ask(&mut plain(), Slot::PRIMARY, &wrong.bytes, None).unwrap();
        assert_eq!((reply.error, reply.authenticated), (Some(401), None));
        let unknown = binding_request(Some(("mallory", "secret")), None).unwrap();
        let reply = ask(&mut plain(), Slot::PRIMARY, &unknown.bytes, None).unwrap();
        assert_eq!((reply.error, reply.authenticated), (Some(401), None));
        // USERNAME without MESSAGE-INTEGRITY.
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
            .with_attribute(UserName::new("alice").unwrap())
            .build();
        let mut buf = [0u8; 128];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &msg)
            .unwrap();
        let reply = ask(&mut plain(), Slot::PRIMARY, &buf[..n], None).unwrap();
        assert_eq!((reply.error, reply.authenticated), (Some(400), None));
    }

    fn request_with(attrs: Vec<stun_rs::StunAttribute>) -> (TransactionId, Vec<u8>) {
        let tid = TransactionId::default();
        let mut b =
            StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(tid);
        for a in attrs {
            b = b.with_attribute(a);
        }
        let mut buf = vec![0u8; 2048];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &b.build())
            .unwrap();
        buf.truncate(n);
        (tid, buf)
    }

    #[test]
    fn response_port_redirects_to_another_port_of_the_same_ip() {
        let (tid, req) = request_with(vec![ResponsePort::from(5555).into()]);
        let reply = ask(&mut rfc5780(), Slot::PRIMARY, &req, None).unwrap();
        assert_eq!(reply.to, "198.18.7.7:5555".parse().unwrap());
        // The mapped address still names where the request came from.
        let resp = parse_response(&reply.bytes, &tid, None).unwrap();
        assert_eq!(resp.mapped, CLIENT.parse().unwrap());
        let (_, req) = request_with(vec![ResponsePort::from(0).into()]);
        assert_eq!(
            ask(&mut rfc5780(), Slot::PRIMARY, &req, None)
                .unwrap()
                .error,
            Some(400)
        );
    }

    #[test]
    fn padded_request_gets_padded_answer_never_larger_than_itself() {
        let (tid, req) = request_with(vec![Padding::new(" ".repeat(1400)).unwrap().into()]);
        let reply = ask(&mut rfc5780(), Slot::PRIMARY, &req, None).unwrap();
        assert!(reply.bytes.len() > 1000, "padded to {}", reply.bytes.len());
        assert!(reply.bytes.len() <= req.len());
        assert_eq!(
            parse_response(&reply.bytes, &tid, None).unwrap().mapped,
            CLIENT.parse().unwrap()
        );
        // A tiny padding leaves the answer at its normal, bounded size.
        let (_, req) = request_with(vec![Padding::new("x").unwrap().into()]);
        let reply = ask(&mut rfc5780(), Slot::PRIMARY, &req, None).unwrap();
        assert!(reply.bytes.len() <= defaults::STUN_MAX_RESPONSE);
    }

    #[test]
    fn non_requests_and_garbage_are_dropped() {
        let mut r = plain();
        assert_eq!(
            ask(&mut r, Slot::PRIMARY, b"GET / HTTP/1.1\r\n\r\n", None),
            Err(Dropped::Malformed)
        );
        assert_eq!(
            ask(&mut r, Slot::PRIMARY, &[0u8; 19], None),
            Err(Dropped::Malformed)
        );
        // A success response sent to the server is not answered (no ping-pong loops).
        let req = binding_request(None, None).unwrap();
        let reply = ask(&mut r, Slot::PRIMARY, &req.bytes, None).unwrap();
        assert_eq!(
            ask(&mut r, Slot::PRIMARY, &reply.bytes, None),
            Err(Dropped::NotRequest)
        );
        // Length field disagreeing with the datagram.
        let mut bad = req.bytes.clone();
        bad[3] ^= 4;
        assert_eq!(
            ask(&mut r, Slot::PRIMARY, &bad, None),
            Err(Dropped::Malformed)
        );
        // A FINGERPRINT that does not match the message.
        let mut bad = req.bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            ask(&mut r, Slot::PRIMARY, &bad, None),
            Err(Dropped::Malformed)
        );
        assert_eq!(
            ask(&mut r, Slot::PRIMARY, &[0u8; 3000], None),
            Err(Dropped::TooLarge)
        );
    }

    #[test]
    fn one_source_is_rate_limited_others_are_not() {
        let mut r = Responder::with_limits(
            Layout {
                primary: "198.18.0.1:3478".parse().unwrap(),
                alternate: None,
                port2: None,
            },
            10,
            20,
            100,
        );
        let t0 = Instant::now();
        let req = binding_request(None, None).unwrap();
        let mut answered = 0;
        for _ in 0..100 {
            let rx = Received {
                slot: Slot::PRIMARY,
                src: CLIENT.parse().unwrap(),
                data: &req.bytes,
            };
            if r.handle(t0, rx, |_| None).is_ok() {
                answered += 1;
            }
        }
        assert_eq!(answered, 20);
        let other = Received {
            slot: Slot::PRIMARY,
            src: "198.18.9.9:1".parse().unwrap(),
            data: &req.bytes,
        };
        assert!(r.handle(t0, other, |_| None).is_ok());
        let later = Received {
            slot: Slot::PRIMARY,
            src: CLIENT.parse().unwrap(),
            data: &req.bytes,
        };
        assert!(
            r.handle(t0 + Duration::from_millis(150), later, |_| None)
                .is_ok()
        );
    }

    #[test]
    fn classic_rfc3489_request_gets_classic_answer() {
        let mut d = vec![0x00, 0x01, 0x00, 0x08];
        d.extend_from_slice(&[0xab; 16]);
        d.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x06]); // change ip+port
        let reply = ask(&mut rfc5780(), Slot::PRIMARY, &d, None).unwrap();
        let b = &reply.bytes;
        assert_eq!(&b[..2], &[0x01, 0x01]);
        assert_eq!(&b[4..20], &[0xab; 16]);
        assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), b.len() - 20);
        // MAPPED-ADDRESS = source, SOURCE-ADDRESS = alternate slot, CHANGED-ADDRESS = alternate.
        assert_eq!(&b[20..32], &[0, 1, 0, 8, 0, 1, 0x9c, 0x40, 198, 18, 7, 7]);
        assert_eq!(&b[32..44], &[0, 4, 0, 8, 0, 1, 0x0d, 0x97, 198, 18, 0, 2]);
        assert_eq!(&b[44..56], &[0, 5, 0, 8, 0, 1, 0x0d, 0x97, 198, 18, 0, 2]);
        assert_eq!(
            reply.from,
            Slot {
                alt_ip: true,
                alt_port: true
            }
        );
        // A classic request asking for a change from a plain server gets a classic 420.
        let reply = ask(&mut plain(), Slot::PRIMARY, &d, None).unwrap();
        assert_eq!(&reply.bytes[..2], &[0x01, 0x11]);
        assert_eq!(reply.error, Some(420));
    }

    proptest! {
        /// Any bytes behind a plausible header: an answer or a drop, never a panic, and
        /// never an answer larger than the bound.
        #[test]
        fn responder_never_panics(cookie in any::<bool>(), body in proptest::collection::vec(any::<u8>(), 0..160)) {
            let mut body = body;
            body.truncate(body.len() / 4 * 4);
            let mut d = vec![0x00, 0x01];
            d.extend_from_slice(&(body.len() as u16).to_be_bytes());
            d.extend_from_slice(if cookie { &MAGIC_COOKIE } else { &[1, 2, 3, 4] });
            d.extend_from_slice(&[5; 12]);
            d.extend_from_slice(&body);
            if let Ok(reply) = ask(&mut rfc5780(), Slot::PRIMARY, &d, None) {
                prop_assert!(reply.bytes.len() <= defaults::STUN_MAX_RESPONSE);
            }
        }
    }
}
