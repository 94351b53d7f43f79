//! The store server's answers for a NAR its host's proxy is still fetching (issue #24,
//! `proxy::partial`): to a peer's proxy only (a request carrying `cache_url::BUSY_OK_HEADER`),
//! the signed narinfo the proxy checked, marked `cache_url::PARTIAL_HEADER`, and the NAR's bytes
//! landed so far, following the spool's tail, `Range` included.
//!
//! Invariants: a Nix client never gets a partial answer (its request does not carry the header:
//! it gets the usual miss); an in-flight body takes a transfer slot like any NAR (busy when none
//! is free) and keeps its client's pace; it ends with an error (a cut body, never a complete
//! wrong one) when the spool is reset or abandoned, or after [`PARTIAL_IDLE`] without new bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response};

use super::error::ServeError;
use super::streams::Streams;
use super::transfers;
use crate::cache_url::PARTIAL_HEADER;
use crate::http::{self as h, Body};
use crate::narinfo::{NarHash, StorePathHash};
use crate::proxy::partial::Partials;

/// Longest wait of an in-flight body for its next bytes: as long as the receiving proxy waits
/// for a peer that sends nothing (`proxy::source::PEER_TIMEOUTS.idle`, 5 s).
pub const PARTIAL_IDLE: Duration = crate::proxy::source::PEER_TIMEOUTS.idle;

fn mark(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(PARTIAL_HEADER, HeaderValue::from_static("1"));
    r
}

/// The narinfo of a path being fetched here, for a peer's proxy (`Miss` otherwise).
pub fn narinfo(partials: Option<&Partials>, proxy: bool, hash: &StorePathHash) -> Result<Response<Body>, ServeError> {
    let p = partials
        .filter(|_| proxy)
        .and_then(|p| p.get(hash))
        .ok_or(ServeError::Miss)?;
    Ok(mark(h::ok(p.narinfo.clone(), "text/x-nix-narinfo")))
}

/// The bytes so far of the NAR `nar_hash` of a path being fetched here, for a peer's proxy.
pub async fn nar<B: Sync>(
    partials: Option<&Partials>,
    streams: &Streams,
    req: &Request<B>,
    peer: SocketAddr,
    hash: &StorePathHash,
    nar_hash: &NarHash,
    hints: impl Fn(&transfers::Refused) -> Vec<crate::beacon::wire::NodeId>,
) -> Result<Response<Body>, ServeError> {
    let proxy = req.headers().contains_key(crate::cache_url::BUSY_OK_HEADER);
    let p = partials
        .filter(|_| proxy)
        .and_then(|p| p.get(hash))
        .filter(|p| p.nar_hash == *nar_hash)
        .ok_or(ServeError::Miss)?;
    let size = p.tail.size();
    let range = h::parse_range(req.headers().get(header::RANGE), size)
        .map_err(|h::Unsatisfiable| ServeError::Range { size })?;
    let (start, end) = range.map_or((0, size.saturating_sub(1)), |r| (r.start, r.end));
    let body = if req.method() == Method::HEAD {
        Body::empty()
    } else {
        let permit = streams
            .transfers
            .acquire_for_nar(
                peer.ip(),
                transfers::NarShare {
                    nar: *nar_hash,
                    size,
                    start,
                    end,
                },
                transfers::MAX_TRANSFERS_PER_NAR,
            )
            .await
            .map_err(|source| ServeError::PartialBusy {
                peer,
                hints: hints(&source),
                source,
            })?;
        streams.tail_body(
            p.tail.clone(),
            hash.to_string(),
            start,
            end,
            Arc::new(permit),
            PARTIAL_IDLE,
        )
    };
    Ok(mark(h::nar_response(body, size, start, end, range.is_some())))
}
