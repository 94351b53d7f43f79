#!/usr/bin/env python3
"""What the beacon traffic on a link is made of (issue #27): a passive capture of every beacon
datagram (UDP port 8380, IPv4 and IPv6) on an interface for a window, decoded (proto/beacon.md:
magic, version, kind, flags, node id, port, interval, sequence number), and split into
- periodic announces (a node's announces per family at least 0.8 of its announced interval apart,
  less 0.1 s: the jitter is +-20 %),
- other announces (answers to queries, defends, start-up and wake-up bursts),
- queries and goodbyes,
in bytes per second on the wire (IP and UDP headers included, as tests/it's Sniffer counts), with
the announced intervals and what hall size they imply under the announce budget.
Run inside the namespace that holds the link (needs root; sends nothing):
    ip netns exec NS bench/beacon-mix.py IFACE SECONDS [BUDGET_BYTES_PER_SEC]
"""
import socket
import struct
import sys
import time
from collections import defaultdict

PORT = 8380
KINDS = {1: "announce", 2: "query", 3: "goodbye"}


def main():
    iface, secs = sys.argv[1], float(sys.argv[2])
    budget = float(sys.argv[3]) if len(sys.argv) > 3 else 6000.0
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    s.bind((iface, 0))
    s.settimeout(0.2)
    seen = []  # (t, v6, wire bytes, kind, node, interval_ms)
    end = time.monotonic() + secs
    while time.monotonic() < end and len(seen) < 400_000:
        try:
            frame = s.recv(2048)
        except socket.timeout:
            continue
        if len(frame) < 14:
            continue
        etype = struct.unpack("!H", frame[12:14])[0]
        p = frame[14:]
        if etype == 0x0800 and len(p) >= 20 and p[9] == 17:
            ihl = (p[0] & 0x0F) * 4
            udp, v6 = p[ihl:], False
        elif etype == 0x86DD and len(p) >= 40 and p[6] == 17:
            udp, v6 = p[40:], True
        else:
            continue
        if len(udp) < 8 or struct.unpack("!H", udp[2:4])[0] != PORT:
            continue
        payload = udp[8:]
        if len(payload) < 34 or payload[:4] != b"LNCB":
            continue
        kind = KINDS.get(payload[5], "other")
        node = payload[8:24].hex()
        interval = struct.unpack("!I", payload[26:30])[0]
        seen.append((time.monotonic(), v6, len(payload) + (48 if v6 else 28), kind, node, interval))
    report(seen, secs, budget)


def report(seen, secs, budget):
    by = defaultdict(lambda: [0, 0])  # class -> [datagrams, bytes]
    last = {}  # (node, v6) -> time of the last periodic announce
    intervals = {}
    round_bytes = defaultdict(int)  # node -> bytes of one announce per family
    for t, v6, n, kind, node, interval in seen:
        cls = kind
        if kind == "announce":
            intervals[node] = interval
            round_bytes[(node, v6)] = n
            prev = last.get((node, v6))
            if prev is not None and t - prev < 0.8 * interval / 1000 - 0.1:
                cls = "announce, out of rhythm (answer, defend, burst)"
            else:
                cls = "announce, periodic"
                last[(node, v6)] = t
        by[cls][0] += 1
        by[cls][1] += n
    total = sum(b for _, b in by.values())
    nodes = len(intervals)
    print(f"{len(seen)} beacon datagrams in {secs:.0f} s from {nodes} announcing nodes: {total / secs:.0f} B/s")
    for cls, (d, b) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"  {cls}: {d / secs:.1f} datagrams/s, {b / secs:.0f} B/s ({100 * b / max(total, 1):.0f} %)")
    if intervals:
        iv = sorted(intervals.values())
        per_node = defaultdict(int)
        for (node, _), n in round_bytes.items():
            per_node[node] += n
        rb = sorted(per_node.values())[len(per_node) // 2]
        implied = [i / 1000 * budget / rb for i in iv]
        print(f"  announced intervals: min {iv[0]} ms, median {iv[len(iv) // 2]} ms, max {iv[-1]} ms; "
              f"a round (both families) {rb} B; hall size they imply at {budget:.0f} B/s: "
              f"min {implied[0]:.0f}, median {implied[len(implied) // 2]:.0f}, max {implied[-1]:.0f}")


if __name__ == "__main__":
    main()
