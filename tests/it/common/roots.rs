//! Other machines on this one: the static release binary in an empty root (no loader, no
//! libraries, as on NixOS), and the Debian 13 root with Nix 2.26 that `./run nix-root` builds.
//! Both skip locally when missing and FAIL under `CI`. Commands meant to run in a root go through
//! a private mount namespace (`unshare -m`, which execs: the PID stays the program's, so a test
//! stops exactly what it started) inside a network namespace the test made.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cmd;
use super::prereq::{self, missing};

/// The static release binary `./run build` makes (`LNC_RELEASE_BIN` overrides the path).
pub fn release_bin() -> Option<PathBuf> {
    let path = match std::env::var_os("LNC_RELEASE_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let out = Command::new("rustc").arg("-vV").output().ok()?;
            let host = String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))?;
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
            target.join(host).join("release/local-nix-cache")
        }
    };
    if path.is_file() {
        Some(path)
    } else {
        missing(
            &format!("the static release binary {}", path.display()),
            "`./run build` makes it; `./run test` builds it first",
        );
        None
    }
}

fn nix226_root_path() -> PathBuf {
    std::env::var_os("LNC_NIX_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/local-nix-cache/debian13-nix"))
}

/// The Nix 2.26 root for mixed LANs: like [`nix226_root`], but locally a missing root only
/// narrows the test (every host runs this machine's Nix), which it says.
pub fn nix226_root_for_mixed_lan() -> Option<PathBuf> {
    let root = nix226_root_path();
    if root.join(".complete").is_file() {
        return Some(root);
    }
    prereq::partly_missing(
        &format!("the Nix 2.26 root {}", root.display()),
        "`./run nix-root`",
        "every host runs this machine's Nix",
    );
    None
}

/// Where `./run nix-root` keeps the Debian 13 root with Nix 2.26.
pub fn nix226_root() -> Option<PathBuf> {
    let root = nix226_root_path();
    if root.join(".complete").is_file() {
        Some(root)
    } else {
        missing(
            &format!("the Debian 13 root with Nix 2.26 ({})", root.display()),
            "`./run nix-root` builds it; `./run test` does so first",
        );
        None
    }
}

/// `sh -c SCRIPT` in network namespace `ns` and a private mount namespace: `SCRIPT` sets up
/// mounts and ends with `exec chroot ...`. Arguments reach the script as `$1`, `$2`, ...
pub fn in_mount_ns(ns: &str, script: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "unshare", "-m", "--propagation", "private"])
        .args(["sh", "-euc", script, "sh"])
        .args(args);
    c
}

/// A root that holds nothing but the program: `/bin/local-nix-cache`, empty `/proc`, `/dev`,
/// `/tmp` (mount points) and `/sock` (where a daemon socket's directory gets bound). No
/// `/lib64`, no `/usr/lib`, no `/etc`.
pub struct EmptyRoot {
    pub dir: tempfile::TempDir,
}

impl EmptyRoot {
    pub fn new(bin: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lnc-emptyroot")
            .tempdir()
            .expect("tempdir");
        for d in ["bin", "proc", "dev", "tmp", "sock"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        std::fs::copy(bin, dir.path().join("bin/local-nix-cache")).expect("copy the binary");
        Self { dir }
    }

    /// `local-nix-cache ARGS` chrooted here, in network namespace `ns`, with `/proc` mounted,
    /// `/dev` bound and, if given, `sock_dir` bound on `/sock`.
    pub fn command(&self, ns: &str, sock_dir: Option<&Path>, args: &[&str]) -> Command {
        let root = self.dir.path().display().to_string();
        let sock = sock_dir.map(|p| p.display().to_string()).unwrap_or_default();
        let mut all = vec![root.as_str(), sock.as_str()];
        all.extend_from_slice(args);
        in_mount_ns(
            ns,
            r#"r=$1; s=$2; shift 2
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
mount -t tmpfs tmpfs "$r/tmp"
[ -z "$s" ] || mount --bind "$s" "$r/sock"
exec chroot "$r" /bin/local-nix-cache "$@""#,
            &all,
        )
    }
}

/// What the ELF file says about how it is linked and stripped.
#[derive(Debug)]
pub struct ElfFacts {
    /// A `PT_INTERP` header: needs a dynamic loader (e.g. `/lib64/ld-linux-x86-64.so.2`).
    pub interpreter: Option<String>,
    /// A `.symtab` section: not stripped.
    pub symtab: bool,
    /// A `.debug_info` section.
    pub debug_info: bool,
}

/// Reads a 64-bit little-endian ELF file's program and section headers.
pub fn elf_facts(bytes: &[u8]) -> ElfFacts {
    assert!(
        bytes.len() > 64 && &bytes[..4] == b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().expect("2 bytes")) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes")) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes")) as usize;
    let (phoff, shoff) = (u64_at(0x20), u64_at(0x28));
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    let (shentsize, shnum, shstrndx) = (u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let mut interpreter = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) == 3 {
            let (off, size) = (u64_at(ph + 8), u64_at(ph + 32));
            let s = String::from_utf8_lossy(&bytes[off..off + size]);
            interpreter = Some(s.trim_end_matches('\0').to_owned());
        }
    }
    let names_off = u64_at(shoff + shstrndx * shentsize + 24);
    let name = |sh: usize| {
        let start = names_off + u32_at(sh);
        let end = bytes[start..].iter().position(|&b| b == 0).map_or(start, |n| start + n);
        String::from_utf8_lossy(&bytes[start..end]).into_owned()
    };
    let names: Vec<String> = (0..shnum).map(|i| name(shoff + i * shentsize)).collect();
    ElfFacts {
        interpreter,
        symtab: names.iter().any(|n| n == ".symtab"),
        debug_info: names.iter().any(|n| n == ".debug_info"),
    }
}

