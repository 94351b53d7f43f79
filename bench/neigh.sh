# Sourced by the benchmarks that run tens to hundreds of hosts in namespaces (hall-serve.sh,
# crowd.sh). One kernel plays every host: its neighbour tables are shared by all namespaces,
# capped at 1,024 entries by default, and K namespaces need about K² of them (every proxy talks to
# every store server). Past the cap the kernel drops unicast and multicast alike ("neighbor table
# overflow": the hall of 300 collapsed that way; at 50 crowd hosts beacons went missing and peers
# kept expiring). `neigh_raise` raises the caps for the run; `neigh_restore` puts back the values
# saved when this file was sourced (call it from the script's EXIT trap).
neigh_saved=$(sysctl -n net.ipv4.neigh.default.gc_thresh2 net.ipv4.neigh.default.gc_thresh3 \
    net.ipv6.neigh.default.gc_thresh2 net.ipv6.neigh.default.gc_thresh3 | tr '\n' ' ')
neigh_restore() {
    local a b c d
    read -r a b c d <<<"$neigh_saved"
    sysctl -qw net.ipv4.neigh.default.gc_thresh2="$a" net.ipv4.neigh.default.gc_thresh3="$b" \
        net.ipv6.neigh.default.gc_thresh2="$c" net.ipv6.neigh.default.gc_thresh3="$d"
}
neigh_raise() {
    sysctl -qw net.ipv4.neigh.default.gc_thresh2=32768 net.ipv4.neigh.default.gc_thresh3=65536 \
        net.ipv6.neigh.default.gc_thresh2=32768 net.ipv6.neigh.default.gc_thresh3=65536
}
