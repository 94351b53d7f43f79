# Shared by bench/proxy.sh and bench/closure.sh (sourced, not run): hosts in network namespaces
# on one bridge, each peer a chroot store with its own nix-daemon and a real `serve`, a client
# whose `serve` proxy finds the peers by beacon, and a timed `nix-store -r` on the client.
# Everything started is recorded in PIDS and killed by PID on exit; the namespaces and the work
# directory are deleted. Needs root.
#
# After sourcing: D (work directory), NS (namespace prefix), PIDS, BIN (the release binary),
# HOME (a fresh one under D; the caller's is in ORIG_HOME).

export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$HOME/.cargo/bin:$PATH
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command'

# need_packages PKG...: installs missing Debian packages.
need_packages() {
    local p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null; }
    done
}
need_packages nix-bin iproute2 curl
# The same static release binary `./run serve` runs and newcomers download (BENCH_BIN: another
# binary, e.g. an older build for a before/after).
BIN=${BENCH_BIN:-$(./run build -q)}

D=$(mktemp -d "/tmp/lnc-${BENCH_NAME:-bench}.XXXXXX")
NS=lnc$$
PIDS=()
HOSTS=()
cleanup() {
    local p n
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in "${HOSTS[@]}" br; do ip netns del "$NS-$n" 2>/dev/null || true; done
    rm -rf "$D"
}
trap cleanup EXIT
ORIG_HOME=$HOME
export HOME=$D/home
mkdir -p "$HOME"

# lan_up HOST...: one namespace per host on a bridge; the Nth host gets 10.88.0.N on its eth0.
lan_up() {
    local i=1 h
    ip netns add "$NS-br"
    ip -n "$NS-br" link add br0 type bridge mcast_snooping 0
    ip -n "$NS-br" link set br0 up
    for h in "$@"; do
        HOSTS+=("$h")
        ip netns add "$NS-$h"
        ip -n "$NS-$h" link add eth0 type veth peer name vb$i netns "$NS-br"
        ip -n "$NS-br" link set vb$i master br0 up
        ip -n "$NS-$h" addr add 10.88.0.$i/24 dev eth0
        ip -n "$NS-$h" link set eth0 up
        ip -n "$NS-$h" link set lo up
        ip -n "$NS-$h" route add 224.0.0.0/4 dev eth0
        i=$((i + 1))
    done
}

# shape HOST RATE | shape HOST off: tc tbf (burst 1mb, latency 50ms) on the host's egress, for
# everything but UDP. The beacon's datagrams (a few hundred bytes a second) bypass it in their own
# HTB class: in a tbf queue kept full by a NAR transfer they were dropped for more than three
# announce intervals, and the client's proxy forgot the peer in the middle of a run (seen in
# bench/proxy.sh on 2026-11-26). This kernel has htb, tbf and u32, not prio.
shape() {
    local tc="ip netns exec $NS-$1 tc"
    if [ "$2" = off ]; then
        $tc qdisc del dev eth0 root
        return
    fi
    $tc qdisc add dev eth0 root handle 1: htb default 20
    $tc class add dev eth0 parent 1: classid 1:10 htb rate 100mbit quantum 60000 prio 0
    $tc class add dev eth0 parent 1: classid 1:20 htb rate 10gbit quantum 60000 prio 1
    $tc qdisc add dev eth0 parent 1:20 handle 20: tbf rate "$2" burst 1mb latency 50ms
    $tc filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip protocol 17 0xff flowid 1:10
    $tc filter add dev eth0 parent 1: protocol ipv6 prio 2 u32 match ip6 protocol 17 0xff flowid 1:10
}

# start_peer HOST STORE PUBKEY: the host's nix-daemon on STORE and its `serve` on :8380.
# Sets PEER_PID (the serve process) and PEER_DAEMON_PID.
start_peer() {
    local host=$1 store=$2 pk=$3
    rm -f "$D/$host.sock"
    NIX_DAEMON_SOCKET_PATH=$D/$host.sock nix-daemon --store "$store" >/dev/null 2>&1 &
    PEER_DAEMON_PID=$!
    PIDS+=($!)
    for _ in $(seq 100); do [ -S "$D/$host.sock" ] && break; sleep 0.05; done
    [ -S "$D/$host.sock" ] || { echo "nix-daemon of $host did not start" >&2; return 1; }
    ip netns exec "$NS-$host" "$BIN" serve --store "unix://$D/$host.sock" --real-store-dir "$store/nix/store" \
        --listen 0.0.0.0:8380 --interface eth0 --upstream none --trusted-public-key "$pk" >"$D/$host.log" 2>&1 &
    PEER_PID=$!
    PIDS+=($PEER_PID)
}

# start_client HOST PUBKEY: a `serve` without a store of its own, whose proxy (127.0.0.1:8381)
# finds peers by beacon (BENCH_CLIENT_ARGS: more `serve` flags, e.g. --peer-compression none).
# Sets CLIENT_PID.
start_client() {
    local host=$1 pk=$2
    # shellcheck disable=SC2086
    ip netns exec "$NS-$host" "$BIN" serve --store "unix://$D/none.sock" --listen 0.0.0.0:8380 --interface eth0 \
        --upstream none --trusted-public-key "$pk" --spool-dir "${BENCH_SPOOL_DIR:-$D/spool}" ${BENCH_CLIENT_ARGS:-} \
        >>"$D/$host.log" 2>&1 &
    CLIENT_PID=$!
    PIDS+=($CLIENT_PID)
}

# wait_narinfo HOST URL: until URL answers 200 from inside HOST (at most 60 s: a proxy asked
# before its beacon heard the peer remembers the miss for 5 s, and a lost announce costs one
# announce interval).
wait_narinfo() {
    local i
    for i in $(seq 600); do
        ip netns exec "$NS-$1" curl -sf -m 2 "$2" >/dev/null && return 0
        sleep 0.1
    done
    echo "no answer from $2 in host $1 after 60 s" >&2
    return 1
}

# realise HOST SUBSTITUTER PUBKEY PATH [NIX OPTIONS...]: seconds for `nix-store -r PATH` in a fresh
# chroot store (in REALISE_DIR, default D) on HOST with SUBSTITUTER only. Fails (non-zero, no
# figure) if Nix failed or PATH's closure is not complete in the store afterwards.
realise() {
    local host=$1 subst=$2 pk=$3 path=$4
    shift 4
    local store=${REALISE_DIR:-$D}/c-realise t0 t1 rc=0
    rm -rf "$store" "$HOME/.cache"
    # The last realisation's dirty pages written back now, not during this one's timing.
    sync
    t0=$(date +%s.%N)
    ip netns exec "$NS-$host" env HOME="$HOME" nix-store --store "$store" -r "$path" \
        --option substituters "$subst" --option trusted-public-keys "$pk" "$@" >"$D/realise.log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    if [ "$rc" -ne 0 ]; then
        echo "nix-store -r $path from $subst failed ($rc):" >&2
        tail -5 "$D/realise.log" >&2
        echo "the last lines of $host's serve log:" >&2
        tail -8 "$D/$host.log" >&2 2>/dev/null || true
        return 1
    fi
    # A valid path has a valid closure (Nix registers references first).
    if ! nix-store --store "$store" --check-validity "$path" 2>/dev/null; then
        echo "after nix-store -r, $path is not valid in $store" >&2
        return 1
    fi
    rm -rf "$store"
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}'
}
