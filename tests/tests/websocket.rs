//! A WebSocket echo service reached through the tunnel with a real WebSocket client
//! (Python's `websockets`): binary and text messages, large and small, come back intact.

use std::process::Command;

use chuantou_tests::*;
use tokio_util::sync::CancellationToken;

const CLIENT: &str = r#"
import asyncio, os, sys, websockets
async def main():
    async with websockets.connect("ws://" + sys.argv[1] + "/", max_size=None) as ws:
        for i in range(40):
            msg = os.urandom(997 * i * i + 1)
            await ws.send(msg)
            assert await ws.recv() == msg, f"binary message {i}"
        await ws.send("chuantou ✓ 穿透")
        assert await ws.recv() == "chuantou ✓ 穿透"
    print("ok")
asyncio.run(main())
"#;

fn python_has_websockets() {
    let ok = Command::new("python3")
        .args(["-c", "import websockets"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with `websockets` is needed: run scripts/test (it installs it) or pip install websockets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_tunnel() {
    python_has_websockets();
    let (server_proc, port) = chuantou_tests::public::ws_echo_server().await;

    let server = rendezvous().await;
    let stop = CancellationToken::new();
    let (pc, phone) = (TempHome::new(), TempHome::new());
    expose(
        &server,
        &pc,
        "ws",
        ([127, 0, 0, 1], port).into(),
        vec![],
        &stop,
    );
    online(&server, "ws").await;
    let local = reach(&server, &phone, "ws", &stop).await.unwrap();
    let out = within(
        "websocket client",
        tokio::task::spawn_blocking(move || {
            Command::new("timeout")
                .args(["60", "python3", "-c", CLIENT, &local.to_string()])
                .output()
                .unwrap()
        }),
    )
    .await
    .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server_proc);
    stop.cancel();
}
