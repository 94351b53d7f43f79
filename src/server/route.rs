//! Which route a request path asks the store server for (the binary-cache routes are
//! `cache_url`'s); a path that is none is a [`RouteError`] (`error` gives its status).

use crate::cache_url::{self, CacheRoute, RouteError};

/// What a request to the store server asks for: a binary-cache route, or the one-liner's files.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Cache(CacheRoute),
    /// The conference one-liner: `curl -fsSL http://PEER:8380/install | sh`.
    Install,
    /// This host's own binary, fetched by the install script.
    InstallBinary,
    /// The content summary (`?since=VERSION` for a delta), for peers' proxies.
    Summary,
    /// This host's own source (`source::TARBALL`), for the NixOS module snippet.
    InstallSource,
    /// The peers this host's beacon heard directly (peer exchange, `beacon::pex`).
    Peers,
    /// The proof that this server holds its node id at the address asked (`beacon::identity`).
    Identity,
}

pub fn route(path: &str) -> Result<Route, RouteError> {
    match path {
        "/install" => Ok(Route::Install),
        "/install/local-nix-cache" => Ok(Route::InstallBinary),
        "/install/source.tar" => Ok(Route::InstallSource),
        "/summary" => Ok(Route::Summary),
        "/peers" => Ok(Route::Peers),
        "/identity" => Ok(Route::Identity),
        _ => cache_url::parse(path).map(Route::Cache),
    }
}
