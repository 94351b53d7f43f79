//! Why the store server did not serve what a request asked for, and the one place that turns each
//! reason into a status ([`ServeError::into_response`]).
//!
//! Invariants: every miss and every failure is a 404 (a Nix client fails its build on a 5xx, but
//! moves on after a 404), so an unsigned, untrusted, absent or unreadable path all look the
//! same; only a malformed request (400, 414), a method other than GET and HEAD (405), a range
//! past a NAR's end (416) and a proxy's request for a servable NAR when no transfer slot is free
//! (503 busy, only to a request that says it takes one: `cache_url::BUSY_OK_HEADER`) say more. Every reason is logged here; clients get fixed short bodies,
//! never a path, an address or a daemon message.

use std::net::SocketAddr;

use http::{Response, StatusCode};

use super::transfers::Refused;
use crate::beacon::identity::ProofRefused;
use crate::cache_url::RouteError;
use crate::http::{self as h, Body};
use crate::narinfo::StorePath;

/// Why a request to the store server got no content.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("only GET and HEAD are served")]
    Method,
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The `Host` header of `/install` holds more than a host name or address (it ends up in the
    /// script).
    #[error("bad Host header")]
    BadHost,
    /// No content summary is published (yet), or none for the version asked.
    #[error("no content summary to send")]
    NoSummary,
    /// `/peers` without a beacon.
    #[error("no peer table (no beacon)")]
    NoPeerTable,
    /// `/identity` without a node key.
    #[error("no node identity")]
    NoIdentity,
    /// `/identity` asked more often than `proofs::ProofLimits` allows this source.
    #[error("too many identity proofs asked")]
    TooManyProofs { peer: SocketAddr },
    #[error("identity proof refused: {source}")]
    IdentityRefused {
        peer: SocketAddr,
        #[source]
        source: ProofRefused,
    },
    /// Not in the index (absent, unsigned, untrusted), or not the NAR the URL names.
    #[error("not a servable path")]
    Miss,
    /// The daemon no longer has the path as indexed (dropped from the index).
    #[error("{path} changed or went away since it was indexed")]
    Gone { path: StorePath },
    #[error("no transfer slot for {path}: {source}")]
    NoSlot {
        peer: SocketAddr,
        path: StorePath,
        #[source]
        source: Refused,
    },
    /// No slot within `transfers::BUSY_WAIT` for a request that takes a busy answer (a proxy's,
    /// `cache_url::BUSY_OK_HEADER`): 503 with `Retry-After`, before any body.
    #[error("busy: no transfer slot for {path}: {source}")]
    Busy {
        peer: SocketAddr,
        path: StorePath,
        #[source]
        source: Refused,
        /// Hosts streaming this NAR from here now, to be tried instead (`cache_url::TRY_HEADER`).
        hints: Vec<crate::beacon::wire::NodeId>,
    },
    /// As `Busy`, for a NAR this host is still fetching (`server::partial`).
    #[error("busy: no transfer slot for an in-flight NAR: {source}")]
    PartialBusy {
        peer: SocketAddr,
        #[source]
        source: Refused,
        hints: Vec<crate::beacon::wire::NodeId>,
    },
    #[error("daemon path info for {path} failed: {source}")]
    PathInfo {
        path: StorePath,
        #[source]
        source: crate::store::Error,
    },
    #[error("daemon NAR of {path} failed: {source}")]
    DaemonNar {
        path: StorePath,
        #[source]
        source: crate::store::Error,
    },
    /// This process cannot read its own binary (logged when first tried).
    #[error("our own binary is unreadable")]
    NoBinary,
    /// The binary needs a loader (`interpreter`) newcomers may not have: not handed out.
    #[error("the binary to hand out is not static (needs {interpreter})")]
    NotStatic { interpreter: String },
    #[error("no transfer slot for /install: {source}")]
    NoInstallSlot {
        peer: SocketAddr,
        #[source]
        source: Refused,
    },
    /// A `Range` past the end of a NAR of `size` bytes.
    #[error("range not satisfiable for {size} bytes")]
    Range { size: u64 },
}

/// The busy answer: 503, `Retry-After` in whole seconds, the hosts to try instead, a fixed body.
fn busy(hints: &[crate::beacon::wire::NodeId]) -> Response<Body> {
    let mut r = h::text(StatusCode::SERVICE_UNAVAILABLE, "busy\n");
    let ids: Vec<String> = hints
        .iter()
        .take(crate::cache_url::MAX_TRY_HINTS)
        .map(ToString::to_string)
        .collect();
    if let Ok(v) = http::HeaderValue::from_str(&ids.join(",")) {
        if !ids.is_empty() {
            r.headers_mut().insert(crate::cache_url::TRY_HEADER, v);
        }
    }
    let secs = super::transfers::BUSY_RETRY_AFTER.as_secs().max(1);
    if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    r
}

