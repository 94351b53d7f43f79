# Evaluates nixos/module.nix with the module system of the stub nixpkgs (tests/nix/stub-nixpkgs:
# nixpkgs is not reachable here) against the stub of the NixOS options it sets, and returns what a
# NixOS system would get from it (checked by tests/it/packaging.rs). `extra` is one more module (a
# test's definitions); the default one is a host like the README's.
{ extra ? {
    services.local-nix-cache = {
      enable = true;
      interfaces = [ "wlan0" ];
      peers = [ "10.0.0.5" "venue-cache.lan:8381" ];
      trustedPublicKeys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      upstreams = [ ];
      openFirewall = true;
      passThroughProvenPeers = false;
      settings = { announce-interval = "2s"; spool-max-mib = 4096; };
    };
  }
}:
let
  stub = import ./stub-nixpkgs/flake.nix;
  nixpkgs = stub.outputs { self = nixpkgs; };
  system = nixpkgs.lib.nixosSystem {
    modules = [ ../../nixos/module.nix extra { system.stateVersion = "25.11"; } ];
  };
  inherit (system) config;
  opts = system.options.services.local-nix-cache;
  # Absent when the module is disabled.
  service = config.systemd.services.local-nix-cache or { serviceConfig = { }; restartTriggers = [ ]; };
in
{
  options = builtins.attrNames opts;
  # The options' types and defaults, compared with `serve`'s own flags.
  types = builtins.mapAttrs (_: o: o.type.name) opts;
  defaults = builtins.mapAttrs (_: o: if o.type.name == "package" then null else o.default or null) opts;
  substituters = config.nix.settings.substituters;
  negativeTtl = config.nix.settings.narinfo-cache-negative-ttl;
  firewall = config.networking.firewall;
  execStart = service.serviceConfig.ExecStart or null;
  dynamicUser = service.serviceConfig.DynamicUser or null;
  # The config file the module generates (the stub generator keeps its value).
  configFile = config.environment.etc."local-nix-cache/config.toml".source.value or null;
  restartTriggers = map toString service.restartTriggers;
  # Forces every definition of the system (types checked, undeclared options refused).
  toplevel = config.system.build.toplevel.drvPath;
}
