# NixOS module for local-nix-cache:
#   imports = [ /path/to/local-nix-cache/nixos/module.nix ];
#   services.local-nix-cache.enable = true;
{ config, lib, pkgs, ... }:

let
  cfg = config.services.local-nix-cache;
  inherit (lib) mkEnableOption mkIf mkOption types;
  toml = pkgs.formats.toml { };
  configFile = toml.generate "local-nix-cache.toml" ({
    listen = cfg.listen;
    proxy-listen = [ cfg.proxyListen ];
    upstream = if cfg.upstreams == [ ] then [ "none" ] else cfg.upstreams;
    trusted-public-key = cfg.trustedPublicKeys;
    interface = cfg.interfaces;
    peer = cfg.peers;
    spool-dir = "/var/cache/local-nix-cache";
    state-dir = "/var/lib/local-nix-cache";
    pass-through-proven-peers = cfg.passThroughProvenPeers;
  } // lib.optionalAttrs (cfg.installBinary != null) {
    install-binary = "${cfg.installBinary}";
  } // cfg.settings);
in
{
  options.services.local-nix-cache = {
    enable = mkEnableOption "local-nix-cache: share Nix store paths with the other hosts of the LAN";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../default.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./default.nix { }";
      description = "The local-nix-cache package.";
    };

    listen = mkOption {
      type = types.listOf types.str;
      default = [ "[::]:8380" ];
      description = "Addresses of the LAN-facing store server (`[::]` is IPv4 and IPv6).";
    };

    proxyListen = mkOption {
      type = types.str;
      default = "127.0.0.1:8381";
      description = "Address of the proxy that the local Nix uses as a substituter.";
    };

    upstreams = mkOption {
      type = types.listOf types.str;
      default = [ "https://cache.nixos.org" ];
      description = "Upstream binary caches the proxy asks after the peers; empty: LAN only.";
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = ''
        Keys whose signatures make a path servable to peers and acceptable from them. Usually the
        same as `nix.settings.trusted-public-keys`.
      '';
    };

    interfaces = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "wlan0" ];
      description = "Interfaces for the multicast beacon; empty: every up, multicast-capable, non-loopback one.";
    };

    peers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "10.0.0.5" "venue-cache.lan:8380" ];
      description = ''
        Seeds (`--peer HOST[:PORT]`, default port 8380): peers' store servers this host learns
        the hall from over outbound HTTP, at start and every 10 s. Any one reachable peer is
        enough: it works where multicast does not (a firewall with no port open, Wi-Fi that
        filters multicast, another subnet behind a router, client isolation with a venue cache).
      '';
    };

    passThroughProvenPeers = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Stream a proven peer's NAR (3 verified NARs, never a wrong one) to Nix while it is
        hashed, holding back its last 64 KiB until it verified. A proven peer that lies once
        costs one failed substitution and is banned for good (kept in /var/lib/local-nix-cache).
        false: every NAR verifies before Nix gets a byte.
      '';
    };

    installBinary = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = lib.literalExpression "\"''${pkgs.pkgsStatic.local-nix-cache}/bin/local-nix-cache\"";
      description = ''
        The binary newcomers get from this host's one-liner (`--install-binary`); it must be
        static. null: the running binary, which the default package builds static. Set it when
        `package` is a dynamic build (e.g. `static = false`): a dynamic binary is not handed out.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open TCP 8380 (store server) and UDP 8380 (beacon) in the firewall. Off by default, as
        for every NixOS service: the host is then a client only. With `peers` set it still
        fetches from the whole hall (outbound HTTP, answers come back through the stateful
        firewall); what breaks is the other direction: it hears no multicast beacons (without
        `peers` it finds nobody), and no other host can fetch from it (they list it from its
        beacons, fail to connect, and skip it). Turn it on to share this host's store.
      '';
    };

    settings = mkOption {
      type = toml.type;
      default = { };
      example = { announce-interval = "2s"; spool-max-mib = 4096; };
      description = "Further `serve` settings, by flag name (see `local-nix-cache serve --help`).";
    };
  };

  config = mkIf cfg.enable {
    # Also `serve`'s default config path, so `local-nix-cache status`/`serve` by hand agree.
    environment.etc."local-nix-cache/config.toml".source = configFile;

    systemd.services.local-nix-cache = {
      description = "local-nix-cache: share Nix store paths on the LAN";
      wantedBy = [ "multi-user.target" ];
      # No network-online.target: the beacon follows interfaces as they come and go (a laptop
      # boots offline and joins a network later), so waiting for "online" would only delay start.
      after = [ "nix-daemon.socket" ];
      environment.RUST_LOG = "info";
      restartTriggers = [ configFile ];
      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} serve --config /etc/local-nix-cache/config.toml";
        Restart = "on-failure";
        # Room for 1,024 LAN connections plus the proxy's; the store server derives its
        # connection cap from this limit (docs/security.md).
        LimitNOFILE = 65536;
        # Reads the store through the daemon socket (open to all users) and /nix/store
        # (world-readable); writes only its spool and its state (the proven and banned peers).
        DynamicUser = true;
        CacheDirectory = "local-nix-cache";
        StateDirectory = "local-nix-cache";
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        NoNewPrivileges = true;
        CapabilityBoundingSet = "";
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        SystemCallArchitectures = "native";
      };
    };

    nix.settings = {
      # Listed first; its Priority (20) also puts it before cache.nixos.org (40).
      substituters = lib.mkBefore [ "http://${cfg.proxyListen}" ];
      # Nix remembers a miss for an hour by default, before a peer with the path may appear.
      narinfo-cache-negative-ttl = lib.mkDefault 30;
    };

    networking.firewall = mkIf cfg.openFirewall {
      allowedTCPPorts = [ 8380 ];
      allowedUDPPorts = [ 8380 ];
    };
  };
}
