//! The conference one-liner, `curl -fsSL http://PEER:8380/install | sh`, run by a newcomer host in
//! a network namespace with its own HOME and config dir (user mode: nothing outside them is
//! touched). Needs root (namespaces) and Nix.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::nixlan::{bin, NixLan};
use crate::common::wait_for;

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

/// Runs the one-liner `cmd` (stderr to `log`) until the newcomer, `lan.hosts[1]`, lists exactly
/// `peer` and kept it as its seed (`--peer`), then stops the `serve` it ended in (its process
/// group) and returns what it said. Fails if the installer exits first, or after 20 s.
fn runs_until_seeded(mut cmd: Command, log: &Path, lan: &NixLan, peer: &str, who: &str) -> String {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("run the one-liner");
    let pgid = child.id();
    let up = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        let up = lan.hosts[1].peer_addrs() == vec![format!("{peer}:8380")]
            && lan.hosts[1].status()["seeds"][0]["seed"] == format!("{peer}:8380").as_str();
        if !up {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "installer exited {st}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
        up
    })
    .is_some();
    let _ = Command::new("kill").args(["-TERM", "--", &format!("-{pgid}")]).status();
    let _ = child.wait();
    let out = std::fs::read_to_string(log).unwrap_or_default();
    assert!(up, "{who} serve did not start or find the peer:\n{out}");
    out
}

#[test]
fn newcomer_installs_from_a_peer_with_one_line() {
    require!(nix, netns);
    let Some(static_bin) = crate::common::roots::release_bin() else {
        return;
    };
    // The peer runs this test build (dynamic, like Nix's ordinary rustPlatform build) and hands
    // out the static one, as `--install-binary` tells it.
    let mut lan = NixLan::new(&[&[], &[]]);
    lan.hosts[0].start_serve_handing_out("none", &static_bin);
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
    assert!(script.contains(&format!("SHA256='{}'", sha256_file(&static_bin))));
    assert!(script.contains("LINKAGE='static'"), "{script}");
    let size = std::fs::metadata(&static_bin).expect("size").len();
    assert!(script.contains(&format!("SIZE='{size}'")), "{script}");
    assert!(
        script.contains(&format!("VERSION='local-nix-cache {}'", env!("CARGO_PKG_VERSION"))),
        "{script}"
    );

    // Run it: it installs, edits nix.conf, and ends in `serve` in the foreground.
    let log = dir.path().join("install.log");
    let out = runs_until_seeded(
        one_liner(&newcomer, &home, &peer, "/usr/bin:/bin", &[]),
        &log,
        &lan,
        &peer,
        "the newcomer's",
    );

    // The binary is the peer's, byte for byte.
    let installed = home.join(".local/bin/local-nix-cache");
    assert_eq!(sha256_file(&installed), sha256_file(&static_bin));
    assert!(
        out.contains(&format!("hands out local-nix-cache {} for", env!("CARGO_PKG_VERSION")))
            && out.contains(&format!("(static, {size} bytes, sha256 {})", sha256_file(&static_bin))),
        "the script tells the newcomer what it gets:\n{out}"
    );
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
    require!(nix, netns);
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

/// Tools the install script runs, as a NixOS host has them: working without `/lib64` (their
/// loader is named by its real path, as NixOS names one in /nix/store). Copies patched with
/// `patchelf`; `None` (skip, or failure under CI) without patchelf.
fn tools_without_lib64(dir: &Path) -> Option<std::path::PathBuf> {
    let ok = Command::new("patchelf")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        crate::common::prereq::missing("patchelf", "apt-get install patchelf; the README's test command does");
        return None;
    }
    let loader = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2").expect("this machine's loader");
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).expect("tools dir");
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
        "uname",
        "env",
        "sleep",
    ] {
        let src = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(t))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{t} not found"));
        let dst = tools.join(t);
        std::fs::copy(std::fs::canonicalize(&src).expect("real path"), &dst).expect("copy tool");
        crate::common::run(Command::new("patchelf").arg("--set-interpreter").arg(&loader).arg(&dst));
    }
    // `nix-store` only has to be on PATH (the script checks for Nix); the client used below is
    // Nix 2.26 from the Debian 13 root.
    std::fs::write(
        tools.join("nix-store"),
        format!("#!{}\necho 'nix-store (Nix) 2.26.3'\n", tools.join("sh").display()),
    )
    .expect("nix-store");
    crate::common::run(Command::new("chmod").arg("755").arg(tools.join("nix-store")));
    Some(tools)
}

