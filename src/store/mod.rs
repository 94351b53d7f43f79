//! Access to the host's own Nix store, through the unmodified nix-daemon.
//!
//! [`Store`] is the only way the rest of the crate reads the store: typed path info, path lookup
//! by hash part, and NAR streams. Underneath, a bounded [`pool`] of daemon connections (over the
//! daemon socket, or `nix-daemon --stdio` children when there is no socket). Invariants: every
//! operation has a deadline, so a stuck daemon never pins a request; a connection that saw any
//! error is dropped, never reused; a daemon restart costs at most one retried operation; NAR
//! streams through the daemon never hold the last [`QUERY_RESERVE`] connections, so queries
//! (path info before each NAR, miss checks, scans) always find one.

mod addr;
pub mod daemon;
pub mod dump;
mod error;
pub mod nar;
mod pool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::narinfo::{NarHash, StorePath, StorePathHash};
pub use addr::{StoreAddr, DEFAULT_SOCKET};
pub use daemon::DaemonConnection;
use daemon::RawPathInfo;
pub use error::Error;
use nar::NarFramer;
pub use pool::{Pool, OP_TIMEOUT};

/// Longest wait for the daemon to produce the next NAR bytes.
pub const NAR_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Daemon connections NAR streams leave to queries (when the pool has more than this).
pub const QUERY_RESERVE: usize = 2;

/// Path info, checked and typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    pub nar_hash: NarHash,
    pub references: Vec<StorePath>,
    pub nar_size: u64,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

impl PathInfo {
    fn from_raw(store_dir: &str, path: StorePath, raw: RawPathInfo) -> Result<Self, Error> {
        let bad = |source| Error::BadPathInfo {
            path: path.to_string(),
            source,
        };
        let deriver = match raw.deriver.as_str() {
            "" => None,
            d => Some(StorePath::parse(store_dir, d).map_err(bad)?),
        };
        let references = raw
            .references
            .iter()
            .map(|r| StorePath::parse(store_dir, r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        Ok(Self {
            nar_hash: NarHash::parse(&raw.nar_hash).map_err(bad)?,
            path,
            deriver,
            references,
            nar_size: raw.nar_size,
            sigs: raw.sigs,
            ca: (!raw.ca.is_empty()).then_some(raw.ca),
        })
    }
}

/// The host's store, as the rest of the crate sees it.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// One permit per daemon connection a NAR stream may hold: the pool size less
    /// [`QUERY_RESERVE`] (at least one).
    nar_streams: Arc<Semaphore>,
    /// The logical store directory (`/nix/store`), for parsing what the daemon returns.
    store_dir: String,
    /// Where the store directory physically is, when this process can read it: NARs are then
    /// read from disk (after the daemon vouched for the path) rather than copied through the
    /// daemon's socket, which caps a stream at the daemon's single-threaded copy speed.
    real_store_dir: Option<PathBuf>,
}

/// NAR chunks buffered between a disk-reading thread and its consumer (each up to 128 KiB).
const DUMP_CHANNEL_CHUNKS: usize = 2;

impl Store {
    pub fn new(addr: StoreAddr, store_dir: impl Into<String>, pool_size: usize) -> Self {
        let streams = if pool_size > QUERY_RESERVE {
            pool_size - QUERY_RESERVE
        } else {
            pool_size.max(1)
        };
        Self {
            pool: Pool::new(addr, pool_size),
            nar_streams: Arc::new(Semaphore::new(streams)),
            store_dir: store_dir.into(),
            real_store_dir: None,
        }
    }

    /// Reads NARs from `dir` (the physical store directory) instead of through the daemon.
    pub fn with_real_store_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.real_store_dir = dir;
        self
    }

    pub fn store_dir(&self) -> &str {
        &self.store_dir
    }