impl ServeError {
    /// The response for this reason, logged (the levels say how interesting a reason is: a
    /// daemon failure is a warning, a full queue news, a plain miss a detail).
    pub fn into_response(self) -> Response<Body> {
        match self {
            Self::Method => {
                tracing::debug!(error = %self, "answering 405");
                h::method_not_allowed()
            }
            Self::Route(e) => {
                tracing::debug!(error = %e, "request path not served");
                e.into_response()
            }
            Self::BadHost => {
                tracing::debug!(error = %self, "answering 400");
                h::text(StatusCode::BAD_REQUEST, "bad Host header\n")
            }
            Self::Range { size } => {
                tracing::debug!(error = %self, "answering 416");
                h::range_not_satisfiable(size)
            }
            Self::TooManyProofs { peer } => {
                tracing::debug!(%peer, "identity proofs rate-limited; answering 404");
                h::not_found()
            }
            Self::IdentityRefused { peer, ref source } => {
                tracing::debug!(%peer, error = %source, "identity proof refused");
                h::not_found()
            }
            Self::NoSlot {
                peer,
                ref path,
                ref source,
            } => {
                tracing::info!(%peer, %path, error = %source, "no transfer slot; answering 404");
                h::not_found()
            }
            Self::Busy {
                peer,
                ref path,
                ref source,
                ref hints,
            } => {
                tracing::info!(%peer, %path, error = %source, hints = hints.len(), "no transfer slot; answering busy");
                busy(hints)
            }
            Self::PartialBusy {
                peer,
                ref source,
                ref hints,
            } => {
                tracing::info!(%peer, error = %source, hints = hints.len(), "no transfer slot for an in-flight NAR; answering busy");
                busy(hints)
            }
            Self::NoInstallSlot { peer, ref source } => {
                tracing::info!(%peer, error = %source, "no transfer slot for /install; answering 404");
                h::not_found()
            }
            Self::PathInfo { ref path, ref source } => {
                tracing::warn!(%path, error = %source, "daemon path info failed; answering 404");
                h::not_found()
            }
            Self::DaemonNar { ref path, ref source } => {
                tracing::warn!(%path, error = %source, "daemon NAR failed; answering 404");
                h::not_found()
            }
            Self::NoSummary
            | Self::NoPeerTable
            | Self::NoIdentity
            | Self::Miss
            | Self::Gone { .. }
            | Self::NoBinary
            | Self::NotStatic { .. } => {
                tracing::debug!(error = %self, "answering 404");
                h::not_found()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Every reason's status, `Allow`/`Content-Range` where they belong, and a body that never
    /// carries the reason's detail (path, address, daemon message).
    #[tokio::test]
    async fn every_reason_gets_its_status_and_a_fixed_body() {
        let path =
            || StorePath::parse("/nix/store", "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-secret").expect("path");
        let peer: SocketAddr = "10.9.8.7:4321".parse().expect("addr");
        let daemon = || crate::store::Error::Daemon("daemon detail".into());
        let cases: Vec<(ServeError, u16, &str)> = vec![
            (ServeError::Method, 405, "only GET and HEAD\n"),
            (RouteError::NotFound.into(), 404, "not found\n"),
            (RouteError::BadRequest.into(), 400, "bad request\n"),
            (RouteError::TooLong.into(), 414, "request path too long\n"),
            (ServeError::BadHost, 400, "bad Host header\n"),
            (ServeError::NoSummary, 404, "not found\n"),
            (ServeError::NoPeerTable, 404, "not found\n"),
            (ServeError::NoIdentity, 404, "not found\n"),
            (
                ServeError::IdentityRefused {
                    peer,
                    source: ProofRefused::Query,
                },
                404,
                "not found\n",
            ),
            (ServeError::TooManyProofs { peer }, 404, "not found\n"),
            (ServeError::Miss, 404, "not found\n"),
            (ServeError::Gone { path: path() }, 404, "not found\n"),
            (
                ServeError::NoSlot {
                    peer,
                    path: path(),
                    source: Refused::AddrQueueFull,
                },
                404,
                "not found\n",
            ),
            (
                ServeError::Busy {
                    peer,
                    path: path(),
                    source: Refused::Timeout(super::super::transfers::BUSY_WAIT),
                    hints: vec![crate::beacon::wire::NodeId([7; 16])],
                },
                503,
                "busy\n",
            ),
            (
                ServeError::PartialBusy {
                    peer,
                    source: Refused::AddrQueueFull,
                    hints: Vec::new(),
                },
                503,
                "busy\n",
            ),
            (
                ServeError::PathInfo {
                    path: path(),
                    source: daemon(),
                },
                404,
                "not found\n",
            ),
            (
                ServeError::DaemonNar {
                    path: path(),
                    source: daemon(),
                },
                404,
                "not found\n",
            ),
            (ServeError::NoBinary, 404, "not found\n"),
            (
                ServeError::NotStatic {
                    interpreter: "/nix/store/x-glibc/ld.so".into(),
                },
                404,
                "not found\n",
            ),
            (
                ServeError::NoInstallSlot {
                    peer,
                    source: Refused::Timeout(std::time::Duration::from_secs(20)),
                },
                404,
                "not found\n",
            ),
            (ServeError::Range { size: 1234 }, 416, "range not satisfiable\n"),
        ];
        for (e, status, body) in cases {
            let name = format!("{e:?}");
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), status, "{name}");
            assert_eq!(r.headers().get(http::header::ALLOW).is_some(), status == 405, "{name}");
            if status == 416 {
                assert_eq!(r.headers()[http::header::CONTENT_RANGE], "bytes */1234");
            }
            assert_eq!(
                r.headers().get(http::header::RETRY_AFTER).is_some(),
                status == 503,
                "{name}"
            );
            if name.starts_with("Busy") {
                assert_eq!(r.headers()[crate::cache_url::TRY_HEADER], "07".repeat(16));
            } else {
                assert!(r.headers().get(crate::cache_url::TRY_HEADER).is_none(), "{name}");
            }
            let got = r.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(got, body.as_bytes(), "{name}");
        }
    }
}
