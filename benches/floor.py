#!/usr/bin/env python3
"""The floor for the bulk figures of benches/compare.sh: the least work any user-space relay
can do to move a download from a Unix-socket backend to a loopback TCP client.

    floor.py PORT UNIX_PATH

Accepts on 127.0.0.1:PORT, connects each client to UNIX_PATH and moves the bytes with
blocking splice(2) through a 1 MiB pipe, one thread per direction: no event loop, no TLS
parsing, no routing, no timeouts, no limits. Not a proxy anyone should run; what it costs per
GiB is what the kernel charges for the transfer itself, so a proxy's figure can be read
against it. One connection at a time (the bulk figure uses one).
"""
import fcntl
import os
import socket
import sys
import threading

PIPE_SIZE = 1 << 20


def pump(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # the default 64 KiB pipe still works
    try:
        while True:
            n = os.splice(src.fileno(), w, PIPE_SIZE)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # a reset ends the connection; nothing to report for a floor
    finally:
        os.close(r)
        os.close(w)


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    while True:
        client, _ = listener.accept()
        backend = socket.socket(socket.AF_UNIX)
        try:
            backend.connect(path)
        except OSError:
            client.close()
            backend.close()
            continue
        up = threading.Thread(target=pump, args=(client, backend))
        up.start()
        pump(backend, client)
        up.join()
        client.close()
        backend.close()


if __name__ == "__main__":
    main()
