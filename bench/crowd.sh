#!/usr/bin/env bash
# The keynote flash crowd (issue #24; needs root and Nix): tests/it/crowd.rs's bench_crowd, in
# release mode, once per scenario. Real `serve` hosts in network namespaces (one per namespace,
# each with its chroot store, nix-daemon and real Nix client; every second host runs Nix 2.26 when
# `./run nix-root` built it), every host's egress shaped to 200 Mbit/s with tc tbf. One path P of
# random bytes is held by one host H at the start; T1 = one more host realising P alone through
# its proxy (then it leaves); then N clients run `nix-store -r P` at once through their own
# proxies. Per wave: all done (and as a multiple of T1), bytes each host put on its link (eth0's
# transmit counter, as a multiple of P: the holder's and the largest), NARs per source (the
# proxies' recent transfers), failed realisations, and the GETs the upstream answered.
# Scenarios (BENCH_CROWD_SCENARIOS, default "12 24+24 40 40up"): N[@MIB][+WAVE2][up]; MIB
# defaults to 64 (16 from 40 clients up, as the issue measured). "24+24": a second wave of 24,
# 10 s after the first is all done. "up": the proxies have the upstream (shaped too); otherwise
# none (an offline hall). BENCH_CROWD_LOGS=DIR keeps the logs (and every host's serve log, in
# DIR/serve-SCENARIO); the CPU column is the machine's CPU time busy during the wave (/proc/stat;
# every host shares this machine's cores); BENCH_CROWD_UNTIL=EPOCH_SECONDS
# starts no scenario after that time; BENCH_CROWD_RATE (200mbit) shapes every link to another
# rate (a slower one spreads the same CPU work over more time: on this 2-core machine it tells a
# crowd limited by the cores from one limited by the links). Each scenario bounds itself (the LAN settles within 150 s,
# T1 within 120 s, each wave within CROWD_LIMIT_S, 240 s: then its clients are killed and count
# as failed), so the test's own drop kills its processes by PID and deletes its namespaces (an
# outer `timeout` would kill cargo and orphan them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$HOME/.cargo/bin:$PATH
dpkg -s nix-bin >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin >/dev/null; }
SCENARIOS=${BENCH_CROWD_SCENARIOS:-12 24+24 40 40up}
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
for s in $SCENARIOS; do
    n=${s%%[@+u]*}
    mib=64
    [ "$n" -lt 40 ] || mib=16
    case $s in *@*) mib=${s#*@}; mib=${mib%%[+u]*} ;; esac
    wave2=0
    case $s in *+*) wave2=${s#*+}; wave2=${wave2%%u*} ;; esac
    up=0
    case $s in *up) up=1 ;; esac
    if [ -n "${BENCH_CROWD_UNTIL:-}" ] && [ "$(date +%s)" -ge "$BENCH_CROWD_UNTIL" ]; then
        echo "crowd scenario $s skipped: past BENCH_CROWD_UNTIL" >&2
        continue
    fi
    serve_logs=
    if [ -n "${BENCH_CROWD_LOGS:-}" ]; then
        serve_logs="$BENCH_CROWD_LOGS/serve-$s"
        mkdir -p "$serve_logs"
    fi
    if ! CROWD_RATE=${BENCH_CROWD_RATE:-200mbit} CROWD_N=$n CROWD_MIB=$mib CROWD_WAVE2=$wave2 CROWD_UPSTREAM=$up CROWD_SERVE_LOGS=$serve_logs \
        cargo test --release --locked -q --test it -- --ignored --nocapture --exact crowd::bench_crowd \
        >"$out/log-$s" 2>&1; then
        echo "crowd scenario $s failed:" >&2
        grep -v '^ *at \|^ *[0-9]*: ' "$out/log-$s" | tail -20 >&2
    fi
    grep '^BENCH-CROWD|' "$out/log-$s" >"$out/$s" || true
    echo "mib|$mib" | sed 's/^/BENCH-CROWD|/' >>"$out/$s"
    [ -z "${BENCH_CROWD_LOGS:-}" ] || cp "$out/log-$s" "$BENCH_CROWD_LOGS/crowd-$s.log"
done
get() { # scenario key
    v=$(awk -F'|' -v k="$2" '$2 == k { print $3 }' "$out/$1" 2>/dev/null)
    echo "${v:-—}"
}
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg); every link ${BENCH_CROWD_RATE:-200mbit} (tc tbf)"
echo
echo "| crowd at once | P | T1 | all done | × T1 | holder sent | most any host sent | NARs per source | failures | upstream | CPU busy |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
echo "| before (issue 24): 12 | 64 MiB | 3.0 s | 34 s | 11 | 12.1 × P | 12.1 × P (H) | H: 12 | 0 | — | — |"
echo "| before (issue 24): 24 | 64 MiB | 3.0 s | 69 s | 23 | 24.1 × P | 24.1 × P (H) | H: 24 | 0 | — | — |"
echo "| before (issue 24): 40, no upstream | 16 MiB | — | 24 s for 32 of them | — | 32 × P | 32 × P (H) | H: 32 | 8 of 40 | — | — |"
echo "| before (issue 24): second wave of 24 | 64 MiB | 3.0 s | 17 s | — | 0.5 × P | 4.8 × P (two first-wave hosts) | split 4 ways | 0 | — | — |"
for s in $SCENARIOS; do
    for w in w1 w2; do
        [ "$(get "$s" "${w}_clients")" != "—" ] || continue
        label="$s: $(get "$s" "${w}_clients")"
        [ "$w" = w1 ] || label="$s: second wave of $(get "$s" w2_clients), 10 s after"
        fails="$(get "$s" "${w}_failed") of $(get "$s" "${w}_clients")"
        echo "| $label | $(get "$s" mib) MiB | $(get "$s" t1_s) s | $(get "$s" "${w}_all_done_s") s (median $(get "$s" "${w}_median_done_s") s) | $(get "$s" "${w}_all_done_t1") | $(get "$s" "${w}_holder_xp") × P | $(get "$s" "${w}_max_xp"); $(get "$s" "${w}_hosts_over_2p") hosts over 2 × P; all hosts $(get "$s" "${w}_total_xp") × P | $(get "$s" "${w}_sources") | $fails | $(get "$s" "${w}_upstream") | $(get "$s" "${w}_cpu_busy_pct") % |"
        if [ -n "${BENCH_RESULTS:-}" ]; then
            echo "flash crowd $label on one holder: all done (x T1)|$(get "$s" "${w}_all_done_t1")|23 (issue 24, 24 at once)|-|<= 3 (24), <= 4 log2(N) (40, 100)" >>"$BENCH_RESULTS"
            echo "flash crowd $label: holder sent (x P)|$(get "$s" "${w}_holder_xp")|N (issue 24: a star)|-|<= 3" >>"$BENCH_RESULTS"
            echo "flash crowd $label: failed realisations|$fails|8 of 40 (issue 24)|-|0" >>"$BENCH_RESULTS"
        fi
    done
done
