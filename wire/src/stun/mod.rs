//! The client half of STUN Binding (RFC 8489, with the RFC 5780 attributes natprobe needs):
//! building a request and reading its response, sans-IO; and [`transaction`], the one
//! retransmission schedule every STUN client of ours follows. The responder is the
//! rendezvous' (`rendezvous::stun`).

use std::net::SocketAddr;

use stun_rs::attributes::discovery::{
    ChangeRequest, ChangeRequestFlags, OtherAddress, ResponseOrigin, ResponsePort,
};
use stun_rs::attributes::stun::{
    ErrorCode, Fingerprint, MappedAddress, MessageIntegrity, UnknownAttributes, UserName,
    XorMappedAddress,
};
use stun_rs::methods::BINDING;
use stun_rs::{
    DecoderContextBuilder, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder,
    StunMessageBuilder, TransactionId,
};

pub mod transaction;

/// A Binding request to send, and the transaction id to match its response.
#[derive(Debug, Clone)]
pub struct BindingRequest {
    /// Matches the response.
    pub tid: TransactionId,
    /// The encoded request.
    pub bytes: Vec<u8>,
}

/// The useful parts of a Binding success response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingResponse {
    /// The reflexive address: where the server saw the request come from.
    pub mapped: SocketAddr,
    /// OTHER-ADDRESS: the server's alternate IP and port (RFC 5780), if it has one.
    pub other: Option<SocketAddr>,
    /// RESPONSE-ORIGIN: the address the response was sent from, if the server says.
    pub origin: Option<SocketAddr>,
}

/// Why a datagram is not a usable answer to our request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// Not STUN, malformed, or a failed FINGERPRINT.
    #[error("not a well-formed STUN message")]
    Malformed,
    /// A STUN message for another transaction (a late or stray answer).
    #[error("response to another transaction")]
    OtherTransaction,
    /// The server answered with an error.
    #[error("server error {code}: {reason}")]
    Server {
        /// STUN error code (e.g. 420, 401).
        code: u16,
        /// The server's reason phrase.
        reason: String,
        /// Attributes the server did not understand (with 420).
        unknown: Vec<u16>,
    },
    /// A success without any mapped address.
    #[error("response carries no mapped address")]
    NoAddress,
    /// We sent MESSAGE-INTEGRITY and the response's does not verify.
    #[error("response MESSAGE-INTEGRITY does not verify")]
    Integrity,
    /// Building the request failed (a credential STUN cannot carry).
    #[error("cannot build request: {0}")]
    Build(String),
}

/// A Binding request; with `credential` `(username, password)` it carries USERNAME and
/// MESSAGE-INTEGRITY, with `change` `(ip, port)` a CHANGE-REQUEST.
pub fn binding_request(
    credential: Option<(&str, &str)>,
    change: Option<(bool, bool)>,
) -> Result<BindingRequest, BindingError> {
    binding_request_with(RequestOptions {
        credential,
        change,
        response_port: None,
    })
}

/// What a Binding request carries beyond the question "where do you see me?".
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestOptions<'a> {
    /// `(username, password)`: USERNAME and MESSAGE-INTEGRITY (short-term).
    pub credential: Option<(&'a str, &'a str)>,
    /// `(ip, port)`: CHANGE-REQUEST (RFC 5780 §7.2), answer from the other IP and/or port.
    pub change: Option<(bool, bool)>,
    /// RESPONSE-PORT (RFC 5780 §7.5): answer to this port of our IP instead.
    pub response_port: Option<u16>,
}

