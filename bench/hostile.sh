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

# Issue #25: `GET /identity` as a CPU lever. The real `serve` (beacon on loopback only, so it
# signs proofs) flooded with pipelined proof requests for 10 s from 1 address, then 16, while an
# honest client asks narinfo (tests/it/hostile_store.rs, bench_identity_flood). About 40 s.
out=$(cargo test --release --locked -q --test it -- --ignored --nocapture hostile_store::bench_identity_flood 2>&1) || {
    echo "$out" >&2
    exit 1
}
echo
echo "| phase (10 s) | honest narinfo p50 ms | p99 ms | store server cores | proofs/s | refused/s |"
echo "|---|---|---|---|---|---|"
echo "$out" | grep -o "BENCH-IDENTITY|.*" | while IFS='|' read -r _ what p50 p99 cores ok refused n; do
    echo "| $what | $p50 | $p99 | $cores | $ok | $refused |"
    if [ "$what" = "no flood" ]; then
        echo "$p99" > "${TMPDIR:-/tmp}/lnc-identity-base"
    elif [ -n "${BENCH_RESULTS:-}" ]; then
        base_p99=$(cat "${TMPDIR:-/tmp}/lnc-identity-base" 2>/dev/null || echo "-")
        echo "honest narinfo p99 under a $what|$p99 ms|$base_p99 ms (no flood)|-|<= 5 ms" >> "$BENCH_RESULTS"
        echo "store server CPU under a $what|$cores cores|18,000 proofs/s, 1.3 cores (before #25)|-|<= 1 core" >> "$BENCH_RESULTS"
    fi
done
rm -f "${TMPDIR:-/tmp}/lnc-identity-base"
