//! Why things fail on the proxy's paths, as values: a request ([`ProxyError`], with the one place
//! that decides the status of each, [`ProxyError::into_response`]), a NAR fetch
//! ([`FetchError`], whose last source failure is a [`SourceFailure`]: a failure or a [`LieKind`]),
//! and a pass-through body cut short ([`CutReason`]). None of them is a string; each renders as
//! text (`Display`) only where a person reads it (logs, the transfer list).

use std::io;
use std::sync::Arc;

use http::Response;

use super::source::SourceError;
use super::spool::SpoolError;
use crate::cache_url::RouteError;
use crate::http::{self as h, Body};

/// Why a request did not get what it asked for. One place decides the status of each
/// ([`Self::into_response`]): every miss or failure is a 404, which Nix takes as "not here" and
/// moves on, where a 5xx would be retried and then fail the build.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("no source has the narinfo")]
    NarinfoMiss,
    #[error("a recent miss")]
    RecentMiss,
    #[error("NAR unavailable: {0}")]
    NarUnavailable(Arc<FetchError>),
    #[error("compressed NARs are for peers, not for the local Nix")]
    CompressedNar,
    #[error("range not satisfiable for {0} bytes")]
    Range(u64),
}

impl ProxyError {
    pub fn into_response(self) -> Response<Body> {
        match self {
            Self::Route(e) => e.into_response(),
            Self::NarinfoMiss | Self::RecentMiss | Self::NarUnavailable(_) | Self::CompressedNar => h::not_found(),
            Self::Range(size) => h::range_not_satisfiable(size),
        }
    }
}

/// Why a NAR could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no source has the NAR")]
    NoSource,
    #[error("cannot spool the NAR: {0}")]
    Spool(#[from] SpoolError),
    #[error("every source failed ({tried} tried); last: {last}")]
    Exhausted { tried: usize, last: SourceFailure },
}

/// How a source let a NAR fetch down.
#[derive(Debug, thiserror::Error)]
pub enum SourceFailure {
    /// It failed (network, timeout, early end, refused): its bytes may be resumed by another.
    #[error(transparent)]
    Failed(SourceError),
    /// It sent something provably wrong: its bytes were discarded.
    #[error(transparent)]
    Lied(#[from] LieKind),
}

/// What was provably wrong in a source's NAR bytes.
#[derive(Debug, thiserror::Error)]
pub enum LieKind {
    /// A compressed stream that does not decode (or that our decoder refuses).
    #[error("bad compressed data: {0}")]
    BadCompression(#[source] io::Error),
    /// More bytes than the narinfo's signed size.
    #[error("more than the signed NarSize {0}")]
    OverNarSize(u64),
    /// The whole NAR's sha256 is not the signed one.
    #[error("NAR hash mismatch")]
    HashMismatch,
}

/// Why a pass-through body was cut short of its `Content-Length` (Nix then fails that download
/// and installs nothing).
#[derive(Clone, Debug, thiserror::Error)]
pub enum CutReason {
    /// The bytes already sent can no longer be vouched for: the NAR did not verify, or a source
    /// after the proven one made the spool start over.
    #[error("the NAR did not verify")]
    NotVerified,
    /// The fetch failed.
    #[error("{0}")]
    Fetch(Arc<FetchError>),
    /// The fetch task ended without a result (aborted).
    #[error("the fetch ended")]
    FetchEnded,
    /// The verified spool could not be read for the NAR's rest.
    #[error("{0}")]
    Spool(Arc<io::Error>),
}
