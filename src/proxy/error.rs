//! Why a request to the proxy did not get what it asked for, and the one place that decides the
//! status of each ([`ProxyError::into_response`]).

use std::sync::Arc;

use http::Response;

use super::fetch::FetchError;
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
