//! Command-line interface: clap definitions only, turned into typed, validated values
//! ([`Settings`], [`PeersOptions`]) before anything runs.
//!
//! Every `serve` flag is defined once, here: its name is also its key in the config file (which
//! [`parse`] turns into arguments placed before the real ones, so clap parses everything and the
//! command line wins), and the NixOS module's options and the tests' defaults follow it. Values
//! are checked by clap's value parsers, so a bad value is reported with the flag (or the config
//! key and line) before anything starts.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::beacon::seeds::{Seed, Seeds};
use crate::beacon::{self, wire, BeaconConfig};
use crate::config::{self, ConfigError};
use crate::narinfo::{PublicKey, TrustedKeys};
use crate::peers::PeersOptions;
use crate::settings::{
    self, BeaconSettings, LogFormat, PeerCompression, ProxySettings, ServerSettings, Settings, SpoolSettings,
    StoreSettings,
};
use crate::store::StoreAddr;

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
    /// Print a shell completion script (bash, zsh or fish) on standard output.
    ///
    /// bash: `local-nix-cache completions bash > /etc/bash_completion.d/local-nix-cache`;
    /// zsh: into a directory of `$fpath` as `_local-nix-cache`; fish: into
    /// `~/.config/fish/completions/local-nix-cache.fish`. The Nix package installs all three.
    Completions(CompletionsArgs),
    /// Print the manual page (roff) on standard output: `local-nix-cache man | man -l -`.
    ///
    /// It is generated from the same help texts as `--help`; the Nix package installs it as
    /// local-nix-cache(1).
    Man,
}

/// The shells `completions` writes for.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Writes the completion script for `shell`, generated from the clap definitions (so every
/// subcommand and flag `--help` lists is completed, and nothing else).
pub fn write_completions(shell: CompletionShell, out: &mut dyn std::io::Write) {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, name, out);
}

fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('-', "\\-")
}

