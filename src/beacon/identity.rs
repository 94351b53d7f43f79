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
//!   the announcing address from its second claim on, and the prover (`prover::verify_loop`)
//!   asks the store server there `GET /identity?nonce=N&to=IP` (a fresh random nonce; `to`: the
//!   address asked). A
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
//! Bounds (the queue's are `table::contest`'s): at most `MAX_PENDING` (64) addresses waiting
//! to be asked (a full queue gives up a random one, asked when it announces again); a
//! store-server address (IP, port, scope) is asked at most once per `ASK_AGAIN_AFTER` (30 s)
//! when it answered, and after `FIRST_RETRY` (2 s) doubling when it did not (remembered for
//! `MAX_ASKED` (4,096) addresses, under 0.5 MiB), so forged contests at a victim's address cost
//! it one request per 30 s from each host;
//! the prover's `ASK_AT_ONCE` (4) requests in flight, a new one starting as soon as one ends, each
//! within its `CONNECT_TIMEOUT`, `PROOF_TIMEOUT` and `MAX_PROOF_BYTES`. Older peers answer 404:
//! their contests are settled as before (moves and pinning, `table`).

use std::net::IpAddr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::wire::{self, NodeId};

/// Domain separation for the identity proof's signature.
pub const PROOF_CONTEXT: &[u8] = b"local-nix-cache identity proof v1\0";
/// Domain separation for a goodbye's signature.
pub const GOODBYE_CONTEXT: &[u8] = b"local-nix-cache goodbye v1\0";

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

/// Every address of this host, IPv4 and IPv6, of any interface (up or not); `None` when they
/// cannot be read.
pub fn own_addresses() -> Option<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    Some(
        addrs
            .filter_map(|a| {
                let sa = a.address?;
                sa.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect(),
    )
}

/// Whether `ip` is one of this host's addresses (scope ignored).
pub fn is_own_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    own_addresses().is_some_and(|addrs| addrs.contains(&ip))
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
}
