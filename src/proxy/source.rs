//! Where narinfo and NARs come from: LAN peers (from the beacon's table) and upstream caches.
//!
//! Peers are reached as `http://<node id>.peer:<port>/`, resolved through the peer table, so a
//! peer's current address (IPv4, or IPv6 link-local with its scope) is used without putting zone
//! ids in URLs. Everything a source sends is untrusted: narinfo is checked here (path, signature,
//! compression), NAR bytes by the caller's spool.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use tokio::io::AsyncRead;
use url::Url;

use super::forms::Form;
use crate::beacon::{wire::NodeId, PeerTable};
use crate::cache_url::{Load, BUSY_OK_HEADER, LOAD_HEADER, NODE_HEADER, PARTIAL_HEADER};
use crate::narinfo::{Compression, NarInfo, StorePathHash, TrustedKeys, MAX_NARINFO_BYTES};

/// Host-name suffix that the resolver maps to a peer of the table.
const PEER_SUFFIX: &str = ".peer";

/// One place to ask.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SourceId {
    Peer(NodeId),
    /// Index into the configured upstreams.
    Upstream(usize),
}

/// Why a source's answer was not used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// A peer's NAR request (our own client, `http::client`) got no answer that can be read.
    #[error("request failed: {0}")]
    Client(#[from] crate::http::client::ClientError),
    #[error("status {0}")]
    Status(u16),
    #[error("narinfo over {MAX_NARINFO_BYTES} bytes")]
    TooLarge,
    #[error("narinfo does not parse: {0}")]
    Parse(#[from] crate::narinfo::ParseError),
    #[error("narinfo is for {0}, not the path asked for")]
    WrongPath(String),
    #[error("narinfo has no signature by a trusted key")]
    Untrusted,
    #[error("NAR compression {0:?} not supported")]
    Compression(String),
    #[error("reading the NAR: {0}")]
    Read(#[source] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("peer no longer in the table")]
    Gone,
    /// The server at the peer's address is not the node that announced it (a forged announce
    /// naming someone else's address, or an address reused by another host).
    #[error("the server at the peer's address is {}, not the node announced", found.map_or("no node".to_owned(), |n| format!("node {n}")))]
    NotThePeer {
        /// The node id the server named (none: no id, or one that does not parse).
        found: Option<NodeId>,
        /// The address that answered (where the impostor mark goes).
        at: Option<SocketAddr>,
    },
    #[error("sent less than {min_bytes} bytes in {window:?}")]
    TooSlow { min_bytes: u64, window: Duration },
    #[error("bad NAR URL {0:?}")]
    Url(String),
    #[error("sent more than the {0} bytes asked for")]
    Overrun(u64),
    #[error("ended after {got} of {want} bytes")]
    Short { got: u64, want: u64 },
    /// A peer's store server has no transfer slot free now (503): not a failure and not a lie;
    /// the fetch tries the NAR's other sources and comes back after `retry_after` (issue #24).
    #[error("busy, retry after {retry_after:?}")]
    Busy {
        retry_after: Duration,
        /// Peers the busy server names as streaming the NAR from it now (`cache_url::TRY_HEADER`;
        /// at most `cache_url::MAX_TRY_HINTS`): they serve what they have.
        hints: Vec<NodeId>,
    },
}

/// The shortest and longest wait a busy answer's `Retry-After` is taken as (a peer's header is
/// untrusted: it cannot make the proxy ask again at once, nor wait for long).
pub const BUSY_RETRY_BOUNDS: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// The `Retry-After` of a busy answer (whole seconds), within [`BUSY_RETRY_BOUNDS`].
fn busy_retry_after(headers: &HeaderMap) -> Duration {
    let secs = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs).clamp(BUSY_RETRY_BOUNDS.0, BUSY_RETRY_BOUNDS.1)
}

/// The node ids a busy answer names (`cache_url::TRY_HEADER`), at most `MAX_TRY_HINTS`; what
/// does not parse is skipped.
fn busy_hints(headers: &HeaderMap) -> Vec<NodeId> {
    headers
        .get(crate::cache_url::TRY_HEADER)
        .and_then(|v| v.to_str().ok())
        .into_iter()
        .flat_map(|v| v.split(','))
        .take(crate::cache_url::MAX_TRY_HINTS)
        .filter_map(|n| n.trim().parse::<NodeId>().ok())
        .collect()
}

/// The load a peer's store server told in its answer (none: not told, or not parseable).
fn load_of(resp: &reqwest::Response) -> Option<Load> {
    Load::parse(resp.headers().get(LOAD_HEADER)?.to_str().ok()?)
}

impl SourceError {
    /// The source could not be reached or did not answer in time (offline, down).
    pub fn is_unreachable(&self) -> bool {
        match self {
            SourceError::Http(e) => e.is_connect() || e.is_timeout(),
            SourceError::Client(e) => e.is_connect(),
            SourceError::Timeout => true,
            _ => false,
        }
    }

    /// The connection could not be made (refused, no route, connect timeout): worth one more
    /// try on a link that just came up. Not a server that accepted and then said nothing.
    pub fn is_connect_failure(&self) -> bool {
        match self {
            SourceError::Http(e) => e.is_connect(),
            SourceError::Client(e) => e.is_connect(),
            _ => false,
        }
    }

    /// A source that sent something false (not merely failed): worth a harsher back-off.
    pub fn is_lie(&self) -> bool {
        matches!(
            self,
            SourceError::Parse(_)
                | SourceError::WrongPath(_)
                | SourceError::Untrusted
                | SourceError::TooLarge
                | SourceError::Overrun(_)
        )
    }
}

/// A narinfo that passed every check, with where its NAR is.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub source: SourceId,
    /// Shared: caches hold one copy per source, however often it is cloned.
    pub info: Arc<NarInfo>,
    /// The NAR URL, resolved against the source's base.
    pub nar_url: Url,
    /// A peer (our store server) that offers zstd also sends this NAR compressed on the fly at
    /// `<nar_url>.zst`: whether it is fetched so is decided per fetch (`forms`).
    pub zstd: bool,
    /// The load the peer's store server told with its narinfo (none for upstreams): sources
    /// are tried least loaded first (issue #24).
    pub load: Option<Load>,
    /// The peer is itself fetching this NAR and serves the bytes it has so far
    /// (`cache_url::PARTIAL_HEADER`): verified whole here, never passed through, never split.
    pub partial: bool,
}

