//! Reading just enough of a public client's first bytes to route it, sans-IO: the head of an
//! HTTP/1 request (Host, Authorization), or the server name (SNI) of a TLS ClientHello. The
//! bytes read are kept and sent on unchanged, so the service sees the request exactly as
//! the client sent it.

/// Longest request head or ClientHello the entry reads before deciding.
pub const MAX_HEAD: usize = 16 * 1024;

/// What the first bytes of a connection say, so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed<T> {
    /// Not enough bytes yet; read more.
    More,
    /// Decided.
    Done(T),
    /// Not this protocol, or over [`MAX_HEAD`]; the text says why.
    Bad(&'static str),
}

/// The parts of an HTTP request head that routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHead {
    /// The Host header without its port, lower-cased.
    pub host: String,
    /// The Authorization header, if any.
    pub authorization: Option<String>,
}

/// Parses an HTTP/1.x request head from the start of `buf`.
pub fn http_head(buf: &[u8]) -> Sniffed<HttpHead> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() >= MAX_HEAD {
            Sniffed::Bad("request head too large")
        } else {
            Sniffed::More
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Sniffed::Bad("request head is not text");
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (Some(method), Some(_target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Sniffed::Bad("malformed request line");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Sniffed::Bad("malformed request line");
    }
    if !version.starts_with("HTTP/1.") {
        return Sniffed::Bad("not HTTP/1.x");
    }
    let mut host = None;
    let mut authorization = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Sniffed::Bad("malformed header line");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                // Two Hosts could route one way and be served another (RFC 9112 §3.2).
                return Sniffed::Bad("more than one Host header");
            }
            host = Some(value);
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_owned());
        }
    }
    let Some(host) = host else {
        return Sniffed::Bad("no Host header");
    };
    Sniffed::Done(HttpHead {
        host: strip_port(host).to_ascii_lowercase(),
        authorization,
    })
}

fn strip_port(host: &str) -> &str {
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let bare = if host.starts_with('[') {
        match host.rsplit_once("]:") {
            Some((h, p)) if digits(p) => &host[..h.len() + 1],
            _ => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if digits(p) => h,
            _ => host,
        }
    };
    bare.trim_end_matches('.')
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The server name a TLS ClientHello asks for (RFC 8446 §4.1.2, RFC 6066 §3), reading the
/// handshake message across as many records as it spans. `Done(None)` for a hello without
/// a server name.
pub fn tls_server_name(buf: &[u8]) -> Sniffed<Option<String>> {
    // Gather the handshake bytes from the records received so far.
    let mut hs = Vec::new();
    let mut rest = buf;
    let need = loop {
        if hs.len() >= 4 {
            let len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if hs.len() >= 4 + len {
                break len;
            }
        }
        if rest.len() < 5 {
            return more(buf);
        }
        if rest[0] != 22 || rest[1] != 3 {
            return Sniffed::Bad("not a TLS handshake");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > 16384 {
            return Sniffed::Bad("bad TLS record length");
        }
        if rest.len() < 5 + len {
            hs.extend_from_slice(&rest[5..]);
            if hs.first().is_some_and(|&t| t != 1) {
                return Sniffed::Bad("not a ClientHello");
            }
            return more(buf);
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if hs[0] != 1 {
            return Sniffed::Bad("not a ClientHello");
        }
    };
    match client_hello_sni(&hs[4..4 + need]) {
        Some(name) => Sniffed::Done(name),
        None => Sniffed::Bad("malformed ClientHello"),
    }
}

fn more<T>(buf: &[u8]) -> Sniffed<T> {
    if buf.len() >= MAX_HEAD {
        Sniffed::Bad("ClientHello too large")
    } else {
        Sniffed::More
    }
}

/// A cursor over a ClientHello body; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// `Some(None)`: well formed, no server name; `None`: malformed.
fn client_hello_sni(body: &[u8]) -> Option<Option<String>> {
    let mut c = Cursor(body);
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    c.vec8()?; // legacy_session_id
    c.vec16()?; // cipher_suites
    c.vec8()?; // legacy_compression_methods
    if c.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut exts = Cursor(c.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Cursor(Cursor(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return None;
                }
                let name = name.trim_end_matches('.');
                if name.is_empty() {
                    return None;
                }
                return Some(Some(name.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_heads_route_by_host_and_refuse_ambiguity() {
        let req = b"GET /x HTTP/1.1\r\nHost: PC-Home.Example.com:8080\r\nAuthorization: Basic YTpi\r\n\r\nbody";
        assert_eq!(
            http_head(req),
            Sniffed::Done(HttpHead {
                host: "pc-home.example.com".into(),
                authorization: Some("Basic YTpi".into()),
            })
        );
        assert_eq!(http_head(b"GET / HTTP/1.1\r\nHost: a"), Sniffed::More);
        assert_eq!(
            http_head(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Sniffed::Bad("more than one Host header")
        );
        assert_eq!(
            http_head(b"GET / HTTP/1.1\r\n\r\n"),
            Sniffed::Bad("no Host header")
        );
        assert_eq!(
            http_head(b"\x16\x03\x01\x00\x05hello\r\n\r\n"),
            Sniffed::Bad("malformed request line")
        );
        let big = vec![b'a'; MAX_HEAD];
        assert_eq!(http_head(&big), Sniffed::Bad("request head too large"));
        // IPv6 literal hosts keep their colons.
        match http_head(b"GET / HTTP/1.0\r\nHost: [::1]:80\r\n\r\n") {
            Sniffed::Done(h) => assert_eq!(h.host, "[::1]"),
            other => panic!("{other:?}"),
        }
    }

    /// A ClientHello as rustls writes it, for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        let _ = &mut roots;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn sni_is_read_from_a_real_client_hello_whole_or_in_pieces() {
        let hello = client_hello("pc-home.example.com");
        assert_eq!(
            tls_server_name(&hello),
            Sniffed::Done(Some("pc-home.example.com".into()))
        );
        for cut in [0, 3, 5, 40, hello.len() - 1] {
            assert_eq!(
                tls_server_name(&hello[..cut]),
                Sniffed::More,
                "cut at {cut}"
            );
        }
        // The same handshake message split over two records.
        let body = &hello[5..];
        let (a, b) = body.split_at(100);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[22, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            tls_server_name(&split),
            Sniffed::Done(Some("pc-home.example.com".into()))
        );
        assert_eq!(
            tls_server_name(b"GET / HTTP/1.1\r\n"),
            Sniffed::Bad("not a TLS handshake")
        );
    }

    proptest::proptest! {
        #[test]
        fn sniffers_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = http_head(&data);
            let _ = tls_server_name(&data);
            let mut tls = vec![22, 3, 1];
            tls.extend_from_slice(&(data.len() as u16).to_be_bytes());
            tls.extend_from_slice(&data);
            let _ = tls_server_name(&tls);
        }
    }
}