/// Writes the manual page, local-nix-cache(1), with one section per subcommand (its flags and
/// their help texts, the same as `--help`).
pub fn write_man_page(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_name = format!("{} {}", cmd.get_name(), sub.get_name());
        let sub_man = clap_mangen::Man::new(sub.clone().bin_name(sub_name.clone()));
        writeln!(out, ".SH \"{}\"", roff_escape(&sub_name.to_uppercase()))?;
        // The subcommand's own synopsis, description and options, under its heading.
        let mut section = Vec::new();
        sub_man.render_synopsis_section(&mut section)?;
        sub_man.render_description_section(&mut section)?;
        sub_man.render_options_section(&mut section)?;
        let section = String::from_utf8_lossy(&section).replace(".SH ", ".SS ");
        out.write_all(section.as_bytes())?;
    }
    writeln!(out, ".SH FILES")?;
    writeln!(
        out,
        ".TP\n\\fB/etc/local\\-nix\\-cache/config.toml\\fR (or \\fB\\-\\-config\\fR \\fIPATH\\fR)"
    )?;
    writeln!(
        out,
        "The configuration file of \\fBserve\\fR: TOML whose keys are the long flag names above \\
         (\\fBupstream = [\\(dq...\\(dq]\\fR); flags on the command line win."
    )?;
    man.render_version_section(out)?;
    Ok(())
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
    /// Interface to announce and listen on (repeatable; waited for while it does not exist).
    /// Default: every interface that is up, multicast-capable and not loopback, followed as they
    /// come and go.
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// Multicast group (repeatable; IPv4 and/or IPv6). Default: 239.255.83.80 and ff02::8380.
    #[arg(long = "group", value_name = "ADDR")]
    pub groups: Vec<IpAddr>,
    /// UDP port of the beacon.
    #[arg(long, default_value_t = beacon::DEFAULT_PORT, value_name = "PORT")]
    pub beacon_port: u16,
    /// A peer's store server to learn the hall from over HTTP (repeatable; default port 8380;
    /// a name is looked up in /etc/hosts and DNS). Any one reachable peer is enough: it works
    /// where multicast does not (Wi-Fi that filters it, a firewall with no port open, another
    /// subnet behind a router). Asked at start and every 10 s, failures retried with back-off.
    #[arg(long = "peer", value_name = "HOST[:PORT]", value_parser = parse_seed)]
    pub peers: Vec<Seed>,
}

impl BeaconArgs {
    /// The groups to use: the given ones, else the defaults.
    fn groups(&self) -> Vec<IpAddr> {
        if self.groups.is_empty() {
            BeaconConfig::default().groups
        } else {
            self.groups.clone()
        }
    }

    fn config(&self, announce: Option<beacon::Announce>, interval: Duration) -> BeaconConfig {
        BeaconConfig {
            groups: self.groups(),
            interfaces: self.interfaces.clone(),
            port: self.beacon_port,
            announce,
            interval,
            seeds: Seeds::new(self.peers.clone()),
            askers: Default::default(),
        }
    }
}

fn parse_seed(s: &str) -> Result<Seed, settings::SettingError> {
    s.parse::<Seed>().map_err(|e| settings::SettingError::new("peer", s, e))
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
            hostname: beacon::hostname(),
            summary: None,
            secret: rand::random(),
        });
        PeersOptions {
            beacon: self.beacon.config(announce, self.interval),
            timeout: self.timeout,
            json: self.json,
            raw: self.raw,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML file with any of these flags as keys (flags given here override it). Default:
    /// /etc/local-nix-cache/config.toml when it exists.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format on stderr (`RUST_LOG` sets the level, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Where the nix-daemon is: auto (the system socket, else `nix-daemon --stdio` children),
    /// daemon, unix://SOCKET, stdio, or stdio://STORE.
    #[arg(long, default_value = "auto", value_name = "STORE")]
    pub store: StoreAddr,
    /// Address the LAN-facing store server listens on (repeatable). `[::]` is IPv4 and IPv6.
    #[arg(long = "listen", value_name = "ADDR", default_values_t = [SocketAddr::from(([0u16; 8], 8380))])]
    pub listen: Vec<SocketAddr>,
    /// Serve only paths signed by one of these keys (repeatable; `name:base64`).
    #[arg(long = "trusted-public-key", value_name = "KEY", default_value = CACHE_NIXOS_ORG_KEY, value_parser = parse_key)]
    pub trusted_public_keys: Vec<PublicKey>,
    /// The store directory Nix uses.
    #[arg(long, default_value = "/nix/store", value_name = "DIR", value_parser = settings::store_dir)]
    pub store_dir: String,
    /// Seconds between rescans of the store for new and removed paths.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub rescan_interval: u64,
    /// Most nix-daemon connections open at once.
    #[arg(long, default_value_t = 8, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub daemon_connections: u32,
    /// Most memory for the index of servable narinfo, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub index_max_mib: usize,
    /// Seconds a client may accept no NAR bytes before its transfer is dropped (and its daemon
    /// connection freed).
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub client_stall_timeout: u64,
    /// The binary the one-liner (`GET /install`) hands to newcomers; it must be static (no
    /// program interpreter), for this architecture, checked at start. Default: this process's
    /// own binary, handed out only if it is static (a Nix build with the ordinary, dynamic
    /// rustPlatform is not: give its static build here).
    #[arg(long, value_name = "PATH")]
    pub install_binary: Option<PathBuf>,
    /// Where the store directory physically is, to read NARs from disk once the daemon vouched
    /// for a path (faster than through the daemon); `none` streams every NAR through the daemon.
    /// Default: the store directory itself for the system daemon, ROOT/nix/store for
    /// stdio://ROOT, none for another unix:// socket.
    #[arg(long, value_name = "DIR")]
    pub real_store_dir: Option<String>,
    #[command(flatten)]
    pub beacon: BeaconArgs,
    /// Do not run the beacon (serve only to clients that are told this host's address). Seeds
    /// (`--peer`) are the beacon's: not with this.
    #[arg(long, conflicts_with = "peers")]
    pub no_beacon: bool,
    /// Time between announces (with ±20% jitter); peers drop us after three missed.
    #[arg(long, default_value = "5s", value_name = "DUR", value_parser = humantime::parse_duration)]
    pub announce_interval: Duration,
    /// Address of the proxy, the local Nix's substituter (repeatable). Keep it on localhost.
    #[arg(long = "proxy-listen", value_name = "ADDR", default_values_t = [SocketAddr::from(([127, 0, 0, 1], 8381))])]
    pub proxy_listen: Vec<SocketAddr>,
    /// Upstream binary cache the proxy also asks (repeatable); `none`: LAN only.
    #[arg(long = "upstream", value_name = "URL", default_value = "https://cache.nixos.org", value_parser = parse_upstream)]
    pub upstreams: Vec<Upstream>,
    /// Directory for spool files (NARs wait there until verified; unlinked at once).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Most disk space for spooled NARs, in MiB.
    #[arg(long, default_value_t = 16384, value_name = "MIB")]
    pub spool_max_mib: usize,
    /// Most memory for spooled NARs, in MiB (NARs up to 8 MiB spool in memory).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub spool_mem_mib: usize,
    /// How the proxy fetches NARs (of 256 KiB and more) from peers that offer them zstd-compressed:
    /// `auto` measures which of the two delivers faster from each peer.
    #[arg(long, value_enum, default_value_t = PeerCompression::Auto)]
    pub peer_compression: PeerCompression,
    /// Stream a proven peer's NAR to Nix while hashing it, holding back its last 64 KiB until
    /// the hash matched (a peer is proven after 3 verified NARs; one wrong NAR bans it for
    /// good). `false`: every NAR verifies before Nix gets a byte.
    #[arg(long, default_value_t = true, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub pass_through_proven_peers: bool,
    /// Directory for state kept across restarts (the proven and banned peers). Default:
    /// $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/local-nix-cache, else
    /// ~/.local/state/local-nix-cache, else /var/lib/local-nix-cache.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// One `--upstream` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// `none`: no upstream at all (LAN only).
    None,
    Url(url::Url),
}

