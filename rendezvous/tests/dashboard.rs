//! The dashboard: one self-contained page at `/` that polls `/v1/dashboard`, which lists
//! the peers (online or not, NAT, public address, services) and the relays with their
//! sessions. With `--http-token` every request but `/healthz` needs the token (bearer, or
//! as the basic-auth password a browser asks for); off loopback the token is required.

mod common;

use common::*;
use rendezvous::server::{Server, ServerConfig, ServerError};

#[tokio::test]
async fn the_page_is_self_contained_and_its_data_lists_peers_and_relays() {
    let server = start(loopback_config()).await;
    let http = server.addrs().http.unwrap();
    let (_pc, _phone) = pc_and_phone(&server, "pc-home", web(7274)).await;

    let (status, page) = http_get(http, "/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<title>chuantou rendezvous</title>"),
        "{page}"
    );
    assert!(page.contains("/v1/dashboard"), "{page}");
    // Nothing fetched from elsewhere: no external scripts, styles or fonts.
    for outside in ["src=\"http", "href=\"http", "@import", "//cdn"] {
        assert!(!page.contains(outside), "the page loads {outside}…");
    }

    let (status, body) = http_get(http, "/v1/dashboard").await;
    assert_eq!(status, 200, "{body}");
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = d["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"pc-home") && names.contains(&"phone"),
        "{d}"
    );
    let pc = d["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "pc-home")
        .unwrap();
    assert_eq!(pc["online"], true, "{d}");
    assert_eq!(pc["services"], serde_json::json!(["7274/tcp"]), "{d}");
    assert_eq!(d["totals"]["online_peers"], 2, "{d}");
    let relays = d["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 1, "{d}");
    assert_eq!(relays[0]["kind"], "embedded", "{d}");
    assert_eq!(
        relays[0]["addr"],
        server.addrs().relay.unwrap().to_string(),
        "{d}"
    );
}

#[tokio::test]
async fn with_a_token_only_its_holders_see_anything_but_health() {
    let server = start(ServerConfig {
        http_token: Some("s3cret".into()),
        ..loopback_config()
    })
    .await;
    let http = server.addrs().http.unwrap();
    for path in ["/", "/v1/dashboard", "/v1/peers", "/metrics"] {
        let (status, text) = http_get_with(http, path, "").await;
        assert_eq!(status, 401, "{path}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{path}: a browser must be asked: {text}"
        );
        let (status, _) = http_get_with(http, path, "Authorization: Bearer wrong\r\n").await;
        assert_eq!(status, 401, "{path}");
        let (status, _) = http_get_with(http, path, "Authorization: Bearer s3cret\r\n").await;
        assert_eq!(status, 200, "{path}");
        // "admin:s3cret", as a browser sends it.
        let basic = "Authorization: Basic YWRtaW46czNjcmV0\r\n";
        let (status, _) = http_get_with(http, path, basic).await;
        assert_eq!(status, 200, "{path}");
    }
    // Health checks need nothing.
    let (status, _) = http_get_with(http, "/healthz", "").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn off_loopback_the_api_needs_a_token() {
    let config = ServerConfig {
        http: Some("0.0.0.0:0".parse().unwrap()),
        ..loopback_config()
    };
    match Server::bind(config).await {
        Err(ServerError::Config(why)) => assert!(why.contains("--http-token"), "{why}"),
        other => panic!("bound without a token: {:?}", other.map(|s| s.addrs())),
    }
}
