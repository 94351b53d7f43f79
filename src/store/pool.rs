//! A bounded pool of daemon connections.
//!
//! At most `size` connections exist at once (a semaphore permit is taken before a connection is
//! borrowed or opened). A connection goes back to the idle list only if it finished its last
//! operation cleanly and no daemon restart was noticed since it was opened.

use std::ops::{Deref, DerefMut};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::addr::{StoreAddr, DEFAULT_SOCKET};
use super::daemon::DaemonConnection;
use super::error::Error;

/// Deadline for one query operation (connect, handshake, or one request/reply).
pub const OP_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest wait for a free connection before a request gives up (and answers like a miss).
pub(crate) const POOL_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    addr: StoreAddr,
    /// Idle connections with the generation they were opened in.
    idle: Mutex<Vec<(u64, DaemonConnection)>>,
    /// One permit per connection that may exist.
    permits: Arc<Semaphore>,
    /// Bumped when a connection is found dead: older idle connections are then dropped.
    generation: AtomicU64,
}

impl Pool {
    pub fn new(addr: StoreAddr, size: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                addr,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(size.max(1))),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// Borrows an idle connection or opens one.
    pub async fn get(&self) -> Result<PooledConn, Error> {
        let permit = tokio::time::timeout(POOL_WAIT, self.inner.permits.clone().acquire_owned())
            .await
            .map_err(|_| Error::Busy)?
            .map_err(|_| Error::Busy)?;
        let generation = self.inner.generation.load(Ordering::Acquire);
        let idle = {
            let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|(g, _)| *g == generation);
            idle.pop()
        };
        let (conn, reused) = match idle {
            Some((_, c)) => (c, true),
            None => {
                let c = tokio::time::timeout(OP_TIMEOUT, connect(&self.inner.addr))
                    .await
                    .map_err(|_| Error::Timeout("connecting to the nix-daemon"))??;
                (c, false)
            }
        };
        Ok(PooledConn {
            conn: Some(conn),
            pool: self.inner.clone(),
            _permit: permit,
            generation,
            reused,
        })
    }

    /// Drops every idle connection (the daemon went away; they are all dead).
    pub fn invalidate(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// A borrowed connection; returns to the pool on drop if still healthy.
pub struct PooledConn {
    conn: Option<DaemonConnection>,
    pool: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
    generation: u64,
    /// Came from the idle list (so it may have died since), rather than freshly opened.
    reused: bool,
}

impl PooledConn {
    pub fn reused(&self) -> bool {
        self.reused
    }
}

impl Deref for PooledConn {
    type Target = DaemonConnection;
    fn deref(&self) -> &DaemonConnection {
        // Only `Drop` takes the connection out.
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut DaemonConnection {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if !c.is_broken() && self.generation == self.pool.generation.load(Ordering::Acquire) {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((self.generation, c));
            }
        }
    }
}

async fn connect(addr: &StoreAddr) -> Result<DaemonConnection, Error> {
    match addr {
        StoreAddr::Unix(path) => connect_unix(path).await,
        StoreAddr::Stdio { store } => connect_stdio(store.as_deref()).await,
        StoreAddr::Auto => match connect_unix(DEFAULT_SOCKET.as_ref()).await {
            Err(Error::Connect { .. }) => connect_stdio(None).await,
            other => other,
        },
    }
}

async fn connect_unix(path: &std::path::Path) -> Result<DaemonConnection, Error> {
    let stream = UnixStream::connect(path).await.map_err(|source| Error::Connect {
        addr: format!("unix://{}", path.display()),
        source,
    })?;
    let (r, w) = stream.into_split();
    DaemonConnection::handshake(Box::pin(r), Box::pin(w), None).await
}

async fn connect_stdio(store: Option<&str>) -> Result<DaemonConnection, Error> {
    let mut cmd = tokio::process::Command::new("nix-daemon");
    cmd.arg("--stdio");
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let addr = || match store {
        Some(s) => format!("nix-daemon --stdio --store {s}"),
        None => "nix-daemon --stdio".to_owned(),
    };
    let mut child = cmd.spawn().map_err(|source| Error::Connect { addr: addr(), source })?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(Error::Protocol("nix-daemon child has no stdio pipes".into()));
    };
    DaemonConnection::handshake(Box::pin(stdout), Box::pin(stdin), Some(child)).await
}
