//! Command-line interface: clap definitions, turned into validated settings before anything runs.
//!
//! `serve` runs one host's parts; each part adds its own flags to it. Parsing is separate from
//! running so tests can start a whole node in-process.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::beacon::{self, wire, wire::NodeId, BeaconConfig, PeerTable};
use crate::narinfo::{PublicKey, TrustedKeys};
use crate::peers::PeersOptions;
use crate::proxy::{spool::SpoolLimits, Proxy, ProxyConfig};
use crate::server::{self, index::Index, StoreServer};
use crate::store::{Store, StoreAddr};

/// The key of cache.nixos.org, trusted by default.
pub const CACHE_NIXOS_ORG_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

#[derive(Parser, Debug)]
#[command(
    name = "local-nix-cache",
    version,
    about = "Share Nix store paths between the hosts of one LAN, verified against the signatures already in the store"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run this host's store server, beacon and proxy.
    Serve(Box<ServeArgs>),
    /// Multicast debug tool: listen for beacons and print the peer table (no `serve` needed).
    Peers(PeersArgs),
    /// Print what the local proxy is doing: peers, hits from LAN and upstream, bytes saved.
    Status(StatusArgs),
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The proxy to ask.
    #[arg(long, default_value = "http://127.0.0.1:8381", value_name = "URL")]
    pub proxy: String,
    /// Print the raw JSON summary.
    #[arg(long)]
    pub json: bool,
}

/// Beacon flags shared by `serve` and `peers`.
#[derive(Args, Debug, Clone)]
pub struct BeaconArgs {
    /// Interface to announce and listen on (repeatable). Default: every interface that is up,
    /// multicast-capable and not loopback.
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// Multicast group (repeatable; IPv4 and/or IPv6). Default: 239.255.83.80 and ff02::8380.
    #[arg(long = "group", value_name = "ADDR")]
    pub groups: Vec<IpAddr>,
    /// UDP port of the beacon.
    #[arg(long, default_value_t = beacon::DEFAULT_PORT, value_name = "PORT")]
    pub beacon_port: u16,
}

