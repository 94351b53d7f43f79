//! Why a store operation failed: [`Error`], shared by the daemon connection, the pool and
//! [`super::Store`]. A leaf: it names only the NAR framer's and the disk dump's errors.

use std::io;

use super::dump::DumpError;
use super::nar::NarError;
use crate::narinfo::ParseError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the nix-daemon at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("nix-daemon I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("nix-daemon protocol error: {0}")]
    Protocol(String),
    #[error("nix-daemon reported: {0}")]
    Daemon(String),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("all nix-daemon connections stayed busy")]
    Busy,
    #[error("bad NAR from the nix-daemon: {0}")]
    Nar(#[from] NarError),
    #[error("nix-daemon sent invalid path info for {path}: {source}")]
    BadPathInfo {
        path: String,
        #[source]
        source: ParseError,
    },
    #[error("reading a NAR from disk: {0}")]
    Dump(#[from] DumpError),
    #[error("NAR of {path} has {got} bytes, path info says {want}")]
    NarSize { path: String, got: u64, want: u64 },
}

impl Error {
    /// The connection died under us (daemon restarted or killed): worth one retry on a fresh one.
    pub(super) fn is_connection_lost(&self) -> bool {
        matches!(self, Error::Io(_))
    }
}
