//! The fuzz targets' bodies: every decoder that takes network input, fed arbitrary bytes.
//! `fuzz/` (cargo-fuzz, nightly) runs them under libFuzzer; `tests/tests/fuzz_corpus.rs`
//! replays the kept corpora on stable, so CI checks every input that ever mattered. Each
//! body also checks what must hold for any input: decoding never panics, and what decodes
//! encodes back to the same message.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use wire::frame::{self, FrameReader, HEADER_LEN, MAX_FRAME_LEN};
use wire::signal::{ClientFrame, ServerFrame};

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by name (the directory of its corpus under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("signaling_client_frames", signaling_client_frames),
    ("signaling_server_frames", signaling_server_frames),
    ("frame_reader", frame_reader),
    ("relay_hello", relay_hello),
    ("relay_udp", relay_udp),
    ("stun_request", stun_request),
    ("stun_response", stun_response),
    ("punch_probe", punch_probe),
    ("udp_flow", udp_flow),
    ("stream_link", stream_link),
    ("public_sniff", public_sniff),
];

/// What a public entry reads of a client before routing it: an HTTP request head, or a TLS
/// ClientHello's server name, from any bytes, whole or cut anywhere.
pub fn public_sniff(data: &[u8]) {
    use rendezvous::public::sniff::{MAX_HEAD, Sniffed, http_head, tls_server_name};
    for cut in [data.len(), data.len() / 2] {
        let part = &data[..cut];
        if let Sniffed::Done(h) = http_head(part) {
            assert!(
                !h.host.bytes().any(|b| b.is_ascii_uppercase()),
                "hosts are lower-cased"
            );
        }
        if let Sniffed::Done(Some(name)) = tls_server_name(part) {
            assert!(!name.is_empty() && name.len() < MAX_HEAD);
        }
    }
}

/// Decodes `body` as `T`; when it decodes, it must encode back to a frame that decodes
/// to the same value.
fn roundtrip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(body: &[u8]) {
    if let Ok(v) = frame::decode::<T>(body) {
        let again = frame::encode(&v).expect("a decoded message encodes");
        let back: T = frame::decode(&again[HEADER_LEN..]).expect("and decodes again");
        assert_eq!(back, v);
    }
}

/// Splits `data` as a byte stream of frames, as a reader would, and hands each body on.
fn frames(data: &[u8], mut each: impl FnMut(&[u8])) {
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let header: [u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().expect("header length");
        let Ok(len) = frame::parse_header(header, MAX_FRAME_LEN) else {
            return;
        };
        let Some(body) = rest.get(HEADER_LEN..HEADER_LEN + len) else {
            return;
        };
        each(body);
        rest = &rest[HEADER_LEN + len..];
    }
}

/// What a rendezvous reads from peers and relays.
pub fn signaling_client_frames(data: &[u8]) {
    frames(data, roundtrip::<ClientFrame>);
}

/// What peers and relays read from a rendezvous.
pub fn signaling_server_frames(data: &[u8]) {
    frames(data, roundtrip::<ServerFrame>);
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

/// The async frame reader over a stream carrying `data`, with a small frame limit so that
/// both "too large" and "complete" paths are reached.
pub fn frame_reader(data: &[u8]) {
    runtime().block_on(async {
        let mut r = FrameReader::with_max(data, 1024);
        for _ in 0..64 {
            match r.read::<ClientFrame>().await {
                Ok(_) => continue,
                Err(frame::FrameError::Decode(_)) => continue,
                Err(_) => break,
            }
        }
    });
}

/// A relay's TCP hello (the first frame on a relay connection).
pub fn relay_hello(data: &[u8]) {
    frames(data, roundtrip::<wire::relay::Hello>);
    roundtrip::<wire::relay::Hello>(data);
}

/// A datagram on the relay's UDP port (hellos and control carry a magic prefix).
pub fn relay_udp(data: &[u8]) {
    if let Some(Ok(msg)) = wire::relay::decode_udp(data) {
        let again = wire::relay::encode_udp(&msg);
        let back = wire::relay::decode_udp(&again)
            .expect("our encoding has the magic")
            .expect("and decodes");
        assert_eq!(back, msg);
    }
}

fn responder() -> &'static std::sync::Mutex<rendezvous::stun::Responder> {
    static R: OnceLock<std::sync::Mutex<rendezvous::stun::Responder>> = OnceLock::new();
    R.get_or_init(|| {
        std::sync::Mutex::new(rendezvous::stun::Responder::new(rendezvous::stun::Layout {
            primary: "198.18.0.1:3478".parse().expect("address"),
            alternate: Some("198.18.0.2:3479".parse().expect("address")),
            port2: None,
        }))
    })
}

/// A datagram to the rendezvous' STUN responder (the first byte picks the source, so the
/// per-source rate limit does not hide everything after the first few inputs).
pub fn stun_request(data: &[u8]) {
    let src: SocketAddr =
        SocketAddr::from(([198, 18, 7, data.first().copied().unwrap_or(0)], 40000));
    let rx = rendezvous::stun::Received {
        slot: rendezvous::stun::Slot {
            alt_ip: false,
            alt_port: false,
        },
        src,
        data,
    };
    let mut r = responder().lock().unwrap_or_else(|p| p.into_inner());
    if let Ok(reply) = r.handle(Instant::now(), rx, |_| Some("password".into())) {
        // RESPONSE-PORT (RFC 5780 §7.5) may move the answer to another port of the
        // source's IP, never to another host.
        assert_eq!(
            reply.to.ip(),
            src.ip(),
            "answers go only to the request's source IP"
        );
        assert!(
            reply.bytes.len() <= data.len().max(256),
            "the answer ({} bytes) outgrows the request ({} bytes)",
            reply.bytes.len(),
            data.len()
        );
    }
}

/// A STUN response to our request (its transaction id taken from the input, so that
/// parsing goes past the id check).
pub fn stun_response(data: &[u8]) {
    let mut tid = [0u8; 12];
    if let Some(t) = data.get(8..20) {
        tid.copy_from_slice(t);
    }
    let tid = stun_rs::TransactionId::from(tid);
    let password = (data.len() % 2 == 0).then_some("password");
    let _ = wire::stun::parse_response(data, &tid, password);
}

/// A punch probe on the shared UDP socket.
pub fn punch_probe(data: &[u8]) {
    let _ = peer::punch::probe::session_of(data);
    let key = peer::punch::probe::ProbeKey::new([1; 16], [2; 32]);
    if let Some(p) = key.decode(data) {
        let again = key.encode(&p);
        assert_eq!(key.decode(&again), Some(p));
    }
}

/// A UDP flow datagram inside the session.
pub fn udp_flow(data: &[u8]) {
    if let Some((_, payload)) = peer::forward::udp::untag(data) {
        assert_eq!(payload.len() + 4, data.len());
    }
}

/// Bytes on a stream link (a punched TCP connection or the relay over TCP).
pub fn stream_link(data: &[u8]) {
    use peer::path::link::{Datagrams, whole_frames};
    let whole = whole_frames(data);
    assert!(whole <= data.len());
    let mut d = Datagrams::Framed(bytes::Bytes::copy_from_slice(&data[..whole]));
    let mut buf = vec![0u8; 4096];
    let mut taken = 0;
    while let Some((len, stride)) = d.take_into(&mut buf) {
        assert!(len > 0 && len <= buf.len() && stride > 0 && stride <= len);
        taken += len;
    }
    assert!(taken <= whole);
    assert!(d.is_empty());
}
