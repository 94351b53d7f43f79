#!/usr/bin/env bash
# Beacon timings in network namespaces (needs root): time until three new hosts are in each
# other's tables (IPv4 and IPv6), and time until a killed host leaves them (300 ms interval).
# Runs the namespace tests RUNS times in release mode and prints min / median / max.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${BENCH_RUNS:-5}
export PATH=$HOME/.cargo/bin:$PATH
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --locked -q --test it --no-run 2>/dev/null
for _ in $(seq "$RUNS"); do
    cargo test --release --locked -q --test it -- --nocapture --test-threads 1 beacon::three_hosts_discover beacon::a_killed_host 2>&1 | grep -oE "(discovery|eviction|removal) .*" >> "$log" || true
done
stats() { # label pattern -> min median max (ms)
    grep -F "$2" "$log" | sed -E 's/.*: (Some\()?([0-9.]+)(ms|µs|s)\)?$/\2 \3/' | awk '
        { v = $1; if ($2 == "µs") v /= 1000; else if ($2 == "s") v *= 1000; print v }' | sort -n | awk -v label="$1" '
        { a[NR] = $1 } END { if (NR == 0) { print "| " label " | no data | | |"; exit }
          printf "| %s | %.1f | %.1f | %.1f |\n", label, a[1], a[int((NR + 1) / 2)], a[NR] }'
}
echo "runs: $(grep -c "^discovery over IPv4" "$log")"
echo
echo "| what (ms) | min | median | max |"
echo "|---|---|---|---|"
stats "3 hosts discover each other, IPv4 (target < 1000)" "discovery over IPv4"
stats "3 hosts discover each other, IPv6 (target < 1000)" "discovery over IPv6"
stats "killed host evicted, interval 300 ms (3 intervals = 900)" "eviction after a kill"
stats "host removed after its goodbye" "removal after a goodbye"
if [ -n "${BENCH_RESULTS:-}" ]; then
    med() { grep -F "$1" "$log" | sed -E 's/.*: (Some\()?([0-9.]+)(ms|µs|s)\)?$/\2 \3/' | awk '
        { v = $1; if ($2 == "µs") v /= 1000; else if ($2 == "s") v *= 1000; print v }' | sort -n | awk '
        { a[NR] = $1 } END { if (NR) printf "%.1f", a[int((NR + 1) / 2)] }'; }
    echo "time until new hosts are in each other's tables (3 hosts, IPv4, median)|$(med "discovery over IPv4") ms|-|-|< 1000 ms" >> "$BENCH_RESULTS"
    echo "time until new hosts are in each other's tables (3 hosts, IPv6, median)|$(med "discovery over IPv6") ms|-|-|< 1000 ms" >> "$BENCH_RESULTS"
    echo "time until a killed host leaves (interval 300 ms, median)|$(med "eviction after a kill") ms|-|-|<= 900 ms"  >> "$BENCH_RESULTS"
fi
