#!/usr/bin/env bash
# A whole closure of real binaries, realised on a client three ways side by side: straight from a
# peer's store server, through the client's own proxy, and from nginx serving a static binary
# cache copy of the same closure on the peer host (compression none and zstd, as `nix copy --to
# file://` writes them). First with the peer's egress shaped by tc tbf (1 Gbit/s by default),
# then unshaped. Nix's own parallelism: `nix-store -r TOP` with Nix's defaults (Nix 2.8 runs one
# substitution at a time: they share max-jobs = 1), then with --max-jobs 16 (what Nix >= 2.16's
# max-substitution-jobs = 16 does by default). A fresh proxy for each realisation.
#
# The closure (built by Nix with builder = /bin/sh, copying subsets of /usr/lib, /usr/share and
# /usr/bin of this machine): ~300 paths, most of a few KiB to 1 MiB, 30 of about 1-20 MiB, 3 of
# 60-210 MiB, each referencing up to 3 others, and a top path that references every path nobody else
# references, so its closure is the whole set. The size distribution is printed.
# Needs root (namespaces, tc); everything started is killed by PID on exit.
#   bench/closure.sh    (BENCH_RATE=1gbit BENCH_RUNS=1 BENCH_NGINX="none zstd" BENCH_JOBS="default 16"
#                        BENCH_SMALL=267 BENCH_MEDIUM=30 BENCH_LARGE="180 100 60"
#                        BENCH_LINKS="shaped unshaped" BENCH_PERF=DIR (see perf_start)
#                        BENCH_BIN_B=BIN (a fourth way: the client's proxy from another binary; its
#                        realisations count as proxy ones in BENCH_LOGS' per-path comparison)
#                        BENCH_REALISE_TMPFS=1 (each realisation's store on a tmpfs, see below)
#                        BENCH_LOGS=DIR: keep the peer's and the client's logs there, with a per-path
#                        comparison of the last proxy realisation against the last direct one)
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${BENCH_RATE:-1gbit}
RUNS=${BENCH_RUNS:-1}
NGINX_COMPRESSIONS=${BENCH_NGINX:-none zstd}
JOBS=${BENCH_JOBS:-default 16}
BENCH_NAME=closure
. bench/hosts.sh
need_packages nginx-light python3