impl Candidate {
    /// Uncompressed NARs can be resumed with `Range`.
    pub fn resumable(&self) -> bool {
        self.info.compression == Compression::None
    }

    /// The URL of the NAR's `.zst` form (only for a candidate that offers it).
    fn zstd_url(&self) -> Url {
        let mut u = self.nar_url.clone();
        let zst = format!("{}.zst", u.path());
        u.set_path(&zst);
        u
    }
}

/// Resolves `<node id>.peer` through the peer table; other names through the system resolver.
struct PeerResolver {
    table: Option<Arc<PeerTable>>,
    /// Whether peers on loopback addresses may be reached (tests and one-machine benchmarks;
    /// beacons from the network never carry one, and nothing else may point the proxy at this
    /// host's own services).
    loopback_peers: bool,
    /// resolv.conf's nameservers, not getaddrinfo (the static binary has no NSS).
    system: Arc<crate::dns::SystemResolver>,
}

/// An address a peer may be reached at: a unicast address of another host.
fn peer_addr_allowed(a: &SocketAddr, loopback_peers: bool) -> bool {
    let ip = a.ip().to_canonical();
    !(ip.is_unspecified() || ip.is_multicast() || (ip.is_loopback() && !loopback_peers) || a.port() == 0)
}

/// The addresses of a peer's entry that it may be reached at ([`peer_addr_allowed`]), in order:
/// what the resolver hands reqwest, and where `source::nar` connects.
fn reachable_addrs(addrs: Vec<SocketAddr>, loopback_peers: bool) -> Vec<SocketAddr> {
    addrs
        .into_iter()
        .filter(|a| peer_addr_allowed(a, loopback_peers))
        .collect()
}

