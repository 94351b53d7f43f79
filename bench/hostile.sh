#!/usr/bin/env bash
# The store server under the attacks of issue #13 and a crowd on one holder: the real `serve`
# (release) on loopback, attackers and clients in the test process from distinct 127.0.0.x
# addresses (tests/it/hostile_store.rs, bench_store_server_under_attack). Prints RSS and threads of
# the serve process: before, peak during, and 5 s after each phase. Bounded: about 90 s.
#   bench/hostile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:/bin:$HOME/.cargo/bin:$PATH
dpkg -s nix-bin >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null; }
# Thousands of sockets on both ends of loopback.
ulimit -n "$(ulimit -Hn)"
out=$(cargo test --release --locked -q --test it -- --ignored --nocapture hostile_store::bench_store_server_under_attack 2>&1) || {
    echo "$out" >&2
    exit 1
}
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo
echo "| phase | outcome | seconds | RSS before MiB | RSS peak MiB | RSS 5 s after MiB | peak threads |"
echo "|---|---|---|---|---|---|---|"
echo "$out" | grep -o "BENCH-HOSTILE|.*" | while IFS='|' read -r _ what ok secs base peak after thr; do
    echo "| $what | $ok | $secs | $base | $peak | $after | $thr |"
    if [ -n "${BENCH_RESULTS:-}" ] && [ "$what" != "baseline: serving, no clients" ]; then
        echo "store server RSS peak MiB: $what ($ok)|$peak|$base (before)|-|<= 256 MiB" >> "$BENCH_RESULTS"
    fi
done
