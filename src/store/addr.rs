//! Where the nix-daemon is: [`StoreAddr`], parsed from `--store`, and the system socket.

use std::path::PathBuf;
use std::str::FromStr;

/// The system daemon's socket.
pub const DEFAULT_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";
/// Where the daemon is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreAddr {
    /// The system socket when it answers, else `nix-daemon --stdio` children.
    Auto,
    /// A daemon socket (`unix:///path`).
    Unix(PathBuf),
    /// `nix-daemon --stdio` children, optionally with `--store STORE` (`stdio`, `stdio://STORE`).
    Stdio { store: Option<String> },
}

impl FromStr for StoreAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "daemon" => Ok(Self::Unix(DEFAULT_SOCKET.into())),
            "stdio" => Ok(Self::Stdio { store: None }),
            _ => {
                if let Some(p) = s.strip_prefix("unix://").filter(|p| !p.is_empty()) {
                    Ok(Self::Unix(p.into()))
                } else if let Some(st) = s.strip_prefix("stdio://").filter(|p| !p.is_empty()) {
                    Ok(Self::Stdio { store: Some(st.into()) })
                } else {
                    Err(format!(
                        "store {s:?} is none of auto, daemon, unix://SOCKET, stdio, stdio://STORE"
                    ))
                }
            }
        }
    }
}

impl std::fmt::Display for StoreAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Stdio { store: None } => f.write_str("stdio"),
            Self::Stdio { store: Some(s) } => write!(f, "stdio://{s}"),
        }
    }
}
