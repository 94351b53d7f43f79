#!/usr/bin/env python3
"""Passive beacon sniffer for bench/hall-serve.sh: joins the beacon groups on IFACE inside the
namespace it runs in and prints one line per datagram, "<monotonic seconds> <udp payload bytes>
<4|6>", for SECS seconds (at most 500,000 lines). Sends nothing."""
import select, socket, struct, sys, time

iface, secs = sys.argv[1], float(sys.argv[2])
idx = socket.if_nametoindex(iface)
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s4.bind(("0.0.0.0", 8380))
s4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
              struct.pack("4s4si", socket.inet_aton("239.255.83.80"), socket.inet_aton("0.0.0.0"), idx))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s6.bind(("::", 8380))
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
              socket.inet_pton(socket.AF_INET6, "ff02::8380") + struct.pack("@I", idx))
print("ready", flush=True)
end, n = time.monotonic() + secs, 0
while n < 500_000:
    left = end - time.monotonic()
    if left <= 0:
        break
    r, _, _ = select.select([s4, s6], [], [], left)
    for s in r:
        data = s.recv(4096)
        n += 1
        print(f"{time.monotonic():.4f} {len(data)} {6 if s is s6 else 4}")
sys.stdout.flush()