    /// Where the store's files are on this host: the physical directory when one was given,
    /// else the store directory itself (which may not exist here, with a remote daemon).
    pub fn physical_store_dir(&self) -> PathBuf {
        self.real_store_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(&self.store_dir))
    }

    /// NAR streams that can run at once when NARs come through the daemon (no physical store
    /// directory), `None` when they are read from disk.
    pub fn daemon_nar_streams(&self) -> Option<usize> {
        match self.real_store_dir {
            None => Some(self.nar_streams.available_permits()),
            Some(_) => None,
        }
    }

    /// Runs one query on a pooled connection, with a deadline and one retry on a fresh
    /// connection if the old one turned out dead (daemon restarted).
    async fn run<T>(
        &self,
        what: &'static str,
        op: impl for<'c> Fn(&'c mut DaemonConnection) -> BoxFuture<'c, Result<T, Error>>,
    ) -> Result<T, Error> {
        let mut retried = false;
        loop {
            let mut conn = self.pool.get().await?;
            match tokio::time::timeout(OP_TIMEOUT, op(&mut conn)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if e.is_connection_lost() && conn.reused() && !retried => {
                    tracing::info!(error = %e, "daemon connection lost, retrying on a fresh one");
                    self.pool.invalidate();
                    retried = true;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Timeout(what)),
            }
        }
    }

    pub async fn path_from_hash_part(&self, hash: &StorePathHash) -> Result<Option<StorePath>, Error> {
        let found = self
            .run("looking up a hash part", |c| {
                Box::pin(c.query_path_from_hash_part(hash.to_string()))
            })
            .await?;
        match found {
            None => Ok(None),
            Some(p) => StorePath::parse(&self.store_dir, &p)
                .map(Some)
                .map_err(|source| Error::BadPathInfo { path: p, source }),
        }
    }

    pub async fn path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, Error> {
        let raw = self
            .run("querying path info", |c| Box::pin(c.query_path_info(path.to_string())))
            .await?;
        raw.map(|raw| PathInfo::from_raw(&self.store_dir, path.clone(), raw))
            .transpose()
    }

    /// Every valid path (unparsable names, which Nix itself would not create, are skipped).
    pub async fn all_valid_paths(&self) -> Result<Vec<StorePath>, Error> {
        let all = self
            .run("listing valid paths", |c| Box::pin(c.query_all_valid_paths()))
            .await?;
        Ok(all
            .iter()
            .filter_map(|p| StorePath::parse(&self.store_dir, p).ok())
            .collect())
    }

    /// Streams the NAR of `info.path`. The caller got `info` from [`Self::path_info`] just before:
    /// NarFromPath itself does not check validity. Read from disk when the physical store
    /// directory is known and holds the path, else through the daemon.
    pub async fn nar(&self, info: &PathInfo) -> Result<NarStream, Error> {
        if let Some(physical) = self.on_disk(info) {
            return Ok(self.nar_from_disk(info, physical));
        }
        let path = info.path.to_string();
        let stream_permit = tokio::time::timeout(pool::POOL_WAIT, self.nar_streams.clone().acquire_owned())
            .await
            .map_err(|_| Error::Busy)?
            .map_err(|_| Error::Busy)?;
        let mut retried = false;
        loop {
            let mut conn = self.pool.get().await?;
            match tokio::time::timeout(OP_TIMEOUT, conn.start_nar_from_path(path.clone())).await {
                Ok(Ok(())) => {
                    return Ok(NarStream {
                        source: Source::Daemon {
                            conn: Box::new(conn),
                            framer: NarFramer::new(),
                            _permit: stream_permit,
                        },
                        path,
                        nar_size: info.nar_size,
                        seen: 0,
                    })
                }
                Ok(Err(e)) if e.is_connection_lost() && conn.reused() && !retried => {
                    self.pool.invalidate();
                    retried = true;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Timeout("starting a NAR")),
            }
        }
    }

    /// Where `info.path` is in the physical store directory, when it is known and holds the path:
    /// its NAR is then read from there ([`dump`]). The caller got `info` from [`Self::path_info`].
    pub fn on_disk(&self, info: &PathInfo) -> Option<PathBuf> {
        let physical = self.real_store_dir.as_ref()?.join(info.path.basename());
        std::fs::symlink_metadata(&physical).is_ok().then_some(physical)
    }

    fn nar_from_disk(&self, info: &PathInfo, physical: PathBuf) -> NarStream {
        let (tx, rx) = tokio::sync::mpsc::channel(DUMP_CHANNEL_CHUNKS);
        tokio::task::spawn_blocking(move || {
            let r = dump::dump(&physical, |chunk| tx.blocking_send(Ok(chunk)).is_ok());
            match r {
                Ok(()) | Err(dump::DumpError::Stopped) => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                }
            }
        });
        NarStream {
            source: Source::Disk(rx),
            path: info.path.to_string(),
            nar_size: info.nar_size,
            seen: 0,
        }
    }
}

