//! This run's public-key identity, and the proof that a store server holds it at an address.
//!
//! The node id is the first 16 bytes of sha256 of an Ed25519 public key chosen at start
//! ([`Identity`]), so nobody else can prove it. Announces stay as small as before: they carry the
//! node id (and, as the commitment extension, the node id again, so older receivers see a bound
//! id); the key travels only where it is needed:
//!
//! - **a contested id** (one family lists two addresses, none proven, as in the first-contact
//!   race: an attacker announcing an honest host's id before that host's own announce reached a
//!   newcomer; or, once proven in one family, a claim from the other): the table queues
//!   the announcing address from its second claim on, and [`verify_loop`] asks the store server
//!   there `GET /identity?nonce=N&to=IP` (a fresh random nonce; `to`: the address asked). A
//!   server answers only for an address of its own, with its public key and a signature over
//!   [`PROOF_CONTEXT`], the nonce and that address: the answer says which id the address holds
//!   ([`proven_node`]), settling every id claimed there (`PeerTable::proof_result`); from then
//!   on an announce of the id from an unproven address of that family is ignored. A relay does
//!   not help the attacker: asked at its own address, it can only get a signature over the
//!   honest host's address, which the honest server alone holds.
//! - **a goodbye** carries the key and a signature over the datagram (extensions 5 and 6), since
//!   there is no 16-byte goodbye secret whose commitment is a key's hash; it counts only when its
//!   sequence number comes after the sender's last announce (no replay).
//!
//! Bounds: at most [`MAX_PENDING`] addresses waiting to be asked (a full queue gives up a random
//! one, asked when it announces again); a store-server address (IP, port, scope) is asked at
//! most once per [`ASK_AGAIN_AFTER`] when it answered, and after [`FIRST_RETRY`] doubling when it
//! did not (remembered for [`MAX_ASKED`] addresses, about 120 bytes each in the LRU: a 32-byte
//! address key, a 40-byte state, list links and the hash slot; under 0.5 MiB),
//! so forged contests at a victim's address cost it one request per 30 s from each host;
//! [`ASK_AT_ONCE`] requests in flight, a new one starting as soon as one ends, each within
//! [`CONNECT_TIMEOUT`], [`PROOF_TIMEOUT`] and [`MAX_PROOF_BYTES`]. Older peers answer 404:
//! their contests are settled as before (moves and pinning, `table`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::table::PeerTable;
use super::wire::{self, NodeId};

/// Domain separation for the identity proof's signature.
pub const PROOF_CONTEXT: &[u8] = b"local-nix-cache identity proof v1\0";
/// Domain separation for a goodbye's signature.
pub const GOODBYE_CONTEXT: &[u8] = b"local-nix-cache goodbye v1\0";
/// Addresses waiting for their store server to be asked.
pub const MAX_PENDING: usize = 64;
/// Store-server addresses remembered as asked (about 120 bytes each: under 0.5 MiB).
pub const MAX_ASKED: usize = 4096;
/// An address that answered (or is being asked) is asked again after this long.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(30);
/// Requests at once.
pub const ASK_AT_ONCE: usize = 4;
/// Time to connect for one request (a LAN answers in milliseconds; an address where nothing
/// listens must not hold a slot for the whole [`PROOF_TIMEOUT`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// First wait before an address whose proof failed is asked again (doubling, at most
/// [`ASK_AGAIN_AFTER`]).
pub const FIRST_RETRY: Duration = Duration::from_secs(2);
/// Time for one request.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest answer read.
pub const MAX_PROOF_BYTES: usize = 512;

/// The node id of a public key: the first 16 bytes of its sha256.
pub fn node_of(key: &[u8; 32]) -> NodeId {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key);
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    NodeId(id)
}

/// An address as the proof signs it: IPv4 (also when written as an IPv4-mapped IPv6 address)
/// as 4 bytes, IPv6 as 16, without scope or port.
fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip.to_canonical() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn proof_message(nonce: &[u8; 16], to: IpAddr) -> Vec<u8> {
    [PROOF_CONTEXT, nonce, &addr_bytes(to)].concat()
}

/// This run's signing key.
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.node())
    }
}

impl Identity {
    pub fn generate() -> Self {
        Self {
            key: SigningKey::from_bytes(&rand::random()),
        }
    }

    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn node(&self) -> NodeId {
        node_of(&self.public())
    }

    /// The answer to `GET /identity` asked at `to`: `KEY SIGNATURE` in hex, one line.
    pub fn prove(&self, nonce: &[u8; 16], to: IpAddr) -> String {
        let sig = self.key.sign(&proof_message(nonce, to));
        format!(
            "{} {}\n",
            data_encoding::HEXLOWER.encode(&self.public()),
            data_encoding::HEXLOWER.encode(&sig.to_bytes())
        )
    }

