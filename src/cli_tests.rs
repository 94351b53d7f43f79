//! Tests of `cli`.
use super::*;

#[test]
fn real_store_dir_defaults_follow_the_store() {
    let real = |store: &str, real: Option<&str>| {
        let mut v = vec!["--store", store];
        if let Some(r) = real {
            v.extend(["--real-store-dir", r]);
        }
        serve_settings(v).expect("settings").store.real_store_dir
    };
    let p = |s: &str| Some(PathBuf::from(s));
    assert_eq!(real("auto", None), p("/nix/store"));
    assert_eq!(real("daemon", None), p("/nix/store"));
    assert_eq!(real("stdio", None), p("/nix/store"));
    assert_eq!(real("stdio:///tmp/hostA", None), p("/tmp/hostA/nix/store"));
    assert_eq!(real("unix:///tmp/a.sock", None), None);
    assert_eq!(real("unix:///tmp/a.sock", Some("/x/store")), p("/x/store"));
    assert_eq!(real("auto", Some("none")), None);
}

#[test]
fn values_are_checked_by_their_flag() {
    for (flags, want) in [
        (vec!["--store-dir", "nix/store"], "--store-dir"),
        (vec!["--store-dir", "/nix/store/"], "--store-dir"),
        (vec!["--upstream", "ftp://x"], "--upstream"),
        (vec!["--trusted-public-key", "nokey"], "--trusted-public-key"),
        (vec!["--rescan-interval", "0"], "--rescan-interval"),
        (vec!["--peer-compression", "brotli"], "--peer-compression"),
    ] {
        let e = serve_settings(flags.clone())
            .err()
            .unwrap_or_else(|| panic!("{flags:?} accepted"));
        assert!(e.to_string().contains(want), "{flags:?}: {e}");
    }
    let s = serve_settings(["--upstream", "http://a/x", "--upstream", "none"]).expect("settings");
    assert!(s.proxy.upstreams.is_empty(), "none means no upstream");
    let s = serve_settings(["--upstream", "http://a/x"]).expect("settings");
    assert_eq!(s.proxy.upstreams[0].as_str(), "http://a/x/");
    assert!(serve_settings(["--no-beacon"]).expect("settings").beacon.is_none());
}

/// Parses `argv` after `serve`, with `toml` as the config file, as `main` does.
fn serve(argv: &[&str], toml: &str) -> Result<Settings, CliError> {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).expect("write");
    let mut full: Vec<OsString> = vec!["local-nix-cache".into(), "serve".into()];
    full.push("--config".into());
    full.push(path.clone().into());
    full.extend(argv.iter().map(OsString::from));
    match parse(full)?.command {
        Command::Serve(args) => Ok(args.settings()),
        _ => panic!("serve"),
    }
}

