#!/usr/bin/env bash
# Where the CPU goes when a peer sends a large NAR: `perf record` (flat, per symbol) of the peer's
# store server while a client downloads its 1 GiB random-bytes NAR plain and as `.nar.zst`, and of
# both `serve` processes while the client realises the path through its proxy. Unshaped veth,
# hosts as in bench/proxy.sh. Needs root and linux-perf.
#   bench/profile.sh [BIN]   (BIN: a `cargo build --profile profiling` binary; default: builds it)
#   BENCH_BIG_MIB=1024 BENCH_PERF_TOP=12
set -euo pipefail
cd "$(dirname "$0")/.."
BIG_MIB=${BENCH_BIG_MIB:-1024}
TOP_N=${BENCH_PERF_TOP:-12}
BENCH_NAME=profile
. bench/hosts.sh
need_packages linux-perf
if [ -n "${1:-}" ]; then
    BIN=$1
else
    (HOME=$ORIG_HOME cargo build --profile profiling --locked -q)
    BIN=$PWD/target/profiling/local-nix-cache
fi

cat >"$D/big.nix" <<NIX
builtins.derivation { name = "lnc-bench-big-$BIG_MIB"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "head -c \$((1024 * 1024 * $BIG_MIB)) /dev/urandom > \$out" ]; PATH = "/usr/bin:/bin"; }
NIX
nix-store --generate-binary-cache-key bench-hydra-1 "$D/sk" "$D/pk"
PK=$(cat "$D/pk")
BIG=$(nix-build "$D/big.nix" --no-out-link 2>/dev/null)
nix copy --to "file://$D/cache?secret-key=$D/sk&compression=none" "$BIG" 2>/dev/null
nix copy --from "file://$D/cache" --to "$D/peer" --option trusted-public-keys "$PK" "$BIG" 2>/dev/null
rm -rf "$D/cache"

lan_up peer client
start_peer peer "$D/peer" "$PK"
PEER=$PEER_PID
start_client client "$PK"
H=$(basename "$BIG" | cut -c1-32)
wait_narinfo client "http://127.0.0.1:8381/$H.narinfo"
URL=http://10.88.0.1:8380/$(ip netns exec "$NS-client" curl -sf "http://10.88.0.1:8380/$H.narinfo" | awk '/^URL:/ {print $2}')

# profile LABEL NAME:PID[,NAME:PID] COMMAND...: one perf per process over the command's run; per
# process its CPU seconds (samples / frequency) and its top symbols; and the CPU seconds of the
# command itself with its children (for `nix-store -r`: Nix's download and import).
FREQ=499
profile() {
    local label=$1 procs=$2 t0 t1 p perfs=()
    shift 2
    for p in ${procs//,/ }; do
        perf record -q -F $FREQ -o "$D/perf.${p%%:*}" -p "${p#*:}" 2>/dev/null &
        perfs+=($!)
    done
    sleep 0.3
    t0=$(date +%s.%N)
    local TIMEFORMAT='%U %S'
    { time "$@" >/dev/null; } 2>"$D/times"
    t1=$(date +%s.%N)
    kill -INT "${perfs[@]}"
    wait "${perfs[@]}" || true
    echo
    echo "== $label: $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f s", b - a}') wall, the command itself \
$(tail -1 "$D/times" | awk '{printf "%.2f CPU-s (user %.2f, system %.2f)", $1 + $2, $1, $2}')"
    for p in ${procs//,/ }; do
        perf report -i "$D/perf.${p%%:*}" -n --no-children --sort dso,symbol --stdio 2>/dev/null >"$D/report"
        echo "-- ${p%%:*}: $(awk -v f=$FREQ '/^# Samples:/ {n = $3; if (n ~ /K$/) {sub(/K/, "", n); n *= 1000}; printf "%.2f CPU-s", n / f}' "$D/report")"
        grep -v '^#' "$D/report" | grep -v '^$' | head -"$TOP_N" | awk '{$2 = ""; print "  " $0}' | cut -c1-120
    done
}
fetch() { ip netns exec "$NS-client" curl -sf -o /dev/null "$1"; }
profile "peer store server, plain NAR to curl" "peer:$PEER" fetch "$URL"
profile "peer store server, .nar.zst to curl" "peer:$PEER" fetch "${URL%.nar}.nar.zst"
profile "nix-store -r through the proxy" "peer:$PEER,client:$CLIENT_PID" \
    realise client "http://127.0.0.1:8381" "$PK" "$BIG"
echo
echo "client proxy log:"
grep -a 'NAR' "$D/client.log" | sed 's/^/  /' | tail -2