impl reqwest::dns::Resolve for PeerResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        let table = self.table.clone();
        let loopback_peers = self.loopback_peers;
        let system = self.system.clone();
        Box::pin(async move {
            if let Some(node) = name.strip_suffix(PEER_SUFFIX).and_then(|n| n.parse::<NodeId>().ok()) {
                let peer = table.and_then(|t| t.get(&node)).ok_or("peer not in the table")?;
                let addrs = reachable_addrs(peer.addrs, loopback_peers);
                if addrs.is_empty() {
                    return Err("the peer announced no address it may be reached at".into());
                }
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let addrs: Vec<SocketAddr> = system.lookup(&name).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A peer's answer must come from the node that announced the address: its store server names
/// its node id in [`NODE_HEADER`]. Upstreams are not checked.
fn check_node(s: &SourceId, headers: &HeaderMap, at: Option<SocketAddr>) -> Result<(), SourceError> {
    let SourceId::Peer(node) = s else {
        return Ok(());
    };
    let found = headers
        .get(NODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|n| n.parse::<NodeId>().ok());
    if found == Some(*node) {
        return Ok(());
    }
    Err(SourceError::NotThePeer { found, at })
}

/// Timeouts per kind of source.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// Whole narinfo request.
    pub narinfo: Duration,
    /// Longest silence while reading a NAR.
    pub idle: Duration,
}

pub const PEER_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_millis(500),
    narinfo: Duration::from_secs(3),
    idle: Duration::from_secs(5),
};

/// Whole summary request to a peer.
pub const SUMMARY_TIMEOUT: Duration = Duration::from_secs(5);

pub const UPSTREAM_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(3),
    narinfo: Duration::from_secs(15),
    idle: Duration::from_secs(30),
};

/// The HTTP clients and the list of sources.
pub struct Sources {
    peers: Option<Arc<PeerTable>>,
    pub upstreams: Vec<Url>,
    /// Narinfo and summaries from peers.
    peer_client: reqwest::Client,
    /// Peers' NARs under [`OWN_CONNECTION_MIN_BYTES`], on a pool of their own (a store server
    /// sends a NAR-first connection's NARs with sendfile); larger ones go on a connection each
    /// (`source::nar`).
    peer_nar_client: reqwest::Client,
    upstream_client: reqwest::Client,
    store_dir: String,
    keys: TrustedKeys,
    /// See [`PeerResolver::loopback_peers`].
    loopback_peers: bool,
}

/// A peer's NAR this large or larger is asked for on a connection of its own (`http::client`)
/// and read on the fetch's task: 1 MiB, one read chunk. A smaller one goes on reqwest's pool,
/// whose connections are reused: a connection per NAR costs a handshake, and an accept and an
/// admission slot on the holder, each (a closure of 301 NARs, most under 1 MiB, took 326
/// connections to the peer instead of 40, `docs/benchmarks.md`), which a crowd multiplies;
/// what its reads save is per byte.
pub const OWN_CONNECTION_MIN_BYTES: u64 = 1024 * 1024;

/// NARs smaller than this are fetched plain from peers even when zstd is on: compressing saves
/// a few milliseconds of link time on them at most, and costs the peer an encoder (about
/// 1.3 MiB of state) and the proxy a decoder per NAR. Most NARs of a closure are this small
/// (issue #16: 188 of 301, 14 of 636 MiB, in bench/closure.sh).
pub const PEER_ZSTD_MIN_BYTES: u64 = 256 * 1024;

/// A client could not be built with its policies (its TLS backend, the peer resolver, the
/// no-redirect rule): the proxy does not start rather than fall back to a client without them.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the {which} HTTP client: {source}")]
pub struct ClientError {
    /// "peer" or "upstream".
    pub which: &'static str,
    #[source]
    pub source: reqwest::Error,
}

/// The `User-Agent` of every request.
const USER_AGENT: &str = concat!("local-nix-cache/", env!("CARGO_PKG_VERSION"));

