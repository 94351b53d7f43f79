#!/usr/bin/env bash
# What each byte costs in CPU (issue #27: laptops on battery). CPU seconds, read from /proc
# (utime + stime of the process, all its threads), not wall time, so other load on the machine
# disturbs the figures less (it still does: caches, frequency; hence the range of BENCH_RUNS runs).
#
# - the proxy, per GiB handed to the client: pass-through from a proven peer, and verify-first
#   (a second client with --pass-through-proven-peers false), next to the floor measured in the
#   same run on the same bytes: `openssl dgst -sha256` of the NAR read from a file (one read and
#   the sha256, SHA-NI where the CPU has it), and next to the least any hashing proxy spends on
#   the same link: bench/relay.py, one thread that receives, hashes and sends (pass) or spools
#   (spool) the NAR with one reused buffer and nothing else;
# - the store server, per GiB served of a plain NAR read from disk, one stream and eight at once,
#   next to nginx (sendfile) serving the same NAR file; and its `.nar.zst` (on-the-fly zstd).
# Hosts in network namespaces as in bench/proxy.sh (needs root); the client is curl, whose own
# CPU is not counted. Everything started is killed by PID on exit.
# The pass-through is measured twice: as the proxy chooses the NAR's form (`peer-compression =
# "auto"`: a NAR this large crosses as the peer's `.nar.zst` while no form was measured, random
# bytes as zstd raw blocks the decoder copies) and plain (a third client, `--peer-compression
# none`).
#   bench/cpu.sh      (BENCH_BIG_MIB=512 BENCH_RUNS=3 BENCH_RELAY_BUF=4194304)
set -euo pipefail
cd "$(dirname "$0")/.."
BIG_MIB=${BENCH_BIG_MIB:-512}
RUNS=${BENCH_RUNS:-3}
BENCH_NAME=cpubench
. bench/hosts.sh
. bench/nginx.sh
need_packages openssl nginx-light python3

echo "building a $BIG_MIB MiB path..." >&2
cat >"$D/big.nix" <<NIX
builtins.derivation { name = "lnc-cpu-big-$BIG_MIB"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "head -c \$((1024 * 1024 * $BIG_MIB)) /dev/urandom > \$out" ]; PATH = "/usr/bin:/bin"; }
NIX
cat >"$D/warm.nix" <<'NIX'
map (i: builtins.derivation { name = "lnc-cpu-warm-${toString i}"; system = builtins.currentSystem;
  builder = "/bin/sh"; args = [ "-c" "echo warm ${toString i} > $out" ]; PATH = "/usr/bin:/bin"; }) [ 1 2 3 ]
NIX
nix-store --generate-binary-cache-key bench-hydra-1 "$D/sk" "$D/pk"
PK=$(cat "$D/pk")
BIG=$(nix-build "$D/big.nix" --no-out-link 2>/dev/null)
WARM=$(nix-build "$D/warm.nix" --no-out-link 2>/dev/null)
# shellcheck disable=SC2086
nix copy --to "file://$D/cache?secret-key=$D/sk&compression=none" "$BIG" $WARM 2>/dev/null
# shellcheck disable=SC2086
nix copy --from "file://$D/cache" --to "$D/peer" --option trusted-public-keys "$PK" "$BIG" $WARM 2>/dev/null
chmod 755 "$D"
chmod -R a+rX "$D/cache"

lan_up peer client client2 client3
start_peer peer "$D/peer" "$PK"
PEER=$PEER_PID
start_client client "$PK"
PASS=$CLIENT_PID
BENCH_CLIENT_ARGS="--pass-through-proven-peers false ${BENCH_CLIENT_ARGS:-}" start_client client2 "$PK"
VERIFY=$CLIENT_PID
BENCH_CLIENT_ARGS="--peer-compression none ${BENCH_CLIENT_ARGS:-}" start_client client3 "$PK"
PLAIN=$CLIENT_PID
H=$(basename "$BIG" | cut -c1-32)
wait_narinfo client "http://127.0.0.1:8381/$H.narinfo"
wait_narinfo client2 "http://127.0.0.1:8381/$H.narinfo"
wait_narinfo client3 "http://127.0.0.1:8381/$H.narinfo"
for c in client client3; do
    for w in $WARM; do realise $c "http://127.0.0.1:8381" "$PK" "$w" >/dev/null; done
    ip netns exec "$NS-$c" curl -sf http://127.0.0.1:8381/status.json | grep -q '"proven":true' ||
        { echo "the peer did not become proven for $c after three verified NARs" >&2; exit 1; }
