#!/usr/bin/env bash
# Store server vs nginx serving a `nix copy --to file://` copy of the same paths, side by side on
# loopback. Prints one table of ratios. Everything it starts is killed by PID on exit; all load is
# on 127.0.0.1 and bounded in time.
#
#   bench/store-server.sh            (BENCH_SECS=10 BENCH_PATHS=300 BENCH_BIG_MIB=1024 to change)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/nginx.sh
SECS=${BENCH_SECS:-10}
NPATHS=${BENCH_PATHS:-300}
BIG_MIB=${BENCH_BIG_MIB:-1024}
STREAMS=${BENCH_STREAMS:-8}
export PATH=/usr/bin:/bin:$HOME/.cargo/bin:$PATH
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command'

for p in nix-bin nginx-light wrk curl; do
    dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null; }
done
# The same static release binary `./run serve` runs and newcomers download.
BIN=${BENCH_BIN:-$(./run build -q)}

D=$(mktemp -d /tmp/lnc-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
export HOME=$D/home; mkdir -p "$HOME"

# Fixture: NPATHS small paths in a chain of references, one BIG_MIB path of random bytes.
cat > "$D/fixture.nix" <<NIX
let
  mk = name: script: builtins.derivation { inherit name; system = builtins.currentSystem;
    builder = "/bin/sh"; args = [ "-c" script ]; PATH = "/usr/bin:/bin"; };
  small = builtins.genList (i: mk "lnc-bench-\${toString i}" "mkdir \$out; seq 1 \${toString (100 + i * 7)} > \$out/data; echo \${toString i} > \$out/id") $NPATHS;
  big = mk "lnc-bench-big-$BIG_MIB" "head -c \$((1024 * 1024 * $BIG_MIB)) /dev/urandom > \$out";
in small ++ [ big ]
NIX
echo "building fixture ($NPATHS small paths, one $BIG_MIB MiB path)..." >&2
nix-store --generate-binary-cache-key bench-hydra-1 "$D/sk" "$D/pk"
mapfile -t PATHS_ < <(nix-build "$D/fixture.nix" --no-out-link 2>/dev/null)
BIG=${PATHS_[-1]}
nix copy --to "file://$D/cache?secret-key=$D/sk&compression=none" "${PATHS_[@]}" 2>/dev/null
chmod 755 "$D"; chmod -R a+rX "$D/cache"
nix copy --from "file://$D/cache" --to "$D/store" --option trusted-public-keys "$(cat "$D/pk")" "${PATHS_[@]}" 2>/dev/null

NIX_DAEMON_SOCKET_PATH=$D/daemon.sock nix-daemon --store "$D/store" >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 100); do [ -S "$D/daemon.sock" ] && break; sleep 0.05; done

OURS=127.0.0.1:18480
NGINX=127.0.0.1:18481
# NARs from disk, as `serve` does by default with the system store; BENCH_VIA_DAEMON=1 streams
# them through the daemon's NarFromPath instead.
if [ -n "${BENCH_VIA_DAEMON:-}" ]; then REAL=none; else REAL=$D/store/nix/store; fi
RUST_LOG=warn "$BIN" serve --no-beacon --store "unix://$D/daemon.sock" --listen "$OURS" --real-store-dir "$REAL" \
    --trusted-public-key "$(cat "$D/pk")" >"$D/serve.log" 2>&1 & SERVE_PID=$!; PIDS+=($SERVE_PID)
nginx_conf "$D" "$NGINX" auto 1024 "$D/cache"
nginx -c "$D/nginx.conf" -g 'daemon off;' & PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://$OURS/nix-cache-info" >/dev/null && curl -sf "http://$NGINX/nix-cache-info" >/dev/null && break; sleep 0.1; done
# Wait for the index scan to cover every path.
for _ in $(seq 100); do grep -q "servable" "$D/serve.log" 2>/dev/null && break; curl -sf "http://$OURS/$(basename "$BIG" | cut -c1-32).narinfo" >/dev/null && break; sleep 0.1; done

# wrk script: rotate over the narinfo URLs of the small paths.
{
    echo "paths = {"
    for p in "${PATHS_[@]:0:$NPATHS}"; do echo "  \"/$(basename "$p" | cut -c1-32).narinfo\","; done
    echo "}"
    cat <<'LUA'
i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
LUA
} > "$D/rotate.lua"
# Every URL answers 200 on both (a 404 would be a cheap answer).
for p in "${PATHS_[@]:0:$NPATHS}"; do
    h=$(basename "$p" | cut -c1-32)
    curl -sf -o /dev/null "http://$OURS/$h.narinfo" || { echo "ours misses $p" >&2; exit 1; }
done

