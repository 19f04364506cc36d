//! The read-only HTTP API: the dashboard page at `/` (one self-contained page that polls
//! `GET /v1/dashboard`), `GET /v1/peers`, `GET /v1/peers/{name}` ("where is my PC now"),
//! `GET /healthz` and `GET /metrics` (Prometheus text). Binds to loopback by default; it
//! shows who is registered, so anywhere else it needs `--http-token`: every request but
//! `/healthz` then carries it as `Authorization: Bearer TOKEN` or as the password of basic
//! auth (which a browser asks for).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::defaults;
use crate::registry::Entry;
use crate::server::Shared;

/// One peer as JSON.
#[derive(Debug, Serialize)]
struct PeerJson {
    name: String,
    key: String,
    online: bool,
    services: Vec<ServiceJson>,
    tcp_addr: Option<String>,
    udp_addr: Option<String>,
    lan_addrs: Vec<String>,
    /// RFC 3339, UTC.
    last_seen: String,
    last_seen_ago_s: u64,
}

#[derive(Debug, Serialize)]
struct ServiceJson {
    port: u16,
    proto: String,
    description: String,
}

#[derive(Debug, Serialize)]
struct ErrorJson {
    error: String,
}

/// Serves the API: at most [`defaults::HTTP_MAX_CONNECTIONS`] connections at once (more
/// wait in the kernel's backlog), each given [`ServerConfig::http_timeout`] to send a
/// request's headers and as long to live in all, so that neither a half-sent header nor
/// idle keep-alive connections can pile up.
///
/// [`ServerConfig::http_timeout`]: crate::server::ServerConfig::http_timeout
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let limit = shared.config.http_timeout;
    let guarded = Router::new()
        .route("/", get(dashboard))
        .route("/v1/dashboard", get(dashboard_json))
        .route("/v1/peers", get(peers))
        .route("/v1/peers/{name}", get(peer))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), auth));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .merge(guarded)
        .with_state(shared);
    let slots = Arc::new(tokio::sync::Semaphore::new(defaults::HTTP_MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limit)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::timeout(limit * 6, conn) => {}
            }
        });
    }
}

/// With `--http-token`, lets a request through only when it carries the token.
async fn auth(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    match &shared.config.http_token {
        Some(token) if !carries(request.headers(), token) => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"chuantou rendezvous\"",
            )],
            axum::Json(ErrorJson {
                error: "this API needs the --http-token: Authorization: Bearer TOKEN, or \
                        basic auth with the token as password"
                    .into(),
            }),
        )
            .into_response(),
        _ => next.run(request).await,
    }
}

