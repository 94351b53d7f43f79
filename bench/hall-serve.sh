#!/usr/bin/env bash
# The hall with real `serve` processes (needs root and Nix; issue 12): tests/it/hall_serve.rs's
# bench_hall_of_real_serve_hosts, in release mode, once per size in BENCH_HALL_SIZES (100 300).
# BENCH_HALL_PER_NS (4) `serve` per network namespace on distinct ports, all on one bridge. A few
# hosts are holders: their own chroot store and nix-daemon with 4 signed paths no other host
# holds (6 of them also hold a 3-path closure); every other host serves an empty real store (one
# nix-daemon per 16 hosts), so every host publishes a content summary; 16 crowd hosts have an
# empty store of their own. Measures the peer tables, steady beacon traffic on the link (passive
# sniffer namespace), serve RSS and CPU, lookups of each holder's paths through 4 clients' proxies
# (found on the first lookup, peer requests per lookup, latency via the proxy and at the holder
# directly), a crowd of real Nix clients realising the closure through their proxies in two waves
# of 8 (NARs per holder; NARs from holders vs first-wave hosts; how soon a gain is findable), and
# the datagrams one newcomer's start causes (a decoding sniffer: its own plus the answers, with a
# control window). HALL_PERF=FILE (+ HALL_BIN=target/profiling/local-nix-cache) profiles one
# steady serve; HALL_AB_ENV=KEY=VALUE compares a setting on half the hall. BENCH_HALL_LOGS=DIR
# keeps the logs. All traffic stays in the test's own namespaces; the test kills its processes by
# PID and deletes its namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$HOME/.cargo/bin:$PATH
dpkg -s nix-bin >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null; }
SIZES=${BENCH_HALL_SIZES:-100 300}
export HALL_PER_NS=${BENCH_HALL_PER_NS:-4}
cargo test --release --locked -q --test it --no-run 2>/dev/null
out=$(mktemp -d)
# Neighbour-table caps raised for the run and restored (bench/neigh.sh says why).
. bench/neigh.sh
restore() {
    neigh_restore
    rm -rf "$out"
}
trap restore EXIT
neigh_raise
# mix N: once the hall of N hosts is steady (its tables are full), what its beacon traffic is made
# of: 20 s of every beacon datagram on the hall's bridge, decoded by bench/beacon-mix.py (periodic
# announces, other announces, queries, goodbyes; the intervals announced and the hall size they
# imply). Passive; runs beside the test, which goes on with its lookups meanwhile. Over the same
# window's first 10 s: each steady `serve`'s wake-ups a second (voluntary context switches of its
# threads) and CPU, and
# the datagrams the beacon sockets dropped (/proc/net/udp's drops, port 8380) in the hall.
mix() {
    local n=$1 pid="" ns="" i
    for i in $(seq 900); do
        grep -q '^BENCH-HALL|table|' "$out/log-$n" 2>/dev/null && break
        sleep 1
    done
    pid=$(pgrep -f 'hall_serve::bench_hall_of_real_serve_hosts' | while read -r p; do
        [ "$(cat /proc/"$p"/comm 2>/dev/null)" != cargo ] && echo "$p"; done | tail -1)
    [ -n "$pid" ] && ns=$(ip netns list | awk '{print $1}' | grep -E "^lnc$pid-[0-9]+-br$" | head -1)
    if [ -n "$ns" ]; then
        local serves t0 t1 s0 s1 d0 d1 k
        serves=$(hall_serves "$pid")
        ip netns exec "$ns" python3 bench/beacon-mix.py br0 20 >"$out/mix-$n" 2>&1 &
        # The first 10 s of the capture (the test's lookups and status polls run in it: the
        # test's own `wakeups` figure is the quiet one).
        s0=$(switches voluntary $serves); i0=$(switches nonvoluntary $serves); t0=$(ticks $serves); d0=$(udp_drops "$pid")
        sleep 10
        s1=$(switches voluntary $serves); i1=$(switches nonvoluntary $serves); t1=$(ticks $serves); d1=$(udp_drops "$pid")
        wait $! || true
        k=$(echo $serves | wc -w)
        awk -v s=$((s1 - s0)) -v i=$((i1 - i0)) -v t=$((t1 - t0)) -v k="$k" -v hz="$(getconf CLK_TCK)" -v d=$((d1 - d0)) -v dt="$d1" 'BEGIN {
            if (k > 0) printf "steady serve, first 10 s of the capture: %.1f wake-ups a second (voluntary context switches; %.1f more preempted) and %.3f %% of a core each (mean of %d); beacon datagrams the kernel dropped for a full receive buffer: %d in the window, %d since start (all hosts)\n", s / k / 10, i / k / 10, 100 * t / hz / 10 / k, k, d, dt }' >"$out/wake-$n"
    fi
}
# The hall's `serve` processes: the test process's children running the binary.
hall_serves() {
    local p
    for p in $(pgrep -P "$1"); do
        case "$(cat /proc/"$p"/comm 2>/dev/null)" in local-nix-cach*) echo "$p" ;; esac
    done
}
# switches voluntary|nonvoluntary PID...: context switches of every thread of the processes
# (voluntary: the thread slept and was woken, a wake-up; nonvoluntary: it was preempted).
switches() {
    local p kind=$1
    shift
    for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null; done | awk -v k="${kind}_ctxt_switches:" '$1 == k {s += $2} END {print s + 0}'
}
ticks() {
    local p
    for p in "$@"; do awk '{print $14 + $15}' /proc/"$p"/stat 2>/dev/null; done | awk '{s += $1} END {print s + 0}'
}
# Datagrams dropped by the beacon sockets (port 8380, 0x20BC) of every namespace of the hall.
udp_drops() {
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^lnc$1-"); do
        ip netns exec "$ns" cat /proc/net/udp /proc/net/udp6 2>/dev/null
    done | awk '$2 ~ /:20BC$/ {d += $NF} END {print d + 0}'
}
for n in $SIZES; do
    mix "$n" &
    mixer=$!
    if ! BENCH_HOSTS=$n cargo test --release --locked -q --test it -- --ignored --nocapture \
        hall_serve::bench_hall_of_real_serve_hosts >"$out/log-$n" 2>&1; then
        echo "hall of $n failed:" >&2
        grep -v '^ *at \|^ *[0-9]*: ' "$out/log-$n" | tail -20 >&2
        kill "$mixer" 2>/dev/null || true
        wait "$mixer" 2>/dev/null || true
        continue
    fi
    wait "$mixer" || true
    grep '^BENCH-HALL|' "$out/log-$n" >"$out/$n" || true
    [ -z "${BENCH_HALL_LOGS:-}" ] || cp "$out/log-$n" "$BENCH_HALL_LOGS/hall-$n.log"