/// Builds the peer clients (NARs have their own pool) and the upstream client, all resolving
/// through `resolver`. The peer clients follow no redirect and use no HTTP proxy; a client that
/// cannot be built so is an error, never a default client.
fn build_clients(resolver: Arc<PeerResolver>, user_agent: &str) -> Result<[reqwest::Client; 3], ClientError> {
    let build = |t: Timeouts, which: &'static str| {
        let mut b = reqwest::Client::builder()
            .connect_timeout(t.connect)
            .read_timeout(t.idle)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(user_agent)
            .dns_resolver(resolver.clone());
        if which == "peer" {
            // A peer is asked for its own paths on its own address: a redirect could point
            // the proxy anywhere (this host's loopback services, a victim), so it is a
            // failed answer, never followed. No HTTP proxy between LAN hosts either.
            b = b.no_proxy().redirect(reqwest::redirect::Policy::none());
        }
        b.build().map_err(|source| ClientError { which, source })
    };
    let peer = || build(PEER_TIMEOUTS, "peer");
    Ok([peer()?, peer()?, build(UPSTREAM_TIMEOUTS, "upstream")?])
}

impl Sources {
    /// The clients and the list of sources; an error when a client cannot be built with its
    /// policies.
    pub fn new(
        peers: Option<Arc<PeerTable>>,
        upstreams: Vec<Url>,
        store_dir: String,
        keys: TrustedKeys,
        loopback_peers: bool,
    ) -> Result<Self, ClientError> {
        let resolver = Arc::new(PeerResolver {
            table: peers.clone(),
            loopback_peers,
            system: Arc::new(crate::dns::SystemResolver::default()),
        });
        let [peer_client, peer_nar_client, upstream_client] = build_clients(resolver, USER_AGENT)?;
        Ok(Self {
            peer_client,
            peer_nar_client,
            upstream_client,
            peers,
            upstreams,
            store_dir,
            keys,
            loopback_peers,
        })
    }

    pub fn table(&self) -> Option<&Arc<PeerTable>> {
        self.peers.as_ref()
    }

    pub fn timeouts(&self, s: &SourceId) -> Timeouts {
        match s {
            SourceId::Peer(_) => PEER_TIMEOUTS,
            SourceId::Upstream(_) => UPSTREAM_TIMEOUTS,
        }
    }

    fn client(&self, s: &SourceId) -> &reqwest::Client {
        match s {
            SourceId::Peer(_) => &self.peer_client,
            SourceId::Upstream(_) => &self.upstream_client,
        }
    }

    /// Base URL of a source (`None`: the peer left the table).
    pub fn base(&self, s: &SourceId) -> Option<Url> {
        match s {
            SourceId::Peer(node) => {
                let peer = self.peers.as_ref()?.get(node)?;
                Url::parse(&format!("http://{node}{PEER_SUFFIX}:{}/", peer.http_addr().port())).ok()
            }
            SourceId::Upstream(i) => self.upstreams.get(*i).cloned(),
        }
    }

    /// Asks one source for the narinfo of `hash`. `Ok(None)`: the source does not have it.
    pub async fn narinfo(&self, s: &SourceId, hash: &StorePathHash) -> Result<Option<Candidate>, SourceError> {
        let base = self.base(s).ok_or(SourceError::Gone)?;
        let url = base
            .join(&format!("{hash}.narinfo"))
            .map_err(|_| SourceError::Url(hash.to_string()))?;
        let t = self.timeouts(s);
        let fetch = async {
            let mut req = self.client(s).get(url);
            if matches!(s, SourceId::Peer(_)) {
                // A proxy: it may be offered a NAR the peer is fetching (`PARTIAL_HEADER`).
                req = req.header(BUSY_OK_HEADER, "1");
            }
            let mut resp = req.send().await?;
            check_node(s, resp.headers(), resp.remote_addr())?;
            match resp.status().as_u16() {
                200 => {}
                404 | 403 | 410 => return Ok(None),
                other => return Err(SourceError::Status(other)),
            }
            let load = matches!(s, SourceId::Peer(_)).then(|| load_of(&resp)).flatten();
            let partial = matches!(s, SourceId::Peer(_)) && resp.headers().contains_key(PARTIAL_HEADER);
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                if body.len() + chunk.len() > MAX_NARINFO_BYTES {
                    return Err(SourceError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Some((body, load, partial)))
        };
        let body = match tokio::time::timeout(t.narinfo, fetch).await {
            Err(_) => return Err(SourceError::Timeout),
            Ok(r) => r?,
        };
        let Some((body, load, partial)) = body else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&body);
        let info = NarInfo::parse(&self.store_dir, &text)?;
        if info.store_path.hash() != *hash {
            return Err(SourceError::WrongPath(info.store_path.to_string()));
        }
        if !info.is_trusted(&self.keys) {
            return Err(SourceError::Untrusted);
        }
        if let Compression::Other(c) = &info.compression {
            return Err(SourceError::Compression(c.clone()));
        }
        let nar_url = base.join(&info.url).map_err(|_| SourceError::Url(info.url.clone()))?;
        // A peer (our store server) that announces zstd sends the same NAR compressed on the fly
        // at `<url>.zst`: fewer bytes on the LAN; the hash is checked on the decompressed bytes.
        let zstd = match s {
            SourceId::Peer(node) => {
                self.peers
                    .as_ref()
                    .and_then(|t| t.get(node))
                    .is_some_and(|p| p.flags & crate::beacon::wire::FLAG_NAR_ZSTD != 0)
                    && info.compression == Compression::None
                    && nar_url.path().ends_with(".nar")
                    && !partial
            }
            SourceId::Upstream(_) => false,
        };
        // A peer's NAR URL must stay on that peer (a lying narinfo could point elsewhere).
        let elsewhere =
            nar_url.host_str() != base.host_str() || nar_url.port_or_known_default() != base.port_or_known_default();
        if elsewhere && matches!(s, SourceId::Peer(_)) {
            return Err(SourceError::Url(info.url.clone()));
        }
        Ok(Some(Candidate {
            source: s.clone(),
            info: Arc::new(info),
            nar_url,
            zstd,
            load,
            partial,
        }))
    }
}

