//! The NAT lab checks itself: for each router kind, plain UDP and TCP probes show the
//! mapping and filtering that kind must have, the sequential NAT's delta, hairpinning on
//! and off, and packet loss. Every negative answer is an event too: a packet the NAT does
//! not let in reaches the router itself, whose ICMP port-unreachable (UDP) or RST (TCP)
//! comes back to the sender, so these tests need not wait for silence. The exception is an
//! unsolicited TCP SYN, which a NAT must drop silently (RFC 5382 REQ-4): that test bounds
//! the wait at [`SILENCE`].

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};

use chuantou_tests::natlab::{EVERY_KIND_ROUTERS, Lab, SERVER_ALT_IP, SERVER_IP, THIRD_IP};
use chuantou_tests::within;
use tokio::net::UdpSocket;

/// How long an unanswered SYN is waited for before it counts as dropped.
const SILENCE: std::time::Duration = std::time::Duration::from_millis(700);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn any() -> SocketAddr {
    sa(Ipv4Addr::UNSPECIFIED, 0)
}

fn udp(lab: &Lab, host: &str, addr: SocketAddr) -> UdpSocket {
    let s = lab.udp(host, addr).unwrap();
    s.set_nonblocking(true).unwrap();
    UdpSocket::from_std(s).unwrap()
}

