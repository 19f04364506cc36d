//! Kernel buffer sizes of the UDP sockets that carry sessions (the relay's, a peer's
//! endpoint and its relay links). Linux gives a UDP socket about 208 KiB by default: a
//! dozen of the 16 KiB datagrams QUIC sends on loopback-sized paths, or 150 of 1,400
//! bytes. A reader that is a scheduling slice late then drops datagrams, and QUIC's
//! congestion control reads every drop as congestion: on this project's benchmark the
//! receive queue overflowed a thousand times in five seconds and capped one stream at
//! about half of what the path carried with larger buffers.

use socket2::SockRef;
use tracing::debug;

/// What we ask the kernel for, each way. quic-go and tailscale ask for the same order of
/// magnitude; the kernel caps it at `net.core.rmem_max` / `wmem_max` (raise those on a
/// busy relay).
pub const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// Asks for [`UDP_BUFFER`] bytes of receive and send buffer on `socket`; a kernel that
/// grants less is noted in the debug log, never an error (the socket still works, only
/// less well under load).
pub fn grow_udp_buffers<'s>(socket: impl Into<SockRef<'s>>) {
    let socket = socket.into();
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    // Linux reports double the granted size (it counts its own bookkeeping).
    let granted = (socket.recv_buffer_size(), socket.send_buffer_size());
    if let (Ok(r), Ok(w)) = granted {
        if r < UDP_BUFFER || w < UDP_BUFFER {
            debug!(
                receive = r,
                send = w,
                wanted = UDP_BUFFER,
                "the kernel capped a UDP socket's buffers (net.core.rmem_max, wmem_max)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_gets_more_than_the_default_buffer() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = SockRef::from(&s).recv_buffer_size().unwrap();
        grow_udp_buffers(&s);
        let after = SockRef::from(&s).recv_buffer_size().unwrap();
        // Unless the host's cap is at the default already, the buffer grew.
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if cap * 2 > before {
            assert!(
                after > before,
                "receive buffer {before} -> {after}, cap {cap}"
            );
        }
    }
}