done
NAR=$(ip netns exec "$NS-client" curl -sf "http://127.0.0.1:8381/$H.narinfo" | awk '/^URL:/ {print $2}')
PEER_NAR=$(ip netns exec "$NS-client" curl -sf "http://10.88.0.1:8380/$H.narinfo" | awk '/^URL:/ {print $2}')
FILE_NAR=$(awk '/^URL:/ {print $2}' "$D/cache/$H.narinfo")
BYTES=$(stat -c %s "$D/cache/$FILE_NAR")

# nginx in the peer's namespace serving the file:// cache (the same NAR bytes), with sendfile.
nginx_conf "$D" 10.88.0.1:8480 2 64 "$D/cache"
ip netns exec "$NS-peer" nginx -c "$D/nginx.conf" -g 'daemon off;' &
NGINX=$!
PIDS+=($NGINX)
for _ in $(seq 100); do ip netns exec "$NS-client" curl -sf -o /dev/null "http://10.88.0.1:8480/nix-cache-info" && break; sleep 0.1; done

# The least a hashing proxy spends (bench/relay.py): one thread relaying nginx's NAR to curl
# through sha256, each read sent as soon as it is hashed (pass) or only after the whole body was
# hashed into a file (spool): the proxy's two modes without anything else a proxy does. Its
# buffer (BENCH_RELAY_BUF, default 4 MiB) is how much one read may take: the larger, the fewer
# reads and sends (2026-12-07: 1.10 CPU-s/GiB at 1 MiB, 0.97 at 4 MiB; docs/benchmarks.md).
RELAY_BUF=${BENCH_RELAY_BUF:-$((4 * 1024 * 1024))}
# start_relay MODE PORT: the relay in the client's namespace, fetching from nginx; sets RELAY_PID.
start_relay() {
    ip netns exec "$NS-client" python3 bench/relay.py "$1" "$2" 10.88.0.1 8480 "$RELAY_BUF" 1000 "$D" &
    RELAY_PID=$!
    PIDS+=($RELAY_PID)
}
start_relay pass 8490
RELAY_PASS=$RELAY_PID
start_relay spool 8491
RELAY_SPOOL=$RELAY_PID
start_relay splice 8492
RELAY_SPLICE=$RELAY_PID
sleep 0.5

