//! In-process fake binary caches on loopback, honest or hostile, and a proxy wired to them.
//! Nothing here needs Nix or root: NARs are made by the crate's own NAR writer and narinfo is
//! signed with the committed test key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::forge;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use local_nix_cache::beacon::wire::{NodeId, FLAG_NAR_NONE};
use local_nix_cache::beacon::PeerTable;
use local_nix_cache::cache_url::{self, NODE_HEADER};
use local_nix_cache::http::{self as h, Body};
use local_nix_cache::narinfo::{
    Compression, NarHash, NarInfo, PublicKey, SecretKey, StorePath, StorePathHash, TrustedKeys,
};
use local_nix_cache::proxy::summaries::PeerSummaries;
use local_nix_cache::proxy::{spool::SpoolLimits, Proxy, ProxyConfig};
use local_nix_cache::settings::{self, PeerCompression};
use local_nix_cache::status::ProxyWithPages;
use local_nix_cache::summary;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/narinfo");

pub fn test_key() -> SecretKey {
    SecretKey::parse(&std::fs::read_to_string(format!("{DATA}/test-hydra-1.sec")).expect("key")).expect("parse")
}

pub fn trusted() -> TrustedKeys {
    TrustedKeys::new(vec![test_key().public()])
}

/// A store path with its NAR and a correctly signed narinfo.
#[derive(Clone)]
pub struct FakePath {
    pub path: StorePath,
    pub nar: Bytes,
    pub info: NarInfo,
}

impl FakePath {
    /// A directory tree of `size` bytes of pseudo-random content, as a NAR.
    pub fn new(name: &str, size: usize, seed: u8) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("out");
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        let data: Vec<u8> = (0..size)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[0] ^ seed)
            .collect();
        std::fs::write(root.join("bin/data"), &data).expect("write");
        std::os::unix::fs::symlink("bin/data", root.join("link")).expect("symlink");
        let mut nar = Vec::new();
        local_nix_cache::store::dump::dump(&root, |c| {
            nar.extend_from_slice(&c);
            true
        })
        .expect("dump");
        let digest: [u8; 32] = sha2::Sha256::digest(&nar).into();
        let nar_hash = NarHash::from_digest(digest);
        let id: [u8; 32] = sha2::Sha256::digest(format!("{name}/{seed}")).into();
        let hash: String = id
            .iter()
            .map(|b| b"0123456789abcdfghijklmnpqrsvwxyz"[(*b % 32) as usize] as char)
            .collect();
        let path = StorePath::parse("/nix/store", &format!("/nix/store/{hash}-{name}")).expect("path");
        let mut info = NarInfo {
            store_path: path.clone(),
            url: format!("nar/{}.nar", nar_hash.to_nix32()),
            compression: Compression::None,
            file_hash: None,
            file_size: None,
            nar_hash,
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        info.sigs = vec![test_key().sign(&info.fingerprint())];
        Self {
            path,
            nar: Bytes::from(nar),
            info,
        }
    }

    pub fn hash(&self) -> String {
        self.path.hash().to_string()
    }

    /// The request path of its NAR at a store server or proxy: `/` and [`cache_url::nar_url`].
    pub fn nar_url(&self) -> String {
        format!("/{}", cache_url::nar_url(&self.path.hash(), &self.info.nar_hash))
    }
}

/// How a fake cache answers one URL.
#[derive(Clone)]
pub enum Reply {
    /// 200 with this body, after `delay`; honours `Range: bytes=N-` (206).
    Ok {
        body: Bytes,
        delay: Duration,
    },
    Status(u16),
    /// Sends `first` bytes of a body announced as `total`, then aborts the connection.
    Truncated {
        body: Bytes,
        cut: usize,
    },
    /// Sends `first` bytes, then nothing, forever (slowloris).
    Stall {
        body: Bytes,
        cut: usize,
    },
    /// 200 that never ends.
    Endless,
    /// 302 to this URL.
    Redirect(String),
    /// The body in pieces of `piece` bytes, one per `every`, until `gate` has a permit (the test
    /// adds one), then the rest at once: a slow source whose end the test decides.
    Gated {
        body: Bytes,
        piece: usize,
        every: Duration,
        gate: Arc<tokio::sync::Semaphore>,
    },
    /// The body, one byte per `every` (bounded), then an abort.
    Drip {
        body: Bytes,
        every: Duration,
    },
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Reply::Ok {
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn slow(body: impl Into<Bytes>, delay: Duration) -> Self {
        Reply::Ok {
            body: body.into(),
            delay,
        }
    }
}

/// A fake binary cache: URL path → reply; records the `Range` headers it saw.
#[derive(Default)]
pub struct FakeCache {
    pub routes: Mutex<HashMap<String, Reply>>,
    pub ranges: Mutex<Vec<String>>,
    pub requests: Mutex<Vec<String>>,
    /// The node id it names in every answer, as a store server does (set when it plays a peer).
    pub node: Mutex<Option<NodeId>>,
}

impl FakeCache {
    pub fn set(&self, path: &str, r: Reply) {
        self.routes.lock().expect("lock").insert(path.to_owned(), r);
    }

