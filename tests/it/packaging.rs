//! Packaging without nixpkgs (not reachable here): every `.nix` file parses; `default.nix` is a
//! callPackage-style function that builds the static binary and installs completions and the man
//! page; the NixOS module, evaluated by the module system of the stub nixpkgs
//! (`tests/nix/stub-nixpkgs`: `evalModules` with types, priorities and `mkIf`, and the few NixOS
//! options the module sets) has the documented options, types and defaults of `serve`'s flags and
//! generates a config file that `serve` itself accepts; the flake shows and checks (Nix 2.26,
//! offline, nixpkgs overridden by the stub).

use std::path::Path;

use crate::common::{nix, run};
use clap::CommandFactory;
use local_nix_cache::cli::{self, Cli};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn nix_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() && !matches!(name, "target" | ".git" | "fuzz") {
            nix_files(&p, out);
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    require!(nix);
    let home = tempfile::tempdir().expect("home");
    let mut files = Vec::new();
    nix_files(Path::new(ROOT), &mut files);
    assert!(files.len() >= 3, "found {files:?}");
    for f in files {
        run(nix("nix-instantiate", home.path()).arg("--parse").arg(&f));
    }
}

#[test]
fn default_nix_is_callpackage_style() {
    require!(nix);
    let home = tempfile::tempdir().expect("home");
    let args = run(nix("nix-instantiate", home.path()).args([
        "--eval",
        "--strict",
        "--json",
        "-E",
        &format!("builtins.functionArgs (import {ROOT}/default.nix)"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&args).expect("json");
    assert!(v.get("lib").is_some() && v.get("rustPlatform").is_some(), "{v}");
}

#[test]
fn nixos_module_options_and_generated_config() {
    require!(nix);
    let home = tempfile::tempdir().expect("home");
    let v = module_eval(home.path(), None).expect("the module evaluates");
    let options: Vec<&str> = v["options"]
        .as_array()
        .expect("options")
        .iter()
        .filter_map(|o| o.as_str())
        .collect();
    for want in [
        "enable",
        "listen",
        "proxyListen",
        "upstreams",
        "trustedPublicKeys",
        "interfaces",
        "peers",
        "openFirewall",
        "passThroughProvenPeers",
        "settings",
    ] {
        assert!(options.contains(&want), "option {want} missing: {options:?}");
    }
    assert_eq!(v["substituters"], serde_json::json!(["http://127.0.0.1:8381"]));
    assert_eq!(v["negativeTtl"], 30);
    assert_eq!(v["firewall"]["allowedUDPPorts"], serde_json::json!([8380]));
    assert_eq!(v["dynamicUser"], true);
    assert!(v["execStart"]
        .as_str()
        .expect("exec")
        .ends_with("serve --config /etc/local-nix-cache/config.toml"));
    // The generated config, as TOML, is accepted by serve's own parser (no unknown keys, every
    // value valid for its flag).
    let toml_text = toml::to_string(&v["configFile"]).expect("to toml");
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &toml_text).expect("write");
    let argv = ["local-nix-cache", "serve", "--config"].map(std::ffi::OsString::from);
    let mut argv = argv.to_vec();
    argv.push(path.into());
    let parsed = cli::parse(argv).unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
    // A boolean option reaches its `true|false` flag.
    let cli::Command::Serve(serve_args) = parsed.command else {
        panic!("not serve")
    };
    let settings = serve_args.settings();
    assert!(!settings.proxy.pass_through_proven_peers, "{toml_text}");
    assert_eq!(
        settings.proxy.state_dir,
        std::path::PathBuf::from("/var/lib/local-nix-cache")
    );
    // `peers` reaches `--peer` (seeds, default port 8380).
    let seeds: Vec<String> = settings
        .beacon
        .as_ref()
        .expect("beacon")
        .seeds
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(seeds, ["10.0.0.5:8380", "venue-cache.lan:8381"], "{toml_text}");
    // The module's own options default to what `serve` defaults to: the flags are the one place.
    let serve = Cli::command().find_subcommand("serve").cloned().expect("serve");
    let default = |flag: &str| -> Vec<String> {
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("no flag --{flag}"));
        arg.get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect()
    };
    let d = &v["defaults"];
    let strings = |j: &serde_json::Value| -> Vec<String> {
        match j {
            serde_json::Value::Array(a) => a.iter().map(|x| x.as_str().expect("string").to_owned()).collect(),
            serde_json::Value::String(s) => vec![s.clone()],
            other => panic!("unexpected default {other}"),
        }
    };
    assert_eq!(
        vec![d["passThroughProvenPeers"].to_string()],
        default("pass-through-proven-peers"),
        "option passThroughProvenPeers vs --pass-through-proven-peers"
    );
    for (option, flag) in [
        ("listen", "listen"),
        ("proxyListen", "proxy-listen"),
        ("upstreams", "upstream"),
        ("trustedPublicKeys", "trusted-public-key"),
        ("interfaces", "interface"),
        ("peers", "peer"),
    ] {
        assert_eq!(strings(&d[option]), default(flag), "option {option} vs --{flag}");
    }
}

/// `tests/nix/module-eval.nix` evaluated with `extra` as the test's own module (a Nix expression),
/// or its default host: the JSON, or Nix's error.
fn module_eval(home: &Path, extra: Option<&str>) -> Result<serde_json::Value, String> {
    let file = Path::new(ROOT).join("tests/nix/module-eval.nix");
    let expr = match extra {
        Some(m) => format!("import {} {{ extra = {m}; }}", file.display()),
        None => format!("import {} {{ }}", file.display()),
    };
    let out = crate::common::output(nix("nix-instantiate", home).args(["--eval", "--strict", "--json", "-E", &expr]));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("json"))
}