/// The one-liner on a host that plays NixOS: `/etc/NIXOS`, `/etc/nix/nix.conf` a symlink into a
/// read-only `/etc/static`, no `/lib64`, in a private mount namespace inside namespace `ns`
/// (`/usr/local` is a fresh tmpfs there: an installer that took this for another distribution
/// cannot write to this machine's).
fn nixos_one_liner(ns: &str, fake: &Path, tools: &Path, home: &Path, peer: &str) -> Command {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-euc",
    ])
    .arg(
        r#"etc=$1; tools=$2; home=$3; peer=$4
mount --bind "$etc/static" "$etc/static"
mount -o remount,bind,ro "$etc/static"
mount --rbind "$etc" /etc
mount -t tmpfs tmpfs /usr/local
mount -t tmpfs tmpfs "$(readlink -f /lib64)"
exec "$tools/env" -i HOME="$home" PATH="$tools" "$tools/sh" -c "curl -fsSL http://$peer:8380/install | sh""#,
    )
    .arg("sh")
    .arg(fake.join("etc"))
    .arg(tools)
    .arg(home)
    .arg(peer)
    .process_group(0)
    .stdin(Stdio::null());
    c
}

const NIXOS_CONF: &str = "# generated by NixOS\nsubstituters = https://cache.nixos.org\n";

