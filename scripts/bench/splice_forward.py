#!/usr/bin/env python3
"""A TCP forwarder that moves bytes with splice(2) (no copy through user space): the
cheapest possible forwarding hop, the bound a relay hop is measured against in
scripts/bench/relay. Loopback only.

    splice_forward.py LISTEN_PORT TARGET_PORT
"""
import os
import socket
import sys
import threading


def pump(src, dst):
    r, w = os.pipe()
    try:
        while True:
            n = os.splice(src.fileno(), w, 1 << 20)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main():
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen))
    srv.listen(16)
    # Ready: the bench waits for this line rather than probing the port, which would
    # hand the iperf3 server a stray control connection.
    print("listening", flush=True)
    while True:
        c, _ = srv.accept()
        s = socket.create_connection(("127.0.0.1", target))
        threading.Thread(target=pump, args=(c, s), daemon=True).start()
        threading.Thread(target=pump, args=(s, c), daemon=True).start()


if __name__ == "__main__":
    main()
