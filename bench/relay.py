#!/usr/bin/env python3
"""The least a hashing proxy can spend: a baseline for bench/cpu.sh (issue #27).

Serves GET requests on 127.0.0.1:PORT one connection at a time by fetching the same path from
UPSTREAM (HTTP/1.1, `Connection: close`, a body that ends with the connection) and hashing the
body with sha256 (OpenSSL's, through hashlib):

  pass   each read goes to the client as soon as it is hashed (what the proxy's pass-through
         does, minus everything else it does);
  spool  the body is hashed and written to an unlinked file first, then read back and sent
         (what verify-first does for a NAR larger than memory);
  splice the body moves from socket to socket through a pipe without entering user space
         (splice(2)), and a second pipe that shares its pages (tee(2)) is read to hash it: the
         one copy left is the hash's read (what a zero-copy pass-through would spend).

One thread, blocking sockets, one reused buffer of BUF bytes: no copies beyond the kernel's
socket and file copies. Its CPU is read from /proc by the caller, like the proxy's. Bench code:
bounded by COUNT connections; no error handling beyond failing loudly.

  relay.py pass|spool|splice PORT UPSTREAM_HOST UPSTREAM_PORT [BUF] [COUNT] [SPOOL_DIR]
"""
import ctypes
import fcntl
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


F_SETPIPE_SZ = 1031
LIBC = ctypes.CDLL(None, use_errno=True)


def tee(fd_in, fd_out, n):
    """tee(2): duplicate up to n bytes of one pipe into another, sharing the pages."""
    r = LIBC.tee(fd_in, fd_out, ctypes.c_size_t(n), 0)
    if r < 0:
        raise OSError(ctypes.get_errno(), "tee")
    return r


def splice_relay(up, client, sha, view, buf_size):
    """up -> pipe a -> client, pipe a teed into pipe b, which is read and hashed."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    try:
        size = min(buf_size, int(open("/proc/sys/fs/pipe-max-size").read()))
        for fd in (a_w, b_w):
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        while n := os.splice(up.fileno(), a_w, size):
            # tee does not consume pipe a, so it is called once: pipe b is empty and as large.
            if (teed := tee(a_r, b_w, n)) != n:
                raise SystemExit(f"tee duplicated {teed} of {n} bytes")
            sent = 0
            while sent < n:
                sent += os.splice(a_r, client.fileno(), n - sent)
            got = 0
            while got < n:
                k = os.readv(b_r, [view[: n - got]])
                sha.update(view[:k])
                got += k
    finally:
        for fd in (a_r, a_w, b_r, b_w):
            os.close(fd)


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
        if mode == "splice":
            client.sendall(head)
            splice_relay(up, client, sha, view, buf_size)
        elif mode == "pass":
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