/// Sends from `from` to `server` and returns the source address the server saw.
async fn observed(from: &UdpSocket, server: &UdpSocket) -> SocketAddr {
    from.send_to(b"map", server.local_addr().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    within("datagram at the server", server.recv_from(&mut buf))
        .await
        .unwrap()
        .1
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Behaviour {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}
use Behaviour::*;

fn mapping_of(m1: SocketAddr, m2: SocketAddr, m3: SocketAddr) -> Behaviour {
    if m1 == m2 {
        EndpointIndependent
    } else if m2 == m3 {
        AddressDependent
    } else {
        AddressAndPortDependent
    }
}

/// Whether a datagram from a fresh socket on `sender_host` (bound to `sender_ip`) to
/// `target` reaches `receiver`; `false` once the sender is told the port is unreachable.
async fn admitted(
    lab: &Lab,
    sender_host: &str,
    sender_ip: Ipv4Addr,
    target: SocketAddr,
    receiver: &UdpSocket,
) -> bool {
    let sender = udp(lab, sender_host, sa(sender_ip, 0));
    sender.connect(target).await.unwrap();
    let tag = format!("from {}", sender.local_addr().unwrap());
    sender.send(tag.as_bytes()).await.unwrap();
    let mut a = [0u8; 64];
    let mut b = [0u8; 64];
    within("the datagram or its ICMP error", async {
        loop {
            tokio::select! {
                r = receiver.recv_from(&mut a) => {
                    let n = r.unwrap().0;
                    if a[..n] == *tag.as_bytes() { return true; }
                }
                r = sender.recv(&mut b) => match r {
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => return false,
                    other => panic!("sender got {other:?}"),
                },
            }
        }
    })
    .await
}

struct Servers {
    s1: UdpSocket,
    s2: UdpSocket,
    s3: UdpSocket,
}

async fn udp_mapping_and_filtering(
    lab: &Lab,
    servers: &Servers,
    host: &str,
) -> (Behaviour, Behaviour, SocketAddr, SocketAddr) {
    let h = udp(lab, host, any());
    let m1 = observed(&h, &servers.s1).await;
    let m2 = observed(&h, &servers.s2).await;
    let m3 = observed(&h, &servers.s3).await;
    let mapping = mapping_of(m1, m2, m3);

    // Filtering, on a socket that has talked to the primary address only.
    let f = udp(lab, host, any());
    let m = observed(&f, &servers.s1).await;
    let from_stranger = admitted(lab, "third", THIRD_IP, m, &f).await;
    let from_same_ip = admitted(lab, "server", SERVER_IP, m, &f).await;
    let filtering = match (from_stranger, from_same_ip) {
        (true, true) => EndpointIndependent,
        (false, true) => AddressDependent,
        (false, false) => AddressAndPortDependent,
        (true, false) => panic!("{host}: a stranger got in where the server's own IP did not"),
    };
    let local = sa(lab.host(host).addr, h.local_addr().unwrap().port());
    (mapping, filtering, m1, local)
}

/// Ports of `n` fresh mappings towards the primary server address, in order.
async fn fresh_ports(lab: &Lab, servers: &Servers, host: &str, n: usize) -> Vec<(u16, u16)> {
    let mut v = Vec::new();
    for _ in 0..n {
        let s = udp(lab, host, any());
        let m = observed(&s, &servers.s1).await;
        v.push((s.local_addr().unwrap().port(), m.port()));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_router_kind_maps_and_filters_udp_as_built() {
    let Some(lab) = Lab::for_test(&EVERY_KIND_ROUTERS) else {
        return;
    };
    let servers = Servers {
        s1: udp(&lab, "server", sa(SERVER_IP, 3478)),
        s2: udp(&lab, "server", sa(SERVER_ALT_IP, 3478)),
        s3: udp(&lab, "server", sa(SERVER_ALT_IP, 3479)),
    };
    let cases = [
        ("pub-1", EndpointIndependent, EndpointIndependent),
        ("fc-1", EndpointIndependent, EndpointIndependent),
        ("ar-1", EndpointIndependent, AddressDependent),
        ("pr-1", EndpointIndependent, AddressAndPortDependent),
        ("pr0-1", EndpointIndependent, AddressAndPortDependent),
        ("symr-1", AddressAndPortDependent, AddressAndPortDependent),
        ("syms-1", AddressAndPortDependent, AddressAndPortDependent),
    ];
    for (host, mapping, filtering) in cases {
        let (m, f, mapped, local) = udp_mapping_and_filtering(&lab, &servers, host).await;
        assert_eq!((m, f), (mapping, filtering), "{host}: mapping, filtering");
        let router = host.split('-').next().unwrap();
        if host == "pub-1" {
            assert_eq!(mapped, local, "a public host is not translated");
        } else {
            assert_eq!(
                mapped.ip(),
                lab.wan(router),
                "{host} leaves from its router's WAN"
            );
        }
    }

    // Port allocation: cone kinds keep the local port, the sequential NAT steps by 3, the
    // random one does not step evenly.
    for host in ["fc-1", "ar-1", "pr-1"] {
        for (local, mapped) in fresh_ports(&lab, &servers, host, 3).await {
            assert_eq!(local, mapped, "{host} preserves ports");
        }
    }
    let seq: Vec<u16> = fresh_ports(&lab, &servers, "syms-1", 5)
        .await
        .into_iter()
        .map(|p| p.1)
        .collect();
    assert!(
        seq.windows(2).all(|w| w[1].wrapping_sub(w[0]) == 3),
        "sequential ports {seq:?}"
    );
    let rnd: Vec<u16> = fresh_ports(&lab, &servers, "symr-1", 5)
        .await
        .into_iter()
        .map(|p| p.1)
        .collect();
    let steps: Vec<u16> = rnd.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    assert!(steps.iter().any(|s| *s != steps[0]), "random ports {rnd:?}");

    // Hairpin: on `pr` a packet to one's own mapped address comes back in; on `pr0` it
    // reaches the router, which answers port unreachable.
    for (host, hairpin) in [("pr-1", true), ("pr0-1", false)] {
        let h = udp(&lab, host, any());
        let m = observed(&h, &servers.s1).await;
        let back = admitted(&lab, host, lab.host(host).addr, m, &h).await;
        assert_eq!(back, hairpin, "{host}: hairpin");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_router_kind_maps_and_filters_tcp_as_built() {
    let Some(lab) = Lab::for_test(&[
        "pub=none",
        "fc=full-cone",
        "ar=address-restricted",
        "pr=port-restricted",
        "symr=symmetric-random",
        "syms=symmetric-sequential,delta=2",
    ]) else {
        return;
    };
    let listen = |ip, port| {
        let l = lab.tcp_listener("server", sa(ip, port)).unwrap();
        l.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(l).unwrap()
    };
    let (l1, l2, l3) = (
        listen(SERVER_IP, 7000),
        listen(SERVER_ALT_IP, 7000),
        listen(SERVER_ALT_IP, 7001),
    );
    let cases = [
        ("pub-1", EndpointIndependent, EndpointIndependent),
        ("fc-1", EndpointIndependent, EndpointIndependent),
        ("ar-1", EndpointIndependent, AddressDependent),
        ("pr-1", EndpointIndependent, AddressAndPortDependent),
        ("symr-1", AddressAndPortDependent, AddressAndPortDependent),
        ("syms-1", AddressAndPortDependent, AddressAndPortDependent),
    ];
    for (host, mapping, filtering) in cases {
        // One local port for everything, as the peer will do: a listener and three
        // connections, all with SO_REUSEADDR and SO_REUSEPORT.
        let local = sa(lab.host(host).addr, 40000);
        let listener = lab
            .inside(host, || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.set_reuse_port(true)?;
                s.bind(&local.into())?;
                s.listen(16)?;
                Ok(std::net::TcpListener::from(s))
            })
            .unwrap();
        let mut seen = Vec::new();
        let mut keep = Vec::new();
        for l in [&l1, &l2, &l3] {
            let c = lab
                .tcp_connect(host, Some(local), l.local_addr().unwrap())
                .unwrap();
            keep.push(c);
            seen.push(within("accept", l.accept()).await.unwrap().1);
        }
        let m = mapping_of(seen[0], seen[1], seen[2]);
        assert_eq!(m, mapping, "{host}: TCP mapping {seen:?}");

        // Unsolicited SYNs to the first mapping: from a stranger, then from the server's
        // primary IP on another port. The NAT drops what it does not let in without a
        // word (RFC 5382 REQ-4), so a connect unanswered within the bound was filtered;
        // the lab's round trips are well under a millisecond.
        let target = seen[0];
        let try_from = |who: &str, ip: Ipv4Addr| {
            lab.tcp_connect_within(who, Some(sa(ip, 0)), target, SILENCE)
                .map(|_| true)
                .or_else(|e| match e {
                    chuantou_tests::natlab::LabError::Io { source, .. }
                        if source.kind() == ErrorKind::TimedOut =>
                    {
                        Ok(false)
                    }
                    e => Err(e),
                })
                .unwrap()
        };
        let f = match (try_from("third", THIRD_IP), try_from("server", SERVER_IP)) {
            (true, true) => EndpointIndependent,
            (false, true) => AddressDependent,
            (false, false) => AddressAndPortDependent,
            (true, false) => panic!("{host}: a stranger got in where the server did not"),
        };
        assert_eq!(f, filtering, "{host}: TCP filtering");
        drop(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_router_drops_about_the_share_it_was_given() {
    let Some(lab) = Lab::for_test(&["lossy=port-restricted,loss=50"]) else {
        return;
    };
    let server = udp(&lab, "server", sa(SERVER_IP, 3478));
    let host = udp(&lab, "lossy-1", any());
    const SENT: usize = 400;
    for i in 0..SENT {
        host.send_to(&(i as u32).to_be_bytes(), server.local_addr().unwrap())
            .await
            .unwrap();
    }
    // Then an end marker, 30 times: all 30 lost happens once in 10^9 runs.
    for _ in 0..30 {
        host.send_to(b"end!", server.local_addr().unwrap())
            .await
            .unwrap();
    }
    let end = host.local_addr().unwrap();
    let mut got = 0usize;
    let mut buf = [0u8; 8];
    within("the end marker", async {
        loop {
            let (n, _) = server.recv_from(&mut buf).await.unwrap();
            if &buf[..n] == b"end!" {
                break;
            }
            got += 1;
        }
    })
    .await;
    // Binomial(400, 0.5): outside 140..=260 happens less than once in 10^9 runs.
    assert!(
        (140..=260).contains(&got),
        "{got} of {SENT} from {end} arrived"
    );
}
