//! Invariants of the identity proof: the store server's answer to `GET /identity` and the
//! prover's reading of an answer.
//!
//! Input: a query (up to the first newline), then edits of the honest answer (pairs of a
//! position and a byte). The answer to a query that names a nonce and an address of this host
//! proves this host's id for exactly that nonce and address; other queries are refused for the
//! right reason; an answer that proves this host's id carries exactly its key and signature,
//! whatever edits were made to it; anything that proves an id proves the hash of its key.

use std::net::IpAddr;
use std::sync::OnceLock;

use crate::beacon::identity::{answer, node_of, proven_node, Identity, ProofRefused};

fn identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(Identity::generate)
}

/// This host's addresses, for the check.
fn ours(ip: IpAddr) -> bool {
    ["10.0.0.1", "fe80::1", "127.0.0.1"]
        .iter()
        .any(|a| a.parse::<IpAddr>().is_ok_and(|a| a == ip.to_canonical()))
}

/// The nonce and address a query names, read the way a client writes them (the last of each).
fn asked(query: &str) -> (Option<[u8; 16]>, Option<IpAddr>) {
    let (mut nonce, mut to) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "nonce" => {
                nonce = data_encoding::HEXLOWER_PERMISSIVE
                    .decode(v.as_bytes())
                    .ok()
                    .and_then(|n| n.try_into().ok())
            }
            "to" => to = v.parse().ok(),
            _ => {}
        }
    }
    (nonce, to)
}

/// The key and signature an answer's two words decode to.
fn words(body: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut w = body.split_whitespace();
    let hex = |w: &str| data_encoding::HEXLOWER_PERMISSIVE.decode(w.as_bytes()).ok();
    Some((hex(w.next()?)?, hex(w.next()?)?))
}

/// `body` proves `id` for (`nonce`, `to`) only if it carries the honest answer's key and
/// signature; whatever it proves is the hash of its key.
fn proves_only_with_its_key(body: &str, nonce: &[u8; 16], to: IpAddr, honest: &str) {
    let Some(node) = proven_node(nonce, to, body) else {
        return;
    };
    let (key, _) = words(body).expect("a proof has two hex words");
    let key: [u8; 32] = key.try_into().expect("a proof's key has 32 bytes");
    assert_eq!(node, node_of(&key));
    if node == identity().node() {
        assert_eq!(words(body), words(honest), "another proof of our id: {body:?}");
    }
}

pub fn check(data: &[u8]) {
    let id = identity();
    let (query, edits) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let query = String::from_utf8_lossy(query);
    let (nonce, to) = asked(&query);
    let honest = match answer(id, Some(&query), ours) {
        Ok(body) => {
            let (Some(nonce), Some(to)) = (nonce, to) else {
                panic!("answered {query:?}, which names no nonce or address");
            };
            assert!(ours(to), "answered for {to}, not ours");
            assert_eq!(
                proven_node(&nonce, to, &body),
                Some(id.node()),
                "the answer does not prove us"
            );
            let mut other = nonce;
            other[0] ^= 1;
            assert_eq!(proven_node(&other, to, &body), None, "valid for another nonce");
            for elsewhere in ["10.0.0.2", "fe80::2", "::ffff:10.0.0.3"] {
                let elsewhere: IpAddr = elsewhere.parse().expect("an address");
                if elsewhere.to_canonical() != to.to_canonical() {
                    assert_eq!(proven_node(&nonce, elsewhere, &body), None, "valid at {elsewhere}");
                }
            }
            Some((nonce, to, body))
        }
        Err(ProofRefused::NotOurs(ip)) => {
            assert!(!ours(ip) && nonce.is_some() && to == Some(ip), "refused {ip} wrongly");
            None
        }
        Err(ProofRefused::Query) => {
            assert!(nonce.is_none() || to.is_none(), "refused {query:?}, which names both");
            None
        }
    };
    // Edits of the honest answer (or of one for a fixed nonce and address).
    let (nonce, to, body) = honest.unwrap_or_else(|| {
        let (nonce, to) = ([7u8; 16], IpAddr::from([10, 0, 0, 1]));
        (nonce, to, id.prove(&nonce, to))
    });
    let mut edited = body.clone().into_bytes();
    for pair in edits.chunks_exact(2) {
        let at = pair[0] as usize % (edited.len() + 1);
        match pair[1] {
            0 => {
                if at < edited.len() {
                    edited.remove(at);
                }
            }
            b => edited.insert(at, b),
        }
    }
    let edited = String::from_utf8_lossy(&edited);
    proves_only_with_its_key(&edited, &nonce, to, &body);
    // The edits alone, as a whole answer.
    proves_only_with_its_key(&String::from_utf8_lossy(edits), &nonce, to, &body);
}