#[test]
fn nixos_module_types_follow_the_flags_and_are_checked() {
    require!(nix);
    let home = tempfile::tempdir().expect("home");
    let v = module_eval(home.path(), None).expect("the module evaluates");
    let serve = Cli::command().find_subcommand("serve").cloned().expect("serve");
    // What a flag takes, as the module's option type must say it: a repeatable flag is a list
    // (`proxyListen` is one address on purpose: the module writes it as a one-element list), a
    // `true|false` flag a bool, any other value a string.
    for (option, flag, one_of_many) in [
        ("listen", "listen", false),
        ("proxyListen", "proxy-listen", true),
        ("upstreams", "upstream", false),
        ("trustedPublicKeys", "trusted-public-key", false),
        ("interfaces", "interface", false),
        ("peers", "peer", false),
        ("passThroughProvenPeers", "pass-through-proven-peers", false),
    ] {
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("no flag --{flag}"));
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|p| p.get_name().to_owned())
            .collect();
        let want = if values == ["true", "false"] {
            "bool"
        } else if matches!(arg.get_action(), clap::ArgAction::Append) && !one_of_many {
            "list of str"
        } else {
            "str"
        };
        assert_eq!(
            v["types"][option],
            want,
            "option {option} vs --{flag} ({:?})",
            arg.get_action()
        );
    }
    assert_eq!(v["types"]["openFirewall"], "bool");
    // `installBinary` is `--install-binary`: a path, absent by default (this binary is handed out).
    let install = serve
        .get_arguments()
        .find(|a| a.get_long() == Some("install-binary"))
        .expect("--install-binary");
    assert!(install.get_default_values().is_empty());
    assert_eq!(v["types"]["installBinary"], "null or path");
    assert_eq!(v["defaults"]["installBinary"], serde_json::Value::Null);
    let set = module_eval(
        home.path(),
        Some("{ services.local-nix-cache = { enable = true; installBinary = \"/nix/store/x/bin/lnc\"; }; }"),
    )
    .expect("evaluates");
    assert_eq!(set["configFile"]["install-binary"], "/nix/store/x/bin/lnc");
    assert_eq!(v["configFile"].get("install-binary"), None, "not written when null");
    assert_eq!(v["types"]["package"], "package");
    // The module system refuses what NixOS would refuse: a value of the wrong type, an option
    // that does not exist (so the checks above cannot pass on a stub that accepts anything).
    let wrong = module_eval(
        home.path(),
        Some("{ services.local-nix-cache.enable = true; services.local-nix-cache.openFirewall = \"yes\"; }"),
    )
    .expect_err("a string for a bool option");
    assert!(
        wrong.contains("openFirewall") && wrong.contains("not of type `bool'"),
        "{wrong}"
    );
    let typo = module_eval(
        home.path(),
        Some("{ services.local-nix-cache.enable = true; services.local-nix-cache.openFirewal = true; }"),
    )
    .expect_err("an option that does not exist");
    assert!(typo.contains("openFirewal' does not exist"), "{typo}");
    // Disabled, the module defines nothing: no substituter, no open port.
    let off = module_eval(home.path(), Some("{ services.local-nix-cache.openFirewall = true; }")).expect("evaluates");
    assert_eq!(off["firewall"]["allowedTCPPorts"], serde_json::json!([]));
    assert_eq!(off["substituters"], serde_json::json!(["https://cache.nixos.org/"]));
}

