#!/bin/sh
# local-nix-cache installer, served by a peer's store server:
#     curl -fsSL http://PEER:8380/install | sh
# It fetches that peer's own local-nix-cache binary (checking its sha256), installs it, adds the
# local proxy as an extra substituter to nix.conf (with a backup; trusted keys are not touched, no
# new trust is added), lowers narinfo-cache-negative-ttl, and starts `local-nix-cache serve`
# (a systemd service when run as root on systemd, in the foreground otherwise). Running it again
# changes nothing that is already in place.
#
# Environment: LNC_MODE=system|user (default: system when root), LNC_NO_START=1 (install only).
set -eu

PEER='@PEER@'
SHA256='@SHA256@'
MARK_BEGIN='# local-nix-cache: begin (added by the installer)'
MARK_END='# local-nix-cache: end'

say() { printf 'local-nix-cache: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

command -v nix-store >/dev/null 2>&1 || die "Nix is not installed here (no nix-store on PATH); install Nix first."
command -v curl >/dev/null 2>&1 || die "curl is needed."
command -v sha256sum >/dev/null 2>&1 || die "sha256sum is needed (coreutils)."

if [ -n "${LNC_MODE:-}" ]; then mode=$LNC_MODE
elif [ "$(id -u)" = 0 ]; then mode=system
else mode=user
fi
case "$mode" in
system) bin_dir=/usr/local/bin; conf=/etc/nix/nix.conf ;;
user) bin_dir=${HOME:?}/.local/bin; conf=${XDG_CONFIG_HOME:-$HOME/.config}/nix/nix.conf ;;
*) die "LNC_MODE must be system or user" ;;
esac

# 1. The binary, checked against the sha256 this script was served with.
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
say "fetching $PEER/install/local-nix-cache (sha256 $SHA256)"
curl -fsSL "$PEER/install/local-nix-cache" -o "$tmp"
got=$(sha256sum "$tmp" | cut -d' ' -f1)
[ "$got" = "$SHA256" ] || die "sha256 mismatch: got $got, expected $SHA256; nothing installed."
chmod 755 "$tmp"
"$tmp" --version >/dev/null 2>&1 || die "the peer's binary does not run on this machine (other architecture or libc); build it from source instead."
mkdir -p "$bin_dir"
bin=$bin_dir/local-nix-cache
if [ -f "$bin" ] && [ "$(sha256sum "$bin" | cut -d' ' -f1)" = "$SHA256" ]; then
    say "$bin is already this version"
else
    cp "$tmp" "$bin.new" && mv "$bin.new" "$bin"
    say "installed $bin"
fi

# 2. nix.conf: the proxy as an extra substituter, a short negative cache. Backup first.
mkdir -p "$(dirname "$conf")"
backup=
if [ -f "$conf" ] && grep -qF "$MARK_BEGIN" "$conf"; then
    say "$conf already uses the proxy; left as it is"
else
    if [ -f "$conf" ]; then
        backup=$conf.before-local-nix-cache.$(date +%Y%m%d%H%M%S)
        cp -p "$conf" "$backup"
        say "backed up $conf to $backup"
    fi
    {
        printf '%s\n' "$MARK_BEGIN"
        printf '%s\n' "extra-substituters = http://127.0.0.1:8381"
        printf '%s\n' "narinfo-cache-negative-ttl = 30"
        printf '%s\n' "$MARK_END"
    } >> "$conf"
    say "added the proxy (http://127.0.0.1:8381) to $conf"
fi
if [ "$mode" = user ]; then
    say "note: on a multi-user Nix, substituters in a user's nix.conf are ignored unless the user is"
    say "trusted; then run this as root, or add http://127.0.0.1:8381 to trusted-substituters."
fi

say "to undo:"
if [ -n "$backup" ]; then say "  mv '$backup' '$conf'"; else say "  delete the lines between the local-nix-cache markers in $conf"; fi
if [ "$mode" = system ] && [ -d /run/systemd/system ]; then
    say "  systemctl disable --now local-nix-cache; rm /etc/systemd/system/local-nix-cache.service"
fi
say "  rm '$bin'"

# 3. Start serve.
[ -n "${LNC_NO_START:-}" ] && exit 0
if [ "$mode" = system ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    unit=/etc/systemd/system/local-nix-cache.service
    cat > "$unit.new" <<UNIT
[Unit]
Description=local-nix-cache: share Nix store paths on the LAN
After=network-online.target nix-daemon.socket
Wants=network-online.target

[Service]
ExecStart=$bin serve
Restart=on-failure
DynamicUser=no
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths=/tmp

[Install]
WantedBy=multi-user.target
UNIT
    mv "$unit.new" "$unit"
    systemctl daemon-reload
    systemctl enable --now local-nix-cache
    say "started the local-nix-cache service (journalctl -u local-nix-cache)"
else
    say "starting local-nix-cache serve in the foreground (Ctrl-C to stop)"
    exec "$bin" serve
fi
