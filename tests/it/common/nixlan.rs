//! Simulated LANs of real Nix hosts: each host is a network namespace with its own chroot store,
//! private nix-daemon and the real `local-nix-cache serve` binary; one more namespace plays the
//! upstream "hydra", serving the signed fixture cache over HTTP. Everything is stopped (by PID)
//! and deleted on drop, even when a test fails. The LAN is mixed: every second host (host2,
//! host4, ...) runs Nix 2.26 (daemon and client, from `roots::nix226_root`), the others this
//! machine's Nix 2.8.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::cmd::{nix, output, run};
use super::netns::{Lan, NetHost};
use super::roots::{self, HOST_MOUNT};
use super::wait::{wait_for, wait_until};
use super::{fixture, Host};

/// The `serve` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_local-nix-cache")
}

/// One host of the LAN.
pub struct NixHost {
    pub name: String,
    pub net: NetHost,
    /// Store and daemon (the daemon's unix socket needs no network).
    pub store: Host,
    serve: Option<Child>,
    log: PathBuf,
}

/// `serve`'s flags for a test host, besides store, upstream, key and spool.
pub const DEFAULT_SERVE_ARGS: &[&str] = &[
    "--listen",
    "0.0.0.0:8380",
    "--interface",
    "eth0",
    "--announce-interval",
    "1s",
];