/// `default.nix` called with the stub package set: the arguments it gives `buildRustPackage`.
fn package_args(home: &Path, call: &str) -> serde_json::Value {
    let expr = format!(
        "let pkgs = import {ROOT}/tests/nix/stub-nixpkgs/pkgs.nix {{ system = \"x86_64-linux\"; }}; \
         a = (pkgs.callPackage {ROOT}/default.nix {call}).buildArgs; in \
         {{ inherit (a) RUSTFLAGS postInstall doCheck; \
            buildInputs = map (d: d.name) a.buildInputs; \
            nativeBuildInputs = map (d: d.name) a.nativeBuildInputs; }}"
    );
    let out = run(nix("nix-instantiate", home).args(["--eval", "--strict", "--json", "-E", &expr]));
    serde_json::from_str(&out).expect("json")
}

#[test]
fn default_nix_builds_static_and_installs_completions_and_the_man_page() {
    require!(nix);
    let home = tempfile::tempdir().expect("home");
    let a = package_args(home.path(), "{ }");
    // Static glibc, as `./run build` makes the binary tests/static_binary.rs runs in an empty root.
    assert_eq!(a["RUSTFLAGS"], "-C target-feature=+crt-static", "{a}");
    assert_eq!(a["buildInputs"], serde_json::json!(["glibc-static"]), "{a}");
    let dynamic = package_args(home.path(), "{ static = false; }");
    assert_eq!(dynamic["RUSTFLAGS"], "", "{dynamic}");
    assert_eq!(dynamic["buildInputs"], serde_json::json!([]), "{dynamic}");
    // postInstall, run as nixpkgs would run it (installShellFiles' functions stubbed to copy),
    // against this build's binary: every file lands where Nix users' shells and man look.
    assert_eq!(
        a["nativeBuildInputs"],
        serde_json::json!(["install-shell-files"]),
        "{a}"
    );
    let script = a["postInstall"].as_str().expect("postInstall");
    let out = tempfile::tempdir().expect("out");
    let bin = out.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_local-nix-cache"), bin.join("local-nix-cache")).expect("link");
    let work = tempfile::tempdir().expect("work");
    let stubs = r#"
installShellCompletion() {
    [ "$1" = --cmd ] || exit 9; name=$2; shift 2
    while [ $# -gt 0 ]; do
        case $1 in
            --bash) mkdir -p "$out/share/bash-completion/completions"; cat "$2" > "$out/share/bash-completion/completions/$name.bash" ;;
            --zsh) mkdir -p "$out/share/zsh/site-functions"; cat "$2" > "$out/share/zsh/site-functions/_$name" ;;
            --fish) mkdir -p "$out/share/fish/vendor_completions.d"; cat "$2" > "$out/share/fish/vendor_completions.d/$name.fish" ;;
            *) exit 9 ;;
        esac
        shift 2
    done
}
installManPage() { mkdir -p "$out/share/man/man1"; cp "$1" "$out/share/man/man1/"; }
set -e
"#;
    run(std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("{stubs}\n{script}"))
        .env("out", out.path())
        .current_dir(work.path()));
    for (file, must_hold) in [
        (
            "share/bash-completion/completions/local-nix-cache.bash",
            "--trusted-public-key",
        ),
        ("share/zsh/site-functions/_local-nix-cache", "--trusted-public-key"),
        (
            "share/fish/vendor_completions.d/local-nix-cache.fish",
            "trusted-public-key",
        ),
        ("share/man/man1/local-nix-cache.1", "trusted\\-public\\-key"),
    ] {
        let text = std::fs::read_to_string(out.path().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains(must_hold), "{file} lacks {must_hold}");
    }
}

