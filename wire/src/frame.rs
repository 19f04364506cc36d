//! Length-prefixed postcard frames: the byte format of signaling and of relay control.
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

/// Closes a connection so that the last frame written really arrives: closing a socket
/// with unread input makes the kernel send RST, which can destroy an error frame still in
/// flight. Half-closes, then [`drain`]s.
pub async fn close_after_error<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.shutdown().await;
    drain(stream).await;
}

/// Reads and discards (at most 64 KiB, at most 1 s) until the peer closes, after our own
/// half-close; see [`close_after_error`].
pub async fn drain<R: AsyncRead + Unpin>(r: &mut R) {
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while left > 0 {
            match r.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;
    use tokio::io::AsyncWriteExt;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping(u32),
        Text(String),
    }

    #[test]
    fn round_trip_and_byte_format() {
        let bytes = encode(&Msg::Text("hi".into())).unwrap();
        // Length 4, variant 1, string of 2 bytes.
        assert_eq!(hex::encode(&bytes), "00000004010268 69".replace(' ', ""));
        assert_eq!(decode::<Msg>(&bytes[4..]).unwrap(), Msg::Text("hi".into()));
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let big = Msg::Text("x".repeat(MAX_FRAME_LEN));
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
        assert!(matches!(
            parse_header([0xff, 0xff, 0xff, 0xff], MAX_FRAME_LEN),
            Err(FrameError::TooLarge { len, .. }) if len == u32::MAX as usize
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&Msg::Ping(1)).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Msg>(&bytes[4..]),
            Err(FrameError::Trailing(1))
        ));
    }

    #[tokio::test]
    async fn reader_survives_byte_at_a_time_delivery_and_reports_truncation() {
        let a = encode(&Msg::Ping(300)).unwrap();
        let (mut tx, rx) = tokio::io::duplex(1);
        let mut reader = FrameReader::new(rx);
        let writer = tokio::spawn(async move {
            tx.write_all(&a).await.unwrap();
            tx.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        });
        assert_eq!(reader.read::<Msg>().await.unwrap(), Msg::Ping(300));
        // The writer finishes (and drops its end) only while we keep reading.
        let err = reader.read::<Msg>().await.unwrap_err();
        writer.await.unwrap();
        assert!(
            matches!(err, FrameError::Truncated { have: 5, want: 13 }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn step_reports_partial_progress() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(rx);
        tx.write_all(&[0, 0]).await.unwrap();
        assert_eq!(reader.step().await.unwrap(), None);
        assert!(reader.in_frame());
        tx.write_all(&[0, 2, 0, 5]).await.unwrap();
        let mut got = None;
        while got.is_none() {
            got = reader.step().await.unwrap();
        }
        assert_eq!(got.unwrap(), vec![0, 5]);
        assert!(!reader.in_frame());
    }

    proptest! {
        /// Whatever a peer sends, decoding returns an error or a message; never a panic.
        #[test]
        fn decoder_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Msg>(&body);
        }
    }
}
