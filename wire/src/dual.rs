//! Dual-stack sockets: one UDP socket for IPv4 and IPv6 peers alike, so a peer's endpoint
//! (and the mapping the rendezvous observes of it) serves both families, and servers that
//! listen on every address take clients of both families on one socket. On Linux an
//! `AF_INET6` socket without `IPV6_V6ONLY` sends to plain IPv4 addresses and receives from
//! them as v4-mapped IPv6 (`::ffff:a.b.c.d`): every address read from such a socket goes
//! through [`canonical`], so the rest of the code compares addresses in one form.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// `addr` with a v4-mapped IPv6 address turned back into the IPv4 address it maps.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A UDP socket on every address and `port` (0: any) of both families, when the host has
/// IPv6; else an IPv4 one.
pub fn udp(port: u16) -> io::Result<std::net::UdpSocket> {
    match udp6(port) {
        Ok(s) => Ok(s),
        Err(_) => std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)),
    }
}

fn udp6(port: u16) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s.into())
}

/// Whether a server asked to listen on `addr` should take both families: `addr` is every
/// address (of either family), `dual` is on, and the host has IPv6.
fn widen(addr: SocketAddr, dual: bool) -> Option<SocketAddr> {
    (dual && addr.ip().is_unspecified() && host_has_ipv6())
        .then(|| SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())))
}

/// A TCP listener on `addr`; on every address (`0.0.0.0` or `[::]`) with `dual`, one
/// dual-stack socket for IPv4 and IPv6 clients (their addresses go through
/// [`canonical`]). Must be called within a tokio runtime.
pub fn tcp_listener(addr: SocketAddr, dual: bool) -> io::Result<tokio::net::TcpListener> {
    let Some(wide) = widen(addr, dual) else {
        let s = std::net::TcpListener::bind(addr)?;
        s.set_nonblocking(true)?;
        return tokio::net::TcpListener::from_std(s);
    };
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(false)?;
    // As std and tokio do on Unix: a restarted server rebinds at once.
    s.set_reuse_address(true)?;
    s.bind(&wide.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// A UDP socket on `addr`, dual-stack on every address with `dual` as for
/// [`tcp_listener`]. Must be called within a tokio runtime.
pub fn udp_socket(addr: SocketAddr, dual: bool) -> io::Result<tokio::net::UdpSocket> {
    let s = match widen(addr, dual) {
        Some(wide) => udp(wide.port())?,
        None => std::net::UdpSocket::bind(addr)?,
    };
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s)
}

/// Whether this host can open IPv6 sockets at all.
pub fn host_has_ipv6() -> bool {
    std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_on_every_address_takes_both_families() {
        let l = tcp_listener("0.0.0.0:0".parse().unwrap(), true).unwrap();
        let port = l.local_addr().unwrap().port();
        let c4 = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (_, from) = l.accept().await.unwrap();
        assert_eq!(canonical(from), c4.local_addr().unwrap());
        if host_has_ipv6() {
            let c6 = tokio::net::TcpStream::connect(("::1", port)).await.unwrap();
            let (_, from) = l.accept().await.unwrap();
            assert_eq!(from, c6.local_addr().unwrap());
        }
        // Without `dual`, every IPv4 address stays IPv4.
        let l = tcp_listener("0.0.0.0:0".parse().unwrap(), false).unwrap();
        assert!(l.local_addr().unwrap().is_ipv4());
    }

    #[test]
    fn one_socket_talks_to_both_families_and_reads_canonical_addresses() {
        let s = udp(0).unwrap();
        let port = s.local_addr().unwrap().port();
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        v4.send_to(b"four", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"four");
        assert_eq!(canonical(from), v4.local_addr().unwrap());
        // And back to the plain IPv4 address.
        s.send_to(b"back", v4.local_addr().unwrap()).unwrap();
        let (n, _) = v4.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"back");
        if host_has_ipv6()
            && let Ok(v6) = std::net::UdpSocket::bind("[::1]:0")
        {
            v6.send_to(b"six", ("::1", port)).unwrap();
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"six");
            assert_eq!(canonical(from), v6.local_addr().unwrap());
        }
    }
}
