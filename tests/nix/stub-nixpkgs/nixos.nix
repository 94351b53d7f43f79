# The few NixOS options this project's module sets, declared as NixOS declares them (names, types,
# defaults), for `lib.nixosSystem` of the stub (see lib.nix). Not NixOS: a stub of its interface.
{ lib, ... }:
let inherit (lib) mkOption types; in
{
  options = {
    nix.settings = {
      substituters = mkOption { type = types.listOf types.str; default = [ "https://cache.nixos.org/" ]; };
      trusted-public-keys = mkOption { type = types.listOf types.str; default = [ ]; };
      narinfo-cache-negative-ttl = mkOption { type = types.int; default = 3600; };
    };
    networking.firewall = {
      enable = mkOption { type = types.bool; default = true; };
      allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    };
    systemd.services = mkOption { type = types.attrsOf types.anything; default = { }; };
    environment.etc = mkOption { type = types.attrsOf types.anything; default = { }; };
    boot.isContainer = mkOption { type = types.bool; default = false; };
    system.stateVersion = mkOption { type = types.str; };
    system.build.toplevel = mkOption { type = types.package; };
  };
}
