//! One GiB through one connection of the tunnel (reach → relay → expose), with equal
//! SHA-256 at both ends.

use chuantou_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_arrives_with_the_same_sha256() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    // The exposed service hashes everything it receives.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        let _ = done_tx.send((total, h.finalize()));
    });
    expose(&server, &pc, "sink", sink_addr, vec![], &stop);
    online(&server, "sink").await;
    let local = reach(&server, &phone, "sink", &stop).await.unwrap();

    let mut s = TcpStream::connect(local).await.unwrap();
    let mut h = Sha256::new();
    // A pseudo-random pattern, so no layer can pass it by compressing or deduplicating.
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut sent = 0u64;
    while sent < GIB {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        h.update(&block);
        within("send", s.write_all(&block)).await.unwrap();
        sent += block.len() as u64;
    }
    s.shutdown().await.unwrap();
    let (total, digest) = within("receiver finishes", done_rx).await.unwrap();
    assert_eq!(total, GIB);
    assert_eq!(digest, h.finalize(), "SHA-256 differs");
    stop.cancel();
}