    /// Appends the key and signature extensions to an encoded goodbye.
    pub fn sign_datagram(&self, datagram: &mut Vec<u8>) {
        datagram.extend_from_slice(&[wire::EXT_KEY, 32]);
        datagram.extend_from_slice(&self.public());
        let sig = self.key.sign(&[GOODBYE_CONTEXT, datagram.as_slice()].concat());
        datagram.extend_from_slice(&[wire::EXT_SIGNATURE, 64]);
        datagram.extend_from_slice(&sig.to_bytes());
    }
}

/// Whether `datagram` (decoded already) is signed by the key of `node`.
pub fn signed_by(datagram: &[u8], node: &NodeId) -> bool {
    if datagram.len() > wire::MAX_DATAGRAM {
        return false;
    }
    let Some(s) = wire::signature(datagram) else {
        return false;
    };
    if node_of(&s.key) != *node {
        return false;
    }
    let Ok(key) = VerifyingKey::from_bytes(&s.key) else {
        return false;
    };
    // On the stack: no allocation per datagram.
    let mut signed = [0u8; GOODBYE_CONTEXT.len() + wire::MAX_DATAGRAM];
    let len = GOODBYE_CONTEXT.len() + s.signed_len;
    signed[..GOODBYE_CONTEXT.len()].copy_from_slice(GOODBYE_CONTEXT);
    signed[GOODBYE_CONTEXT.len()..len].copy_from_slice(&datagram[..s.signed_len]);
    key.verify_strict(&signed[..len], &Signature::from_bytes(&s.signature))
        .is_ok()
}

/// Whether `body` (an answer to `GET /identity?nonce=NONCE&to=TO`) proves `node`.
pub fn verify_proof(node: &NodeId, nonce: &[u8; 16], to: IpAddr, body: &str) -> bool {
    proven_node(nonce, to, body) == Some(*node)
}

/// The node id `body` (an answer to `GET /identity?nonce=NONCE&to=TO`) proves is held at `to`:
/// the hash of the key that signed the nonce and `to`.
pub fn proven_node(nonce: &[u8; 16], to: IpAddr, body: &str) -> Option<NodeId> {
    let mut words = body.split_whitespace();
    let (Some(k), Some(s), None) = (words.next(), words.next(), words.next()) else {
        return None;
    };
    let hex = |w: &str| data_encoding::HEXLOWER_PERMISSIVE.decode(w.as_bytes()).ok();
    let (k, s) = (hex(k)?, hex(s)?);
    let (Ok(k), Ok(s)) = (<[u8; 32]>::try_from(k), <[u8; 64]>::try_from(s)) else {
        return None;
    };
    let key = VerifyingKey::from_bytes(&k).ok()?;
    key.verify_strict(&proof_message(nonce, to), &Signature::from_bytes(&s))
        .ok()
        .map(|()| node_of(&k))
}

/// Why the store server does not answer `GET /identity`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofRefused {
    #[error("no nonce (32 hex digits) or `to` address in the query")]
    Query,
    #[error("{0} is not an address of this host")]
    NotOurs(IpAddr),
}

/// The store server's answer to `GET /identity?QUERY`, when `ours` says `to` is this host's.
pub fn answer(identity: &Identity, query: Option<&str>, ours: impl Fn(IpAddr) -> bool) -> Result<String, ProofRefused> {
    let (mut nonce, mut to) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "nonce" => {
                nonce = data_encoding::HEXLOWER_PERMISSIVE
                    .decode(v.as_bytes())
                    .ok()
                    .and_then(|n| <[u8; 16]>::try_from(n).ok())
            }
            "to" => to = v.parse::<IpAddr>().ok(),
            _ => {}
        }
    }
    let (Some(nonce), Some(to)) = (nonce, to) else {
        return Err(ProofRefused::Query);
    };
    if !ours(to) {
        return Err(ProofRefused::NotOurs(to));
    }
    Ok(identity.prove(&nonce, to))
}

/// Whether `ip` is one of this host's addresses (scope ignored).
pub fn is_own_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            let Some(sa) = a.address else { return false };
            let own = sa
                .as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())));
            own == Some(ip)
        })
    })
}