done
get() { # size key
    [ -f "$out/$1" ] && awk -F'|' -v k="$2" '$2 == k { print $3 }' "$out/$1" || echo "failed"
}
before() { # key -> the issue's "before" at 100 / 300
    case $1 in
    found_first) echo "27 % / 0–7 %" ;;
    requests_per_lookup) echo "16 / 16" ;;
    table) echo "100 / 256 (cap)" ;;
    beacon_bps) echo "3.8 KB/s / 11 KB/s" ;;
    newcomer_datagrams) echo "202 / ~600–1200" ;;
    *) echo "—" ;;
    esac
}
target() {
    case $1 in
    found_first) echo "≥ 99 %" ;;
    wakeups | wakeups_settled) echo "a few a second (issue 27)" ;;
    requests_per_lookup) echo "≤ 4" ;;
    latency) echo "p99 ≤ 50 ms over the fastest holder" ;;
    table) echo "every live host" ;;
    beacon_bps) echo "≤ 8,000 B/s" ;;
    newcomer_datagrams) echo "≤ 64 (own + answers)" ;;
    gained_findable) echo "within two announce intervals" ;;
    crowd_wave2) echo "spread over those that have it" ;;
    newcomer_table) echo "the whole hall within 10 s" ;;
    crowd) echo "spread over the holders" ;;
    *) echo "—" ;;
    esac
}
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg); $HALL_PER_NS serve per namespace"
echo
header="| what |"
rule="|---|"
for n in $SIZES; do
    header="$header $n hosts |"
    rule="$rule---|"
done
echo "$header before at 100 / 300 (issue 12) | target |"
echo "$rule---|---|"
for key in holders ready_s exited table summaries fds beacon_bps cpu wakeups cpu_ab rss perf found_first requests_per_lookup latency crowd gained_findable crowd_wave2 newcomer_datagrams newcomer_table summaries_settled fds_settled wakeups_settled; do
    row="| $key |"
    for n in $SIZES; do row="$row $(get "$n" "$key") |"; done
    echo "$row $(before "$key") | $(target "$key") |"
done
for n in $SIZES; do
    echo
    echo "beacon traffic of the steady hall of $n, by kind (bench/beacon-mix.py, 20 s):"
    sed 's/^/  /' "$out/mix-$n" 2>/dev/null || echo "  not captured"
    sed 's/^/  /' "$out/wake-$n" 2>/dev/null || true
done
if [ -n "${BENCH_RESULTS:-}" ]; then
    for n in $SIZES; do
        echo "path held by one of $n real serve hosts found on the first lookup|$(get "$n" found_first)|$(before found_first) (issue 12, 100 / 300)|-|>= 99 %" >>"$BENCH_RESULTS"
        echo "peer requests per lookup, $n real serve hosts|$(get "$n" requests_per_lookup)|16 (issue 12)|-|<= 4" >>"$BENCH_RESULTS"
        echo "beacon traffic, $n real serve processes (B/s)|$(get "$n" beacon_bps)|$(before beacon_bps) (issue 12, 100 / 300)|-|<= 8000" >>"$BENCH_RESULTS"
        w=$(get "$n" wakeups | awk '{print $1}')
        echo "steady serve wake-ups a second, $n real serve hosts|${w:-failed}|40.9 at 100 (main, the same test)|-|a few" >>"$BENCH_RESULTS"
        w=$(get "$n" wakeups_settled | awk '{print $1}')
        echo "settled serve wake-ups a second (after the waves), $n real serve hosts|${w:-failed}|the steady window above|-|a few" >>"$BENCH_RESULTS"
        echo "datagrams one start causes, $n real serve hosts|$(get "$n" newcomer_datagrams | sed 's/;.*/)/')|$(before newcomer_datagrams) (all datagrams, issue 12)|-|<= 64" >>"$BENCH_RESULTS"
    done
fi
