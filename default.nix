# local-nix-cache, callPackage-style:
#   nix-build -E 'with import <nixpkgs> { }; callPackage ./default.nix { }'
# or, in a NixOS configuration, see ./nixos/module.nix.
{ lib, rustPlatform }:

rustPlatform.buildRustPackage {
  pname = "local-nix-cache";
  version = "0.1.0";

  src = lib.cleanSourceWith {
    src = ./.;
    filter = path: type:
      let base = baseNameOf path; in
      !(type == "directory" && (base == "target" || base == "fuzz" || base == ".git"));
  };

  cargoLock.lockFile = ./Cargo.lock;

  # The test suite needs a nix-daemon, root and network namespaces: it runs in CI (.ci/run), not
  # in the build sandbox.
  doCheck = false;

  meta = {
    description = "Share Nix store paths between the hosts of one LAN, verified against the signatures already in the store";
    license = lib.licenses.mit;
    mainProgram = "local-nix-cache";
    platforms = lib.platforms.linux;
  };
}