/// Where a NAR's bytes come from.
enum Source {
    /// NarFromPath on a pooled connection, held until the NAR ends.
    Daemon {
        conn: Box<pool::PooledConn>,
        framer: NarFramer,
        /// One of the connections NAR streams may hold.
        _permit: OwnedSemaphorePermit,
    },
    /// A blocking thread dumping the path from disk; it stops when this receiver is dropped.
    Disk(tokio::sync::mpsc::Receiver<Result<Bytes, dump::DumpError>>),
}

/// A NAR being read. Dropped early, its daemon connection is discarded (it is mid-stream) or
/// its disk reader stops.
pub struct NarStream {
    source: Source,
    path: String,
    nar_size: u64,
    /// Bytes delivered so far.
    seen: u64,
}

impl NarStream {
    /// The next chunk, `None` after the last. Fails if the NAR is malformed or its size differs
    /// from the path info's (a complete NAR of the wrong size is never delivered whole).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Error> {
        let chunk = match &mut self.source {
            Source::Daemon { conn, framer, .. } => conn.read_nar_chunk(framer, NAR_IDLE_TIMEOUT).await?,
            Source::Disk(rx) => match tokio::time::timeout(NAR_IDLE_TIMEOUT, rx.recv()).await {
                Err(_) => return Err(Error::Timeout("reading a NAR from disk")),
                Ok(None) => None,
                Ok(Some(Ok(c))) => Some(c),
                Ok(Some(Err(e))) => return Err(Error::Dump(e)),
            },
        };
        self.seen += chunk.as_ref().map_or(0, |c| c.len() as u64);
        if self.seen > self.nar_size || (chunk.is_none() && self.seen != self.nar_size) {
            if let Source::Daemon { conn, .. } = &mut self.source {
                conn.mark_broken();
            }
            return Err(Error::NarSize {
                path: self.path.clone(),
                got: self.seen,
                want: self.nar_size,
            });
        }
        Ok(chunk)
    }

    pub fn nar_size(&self) -> u64 {
        self.nar_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_addresses_parse() {
        for (s, want) in [
            ("auto", Some(StoreAddr::Auto)),
            ("daemon", Some(StoreAddr::Unix(DEFAULT_SOCKET.into()))),
            ("unix:///tmp/a.sock", Some(StoreAddr::Unix("/tmp/a.sock".into()))),
            ("stdio", Some(StoreAddr::Stdio { store: None })),
            (
                "stdio:///tmp/hostA",
                Some(StoreAddr::Stdio {
                    store: Some("/tmp/hostA".into()),
                }),
            ),
            ("unix://", None),
            ("http://example", None),
            ("", None),
        ] {
            assert_eq!(s.parse::<StoreAddr>().ok(), want, "{s:?}");
            if let Some(w) = want {
                assert_eq!(w.to_string().parse::<StoreAddr>().ok(), Some(w));
            }
        }
    }
}