/// A Binding request with `opts`.
pub fn binding_request_with(opts: RequestOptions<'_>) -> Result<BindingRequest, BindingError> {
    let RequestOptions {
        credential,
        change,
        response_port,
    } = opts;
    let tid = TransactionId::default();
    let build = |e: stun_rs::StunError| BindingError::Build(e.to_string());
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(tid);
    if let Some(flags) = change {
        use ChangeRequestFlags::{ChangeIp, ChangePort};
        b = b.with_attribute(ChangeRequest::new(match flags {
            (false, false) => None,
            (true, false) => Some(ChangeIp.into()),
            (false, true) => Some(ChangePort.into()),
            (true, true) => Some(ChangeIp | ChangePort),
        }));
    }
    if let Some(port) = response_port {
        b = b.with_attribute(ResponsePort::from(port));
    }
    if let Some((user, pass)) = credential {
        b = b
            .with_attribute(UserName::new(user).map_err(build)?)
            .with_attribute(MessageIntegrity::new(
                HMACKey::new_short_term(pass).map_err(build)?,
            ));
    }
    let msg = b.with_attribute(Fingerprint::default()).build();
    let mut buf = [0u8; 512];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &msg)
        .map_err(|e| BindingError::Build(format!("{e:?}")))?;
    Ok(BindingRequest {
        tid,
        bytes: buf[..n].to_vec(),
    })
}

/// Reads a response to the request `tid`; with `password`, its MESSAGE-INTEGRITY must verify.
pub fn parse_response(
    data: &[u8],
    tid: &TransactionId,
    password: Option<&str>,
) -> Result<BindingResponse, BindingError> {
    let (msg, _) = MessageDecoderBuilder::default()
        .build()
        .decode(data)
        .map_err(|_| BindingError::Malformed)?;
    if msg.transaction_id() != tid || msg.method() != BINDING {
        return Err(BindingError::OtherTransaction);
    }
    match msg.class() {
        MessageClass::SuccessResponse => {}
        MessageClass::ErrorResponse => {
            let (code, reason) = msg
                .get::<ErrorCode>()
                .and_then(|a| a.as_error_code().ok())
                .map(|e| {
                    (
                        e.error_code().error_code(),
                        e.error_code().reason().to_owned(),
                    )
                })
                .unwrap_or((0, String::new()));
            let unknown = msg
                .get::<UnknownAttributes>()
                .and_then(|a| a.as_unknown_attributes().ok())
                .map(|u| u.attributes().to_vec())
                .unwrap_or_default();
            return Err(BindingError::Server {
                code,
                reason,
                unknown,
            });
        }
        _ => return Err(BindingError::OtherTransaction),
    }
    if let Some(pass) = password {
        let key = HMACKey::new_short_term(pass).map_err(|_| BindingError::Integrity)?;
        let ctx = DecoderContextBuilder::default()
            .with_key(key)
            .with_validation()
            .build();
        let verified = MessageDecoderBuilder::default()
            .with_context(ctx)
            .build()
            .decode(data)
            .is_ok();
        if !verified || msg.get::<MessageIntegrity>().is_none() {
            return Err(BindingError::Integrity);
        }
    }
    let mapped = msg
        .get::<XorMappedAddress>()
        .and_then(|a| a.as_xor_mapped_address().ok())
        .map(|a| *a.socket_address())
        .or_else(|| {
            msg.get::<MappedAddress>()
                .and_then(|a| a.as_mapped_address().ok())
                .map(|a| *a.socket_address())
        })
        .ok_or(BindingError::NoAddress)?;
    Ok(BindingResponse {
        mapped,
        other: msg
            .get::<OtherAddress>()
            .and_then(|a| a.as_other_address().ok())
            .map(|a| *a.socket_address()),
        origin: msg
            .get::<ResponseOrigin>()
            .and_then(|a| a.as_response_origin().ok())
            .map(|a| *a.socket_address()),
    })
}

/// Credentialed Binding requests carry `USERNAME:COUNTER`: the counter only grows (per
/// process), and the rendezvous takes an observation only from a request whose counter is
/// higher than any it saw for that registration, so a captured request replayed later, or
/// from elsewhere, moves nothing. No clocks are compared.
pub fn stamp(username: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{username}:{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Splits a stamped USERNAME into the registration's username and its counter (`None`
/// when it carries no counter).
pub fn unstamp(stamped: &str) -> Option<(&str, u64)> {
    let (user, counter) = stamped.rsplit_once(':')?;
    Some((user, counter.parse().ok()?))
}