#[test]
fn file_sets_what_flags_do_not() {
    let toml = r#"
store = "unix:///run/a.sock"
listen = ["0.0.0.0:9000", "[::1]:9001"]
trusted-public-key = ["k-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
upstream = ["none"]
interface = ["eth0"]
group = ["239.1.2.3"]
announce-interval = "2s"
spool-max-mib = 100
spool-mem-mib = 10
daemon-connections = 3
peer-compression = "none"
"#;
    let s = serve(&["--spool-max-mib", "7", "--listen", "127.0.0.1:1"], toml).expect("config");
    assert_eq!(s.store.addr.to_string(), "unix:///run/a.sock");
    assert_eq!(
        s.server.listen,
        vec!["127.0.0.1:1".parse().expect("addr")],
        "the flag wins, not appends"
    );
    assert_eq!(s.server.keys.keys()[0].name, "k-1");
    assert!(s.proxy.upstreams.is_empty());
    let b = s.beacon.expect("beacon");
    assert_eq!(b.interfaces, vec!["eth0".to_owned()]);
    assert_eq!(b.interval, std::time::Duration::from_secs(2));
    assert_eq!(s.proxy.spool.disk_total_mib, 7, "the flag overrides the file");
    assert_eq!(s.proxy.spool.mem_total_mib, 10);
    assert_eq!(s.store.daemon_connections, 3);
    assert_eq!(s.proxy.peer_compression, crate::settings::PeerCompression::None);
    // Untouched settings keep their defaults.
    assert_eq!(s.store.store_dir, "/nix/store");
    let s = serve(&[], "no-beacon = true\n").expect("config");
    assert!(s.beacon.is_none());
    let s = serve(&[], "no-beacon = false\n").expect("config");
    assert!(s.beacon.is_some());
    // A `true|false` flag takes a TOML boolean; the flag wins over the file.
    assert!(
        serve(&[], "").expect("config").proxy.pass_through_proven_peers,
        "on by default"
    );
    let s = serve(&[], "pass-through-proven-peers = false\nstate-dir = \"/s\"\n").expect("config");
    assert!(!s.proxy.pass_through_proven_peers);
    assert_eq!(s.proxy.state_dir, std::path::PathBuf::from("/s"));
    let s = serve(
        &["--pass-through-proven-peers", "true"],
        "pass-through-proven-peers = false\n",
    )
    .expect("config");
    assert!(s.proxy.pass_through_proven_peers);
}

#[test]
fn bad_config_names_key_and_line() {
    let cases = [
        ("store = \"auto\"\nbogus-key = 1\n", "line 2: key `bogus-key`"),
        (
            "listen = [\"0.0.0.0:1\"]\n\nstore = \"ftp://x\"\n",
            "line 3: key `store`",
        ),
        ("\nlisten = [\"not an address\"]\n", "line 2: key `listen`"),
        ("announce-interval = \"soon\"\n", "line 1: key `announce-interval`"),
        ("\nbeacon-port = 70000\n", "line 2: key `beacon-port`"),
        ("rescan-interval = \"ten\"\n", "line 1: key `rescan-interval`"),
        ("rescan-interval = 0\n", "line 1: key `rescan-interval`"),
        ("log-format = \"xml\"\n", "line 1: key `log-format`"),
        ("\n\npeer-compression = \"brotli\"\n", "line 3: key `peer-compression`"),
        ("\ntrusted-public-key = [\"bad\"]\n", "line 2: key `trusted-public-key`"),
        ("upstream = [\"ftp://x\"]\n", "line 1: key `upstream`"),
        ("\n\n\nstore-dir = \"relative\"\n", "line 4: key `store-dir`"),
        ("real-store-dir = 5\nspool-dir = true\n", "line 2: key `spool-dir`"),
        ("no-beacon = \"yes\"\n", "line 1: key `no-beacon`"),
        ("daemon-connections = [1, 2]\n", "line 1: key `daemon-connections`"),
        ("config = \"/x\"\n", "line 1: key `config`"),
        (
            "\npass-through-proven-peers = \"no\"\n",
            "line 2: key `pass-through-proven-peers`",
        ),
    ];
    for (toml, want) in cases {
        let e = serve(&[], toml)
            .err()
            .unwrap_or_else(|| panic!("{toml:?} accepted"))
            .to_string();
        assert!(e.contains(want), "{toml:?}: {e}");
    }
    let e = serve(&[], "store = [").expect_err("bad toml").to_string();
    assert!(e.contains("line 1"), "{e}");
}

/// `--peer` (and the config key `peer`): repeatable seeds for `serve` and `peers`, 8380 by
/// default; a malformed value stops the start with an error naming the flag and the value.
#[test]
fn peers_are_seeds_and_a_malformed_one_is_named() {
    let s = serve_settings(["--peer", "10.0.0.5", "--peer", "cache.example:9000"]).expect("settings");
    let seeds: Vec<String> = s.beacon.expect("beacon").seeds.iter().map(|p| p.to_string()).collect();
    assert_eq!(seeds, ["10.0.0.5:8380", "cache.example:9000"]);
    for bad in ["http://10.0.0.5:8380", "10.0.0.5:0", "", "a b"] {
        let e = serve_settings(["--peer", bad])
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
        let msg = e.to_string();
        assert!(msg.contains("--peer") && msg.contains(bad), "{bad:?}: {msg}");
    }
    let e = serve_settings(["--peer", "10.0.0.5", "--no-beacon"]).expect_err("seeds need the beacon");
    assert!(e.to_string().contains("--no-beacon"), "{e}");
    let s = serve(&[], "peer = [\"10.0.0.7\"]\n").expect("from the file");
    let seeds: Vec<String> = s.beacon.expect("beacon").seeds.iter().map(|p| p.to_string()).collect();
    assert_eq!(seeds, ["10.0.0.7:8380"]);
    let e = serve(&[], "peer = [\"10.0.0.7:http\"]\n").expect_err("a bad key value");
    assert!(
        e.to_string().contains("`peer`") && e.to_string().contains("10.0.0.7:http"),
        "{e}"
    );
    let Command::Peers(p) = Cli::try_parse_from(["local-nix-cache", "peers", "--peer", "[fe80::1]:81"])
        .expect("peers --peer")
        .command
    else {
        panic!("not peers")
    };
    assert_eq!(p.options().beacon.seeds.list()[0].to_string(), "[fe80::1]:81");
}

/// The README's table of `serve` flags lists exactly the flags defined here.
#[test]
fn the_readme_lists_every_serve_flag() {
    let readme = include_str!("../README.md");
    let table = readme
        .split("## `serve`")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README has a serve section");
    let mut listed: Vec<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `--"))
        .filter_map(|l| l.split('`').next())
        .collect();
    listed.sort_unstable();
    let cmd = Cli::command();
    let serve = cmd.find_subcommand("serve").expect("serve");
    let mut defined: Vec<&str> = serve
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "help" | "version"))
        .collect();
    defined.sort_unstable();
    assert_eq!(listed, defined, "README.md's serve table vs the flags");
}

