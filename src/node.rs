//! One host's `serve`: binds the listeners, starts the store server, the beacon and the proxy
//! from a [`Settings`], and owns their tasks.
//!
//! Every part runs as a task of one `JoinSet` under one cancellation token. A part that ends
//! before shutdown was asked for, or panics, ends the whole node with an error ([`Node::wait`]):
//! the process exits non-zero and systemd restarts it, instead of limping on half alive.
//! Tests start whole nodes in-process on port 0 and read the bound addresses back.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::beacon::{self, wire, wire::NodeId, BeaconConfig, PeerTable};
use crate::proxy::{Proxy, ProxyConfig};
use crate::server::{self, index::Index, summary, StoreServer};
use crate::settings::Settings;
use crate::store::Store;

/// Errors of start-up, before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("beacon: {0}")]
    Beacon(#[from] beacon::BeaconError),
    #[error("proxy: {0}")]
    Proxy(#[from] crate::proxy::ClientError),
    #[error(transparent)]
    InstallBinary(#[from] server::install::InstallBinaryError),
    #[error("cannot start the proxy's thread: {0}")]
    ProxyThread(#[source] std::io::Error),
}

/// Why a running node stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0} stopped unexpectedly")]
    PartExited(&'static str),
    #[error("{part} panicked: {message}")]
    PartPanicked { part: &'static str, message: String },
}

/// A started node.
pub struct Node {
    /// This node's id: in its beacons and in every store-server answer.
    pub node_id: NodeId,
    /// The store server's bound addresses.
    pub addrs: Vec<SocketAddr>,
    /// The proxy's bound addresses.
    pub proxy_addrs: Vec<SocketAddr>,
    pub proxy: Arc<Proxy>,
    /// The beacon's peer table (none without a beacon).
    pub peers: Option<Arc<PeerTable>>,
    parts: Parts,
    shutdown: CancellationToken,
}

/// The node's tasks, by name.
#[derive(Default)]
struct Parts {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

impl Node {
    /// Runs until the shutdown token is cancelled and every part has drained (`Ok`), or until a
    /// part ends or panics on its own (`Err`, after stopping the others).
    pub async fn wait(self) -> Result<(), NodeError> {
        self.parts.wait(&self.shutdown).await
    }
}

impl Parts {
    fn spawn(&mut self, name: &'static str, part: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(part).id();
        self.names.insert(id, name);
    }

    /// Runs `part` on `thread` (`ProxyThread`), as a part of the node like the others: its end or
    /// its panic (message kept) is this part's; dropping the part aborts it there.
    fn spawn_on(&mut self, thread: &ProxyThread, name: &'static str, part: impl Future<Output = ()> + Send + 'static) {
        let on = AbortOnDropHandle::new(thread.tracker.spawn_on(part, &thread.handle));
        self.spawn(name, async move {
            match on.await {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Ok(()) | Err(_) => {}
            }
        });
    }

    /// See [`Node::wait`].
    async fn wait(mut self, shutdown: &CancellationToken) -> Result<(), NodeError> {
        let mut failure = None;
        while let Some(r) = self.set.join_next_with_id().await {
            let name = |id: Id| self.names.get(&id).copied().unwrap_or("a part");
            let err = match r {
                Ok(_) if shutdown.is_cancelled() => continue,
                Ok((id, ())) => NodeError::PartExited(name(id)),
                Err(e) => NodeError::PartPanicked {
                    part: name(e.id()),
                    message: panic_message(e),
                },
            };
            tracing::error!(error = %err, "stopping every part");
            failure.get_or_insert(err);
            shutdown.cancel();
        }
        failure.map_or(Ok(()), Err)
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into()),
        Err(e) => e.to_string(),
    }
}

/// The proxy's runtime: one thread of its own, named `proxy`. A NAR passed through to Nix is read
/// from the peer, hashed and handed to Nix's connection on this one thread: on the node's
/// two-worker runtime every chunk woke the other worker, which cost a pass-through about a fifth
/// more CPU per GiB (issue #27, `docs/benchmarks.md`), and a single worker for the whole node
/// cost the store server as much when it served eight streams. Disk work still goes to this
/// runtime's blocking pool. The thread ends when every part spawned on it has ended.
struct ProxyThread {
    handle: tokio::runtime::Handle,
    tracker: TaskTracker,
}

impl ProxyThread {
    fn start() -> Result<(Self, ProxyThreadStart), StartError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::ProxyThread)?;
        let thread = ProxyThread {
            handle: rt.handle().clone(),
            tracker: TaskTracker::new(),
        };
        Ok((thread, ProxyThreadStart(rt)))
    }
}

/// The proxy's runtime, not yet running on its thread (see [`ProxyThread`]).
struct ProxyThreadStart(tokio::runtime::Runtime);

impl ProxyThreadStart {
    /// Runs the runtime on its thread until every part of `thread` ended.
    fn run(self, thread: &ProxyThread) -> Result<(), StartError> {
        let (rt, tracker) = (self.0, thread.tracker.clone());
        tracker.close();
        std::thread::Builder::new()
            .name("proxy".into())
            .spawn(move || rt.block_on(tracker.wait()))
            .map_err(StartError::ProxyThread)?;
        Ok(())
    }
}

fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<tokio::net::TcpListener>, StartError> {
    addrs
        .iter()
        .map(|&addr| crate::http::bind(addr).map_err(|source| StartError::Bind { addr, source }))
        .collect()
}

/// Binds and starts every part of `serve`. Must run inside a Tokio runtime.
pub fn start(settings: &Settings, shutdown: CancellationToken) -> Result<Node, StartError> {
    let listeners = bind_all(&settings.server.listen)?;
    let proxy_listeners = bind_all(&settings.proxy.listen)?;
    let st = &settings.store;
    let store = Store::new(st.addr.clone(), st.store_dir.clone(), st.daemon_connections)
        .with_real_store_dir(st.real_store_dir.clone());
    let keys = &settings.server.keys;
    tracing::info!(store = %st.addr, nar_from_disk = ?st.real_store_dir, keys = ?keys.keys().iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), "starting");
    let index = Arc::new(Index::new(settings.server.index_max_bytes));
    let publisher = Arc::new(summary::Publisher::new(index.clone()));
    let (delivered, learn_rx) = tokio::sync::mpsc::channel(summary::LEARN_QUEUE);
    let learner = summary::learn(store.clone(), index.clone(), keys.clone(), learn_rx, shutdown.clone());
    // One id for the beacon's announces and the store server's answers, so proxies can check
    // that the server at an announced address is the node that announced it.
    // The id is the hash of this run's Ed25519 key (`beacon::identity`, `proto/beacon.md`); the
    // store server proves it at `GET /identity`, goodbyes are signed with it.
    let identity = Arc::new(beacon::identity::Identity::generate());
    let node_id = identity.node();
    // Unused (goodbyes are signed), but the announce keeps the field of unkeyed senders.
    let secret = rand::random();
    // The beacon's table, shared with the store server's `GET /peers`.
    let table = settings
        .beacon
        .as_ref()
        .map(|_| Arc::new(PeerTable::with_identity(identity.clone())));
    // Hosts that seed us, queued by the store server's `GET /peers` and asked back by the beacon.
    let askers = settings
        .beacon
        .as_ref()
        .map(|_| beacon::seeds::askers::Askers::default());
    let install_binary = match &settings.server.install_binary {
        Some(path) => Some(server::install::check_install_binary(path)?),
        None => None,
    };
    // NARs the proxy is fetching, served to peers' proxies as they arrive (issue #24).
    let partials = Arc::new(crate::proxy::partial::Partials::default());
    let srv = Arc::new(
        StoreServer::new(store, index, keys.clone())
            .with_partials(partials.clone())
            .with_stall_timeout(settings.server.client_stall_timeout)
            .with_install_binary(install_binary)
            .with_node_id(node_id)
            .with_identity(identity)
            .with_summary(publisher.clone())
            .with_peers(table.clone())
            .with_askers(askers.clone()),
    );
    let mut parts = Parts::default();
    let running = server::parts(srv, listeners, settings.server.rescan_interval, shutdown.clone());
    let addrs = running.addrs;
    for (name, part) in running.parts {
        parts.spawn(name, part);
    }
    parts.spawn("content summary", publisher.clone().run(shutdown.clone()));
    parts.spawn("learner", learner);
    let mut links = None;
    let mut seeds = None;
    let peers = match (&settings.beacon, table) {
        (Some(b), Some(table)) => {
            let announce = beacon::Announce {
                store_port: addrs.first().map_or(beacon::DEFAULT_PORT, |a| a.port()),
                flags: wire::FLAG_NAR_NONE | wire::FLAG_NAR_ZSTD | wire::FLAG_PROXY,
                hostname: beacon::hostname(),
                summary: Some(publisher.version_handle()),
                secret,
            };
            let cfg = BeaconConfig {
                groups: b.groups.clone(),
                interfaces: b.interfaces.clone(),
                port: b.port,
                announce: Some(announce),
                interval: b.interval,
                seeds: beacon::seeds::Seeds::new(b.seeds.clone()),
                askers: askers.clone().unwrap_or_default(),
            };
            seeds = Some(cfg.seeds.clone());
            // Always runs: with no usable interface yet (an offline laptop) it waits for one.
            let sockets = beacon::bind(&cfg)?;
            for line in &sockets.report {
                tracing::info!("beacon: {line}");
            }
            links = Some(sockets.states.clone());
            tracing::info!(node = %table.own(), "beacon started");
            let run = beacon::run(sockets, cfg, table.clone(), None, shutdown.clone(), true);
            parts.spawn("beacon", run);
            Some(table)
        }
        _ => None,
    };
    let mut proxy_config = ProxyConfig::from_settings(settings);
    proxy_config.delivered = Some(delivered);
    proxy_config.partials = Some(partials);
    let proxy = Proxy::new(proxy_config, peers.clone())?;
    let (thread, runtime) = ProxyThread::start()?;
    parts.spawn_on(
        &thread,
        "peer summaries",
        crate::proxy::summaries::PeerSummaries::run(proxy.clone(), shutdown.clone()),
    );
    let mut proxy_addrs = Vec::new();
    for l in proxy_listeners {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "proxy listening");
            proxy_addrs.push(a);
        }
        let handler = Arc::new(crate::status::NodePages::new(
            proxy.clone(),
            links.clone(),
            seeds.clone(),
        ));
        // Registered with the proxy's runtime, where it is served.
        let listener = l.into_std().map_err(StartError::ProxyThread)?;
        let serve = {
            let shutdown = shutdown.clone();
            async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => crate::http::serve(l, handler, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "the proxy's listener could not be registered"),
                }
            }
        };
        parts.spawn_on(&thread, "proxy listener", serve);
    }
    runtime.run(&thread)?;
    Ok(Node {
        node_id,
        addrs,
        proxy_addrs,
        proxy,
        peers,
        parts,
        shutdown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part that stops or panics on its own ends the node with an error naming it, and the
    /// other parts are told to stop; after a requested shutdown, ending is normal.
    #[tokio::test]
    async fn a_part_that_ends_early_ends_the_node() {
        for (name, boom) in [("quitter", false), ("panicker", true)] {
            let shutdown = CancellationToken::new();
            let mut parts = Parts::default();
            let s = shutdown.clone();
            parts.spawn("waits for shutdown", async move { s.cancelled().await });
            parts.spawn(name, async move {
                if boom {
                    panic!("boom");
                }
            });
            let waited = tokio::time::timeout(std::time::Duration::from_secs(5), parts.wait(&shutdown)).await;
            let err = waited
                .expect("the node noticed the part ending")
                .expect_err("a part ended early");
            assert!(err.to_string().contains(name), "{err}");
            assert!(shutdown.is_cancelled(), "the other parts were told to stop");
        }
        let shutdown = CancellationToken::new();
        let mut parts = Parts::default();
        let s = shutdown.clone();
        parts.spawn("listener", async move { s.cancelled().await });
        shutdown.cancel();
        parts
            .wait(&shutdown)
            .await
            .expect("a requested shutdown is not an error");
    }

    /// Issue #27: a part spawned on the proxy's thread runs there (named `proxy`), and is a part
    /// of the node like the others: its panic ends the node with its name and message; the
    /// thread's other parts stop with the node.
    #[tokio::test]
    async fn the_proxy_threads_parts_run_there_and_end_the_node_like_the_others() {
        let shutdown = CancellationToken::new();
        let (thread, runtime) = ProxyThread::start().expect("the proxy's runtime");
        let mut parts = Parts::default();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let s = shutdown.clone();
        parts.spawn_on(&thread, "waits for shutdown", async move {
            let _ = seen_tx.send(std::thread::current().name().map(str::to_owned));
            s.cancelled().await;
        });
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        parts.spawn_on(&thread, "panicker", async move {
            let _ = go_rx.await;
            panic!("boom on the proxy thread");
        });
        runtime.run(&thread).expect("the proxy's thread");
        assert_eq!(seen_rx.await.expect("ran").as_deref(), Some("proxy"));
        let _ = go_tx.send(());
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), parts.wait(&shutdown)).await;
        let err = waited.expect("the node noticed").expect_err("a part panicked");
        assert!(
            matches!(&err, NodeError::PartPanicked { part: "panicker", message } if message.contains("boom on the proxy thread")),
            "{err}"
        );
        assert!(shutdown.is_cancelled());
    }
}
