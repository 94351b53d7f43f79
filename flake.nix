{
  description = "Share Nix store paths between the hosts of one LAN, verified against the signatures already in the store";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forEachSystem = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
    in
    {
      # The static binary (see ./default.nix): what a host runs is what it can hand to newcomers.
      packages = forEachSystem (system: pkgs: rec {
        local-nix-cache = pkgs.callPackage ./default.nix { };
        default = local-nix-cache;
      });

      # `nix run github:…/local-nix-cache -- peers` (or `-- serve …`).
      apps = forEachSystem (system: pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${system}.default;
          meta.description = "local-nix-cache: serve, peers, status, completions, man";
        };
      });

      overlays.default = final: prev: {
        local-nix-cache = final.callPackage ./default.nix { };
      };

      # imports = [ inputs.local-nix-cache.nixosModules.default ];
      # services.local-nix-cache.enable = true;
      # The module's default package is this flake's, built with the system's nixpkgs.
      nixosModules.default = ./nixos/module.nix;

      checks = forEachSystem (system: pkgs: {
        package = self.packages.${system}.default;
        # A NixOS system with the module enabled evaluates (every option it sets exists and has
        # the right type); `nix flake check` builds its toplevel unless given --no-build.
        module = (lib.nixosSystem {
          inherit system;
          modules = [
            self.nixosModules.default
            {
              services.local-nix-cache.enable = true;
              services.local-nix-cache.openFirewall = true;
              boot.isContainer = true;
              system.stateVersion = "25.11";
            }
          ];
        }).config.system.build.toplevel;
      });

      # For contributors: the toolchain and the C libraries of the package, plus clippy and
      # rustfmt (`./run test` still needs root, Nix and network namespaces, outside this shell).
      devShells = forEachSystem (system: pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${system}.default ];
          packages = [ pkgs.cargo pkgs.clippy pkgs.rustfmt pkgs.rust-analyzer ];
        };
      });
    };
}
