# A stand-in for nixpkgs' package set (see lib.nix): every package is a derivation that is never
# built (`nix flake check --no-build` and evaluation tests only), and `rustPlatform`, `mkShell`
# and `callPackage` keep the arguments they were given, so tests can read what a package asks for.
{ system }:
let
  lib = import ./lib.nix;
  stub = name: attrs: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo stub nixpkgs: nothing is built here; exit 1" ];
  } // attrs);
  pkgs = {
    inherit lib system;
    stdenv = {
      inherit system;
      hostPlatform = { inherit system; };
      buildPlatform = { inherit system; canExecute = p: p.system == system; };
    };
    callPackage = f: overrides:
      let fn = if builtins.isFunction f then f else import f; in
      fn (builtins.intersectAttrs (builtins.functionArgs fn) pkgs // overrides);
    rustPlatform.buildRustPackage = args:
      let
        strings = builtins.mapAttrs (_: v: if builtins.isList v then map toString v else toString v)
          (builtins.removeAttrs args [ "meta" "cargoLock" "passthru" ]);
      in
      (stub "${args.pname}-${args.version}" strings) // {
        inherit (args) pname version;
        meta = args.meta or { };
        passthru.buildArgs = args;
        buildArgs = args;
      };
    mkShell = args: (stub "shell" { }) // { shellArgs = args; };
    installShellFiles = stub "install-shell-files" { };
    glibc = stub "glibc" { } // { static = stub "glibc-static" { }; };
    cargo = stub "cargo" { };
    clippy = stub "clippy" { };
    rustfmt = stub "rustfmt" { };
    rust-analyzer = stub "rust-analyzer" { };
    runCommand = name: env: script: stub name (env // { inherit script; });
    formats.toml = _: {
      type = lib.types.attrsOf lib.types.anything;
      generate = name: value: (stub name { json = builtins.toJSON value; }) // { inherit value; };
    };
  };
in
pkgs