    /// Serves `p` honestly: its narinfo and NAR.
    pub fn serve_path(&self, p: &FakePath) {
        self.set(&format!("/{}.narinfo", p.hash()), Reply::ok(p.info.render()));
        self.set(&format!("/{}", p.info.url), Reply::ok(p.nar.clone()));
    }

    /// Publishes a content summary of the paths it serves (`GET /summary`), as version
    /// `version`; returns the version, for the announce.
    pub fn publish_summary(&self, version: u64) -> u64 {
        let keys: Vec<u64> = self
            .routes
            .lock()
            .expect("lock")
            .keys()
            .filter_map(|r| r.strip_prefix('/').and_then(|r| r.strip_suffix(".narinfo")))
            .map(|h| summary::key(&StorePathHash::parse(h).expect("hash")))
            .collect();
        let body = summary::encode_full(version, &keys).expect("summary");
        self.set("/summary", Reply::ok(body));
        version
    }

    pub fn requests_for(&self, suffix: &str) -> usize {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.ends_with(suffix))
            .count()
    }
}

impl h::Handler for FakeCache {
    async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path().to_owned();
        self.requests.lock().expect("lock").push(path.clone());
        let range = req
            .headers()
            .get(http::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(r) = &range {
            self.ranges.lock().expect("lock").push(r.clone());
        }
        let reply = self.routes.lock().expect("lock").get(&path).cloned();
        let node = *self.node.lock().expect("lock");
        let mut resp = Self::reply(reply, range).await;
        if let Some(n) = node {
            resp.headers_mut()
                .insert(NODE_HEADER, n.to_string().parse().expect("header value"));
        }
        resp
    }
}

impl FakeCache {
    async fn reply(reply: Option<Reply>, range: Option<String>) -> Response<Body> {
        match reply {
            None => h::not_found(),
            Some(Reply::Status(s)) => h::text(StatusCode::from_u16(s).expect("status"), "fake status\n"),
            Some(Reply::Ok { body, delay }) => {
                tokio::time::sleep(delay).await;
                // `bytes=A-` or `bytes=A-B`.
                let span = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(a, b)| {
                        let a = a.parse::<usize>().ok()?;
                        let b = if b.is_empty() {
                            body.len() - 1
                        } else {
                            b.parse::<usize>().ok()?
                        };
                        Some((a, b.min(body.len() - 1)))
                    })
                    .filter(|(a, b)| a <= b && *a < body.len());
                match span {
                    Some((a, b)) => {
                        let mut r = Response::new(Body::from(body.slice(a..=b)));
                        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                        r.headers_mut().insert(
                            http::header::CONTENT_RANGE,
                            format!("bytes {a}-{b}/{}", body.len()).parse().expect("hv"),
                        );
                        r
                    }
                    None => Response::new(Body::from(body)),
                }
            }
            Some(Reply::Truncated { body, cut }) => streamed(body, cut, false),
            Some(Reply::Stall { body, cut }) => streamed(body, cut, true),
            Some(Reply::Redirect(to)) => {
                let mut r = h::text(StatusCode::FOUND, "moved\n");
                r.headers_mut()
                    .insert(http::header::LOCATION, to.parse().expect("location"));
                r
            }
            Some(Reply::Drip { body, every }) => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let len = body.len();
                tokio::spawn(async move {
                    // Bounded: one byte per `every`, at most 60 bytes, then the connection ends.
                    for i in 0..len.min(60) {
                        if tx.send(Ok(body.slice(i..i + 1))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(every).await;
                    }
                    let _ = tx.send(Err(std::io::Error::other("fake drip ends"))).await;
                });
                let mut r = Response::new(Body::Stream(rx));
                r.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, len.to_string().parse().expect("hv"));
                r
            }
            Some(Reply::Gated {
                body,
                piece,
                every,
                gate,
            }) => {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                let len = body.len();
                tokio::spawn(async move {
                    let mut at = 0;
                    // Bounded: the body's length in pieces, then the rest once the gate opens.
                    while at < len {
                        let open = gate.try_acquire().is_ok();
                        let n = if open { len - at } else { piece.min(len - at) };
                        if tx.send(Ok(body.slice(at..at + n))).await.is_err() {
                            return;
                        }
                        at += n;
                        if !open {
                            tokio::time::sleep(every).await;
                        }
                    }
                });
                let mut r = Response::new(Body::Stream(rx));
                r.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, len.to_string().parse().expect("hv"));
                r
            }
            Some(Reply::Endless) => {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                tokio::spawn(async move {
                    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
                    // Bounded: stops after 4 GiB or when the client goes away.
                    for _ in 0..65_536 {
                        if tx.send(Ok(chunk.clone())).await.is_err() {
                            return;
                        }
                    }
                });
                Response::new(Body::Stream(rx))
            }
        }
    }
}

