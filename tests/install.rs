//! The conference one-liner, `curl -fsSL http://PEER:8380/install | sh`, run by a newcomer host in
//! a network namespace with its own HOME and config dir (user mode: nothing outside them is
//! touched). Needs root (namespaces) and Nix.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::require_netns;
use common::nixlan::{bin, NixLan};
use common::require_nix;

const ORIGINAL_CONF: &str = "substituters = https://cache.nixos.org\n\
trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\n";

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(&data))
}

/// The one-liner as the newcomer runs it, in its own process group (so the test can stop the
/// `serve` it ends in).
fn one_liner(ns: &str, home: &Path, peer: &str, path_env: &str, extra_env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "env", "-i"])
        .arg(format!("HOME={}", home.display()))
        .arg(format!("XDG_CONFIG_HOME={}", home.join("config").display()))
        .arg(format!("PATH={path_env}"))
        .arg("LNC_MODE=user");
    for (k, v) in extra_env {
        c.arg(format!("{k}={v}"));
    }
    c.args(["/bin/sh", "-c", &format!("curl -fsSL http://{peer}:8380/install | sh")])
        .process_group(0)
        .stdin(Stdio::null());
    c
}

#[test]
fn newcomer_installs_from_a_peer_with_one_line() {
    if !(require_nix() && require_netns()) {
        return;
    }
    let mut lan = NixLan::new(&[&[], &[]]);
    lan.hosts[0].start_serve("none");
    let peer = lan.hosts[0].net.ip4.to_string();
    let newcomer = lan.hosts[1].net.ns.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let conf = home.join("config/nix/nix.conf");
    std::fs::create_dir_all(conf.parent().expect("dir")).expect("mkdir");
    std::fs::write(&conf, ORIGINAL_CONF).expect("write nix.conf");

    // The script as served: names the peer and the binary's sha256.
    let script = lan.hosts[1]
        .http(&format!("http://{peer}:8380/install"))
        .expect("GET /install");
    assert!(script.starts_with("#!/bin/sh"), "{script}");
    assert!(script.contains(&format!("PEER='http://{peer}:8380'")));
    assert!(script.contains(&format!("SHA256='{}'", sha256_file(Path::new(bin())))));

    // Run it: it installs, edits nix.conf, and ends in `serve` in the foreground.
    let log = dir.path().join("install.log");
    let mut child = one_liner(&newcomer, &home, &peer, "/usr/bin:/bin", &[])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run the one-liner");
    let pgid = child.id();
    let t0 = Instant::now();
    let mut up = false;
    while t0.elapsed() < Duration::from_secs(20) {
        if lan.hosts[1].peer_addrs() == vec![format!("{peer}:8380")] {
            up = true;
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "installer exited {st}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill").args(["-TERM", "--", &format!("-{pgid}")]).status();
    let _ = child.wait();
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(up, "the newcomer's serve did not start or find the peer:\n{out}");

    // The binary is the peer's, byte for byte.
    let installed = home.join(".local/bin/local-nix-cache");
    assert_eq!(sha256_file(&installed), sha256_file(Path::new(bin())));
    // nix.conf: backup of the original, the proxy added once, the trusted keys untouched.
    let backups: Vec<_> = std::fs::read_dir(conf.parent().expect("dir"))
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().contains(".before-local-nix-cache."))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(std::fs::read_to_string(&backups[0]).expect("backup"), ORIGINAL_CONF);
    let new_conf = std::fs::read_to_string(&conf).expect("conf");
    assert!(
        new_conf.starts_with(ORIGINAL_CONF),
        "original lines changed:\n{new_conf}"
    );
    assert_eq!(
        new_conf.matches("extra-substituters = http://127.0.0.1:8381").count(),
        1
    );
    assert!(new_conf.contains("narinfo-cache-negative-ttl = 30"));
    assert_eq!(new_conf.matches("trusted-public-keys").count(), 1, "no new trust");
    assert!(out.contains("to undo:"), "{out}");

    // Idempotent: a second run changes nothing and makes no new backup.
    let st = one_liner(&newcomer, &home, &peer, "/usr/bin:/bin", &[("LNC_NO_START", "1")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("second run");
    assert!(st.success());
    assert_eq!(std::fs::read_to_string(&conf).expect("conf"), new_conf);
    let n_backups = std::fs::read_dir(conf.parent().expect("dir")).expect("ls").count();
    assert_eq!(n_backups, 2, "nix.conf and one backup");
}

#[test]
fn installer_refuses_to_run_without_nix() {
    if !(require_nix() && require_netns()) {
        return;
    }
    let mut lan = NixLan::new(&[&[], &[]]);
    lan.hosts[0].start_serve("none");
    let peer = lan.hosts[0].net.ip4.to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    // A PATH with the tools the script uses, but no Nix.
    let tools = dir.path().join("bin");
    std::fs::create_dir_all(&tools).expect("bin");
    for t in [
        "sh",
        "curl",
        "sha256sum",
        "id",
        "mkdir",
        "cp",
        "mv",
        "chmod",
        "cat",
        "date",
        "grep",
        "rm",
        "mktemp",
        "cut",
        "dirname",
    ] {
        let src = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(t))
            .find(|p| p.exists());
        if let Some(src) = src {
            std::os::unix::fs::symlink(src, tools.join(t)).expect("symlink");
        }
    }
    let out = one_liner(&lan.hosts[1].net.ns, &home, &peer, &tools.display().to_string(), &[])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Nix is not installed"), "{err}");
    assert!(
        !home.join(".local/bin/local-nix-cache").exists(),
        "installed without Nix"
    );
    assert!(
        !home.join("config/nix/nix.conf").exists(),
        "nix.conf written without Nix"
    );
}