/// Whether `headers` carry `token`: as a bearer token, or as the password of basic auth
/// (any user name).
fn carries(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let same = |got: &[u8]| {
        got.len() == token.len()
            && got
                .iter()
                .zip(token.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    };
    if let Some(bearer) = value.strip_prefix("Bearer ") {
        return same(bearer.trim().as_bytes());
    }
    if let Some(basic) = value.strip_prefix("Basic ") {
        let Some(decoded) = base64_decode(basic.trim()) else {
            return false;
        };
        let password = decoded
            .iter()
            .position(|b| *b == b':')
            .map_or(&decoded[..0], |i| &decoded[i + 1..]);
        return same(password);
    }
    false
}

/// Standard base64 (RFC 4648, padded or not); `None` on anything else.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The dashboard page, shipped in the binary.
async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// What the dashboard shows, in one request.
async fn dashboard_json(State(shared): State<Arc<Shared>>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let now = Instant::now();
    let (online, names, peers) = shared.with_registry(|r| {
        let peers: Vec<serde_json::Value> = r
            .iter()
            .map(|(name, e)| {
                serde_json::json!({
                    "name": name,
                    "key": e.key.to_string(),
                    "online": e.online(),
                    "nat": crate::sessions::nat_label(e.nat.or(e.tcp_nat)),
                    "tcp_addr": e.tcp_addr.to_string(),
                    "udp_addr": e.udp_addr.map(|a| a.to_string()),
                    "last_seen_ago_s": now.saturating_duration_since(e.last_seen).as_secs(),
                    "services": e.services.iter().map(|s| s.reference().to_string()).collect::<Vec<_>>(),
                })
            })
            .collect();
        (r.online(), r.len(), peers)
    });
    let m = &shared.metrics;
    let relays: Vec<serde_json::Value> = shared
        .relay_list()
        .into_iter()
        .map(|(addr, kind, sessions)| {
            serde_json::json!({ "addr": addr.to_string(), "kind": kind, "sessions": sessions })
        })
        .collect();
    let public: Vec<serde_json::Value> = shared
        .public_list()
        .into_iter()
        .map(|(name, urls, online, open)| {
            serde_json::json!({
                "name": name,
                "urls": urls.urls(),
                "online": online,
                "open": open,
            })
        })
        .collect();
    let (sessions, punching, switches) = shared.with_sessions(|book| {
        let sessions: Vec<serde_json::Value> = book
            .records()
            .into_iter()
            .map(|r| {
                let side = |i: usize| {
                    r.sides[i].as_ref().map(|s| {
                        serde_json::json!({
                            "reported_ago_s": now.saturating_duration_since(s.at).as_secs(),
                            "active": s.active(),
                            "paths": s.paths.iter().map(|p| serde_json::json!({
                                "kind": p.kind,
                                "active": p.active,
                                "rtt_ms": p.rtt_us.map(|us| f64::from(us) / 1000.0),
                                "bytes_out": p.bytes_out,
                                "bytes_in": p.bytes_in,
                            })).collect::<Vec<_>>(),
                        })
                    })
                };
                // The path carrying traffic: what the latest report says.
                let latest = [0, 1]
                    .into_iter()
                    .filter_map(|i| r.sides[i].as_ref())
                    .max_by_key(|s| s.at)
                    .and_then(|s| s.active().map(str::to_owned));
                serde_json::json!({
                    "peers": r.names,
                    "nat_pair": r.pair,
                    "age_s": now.saturating_duration_since(r.brokered).as_secs(),
                    "path": latest,
                    "direct_after_ms": r.direct_after.map(|d| d.as_millis() as u64),
                    "repunches": r.repunches,
                    "switches": r.switches,
                    "closed": r.closed,
                    "sides": [side(0), side(1)],
                })
            })
            .collect();
        let punching: Vec<serde_json::Value> = book
            .stats()
            .into_iter()
            .map(|(pair, s)| {
                let ms = |q| s.quantile(q).map(|d| d.as_millis() as u64);
                serde_json::json!({
                    "pair": pair,
                    "tries": s.tries,
                    "direct": s.direct,
                    "direct_pct": if s.tries == 0 { 0.0 } else { 100.0 * s.direct as f64 / s.tries as f64 },
                    "p50_ms": ms(0.5),
                    "p90_ms": ms(0.9),
                })
            })
            .collect();
        (sessions, punching, book.switches_total)
    });
    axum::Json(serde_json::json!({
        "totals": {
            "path_switches": switches,
            "public_open": m.public_open.load(Relaxed),
            "public_connections": m.public_connections.iter().map(|c| c.load(Relaxed)).sum::<u64>(),
            "public_bytes": m.public_bytes_to_client.load(Relaxed) + m.public_bytes_to_service.load(Relaxed),
            "online_peers": online,
            "known_names": names,
            "sessions_brokered": m.sessions_brokered.load(Relaxed),
            "connects_refused": m.connects_refused.load(Relaxed),
            "registrations": m.registrations_total.load(Relaxed),
        },
        "peers": peers,
        "relays": relays,
        "public": public,
        "sessions": sessions,
        "punching": punching,
    }))
    .into_response()
}

fn to_json(now: Instant, wall: SystemTime, name: &str, e: &Entry) -> PeerJson {
    let ago = now.saturating_duration_since(e.last_seen);
    PeerJson {
        name: name.to_owned(),
        key: e.key.to_string(),
        online: e.online(),
        services: e
            .services
            .iter()
            .map(|s| ServiceJson {
                port: s.port,
                proto: s.proto.to_string(),
                description: s.description.clone(),
            })
            .collect(),
        tcp_addr: Some(e.tcp_addr.to_string()),
        udp_addr: e.udp_addr.map(|a| a.to_string()),
        lan_addrs: e.lan_addrs.iter().map(ToString::to_string).collect(),
        last_seen: rfc3339(wall.checked_sub(ago).unwrap_or(UNIX_EPOCH)),
        last_seen_ago_s: ago.as_secs(),
    }
}

async fn peers(State(shared): State<Arc<Shared>>) -> Response {
    let (now, wall) = (Instant::now(), SystemTime::now());
    let list: Vec<PeerJson> = shared.with_registry(|r| {
        r.iter()
            .map(|(name, e)| to_json(now, wall, name, e))
            .collect()
    });
    axum::Json(list).into_response()
}

async fn peer(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let (now, wall) = (Instant::now(), SystemTime::now());
    match shared.with_registry(|r| r.get(&name).map(|e| to_json(now, wall, &name, e))) {
        Some(p) => axum::Json(p).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(ErrorJson {
                error: format!("no peer named {name:?}"),
            }),
        )
            .into_response(),
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let (online, names) = shared.with_registry(|r| (r.online(), r.len()));
    axum::Json(serde_json::json!({
        "status": "ok",
        "peers_online": online,
        "names": names,
    }))
    .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let (online, names) = shared.with_registry(|r| (r.online(), r.len()));
    let mut text = shared.metrics.render(online, names);
    text.push_str(&relay::stats::prometheus(&[(
        "chuantou_relays",
        "gauge",
        "Standalone relays registered now.",
        shared.relay_count() as u64,
    )]));
    if let Some(relay) = shared.relay_stats() {
        text.push_str(&relay.render());
    }
    text.push_str(&shared.with_sessions(crate::sessions::render));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(ErrorJson {
            error: "no such endpoint; try /, /v1/dashboard, /v1/peers, /v1/peers/{name}, \
                    /healthz, /metrics"
                .into(),
        }),
    )
        .into_response()
}

/// Formats a time as RFC 3339 UTC to the second, e.g. `2026-11-23T17:20:00Z`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for every date after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_token_is_taken_as_bearer_or_as_the_basic_password() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(carries(&with("Bearer s3cret"), "s3cret"));
        assert!(!carries(&with("Bearer s3cre"), "s3cret"));
        // "admin:s3cret" and ":s3cret" in base64.
        assert!(carries(&with("Basic YWRtaW46czNjcmV0"), "s3cret"));
        assert!(carries(&with("Basic OnMzY3JldA=="), "s3cret"));
        assert!(!carries(&with("Basic YWRtaW46d3Jvbmc="), "s3cret"));
        assert!(!carries(&with("Basic !!!"), "s3cret"));
        assert!(!carries(&HeaderMap::new(), "s3cret"));
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
    }

    #[test]
    fn rfc3339_known_instants() {
        let at = |s| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_453_200), "2026-11-23T17:00:00Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