/// A program a test needs: found, or the test is skipped locally and fails under `CI`.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing (./run test installs it)"
        );
        eprintln!("skipped: {name} is not installed");
    }
    found
}

fn completions(shell: CompletionShell) -> String {
    let mut out = Vec::new();
    write_completions(shell, &mut out);
    String::from_utf8(out).expect("completion scripts are UTF-8")
}

/// Every long flag of every subcommand, as `--help` lists them.
fn every_long_flag() -> Vec<(String, String)> {
    let cmd = Cli::command();
    cmd.get_subcommands()
        .flat_map(|sub| {
            sub.get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| !matches!(*l, "help" | "version"))
                .map(|l| (sub.get_name().to_string(), l.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn completions_name_every_subcommand_and_flag_and_parse_in_their_shell() {
    for (shell, program, check) in [
        (CompletionShell::Bash, "bash", "-n"),
        (CompletionShell::Zsh, "zsh", "-n"),
        (CompletionShell::Fish, "fish", "--no-execute"),
    ] {
        let script = completions(shell);
        for sub in ["serve", "peers", "status", "completions", "man"] {
            assert!(script.contains(sub), "{program}: no {sub}");
        }
        for (sub, flag) in every_long_flag() {
            // fish lists flags as `-l name`, the others as `--name`.
            let named = script.contains(&format!("--{flag}")) || script.contains(&format!("-l {flag}"));
            assert!(named, "{program}: no --{flag} of {sub}");
        }
        let Some(shell_bin) = tool(program) else { continue };
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("completion");
        std::fs::write(&file, &script).expect("write");
        let out = std::process::Command::new(shell_bin)
            .arg(check)
            .arg(&file)
            .output()
            .expect("run shell");
        assert!(
            out.status.success(),
            "{program} {check}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_man_page_documents_every_flag_and_renders_without_warnings() {
    let mut page = Vec::new();
    write_man_page(&mut page).expect("render");
    let page = String::from_utf8(page).expect("UTF-8");
    assert!(
        page.starts_with(".ie") || page.starts_with(".TH"),
        "{}",
        &page[..80.min(page.len())]
    );
    for (sub, flag) in every_long_flag() {
        assert!(
            page.contains(&format!("\\-\\-{}", flag.replace('-', "\\-"))),
            "no --{flag} of {sub}"
        );
    }
    assert!(
        page.contains(".SH \"LOCAL\\-NIX\\-CACHE SERVE\""),
        "a section per subcommand"
    );
    assert!(page.contains("config.toml"), "the config file is documented");
    let Some(groff) = tool("groff") else { return };
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("local-nix-cache.1");
    std::fs::write(&file, &page).expect("write");
    let out = std::process::Command::new(groff)
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&file)
        .output()
        .expect("groff");
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && warnings.trim().is_empty(), "groff: {warnings}");
}
