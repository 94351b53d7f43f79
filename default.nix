# local-nix-cache, callPackage-style:
#   nix-build -E 'with import <nixpkgs> { }; callPackage ./default.nix { }'
# with flakes: `nix build github:…/local-nix-cache` (see ./flake.nix); in a NixOS configuration,
# see ./nixos/module.nix.
#
# The binary is static (glibc, `+crt-static`, as `./run build` makes it): a host serves its own
# executable at /install/local-nix-cache to newcomers, and a binary whose interpreter and libc
# live in this host's /nix/store would run nowhere else. Nothing is lost: DNS goes through
# hickory (never NSS), and it is the binary the test suite runs in an empty root
# (tests/static_binary.rs). `static = false` gives the ordinary dynamic build.
{ lib, stdenv, rustPlatform, installShellFiles, glibc, static ? true }:

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

  nativeBuildInputs = [ installShellFiles ];
  # buildRustPackage passes `--target`, so the flag reaches the binary only, never the build
  # scripts and proc macros (which cannot be static).
  buildInputs = lib.optionals static [ glibc.static ];
  RUSTFLAGS = lib.optionalString static "-C target-feature=+crt-static";

  # The test suite needs a nix-daemon, root and network namespaces: it runs in CI (.ci/run), not
  # in the build sandbox.
  doCheck = false;

  # Completions and the man page come from the binary's own clap definitions (the `--help` texts).
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd local-nix-cache \
      --bash <($out/bin/local-nix-cache completions bash) \
      --zsh <($out/bin/local-nix-cache completions zsh) \
      --fish <($out/bin/local-nix-cache completions fish)
    $out/bin/local-nix-cache man > local-nix-cache.1
    installManPage local-nix-cache.1
  '';

  meta = {
    description = "Share Nix store paths between the hosts of one LAN, verified against the signatures already in the store";
    license = lib.licenses.mit;
    mainProgram = "local-nix-cache";
    platforms = lib.platforms.linux;
  };
}
