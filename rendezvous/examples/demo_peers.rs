//! The two peers of `scripts/demo`: "pc-home" registers its web service on port 7274 and
//! learns its UDP mapping with a credentialed STUN request; "phone" lists the peers, looks
//! pc-home up and asks to be brokered to it; both print what the rendezvous told them, then
//! join the relay with their tickets and exchange a request and a response through it.
//! Until the peer binary exists (issue 4) this is the demo's client side.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use ed25519_dalek::SigningKey;
use rendezvous::client::{Client, ClientConfig, ClientEvent, StunRetry, stun_binding};
use rendezvous::proto::{Broker, Proto, Service};
use tokio::net::UdpSocket;

/// Registers two demo peers and brokers a session between them.
#[derive(Debug, Parser)]
struct Args {
    /// Rendezvous signaling address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    rendezvous: String,
    /// Rendezvous STUN address.
    #[arg(long, default_value = "127.0.0.1:3478")]
    stun: SocketAddr,
}

fn show(side: &str, b: &Broker) {
    println!(
        "  {side:<8} session {} with {} ({}), service {}, start punching in {} ms",
        b.session,
        b.peer,
        &b.peer_key.to_string()[..16],
        b.service.reference(),
        b.start_in_ms
    );
    let c = &b.candidates;
    println!(
        "  {:<8} candidates: tcp {}, udp {}, lan {:?}",
        "",
        c.tcp.map_or("-".into(), |a| a.to_string()),
        c.udp.map_or("-".into(), |a| a.to_string()),
        c.lan
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let t0 = Instant::now();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;

    let mut pc = Client::connect(&args.rendezvous, ClientConfig::default())
        .await
        .context("pc-home connecting")?;
    let pc_key = SigningKey::from_bytes(&rand_seed());
    let web = Service {
        port: 7274,
        proto: Proto::Tcp,
        description: "campus PC web page".into(),
    };
    let reg = pc
        .register(&pc_key, "pc-home", vec![web], vec![])
        .await
        .context("pc-home registering")?;
    println!(
        "pc-home  registered in {:.1} ms; rendezvous sees its TCP as {}",
        ms(t0),
        reg.observed_tcp
    );
    let udp = UdpSocket::bind("127.0.0.1:0").await?;
    let t = Instant::now();
    let mapped = stun_binding(
        &udp,
        args.stun,
        Some((&reg.stun_username, &reg.stun_password)),
        StunRetry::default(),
    )
    .await
    .context("pc-home STUN")?;
    println!(
        "pc-home  STUN says its UDP mapping is {} ({:.1} ms){}",
        mapped.mapped,
        ms(t),
        mapped
            .other
            .map(|o| format!("; RFC 5780 alternate {o}"))
            .unwrap_or_default()
    );

    let phone = Client::connect(&args.rendezvous, ClientConfig::default())
        .await
        .context("phone connecting")?;
    phone
        .register(
            &SigningKey::from_bytes(&rand_seed()),
            "phone",
            vec![],
            vec![],
        )
        .await
        .context("phone registering")?;
    let names: Vec<String> = phone.list().await?.into_iter().map(|p| p.name).collect();
    println!("phone    registered; peers online: {}", names.join(", "));
    let found = phone.lookup("pc-home").await?;
    println!(
        "phone    looked up pc-home: online={}, tcp {}, udp {}, services {}",
        found.online,
        found.tcp_addr.map_or("-".into(), |a| a.to_string()),
        found.udp_addr.map_or("-".into(), |a| a.to_string()),
        found
            .services
            .iter()
            .map(|s| s.reference().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let t = Instant::now();
    let mine = phone.connect_to("pc-home", None).await?;
    let theirs = match pc.next_event().await {
        Some(ClientEvent::Broker(b)) => *b,
        other => anyhow::bail!("pc-home expected a broker message, got {other:?}"),
    };
    println!("brokered in {:.1} ms:", ms(t));
    show("phone", &mine);
    show("pc-home", &theirs);
    anyhow::ensure!(mine.session == theirs.session, "session ids differ");

    if let (Some(a), Some(b)) = (mine.relay, theirs.relay) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let t = Instant::now();
        let within = std::time::Duration::from_secs(10);
        let (phone_side, pc_side) = tokio::join!(
            relay::client::join_tcp(a.addr, a.ticket, within),
            relay::client::join_tcp(b.addr, b.ticket, within)
        );
        let (mut phone_side, mut pc_side) = (
            phone_side.context("phone joining the relay")?,
            pc_side.context("pc-home joining the relay")?,
        );
        println!(
            "relay    both halves paired at {} in {:.1} ms",
            a.addr,
            ms(t)
        );
        let request = b"GET / HTTP/1.1\r\nHost: pc-home\r\n\r\n";
        phone_side.write_all(request).await?;
        let mut got = vec![0u8; request.len()];
        pc_side.read_exact(&mut got).await?;
        let page = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nhello from pc-home!\n";
        pc_side.write_all(page).await?;
        let mut back = vec![0u8; page.len()];
        phone_side.read_exact(&mut back).await?;
        anyhow::ensure!(got == request && back == page, "relay altered bytes");
        println!(
            "relay    carried a {}-byte request and a {}-byte response in {:.1} ms \
             (plain bytes here; the encrypted tunnel over it comes with the peer)",
            request.len(),
            page.len(),
            ms(t)
        );
    }
    Ok(())
}

fn rand_seed() -> [u8; 32] {
    rand::random()
}
