//! `sealpipe`: the least an encrypted TCP tunnel must do, as a bound for
//! `scripts/bench/session`. It has rathole's shape (an entry that takes connections and an
//! exit that dials the service, one tunnel connection per connection) and does nothing but
//! what encryption itself costs: each direction is read in records of up to 64 KiB, sealed
//! with AES-128-GCM (ring, as rustls uses for QUIC) under a fixed bench key and a counter
//! nonce, written with a 4-byte length, and opened on the other side. No handshake, no
//! framing of datagrams, no multiplexing: whatever an end-to-end encrypted tunnel over TCP
//! does on top of this is its own overhead; the bench compares our direct TCP path with it.
//!
//! ```text
//! sealpipe exit  TUNNEL_LISTEN TARGET     # takes tunnel connections, dials TARGET for each
//! sealpipe entry LISTEN TUNNEL            # takes clients, dials the exit for each
//! ```
//! Loopback only: a bench tool, the key is a constant.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Largest plaintext of one record.
const RECORD: usize = 64 * 1024;
const TAG: usize = 16;

fn key() -> LessSafeKey {
    // A bench constant; AES_128_GCM takes 16-byte keys, so this cannot fail.
    LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).expect("16-byte key"))
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

/// Reads whatever has arrived (up to a record), seals it, writes it: until EOF.
async fn seal(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> anyhow::Result<()> {
    let key = key();
    let mut buf = vec![0u8; 4 + RECORD + TAG];
    for n in 0u64.. {
        let got = from.read(&mut buf[4..4 + RECORD]).await?;
        if got == 0 {
            break;
        }
        let (head, rest) = buf.split_at_mut(4);
        let tag = key
            .seal_in_place_separate_tag(nonce(n), Aad::empty(), &mut rest[..got])
            .map_err(|_| anyhow::anyhow!("seal failed"))?;
        rest[got..got + TAG].copy_from_slice(tag.as_ref());
        head.copy_from_slice(&u32::try_from(got + TAG)?.to_be_bytes());
        to.write_all(&buf[..4 + got + TAG]).await?;
    }
    to.shutdown().await?;
    Ok(())
}

/// Reads records, opens them, writes the plaintext: until EOF.
async fn open(from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> anyhow::Result<()> {
    let key = key();
    let mut from = BufReader::with_capacity(4 * RECORD, from);
    let mut buf = vec![0u8; RECORD + TAG];
    for n in 0u64.. {
        let mut head = [0u8; 4];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let len = usize::try_from(u32::from_be_bytes(head))?;
        if !(TAG..=RECORD + TAG).contains(&len) {
            bail!("record of {len} bytes");
        }
        from.read_exact(&mut buf[..len]).await?;
        let plain = key
            .open_in_place(nonce(n), Aad::empty(), &mut buf[..len])
            .map_err(|_| anyhow::anyhow!("record {n} does not open"))?;
        to.write_all(plain).await?;
    }
    to.shutdown().await?;
    Ok(())
}

/// Pumps both directions between a plain connection and a sealed one.
async fn pump(plain: TcpStream, sealed: TcpStream) {
    let _ = plain.set_nodelay(true);
    let _ = sealed.set_nodelay(true);
    let (pr, pw) = plain.into_split();
    let (sr, sw) = sealed.into_split();
    let _ = tokio::join!(seal(pr, sw), open(sr, pw));
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, to] = args.as_slice() else {
        bail!("usage: sealpipe exit TUNNEL_LISTEN TARGET | sealpipe entry LISTEN TUNNEL");
    };
    let listen: SocketAddr = listen.parse().context("listen address")?;
    let to: SocketAddr = to.parse().context("target address")?;
    if !listen.ip().is_loopback() || !to.ip().is_loopback() {
        bail!("sealpipe is a loopback bench tool");
    }
    let exit = match mode.as_str() {
        "exit" => true,
        "entry" => false,
        other => bail!("unknown mode {other:?} (exit or entry)"),
    };
    let listener = TcpListener::bind(listen).await.context("listen")?;
    loop {
        let (conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(other) = TcpStream::connect(to).await else {
                return;
            };
            if exit {
                pump(other, conn).await;
            } else {
                pump(conn, other).await;
            }
        });
    }
}