echo "planning the closure..." >&2
# One line per path: NAME|DEPS (space-separated names)|FILES (space-separated). Deterministic for
# a given machine, so a re-run finds the paths already built.
python3 - "$D/plan" "${BENCH_SMALL:-267}" "${BENCH_MEDIUM:-30}" "${BENCH_LARGE:-180 100 60}" <<'PY'
import math, os, random, re, stat, sys
out, n_small, n_medium, large = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(x) for x in sys.argv[4].split()]
ok = re.compile(r'^[A-Za-z0-9._+,@=/-]+$')
files = []
for root in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/share"):
    for d, dirs, names in os.walk(root):
        dirs.sort()
        if d.startswith("/usr/share/package-lists"):
            continue
        # Nix's build user copies the files: skip directories others cannot enter and list (e.g.
        # polkit's rules.d, mode 0700), and everything below them.
        if os.stat(d).st_mode & 0o005 != 0o005:
            dirs[:] = []
            continue
        for n in sorted(names):
            p = os.path.join(d, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            # Regular, readable by others (the build user), not hard-linked (a NAR would hold each
            # link as a copy).
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size > 0 and ok.match(p) and st.st_mode & stat.S_IROTH:
                files.append((st.st_size, p))
rng = random.Random(16)
used = set()
MiB, KiB = 1 << 20, 1 << 10
def fill(target, pool):
    """Files from pool (shuffled order) until target bytes, at least one."""
    got, total = [], 0
    for size, p in pool:
        if p in used or (got and total + size > target * 1.2):
            continue
        got.append(p); used.add(p); total += size
        if total >= target:
            break
    if not got:
        sys.exit(f"no files left for a path of {target} bytes")
    return got
paths = []
big = sorted((f for f in files if f[0] >= 2 * MiB), reverse=True)
for i, mib in enumerate(large):
    paths.append((f"l{i}", fill(mib * MiB, big)))
mid = [f for f in files if 64 * KiB <= f[0] <= 12 * MiB]
rng.shuffle(mid)
for i in range(n_medium):
    paths.append((f"m{i:02}", fill(math.exp(rng.uniform(math.log(1 * MiB), math.log(20 * MiB))), mid)))
small = [f for f in files if f[0] <= 512 * KiB]
rng.shuffle(small)
for i in range(n_small):
    paths.append((f"s{i:03}", fill(math.exp(rng.uniform(math.log(4 * KiB), math.log(1 * MiB))), small)))
rng.shuffle(paths)
referenced, lines = set(), []
for i, (name, fs) in enumerate(paths):
    deps = sorted({paths[rng.randrange(i)][0] for _ in range(rng.randrange(4))}) if i else []
    referenced.update(deps)
    lines.append(f"{name}|{' '.join(deps)}|{' '.join(fs)}")
lines.append("top|" + " ".join(n for n, _ in paths if n not in referenced) + "|")
open(out, "w").write("\n".join(lines) + "\n")
PY
{
    echo 'let'
    echo '  mk = name: files: deps: builtins.derivation {'
    echo '    name = "lnc-closure-${name}"; system = builtins.currentSystem; builder = "/bin/sh";'
    echo '    PATH = "/usr/bin:/bin"; inherit files deps; passAsFile = [ "files" ];'
    echo '    args = [ "-c" "mkdir -p $out/nix-support && if [ -s $filesPath ]; then xargs -a $filesPath cp --parents -t $out; fi && echo $deps > $out/nix-support/deps" ];'
    echo '  };'
    echo '  p = rec {'
    while IFS='|' read -r name deps files; do
        echo "    $name = mk \"$name\" \"$(echo "$files" | tr ' ' '\n')\" [ $deps ];"
    done <"$D/plan"
    echo '  };'
    echo 'in p.top'
} >"$D/closure.nix"

echo "building the closure (cached in /nix/store after the first run)..." >&2
nix-store --generate-binary-cache-key bench-hydra-1 "$D/sk" "$D/pk"
PK=$(cat "$D/pk")
TOP=$(nix-build "$D/closure.nix" --no-out-link --max-jobs 2 2>"$D/build.log") || { tail "$D/build.log" >&2; exit 1; }
NPATHS=$(nix-store -qR "$TOP" | wc -l)
# The signed static caches nginx serves, and the peer's store (copied from the uncompressed one,
# signatures included).
chmod 755 "$D"
for c in $NGINX_COMPRESSIONS; do
    nix copy --to "file://$D/cache-$c?secret-key=$D/sk&compression=$c" "$TOP" 2>"$D/copy.log" || { cat "$D/copy.log" >&2; exit 1; }
    chmod -R a+rX "$D/cache-$c"
done
[ -d "$D/cache-none" ] || nix copy --to "file://$D/cache-none?secret-key=$D/sk&compression=none" "$TOP"
nix copy --from "file://$D/cache-none" --to "$D/peer" --option trusted-public-keys "$PK" "$TOP" 2>"$D/copy.log" ||
    { cat "$D/copy.log" >&2; exit 1; }

# NAR sizes: the distribution, from the peer's store.
nix path-info --store "$D/peer" -rs "$TOP" | awk '{print $2}' | sort -n >"$D/sizes"
DIST=$(awk '
    { s[NR] = $1; t += $1
      if ($1 < 102400) a++; else if ($1 < 1048576) b++; else if ($1 < 10485760) c++; else if ($1 < 52428800) d++; else e++ }
    END { m = 1048576
      printf "%d paths, %.0f MiB of NAR: < 100 KiB %d, 100 KiB-1 MiB %d, 1-10 MiB %d, 10-50 MiB %d, >= 50 MiB %d; ", NR, t/m, a, b, c, d, e
      printf "median %.0f KiB, p90 %.1f MiB, largest %.0f MiB", s[int(NR/2)+1]/1024, s[int(NR*0.9)+1]/m, s[NR]/m }' "$D/sizes")
TOTAL_MIB=$(awk '{t += $1} END {printf "%.0f", t/1048576}' "$D/sizes")
echo "closure: $DIST" >&2
for c in $NGINX_COMPRESSIONS; do
    echo "  static cache, compression $c: $(du -sm "$D/cache-$c" | cut -f1) MiB on disk" >&2
done

# Each realisation's store on a tmpfs (BENCH_REALISE_TMPFS=0: in D, on D's filesystem). On ext4,
# the files of a store deleted moments before make the next one's inode allocation crawl
# (ext4's recently_deleted() skips inodes freed in the last minute): measured on 2026-11-27,
# Nix's CPU for the same closure varied from 7 to 21 s with most of it in find_inode_bit and
# recently_deleted, so each way's time hung on how long after the previous one it ran.
if [ "${BENCH_REALISE_TMPFS:-1}" = 1 ]; then
    mkdir -p "$D/realise"
    mount -t tmpfs -o size=4g,mode=755 lnc-realise "$D/realise"
    REALISE_DIR=$D/realise
    trap 'umount -l "$D/realise" 2>/dev/null; cleanup' EXIT
fi

lan_up peer client
start_peer peer "$D/peer" "$PK"
mkdir -p "$D/nginx"
{
    echo "worker_processes auto; pid $D/nginx/nginx.pid; error_log $D/nginx/error.log;"
    echo "events { worker_connections 1024; }"
    echo "http { access_log off; sendfile on; tcp_nopush on;"
    echo "  client_body_temp_path $D/nginx; proxy_temp_path $D/nginx; fastcgi_temp_path $D/nginx; uwsgi_temp_path $D/nginx; scgi_temp_path $D/nginx;"
    port=8390
    for c in $NGINX_COMPRESSIONS; do echo "  server { listen 10.88.0.1:$port; root $D/cache-$c; }"; port=$((port + 1)); done
    echo "}"
} >"$D/nginx.conf"
ip netns exec "$NS-peer" nginx -c "$D/nginx.conf" -g 'daemon off;' & PIDS+=($!)
start_client client "$PK"
H=$(basename "$TOP" | cut -c1-32)
wait_narinfo client "http://10.88.0.1:8380/$H.narinfo"
wait_narinfo client "http://10.88.0.1:8390/$H.narinfo"
wait_narinfo client "http://127.0.0.1:8381/$H.narinfo"

# A fresh proxy for every realisation: nothing it learnt in an earlier one (verified narinfo)
# helps the next.
fresh_proxy() {
    kill "$CLIENT_PID"
    wait "$CLIENT_PID" 2>/dev/null || true
    start_client client "$PK"
    for _ in $(seq 600); do
        ip netns exec "$NS-client" curl -sf -m 2 http://127.0.0.1:8381/status.json 2>/dev/null | grep -q '"node"' && return 0
        sleep 0.1
    done
    echo "the fresh proxy found no peer in 60 s; its log:" >&2
    tail -20 "$D/client.log" >&2
    return 1
}
# BENCH_PERF=DIR: `perf record -a` (the whole machine) during every realisation; the last one of
# each way kept in DIR as perf.WAY, with a flat report per process name and symbol (report.WAY).
# Use with a `cargo build --profile profiling` binary in BENCH_BIN.
PERF=
perf_start() {
    [ -n "${BENCH_PERF:-}" ] || return 0
    need_packages linux-perf
    mkdir -p "$BENCH_PERF"
    perf record -q -a -F 499 -o "$BENCH_PERF/perf.$1" 2>/dev/null & PERF=$!
    if [ "$1" = proxy ]; then
        # The client's `serve` alone, with call stacks (DWARF: release code keeps no frame pointers).
        perf record -q -F 499 --call-graph dwarf,16384 -o "$BENCH_PERF/perf.client" -p "$CLIENT_PID" 2>/dev/null &
        PERF+=" $!"
    fi
    sleep 0.3
}
perf_stop() {
    [ -n "${BENCH_PERF:-}" ] || return 0
    # shellcheck disable=SC2086
    kill -INT $PERF
    # shellcheck disable=SC2086
    wait $PERF || true
    perf report -i "$BENCH_PERF/perf.$1" -n --no-children --sort comm,dso,symbol --stdio 2>/dev/null >"$BENCH_PERF/report.$1" || true
    perf report -i "$BENCH_PERF/perf.$1" -n --no-children --sort comm --stdio 2>/dev/null >"$BENCH_PERF/comm.$1" || true
}
# CPU seconds: ticks() of a process (user + system, from /proc), kids() of this shell's waited
# children (the realisation's nix-store and what it runs, with the removal of its store after).
ticks() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }
kids() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($16 + $17) / hz}' "/proc/$$/stat"; }
# busy: the whole machine's busy and idle CPU seconds so far ("BUSY IDLE").
busy() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / {printf "%.2f %.2f", ($2 + $3 + $4 + $7 + $8 + $9) / hz, ($5 + $6) / hz}' /proc/stat; }
# opens: TCP connections the peer's host accepted so far (its namespace's PassiveOpens).
opens() { ip netns exec "$NS-peer" awk '/^Tcp:/ {n++; if (n == 2) print $7}' /proc/net/snmp; }
# cpu_of WAY COMMAND...: runs COMMAND, adding to CPU[WAY] "nix X, peer Y, peer daemon Z, proxy W"
# (CPU seconds each, this run).
cpu_of() {
    local way=$1 k0 p0 d0 c0 k1 p1 d1 c1 b0 b1 o0 o1
    shift
    b0=$(busy) o0=$(opens)
    k0=$(kids) p0=$(ticks "$PEER_PID") d0=$(ticks "$PEER_DAEMON_PID") c0=$(ticks "$CLIENT_PID")
    "$@"
    k1=$(kids) p1=$(ticks "$PEER_PID") d1=$(ticks "$PEER_DAEMON_PID") c1=$(ticks "$CLIENT_PID")
    b1=$(busy) o1=$(opens)
    CPU[$way]+="$(awk -v k="$k1 - $k0" -v p="$p1 - $p0" -v d="$d1 - $d0" -v c="$c1 - $c0" -v w="$way" -v bz="$b0 $b1" -v o=$((o1 - o0)) 'BEGIN {
        split(k, a, " - "); split(p, b, " - "); split(d, e, " - "); split(c, f, " - ")
        printf "%s: nix %.2f, peer %.2f, peer daemon %.2f", w, a[1] - a[2], b[1] - b[2], e[1] - e[2]
        if (w ~ /^proxy/) printf ", proxy %.2f", f[1] - f[2]
        split(bz, m, " "); printf ", machine busy %.2f idle %.2f, %d connections to the peer; ", m[3] - m[1], m[4] - m[2], o }')"
}
# realise_t HOST SUBSTITUTER: T1 = seconds to realise TOP (in a subshell, whose CPU kids() counts).
realise_t() { T1=$(realise "$1" "$2" "$PK" "$TOP" "${NIX_OPTS[@]}"); }
# one WAY: sets T1 to the seconds of realising TOP that way, and raises CONC[WAY] to the most
# NARs the peer sent at once meanwhile. Not in a subshell: fresh_proxy's new process must land
# in PIDS.
one() {
    local port c from n
    from=$(wc -l <"$D/peer.log")
    case $1 in
    direct)
        perf_start direct
        cpu_of direct realise_t client "http://10.88.0.1:8380"
        perf_stop direct ;;
    proxy)
        fresh_proxy
        perf_start proxy
        cpu_of proxy realise_t client "http://127.0.0.1:8381"
        perf_stop proxy ;;
    proxy-b)
        # The client's proxy from BENCH_BIN_B (the peer keeps BIN).
        local bin=$BIN
        BIN=$BENCH_BIN_B
        fresh_proxy
        BIN=$bin
        cpu_of proxy-b realise_t client "http://127.0.0.1:8381" ;;
    nginx-*)
        port=8390
        for c in $NGINX_COMPRESSIONS; do [ "nginx-$c" = "$1" ] && break; port=$((port + 1)); done
        cpu_of "$1" realise_t client "http://10.88.0.1:$port" ;;
    esac
    n=$(overlap "$from")
    [ "$n" -gt "${CONC[$1]:-0}" ] && CONC[$1]=$n
    return 0
}
# measure: T[WAY] = median over RUNS of each way (the lower middle one for an even count); each
# run takes the ways in a rotated order, so no way always comes first.
measure() {
    local ways=(direct proxy) r i w n times
    [ -n "${BENCH_BIN_B:-}" ] && ways+=(proxy-b)
    for c in $NGINX_COMPRESSIONS; do ways+=("nginx-$c"); done
    n=${#ways[@]}
    declare -gA T=() ALL=()
    for r in $(seq "$RUNS"); do
        for i in $(seq 0 $((n - 1))); do
            w=${ways[$(((i + r - 1) % n))]}
            one "$w"
            ALL[$w]+=" $T1"
        done
    done
    for w in "${ways[@]}"; do
        T[$w]=$(printf '%s\n' ${ALL[$w]} | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')
    done
}
# overlap FROM: the most NAR transfers the peer's store server had running at once, from its log
# lines after line FROM (each "NAR served" line ends a transfer and says how long it took).
overlap() {
    tail -n +"$(($1 + 1))" "$D/peer.log" | python3 -c '
import re, sys, datetime
ev = []
for l in sys.stdin:
    m = re.match(r"(\S+)Z .*NAR served.* ms=(\d+)", l)
    if m:
        end = datetime.datetime.fromisoformat(m.group(1)).timestamp()
        ev += [(end - int(m.group(2)) / 1000, 1), (end, -1)]
n = best = 0
for _, d in sorted(ev):
    n += d
    best = max(best, n)
print(best)'
}
mbs() { awk -v s="$1" -v m="$TOTAL_MIB" 'BEGIN {printf "%.0f", m * 1.048576 / s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2fx", a / b}'; }

echo
echo "closure: $DIST"
echo "Nix $(nix-store --version | awk '{print $NF}'); $RUNS run(s) per cell (median, ways in rotated order); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| Nix substitutions | link | direct from peer | via proxy | $(for c in $NGINX_COMPRESSIONS; do printf 'nginx, %s | ' "$c"; done)proxy vs direct | $(for c in $NGINX_COMPRESSIONS; do printf 'proxy vs nginx %s | direct vs nginx %s | ' "$c" "$c"; done)"
echo "|---|---|---|---|$(for c in $NGINX_COMPRESSIONS; do printf -- '---|---|---|'; done)---|"
CONCURRENCY=
CPUS=
for jobs in $JOBS; do
    if [ "$jobs" = default ]; then
        NIX_OPTS=(); jl="Nix's defaults"
    else
        NIX_OPTS=(--max-jobs "$jobs"); jl="--max-jobs $jobs"
    fi
    for link in ${BENCH_LINKS:-shaped unshaped}; do
        if [ "$link" = shaped ]; then shape peer "$RATE"; label="peer egress $RATE (tc tbf)"; else label="unshaped veth"; fi
        declare -A CONC=() CPU=()
        measure
        [ "$link" = shaped ] && shape peer off
        DIRECT=${T[direct]}
        PROXY=${T[proxy]}
        row="| $jl | $label | $DIRECT s ($(mbs "$DIRECT") MB/s) | $PROXY s ($(mbs "$PROXY") MB/s) | "
        for c in $NGINX_COMPRESSIONS; do row+="${T[nginx-$c]} s | "; done
        row+="**$(ratio "$DIRECT" "$PROXY")** | "
        for c in $NGINX_COMPRESSIONS; do row+="$(ratio "${T[nginx-$c]}" "$PROXY") | $(ratio "${T[nginx-$c]}" "$DIRECT") | "; done
        echo "$row"
        if [ -n "${BENCH_BIN_B:-}" ]; then
            echo "| $jl | $label | proxy B ($BENCH_BIN_B): ${T[proxy-b]} s ($(mbs "${T[proxy-b]}") MB/s) | B vs direct **$(ratio "$DIRECT" "${T[proxy-b]}")** | B vs proxy $(ratio "$PROXY" "${T[proxy-b]}") | all runs: direct${ALL[direct]}; proxy${ALL[proxy]}; B${ALL[proxy-b]} |"
        fi
        CONCURRENCY+="$jl, $label: direct ${CONC[direct]:-0}, proxy ${CONC[proxy]:-0}; "
        CPUS+="$jl, $label: $(for w in "${!CPU[@]}"; do printf '%s' "${CPU[$w]}"; done)
"
        if [ -n "${BENCH_RESULTS:-}" ]; then
            target=">= 0.95x"; [ "$link" = unshaped ] && target=">= 0.9x"
            what="closure of $NPATHS paths ($TOTAL_MIB MiB), $jl, $label"
            echo "$what: proxy vs direct|$PROXY s|$DIRECT s (direct from peer)|$(ratio "$DIRECT" "$PROXY")|$target" >>"$BENCH_RESULTS"
            for c in $NGINX_COMPRESSIONS; do
                echo "$what: proxy vs nginx ($c)|$PROXY s|${T[nginx-$c]} s (nginx, static cache, $c)|$(ratio "${T[nginx-$c]}" "$PROXY")|reported" >>"$BENCH_RESULTS"
                echo "$what: direct vs nginx ($c)|$DIRECT s|${T[nginx-$c]} s (nginx, static cache, $c)|$(ratio "${T[nginx-$c]}" "$DIRECT")|reported" >>"$BENCH_RESULTS"
            done
        fi
    done
done
echo
echo "most NARs the peer's store server sent at once: $CONCURRENCY"
echo "CPU seconds per realisation (each run):"
printf '%s' "$CPUS"
echo "ratios are speed ratios: the other's time / ours (above 1: ours is faster)"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "client proxy log, last NAR lines:"
grep -a 'NAR' "$D/client.log" | sed 's/^/  /' | tail -3
if [ -n "${BENCH_LOGS:-}" ]; then
    mkdir -p "$BENCH_LOGS"
    cp "$D/peer.log" "$D/client.log" "$D/sizes" "$BENCH_LOGS/"
    echo "logs kept in $BENCH_LOGS; per path, proxy against direct:"
    python3 bench/closure-perpath.py "$BENCH_LOGS" || true
fi