fn streamed(body: Bytes, cut: usize, stall: bool) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let len = body.len();
    tokio::spawn(async move {
        let _ = tx.send(Ok(body.slice(..cut))).await;
        if stall {
            // Hold the connection open without sending (bounded: the test ends first).
            tokio::time::sleep(Duration::from_secs(120)).await;
        } else {
            let _ = tx.send(Err(std::io::Error::other("fake truncation"))).await;
        }
    });
    let mut r = Response::new(Body::Stream(rx));
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, len.to_string().parse().expect("hv"));
    r
}

/// A runtime with fake caches and a proxy, all on 127.0.0.1.
pub struct Rig {
    pub rt: tokio::runtime::Runtime,
    pub table: Arc<PeerTable>,
    stop: CancellationToken,
    /// The proxies' state directory (proven peers), shared by every proxy of the rig, so a
    /// second proxy is this one restarted.
    pub state: tempfile::TempDir,
    /// Proxies started from now on pass proven peers' NARs through (the default, as `serve`).
    pub pass_through: std::sync::atomic::AtomicBool,
    /// Proxies started from now on fetch smaller NARs plain from zstd peers (`serve`'s default).
    pub peer_zstd_min_bytes: std::sync::atomic::AtomicU64,
    /// Proxies started from now on fetch from zstd peers so (default here: always zstd).
    pub peer_compression: std::sync::Mutex<PeerCompression>,
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

impl Rig {
    pub fn new() -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        Self {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
            table: Arc::new(PeerTable::new(NodeId([0xee; 16]))),
            stop: CancellationToken::new(),
            state: tempfile::tempdir().expect("state dir"),
            pass_through: std::sync::atomic::AtomicBool::new(true),
            peer_zstd_min_bytes: std::sync::atomic::AtomicU64::new(local_nix_cache::proxy::source::PEER_ZSTD_MIN_BYTES),
            peer_compression: std::sync::Mutex::new(PeerCompression::Zstd),
        }
    }

    /// Starts a fake cache; returns its address.
    pub fn cache(&self, c: Arc<FakeCache>) -> SocketAddr {
        self.cache_at(c, "127.0.0.1:0".parse().expect("addr"))
    }

    /// Starts a fake cache on `addr` (e.g. where a dead upstream used to be).
    pub fn cache_at(&self, c: Arc<FakeCache>, addr: SocketAddr) -> SocketAddr {
        let _g = self.rt.enter();
        let l = h::bind(addr).expect("bind");
        let addr = l.local_addr().expect("addr");
        self.rt.spawn(h::serve(l, c, self.stop.clone()));
        addr
    }

    /// Cancels the shutdown token of every server of the rig (proxy and fakes): they stop
    /// accepting and drain.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Starts a fake cache as peer `id` (naming that node id in its answers) and enters it in the
    /// peer table, as its beacon would.
    pub fn peer(&self, c: Arc<FakeCache>, id: u8) -> SocketAddr {
        self.peer_offering(c, id, FLAG_NAR_NONE)
    }

    /// As `peer`, announcing that it also sends NARs as `.nar.zst` (a store server's default).
    pub fn zstd_peer(&self, c: Arc<FakeCache>, id: u8) -> SocketAddr {
        self.peer_offering(c, id, FLAG_NAR_NONE | local_nix_cache::beacon::wire::FLAG_NAR_ZSTD)
    }

    fn peer_offering(&self, c: Arc<FakeCache>, id: u8, flags: u16) -> SocketAddr {
        *c.node.lock().expect("lock") = Some(NodeId([id; 16]));
        // Each peer on its own loopback address, as hosts of a LAN have theirs.
        let addr = self.cache_at(c, SocketAddr::from(([127, 1, 0, id], 0)));
        self.announce(addr, NodeId([id; 16]), flags, None);
        addr
    }

    /// As `peer`, announcing summary version `version` (whatever the fake serves at /summary).
    pub fn peer_with_announced_summary(&self, c: Arc<FakeCache>, id: u8, version: u64) -> SocketAddr {
        *c.node.lock().expect("lock") = Some(NodeId([id; 16]));
        let addr = self.cache_at(c, SocketAddr::from(([127, 1, 0, id], 0)));
        self.announce_full(addr, NodeId([id; 16]), FLAG_NAR_NONE, None, Some(version));
        addr
    }

