//! Shared test harness: a signed "hydra" cache built with real Nix, hosts with their own chroot
//! store and private nix-daemon, an in-process `serve` node, and a raw HTTP client.
//!
//! A test that needs Nix or network namespaces starts with `require!(nix)` / `require!(netns)`
//! ([`prereq`]): without them it skips locally, but FAILS under `CI`. Waiting is [`wait_for`].
#![allow(dead_code)]

pub mod cmd;
pub mod fake;
pub mod forge;
pub mod netns;
pub mod nixlan;
mod paths;
#[macro_use]
pub mod prereq;
pub mod roots;
pub mod wait;

pub use cmd::{nix, ok, output, run};
pub use paths::signed_paths;
pub use wait::{wait_for, wait_until};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use local_nix_cache::cli;
use local_nix_cache::node;
use local_nix_cache::settings::Settings;
use local_nix_cache::store::StoreAddr;
use tokio_util::sync::CancellationToken;

/// The signed upstream cache every test host is filled from.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    /// `test-hydra-1:...` public key.
    pub pk: String,
    pub sk_file: PathBuf,
    /// `file://` URL of the signed cache (xz-compressed NARs).
    pub cache_url: String,
    /// Top of a three-path closure: top → mid → leaf.
    pub top: String,
    /// All paths of that closure.
    pub closure: Vec<String>,
    /// A 32 MiB path (zeros), for streaming, ranges and stalled clients.
    pub big: String,
    /// An 8 MiB path of random bytes (incompressible: upstream's xz does not shrink it).
    pub rand: String,
}

const FIXTURE_NIX: &str = r#"
let
  mk = name: script: builtins.derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
  leaf = mk "lnc-test-leaf" "echo leaf > $out";
  mid = mk "lnc-test-mid" "mkdir -p $out/share; echo ${leaf} > $out/share/leaf; ln -s ${leaf} $out/link; seq 1 20000 > $out/share/numbers";
  top = mk "lnc-test-top" "mkdir -p $out/bin; printf '#!/bin/sh\necho ${mid}\n' > $out/bin/hello; chmod +x $out/bin/hello";
  big = mk "lnc-test-big" "dd if=/dev/zero of=$out bs=1M count=32 2>/dev/null";
  rand = mk "lnc-test-rand" "head -c 8388608 /dev/urandom > $out";
in { inherit top big rand; }
"#;

/// Built once per test binary.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("lnc-fixture")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_owned();
        let home = root.join("home");
        std::fs::create_dir_all(&home).expect("home");
        std::fs::write(root.join("fixture.nix"), FIXTURE_NIX).expect("write fixture.nix");
        let (sk, pk) = (root.join("sk"), root.join("pk"));
        run(nix("nix-store", &home)
            .args(["--generate-binary-cache-key", "test-hydra-1"])
            .arg(&sk)
            .arg(&pk));
        let built = run(nix("nix-build", &home).arg(root.join("fixture.nix")).args([
            "--no-out-link",
            "-A",
            "top",
            "-A",
            "big",
            "-A",
            "rand",
        ]));
        let mut lines = built.lines();
        let top = lines.next().expect("top").to_owned();
        let big = lines.next().expect("big").to_owned();
        let rand = lines.next().expect("rand").to_owned();
        let closure: Vec<String> = run(nix("nix-store", &home).args(["-qR", &top]))
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(closure.len(), 3, "closure: {closure:?}");
        let cache = root.join("cache");
        let to = format!("file://{}?secret-key={}&compression=xz", cache.display(), sk.display());
        run(nix("nix", &home).args(["copy", "--to", &to, &top, &big, &rand]));
        Fixture {
            pk: std::fs::read_to_string(&pk).expect("pk").trim().to_owned(),
            sk_file: sk,
            cache_url: format!("file://{}", cache.display()),
            top,
            closure,
            big,
            rand,
            root,
            _dir: dir,
        }
    })
}

