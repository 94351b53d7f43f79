//! The TOML config file of `serve`: every flag, under the flag's own name.
//!
//! Read from `--config PATH`, else from [`SYSTEM_CONFIG`] when it exists. A flag given on the
//! command line overrides the file; the file overrides the built-in default. Unknown keys and bad
//! values are errors that name the key and the line, before anything starts.

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Deserialize;
use toml::Spanned;

use crate::cli::ServeArgs;

/// Read when no `--config` is given and the file exists.
pub const SYSTEM_CONFIG: &str = "/etc/local-nix-cache/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("config {path}, line {line}: key `{key}`: {message}")]
    Value {
        path: PathBuf,
        line: usize,
        key: &'static str,
        message: String,
    },
}

/// The file's contents; keys are `serve`'s flag names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    store: Option<Spanned<String>>,
    listen: Option<Vec<Spanned<String>>>,
    trusted_public_key: Option<Vec<String>>,
    store_dir: Option<String>,
    rescan_interval: Option<u64>,
    daemon_connections: Option<usize>,
    index_max_mib: Option<usize>,
    client_stall_timeout: Option<u64>,
    real_store_dir: Option<String>,
    interface: Option<Vec<String>>,
    group: Option<Vec<Spanned<String>>>,
    beacon_port: Option<u16>,
    no_beacon: Option<bool>,
    announce_interval: Option<Spanned<String>>,
    proxy_listen: Option<Vec<Spanned<String>>>,
    upstream: Option<Vec<String>>,
    spool_dir: Option<PathBuf>,
    spool_max_mib: Option<usize>,
    spool_mem_mib: Option<usize>,
    peer_compression: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
}

impl ConfigFile {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

/// Which config file applies: `--config`, else the system one if present.
pub fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_owned()),
        None => Path::new(SYSTEM_CONFIG).exists().then(|| PathBuf::from(SYSTEM_CONFIG)),
    }
}

/// Applies `file` to `args` for every setting not given on the command line (`m`: the `serve`
/// subcommand's matches). `text` is the file's text, for line numbers.
pub fn apply(
    args: &mut ServeArgs,
    file: ConfigFile,
    m: &ArgMatches,
    path: &Path,
    text: &str,
) -> Result<(), ConfigError> {
    let from_cli = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let line_of = |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
    let bad = |key: &'static str, span: std::ops::Range<usize>, message: String| ConfigError::Value {
        path: path.to_owned(),
        line: line_of(span),
        key,
        message,
    };
    macro_rules! plain {
        ($key:literal, $id:literal, $field:ident, $target:expr) => {
            if let Some(v) = file.$field {
                if !from_cli($id) {
                    $target = v;
                }
            }
        };
    }
    if let Some(v) = file.store {
        if !from_cli("store") {
            args.store = v.get_ref().parse().map_err(|e: String| bad("store", v.span(), e))?;
        }
    }
    if let Some(list) = file.listen {
        if !from_cli("listen") {
            args.listen = socket_addrs("listen", &list, &bad)?;
        }
    }
    if let Some(list) = file.proxy_listen {
        if !from_cli("proxy_listen") {
            args.proxy_listen = socket_addrs("proxy-listen", &list, &bad)?;
        }
    }
    if let Some(list) = file.group {
        if !from_cli("groups") {
            args.beacon.groups = list
                .iter()
                .map(|g| {
                    g.get_ref()
                        .parse()
                        .map_err(|e: std::net::AddrParseError| bad("group", g.span(), e.to_string()))
                })
                .collect::<Result<_, _>>()?;
        }
    }
    if let Some(v) = file.announce_interval {
        if !from_cli("announce_interval") {
            args.announce_interval = humantime::parse_duration(v.get_ref())
                .map_err(|e| bad("announce-interval", v.span(), e.to_string()))?;
        }
    }
    if let Some(v) = file.log_format {
        if !from_cli("log_format") {
            args.log_format = v
                .get_ref()
                .parse()
                .map_err(|e: String| bad("log-format", v.span(), e))?;
        }
    }
    plain!(
        "trusted-public-key",
        "trusted_public_keys",
        trusted_public_key,
        args.trusted_public_keys
    );
    plain!("store-dir", "store_dir", store_dir, args.store_dir);
    plain!(
        "rescan-interval",
        "rescan_interval",
        rescan_interval,
        args.rescan_interval
    );
    plain!(
        "daemon-connections",
        "daemon_connections",
        daemon_connections,
        args.daemon_connections
    );
    plain!("index-max-mib", "index_max_mib", index_max_mib, args.index_max_mib);
    plain!(
        "client-stall-timeout",
        "client_stall_timeout",
        client_stall_timeout,
        args.client_stall_timeout
    );
    if let Some(v) = file.real_store_dir {
        if !from_cli("real_store_dir") {
            args.real_store_dir = Some(v);
        }
    }
    plain!("interface", "interfaces", interface, args.beacon.interfaces);
    plain!("beacon-port", "beacon_port", beacon_port, args.beacon.beacon_port);
    plain!("no-beacon", "no_beacon", no_beacon, args.no_beacon);
    plain!("upstream", "upstreams", upstream, args.upstreams);
    if let Some(v) = file.spool_dir {
        if !from_cli("spool_dir") {
            args.spool_dir = Some(v);
        }
    }
    if let Some(v) = file.peer_compression {
        if !from_cli("peer_compression") {
            match v.get_ref().as_str() {
                "zstd" | "none" => args.peer_compression = v.get_ref().clone(),
                other => {
                    return Err(bad(
                        "peer-compression",
                        v.span(),
                        format!("{other:?} is neither zstd nor none"),
                    ))
                }
            }
        }
    }
    plain!("spool-max-mib", "spool_max_mib", spool_max_mib, args.spool_max_mib);
    plain!("spool-mem-mib", "spool_mem_mib", spool_mem_mib, args.spool_mem_mib);
    Ok(())
}

