//! Headless Chromium (Debian's, driven by chromedriver) as a real user's browser: it loads a
//! page with images through a public URL (`http://pc-home.localhost:PORT/`, which Chromium
//! resolves to loopback itself), and it loads the rendezvous dashboard while two peers
//! move data, and finds both peers, their session and its path on the page. The dashboard
//! screenshot is written to `docs/dashboard.png` (what the README shows) when
//! `CHUANTOU_SCREENSHOT=1`.

use std::time::Duration;

use chuantou_tests::browser::Browser;
use chuantou_tests::public::*;
use chuantou_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// An SVG picture of `n` circles (a few KiB), so each image differs.
fn svg(n: usize) -> String {
    let mut s = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"160\" height=\"120\" viewBox=\"0 0 160 120\">",
    );
    for i in 0..n {
        s.push_str(&format!(
            "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"hsl({},70%,50%)\" fill-opacity=\"0.6\"/>",
            (i * 37) % 160,
            (i * 53) % 120,
            4 + i % 9,
            (i * 29) % 360
        ));
    }
    s.push_str("</svg>");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_with_images_through_the_public_url_and_the_live_dashboard() {
    // The site: a page with twelve images, one of them large.
    let site = TempHome::new();
    std::fs::create_dir_all(&site.0).unwrap();
    let mut page =
        String::from("<!doctype html><title>pc-home</title><h1 id=t>hello from pc-home</h1>");
    for i in 0..12 {
        let circles = if i == 0 { 4000 } else { 20 + i * 10 };
        std::fs::write(site.0.join(format!("img{i}.svg")), svg(circles)).unwrap();
        page.push_str(&format!("<img src=\"img{i}.svg\" alt=\"{i}\">"));
    }
    std::fs::write(site.0.join("index.html"), page).unwrap();
    let (_srv, port) = file_server(&site.0, None).await;

    let (server, _) = public_rendezvous().await;
    let stop = CancellationToken::new();
    let _pc = expose_public(
        &server,
        "pc-home",
        port,
        publish(port, true, false, false, None),
        &stop,
    )
    .await;
    let public_url = format!(
        "http://pc-home.{DOMAIN}:{}/",
        server.addrs().public_http.unwrap().port()
    );

    let browser = tokio::task::spawn_blocking(move || {
        let b = Browser::start(1280, 1000);
        b.goto(&public_url);
        assert_eq!(
            b.eval("return document.getElementById('t').textContent"),
            "hello from pc-home"
        );
        let loaded = b.wait_for(
            "const i = Array.from(document.images); \
             return i.length === 12 && i.every(x => x.complete && x.naturalWidth > 0)",
            Duration::from_secs(30),
        );
        assert!(loaded, "every image loads through the public URL");
        b
    })
    .await
    .unwrap();

    // Two peers move data while the dashboard is open.
    let echo = echo_service().await;
    let ((_a, _b), local, board) = expose_and_reach(
        &server,
        "laptop",
        echo,
        (ExposeOpts::default(), ReachOpts::default()),
        &stop,
    )
    .await;
    let mut c = tokio::net::TcpStream::connect(local).await.unwrap();
    let chunk = vec![5u8; 64 * 1024];
    let mut back = vec![0u8; chunk.len()];
    c.write_all(&chunk).await.unwrap();
    within("echo", c.read_exact(&mut back)).await.unwrap();
    within("direct path", board.wait_path("laptop", "direct-udp")).await;
    let mover = tokio::spawn(async move {
        // Keeps bytes flowing for as long as the browser looks (bounded: 20 s at most).
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until {
            if c.write_all(&chunk).await.is_err() || c.read_exact(&mut back).await.is_err() {
                return;
            }
        }
    });

    let api = server.addrs().http.unwrap();
    let shot = tokio::task::spawn_blocking(move || {
        browser.goto(&format!("http://{api}/"));
        let found = browser.wait_for(
            "const peers = Array.from(document.querySelectorAll('#peers tbody tr')).map(r => r.dataset.peer); \
             const s = Array.from(document.querySelectorAll('#sessions tbody tr')) \
               .find(r => r.dataset.session.split(' ').includes('laptop')); \
             return peers.includes('laptop') && peers.some(p => p.startsWith('reach-')) \
               && peers.includes('pc-home') && !!s && s.cells[2].textContent.startsWith('direct') \
               && s.cells[3].textContent.includes('ms');",
            Duration::from_secs(30),
        );
        let text = browser.eval("return document.body.innerText");
        assert!(found, "the dashboard shows both peers, their session and its direct path:\n{text}");
        let public = browser.eval(
            "return Array.from(document.querySelectorAll('#public tbody tr')).map(r => r.innerText).join('\\n')",
        );
        assert!(public.as_str().unwrap().contains("pc-home.localhost"), "{public}");
        browser.screenshot()
    })
    .await
    .unwrap();
    mover.abort();
    assert_eq!(&shot[..8], b"\x89PNG\r\n\x1a\n", "a PNG screenshot");
    if std::env::var_os("CHUANTOU_SCREENSHOT").is_some() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png");
        std::fs::write(&path, &shot).unwrap();
        eprintln!("wrote {}", path.display());
    }
    stop.cancel();
}
