//! Peers report their sessions to the rendezvous, and its dashboard JSON and `/metrics`
//! show them: the pair, the path carrying traffic with its round trip and bytes, the
//! punching outcome by NAT pair with the time to direct, and the end of the session.

use std::time::Duration;

use chuantou_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn dashboard(server: &rendezvous::server::ServerHandle) -> serde_json::Value {
    let api = server.addrs().http.unwrap();
    let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
    s.write_all(b"GET /v1/dashboard HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    let body = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    serde_json::from_slice(&all[body..]).unwrap()
}

/// Polls the dashboard until `pred` holds for it.
async fn until(
    server: &rendezvous::server::ServerHandle,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    within(what, async {
        loop {
            let v = dashboard(server).await;
            if pred(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_session_its_direct_path_and_the_punching_outcome() {
    let server = rendezvous().await;
    let (expose_stop, reach_stop) = (CancellationToken::new(), CancellationToken::new());
    let (pc, phone) = (TempHome::new(), TempHome::new());
    let echo = echo_service().await;
    expose_proto(
        &server,
        &pc,
        "pc-home",
        echo,
        ExposeOpts::default(),
        &expose_stop,
    );
    online(&server, "pc-home").await;
    let (local, board) = reach_board(
        &server,
        &phone,
        "pc-home",
        ReachOpts::default(),
        &reach_stop,
    )
    .await
    .unwrap();
    let mut c = tokio::net::TcpStream::connect(local).await.unwrap();
    let data = vec![7u8; 256 * 1024];
    c.write_all(&data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    within("echo", c.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, data);
    within("a direct path", board.wait_path("pc-home", "direct-udp")).await;

    let v = until(&server, "both sides report the direct path", |v| {
        v["sessions"].as_array().unwrap().iter().any(|s| {
            s["path"].as_str().is_some_and(|p| p.starts_with("direct"))
                && s["sides"].as_array().unwrap().iter().all(|x| !x.is_null())
        })
    })
    .await;
    let s = &v["sessions"][0];
    let peers: Vec<&str> = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(peers.contains(&"pc-home"), "{peers:?}");
    assert!(peers.iter().any(|p| p.starts_with("reach-")), "{peers:?}");
    assert!(s["direct_after_ms"].as_u64().is_some(), "{s}");
    let side = s["sides"].as_array().unwrap().iter().find(|x| {
        x["paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["active"] == true && p["bytes_out"].as_u64().unwrap() > 0)
    });
    assert!(
        side.is_some(),
        "a side reports bytes on its active path: {s}"
    );
    let punching = &v["punching"][0];
    assert_eq!(
        (punching["tries"].as_u64(), punching["direct"].as_u64()),
        (Some(1), Some(1)),
        "{punching}"
    );
    assert!(punching["p50_ms"].as_u64().is_some());

    let m = {
        let api = server.addrs().http.unwrap();
        let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    };
    let pair = punching["pair"].as_str().unwrap();
    for line in [
        format!("chuantou_punch_tries_total{{pair=\"{pair}\"}} 1"),
        format!("chuantou_punch_direct_total{{pair=\"{pair}\"}} 1"),
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }
    assert!(m.lines().any(|l| l.starts_with(&format!(
        "chuantou_punch_time_to_direct_seconds{{pair=\"{pair}\",quantile=\"0.5\"}}"
    ))));

    // The reaching side stops: the exposer reports the session closed.
    drop(c);
    reach_stop.cancel();
    until(&server, "the session reported closed", |v| {
        v["sessions"][0]["closed"] == true
    })
    .await;
    expose_stop.cancel();
}
