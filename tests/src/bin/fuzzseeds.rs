//! `fuzzseeds`: writes the seed corpora of the fuzz targets (`fuzz/corpus/TARGET/seed-*`):
//! well-formed inputs of each decoder, so that fuzzing starts from real messages rather
//! than from nothing. Run it again when a message changes; the files are kept in git and
//! replayed by `tests/tests/fuzz_corpus.rs`.
//!
//!     cargo run -p chuantou-tests --bin fuzzseeds [-- DIR]   (default: fuzz/corpus)

use std::path::PathBuf;

use ed25519_dalek::SigningKey;
use wire::announce::{RelayMsg, RelayReply};
use wire::frame;
use wire::signal::{
    ClientFrame, ErrorCode, ErrorFrame, Hello, PublicKey, Register, Reply, Request, ServerFrame,
    Signature, Welcome,
};
use wire::ticket::{SessionId, Side, TicketKey};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("fuzz/corpus"), PathBuf::from);
    let key = SigningKey::from_bytes(&[3; 32]);
    let public = PublicKey(key.verifying_key().to_bytes());
    let client_frames = [
        ClientFrame::Hello(Hello {
            version: wire::signal::PROTOCOL_VERSION,
            token: Some("token".into()),
        }),
        ClientFrame::Request {
            id: 1,
            body: Request::Register(Register {
                name: "pc-home".into(),
                key: public,
                services: vec![wire::signal::Service {
                    port: 7274,
                    proto: wire::signal::Proto::Tcp,
                    description: "web".into(),
                }],
                lan_addrs: vec!["198.18.0.5:40000".parse()?],
                signature: Signature([7; 64]),
                nat: None,
            }),
        },
        ClientFrame::Request {
            id: 2,
            body: Request::Heartbeat { rtt_ms: Some(12) },
        },
        ClientFrame::Request {
            id: 3,
            body: Request::List { after: None },
        },
        ClientFrame::Request {
            id: 4,
            body: Request::Lookup {
                name: "pc-home".into(),
            },
        },
        ClientFrame::Request {
            id: 5,
            body: Request::Connect {
                name: "pc-home".into(),
                service: None,
            },
        },
        ClientFrame::Request {
            id: 6,
            body: Request::Release {
                name: "pc-home".into(),
            },
        },
        ClientFrame::Request {
            id: 7,
            body: Request::Identify {
                key: PublicKey([3; 32]),
                signature: Signature([7; 64]),
            },
        },
        ClientFrame::Relay(RelayMsg::Hello {
            version: 1,
            port: 7001,
            public: None,
        }),
        ClientFrame::Relay(RelayMsg::Proof { mac: [9; 32] }),
        ClientFrame::Relay(RelayMsg::Load { sessions: 3 }),
    ];
    let server_frames = [
        ServerFrame::Welcome(Welcome {
            version: wire::signal::PROTOCOL_VERSION,
            nonce: [1; 32],
            heartbeat_interval_ms: 15_000,
            software: "chuantou".into(),
            stun: Some("198.18.0.1:3478".parse()?),
            stun_alt: None,
            stun_port2: Some(3479),
        }),
        ServerFrame::Response {
            id: 1,
            body: Ok(Reply::Released),
        },
        ServerFrame::Response {
            id: 3,
            body: Ok(Reply::Identified {
                names: vec!["pc-home".into()],
            }),
        },
        ServerFrame::Response {
            id: 2,
            body: Err(ErrorFrame::new(ErrorCode::NameTaken, "taken")),
        },
        ServerFrame::Error(ErrorFrame::new(ErrorCode::Timeout, "no hello")),
        ServerFrame::Relay(RelayReply::Challenge { nonce: [4; 32] }),
    ];
    let mut seeds: Vec<(&str, Vec<Vec<u8>>)> = Vec::new();
    let enc = |f: &dyn Fn() -> anyhow::Result<Vec<u8>>| f();
    let cf: Vec<Vec<u8>> = client_frames
        .iter()
        .map(|f| frame::encode(f).map_err(anyhow::Error::from))
        .collect::<anyhow::Result<_>>()?;
    let sf: Vec<Vec<u8>> = server_frames
        .iter()
        .map(|f| frame::encode(f).map_err(anyhow::Error::from))
        .collect::<anyhow::Result<_>>()?;
    seeds.push(("signaling_client_frames", cf.clone()));
    seeds.push(("signaling_server_frames", sf));
    seeds.push(("frame_reader", vec![cf.concat(), cf[0].clone()]));
    let ticket = TicketKey::random().issue(SessionId([5; 16]), Side::Initiator, 1_900_000_000);
    let hello = wire::relay::Hello {
        version: wire::relay::RELAY_VERSION,
        ticket,
    };
    seeds.push(("relay_hello", vec![enc(&|| Ok(frame::encode(&hello)?))?]));
    seeds.push((
        "relay_udp",
        vec![
            wire::relay::encode_udp(&wire::relay::UdpControl::Hello(hello.clone())),
            wire::relay::encode_udp(&wire::relay::UdpControl::Status(
                wire::relay::Status::Paired,
            )),
        ],
    ));
    let plain = wire::stun::binding_request(None, None)?;
    let with_cred = wire::stun::binding_request(Some(("user", "password")), None)?;
    let change = wire::stun::binding_request(None, Some((true, true)))?;
    seeds.push((
        "stun_request",
        vec![
            plain.bytes.clone(),
            with_cred.bytes.clone(),
            change.bytes.clone(),
        ],
    ));
    let mut responder = rendezvous::stun::Responder::new(rendezvous::stun::Layout {
        primary: "198.18.0.1:3478".parse()?,
        alternate: Some("198.18.0.2:3479".parse()?),
        port2: None,
    });
    let mut answers = Vec::new();
    for req in [&plain, &with_cred] {
        let rx = rendezvous::stun::Received {
            slot: rendezvous::stun::Slot {
                alt_ip: false,
                alt_port: false,
            },
            src: "198.18.7.7:40000".parse()?,
            data: &req.bytes,
        };
        if let Ok(r) = responder.handle(std::time::Instant::now(), rx, |_| Some("password".into()))
        {
            answers.push(r.bytes);
        }
    }
    seeds.push(("stun_response", answers));
    let probe_key = peer::punch::probe::ProbeKey::new([1; 16], [2; 32]);
    let probes = [
        peer::punch::probe::Kind::Request,
        peer::punch::probe::Kind::Response,
        peer::punch::probe::Kind::Nominate,
        peer::punch::probe::Kind::NominateAck,
    ]
    .into_iter()
    .map(|kind| {
        probe_key
            .encode(&peer::punch::probe::Probe {
                kind,
                from: Side::Initiator,
                transaction: 42,
                observed: Some("198.18.0.9:4000".parse().expect("address")),
            })
            .to_vec()
    })
    .collect();
    seeds.push(("punch_probe", probes));
    seeds.push((
        "udp_flow",
        vec![[&7u32.to_be_bytes()[..], b"datagram"].concat()],
    ));
    let mut link = Vec::new();
    for d in [&[1u8; 1200][..], &[2; 1200], &[3; 300], &[]] {
        link.extend_from_slice(&u16::try_from(d.len())?.to_be_bytes());
        link.extend_from_slice(d);
    }
    seeds.push(("stream_link", vec![link]));

    for (target, inputs) in seeds {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (i, input) in inputs.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), input)?;
        }
        println!("{target}: {} seeds", inputs.len());
    }
    Ok(())
}
