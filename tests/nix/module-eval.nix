# Evaluates nixos/module.nix without nixpkgs, against a small stub of lib and pkgs, and returns
# what a NixOS system would get from it (checked by tests/it/packaging.rs).
let
  lib = {
    mkEnableOption = description: { _type = "option"; default = false; inherit description; };
    mkOption = attrs: attrs // { _type = "option"; };
    types = {
      package = "package";
      str = "str";
      bool = "bool";
      listOf = t: "listOf ${t}";
    };
    mkIf = cond: value: if cond then value else { };
    mkBefore = x: x;
    mkDefault = x: x;
    literalExpression = x: x;
    getExe = p: "${p}/bin/local-nix-cache";
  };
  pkgs = {
    formats.toml = _: {
      type = "toml";
      generate = name: value: { __toString = _: "/nix/store/stub-${name}"; inherit value; };
    };
    callPackage = _: _: "/nix/store/stub-local-nix-cache";
  };
  config.services.local-nix-cache = {
    enable = true;
    package = "/nix/store/stub-local-nix-cache";
    listen = [ "[::]:8380" ];
    proxyListen = "127.0.0.1:8381";
    upstreams = [ ];
    trustedPublicKeys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
    interfaces = [ "wlan0" ];
    openFirewall = true;
    passThroughProvenPeers = false;
    settings = { announce-interval = "2s"; spool-max-mib = 4096; };
  };
  m = import ../../nixos/module.nix { inherit config lib pkgs; };
  service = m.config.systemd.services.local-nix-cache;
in
{
  options = builtins.attrNames m.options.services.local-nix-cache;
  # The options' defaults, compared with `serve`'s own flag defaults.
  defaults = builtins.mapAttrs (_: o: o.default or null) m.options.services.local-nix-cache;
  substituters = m.config.nix.settings.substituters;
  negativeTtl = m.config.nix.settings.narinfo-cache-negative-ttl;
  firewall = m.config.networking.firewall;
  execStart = service.serviceConfig.ExecStart;
  dynamicUser = service.serviceConfig.DynamicUser;
  # The config file the module generates (the stub generator keeps its value).
  configFile = m.config.environment.etc."local-nix-cache/config.toml".source.value;
  restartTriggers = map toString service.restartTriggers;
}