/// The store-path hash part of a full path.
pub fn hash_of(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

/// One simulated host: a chroot store under its own directory and its private nix-daemon.
pub struct Host {
    pub dir: tempfile::TempDir,
    /// The chroot store (`--store ROOT`).
    pub root: PathBuf,
    pub socket: PathBuf,
    pub home: PathBuf,
    daemon: Option<Child>,
    /// When set: the daemon is this Nix root's (e.g. Nix 2.26 from `roots::nix226_root`), run
    /// chrooted with this host's directory bound at [`roots::HOST_MOUNT`].
    pub nix_root: Option<PathBuf>,
}

impl Host {
    /// A host whose store holds `paths` (with their closures), substituted from the signed cache,
    /// so they carry test-hydra-1 signatures.
    pub fn with_paths(paths: &[&str]) -> Self {
        Self::with_paths_on(paths, None)
    }

    /// As [`Self::with_paths`], with the daemon of the Nix in `nix_root` (a Debian root with
    /// `nix-bin`, see [`roots::nix226_root`]) instead of this machine's.
    pub fn with_paths_on(paths: &[&str], nix_root: Option<&Path>) -> Self {
        let dir = tempfile::Builder::new().prefix("lnc-host").tempdir().expect("tempdir");
        let root = dir.path().join("store");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        // Create the store (a daemon started on a store that does not exist yet can spin).
        run(nix("nix-store", &home).arg("--store").arg(&root).arg("--init"));
        let socket = dir.path().join("daemon.sock");
        let mut h = Self {
            dir,
            root,
            socket,
            home,
            daemon: None,
            nix_root: nix_root.map(Path::to_path_buf),
        };
        h.add_paths(paths);
        h.start_daemon();
        h
    }

    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = match &self.nix_root {
            None => {
                let mut c = nix("nix-daemon", &self.home);
                c.env("NIX_DAEMON_SOCKET_PATH", &self.socket)
                    .arg("--store")
                    .arg(&self.root);
                c
            }
            Some(r) => {
                let name = self.socket.file_name().expect("socket name").to_string_lossy();
                let mut c = roots::in_nix_root(r, self.dir.path(), "nix-daemon", &self.home);
                c.env("NIX_DAEMON_SOCKET_PATH", format!("{}/{name}", roots::HOST_MOUNT))
                    .args(["--store", &format!("{}/store", roots::HOST_MOUNT)]);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nix-daemon");
        self.daemon = Some(child);
        wait_until(
            "the nix-daemon socket",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || self.socket.exists(),
        );
    }

    /// Kills the daemon and the per-connection workers it forked (they `setsid`, so only their
    /// parent PID ties them to it): the hard case of a daemon restart, where every open
    /// connection dies.
    pub fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // Frozen first, so it cannot fork a worker between the scan and the kill.
            let _ = Command::new("kill")
                .args(["-STOP", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
            for pid in children_of(c.id()) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Substitutes `paths` (with their closures) into this host's store from the signed cache, so
    /// they carry test-hydra-1 signatures.
    pub fn add_paths(&self, paths: &[&str]) {
        if paths.is_empty() {
            return;
        }
        let f = fixture();
        run(nix("nix-store", &self.home)
            .arg("--store")
            .arg(&self.root)
            .arg("-r")
            .args(paths)
            .args(["--option", "substituters", &f.cache_url])
            .args(["--option", "trusted-public-keys", &f.pk]));
    }

    /// The physical directory of this host's store (`ROOT/nix/store`).
    pub fn physical_store(&self) -> String {
        self.root.join("nix/store").display().to_string()
    }

    pub fn store_addr(&self) -> StoreAddr {
        StoreAddr::Unix(self.socket.clone())
    }

    /// Adds a file as an unsigned, content-addressed path (as a local build would be: no sigs).
    pub fn add_unsigned(&self, name: &str, content: &str) -> String {
        let file = self.dir.path().join(name);
        std::fs::write(&file, content).expect("write");
        run(nix("nix-store", &self.home)
            .arg("--store")
            .arg(&self.root)
            .arg("--add")
            .arg(&file))
    }

    /// The reference NAR bytes of a path in this host's store. `nix-store --store ROOT --dump`
    /// would read the machine's /nix/store (a Nix 2.8 trap), so dump the physical directory.
    pub fn dump(&self, path: &str) -> Vec<u8> {
        let physical = self.root.join(path.trim_start_matches('/'));
        let out = output(nix("nix-store", &self.home).arg("--dump").arg(&physical));
        assert!(out.status.success(), "dump {}", physical.display());
        out.stdout
    }
}

/// PIDs whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|st| {
                // pid (comm) state ppid ...; comm may hold spaces, so split after ')'.
                let rest = &st[st.rfind(')')? + 2..];
                rest.split(' ').nth(1)?.parse::<u32>().ok()
            }) == Some(pid)
        })
        .collect()
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_daemon();
    }
}

/// `serve`'s settings for tests: loopback, port 0, the test key, no beacon (never beacon from the
/// root namespace), no upstream; every other value is `serve`'s own default (the flags are
/// defined once, in `cli`).
pub fn serve_args(store: StoreAddr) -> Settings {
    // Each node its own state directory (proven peers), never the user's.
    static NODES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let state = std::env::temp_dir().join(format!("lnc-test-state-{}-{n}", std::process::id()));
    cli::serve_settings([
        "--state-dir",
        &state.display().to_string(),
        "--store",
        &store.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--proxy-listen",
        "127.0.0.1:0",
        "--trusted-public-key",
        &fixture().pk,
        "--daemon-connections",
        "4",
        "--index-max-mib",
        "64",
        "--no-beacon",
        "--upstream",
        "none",
        "--spool-max-mib",
        "1024",
    ])
    .expect("test settings")
}

/// A node running in-process on its own runtime thread; stopped (and drained) on drop.
pub struct TestNode {
    pub addr: SocketAddr,
    /// The node id its store server names in every answer.
    pub node_id: local_nix_cache::beacon::wire::NodeId,
    /// Its proxy's first address (none when it listens nowhere).
    pub proxy_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestNode {
    pub fn start(args: Settings) -> Self {
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let node = node::start(&args, token).expect("start node");
                tx.send((node.addrs[0], node.node_id, node.proxy_addrs.first().copied()))
                    .expect("send addr");
                node.wait().await.expect("node ran and stopped cleanly");
            });
        });
        let (addr, node_id, proxy_addr) = rx.recv_timeout(Duration::from_secs(10)).expect("node started");
        Self {
            addr,
            node_id,
            proxy_addr,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one raw HTTP/1.1 request (`Connection: close`) with the path exactly as given (no
/// normalisation, so hostile paths reach the server unchanged) and reads the whole answer.
pub fn request(addr: SocketAddr, method: &str, path: &str, extra_headers: &[(&str, &str)]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    parse_response(&raw, method == "HEAD")
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[])
}

fn parse_response(raw: &[u8], head: bool) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head_text = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head_text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked && !head { dechunk(&body) } else { body };
    Resp { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
}

/// An `http://127.0.0.1:PORT/` URL where nothing listens (a port bound, then released): a
/// stopped upstream; connections are refused.
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}/", l.local_addr().expect("addr"))
}
