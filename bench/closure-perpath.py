#!/usr/bin/env python3
"""Where the proxy loses on a closure, path by path (issue #16), from the logs bench/closure.sh
keeps with BENCH_LOGS=DIR: for each proxy realisation (a fresh `serve` each, in the client's log)
and the direct one before it (the peer's "NAR served" lines outside the proxy's windows), the
summed per-path times by NAR size class: the proxy's from Nix's request to the NAR verified
(plus its delivery when verified first), the peer's from the request to the last byte sent.
nginx realisations leave no lines. Usage: bench/closure-perpath.py DIR"""
import collections
import datetime
import re
import sys

d = sys.argv[1]


def ts(s):
    return datetime.datetime.fromisoformat(s.rstrip("Z")).timestamp()


runs, cur = [], None
for line in open(f"{d}/client.log", errors="replace"):
    m = re.match(r"(\S+)Z ", line)
    if not m:
        continue
    t = ts(m.group(1))
    if "proxy listening" in line:
        cur = {"start": t, "end": t, "nar": {}}
        runs.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r'NAR path=\S+-lnc-closure-(\S+) source=\S+ bytes=(\d+) ms=(\d+) verdict="([a-z ]+)"', line)
    if m:
        cur["nar"][m.group(1)] = [int(m.group(2)), int(m.group(3)), m.group(4), 0]
        cur["end"] = t
    m = re.search(r"NAR delivered path=\S+-lnc-closure-(\S+) bytes=\d+ ms=(\d+)", line)
    if m and m.group(1) in cur["nar"]:
        cur["nar"][m.group(1)][3] = int(m.group(2))
        cur["end"] = t
    if "NAR delivered hash=" in line:
        cur["end"] = t
runs = [r for r in runs if r["nar"]]
served = []
for line in open(f"{d}/peer.log", errors="replace"):
    m = re.match(r"(\S+)Z .*NAR served path=\S+-lnc-closure-(\S+) bytes=(\d+) ms=(\d+)", line)
    if m:
        served.append((ts(m.group(1)), m.group(2), int(m.group(4))))
direct, cur, last = [], None, None
for t, name, ms in served:
    if any(r["start"] <= t <= r["end"] + 0.5 for r in runs):
        continue
    if last is None or t - last > 3:
        cur = {}
        direct.append(cur)
    cur[name] = ms
    last = t


def size_class(b):
    return "< 64 KiB" if b < 65536 else "64 KiB-1 MiB" if b < 1 << 20 else "1-10 MiB" if b < 10 << 20 else ">= 10 MiB"


for i, (pr, dr) in enumerate(zip(runs, direct)):
    agg = collections.defaultdict(lambda: [0, 0, 0, 0, collections.Counter()])
    for name, (b, ms, verdict, dms) in pr["nar"].items():
        if name in dr:
            a = agg[size_class(b)]
            a[0] += 1
            a[1] += ms + dms
            a[2] += dr[name]
            a[3] += b
            a[4][verdict] += 1
    print(f"realisation {i + 1} (proxy's window {pr['end'] - pr['start']:.1f} s):")
    print("| NARs | paths | MiB | proxy, summed ms | direct, summed ms | proxy / direct | verdicts |")
    print("|---|---|---|---|---|---|---|")
    for k in ["< 64 KiB", "64 KiB-1 MiB", "1-10 MiB", ">= 10 MiB"]:
        n, p, q, b, v = agg[k]
        r = f"{p / q:.2f}" if q else "-"
        print(f"| {k} | {n} | {b / 2**20:.0f} | {p} | {q} | {r} | {', '.join(f'{c} {x}' for x, c in v.items())} |")
