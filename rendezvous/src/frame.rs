//! Length-prefixed postcard frames: the byte format of signaling (and later relay control).
//!
//! A frame is a 4-byte big-endian body length followed by that many bytes of postcard.
//! The length is checked against [`MAX_FRAME_LEN`] before any allocation, the body must
//! decode to exactly one message with no trailing bytes, and nothing here panics on peer
//! input. [`FrameReader`] is cancel-safe (its state lives in the struct, so it can sit in a
//! `select!`) and holds no buffer between frames, which keeps idle connections small.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame body accepted or sent, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid message.
    #[error("frame does not decode: {0}")]
    Decode(#[from] postcard::Error),
    /// The body decoded but bytes were left over.
    #[error("frame has {0} trailing bytes")]
    Trailing(usize),
    /// The stream ended cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes of the frame received (header included).
        have: usize,
        /// Bytes the frame should have had.
        want: usize,
    },
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one message as a complete frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; HEADER_LEN])?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes a frame body (without its length prefix) into exactly one message.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Parses a length prefix, refusing lengths over `max`.
pub fn parse_header(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Reads frames from a byte stream; cancel-safe.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    max: usize,
    header: [u8; HEADER_LEN],
    header_len: usize,
    body: Option<(Vec<u8>, usize)>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream with the default [`MAX_FRAME_LEN`].
    pub fn new(inner: R) -> Self {
        Self::with_max(inner, MAX_FRAME_LEN)
    }

    /// Wraps a stream with a custom size limit.
    pub fn with_max(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            max,
            header: [0; HEADER_LEN],
            header_len: 0,
            body: None,
        }
    }

    /// True when part of a frame has arrived and the rest has not.
    pub fn in_frame(&self) -> bool {
        self.header_len > 0
    }

    /// Makes one read's worth of progress: `Some(body)` when a frame completed, `None` when
    /// bytes arrived but the frame is not complete yet. Cancel-safe. Lets a caller notice a
    /// frame that starts and then stalls.
    pub async fn step(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.header_len < HEADER_LEN {
            let n = self.inner.read(&mut self.header[self.header_len..]).await?;
            if n == 0 {
                return Err(self.eof(0));
            }
            self.header_len += n;
            if self.header_len < HEADER_LEN {
                return Ok(None);
            }
        }
        let (buf, filled) = match &mut self.body {
            Some((buf, filled)) => (buf, filled),
            None => {
                let len = parse_header(self.header, self.max)?;
                let (buf, filled) = self.body.insert((vec![0u8; len], 0));
                (buf, filled)
            }
        };
        if *filled < buf.len() {
            let n = self.inner.read(&mut buf[*filled..]).await?;
            if n == 0 {
                let have = *filled;
                return Err(self.eof(have));
            }
            *filled += n;
            if *filled < buf.len() {
                return Ok(None);
            }
        }
        self.header_len = 0;
        Ok(self.body.take().map(|(buf, _)| buf))
    }

    /// Reads the next frame body. Cancel-safe: dropping the future loses no bytes.
    pub async fn read_body(&mut self) -> Result<Vec<u8>, FrameError> {
        loop {
            if let Some(body) = self.step().await? {
                return Ok(body);
            }
        }
    }

    /// Reads and decodes the next frame.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        let body = self.read_body().await?;
        decode(&body)
    }

    fn eof(&self, body_have: usize) -> FrameError {
        if self.header_len == 0 {
            return FrameError::Closed;
        }
        let want = match &self.body {
            Some((buf, _)) => HEADER_LEN + buf.len(),
            None => HEADER_LEN,
        };
        FrameError::Truncated {
            have: self.header_len + body_have,
            want,
        }
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Unwraps the stream; bytes of a half-read frame are lost (none are held between
    /// frames, see [`FrameReader::in_frame`]).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Encodes and writes one frame, then flushes.
pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let bytes = encode(msg)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;
    use proptest::prelude::*;

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
                lan: vec!["198.19.0.5:5000".parse().unwrap()],
            },
            start_in_ms: 300,
            secret: [7; 32],
        }
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
            }),
        };
        assert_eq!(
            hex_of(&register),
            concat!(
                "00000076",
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
                "03030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303030303"
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
        });
        assert_eq!(
            hex_of(&welcome),
            concat!(
                "00000027",
                "00",
                "01",
                "0909090909090909090909090909090909090909090909090909090909090909",
                "9875",
                "02",
                "6374"
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
        let broker = ServerFrame::Broker(sample_broker());
        assert_eq!(
            hex_of(&broker),
            concat!(
                "0000007b",
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
                "01",
                "00",
                "c6130005",
                "8827",
                "ac02",
                "0707070707070707070707070707070707070707070707070707070707070707"
            )
        );
        let fatal = ServerFrame::Error(ErrorFrame::new(ErrorCode::Timeout, "t"));
        assert_eq!(hex_of(&fatal), "00000004030601 74".replace(' ', ""));
    }

    #[test]
    fn round_trips() {
        round_trip(&ServerFrame::Broker(sample_broker()));
        round_trip(&ServerFrame::Response {
            id: u32::MAX,
            body: Ok(Reply::Brokered(sample_broker())),
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

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let big = ClientFrame::Hello(Hello {
            version: 1,
            token: Some("x".repeat(MAX_FRAME_LEN)),
        });
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
        assert!(matches!(
            parse_header([0xff, 0xff, 0xff, 0xff], MAX_FRAME_LEN),
            Err(FrameError::TooLarge { len, .. }) if len == u32::MAX as usize
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&ClientFrame::Hello(Hello {
            version: 1,
            token: None,
        }))
        .unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<ClientFrame>(&bytes[4..]),
            Err(FrameError::Trailing(1))
        ));
    }

    #[tokio::test]
    async fn reader_survives_byte_at_a_time_delivery_and_reports_truncation() {
        let a = encode(&ClientFrame::Hello(Hello {
            version: 1,
            token: None,
        }))
        .unwrap();
        let (mut tx, rx) = tokio::io::duplex(1);
        let mut reader = FrameReader::new(rx);
        let writer = tokio::spawn(async move {
            tx.write_all(&a).await.unwrap();
            tx.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        });
        let first: ClientFrame = reader.read().await.unwrap();
        assert!(matches!(first, ClientFrame::Hello(_)));
        // The writer finishes (and drops its end) only while we keep reading.
        let err = reader.read::<ClientFrame>().await.unwrap_err();
        writer.await.unwrap();
        assert!(
            matches!(err, FrameError::Truncated { have: 5, want: 13 }),
            "{err:?}"
        );
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
