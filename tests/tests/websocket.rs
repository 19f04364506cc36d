//! A WebSocket echo service reached through the tunnel with a real WebSocket client
//! (Python's `websockets`): binary and text messages, large and small, come back intact.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use chuantou_tests::*;
use tokio_util::sync::CancellationToken;

const SERVER: &str = r#"
import asyncio, websockets
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with websockets.serve(echo, "127.0.0.1", 0, max_size=None) as srv:
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;

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

/// Kills the child on drop, so a failing test leaves no server behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let mut child = Command::new("python3")
        .args(["-c", SERVER])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server_proc = Reaped(child);
    let port: u16 = within(
        "websocket server port",
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line.trim().parse().unwrap()
        }),
    )
    .await
    .unwrap();

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