    /// Pass-through tests (issue #16): peer 1 serves `PROVEN_AFTER` honest paths (`honest_size`
    /// bytes each), then a `lie_size` NAR with one byte flipped at `at`; peer 2 serves that NAR
    /// right but answers its narinfo 300 ms late, so peer 1 is asked first. Returns the honest
    /// paths and the lied-about one.
    pub fn proven_liar(
        &self,
        name: &str,
        honest_size: usize,
        lie_size: usize,
        seed: u8,
        at: usize,
    ) -> (Vec<FakePath>, FakePath) {
        let honest: Vec<FakePath> = (0..local_nix_cache::proxy::proven::PROVEN_AFTER)
            .map(|i| FakePath::new(&format!("{name}-honest{i}"), honest_size, seed + i as u8))
            .collect();
        let lie = FakePath::new(&format!("{name}-lie"), lie_size, seed + 10);
        let liar = Arc::new(FakeCache::default());
        for p in &honest {
            liar.serve_path(p);
        }
        liar.serve_path(&lie);
        let mut bad = lie.nar.to_vec();
        bad[at] ^= 1;
        liar.set(&format!("/{}", lie.info.url), Reply::ok(bad));
        let other = Arc::new(FakeCache::default());
        other.serve_path(&lie);
        other.set(
            &format!("/{}.narinfo", lie.hash()),
            Reply::slow(lie.info.render(), Duration::from_millis(300)),
        );
        self.peer(liar, 1);
        self.peer(other, 2);
        (honest, lie)
    }

    /// As `peer`, announcing the summary the fake publishes.
    pub fn peer_with_summary(&self, c: Arc<FakeCache>, id: u8) -> SocketAddr {
        let version = c.publish_summary(1);
        *c.node.lock().expect("lock") = Some(NodeId([id; 16]));
        let addr = self.cache_at(c, SocketAddr::from(([127, 1, 0, id], 0)));
        self.announce_full(addr, NodeId([id; 16]), FLAG_NAR_NONE, None, Some(version));
        addr
    }

    /// Enters node `node` at `addr` in the table as its announce would (e.g. a real store server
    /// with its flags, or a forged announce naming someone else's address).
    pub fn announce(&self, addr: SocketAddr, node: NodeId, flags: u16, hostname: Option<&str>) {
        self.announce_full(addr, node, flags, hostname, None);
    }

    fn announce_full(&self, addr: SocketAddr, node: NodeId, flags: u16, hostname: Option<&str>, summary: Option<u64>) {
        let b = forge::announce(node, addr.port())
            .flags(flags)
            .hostname(hostname)
            .summary(summary)
            .encode();
        let _g = self.rt.enter();
        self.table.handle(addr, &b, tokio::time::Instant::now());
    }

    /// Starts a proxy over the peer table and `upstreams`, trusting the committed test key.
    pub fn proxy(&self, upstreams: Vec<String>) -> (SocketAddr, Arc<Proxy>) {
        self.proxy_trusting(upstreams, trusted())
    }

    /// Starts a proxy over the peer table and `upstreams`; returns its address.
    pub fn proxy_trusting(&self, upstreams: Vec<String>, keys: TrustedKeys) -> (SocketAddr, Arc<Proxy>) {
        let _g = self.rt.enter();
        let spool = std::env::temp_dir().join(format!("lnc-test-spool-{}", std::process::id()));
        let p = Proxy::new(
            ProxyConfig {
                store_dir: "/nix/store".into(),
                keys,
                upstreams: upstreams.iter().map(|u| settings::upstream(u).expect("url")).collect(),
                spool: SpoolLimits::new(1 << 20, 16, 256, spool),
                peer_compression: *self.peer_compression.lock().expect("lock"),
                // The fakes and in-process store servers all live on loopback.
                loopback_peers: true,
                delivered: None,
                // Small, so tests exercise split fetches without huge fixtures (NARs of 4 MiB and
                // more; the other tests stay below).
                parallel_min_bytes: 4 << 20,
                pass_through: self.pass_through.load(std::sync::atomic::Ordering::Relaxed),
                peer_zstd_min_bytes: self.peer_zstd_min_bytes.load(std::sync::atomic::Ordering::Relaxed),
                state_dir: Some(self.state.path().to_owned()),
                partials: None,
            },
            Some(self.table.clone()),
        )
        .expect("proxy");
        let l = h::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = l.local_addr().expect("addr");
        let pages = Arc::new(ProxyWithPages(p.clone()));
        self.rt.spawn(h::serve(l, pages, self.stop.clone()));
        self.rt.spawn(PeerSummaries::run(p.clone(), self.stop.clone()));
        (addr, p)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An untrusted key, for narinfo that verifies against nothing we trust.
pub fn untrusted_key() -> SecretKey {
    SecretKey::from_seed("evil-1", [7; 32])
}

pub fn untrusted_public() -> PublicKey {
    untrusted_key().public()
}