#[test]
fn nixos_newcomer_gets_a_static_binary_commands_and_a_module_whose_hash_nix_accepts() {
    require!(nix, netns);
    let Some(static_bin) = crate::common::roots::release_bin() else {
        return;
    };
    let Some(nix226) = crate::common::roots::nix226_root() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(tools) = tools_without_lib64(dir.path()) else {
        return;
    };
    // The fake NixOS /etc.
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(etc.join("static/nix")).expect("etc/static");
    std::fs::create_dir_all(etc.join("nix")).expect("etc/nix");
    std::fs::write(etc.join("NIXOS"), "").expect("marker");
    std::fs::write(etc.join("static/nix/nix.conf"), NIXOS_CONF).expect("nix.conf");
    std::os::unix::fs::symlink("/etc/static/nix/nix.conf", etc.join("nix/nix.conf")).expect("symlink");
    for f in ["passwd", "group", "hosts", "ld.so.cache"] {
        let _ = std::fs::copy(Path::new("/etc").join(f), etc.join(f));
    }
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");

    // The peer runs the static release binary: that is what it hands out.
    let mut lan = NixLan::new(&[&[], &[]]);
    lan.hosts[0].start_serve_with(&static_bin, "none");
    let peer = lan.hosts[0].net.ip4.to_string();
    let newcomer = lan.hosts[1].net.ns.clone();
    let log = dir.path().join("install.log");
    let out = runs_until_seeded(
        nixos_one_liner(&newcomer, dir.path(), &tools, &home, &peer),
        &log,
        &lan,
        &peer,
        "the NixOS newcomer's",
    );

    // Installed for the user: the static binary, byte for byte. nix.conf untouched, no backup.
    assert_eq!(
        sha256_file(&home.join(".local/bin/local-nix-cache")),
        sha256_file(&static_bin)
    );
    assert_eq!(
        std::fs::read_to_string(etc.join("static/nix/nix.conf")).expect("conf"),
        NIXOS_CONF
    );
    assert_eq!(
        std::fs::read_dir(etc.join("nix")).expect("ls").count(),
        1,
        "only the symlink"
    );
    assert_eq!(std::fs::read_dir(etc.join("static/nix")).expect("ls").count(), 1);
    assert!(!home.join(".config/nix").exists(), "no user nix.conf either");
    // What to do, said exactly.
    assert!(out.contains("NixOS"), "{out}");
    assert!(
        out.contains("sudo nixos-rebuild switch --option extra-substituters http://127.0.0.1:8381"),
        "{out}"
    );
    let snippet: String = out
        .lines()
        .skip_while(|l| !l.contains("begin local-nix-cache NixOS module"))
        .skip(1)
        .take_while(|l| !l.contains("end local-nix-cache NixOS module"))
        .map(|l| format!("{}\n", l.trim_start_matches("local-nix-cache: ")))
        .collect();
    assert!(
        snippet.contains("nixos/module.nix") && snippet.contains("sha256 = \""),
        "{out}"
    );
    assert!(
        snippet.contains(&format!("http://{peer}:8380/install/source.tar")),
        "{snippet}"
    );
    assert!(
        snippet.contains(&format!("services.local-nix-cache.peers = [ \"{peer}:8380\" ];"))
            && snippet.contains("openFirewall"),
        "the snippet seeds the module with this peer and says what the firewall does:\n{snippet}"
    );

    // Nix 2.26 evaluates the snippet as printed: fetches the peer's source, accepts its hash, and
    // finds the module in it.
    let client = tempfile::tempdir().expect("tempdir");
    let chome = client.path().join("home");
    std::fs::create_dir_all(&chome).expect("home");
    std::fs::write(client.path().join("snippet.nix"), &snippet).expect("snippet");
    let mnt = crate::common::roots::HOST_MOUNT;
    let eval = |expr: &str| {
        crate::common::output(
            crate::common::roots::in_nix_root_ns(Some(&newcomer), &nix226, client.path(), "nix-instantiate", &chome)
                .args(["--store", &format!("{mnt}/store"), "--eval", "--expr", expr]),
        )
    };
    let o = eval(&format!(
        "let m = import {mnt}/snippet.nix; in builtins.pathExists (builtins.head m.imports) && m.services.local-nix-cache.enable"
    ));
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "true",
        "Nix 2.26 on the snippet: {} {}\n{snippet}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // And a wrong hash is refused (the check above is a real one).
    let wrong = snippet.replace("sha256 = \"", "sha256 = \"1");
    let wrong = {
        let i = wrong.find("sha256 = \"1").expect("sha256") + "sha256 = \"".len();
        format!("{}{}", &wrong[..i + 52], &wrong[i + 53..])
    };
    std::fs::write(client.path().join("wrong.nix"), &wrong).expect("wrong");
    let o = eval(&format!(
        "let m = import {mnt}/wrong.nix; in builtins.pathExists (builtins.head m.imports)"
    ));
    assert!(!o.status.success(), "a wrong sha256 was accepted: {wrong}");

    // The flake form: the same source as a flake input, pinned by the same hash as an SRI
    // narHash; Nix 2.26 fetches it from the peer, checks it, and reads the flake's lock.
    let url = out
        .lines()
        .map(|l| l.trim_start_matches("local-nix-cache: "))
        .find_map(|l| l.strip_prefix("inputs.local-nix-cache.url = \"")?.strip_suffix("\";"))
        .unwrap_or_else(|| panic!("no flake input in:\n{out}"))
        .to_owned();
    assert!(
        url.starts_with(&format!("http://{peer}:8380/install/source.tar?narHash=sha256-")),
        "{url}"
    );
    let flake = |url: &str| {
        let mut c = crate::common::roots::in_nix_root_ns(Some(&newcomer), &nix226, client.path(), "nix", &chome);
        c.env(
            "NIX_CONFIG",
            "substituters =\nexperimental-features = nix-command flakes\nflake-registry =",
        )
        .args(["--store", &format!("{mnt}/store"), "flake", "metadata", "--json", url]);
        crate::common::output(&mut c)
    };
    let o = flake(&url);
    let meta: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
    assert_eq!(meta["locked"]["type"], "tarball", "{meta}");
    assert!(
        meta["locks"]["nodes"]["nixpkgs"]["locked"]["rev"].is_string(),
        "the flake's own lock: {meta}"
    );
    let sri = url
        .rsplit("narHash=")
        .next()
        .expect("narHash")
        .replace("%2B", "+")
        .replace("%2F", "/")
        .replace("%3D", "=");
    assert_eq!(meta["locked"]["narHash"], sri.as_str(), "{meta}");
    let i = url.find("narHash=sha256-").expect("narHash") + "narHash=sha256-".len();
    let flipped = if &url[i..i + 1] == "A" { "B" } else { "A" };
    let wrong_url = format!("{}{flipped}{}", &url[..i], &url[i + 1..]);
    assert!(
        !flake(&wrong_url).status.success(),
        "a wrong narHash was accepted: {wrong_url}"
    );
}

