#!/usr/bin/env bash
# Proxy overhead: `nix-store -r` of a 1 GiB path on a client host, straight from a peer's store
# server vs through the client's own proxy (which finds the peer by beacon, spools and verifies).
# Two hosts in network namespaces (needs root); the peer's link is shaped with tc tbf (1 Gbit/s by
# default), then measured once more unshaped. Everything it starts is killed by PID on exit and
# the namespaces are deleted.
#   bench/proxy.sh      (BENCH_BIG_MIB=1024 BENCH_RATE=1gbit)
set -euo pipefail
cd "$(dirname "$0")/.."
BIG_MIB=${BENCH_BIG_MIB:-1024}
RATE=${BENCH_RATE:-1gbit}
BENCH_NAME=pbench
. bench/hosts.sh

echo "building a $BIG_MIB MiB path..." >&2
cat > "$D/big.nix" <<NIX
builtins.derivation { name = "lnc-bench-big-$BIG_MIB"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "head -c \$((1024 * 1024 * $BIG_MIB)) /dev/urandom > \$out" ]; PATH = "/usr/bin:/bin"; }
NIX
nix-store --generate-binary-cache-key bench-hydra-1 "$D/sk" "$D/pk"
PK=$(cat "$D/pk")
BIG=$(nix-build "$D/big.nix" --no-out-link 2>/dev/null)
# Real binaries (a copy of /usr/lib/x86_64-linux-gnu, about 1 GB as a NAR): compressible, unlike
# the random bytes, as real closures are.
cat > "$D/real.nix" <<'NIX'
builtins.derivation { name = "lnc-bench-usrlib"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "mkdir $out && cp -a /usr/lib/x86_64-linux-gnu/. $out/ 2>/dev/null; find $out ! -type f ! -type d ! -type l -delete; true" ];
  PATH = "/usr/bin:/bin"; }
NIX
REAL=$(nix-build "$D/real.nix" --no-out-link 2>/dev/null)
# Three small paths the client realises through its proxy before the rows: the peer delivers
# three NARs that verify and is proven, so the rows measure pass-through (issue #16), as a LAN
# peer in use is. BENCH_PROVE=0 leaves it unproven: the rows then measure verify-first.
cat > "$D/warm.nix" <<'NIX'
map (i: builtins.derivation { name = "lnc-bench-warm-${toString i}"; system = builtins.currentSystem;
  builder = "/bin/sh"; args = [ "-c" "echo warm ${toString i} > $out" ]; PATH = "/usr/bin:/bin"; }) [ 1 2 3 ]
NIX
WARM=$(nix-build "$D/warm.nix" --no-out-link 2>/dev/null)
# shellcheck disable=SC2086
nix copy --to "file://$D/cache?secret-key=$D/sk&compression=none" "$BIG" "$REAL" $WARM 2>/dev/null
# shellcheck disable=SC2086
nix copy --from "file://$D/cache" --to "$D/peer" --option trusted-public-keys "$PK" "$BIG" "$REAL" $WARM 2>/dev/null
# A second peer with the random path, for the split-fetch row.
nix copy --from "file://$D/cache" --to "$D/peer2" --option trusted-public-keys "$PK" "$BIG" 2>/dev/null
rm -rf "$D/cache"

lan_up peer client peer2
start_peer peer "$D/peer" "$PK"
start_client client "$PK"
wait_narinfo client "http://127.0.0.1:8381/$(basename "$BIG" | cut -c1-32).narinfo"
if [ "${BENCH_PROVE:-1}" = 1 ]; then
    for w in $WARM; do realise client "http://127.0.0.1:8381" "$PK" "$w" >/dev/null; done
    ip netns exec "$NS-client" curl -sf http://127.0.0.1:8381/status.json | grep -q '"proven":true' ||
        { echo "the peer did not become proven after three verified NARs" >&2; exit 1; }
    echo "peer proven (three verified NARs): the rows measure pass-through" >&2
fi

row() { # label [path] -> table row
    local direct proxy mib
    direct=$(realise client "http://10.88.0.1:8380" "$PK" "${2:-$BIG}")
    proxy=$(realise client "http://127.0.0.1:8381" "$PK" "${2:-$BIG}")
    if [ -n "${BENCH_RESULTS:-}" ]; then
        awk -v l="$1" -v d="$direct" -v p="$proxy" 'BEGIN {
            t = (l ~ /shaped/ && l !~ /unshaped/ && l !~ /two peers/) ? ">= 0.9x" : "- (reported)"
            printf "nix-store -r via proxy, %s|%.2f s|%.2f s (direct from peer)|%.2fx|%s\n", l, p, d, d / p, t }' >> "$BENCH_RESULTS"
    fi
    mib=$(( $(nix path-info --store "$D/peer" -S "${2:-$BIG}" 2>/dev/null | awk '{print $2}') / 1048576 ))
    awk -v l="$1" -v d="$direct" -v p="$proxy" -v mib="$mib" 'BEGIN {
        printf "| %s | %.2f s (%.0f MB/s) | %.2f s (%.0f MB/s) | %.2fx |\n", l, p, mib*1.048576/p, d, mib*1.048576/d, d / p }'
}
echo "realising $BIG_MIB MiB..." >&2
echo
echo "| link | via proxy | direct from the peer | ratio (direct time / proxy time) |"
echo "|---|---|---|---|"
shape peer "$RATE"
row "$BIG_MIB MiB random bytes, peer egress shaped to $RATE (tc tbf)"
row "real binaries ($(nix path-info --store "$D/peer" -S "$REAL" | awk '{printf "%.0f MiB", $2/1048576}') NAR), peer egress shaped to $RATE (tc tbf)" "$REAL"
# Two peers with the random path, each behind the same shaping: the proxy splits the NAR.
shape peer2 "$RATE"
start_peer peer2 "$D/peer2" "$PK"
PEER2=$PEER_PID
for _ in $(seq 100); do
    [ "$(ip netns exec "$NS-client" curl -sf http://127.0.0.1:8381/status.json | grep -o '"node"' | wc -l)" = 2 ] && break; sleep 0.1
done
row "$BIG_MIB MiB random bytes, two peers each shaped to $RATE (split fetch; direct = one peer)"
kill "$PEER2"; sleep 0.5
shape peer2 off
shape peer off
row "$BIG_MIB MiB random bytes, unshaped veth"
echo
echo "narinfo latency (in-process fake peers on loopback):"
LAT=$(HOME=$ORIG_HOME cargo test --release --locked -q --test it proxy::bench_narinfo_latency_16_peers -- --ignored --nocapture 2>&1 \
    | grep -o "BENCH.*" || echo "BENCH (the latency test failed; run: cargo test --release --test it proxy::bench_narinfo_latency_16_peers -- --ignored --nocapture)")
echo "  ${LAT#BENCH }"
if [ -n "${BENCH_RESULTS:-}" ]; then
    p99=$(echo "$LAT" | sed -E 's/.*proxy p50 [0-9.]+ ms p99 ([0-9.]+) ms.*/\1/')
    base=$(echo "$LAT" | sed -E 's/.*alone p50 [0-9.]+ ms p99 ([0-9.]+) ms.*/\1/')
    diff=$(echo "$LAT" | sed -E 's/.*p99 difference ([+-][0-9.]+) ms.*/\1/')
    echo "narinfo p99, 16 peers (4 dead, 4 slow 1 s)|$p99 ms|$base ms (fastest honest peer alone)|$diff ms|<= +50 ms" >> "$BENCH_RESULTS"
fi
echo
echo "client proxy log (NAR lines):"
grep -a 'NAR' "$D/client.log" | sed 's/^/  /' | tail -4
