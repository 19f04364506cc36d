//! A rendezvous restart loses no name: bindings are kept in its state directory (redb),
//! nobody can take a name while its owner is away, and every exposer is back and reachable
//! within two heartbeats. A name whose owner releases it is free at once, also after a
//! restart; a taken name makes `expose` retry, not exit.

use std::time::{Duration, Instant};

use chuantou_tests::{BOUND, TempHome, echo_service, expose, metric, online, within};
use ed25519_dalek::SigningKey;
use rendezvous::registry::Timing;
use rendezvous::server::{Server, ServerConfig, ServerHandle};
use tokio_util::sync::CancellationToken;
use wire::signal::ErrorCode;
use wire::signal::client::{Client, ClientConfig, ClientError};

/// The default heartbeat: "within two heartbeats" is then the 30 s a user would see.
const HEARTBEAT: Duration = rendezvous::defaults::HEARTBEAT_INTERVAL;

/// A server on `port` (0: any) keeping its names in `state`, with a fixed identity.
async fn server(state: &std::path::Path, port: u16) -> ServerHandle {
    chuantou_tests::logs();
    let loopback = ServerConfig::loopback();
    let config = ServerConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        identity: SigningKey::from_bytes(&[7; 32]),
        names_db: Some(state.join("names.redb")),
        timing: Timing {
            heartbeat_interval: HEARTBEAT,
            ..Timing::default()
        },
        ..loopback
    };
    Server::bind(config).await.unwrap().spawn()
}

async fn connect(server: &ServerHandle) -> Client {
    let config = ClientConfig {
        server_key: Some(server.key()),
        ..ClientConfig::default()
    };
    within(
        "connect",
        Client::connect(&server.addrs().signaling.to_string(), config),
    )
    .await
    .unwrap()
}

fn taken(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused(f) if f.code == ErrorCode::NameTaken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_survive_a_restart_and_exposers_come_back_within_two_heartbeats() {
    let state = TempHome::new();
    std::fs::create_dir_all(&state.0).unwrap();
    let first = server(&state.0, 0).await;
    let port = first.addrs().signaling.port();
    let service = echo_service().await;
    let (pc, stop) = (TempHome::new(), CancellationToken::new());
    expose(&first, &pc, "pc-home", service, vec![], &stop);
    online(&first, "pc-home").await;

    first.shutdown().await;
    let second = server(&state.0, port).await;
    // Squatting in the gap: the name is still pc-home's.
    let mallory = connect(&second).await;
    let err = mallory
        .register(
            &SigningKey::from_bytes(&[66; 32]),
            "pc-home",
            vec![],
            vec![],
        )
        .await
        .unwrap_err();
    assert!(taken(&err), "{err}");
    // The exposer is back, under its name, within two heartbeats.
    let restarted = Instant::now();
    within("exposer back", online(&second, "pc-home")).await;
    let back = restarted.elapsed();
    assert!(
        back <= 2 * HEARTBEAT,
        "back after {back:?}, more than two heartbeats ({HEARTBEAT:?} each)"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_name_is_free_also_after_a_restart() {
    let state = TempHome::new();
    std::fs::create_dir_all(&state.0).unwrap();
    let first = server(&state.0, 0).await;
    let port = first.addrs().signaling.port();
    let owner = SigningKey::from_bytes(&[1; 32]);
    let c = connect(&first).await;
    c.register(&owner, "laptop", vec![], vec![]).await.unwrap();
    c.register(&owner, "laptop", vec![], vec![]).await.unwrap();
    // Someone else may not release it.
    let other = connect(&first).await;
    other
        .register(&SigningKey::from_bytes(&[2; 32]), "desk", vec![], vec![])
        .await
        .unwrap();
    let err = other.release("laptop").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(f) if f.code == ErrorCode::NotOwner),
        "{err}"
    );
    c.release("laptop").await.unwrap();
    drop((c, other));
    first.shutdown().await;
    let second = server(&state.0, port).await;
    let newcomer = connect(&second).await;
    newcomer
        .register(&SigningKey::from_bytes(&[3; 32]), "laptop", vec![], vec![])
        .await
        .expect("a released name is free");
    // desk is still desk's.
    let err = newcomer
        .register(&SigningKey::from_bytes(&[3; 32]), "desk", vec![], vec![])
        .await
        .unwrap_err();
    assert!(
        taken(&err) || err.to_string().contains("already registered"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposer_whose_name_is_taken_keeps_trying_and_gets_it_when_freed() {
    let state = TempHome::new();
    std::fs::create_dir_all(&state.0).unwrap();
    let rv = server(&state.0, 0).await;
    let holder = connect(&rv).await;
    holder
        .register(&SigningKey::from_bytes(&[9; 32]), "pc-home", vec![], vec![])
        .await
        .unwrap();
    let service = echo_service().await;
    let (pc, stop) = (TempHome::new(), CancellationToken::new());
    expose(&rv, &pc, "pc-home", service, vec![], &stop);
    // The exposer is refused (twice: it retried) and does not give up...
    let http = rv.addrs().http.expect("http api");
    let deadline = Instant::now() + BOUND;
    while refused(http).await < 2 {
        assert!(
            Instant::now() < deadline,
            "the exposer never tried the name twice"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and once the holder releases the name, it takes it.
    holder.release("pc-home").await.unwrap();
    // Looking up needs a name of one's own.
    let probe = connect(&rv).await;
    probe
        .register(&SigningKey::from_bytes(&[8; 32]), "watcher", vec![], vec![])
        .await
        .unwrap();
    let deadline = Instant::now() + BOUND;
    loop {
        match probe.lookup("pc-home").await {
            Ok(p) if p.online && p.services.len() == 1 => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the exposer never took the freed name"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
}

/// `chuantou_registrations_refused_total` from the server's /metrics.
async fn refused(http: std::net::SocketAddr) -> u64 {
    metric(http, "chuantou_registrations_refused_total").await
}
