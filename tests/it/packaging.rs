//! Packaging without nixpkgs (not available here): every `.nix` file parses, `default.nix` is a
//! callPackage-style function, and the NixOS module, evaluated against a stub of lib and pkgs
//! (`tests/nix/module-eval.nix`), has the documented options and generates a config file that
//! `serve` itself accepts.

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
    let out = run(nix("nix-instantiate", home.path())
        .args(["--eval", "--strict", "--json"])
        .arg(Path::new(ROOT).join("tests/nix/module-eval.nix")));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
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
    ] {
        assert_eq!(strings(&d[option]), default(flag), "option {option} vs --{flag}");
    }
}