wrk_run() { # URL -> "req/s p99ms"
    wrk -t1 -c64 -d"${SECS}s" --latency -s "$D/rotate.lua" "http://$1" > "$D/wrk.out"
    if grep -q "Non-2xx" "$D/wrk.out"; then echo "wrk saw errors against $1" >&2; cat "$D/wrk.out" >&2; exit 1; fi
    rps=$(awk '/Requests\/sec/ {print $2}' "$D/wrk.out")
    p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$D/wrk.out")
    echo "$rps $p99"
}
echo "narinfo load (wrk, 64 connections, ${SECS}s each)..." >&2
read -r OURS_RPS OURS_P99 < <(wrk_run "$OURS")
read -r NGINX_RPS NGINX_P99 < <(wrk_run "$NGINX")

BH=$(basename "$BIG" | cut -c1-32)
OURS_NAR=http://$OURS/$(curl -sf "http://$OURS/$BH.narinfo" | awk '/^URL:/ {print $2}')
NGINX_NAR=http://$NGINX/$(curl -sf "http://$NGINX/$BH.narinfo" | awk '/^URL:/ {print $2}')
one_stream() { curl -sf -o /dev/null -w '%{speed_download}' "$1" | awk '{printf "%.0f", $1 / 1e6}'; }
many_streams() { # URL -> aggregate MB/s over STREAMS parallel downloads
    local t0 t1
    t0=$(date +%s.%N)
    for _ in $(seq "$STREAMS"); do curl -sf -o /dev/null "$1" & done
    wait_curls
    t1=$(date +%s.%N)
    awk -v n="$STREAMS" -v mib="$BIG_MIB" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", n * mib * 1048576 / (b - a) / 1e6}'
}
wait_curls() { for j in $(jobs -p); do case " ${PIDS[*]} " in *" $j "*) ;; *) wait "$j";; esac; done; }
echo "NAR streams ($BIG_MIB MiB)..." >&2
OURS_1=$(one_stream "$OURS_NAR"); NGINX_1=$(one_stream "$NGINX_NAR")
OURS_N=$(many_streams "$OURS_NAR"); NGINX_N=$(many_streams "$NGINX_NAR")
OURS_RSS=$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$SERVE_PID/status")
NGINX_RSS=$(for p in $(pgrep -f "nginx: worker process" ) $(cat "$D/nginx/nginx.pid"); do awk '/VmHWM/ {print $2}' "/proc/$p/status"; done | awk '{s+=$1} END {printf "%.1f", s / 1024}')

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2fx", a / b}'; }
echo
echo "NARs read: $( [ "$REAL" = none ] && echo "through the nix-daemon" || echo "from disk")"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); wrk -t1 -c64 -d${SECS}s; $NPATHS paths, $BIG_MIB MiB NAR"
echo
echo "| what | ours | nginx (static file:// cache) | ratio | target |"
echo "|---|---|---|---|---|"
echo "| narinfo req/s (64 conns) | $OURS_RPS | $NGINX_RPS | $(ratio "$OURS_RPS" "$NGINX_RPS") | >= 1.0x |"
echo "| narinfo p99 latency ms | $OURS_P99 | $NGINX_P99 | $(ratio "$OURS_P99" "$NGINX_P99") | - |"
echo "| NAR MB/s, 1 stream | $OURS_1 | $NGINX_1 | $(ratio "$OURS_1" "$NGINX_1") | >= 0.9x |"
echo "| NAR MB/s, $STREAMS streams total | $OURS_N | $NGINX_N | $(ratio "$OURS_N" "$NGINX_N") | >= 0.9x |"
echo "| peak RSS MiB (VmHWM, whole run) | $OURS_RSS | $NGINX_RSS (master+workers) | - | ours <= 32 |"
if [ -n "${BENCH_RESULTS:-}" ]; then
    {
        echo "narinfo req/s, 64 connections (wrk)|$OURS_RPS|$NGINX_RPS (nginx)|$(ratio "$OURS_RPS" "$NGINX_RPS")|>= 1.0x"
        echo "narinfo p99 ms (wrk)|$OURS_P99|$NGINX_P99 (nginx)|$(ratio "$OURS_P99" "$NGINX_P99")|-"
        echo "NAR MB/s, one 1 GiB stream|$OURS_1|$NGINX_1 (nginx)|$(ratio "$OURS_1" "$NGINX_1")|>= 0.9x"
        echo "NAR MB/s, eight 1 GiB streams|$OURS_N|$NGINX_N (nginx)|$(ratio "$OURS_N" "$NGINX_N")|>= 0.9x"
        echo "peak RSS MiB, whole run incl. eight streams|$OURS_RSS|$NGINX_RSS (nginx)|-|<= 32 MiB"
    } >> "$BENCH_RESULTS"
fi