/// The outputs `nix flake show --json` lists, as `a.b.c` paths down to each leaf's type.
fn flake_outputs(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_object() {
        Some(o) if !o.contains_key("type") => {
            for (k, child) in o {
                flake_outputs(
                    child,
                    &format!("{prefix}{}{k}", if prefix.is_empty() { "" } else { "." }),
                    out,
                );
            }
        }
        _ => out.push(format!("{prefix}: {}", v["type"].as_str().unwrap_or("?"))),
    }
}

#[test]
fn the_flake_shows_and_checks_its_outputs_with_nix_2_26() {
    let Some(root) = crate::common::roots::nix226_root() else {
        return;
    };
    // The flake's files (what git would give the flake: no target/), and the stub nixpkgs, in a
    // directory the chrooted Nix sees.
    let host = tempfile::tempdir().expect("host");
    let src = host.path().join("src");
    std::fs::create_dir_all(src.join("nixos")).expect("src");
    for f in [
        "flake.nix",
        "flake.lock",
        "default.nix",
        "Cargo.lock",
        "Cargo.toml",
        "nixos/module.nix",
    ] {
        std::fs::copy(Path::new(ROOT).join(f), src.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let stub = host.path().join("stub");
    std::fs::create_dir_all(&stub).expect("stub");
    for f in ["flake.nix", "lib.nix", "pkgs.nix", "nixos.nix"] {
        std::fs::copy(Path::new(ROOT).join("tests/nix/stub-nixpkgs").join(f), stub.join(f)).expect("copy stub");
    }
    let home = host.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let nix26 = |args: &[&str]| {
        let mut c = crate::common::roots::in_nix_root(&root, host.path(), "nix", &home);
        c.env(
            "NIX_CONFIG",
            "substituters =\nexperimental-features = nix-command flakes\nflake-registry =",
        )
        .args(args)
        .args([
            "path:/mnt/lnc-host/src",
            "--override-input",
            "nixpkgs",
            "path:/mnt/lnc-host/stub",
            "--no-write-lock-file",
        ]);
        c
    };
    let shown: serde_json::Value =
        serde_json::from_str(&run(&mut nix26(&["flake", "show", "--json"]))).expect("flake show --json");
    let mut outputs = Vec::new();
    flake_outputs(&shown, "", &mut outputs);
    for want in [
        "packages.x86_64-linux.default: derivation",
        "apps.x86_64-linux.default: app",
        "nixosModules.default: nixos-module",
        "overlays.default: nixpkgs-overlay",
        "checks.x86_64-linux.package: derivation",
        "checks.x86_64-linux.module: derivation",
        "devShells.x86_64-linux.default: derivation",
    ] {
        assert!(outputs.iter().any(|o| o == want), "{want} missing from {outputs:#?}");
    }
    // Every output evaluates: the module in a (stub) NixOS system, the package, the shell.
    run(&mut nix26(&["flake", "check", "--no-build"]));
    // The lock pins nixpkgs to one revision and its content hash.
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(ROOT).join("flake.lock")).expect("flake.lock"))
            .expect("json");
    let locked = &lock["nodes"]["nixpkgs"]["locked"];
    assert_eq!(locked["type"], "github", "{lock}");
    assert_eq!(locked["rev"].as_str().map(str::len), Some(40), "{lock}");
    assert!(
        locked["narHash"].as_str().is_some_and(|h| h.starts_with("sha256-")),
        "{lock}"
    );
}
