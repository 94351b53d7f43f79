//! The prover: the beacon's task that asks the store servers of contested node ids' claimants
//! which id they hold (`GET /identity`, see [`super::identity`]), as the table queues them
//! ([`PeerTable::take_proof_wanted`]), and reports each answer back
//! ([`PeerTable::proof_result`]).
//!
//! Bounds: [`ASK_AT_ONCE`] requests in flight, a new one starting as soon as one ends, each
//! within [`CONNECT_TIMEOUT`], [`PROOF_TIMEOUT`] and [`MAX_PROOF_BYTES`]; how often one address
//! is asked is the table's (`table::contest`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::http;
use super::identity::proven_node;
use super::table::PeerTable;
use super::wire::NodeId;

/// Requests at once.
pub const ASK_AT_ONCE: usize = 4;
/// Time to connect for one request (a LAN answers in milliseconds; an address where nothing
/// listens must not hold a slot for the whole [`PROOF_TIMEOUT`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Time for one request.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest answer read.
pub const MAX_PROOF_BYTES: usize = 512;

/// Asks the store server at `addr` which node id it holds there; the id it proved, if any.
pub async fn ask(client: &reqwest::Client, addr: SocketAddr) -> Option<NodeId> {
    let nonce: [u8; 16] = rand::random();
    let url = format!(
        "{}?nonce={}&to={}",
        http::url(addr, "/identity"),
        data_encoding::HEXLOWER.encode(&nonce),
        addr.ip()
    );
    let fetch = http::get_text(client, &url, MAX_PROOF_BYTES);
    let body = tokio::time::timeout(PROOF_TIMEOUT, fetch).await.ok().flatten()?;
    proven_node(&nonce, addr.ip(), &body)
}

/// Asks the store servers of contested ids' addresses to prove them, as the table queues them,
/// until `shutdown`: up to [`ASK_AT_ONCE`] requests in flight, a new one starting as soon as
/// any finishes (an address where nothing answers holds one slot for at most
/// [`PROOF_TIMEOUT`], never the queue behind it).
pub async fn verify_loop(table: Arc<PeerTable>, shutdown: CancellationToken) {
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(PROOF_TIMEOUT)
        .build()
    else {
        tracing::warn!("beacon: no HTTP client for identity proofs; contests are settled without them");
        return shutdown.cancelled().await;
    };
    let client = &client;
    let mut flying = futures_util::stream::FuturesUnordered::new();
    loop {
        while flying.len() < ASK_AT_ONCE {
            let Some((node, addr)) = table.take_proof_wanted() else {
                break;
            };
            flying.push(async move { (node, addr, ask(client, addr).await) });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = table.proofs_wanted(), if flying.len() < ASK_AT_ONCE => {}
            Some((node, addr, holder)) = flying.next(), if !flying.is_empty() => {
                match holder {
                    Some(h) if h == node => tracing::info!(%node, %addr, "beacon: the store server there proved the node id"),
                    Some(h) => tracing::info!(%node, %addr, holder = %h, "beacon: the store server there holds another node id"),
                    None => tracing::debug!(%node, %addr, "beacon: no proof of a node id there"),
                }
                table.proof_result(addr, holder, tokio::time::Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beacon::identity::{answer, Identity};
    use crate::beacon::wire;
    use tokio::task::JoinSet;

    /// A store server on loopback answering `GET /identity` with `id`'s proofs; without one, it
    /// reads the request and never answers, setting `asked`, and sets `closed` when the asker
    /// hangs up.
    async fn server(
        id: Option<Arc<Identity>>,
        asked: Arc<std::sync::atomic::AtomicBool>,
        closed: Arc<std::sync::atomic::AtomicBool>,
    ) -> (SocketAddr, JoinSet<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut server = JoinSet::new();
        server.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut c, _)) = l.accept().await {
                let (id, asked, closed) = (id.clone(), asked.clone(), closed.clone());
                conns.spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = c.read(&mut buf).await.unwrap_or(0);
                    let Some(id) = id else {
                        asked.store(true, std::sync::atomic::Ordering::SeqCst);
                        while c.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                        closed.store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    };
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let query = req
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.split_once('?'))
                        .map(|(_, q)| q.to_owned());
                    let body = answer(&id, query.as_deref(), |_| true).unwrap_or_default();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = c.write_all(format!("{head}{body}").as_bytes()).await;
                });
            }
        });
        (addr, server)
    }

    /// A claimant whose store server never answers holds one request slot, not the proofs
    /// queued after it: the honest claimant queued while it is in flight is proven before the
    /// slow request is given up. (Red with batches, as before: the queue waited for the whole
    /// batch, i.e. the slow request's 2 s timeout.)
    #[tokio::test]
    async fn a_slow_claimant_does_not_hold_up_the_proofs_queued_after_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let table = Arc::new(PeerTable::new(NodeId([0; 16])));
        let id = Arc::new(Identity::generate());
        let node = id.node();
        let slow_closed = Arc::new(AtomicBool::new(false));
        let slow_asked = Arc::new(AtomicBool::new(false));
        let (slow, _slow_server) = server(None, slow_asked.clone(), slow_closed.clone()).await;
        let unused = Arc::new(AtomicBool::new(false));
        let (fast, _fast_server) = server(Some(id.clone()), unused.clone(), unused).await;
        let claim = |node: NodeId, port: u16| {
            wire::encode(&wire::Beacon {
                kind: wire::Kind::Announce,
                flags: 0,
                node,
                port,
                interval_ms: 60_000,
                seq: 1,
                hostname: None,
                summary: None,
                commitment: Some(node.0),
                proof: None,
            })
        };
        // Addresses where nothing listens.
        let dead = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
        };
        let shutdown = CancellationToken::new();
        let mut prover = JoinSet::new();
        prover.spawn(verify_loop(table.clone(), shutdown.clone()));
        let now = tokio::time::Instant::now;
        // A contest over `other`, held at a dead address and claimed at the slow one, pinned to
        // the dead one: each claim of the slow address asks it (from its second).
        let (other, held) = (NodeId([7; 16]), dead());
        let contest = |node: NodeId, holder: SocketAddr, claimant: SocketAddr| {
            for _ in 0..3 {
                table.handle(holder, &claim(node, holder.port()), now());
            }
            table.handle(claimant, &claim(node, claimant.port()), now());
            table.handle(holder, &claim(node, holder.port()), now());
            table.handle(claimant, &claim(node, claimant.port()), now());
        };
        contest(other, held, slow);
        let t0 = std::time::Instant::now();
        while !slow_asked.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(slow_asked.load(Ordering::SeqCst), "the slow claimant was not asked");
        // While it is in flight, the same over the honest node's id, claimed at its server.
        contest(node, dead(), fast);
        let t0 = std::time::Instant::now();
        while table.get(&node).map(|p| p.addrs) != Some(vec![fast]) && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(table.get(&node).map(|p| p.addrs), Some(vec![fast]), "not proven");
        assert!(
            !slow_closed.load(Ordering::SeqCst),
            "proven only after the slow request was given up"
        );
        shutdown.cancel();
        prover.join_next().await.expect("prover").expect("prover");
    }
}