/// Where [`in_nix_root`] binds a host's directory inside a Nix root.
pub const HOST_MOUNT: &str = "/mnt/lnc-host";

/// `sh -c` script for `ROOT HOST_DIR PROGRAM ARGS...`: mounts, then execs PROGRAM chrooted.
/// (No single quotes in it: [`nix_root_wrapper`] quotes it with them.)
const NIX_ROOT_SCRIPT: &str = r#"r=$1; d=$2; shift 2
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
mkdir -p "$r/mnt/lnc-host"
mount --bind "$d" "$r/mnt/lnc-host"
exec chroot "$r" "$@""#;

/// A shell script that runs `program` of the Nix in `root` as [`in_nix_root`] does, passing its
/// arguments on: put it in a `PATH` directory as `nix-daemon` and `serve --store stdio://...`
/// spawns Nix 2.26's `nix-daemon --stdio` children.
pub fn nix_root_wrapper(root: &Path, host_dir: &Path, program: &str) -> String {
    format!(
        "#!/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\nexec unshare -m --propagation private sh -euc '{NIX_ROOT_SCRIPT}' sh '{}' '{}' {program} \"$@\"\n",
        root.display(),
        host_dir.display()
    )
}

/// Kills (by PID) and reaps a child on drop, so a failing assertion leaves nothing running.
pub struct Reap(pub std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl` inside network namespace `ns`: the body of a 2xx answer.
pub fn curl(ns: &str, url: &str) -> Option<Vec<u8>> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sf", "--max-time", "10", url])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// `PROGRAM` of the Nix in `root`, chrooted, in a private mount namespace with `/proc`, `/dev`
/// and `host_dir` (on [`HOST_MOUNT`]) mounted; environment as [`cmd::nix`] sets it, so `home`
/// should be under `host_dir` (pass paths as seen inside: `HOST_MOUNT/...`). Execs all the way
/// down: the child's PID is the program's. The root's nix.conf has no build users, no sandbox.
pub fn in_nix_root(root: &Path, host_dir: &Path, program: &str, home: &Path) -> Command {
    in_nix_root_ns(None, root, host_dir, program, home)
}

/// [`in_nix_root`] inside network namespace `ns` (when given).
pub fn in_nix_root_ns(ns: Option<&str>, root: &Path, host_dir: &Path, program: &str, home: &Path) -> Command {
    let inner_home = home
        .strip_prefix(host_dir)
        .map(|rel| Path::new(HOST_MOUNT).join(rel))
        .unwrap_or_else(|_| PathBuf::from("/tmp"));
    let mut c = match ns {
        None => Command::new("unshare"),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "unshare"]);
            c
        }
    };
    c.args(["-m", "--propagation", "private", "sh", "-euc", NIX_ROOT_SCRIPT])
        .arg("sh")
        .arg(root)
        .arg(host_dir)
        .arg(program)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", inner_home)
        .env("NIX_CONFIG", "substituters =\nexperimental-features = nix-command")
        .env_remove("NIX_REMOTE");
    c
}

/// The Nix a test runs against: `Some(None)` this machine's (2.8), `Some(Some(root))` Nix 2.26
/// from the Debian 13 root; `None`: skip (missing locally; under CI it already failed).
pub fn nix_under_test(nix226: bool) -> Option<Option<PathBuf>> {
    if !prereq::nix() {
        return None;
    }
    if !nix226 {
        return Some(None);
    }
    nix226_root().map(Some)
}

/// A Nix client for one test: Debian's Nix 2.8 (`root` none) or Nix 2.26 run in `root`, with its
/// own chroot store and home in a temporary directory. Checks that it runs the version asked for.
pub struct ClientNix {
    dir: tempfile::TempDir,
    home: PathBuf,
    root: Option<PathBuf>,
    /// The chroot store as this Nix names it (for `--store`).
    pub store: String,
}

impl ClientNix {
    pub fn new(root: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        let store = match root {
            None => dir.path().join("store").display().to_string(),
            Some(_) => format!("{HOST_MOUNT}/store"),
        };
        let c = Self {
            dir,
            home,
            root: root.map(Path::to_owned),
            store,
        };
        let version = cmd::run(c.cmd("nix").arg("--version"));
        let want = if root.is_some() { "2.26" } else { "2.8" };
        assert!(version.contains(want), "{version}");
        c
    }

    /// `program` of this Nix.
    pub fn cmd(&self, program: &str) -> Command {
        match &self.root {
            None => cmd::nix(program, &self.home),
            Some(r) => in_nix_root(r, self.dir.path(), program, &self.home),
        }
    }

    /// The chroot store's directory as this test process sees it.
    pub fn physical_store(&self) -> PathBuf {
        self.dir.path().join("store")
    }
}