fn socket_addrs(
    key: &'static str,
    list: &[Spanned<String>],
    bad: &impl Fn(&'static str, std::ops::Range<usize>, String) -> ConfigError,
) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
    list.iter()
        .map(|a| {
            a.get_ref()
                .parse()
                .map_err(|e: std::net::AddrParseError| bad(key, a.span(), e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::{CommandFactory, FromArgMatches};

    /// Parses `argv` and applies `toml`, as `main` does.
    fn serve(argv: &[&str], toml: &str) -> Result<ServeArgs, ConfigError> {
        let mut full = vec!["local-nix-cache", "serve"];
        full.extend_from_slice(argv);
        let matches = Cli::command().try_get_matches_from(full).expect("argv");
        let cli = Cli::from_arg_matches(&matches).expect("cli");
        let Command::Serve(mut args) = cli.command else {
            panic!("serve")
        };
        let sub = matches.subcommand_matches("serve").expect("serve matches");
        let path = Path::new("test.toml");
        let file = ConfigFile::parse(path, toml)?;
        apply(&mut args, file, sub, path, toml)?;
        Ok(*args)
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
no-beacon = true
spool-max-mib = 100
log-format = "json"
"#;
        let a = serve(&["--spool-max-mib", "7"], toml).expect("config");
        assert_eq!(a.store.to_string(), "unix:///run/a.sock");
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.upstreams, vec!["none".to_owned()]);
        assert_eq!(a.beacon.interfaces, vec!["eth0".to_owned()]);
        assert_eq!(a.announce_interval, std::time::Duration::from_secs(2));
        assert!(a.no_beacon);
        assert_eq!(a.spool_max_mib, 7, "the flag overrides the file");
        assert_eq!(a.log_format, crate::cli::LogFormat::Json);
        // Untouched settings keep their defaults.
        assert_eq!(a.store_dir, "/nix/store");
    }

    #[test]
    fn bad_config_names_key_and_line() {
        let cases = [
            ("store = \"auto\"\nbogus-key = 1\n", "bogus-key"),
            (
                "listen = [\"0.0.0.0:1\"]\n\nstore = \"ftp://x\"\n",
                "line 3: key `store`",
            ),
            ("\nlisten = [\"not an address\"]\n", "line 2: key `listen`"),
            ("announce-interval = \"soon\"\n", "line 1: key `announce-interval`"),
            ("beacon-port = 70000\n", "beacon-port"),
            ("rescan-interval = \"ten\"\n", "rescan-interval"),
            ("log-format = \"xml\"\n", "key `log-format`"),
            ("\n\npeer-compression = \"brotli\"\n", "line 3: key `peer-compression`"),
        ];
        for (toml, want) in cases {
            let e = serve(&[], toml)
                .err()
                .unwrap_or_else(|| panic!("{toml:?} accepted"))
                .to_string();
            assert!(e.contains(want), "{toml:?}: {e}");
            assert!(e.contains("line") || e.contains('|'), "{toml:?}: no line in {e}");
        }
    }
}
