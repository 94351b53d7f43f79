//! The URL shapes of a Nix binary cache as this project serves them, shared by the store server
//! (LAN-facing) and the proxy (the local Nix's substituter).
//!
//! A request path is parsed into a [`CacheRoute`] before anything is looked up; what is not one
//! is a [`RouteError`], answered without touching a store or a source. The NAR URL is
//! self-describing (`nar/<store hash>-<nar hash>.nar`), so it stays valid as long as any store
//! holds those exact bytes: after a restart, or after the peer that first had them left.

use http::{Response, StatusCode};

use crate::http::{self as h, Body};
use crate::narinfo::{NarHash, StorePathHash};

/// Response header in which a store server names its node id (hex), so a proxy can confirm that
/// the server at an announced address is the node that announced it.
pub const NODE_HEADER: &str = "x-local-nix-cache-node";

/// Request header by which a proxy says it takes a busy answer (503 with `Retry-After`) instead
/// of waiting in the store server's transfer queue (see `server::transfers::BUSY_WAIT`). Nix
/// never sends it: a Nix client pointed straight at a store server still gets the queue and,
/// after it, a 404 (it fails its build on a 5xx).
pub const BUSY_OK_HEADER: &str = "x-local-nix-cache-busy-ok";

/// Response header in which a store server tells its load: `<streaming> <waiting>`, the NAR
/// transfers it streams and those waiting for a slot now (see [`Load`]).
pub const LOAD_HEADER: &str = "x-local-nix-cache-load";

/// Response header that marks a narinfo answer for a path the store server does not hold but its
/// proxy is fetching (`proxy::partial`): its NAR comes from the bytes landed so far, unverified
/// by the sender; the receiver verifies it whole and never passes it through. Only sent to
/// requests carrying [`BUSY_OK_HEADER`] (proxies).
pub const PARTIAL_HEADER: &str = "x-local-nix-cache-partial";

/// Header of a busy answer (503) naming, as comma-separated node ids (hex), hosts that stream the
/// NAR from this server now: they are fetching it and serve what they have (at most
/// [`MAX_TRY_HINTS`]; the receiver asks only those in its own peer table).
pub const TRY_HEADER: &str = "x-local-nix-cache-try";
/// Most node ids a busy answer names (and a proxy reads from one).
pub const MAX_TRY_HINTS: usize = 4;

/// A store server's load as its [`LOAD_HEADER`] tells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Load {
    /// Transfers streaming now.
    pub streaming: u32,
    /// Transfers waiting for a slot now.
    pub waiting: u32,
}

impl Load {
    /// The header value.
    pub fn render(&self) -> String {
        format!("{} {}", self.streaming, self.waiting)
    }

    /// Parses a header value; `None` when it is not two decimal numbers (a peer's header is
    /// untrusted input: it only orders sources, never admits one).
    pub fn parse(v: &str) -> Option<Self> {
        let (s, w) = v.trim().split_once(' ')?;
        Some(Self {
            streaming: s.parse().ok()?,
            waiting: w.parse().ok()?,
        })
    }

    /// One number to rank by: the transfers a new one would share the server with.
    pub fn weight(&self) -> u64 {
        u64::from(self.streaming) + u64::from(self.waiting)
    }
}

/// Longest request path looked at; longer ones are 414.
pub const MAX_PATH_LEN: usize = 256;

/// How a NAR is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NarEncoding {
    /// The NAR itself (`.nar`; `Range` allowed).
    Plain,
    /// Compressed on the fly with zstd for peers (`.nar.zst`; no `Range`).
    Zstd,
}

/// What a well-formed binary-cache request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheRoute {
    CacheInfo,
    NarInfo(StorePathHash),
    Nar {
        hash: StorePathHash,
        nar_hash: NarHash,
        encoding: NarEncoding,
    },
}

/// A request path that is not a [`CacheRoute`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Well-formed but not something we serve (`/log/…`, `.ls`, `/realisations/…`).
    #[error("not served")]
    NotFound,
    /// Malformed (bad hash alphabet or length, traversal, escapes).
    #[error("malformed path")]
    BadRequest,
    #[error("path too long")]
    TooLong,
}

impl RouteError {
    pub fn into_response(self) -> Response<Body> {
        match self {
            Self::NotFound => h::not_found(),
            Self::BadRequest => h::text(StatusCode::BAD_REQUEST, "bad request\n"),
            Self::TooLong => h::text(StatusCode::URI_TOO_LONG, "request path too long\n"),
        }
    }
}

