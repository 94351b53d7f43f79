//! `serve`'s settings: typed, validated, and free of how they were given (flags, config file,
//! tests). The library starts from a [`Settings`] (see `node::start`); `cli` builds one from the
//! command line and the config file. No runtime state lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::narinfo::TrustedKeys;
use crate::store::StoreAddr;

/// Everything `serve` needs to run one host's parts.
#[derive(Clone, Debug)]
pub struct Settings {
    pub store: StoreSettings,
    pub server: ServerSettings,
    /// `None`: no beacon (`--no-beacon`).
    pub beacon: Option<BeaconSettings>,
    pub proxy: ProxySettings,
}

/// How the nix-daemon is reached.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub addr: StoreAddr,
    /// The store directory Nix uses: absolute, no trailing slash.
    pub store_dir: String,
    /// Where NARs are read from disk once the daemon vouched for a path (`None`: through the
    /// daemon), already resolved from the store address when not given.
    pub real_store_dir: Option<PathBuf>,
    /// Most nix-daemon connections open at once.
    pub daemon_connections: usize,
}

/// The LAN-facing store server.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    /// Only paths signed by one of these are served (and accepted by the proxy).
    pub keys: TrustedKeys,
    pub rescan_interval: Duration,
    /// Cap on the index of servable narinfo.
    pub index_max_bytes: usize,
    /// A client that accepts no NAR bytes for this long is dropped.
    pub client_stall_timeout: Duration,
    /// The binary the one-liner hands out (must be static); none: this process's own.
    pub install_binary: Option<std::path::PathBuf>,
}

/// The multicast beacon.
#[derive(Clone, Debug)]
pub struct BeaconSettings {
    /// Only these interfaces; empty: every up, multicast-capable, non-loopback one.
    pub interfaces: Vec<String>,
    /// Multicast groups (IPv4 and/or IPv6).
    pub groups: Vec<std::net::IpAddr>,
    pub port: u16,
    /// Time between announces (jittered).
    pub interval: Duration,
    /// Store servers asked for the hall over HTTP (`--peer`), in the order given.
    pub seeds: Vec<crate::beacon::seeds::Seed>,
}

/// How the proxy fetches NARs from peers that offer a compressed form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerCompression {
    /// Whichever of zstd and plain delivered faster from that peer, measured
    /// (`proxy::forms`).
    #[default]
    Auto,
    /// zstd level 1: measured faster on links up to about 4 Gbit/s.
    Zstd,
    /// The NAR as it is.
    None,
}

/// The proxy, the local Nix's substituter.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub listen: Vec<SocketAddr>,
    /// Upstream caches, asked after the peers (empty: LAN only). Each ends with `/`.
    pub upstreams: Vec<url::Url>,
    pub spool: SpoolSettings,
    pub peer_compression: PeerCompression,
    /// Proven peers' NARs go to Nix while they are hashed (`proxy::passthrough`).
    pub pass_through_proven_peers: bool,
    /// Where state kept across restarts lives (`proxy::proven`'s file).
    pub state_dir: PathBuf,
}

/// The state directory when none is given: systemd's `StateDirectory=` (`$STATE_DIRECTORY`, the
/// first entry), else `$XDG_STATE_HOME/local-nix-cache`, else `~/.local/state/local-nix-cache`,
/// else `/var/lib/local-nix-cache`.
pub fn default_state_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("STATE_DIRECTORY") {
        let first = d.to_string_lossy().split(':').next().unwrap_or_default().to_owned();
        return PathBuf::from(first);
    }
    if let Some(d) = var("XDG_STATE_HOME") {
        return PathBuf::from(d).join("local-nix-cache");
    }
    if let Some(h) = var("HOME") {
        return PathBuf::from(h).join(".local/state/local-nix-cache");
    }
    PathBuf::from("/var/lib/local-nix-cache")
}

/// Where unverified NAR bytes wait, and how many of them.
#[derive(Clone, Debug)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    /// Memory for all in-memory spools together, in MiB.
    pub mem_total_mib: usize,
    /// Disk for all spool files together, in MiB.
    pub disk_total_mib: usize,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// A setting whose value is not acceptable, named by its flag (`--flag`, also the config key).
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {value:?}: {reason}")]
pub struct SettingError {
    /// The flag's long name, which is also its key in the config file.
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl SettingError {
    pub fn new(flag: &'static str, value: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            flag,
            value: value.into(),
            reason: reason.to_string(),
        }
    }
}

/// Checks a store directory: absolute, without a trailing slash.
pub fn store_dir(s: &str) -> Result<String, SettingError> {
    if !s.starts_with('/') || (s.len() > 1 && s.ends_with('/')) {
        return Err(SettingError::new(
            "store-dir",
            s,
            "must be an absolute path without a trailing slash",
        ));
    }
    Ok(s.to_owned())
}

/// An upstream cache URL: http(s), normalised to end with `/`.
pub fn upstream(s: &str) -> Result<url::Url, SettingError> {
    match url::Url::parse(s) {
        Ok(mut url) if matches!(url.scheme(), "http" | "https") => {
            if !url.path().ends_with('/') {
                let p = format!("{}/", url.path());
                url.set_path(&p);
            }
            Ok(url)
        }
        Ok(_) => Err(SettingError::new("upstream", s, "not an http(s) URL (or `none`)")),
        Err(e) => Err(SettingError::new("upstream", s, e)),
    }
}

/// Where NARs are read from disk when `--real-store-dir` is not given: the store directory
/// itself for the system daemon (and `nix-daemon --stdio` on the system store), ROOT/nix/store for
/// `stdio://ROOT`, nothing for another socket (its files may be elsewhere).
pub fn default_real_store_dir(addr: &StoreAddr, store_dir: &str) -> Option<PathBuf> {
    match addr {
        StoreAddr::Auto | StoreAddr::Stdio { store: None } => Some(store_dir.into()),
        StoreAddr::Unix(p) if p.as_os_str() == crate::store::DEFAULT_SOCKET => Some(store_dir.into()),
        StoreAddr::Stdio { store: Some(root) } if root.starts_with('/') => {
            Some(PathBuf::from(root).join(store_dir.trim_start_matches('/')))
        }
        _ => None,
    }
}
