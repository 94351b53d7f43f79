#!/usr/bin/env python3
"""The least a hashing proxy can spend: a baseline for bench/cpu.sh (issue #27).

Serves GET requests on 127.0.0.1:PORT one connection at a time by fetching the same path from
UPSTREAM (HTTP/1.1, `Connection: close`, a body that ends with the connection) and hashing the
body with sha256 (OpenSSL's, through hashlib):

  pass   each read goes to the client as soon as it is hashed (what the proxy's pass-through
         does, minus everything else it does);
  spool  the body is hashed and written to an unlinked file first, then read back and sent
         (what verify-first does for a NAR larger than memory).

One thread, blocking sockets, one reused buffer of BUF bytes: no copies beyond the kernel's
socket and file copies. Its CPU is read from /proc by the caller, like the proxy's. Bench code:
bounded by COUNT connections; no error handling beyond failing loudly.

  relay.py pass|spool PORT UPSTREAM_HOST UPSTREAM_PORT [BUF] [COUNT] [SPOOL_DIR]
"""
import hashlib
import os
import socket
import sys
import tempfile


def read_head(sock):
    """The response head, read byte by byte so the body stays in the socket."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = sock.recv(1)
        if not b:
            raise SystemExit("upstream closed before the head ended")
        head += b
    return head


def main():
    mode, port, up_host, up_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    buf_size = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 20
    count = int(sys.argv[6]) if len(sys.argv) > 6 else 1000
    spool_dir = sys.argv[7] if len(sys.argv) > 7 else None
    buf = bytearray(buf_size)
    view = memoryview(buf)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    for _ in range(count):
        client, _ = listener.accept()
        req = b""
        while b"\r\n\r\n" not in req and len(req) < 8192:
            req += client.recv(4096)
        path = req.split(b" ")[1]
        up = socket.create_connection((up_host, up_port))
        up.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        head = read_head(up)
        sha = hashlib.sha256()
        if mode == "pass":
            client.sendall(head)
            while n := up.recv_into(buf):
                sha.update(view[:n])
                client.sendall(view[:n])
        else:
            with tempfile.TemporaryFile(dir=spool_dir) as f:
                fd, total = f.fileno(), 0
                while n := up.recv_into(buf):
                    sha.update(view[:n])
                    done = 0
                    while done < n:
                        done += os.write(fd, view[done:n])
                    total += n
                sha.digest()
                client.sendall(head)
                off = 0
                while off < total:
                    n = os.preadv(fd, [view], off)
                    client.sendall(view[:n])
                    off += n
        up.close()
        client.close()


if __name__ == "__main__":
    main()