/// Parses a request path.
pub fn parse(path: &str) -> Result<CacheRoute, RouteError> {
    if path.len() > MAX_PATH_LEN {
        return Err(RouteError::TooLong);
    }
    if path == "/nix-cache-info" {
        return Ok(CacheRoute::CacheInfo);
    }
    if path.contains(['%', '\\', '\0']) || path.contains("..") || path.contains("//") {
        return Err(RouteError::BadRequest);
    }
    if let Some(h) = path.strip_prefix('/').and_then(|p| p.strip_suffix(".narinfo")) {
        return StorePathHash::parse(h)
            .map(CacheRoute::NarInfo)
            .map_err(|_| RouteError::BadRequest);
    }
    let nar = path.strip_prefix("/nar/").and_then(|p| {
        p.strip_suffix(".nar.zst")
            .map(|r| (r, NarEncoding::Zstd))
            .or_else(|| p.strip_suffix(".nar").map(|r| (r, NarEncoding::Plain)))
    });
    if let Some((rest, encoding)) = nar {
        let parsed = rest
            .split_once('-')
            .and_then(|(a, b)| Some((StorePathHash::parse(a).ok()?, NarHash::parse_nix32(b).ok()?)));
        return match parsed {
            Some((hash, nar_hash)) => Ok(CacheRoute::Nar {
                hash,
                nar_hash,
                encoding,
            }),
            None => Err(RouteError::BadRequest),
        };
    }
    Err(RouteError::NotFound)
}

/// The NAR URL written into a narinfo we serve (relative to the cache root).
pub fn nar_url(hash: &StorePathHash, nar_hash: &NarHash) -> String {
    format!("nar/{hash}-{}.nar", nar_hash.to_nix32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let h = "yvh90pjzcqqmp86sfvgqh3ravrarfipn";
        let n = "0w4qc5jjz09mr80sp0p2nkvmjrmznpj59b64w0rw4dfqns9py2qd";
        let hash = StorePathHash::parse(h).expect("hash");
        let nar_hash = NarHash::parse_nix32(n).expect("nar hash");
        let nar = |encoding| {
            Ok(CacheRoute::Nar {
                hash,
                nar_hash,
                encoding,
            })
        };
        use RouteError::*;
        let cases: Vec<(String, Result<CacheRoute, RouteError>)> = vec![
            ("/nix-cache-info".into(), Ok(CacheRoute::CacheInfo)),
            (format!("/{h}.narinfo"), Ok(CacheRoute::NarInfo(hash))),
            (format!("/nar/{h}-{n}.nar"), nar(NarEncoding::Plain)),
            (format!("/nar/{h}-{n}.nar.zst"), nar(NarEncoding::Zstd)),
            ("/".into(), Err(NotFound)),
            ("/install".into(), Err(NotFound)),
            (format!("/{h}.ls"), Err(NotFound)),
            ("/log/abc.drv".into(), Err(NotFound)),
            (format!("/realisations/sha256:{n}!out.doi"), Err(NotFound)),
            (format!("/nar/{n}.nar.xz"), Err(NotFound)),
            (format!("/nar/{h}-{n}.nar.zstd"), Err(NotFound)),
            (format!("/{}.narinfo", &h[..31]), Err(BadRequest)),
            (format!("/{h}e.narinfo"), Err(BadRequest)),
            (format!("/{}.narinfo", h.to_uppercase()), Err(BadRequest)),
            ("/../../etc/passwd.narinfo".into(), Err(BadRequest)),
            (format!("/%2e%2e/{h}.narinfo"), Err(BadRequest)),
            (format!("//{h}.narinfo"), Err(BadRequest)),
            (format!("/nar/{h}-{n}x.nar"), Err(BadRequest)),
            (format!("/nar/{h}.nar"), Err(BadRequest)),
            (format!("/nar/{h}-../{n}.nar"), Err(BadRequest)),
            (format!("/x/{h}.narinfo"), Err(BadRequest)),
            (format!("/{}.narinfo", "a".repeat(300)), Err(TooLong)),
        ];
        for (path, want) in cases {
            assert_eq!(parse(&path), want, "{path}");
        }
        assert_eq!(nar_url(&hash, &nar_hash), format!("nar/{h}-{n}.nar"));
    }

    #[test]
    fn load_header_round_trips_and_rejects_garbage() {
        let l = Load {
            streaming: 3,
            waiting: 7,
        };
        assert_eq!(Load::parse(&l.render()), Some(l));
        assert_eq!(l.weight(), 10);
        for bad in ["", "3", "3 x", "-1 2", "3  7", "99999999999 1"] {
            assert_eq!(Load::parse(bad), None, "{bad:?}");
        }
    }
}
