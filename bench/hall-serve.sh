#!/usr/bin/env bash
# The hall with real `serve` processes (needs root; issue 12): BENCH_HOSTS (100) `serve` processes,
# 4 per network namespace on distinct ports (the table allows 4 node ids per address), on one
# bridge, with absent stores (beacon and peer table only: no lookups are measured here). Measures
# the peer table size, steady-state beacon traffic on the link, the datagrams a newcomer's start
# adds, how fast the newcomer's table fills, and serve RSS / CPU. Everything stays in the
# script's own namespaces; it kills the processes it started (by PID) and deletes them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:$PATH
N=${BENCH_HOSTS:-100}
PER=4
NS=$(((N + PER - 1) / PER))
SETTLE=${BENCH_SETTLE:-15}
BIN=target/release/local-nix-cache
cargo build --release --locked -q
pfx=lnch$$
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for i in $(seq 1 $((NS + 2))); do ip netns del "$pfx-h$i" 2>/dev/null || true; done
    ip netns del "$pfx-br" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$pfx-br"
ip -n "$pfx-br" link add br0 type bridge mcast_snooping 0
ip -n "$pfx-br" link set br0 up
for i in $(seq 1 $((NS + 2))); do
    ns=$pfx-h$i
    ip netns add "$ns"
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    ip -n "$ns" link add eth0 type veth peer name "vb$i" netns "$pfx-br"
    ip -n "$pfx-br" link set "vb$i" master br0
    ip -n "$pfx-br" link set "vb$i" up
    ip -n "$ns" addr add "10.79.0.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add 224.0.0.0/4 dev eth0
done
sleep 2 # link-local addresses
mono() { python3 -c 'import time; print(f"{time.monotonic():.4f}")'; }
start_serve() { # namespace index, instance
    local ns=$pfx-h$1 k=$2
    ip netns exec "$ns" "$BIN" serve --listen "0.0.0.0:$((8400 + k))" --proxy-listen "127.0.0.1:$((9400 + k))" \
        --interface eth0 --store "unix://$work/absent.sock" >"$work/$1-$k.log" 2>&1 &
    pids+=($!)
}
table_of() { # namespace index, instance -> peers in its table
    ip netns exec "$pfx-h$1" curl -s --max-time 3 "http://127.0.0.1:$((9400 + $2))/status.json" |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0
}
cpu_ticks() { # sum of utime+stime of the hall's serve processes
    local t=0 p
    for p in "${pids[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
    echo "$t"
}
started=0
for i in $(seq 1 "$NS"); do
    for k in $(seq 0 $((PER - 1))); do
        [ "$started" -lt "$N" ] || break
        start_serve "$i" "$k"
        started=$((started + 1))
    done
done
echo "started $started serve processes in $NS namespaces; settling ${SETTLE}s"
sleep "$SETTLE"
sizes=$(for i in $(seq 1 "$NS"); do table_of "$i" 0; done | sort -n)
tmin=$(echo "$sizes" | head -1)
tmed=$(echo "$sizes" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
tmax=$(echo "$sizes" | tail -1)
# Steady state: 10 s of beacon traffic, and CPU over the same window.
sn=$pfx-h$((NS + 1))
c0=$(cpu_ticks)
ip netns exec "$sn" python3 bench/sniff.py eth0 10 >"$work/steady" &
sniffer=$!
wait "$sniffer"
c1=$(cpu_ticks)
hz=$(getconf CLK_TCK)
steady=$(awk 'NR > 1 { n++; b += $2 + ($3 == 6 ? 48 : 28) } END { printf "%.0f %.1f", b / 10, n / 10 }' "$work/steady")
cpu=$(echo "$c0 $c1 $hz $started" | awk '{ printf "%.2f", ($2 - $1) / $3 / 10 * 100 / $4 }')
rss=$(for p in "${pids[@]}"; do awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null; done | sort -n |
    awk '{a[NR]=$1} END {printf "%.1f %.1f", a[int((NR+1)/2)]/1024, a[NR]/1024}')
# One newcomer: 3 s of baseline, then its start, 5 s more.
ip netns exec "$sn" python3 bench/sniff.py eth0 8 >"$work/start" &
sniffer=$!
sleep 3
t0=$(mono)
start_serve $((NS + 2)) 0
sleep 1
new1=$(table_of $((NS + 2)) 0)
sleep 2
new3=$(table_of $((NS + 2)) 0)
wait "$sniffer"
sleep 6
new10=$(table_of $((NS + 2)) 0)
read -r before after < <(awk -v t0="$t0" 'NR > 1 { if ($1 < t0 && $1 >= t0 - 2) b++; if ($1 >= t0 && $1 < t0 + 2) a++ } END { print b + 0, a + 0 }' "$work/start")
echo
echo "| $N serve processes ($NS namespaces × $PER), absent stores | value |"
echo "|---|---|"
echo "| peer table after ${SETTLE} s (min / median / max of one instance per namespace; all = $((N - 1))) | $tmin / $tmed / $tmax |"
read -r bps dps <<<"$steady"
echo "| steady beacon traffic on the link, B/s (datagrams/s) | $bps ($dps) |"
echo "| datagrams in the 2 s after one newcomer starts (in the 2 s before: baseline) | $after ($before) |"
echo "| newcomer's table 1 s / 3 s / 10 s after its start | $new1 / $new3 / $new10 |"
echo "| serve RSS, median / max (MiB) | ${rss/ / \/ } |"
echo "| serve CPU, mean per process over the steady 10 s | $cpu % |"
if [ -n "${BENCH_RESULTS:-}" ]; then
    echo "beacon traffic, $N real serve processes (B/s)|$bps|3.8 KB/s at 100 hosts (issue 12, before)|-|<= 8000" >>"$BENCH_RESULTS"
fi
