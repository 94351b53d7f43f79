#!/usr/bin/env bash
# Idle cost of one `serve` (issue #27: laptops sleep deeper when idle): a client `serve` alone in
# a network namespace (no peers: a quiet hall of one), after a settling time, over BENCH_SECS:
# its CPU (utime + stime, /proc) and its wake-ups (context switches of all its threads,
# voluntary and not, from /proc/PID/task/*/status). In a hall every received beacon datagram
# adds a wake-up on top (about 58 a second at 300 hosts; bench/hall-serve.sh). Needs root.
#   bench/idle.sh       (BENCH_SECS=20 BENCH_SETTLE=10)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECS:-20}
BENCH_NAME=idle
. bench/hosts.sh
nix-store --generate-binary-cache-key bench-idle-1 "$D/sk" "$D/pk"
lan_up solo
start_client solo "$(cat "$D/pk")"
sleep "${BENCH_SETTLE:-10}"
switches() { cat /proc/"$CLIENT_PID"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
ticks() { awk '{print $14 + $15}' /proc/"$CLIENT_PID"/stat; }
s0=$(switches); t0=$(ticks)
sleep "$SECS"
s1=$(switches); t1=$(ticks)
threads=$(ls /proc/"$CLIENT_PID"/task | wc -l)
awk -v s=$((s1 - s0)) -v t=$((t1 - t0)) -v secs="$SECS" -v k="$(getconf CLK_TCK)" -v th="$threads" 'BEGIN {
    printf "idle serve, no peers, %d s: CPU %.3f %% of a core, %.1f wake-ups a second (%d threads)\n", secs, 100 * t / k / secs, s / secs, th }'
if [ -n "${BENCH_RESULTS:-}" ]; then
    awk -v s=$((s1 - s0)) -v secs="$SECS" 'BEGIN { printf "idle serve, no peers: wake-ups a second|%.1f|-|-|a few\n", s / secs }' >>"$BENCH_RESULTS"
fi
