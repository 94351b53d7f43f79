#!/usr/bin/env bash
# Idle cost of one `serve` (issue #27: laptops sleep deeper when idle): a client `serve` alone in
# a network namespace (no peers: a quiet hall of one), after a settling time, over BENCH_SECS:
# its CPU (utime + stime, /proc) and its wake-ups (voluntary context switches of all its
# threads, from /proc/PID/task/*/status; the figures before issue #27 counted preemptions too). In a hall every received beacon datagram
# adds a wake-up on top (about 58 a second at 300 hosts; bench/hall-serve.sh). Needs root.
# The settling time is long: this client has no nix-daemon, so its store scan fails and is
# retried with a doubling back-off (`server::index`), which dominates the first half minute.
#   bench/idle.sh       (BENCH_SECS=30 BENCH_SETTLE=40)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECS:-30}
BENCH_NAME=idle
. bench/hosts.sh
nix-store --generate-binary-cache-key bench-idle-1 "$D/sk" "$D/pk"
lan_up solo
start_client solo "$(cat "$D/pk")"
sleep "${BENCH_SETTLE:-40}"
# Wake-ups: voluntary context switches (a thread slept and was woken); preemptions are not.
switches() { cat /proc/"$CLIENT_PID"/task/*/status | awk '$1 == "voluntary_ctxt_switches:" {s += $2} END {print s}'; }
ticks() { awk '{print $14 + $15}' /proc/"$CLIENT_PID"/stat; }
s0=$(switches); t0=$(ticks)
sleep "$SECS"
s1=$(switches); t1=$(ticks)
threads=$(ls /proc/"$CLIENT_PID"/task | wc -l)
awk -v s=$((s1 - s0)) -v t=$((t1 - t0)) -v secs="$SECS" -v k="$(getconf CLK_TCK)" -v th="$threads" 'BEGIN {
    printf "idle serve, no peers, %d s: CPU %.3f %% of a core, %.1f wake-ups a second (%d threads)\n", secs, 100 * t / k / secs, s / secs, th }'
if [ -n "${BENCH_RESULTS:-}" ]; then
    awk -v s=$((s1 - s0)) -v t=$((t1 - t0)) -v secs="$SECS" -v k="$(getconf CLK_TCK)" 'BEGIN {
        printf "idle serve, no peers: wake-ups a second|%.1f|11.2 (before #27 event-driven timers)|-|<= 2\n", s / secs
        printf "idle serve, no peers: CPU, %% of a core|%.3f|0.05-0.07 (before #27)|-|<= 1\n", 100 * t / k / secs }' >>"$BENCH_RESULTS"
fi
