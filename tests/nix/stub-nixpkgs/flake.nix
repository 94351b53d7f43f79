# The stub nixpkgs as a flake, for `--override-input nixpkgs path:…` in tests (see lib.nix).
{
  outputs = { self }:
    let
      lib = (import ./lib.nix) // {
        # A NixOS system of the stub: the modules, the stub NixOS options, and a toplevel
        # derivation whose environment holds the whole evaluated configuration (so evaluating
        # its .drvPath checks every definition).
        nixosSystem = { system ? "x86_64-linux", modules, specialArgs ? { } }:
          let
            pkgs = import ./pkgs.nix { inherit system; };
            toplevel = { config, ... }: {
              config.system.build.toplevel = derivation {
                name = "nixos-system-stub";
                inherit system;
                builder = "/bin/sh";
                args = [ "-c" "exit 1" ];
                configuration = builtins.toJSON {
                  inherit (config) nix networking systemd environment;
                };
              };
            };
          in
          lib.evalModules {
            modules = modules ++ [ ./nixos.nix toplevel ];
            specialArgs = { inherit pkgs; modulesPath = "/stub/nixos/modules"; } // specialArgs;
          };
      };
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ]
        (system: import ./pkgs.nix { inherit system; });
    };
}