/// Asks the store server at `addr` which node id it holds there; the id it proved, if any.
pub async fn ask(client: &reqwest::Client, addr: SocketAddr) -> Option<NodeId> {
    let nonce: [u8; 16] = rand::random();
    let url = format!(
        "{}?nonce={}&to={}",
        super::pex::url(addr, "/identity"),
        data_encoding::HEXLOWER.encode(&nonce),
        addr.ip()
    );
    let fetch = super::pex::get_text(client, &url, MAX_PROOF_BYTES);
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

    #[test]
    fn a_proof_holds_only_for_its_node_nonce_and_address() {
        let id = Identity::generate();
        let other = Identity::generate();
        let (nonce, here, there): ([u8; 16], IpAddr, IpAddr) = (
            rand::random(),
            "10.0.0.2".parse().expect("ip"),
            "10.0.0.66".parse().expect("ip"),
        );
        let body = id.prove(&nonce, here);
        assert!(verify_proof(&id.node(), &nonce, here, &body));
        assert!(
            verify_proof(&id.node(), &nonce, "::ffff:10.0.0.2".parse().expect("ip"), &body),
            "an IPv4-mapped address is the IPv4 address"
        );
        assert!(
            !verify_proof(&id.node(), &nonce, there, &body),
            "relayed from another address"
        );
        assert!(!verify_proof(&id.node(), &[0; 16], here, &body), "another nonce");
        assert!(!verify_proof(&other.node(), &nonce, here, &body), "another node");
        // A key of one's own, signing the right message, does not prove someone else's id.
        assert!(!verify_proof(&id.node(), &nonce, here, &other.prove(&nonce, here)));
        for garbage in ["", "zz zz", "00 00", &format!("{body} extra")] {
            assert!(!verify_proof(&id.node(), &nonce, here, garbage), "{garbage:?}");
        }
    }

    #[test]
    fn the_server_answers_only_for_its_own_addresses() {
        let id = Identity::generate();
        let nonce = "00112233445566778899aabbccddeeff";
        let ours = |ip: IpAddr| ip == IpAddr::from([10, 0, 0, 2]);
        let body = answer(&id, Some(&format!("nonce={nonce}&to=10.0.0.2")), ours).expect("answered");
        let n: [u8; 16] = data_encoding::HEXLOWER
            .decode(nonce.as_bytes())
            .expect("hex")
            .try_into()
            .expect("16");
        assert!(verify_proof(&id.node(), &n, IpAddr::from([10, 0, 0, 2]), &body));
        assert_eq!(
            answer(&id, Some(&format!("nonce={nonce}&to=10.0.0.66")), ours),
            Err(ProofRefused::NotOurs(IpAddr::from([10, 0, 0, 66])))
        );
        for q in [
            None,
            Some("to=10.0.0.2"),
            Some("nonce=00&to=10.0.0.2"),
            Some(&format!("nonce={nonce}")),
        ] {
            assert_eq!(answer(&id, q, ours), Err(ProofRefused::Query), "{q:?}");
        }
        assert!(is_own_address(IpAddr::from([127, 0, 0, 1])));
    }

    #[test]
    fn a_goodbye_is_signed_by_the_key_of_its_node() {
        let id = Identity::generate();
        let mut bye = wire::encode(&wire::Beacon {
            kind: wire::Kind::Goodbye,
            flags: 0,
            node: id.node(),
            port: 0,
            interval_ms: 5000,
            seq: 9,
            hostname: Some("h".into()),
            summary: None,
            commitment: None,
            proof: None,
        });
        id.sign_datagram(&mut bye);
        assert!(bye.len() <= wire::MAX_DATAGRAM);
        assert!(wire::decode(&bye).is_ok());
        assert!(signed_by(&bye, &id.node()));
        assert!(!signed_by(&bye, &Identity::generate().node()), "another node's goodbye");
        let mut forged = bye.clone();
        forged[30] ^= 1;
        assert!(!signed_by(&forged, &id.node()), "changed after signing");
        // Someone's own key over a goodbye naming another node.
        let mut other = wire::encode(&wire::decode(&bye).expect("decode"));
        Identity::generate().sign_datagram(&mut other);
        assert!(!signed_by(&other, &id.node()));
    }

    /// A store server on loopback answering `GET /identity` with `id`'s proofs; without one, it
    /// reads the request and never answers, setting `asked`, and sets `closed` when the asker
    /// hangs up.
    async fn server(
        id: Option<Arc<Identity>>,
        asked: Arc<std::sync::atomic::AtomicBool>,
        closed: Arc<std::sync::atomic::AtomicBool>,
    ) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let (id, asked, closed) = (id.clone(), asked.clone(), closed.clone());
                tokio::spawn(async move {
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
        addr
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
        let slow = server(None, slow_asked.clone(), slow_closed.clone()).await;
        let unused = Arc::new(AtomicBool::new(false));
        let fast = server(Some(id.clone()), unused.clone(), unused).await;
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
        let prover = tokio::spawn(verify_loop(table.clone(), shutdown.clone()));
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
        prover.await.expect("prover");
    }
}