impl Sources {
    /// A peer's content summary (`since`: the version held, for a delta), at most
    /// `summary::MAX_SUMMARY_BYTES`, within [`SUMMARY_TIMEOUT`].
    pub async fn summary(&self, node: &NodeId, since: Option<u64>) -> Result<bytes::Bytes, SourceError> {
        let s = SourceId::Peer(*node);
        let mut url = self.base(&s).ok_or(SourceError::Gone)?;
        url.set_path("/summary");
        if let Some(v) = since {
            url.set_query(Some(&format!("since={v}")));
        }
        let fetch = async {
            let mut resp = self.peer_client.get(url).send().await?;
            check_node(&s, resp.headers(), resp.remote_addr())?;
            if resp.status().as_u16() != 200 {
                return Err(SourceError::Status(resp.status().as_u16()));
            }
            let mut body = bytes::BytesMut::new();
            while let Some(chunk) = resp.chunk().await? {
                if body.len() + chunk.len() > crate::summary::MAX_SUMMARY_BYTES {
                    return Err(SourceError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body.freeze())
        };
        tokio::time::timeout(SUMMARY_TIMEOUT, fetch)
            .await
            .map_err(|_| SourceError::Timeout)?
    }
}

/// A NAR's uncompressed bytes from one source.
pub type NarReader = Pin<Box<dyn AsyncRead + Send>>;

/// Largest zstd window (log2) accepted in a peer's `.nar.zst`: our store servers write 2^19
/// (`server::compress`); without a cap a peer's frame header could make the decoder allocate up
/// to 128 MiB per stream.
pub const PEER_ZSTD_WINDOW_LOG_MAX: u32 = 20;

/// The error kind a NAR reader's connection errors carry, so that errors of the decoder above it
/// (corrupt or refused compressed data) can be told apart.
const TRANSPORT_ERROR: io::ErrorKind = io::ErrorKind::ConnectionAborted;

/// Whether a NAR reader's error came from the connection (or a clean end too early) rather than
/// from decoding what the source sent.
pub fn is_transport_error(e: &io::Error) -> bool {
    matches!(e.kind(), TRANSPORT_ERROR | io::ErrorKind::UnexpectedEof)
}

/// The decoder of a peer's `.nar.zst`, its window capped at [`PEER_ZSTD_WINDOW_LOG_MAX`].
fn peer_zstd_decoder<R: tokio::io::AsyncBufRead>(raw: R) -> async_compression::tokio::bufread::ZstdDecoder<R> {
    use async_compression::zstd::DParameter;
    async_compression::tokio::bufread::ZstdDecoder::with_params(
        raw,
        &[DParameter::window_log_max(PEER_ZSTD_WINDOW_LOG_MAX)],
    )
}

mod nar;
#[cfg(test)]
mod tests;