fn parse_upstream(s: &str) -> Result<Upstream, settings::SettingError> {
    if s == "none" {
        return Ok(Upstream::None);
    }
    settings::upstream(s).map(Upstream::Url)
}

fn parse_key(s: &str) -> Result<PublicKey, crate::narinfo::ParseError> {
    PublicKey::parse(s)
}

impl ServeArgs {
    /// The typed settings these arguments describe (every value was checked by its parser).
    pub fn settings(&self) -> Settings {
        let real_store_dir = match self.real_store_dir.as_deref() {
            Some("none") => None,
            Some(dir) => Some(dir.into()),
            None => settings::default_real_store_dir(&self.store, &self.store_dir),
        };
        let upstreams = if self.upstreams.contains(&Upstream::None) {
            Vec::new()
        } else {
            self.upstreams
                .iter()
                .filter_map(|u| match u {
                    Upstream::Url(u) => Some(u.clone()),
                    Upstream::None => None,
                })
                .collect()
        };
        Settings {
            store: StoreSettings {
                addr: self.store.clone(),
                store_dir: self.store_dir.clone(),
                real_store_dir,
                daemon_connections: self.daemon_connections as usize,
            },
            server: ServerSettings {
                listen: self.listen.clone(),
                keys: TrustedKeys::new(self.trusted_public_keys.clone()),
                rescan_interval: Duration::from_secs(self.rescan_interval),
                index_max_bytes: self.index_max_mib.saturating_mul(1024 * 1024),
                client_stall_timeout: Duration::from_secs(self.client_stall_timeout),
                install_binary: self.install_binary.clone(),
            },
            beacon: (!self.no_beacon).then(|| BeaconSettings {
                interfaces: self.beacon.interfaces.clone(),
                groups: self.beacon.groups(),
                port: self.beacon.beacon_port,
                interval: self.announce_interval,
                seeds: self.beacon.peers.clone(),
            }),
            proxy: ProxySettings {
                listen: self.proxy_listen.clone(),
                upstreams,
                spool: SpoolSettings {
                    dir: self
                        .spool_dir
                        .clone()
                        .unwrap_or_else(|| std::env::temp_dir().join("local-nix-cache-spool")),
                    mem_total_mib: self.spool_mem_mib,
                    disk_total_mib: self.spool_max_mib,
                },
                peer_compression: self.peer_compression,
                pass_through_proven_peers: self.pass_through_proven_peers,
                state_dir: self.state_dir.clone().unwrap_or_else(settings::default_state_dir),
            },
        }
    }
}

/// Why the command line (with the config file) could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags, `--help` or `--version`: clap prints and exits.
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Parses the command line. For `serve`, the config file (`--config`, else
/// [`config::SYSTEM_CONFIG`] if present) becomes arguments placed right after `serve`, leaving out
/// every setting the command line gives itself, so the command line wins and every value goes
/// through the same parser.
pub fn parse(argv: Vec<OsString>) -> Result<Cli, CliError> {
    let cli = Cli::try_parse_from(&argv)?;
    let Command::Serve(args) = &cli.command else {
        return Ok(cli);
    };
    let Some(path) = config::config_path(args.config.as_deref()) else {
        return Ok(cli);
    };
    let cmd = Cli::command();
    let given = cmd.clone().try_get_matches_from(&argv)?;
    let serve_cmd = cmd
        .find_subcommand("serve")
        .cloned()
        .unwrap_or_else(|| clap::Command::new("serve"));
    let on_command_line = |id: &str| {
        given
            .subcommand_matches("serve")
            .is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
    };
    let from_file = config::load_as_args(&serve_cmd, &path, &on_command_line)?;
    // `serve` is argv[1]: the top level has no options of its own.
    let mut merged = argv;
    let rest = merged.split_off(2.min(merged.len()));
    merged.extend(from_file);
    merged.extend(rest);
    let matches = Cli::command().try_get_matches_from(merged)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// `serve`'s settings from flags alone (no config file), as tests and tools build them.
pub fn serve_settings<I, T>(flags: I) -> Result<Settings, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv = ["local-nix-cache".into(), "serve".into()]
        .into_iter()
        .chain(flags.into_iter().map(Into::into));
    match Cli::try_parse_from(argv)?.command {
        Command::Serve(args) => Ok(args.settings()),
        _ => Err(Cli::command().error(clap::error::ErrorKind::InvalidSubcommand, "not serve")),
    }
}

#[cfg(test)]
#[path = "cli_tests.rs"]
mod tests;