impl NixHost {
    /// `ip netns exec` a command as this host, with a clean Nix environment.
    pub fn nix_cmd(&self, program: &str) -> Command {
        if let Some(r) = &self.store.nix_root {
            return roots::in_nix_root_ns(Some(&self.net.ns), r, self.store.dir.path(), program, &self.store.home);
        }
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.net.ns])
            .arg("env")
            .arg(format!("HOME={}", self.store.home.display()))
            .arg("PATH=/usr/bin:/bin")
            .arg("NIX_CONFIG=substituters =\nexperimental-features = nix-command")
            .arg(program);
        c
    }

    /// This host's store as its Nix client ([`Self::nix_cmd`]) names it.
    pub fn client_store(&self) -> String {
        self.client_path(&self.store.root)
    }

    /// A path under this host's directory as its Nix client sees it.
    pub fn client_path(&self, p: &std::path::Path) -> String {
        match (&self.store.nix_root, p.strip_prefix(self.store.dir.path())) {
            (Some(_), Ok(rel)) => std::path::Path::new(HOST_MOUNT).join(rel).display().to_string(),
            _ => p.display().to_string(),
        }
    }

    /// `nix --version` of this host's client.
    pub fn nix_version(&self) -> String {
        run(self.nix_cmd("nix").arg("--version"))
    }

    /// Starts `serve` in this host's namespace. `upstream`: URL or `none`.
    pub fn start_serve(&mut self, upstream: &str) {
        self.start_serve_args(upstream, DEFAULT_SERVE_ARGS);
    }

    /// [`Self::start_serve`] with another build of the binary (e.g. the static release one).
    pub fn start_serve_with(&mut self, binary: &std::path::Path, upstream: &str) {
        self.start_serve_full(binary, upstream, DEFAULT_SERVE_ARGS);
    }

    /// [`Self::start_serve`] handing `install_binary` (a static build) to the one-liner, as a
    /// host whose own binary is dynamic (this test build, or Nix's ordinary rustPlatform) must.
    pub fn start_serve_handing_out(&mut self, upstream: &str, install_binary: &std::path::Path) {
        let path = install_binary.display().to_string();
        let mut args = DEFAULT_SERVE_ARGS.to_vec();
        args.extend(["--install-binary", path.as_str()]);
        self.start_serve_full(std::path::Path::new(bin()), upstream, &args);
    }

    /// Starts `serve` with `args` instead of the default listen address, interface and announce
    /// interval (e.g. every interface, as the NixOS module and the one-liner run it).
    pub fn start_serve_args(&mut self, upstream: &str, args: &[&str]) {
        self.start_serve_full(std::path::Path::new(bin()), upstream, args);
    }

    fn start_serve_full(&mut self, binary: &std::path::Path, upstream: &str, args: &[&str]) {
        assert!(self.serve.is_none(), "{} already serves", self.name);
        let log = std::fs::File::create(&self.log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.net.ns])
            .arg(binary)
            .arg("serve")
            .arg("--store")
            .arg(format!("unix://{}", self.store.socket.display()))
            // Unless `args` say otherwise (`none`: every NAR through the daemon).
            .args(
                Some(["--real-store-dir", &self.store.physical_store()])
                    .filter(|_| !args.contains(&"--real-store-dir"))
                    .into_iter()
                    .flatten(),
            )
            .args(args)
            .args(["--upstream", upstream, "--trusted-public-key", &fixture().pk])
            .arg("--spool-dir")
            .arg(self.store.dir.path().join("spool"))
            .arg("--state-dir")
            .arg(self.store.dir.path().join("state"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        self.serve = Some(child);
        let up = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            self.http("http://127.0.0.1:8381/nix-cache-info").is_some()
        });
        assert!(up.is_some(), "{}: serve did not come up: {}", self.name, self.log());
    }

    /// SIGTERM (clean: the beacon says goodbye) or SIGKILL (as if the host died).
    pub fn stop_serve(&mut self, kill: bool) {
        if let Some(mut c) = self.serve.take() {
            let sig = if kill { "-KILL" } else { "-TERM" };
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
            let exited = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if exited.is_some() {
                return;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True while `serve` runs.
    pub fn serving(&mut self) -> bool {
        self.serve.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET from inside this host's namespace; the body on 2xx.
    pub fn http(&self, url: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.net.ns, "curl", "-sf", "--max-time", "10", url])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The proxy's `/status.json`.
    pub fn status(&self) -> serde_json::Value {
        let body = self
            .http("http://127.0.0.1:8381/status.json")
            .unwrap_or_else(|| "{}".into());
        serde_json::from_str(&body).unwrap_or_default()
    }

    /// Node ids in this host's peer table.
    pub fn peer_addrs(&self) -> Vec<String> {
        let mut v: Vec<String> = self.status()["peers"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["addr"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// `nix-store -r` of `paths` into this host's store, with this host's proxy as the only
    /// substituter (as a user of the product would).
    pub fn realise(&self, paths: &[&str]) -> Output {
        output(&mut self.realise_cmd(paths))
    }

    /// The command [`Self::realise`] runs, to spawn many at once (a crowd).
    pub fn realise_cmd(&self, paths: &[&str]) -> Command {
        let mut c = self.nix_cmd("nix-store");
        c.arg("--store")
            .arg(self.client_store())
            .arg("-r")
            .args(paths)
            .args(["--option", "substituters", "http://127.0.0.1:8381"])
            .args(["--option", "trusted-public-keys", &fixture().pk]);
        c
    }

    /// Limits this host's egress (everything it sends on the LAN: its store server's NARs above
    /// all) with `tc tbf` at `rate` (e.g. `200mbit`), as a laptop's link would.
    pub fn shape_egress(&self, rate: &str) {
        tbf(&self.net.ns, rate, LAN_BURST, LAN_LATENCY);
    }

    /// Bytes this host has put on its link so far (`eth0`'s transmit counter: headers,
    /// acknowledgements and beacons included, about 1.5 % over the payload it streamed).
    pub fn tx_bytes(&self) -> u64 {
        link_tx_bytes(&self.net.ns)
    }

    /// `nix store verify` of `path`'s closure in this host's store (content and signatures).
    pub fn verify(&self, path: &str) -> Output {
        let mut c = self.nix_cmd("nix");
        c.args(["store", "verify", "--store"]).arg(self.client_store()).args([
            "-r",
            path,
            "--option",
            "trusted-public-keys",
            &fixture().pk,
        ]);
        output(&mut c)
    }

    pub fn has(&self, path: &str) -> bool {
        let out = output(
            nix("nix-store", &self.store.home)
                .arg("--store")
                .arg(&self.store.root)
                .args(["--check-validity", path]),
        );
        out.status.success()
    }

    /// Signatures on `path` in this host's store.
    pub fn sigs(&self, path: &str) -> String {
        run(nix("nix", &self.store.home)
            .args(["path-info", "--sigs", "--store"])
            .arg(&self.store.root)
            .arg(path))
    }
}

impl Drop for NixHost {
    fn drop(&mut self) {
        self.stop_serve(true);
    }
}

/// Burst and queue of a shaped LAN link ([`NixHost::shape_egress`]): 64 KiB at once (about
/// 2.6 ms at 200 Mbit/s), and at most 50 ms of queue, as a switch port would hold.
const LAN_BURST: &str = "64kb";
const LAN_LATENCY: &str = "50ms";

/// `tc qdisc replace ... root tbf` on `eth0` of namespace `ns`.
fn tbf(ns: &str, rate: &str, burst: &str, latency: &str) {
    let st = Command::new("ip")
        .args([
            "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
        ])
        .args(["rate", rate, "burst", burst, "latency", latency])
        .status()
        .expect("tc");
    assert!(st.success(), "tc tbf failed");
}

/// `eth0`'s transmit byte counter in namespace `ns`.
fn link_tx_bytes(ns: &str) -> u64 {
    let out = run(Command::new("ip").args(["-n", ns, "-j", "-s", "link", "show", "dev", "eth0"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    v[0]["stats64"]["tx"]["bytes"].as_u64().expect("tx bytes")
}

/// The upstream "hydra": the signed fixture cache over HTTP.
pub struct Upstream {
    pub net: NetHost,
    server: Child,
    /// The server's request log (one line per request), to count what the LAN asked upstream.
    log: tempfile::NamedTempFile,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}:8080", self.net.ip4)
    }

    /// Limits the upstream's egress (what hosts download from it) with `tc tbf`.
    pub fn shape(&self, rate: &str) {
        tbf(&self.net.ns, rate, "32kbit", "400ms");
    }

    /// GET requests the upstream answered so far whose path contains `part` (e.g. `/nar/`, or
    /// `.narinfo`).
    pub fn gets(&self, part: &str) -> usize {
        std::fs::read_to_string(self.log.path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET ") && l.contains(part))
            .count()
    }

    /// Bytes the upstream has put on its link so far.
    pub fn tx_bytes(&self) -> u64 {
        link_tx_bytes(&self.net.ns)
    }

    pub fn stop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct NixLan {
    pub hosts: Vec<NixHost>,
    pub upstream: Upstream,
    /// Declared last: namespaces go after the processes in them.
    pub lan: Lan,
}

impl NixLan {
    /// `stores[i]` lists the paths host i starts with (substituted from the signed cache, so
    /// they carry test-hydra-1 signatures). The upstream is the last namespace.
    pub fn new(stores: &[&[&str]]) -> Self {
        let lan = Lan::new(stores.len() + 1);
        let up_net = lan.hosts[stores.len()].clone();
        let cache = fixture().cache_url.trim_start_matches("file://").to_owned();
        let log = tempfile::Builder::new()
            .prefix("lnc-upstream")
            .tempfile()
            .expect("upstream log");
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &up_net.ns,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
            ])
            .arg(up_net.ip4.to_string())
            .args(["--directory", &cache])
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("upstream log"))
            .spawn()
            .expect("spawn upstream http server");
        let upstream = Upstream {
            net: up_net,
            server,
            log,
        };
        let nix226 = roots::nix226_root_for_mixed_lan();
        let hosts = stores
            .iter()
            .enumerate()
            .map(|(i, paths)| {
                let nix_root = nix226.as_deref().filter(|_| i % 2 == 1);
                let store = Host::with_paths_on(paths, nix_root);
                let log = store.dir.path().join("serve.log");
                NixHost {
                    name: format!("host{}", i + 1),
                    net: lan.hosts[i].clone(),
                    store,
                    serve: None,
                    log,
                }
            })
            .collect();
        let me = Self { hosts, upstream, lan };
        wait_until(
            "the upstream comes up",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                me.hosts[0]
                    .http(&format!("{}/nix-cache-info", me.upstream.url()))
                    .is_some()
            },
        );
        me
    }

    /// Starts `serve` on every host with the given upstream URL (or `none`).
    pub fn serve_all(&mut self, upstream: &str) {
        for h in &mut self.hosts {
            h.start_serve(upstream);
        }
    }

    /// Waits until host `i` lists exactly the hosts `others` as peers.
    pub fn wait_peers(&self, i: usize, others: &[usize], limit: Duration) -> Option<Duration> {
        let mut want: Vec<String> = others
            .iter()
            .map(|j| format!("{}:8380", self.hosts[*j].net.ip4))
            .collect();
        want.sort();
        wait_for(limit, Duration::from_millis(20), || self.hosts[i].peer_addrs() == want)
    }
}
