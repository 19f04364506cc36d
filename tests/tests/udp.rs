//! A UDP service through `expose --udp` / `reach --udp`: datagrams keep their boundaries
//! and content both ways, and each local source is its own flow.

use chuantou_tests::*;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_keeps_datagram_boundaries_per_flow() {
    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = udp_echo_service().await;
    expose_proto(
        &server,
        &pc,
        "dns-ish",
        echo,
        ExposeOpts {
            udp: true,
            ..ExposeOpts::default()
        },
        &stop,
    );
    online(&server, "dns-ish").await;
    let local = reach_proto(&server, &phone, "dns-ish", true, &stop)
        .await
        .unwrap();

    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 65_536];
    for (i, len) in [1usize, 512, 1400, 9000, 30_000].into_iter().enumerate() {
        for (who, sock) in [(0u8, &a), (1u8, &b)] {
            let msg: Vec<u8> = (0..len).map(|j| (j as u8) ^ who ^ i as u8).collect();
            // UDP may lose a datagram anywhere; resend until the echo of this one arrives
            // (bounded), so the test checks boundaries and content, not the loss rate.
            let got = within("udp echo", async {
                loop {
                    sock.send_to(&msg, local).await.unwrap();
                    let r = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        sock.recv_from(&mut buf),
                    )
                    .await;
                    if let Ok(Ok((n, from))) = r {
                        assert_eq!(from, local);
                        return buf[..n].to_vec();
                    }
                }
            })
            .await;
            assert_eq!(
                got.len(),
                len,
                "flow {who}: datagram of {len} bytes kept whole"
            );
            assert_eq!(got, msg, "flow {who}: content");
        }
    }
    stop.cancel();
}
