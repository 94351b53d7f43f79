#!/usr/bin/env bash
# Before/after of the store server's `.nar.zst` send path: two `serve` binaries (e.g. profiling
# builds of main and of a change) take turns as the peer; the client host downloads the 1 GiB
# random-bytes NAR and the real-binaries NAR (a copy of /usr/lib/x86_64-linux-gnu) as `.nar.zst`
# with curl, unshaped and shaped to 1 Gbit/s. Per download: wall time, the peer's CPU time
# (utime + stime from /proc), bytes on the wire. Needs root; fixtures as bench/proxy.sh builds them.
#   bench/peer-zstd-ab.sh OLD_BIN NEW_BIN     (BENCH_ROUNDS=3 BENCH_RATE=1gbit
#                                              BENCH_FORM=zst, or plain: the NARs uncompressed)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 OLD_BIN NEW_BIN" >&2; exit 2; }
OLD=$1 NEW=$2
ROUNDS=${BENCH_ROUNDS:-3}
RATE=${BENCH_RATE:-1gbit}
FORM=${BENCH_FORM:-zst}
BENCH_NAME=zstd-ab
BENCH_BIN=$NEW
. bench/hosts.sh

cat >"$D/big.nix" <<'NIX'
builtins.derivation { name = "lnc-bench-big-1024"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "head -c $((1024 * 1024 * 1024)) /dev/urandom > $out" ]; PATH = "/usr/bin:/bin"; }
NIX
cat >"$D/real.nix" <<'NIX'
builtins.derivation { name = "lnc-bench-usrlib"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "mkdir $out && cp -a /usr/lib/x86_64-linux-gnu/. $out/ 2>/dev/null; find $out ! -type f ! -type d ! -type l -delete; true" ];
  PATH = "/usr/bin:/bin"; }
NIX
nix-store --generate-binary-cache-key bench-hydra-1 "$D/sk" "$D/pk"
PK=$(cat "$D/pk")
BIG=$(nix-build "$D/big.nix" --no-out-link 2>/dev/null)
REAL=$(nix-build "$D/real.nix" --no-out-link 2>/dev/null)
nix copy --to "file://$D/cache?secret-key=$D/sk&compression=none" "$BIG" "$REAL" 2>/dev/null
nix copy --from "file://$D/cache" --to "$D/peer" --option trusted-public-keys "$PK" "$BIG" "$REAL" 2>/dev/null
rm -rf "$D/cache"
lan_up peer client

zst_url() {
    local h
    h=$(basename "$1" | cut -c1-32)
    echo "http://10.88.0.1:8380/$(ip netns exec "$NS-client" curl -sf "http://10.88.0.1:8380/$h.narinfo" | awk '/^URL:/ {print $2}' | sed "s/\.nar\$/.nar$([ "$FORM" = zst ] && echo .zst)/")"
}
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
echo "| round | binary | link | NAR | wall | peer CPU | bytes on the wire |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
    for which in old new; do
        if [ "$which" = old ]; then BIN=$OLD; else BIN=$NEW; fi
        start_peer peer "$D/peer" "$PK"
        wait_narinfo client "http://10.88.0.1:8380/$(basename "$BIG" | cut -c1-32).narinfo"
        for link in unshaped shaped; do
            [ "$link" = shaped ] && shape peer "$RATE"
            for nar in "$BIG" "$REAL"; do
                u=$(zst_url "$nar")
                c0=$(cpu "$PEER_PID"); t0=$(date +%s.%N)
                size=$(ip netns exec "$NS-client" curl -sf -o /dev/null -w '%{size_download}' "$u")
                t1=$(date +%s.%N); c1=$(cpu "$PEER_PID")
                awk -v r="$round" -v b="$which" -v l="$link" -v n="$(basename "$nar" | cut -c34-)" -v a="$t0" -v z="$t1" \
                    -v c=$((c1 - c0)) -v s="$size" -v hz="$(getconf CLK_TCK)" \
                    'BEGIN {printf "| %d | %s | %s | %s | %.2f s | %.2f s | %.0f MB |\n", r, b, l, n, z - a, c / hz, s / 1e6}'
            done
            [ "$link" = shaped ] && shape peer off
        done
        kill "$PEER_PID" "$PEER_DAEMON_PID"
        wait "$PEER_PID" "$PEER_DAEMON_PID" 2>/dev/null || true
    done
done