impl BeaconArgs {
    fn config(&self, announce: Option<beacon::Announce>, interval: Duration) -> BeaconConfig {
        let d = BeaconConfig::default();
        BeaconConfig {
            groups: if self.groups.is_empty() {
                d.groups
            } else {
                self.groups.clone()
            },
            interfaces: self.interfaces.clone(),
            port: self.beacon_port,
            announce,
            interval,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PeersArgs {
    #[command(flatten)]
    pub beacon: BeaconArgs,
    /// Listen this long, print the table and exit (e.g. 3s, 500ms). Default: until Ctrl-C.
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// One JSON object per line: per peer (at exit with --timeout, else per join/leave event).
    #[arg(long)]
    pub json: bool,
    /// Print every datagram received, with its decoded form or decode error and its sender.
    #[arg(long)]
    pub raw: bool,
    /// Also send beacons, as a test host whose store server is on --store-port.
    #[arg(long)]
    pub announce: bool,
    /// The store server port announced with --announce.
    #[arg(long, default_value_t = 8380, value_name = "PORT")]
    pub store_port: u16,
    /// Announce interval with --announce.
    #[arg(long, default_value = "5s", value_name = "DUR", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

impl PeersArgs {
    pub fn options(&self) -> PeersOptions {
        let announce = self.announce.then(|| beacon::Announce {
            store_port: self.store_port,
            flags: wire::FLAG_NAR_NONE,
            hostname: hostname(),
        });
        PeersOptions {
            beacon: self.beacon.config(announce, self.interval),
            timeout: self.timeout,
            json: self.json,
            raw: self.raw,
        }
    }
}

/// This machine's host name, for the beacon's informational hostname extension.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(Self::Plain),
            "json" => Ok(Self::Json),
            _ => Err(format!("{s:?} is neither plain nor json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "plain",
            Self::Json => "json",
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML file with any of these flags as keys (flags given here override it). Default:
    /// /etc/local-nix-cache/config.toml when it exists.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format on stderr (`RUST_LOG` sets the level, default info).
    #[arg(long, default_value_t = LogFormat::Plain, value_name = "plain|json")]
    pub log_format: LogFormat,
    /// Where the nix-daemon is: auto (the system socket, else `nix-daemon --stdio` children),
    /// daemon, unix://SOCKET, stdio, or stdio://STORE.
    #[arg(long, default_value = "auto", value_name = "STORE")]
    pub store: StoreAddr,
    /// Address the LAN-facing store server listens on (repeatable). `[::]` is IPv4 and IPv6.
    #[arg(long = "listen", value_name = "ADDR", default_values_t = [SocketAddr::from(([0u16; 8], 8380))])]
    pub listen: Vec<SocketAddr>,
    /// Serve only paths signed by one of these keys (repeatable; `name:base64`).
    #[arg(long = "trusted-public-key", value_name = "KEY", default_values_t = [CACHE_NIXOS_ORG_KEY.to_owned()])]
    pub trusted_public_keys: Vec<String>,
    /// The store directory Nix uses.
    #[arg(long, default_value = "/nix/store", value_name = "DIR")]
    pub store_dir: String,
    /// Seconds between rescans of the store for new and removed paths.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub rescan_interval: u64,
    /// Most nix-daemon connections open at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub daemon_connections: usize,
    /// Most memory for the index of servable narinfo, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub index_max_mib: usize,
    /// Seconds a client may accept no NAR bytes before its transfer is dropped (and its daemon
    /// connection freed).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub client_stall_timeout: u64,
    /// Where the store directory physically is, to read NARs from disk once the daemon vouched
    /// for a path (faster than through the daemon); `none` streams every NAR through the daemon.
    /// Default: the store directory itself for the system daemon, ROOT/nix/store for
    /// stdio://ROOT, none for another unix:// socket.
    #[arg(long, value_name = "DIR")]
    pub real_store_dir: Option<String>,
    #[command(flatten)]
    pub beacon: BeaconArgs,
    /// Do not run the beacon (serve only to clients that are told this host's address).
    #[arg(long)]
    pub no_beacon: bool,
    /// Time between announces (with ±20% jitter); peers drop us after three missed.
    #[arg(long, default_value = "5s", value_name = "DUR", value_parser = humantime::parse_duration)]
    pub announce_interval: Duration,
    /// Address of the proxy, the local Nix's substituter (repeatable). Keep it on localhost.
    #[arg(long = "proxy-listen", value_name = "ADDR", default_values_t = [SocketAddr::from(([127, 0, 0, 1], 8381))])]
    pub proxy_listen: Vec<SocketAddr>,
    /// Upstream binary cache the proxy also asks (repeatable); `none`: LAN only.
    #[arg(long = "upstream", value_name = "URL", default_values_t = ["https://cache.nixos.org".to_owned()])]
    pub upstreams: Vec<String>,
    /// Directory for spool files (NARs wait there until verified; unlinked at once).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Most disk space for spooled NARs, in MiB.
    #[arg(long, default_value_t = 16384, value_name = "MIB")]
    pub spool_max_mib: usize,
    /// Most memory for spooled NARs, in MiB (NARs up to 8 MiB spool in memory).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub spool_mem_mib: usize,
    /// How the proxy fetches NARs from peers that offer zstd: `zstd` (level 1, measured faster
    /// on links up to about 4 Gbit/s) or `none`.
    #[arg(long, default_value = "zstd", value_name = "zstd|none", value_parser = ["zstd", "none"])]
    pub peer_compression: String,
}

impl ServeArgs {
    /// The upstream URLs (`none` alone means no upstream).
    pub fn upstream_urls(&self) -> Result<Vec<url::Url>, SetupError> {
        if self.upstreams.iter().any(|u| u == "none") {
            return Ok(Vec::new());
        }
        self.upstreams
            .iter()
            .map(|u| match url::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
                _ => Err(SetupError::Upstream(u.clone())),
            })
            .collect()
    }
}

impl ServeArgs {
    /// The physical store directory NARs are read from, if any.
    pub fn resolved_real_store_dir(&self) -> Option<PathBuf> {
        match self.real_store_dir.as_deref() {
            Some("none") => None,
            Some(dir) => Some(dir.into()),
            None => match &self.store {
                StoreAddr::Auto | StoreAddr::Stdio { store: None } => Some(self.store_dir.clone().into()),
                StoreAddr::Unix(p) if p.as_os_str() == crate::store::DEFAULT_SOCKET => {
                    Some(self.store_dir.clone().into())
                }
                StoreAddr::Stdio { store: Some(root) } if root.starts_with('/') => {
                    Some(PathBuf::from(root).join(self.store_dir.trim_start_matches('/')))
                }
                _ => None,
            },
        }
    }
}

/// Errors of `serve`'s set-up, before it runs.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("bad --trusted-public-key: {0}")]
    Key(#[from] crate::narinfo::ParseError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--store-dir {0:?} must be an absolute path without a trailing slash")]
    StoreDir(String),
    #[error("beacon: {0}")]
    Beacon(#[from] beacon::BeaconError),
    #[error("--upstream {0:?} is not an http(s) URL (or `none`)")]
    Upstream(String),
}

/// A started node; `addrs` are the store server's bound addresses.
pub struct Node {
    pub addrs: Vec<SocketAddr>,
    /// The proxy's bound addresses.
    pub proxy_addrs: Vec<SocketAddr>,
    pub proxy: Arc<Proxy>,
    /// The beacon's peer table (none with `--no-beacon`).
    pub peers: Option<Arc<PeerTable>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Waits until every part has stopped (after the shutdown token is cancelled).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds and starts every part of `serve`.
pub fn start(args: &ServeArgs, shutdown: CancellationToken) -> Result<Node, SetupError> {
    if !args.store_dir.starts_with('/') || (args.store_dir.len() > 1 && args.store_dir.ends_with('/')) {
        return Err(SetupError::StoreDir(args.store_dir.clone()));
    }
    let keys = TrustedKeys::new(
        args.trusted_public_keys
            .iter()
            .map(|k| PublicKey::parse(k))
            .collect::<Result<_, _>>()?,
    );
    let listeners = args
        .listen
        .iter()
        .map(|&addr| crate::http::bind(addr).map_err(|source| SetupError::Bind { addr, source }))
        .collect::<Result<Vec<_>, _>>()?;
    let proxy_listeners = args
        .proxy_listen
        .iter()
        .map(|&addr| crate::http::bind(addr).map_err(|source| SetupError::Bind { addr, source }))
        .collect::<Result<Vec<_>, _>>()?;
    let upstreams = args.upstream_urls()?;
    let proxy_keys = keys.clone();
    let shutdown_proxy = shutdown.clone();
    let real = args.resolved_real_store_dir();
    let store = Store::new(args.store.clone(), args.store_dir.clone(), args.daemon_connections)
        .with_real_store_dir(real.clone());
    tracing::info!(store = %args.store, nar_from_disk = ?real, keys = ?keys.keys().iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), "starting");
    let index = Arc::new(Index::new(args.index_max_mib.saturating_mul(1024 * 1024)));
    let stall = Duration::from_secs(args.client_stall_timeout.max(1));
    let srv = Arc::new(StoreServer::new(store, index, keys).with_stall_timeout(stall));
    let mut running = server::spawn(
        srv,
        listeners,
        Duration::from_secs(args.rescan_interval.max(1)),
        shutdown.clone(),
    );
    let peers = if args.no_beacon {
        None
    } else {
        let store_port = running.addrs.first().map_or(8380, |a| a.port());
        let announce = beacon::Announce {
            store_port,
            flags: wire::FLAG_NAR_NONE | wire::FLAG_NAR_ZSTD | wire::FLAG_PROXY,
            hostname: hostname(),
        };
        let cfg = args.beacon.config(Some(announce), args.announce_interval);
        match beacon::bind(&cfg) {
            Ok(sockets) => {
                for line in &sockets.report {
                    tracing::info!("beacon: {line}");
                }
                let table = Arc::new(PeerTable::new(NodeId::random()));
                tracing::info!(node = %table.own(), "beacon started");
                running.tasks.push(tokio::spawn(beacon::run(
                    sockets,
                    cfg,
                    table.clone(),
                    None,
                    shutdown,
                    true,
                )));
                Some(table)
            }
            // With no usable interface (an offline laptop) the store server still serves.
            Err(e @ beacon::BeaconError::NoInterface(_)) if args.beacon.interfaces.is_empty() => {
                tracing::warn!(error = %e, "beacon not started; peers will not find this host");
                None
            }
            Err(e) => return Err(e.into()),
        }
    };
    let spool_dir = args
        .spool_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("local-nix-cache-spool"));
    let proxy = Arc::new(Proxy::new(
        ProxyConfig {
            store_dir: args.store_dir.clone(),
            keys: proxy_keys,
            upstreams,
            spool: SpoolLimits::new(8 * 1024 * 1024, args.spool_mem_mib, args.spool_max_mib, spool_dir),
            peer_zstd: args.peer_compression == "zstd",
            parallel_min_bytes: crate::proxy::PARALLEL_MIN_BYTES,
        },
        peers.clone(),
    ));
    let mut proxy_addrs = Vec::new();
    for l in proxy_listeners {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "proxy listening");
            proxy_addrs.push(a);
        }
        running.tasks.push(tokio::spawn(crate::http::serve(
            l,
            proxy.clone(),
            shutdown_proxy.clone(),
        )));
    }
    Ok(Node {
        addrs: running.addrs,
        proxy_addrs,
        proxy,
        peers,
        tasks: running.tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_store_dir_defaults_follow_the_store() {
        let args = |store: &str, real: Option<&str>| {
            let mut v = vec!["local-nix-cache", "serve", "--store", store];
            if let Some(r) = real {
                v.extend(["--real-store-dir", r]);
            }
            match Cli::parse_from(v).command {
                Command::Serve(a) => a.resolved_real_store_dir(),
                _ => unreachable!("parsed serve"),
            }
        };
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(args("auto", None), p("/nix/store"));
        assert_eq!(args("daemon", None), p("/nix/store"));
        assert_eq!(args("stdio", None), p("/nix/store"));
        assert_eq!(args("stdio:///tmp/hostA", None), p("/tmp/hostA/nix/store"));
        assert_eq!(args("unix:///tmp/a.sock", None), None);
        assert_eq!(args("unix:///tmp/a.sock", Some("/x/store")), p("/x/store"));
        assert_eq!(args("auto", Some("none")), None);
    }
}
