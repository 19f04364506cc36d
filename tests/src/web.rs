//! A real web service in the NAT lab: Python's http.server (HTTP/1.1, keep-alive) behind
//! one NAT exposed with `peer expose`, reached with `peer reach` and real clients (curl)
//! behind another; files checked by SHA-256; the lab's byte counters polled. Used by the
//! session lab tests and by `switchbench`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::lab_peers::{Proc, start_peer};
use crate::natlab::{Counted, Lab, Meter};
use crate::{BOUND, TempHome};

/// Where the exposed HTTP server listens, inside the exposing host.
pub const WEB_PORT: u16 = 18080;

/// Where `reach` listens, inside the reaching host.
pub const LOCAL: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 17274);

const SERVER: &str = r#"
import functools, http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])),
    functools.partial(H, directory=sys.argv[1]))
print("serving", file=sys.stderr, flush=True)
srv.serve_forever()
"#;

/// A directory with `small` (100 bytes) and `big` (`mib` MiB of pseudo-random bytes), and
/// the SHA-256 of `big`.
pub fn site(dir: &Path, mib: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("small"), [b'x'; 100]).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("big")).unwrap());
    let mut h = Sha256::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        h.update(&chunk);
        f.write_all(&chunk).unwrap();
    }
    f.flush().unwrap();
    hex::encode(h.finalize())
}

/// The SHA-256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf).unwrap() {
            0 => break,
            n => h.update(&buf[..n]),
        }
    }
    hex::encode(h.finalize())
}

/// The web server and `peer expose` of it; both end when this is dropped.
pub struct Exposed {
    _web: Proc,
    /// The `peer expose` process.
    pub expose: Proc,
    _home: TempHome,
}

/// The web server on `host` serving `dir`, exposed as `name` by `peer` (the binary).
pub fn expose_web(lab: &Lab, peer: &Path, host: &str, dir: &Path, name: &str) -> Exposed {
    let mut web = lab.command(host, "python3");
    web.args(["-c", SERVER]).arg(dir).arg(WEB_PORT.to_string());
    let mut web = Proc::start(web);
    web.wait_for(&["serving"]);
    let home = TempHome::new();
    let port = WEB_PORT.to_string();
    let expose = start_peer(
        lab,
        peer,
        host,
        &home.0,
        &["expose", &port, "--name", name],
        "registered",
    );
    Exposed {
        _web: web,
        expose,
        _home: home,
    }
}

/// `peer reach NAME --local LOCAL` on `host`, listening when this returns.
pub fn reach_web(lab: &Lab, peer: &Path, host: &str, home: &Path, name: &str) -> Proc {
    let local = LOCAL.to_string();
    start_peer(
        lab,
        peer,
        host,
        home,
        &["reach", name, "--local", &local],
        "reaching",
    )
}

/// curl on `host` fetching `paths` over one connection (curl reuses it for every URL of
/// one command), `big` into `out`; extra curl flags in `extra`.
pub fn curl(lab: &Lab, host: &str, paths: &[&str], out: &Path, extra: &[&str]) -> Command {
    let mut c = lab.command(host, "curl");
    c.args([
        "-sS",
        "--fail",
        "--max-time",
        "300",
        "-w",
        "%{num_connects} ",
    ])
    .args(extra);
    for p in paths {
        if *p == "big" {
            c.arg("-o").arg(out);
        } else {
            c.args(["-o", "/dev/null"]);
        }
        c.arg(format!("http://{LOCAL}/{p}"));
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Polls `meter` until `ok` holds, failing with `what` after [`BOUND`]. The counters are
/// the kernel's: there is no event to wait for.
pub fn until(meter: &Meter, what: &str, ok: impl Fn(&Counted) -> bool) {
    let deadline = Instant::now() + BOUND;
    loop {
        let c = meter.read();
        if ok(&c) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: counters stuck at {c:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