#[test]
fn installer_refuses_an_unsupported_architecture_clearly() {
    require!(nix, netns);
    let mut lan = NixLan::new(&[&[], &[]]);
    lan.hosts[0].start_serve("none");
    let peer = lan.hosts[0].net.ip4.to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    // This machine's tools, but `uname` says aarch64.
    let tools = dir.path().join("bin");
    std::fs::create_dir_all(&tools).expect("bin");
    std::fs::write(
        tools.join("uname"),
        "#!/bin/sh\ncase \"${1:-}\" in -m) echo aarch64 ;; *) echo Linux ;; esac\n",
    )
    .expect("uname");
    crate::common::run(Command::new("chmod").arg("755").arg(tools.join("uname")));
    let path = format!("{}:/usr/bin:/bin", tools.display());
    // LNC_NO_START: an installer that wrongly went ahead ends instead of running `serve`.
    let out = one_liner(&lan.hosts[1].net.ns, &home, &peer, &path, &[("LNC_NO_START", "1")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("for {} Linux", std::env::consts::ARCH)) && err.contains("aarch64"),
        "{err}"
    );
    assert!(!home.join(".local/bin/local-nix-cache").exists(), "installed anyway");
    assert!(!home.join("config/nix/nix.conf").exists(), "nix.conf written anyway");
}

/// What a host hands out when its own binary is dynamic: Nix's ordinary `rustPlatform` build
/// needs that host's `/nix/store` glibc as its loader, and ran nowhere else. Emulated with this
/// test build, which cargo links dynamically too (its loader is the system's `/lib64` one): both
/// carry a `PT_INTERP`. Such a host hands out no binary, its script says why and stops before
/// touching anything; `--install-binary` hands out the static build; a dynamic one given there
/// is an error at start that names it.
#[test]
fn a_host_with_a_dynamic_binary_hands_out_only_a_static_one() {
    use crate::common::{get, serve_args, Host, TestNode};
    require!(nix);
    let Some(static_bin) = crate::common::roots::release_bin() else {
        return;
    };
    let host = Host::with_paths(&[]);

    // Its own binary only: the script says what it is and stops; the binary is a 404.
    let node = TestNode::start(serve_args(host.store_addr()));
    let script = get(node.addr, "/install");
    assert_eq!(script.status, 200);
    let script = String::from_utf8(script.body).expect("UTF-8");
    assert!(script.contains("LINKAGE='dynamic: needs /"), "{script}");
    assert_eq!(get(node.addr, "/install/local-nix-cache").status, 404);
    let dir = tempfile::tempdir().expect("dir");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env_clear()
        .env("HOME", &home)
        .env("PATH", "/usr/bin:/bin")
        .env("LNC_MODE", "user")
        .stdin(Stdio::null())
        .output()
        .expect("run the script");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("would not run here") && said.contains("--install-binary"),
        "{said}"
    );
    assert!(!home.join(".local").exists(), "nothing installed: {said}");
    drop(node);

    // Told to hand out the static build: that is what a newcomer gets, byte for byte.
    let mut args = serve_args(host.store_addr());
    args.server.install_binary = Some(static_bin.clone());
    let node = TestNode::start(args);
    let served = get(node.addr, "/install/local-nix-cache");
    assert_eq!(served.status, 200);
    assert_eq!(
        served.body,
        std::fs::read(&static_bin).expect("read"),
        "the static build"
    );
    let script = String::from_utf8(get(node.addr, "/install").body).expect("UTF-8");
    assert!(
        script.contains("LINKAGE='static'") && script.contains(&sha256_file(&static_bin)),
        "{script}"
    );
    drop(node);

    // Told to hand out a dynamic build: refused at start, naming it.
    let mut args = serve_args(host.store_addr());
    let dynamic = std::path::PathBuf::from(bin());
    args.server.install_binary = Some(dynamic.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let err = rt
        .block_on(async { local_nix_cache::node::start(&args, tokio_util::sync::CancellationToken::new()).err() })
        .expect("a dynamic install binary is refused at start")
        .to_string();
    assert!(
        err.contains(&dynamic.display().to_string()) && err.contains("needs the loader"),
        "{err}"
    );
}