TICK=$(getconf CLK_TCK)
# cpu PID...: utime + stime of the processes (every thread, and for nginx its workers), in ticks.
cpu() {
    local p t=0 c
    for p in "$@"; do
        for c in $p $(cat "/proc/$p/task/$p/children" 2>/dev/null); do
            t=$((t + $(awk '{print $14 + $15}' "/proc/$c/stat")))
        done
    done
    echo $t
}
# per_gib TICKS BYTES: CPU-s per GiB.
per_gib() { awk -v t="$1" -v b="$2" -v k="$TICK" 'BEGIN {printf "%.2f", t / k / (b / 1073741824)}'; }
# measure PIDS HOST STREAMS URL [ROUNDS]: CPU-s per GiB of PIDS while STREAMS curls in HOST
# fetch URL at once, ROUNDS times (default 1) one after the other. The kernel counts CPU time in
# ticks (CLK_TCK, 100 a second), sampled: a figure needs many ticks to be steady (nginx serves
# 512 MiB in a few), hence rounds.
measure() {
    local pids=$1 host=$2 n=$3 url=$4 rounds=${5:-1} a b i r
    sync
    a=$(cpu $pids)
    for r in $(seq "$rounds"); do
        for i in $(seq "$n"); do
            ip netns exec "$NS-$host" curl -sf -o /dev/null "$url" &
            CURLS[i]=$!
        done
        for i in $(seq "$n"); do wait "${CURLS[i]}" || { echo "a fetch of $url failed" >&2; return 1; }; done
    done
    b=$(cpu $pids)
    per_gib $((b - a)) $((BYTES * n * rounds))
}
# floor: openssl's CPU-s per GiB hashing the NAR file (read from the page cache, warmed first).
floor() {
    local TIMEFORMAT='%U %S'
    cat "$D/cache/$FILE_NAR" >/dev/null
    { time openssl dgst -sha256 "$D/cache/$FILE_NAR" >/dev/null; } 2>"$D/times"
    awk -v b="$BYTES" '{printf "%.2f", ($1 + $2) / (b / 1073741824)}' "$D/times"
}
# range VALUES...: "lo–hi" (or one value).
range() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {print (lo == hi) ? lo : lo "–" hi}'; }
median() { printf '%s\n' "$@" | tr ' ' '\n' | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# BENCH_PERF=DIR: instead of the figures, `perf record` (flat and with call graphs, 999 Hz) of the
# proxy while it hands the NAR over (pass-through, verify-first) and of the store server serving
# it plain; reports in DIR (needs linux-perf; a `--profile profiling` BENCH_BIN has the symbols).
if [ -n "${BENCH_PERF:-}" ]; then
    need_packages linux-perf
    mkdir -p "$BENCH_PERF"
    for job in "pass $PASS client http://127.0.0.1:8381/$NAR" "plain $PLAIN client3 http://127.0.0.1:8381/$NAR" "verify $VERIFY client2 http://127.0.0.1:8381/$NAR" \
        "server $PEER client http://10.88.0.1:8380/$PEER_NAR"; do
        read -r label pid host url <<<"$job"
        perf record -q -F 999 -g -o "$D/perf.$label" -p "$pid" 2>/dev/null &
        rec=$!
        sleep 0.5
        ip netns exec "$NS-$host" curl -sf -o /dev/null "$url"
        kill -INT "$rec"
        wait "$rec" || true
        perf report -i "$D/perf.$label" -n --no-children --sort dso,symbol --stdio 2>/dev/null >"$BENCH_PERF/$label.flat.txt"
        perf report -i "$D/perf.$label" -n --children --sort symbol --stdio -g none --percent-limit 2 2>/dev/null >"$BENCH_PERF/$label.children.txt"
        echo "$label: $(grep -m1 '^# Samples' "$BENCH_PERF/$label.flat.txt")" >&2
    done
    exit 0
fi

declare -a F P PL V RP RS RZ S1 S8 N1 N8 Z
echo "measuring ($RUNS runs, $BYTES bytes)..." >&2
for r in $(seq "$RUNS"); do
    F+=("$(floor)")
    P+=("$(measure "$PASS" client 1 "http://127.0.0.1:8381/$NAR")")
    PL+=("$(measure "$PLAIN" client3 1 "http://127.0.0.1:8381/$NAR")")
    V+=("$(measure "$VERIFY" client2 1 "http://127.0.0.1:8381/$NAR")")
    RP+=("$(measure "$RELAY_PASS" client 1 "http://127.0.0.1:8490/$FILE_NAR")")
    RS+=("$(measure "$RELAY_SPOOL" client 1 "http://127.0.0.1:8491/$FILE_NAR")")
    RZ+=("$(measure "$RELAY_SPLICE" client 1 "http://127.0.0.1:8492/$FILE_NAR")")
    S1+=("$(measure "$PEER" client 1 "http://10.88.0.1:8380/$PEER_NAR" 8)")
    N1+=("$(measure "$NGINX" client 1 "http://10.88.0.1:8480/$FILE_NAR" 8)")
    S8+=("$(measure "$PEER" client 8 "http://10.88.0.1:8380/$PEER_NAR")")
    N8+=("$(measure "$NGINX" client 8 "http://10.88.0.1:8480/$FILE_NAR")")
    Z+=("$(measure "$PEER" client 1 "http://10.88.0.1:8380/${PEER_NAR%.nar}.nar.zst")")
    echo "  run $r: floor ${F[-1]}, pass-through ${P[-1]} (plain ${PL[-1]}, relay ${RP[-1]}, splice ${RZ[-1]}), verify-first ${V[-1]} (relay ${RS[-1]}), server ${S1[-1]}/${S8[-1]} vs nginx ${N1[-1]}/${N8[-1]}, zstd ${Z[-1]}" >&2
done
if grep -aq 'pass-through cut' "$D/client.log" "$D/client3.log"; then echo "a pass-through was cut" >&2; exit 1; fi
ratio() { awk -v a="$(median "$1")" -v b="$(median "$2")" 'BEGIN {printf "%.2fx", a / b}'; }

echo
echo "CPU-s per GiB ($RUNS runs, range; ratios of the medians; $BIG_MIB MiB of random bytes; load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo "| what | CPU-s/GiB | baseline | ratio | target |"
echo "|---|---|---|---|---|"
rows=(
    "proxy, pass-through from a proven peer|$(range "${P[@]}")|$(range "${F[@]}") (openssl sha256 of the file)|$(ratio "${P[*]}" "${F[*]}")|<= 1.5x"
    "proxy, pass-through from a proven peer, plain NAR (--peer-compression none)|$(range "${PL[@]}")|$(range "${F[@]}") (openssl sha256 of the file)|$(ratio "${PL[*]}" "${F[*]}")|<= 1.5x"
    "proxy, verify-first|$(range "${V[@]}")|$(range "${F[@]}") (openssl sha256 of the file)|$(ratio "${V[*]}" "${F[*]}")|<= 1.5x"
    "hashing relay, pass (bench/relay.py: the least a proxy spends)|$(range "${RP[@]}")|$(range "${F[@]}") (openssl sha256 of the file)|$(ratio "${RP[*]}" "${F[*]}")|- (reported)"
    "hashing relay, spool (bench/relay.py: the least verify-first spends)|$(range "${RS[@]}")|$(range "${F[@]}") (openssl sha256 of the file)|$(ratio "${RS[*]}" "${F[*]}")|- (reported)"
    "hashing relay, splice (bench/relay.py: sockets joined by splice(2), only the hash reads the bytes)|$(range "${RZ[@]}")|$(range "${F[@]}") (openssl sha256 of the file)|$(ratio "${RZ[*]}" "${F[*]}")|- (reported)"
    "proxy, pass-through, against the relay|$(range "${P[@]}")|$(range "${RP[@]}") (relay, pass)|$(ratio "${P[*]}" "${RP[*]}")|- (reported)"
    "proxy, pass-through plain, against the relay|$(range "${PL[@]}")|$(range "${RP[@]}") (relay, pass)|$(ratio "${PL[*]}" "${RP[*]}")|- (reported)"
    "proxy, verify-first, against the relay|$(range "${V[@]}")|$(range "${RS[@]}") (relay, spool)|$(ratio "${V[*]}" "${RS[*]}")|- (reported)"
    "store server, plain NAR from disk, 1 stream (8 one after the other)|$(range "${S1[@]}")|$(range "${N1[@]}") (nginx, sendfile)|$(ratio "${S1[*]}" "${N1[*]}")|<= 1.2x"
    "store server, plain NAR from disk, 8 streams|$(range "${S8[@]}")|$(range "${N8[@]}") (nginx, sendfile)|$(ratio "${S8[*]}" "${N8[*]}")|<= 1.2x"
    "store server, .nar.zst (on-the-fly zstd), 1 stream|$(range "${Z[@]}")|$(range "${N1[@]}") (nginx, plain)|$(ratio "${Z[*]}" "${N1[*]}")|- (reported)"
)
for row in "${rows[@]}"; do
    IFS='|' read -r what ours base ratio target <<<"$row"
    echo "| $what | $ours | $base | $ratio | $target |"
    if [ -n "${BENCH_RESULTS:-}" ]; then echo "CPU-s per GiB, $what|$ours|$base|$ratio|$target" >>"$BENCH_RESULTS"; fi
done
