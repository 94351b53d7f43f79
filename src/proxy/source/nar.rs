//! A NAR's request and its answer's reader: a peer's large NAR on a connection of its own
//! (`http::client`, read on the fetch's task), small ones and upstreams' through reqwest's pools;
//! the decoder the NAR's compression needs.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::TryStreamExt;
use reqwest::header::HeaderMap;
use tokio::io::{AsyncBufRead, AsyncRead};
use url::Url;

use super::{
    busy_hints, busy_retry_after, check_node, peer_zstd_decoder, reachable_addrs, Candidate, Form, NarReader,
    SourceError, SourceId, Sources, BUSY_OK_HEADER, OWN_CONNECTION_MIN_BYTES, PEER_TIMEOUTS, TRANSPORT_ERROR,
    USER_AGENT,
};
use crate::beacon::wire::NodeId;
use crate::http::client;
use crate::narinfo::Compression;

impl Sources {
    /// Sends a GET of a NAR of `c` at `url` (from byte `range` on, if given) within its source's
    /// timeout: the answer, from the node announced (`check_node`); a peer's 503 is
    /// [`SourceError::Busy`]. A peer (our store server) is told that the proxy takes a busy
    /// answer, and asked for a NAR of [`OWN_CONNECTION_MIN_BYTES`] or more on a connection of its
    /// own by `http::client`; smaller ones, and upstreams', through reqwest.
    async fn send_nar(&self, c: &Candidate, url: Url, range: Option<&str>) -> Result<NarAnswer, SourceError> {
        let t = self.timeouts(&c.source);
        let answer = match &c.source {
            SourceId::Peer(node) if c.info.nar_size >= OWN_CONNECTION_MIN_BYTES => {
                tokio::time::timeout(t.narinfo, self.peer_get(node, &url, range))
                    .await
                    .map_err(|_| SourceError::Timeout)??
            }
            _ => {
                let mut req = match c.source {
                    SourceId::Peer(_) => self.peer_nar_client.get(url).header(BUSY_OK_HEADER, "1"),
                    SourceId::Upstream(_) => self.upstream_client.get(url),
                };
                if let Some(r) = range {
                    req = req.header(reqwest::header::RANGE, r);
                }
                let resp = tokio::time::timeout(t.narinfo, req.send())
                    .await
                    .map_err(|_| SourceError::Timeout)??;
                NarAnswer {
                    status: resp.status().as_u16(),
                    headers: resp.headers().clone(),
                    remote: resp.remote_addr(),
                    body: NarBody::Reqwest(resp),
                }
            }
        };
        check_node(&c.source, &answer.headers, answer.remote)?;
        if answer.status == 503 && matches!(c.source, SourceId::Peer(_)) {
            let (retry_after, hints) = (busy_retry_after(&answer.headers), busy_hints(&answer.headers));
            return Err(SourceError::Busy { retry_after, hints });
        }
        Ok(answer)
    }

    /// A GET of `url` at peer `node`'s addresses (those a peer may be reached at).
    async fn peer_get(&self, node: &NodeId, url: &Url, range: Option<&str>) -> Result<NarAnswer, SourceError> {
        let peer = self.peers.as_ref().and_then(|t| t.get(node)).ok_or(SourceError::Gone)?;
        let addrs = reachable_addrs(peer.addrs, self.loopback_peers);
        let host = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(80)
        );
        let mut headers = vec![("User-Agent", USER_AGENT), (BUSY_OK_HEADER, "1")];
        if let Some(r) = range {
            headers.push(("Range", r));
        }
        let req = client::Request {
            path_and_query: &url[url::Position::BeforePath..url::Position::AfterQuery],
            host: &host,
            headers: &headers,
        };
        let resp = client::get(&addrs, PEER_TIMEOUTS.connect, &req).await?;
        Ok(NarAnswer {
            status: resp.status,
            headers: resp.headers,
            remote: Some(resp.remote),
            body: NarBody::Peer(resp.body),
        })
    }

    /// Opens the NAR of `c`, decompressed, from uncompressed byte `from` (only for resumable
    /// candidates; others always start at 0). Returns the reader and the offset it starts at.
    /// `form`: [`Form::Zstd`] fetches a candidate that offers it (`c.zstd`) from byte 0 as
    /// `.nar.zst`; otherwise the NAR comes as its narinfo says.
    pub async fn open_nar(&self, c: &Candidate, from: u64, form: Form) -> Result<(NarReader, u64), SourceError> {
        let zstd = form == Form::Zstd && c.zstd && from == 0;
        let url = if zstd { c.zstd_url() } else { c.nar_url.clone() };
        let ranged = from > 0 && c.resumable();
        let range = ranged.then(|| format!("bytes={from}-"));
        let answer = self.send_nar(c, url, range.as_deref()).await?;
        let start = match answer.status {
            206 if ranged => from,
            200 => 0,
            other => return Err(SourceError::Status(other)),
        };
        let compression = if zstd { &Compression::Zstd } else { &c.info.compression };
        Ok((answer.body.decoded(compression, zstd)?, start))
    }

    /// Opens bytes `start..=end` of a peer's uncompressed NAR (`Range`; a 206 from `start` is
    /// required).
    pub async fn open_range(&self, c: &Candidate, start: u64, end: u64) -> Result<NarReader, SourceError> {
        let range = format!("bytes={start}-{end}");
        let answer = self.send_nar(c, c.nar_url.clone(), Some(&range)).await?;
        let from_start = answer
            .headers
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(&format!("bytes {start}-")));
        if answer.status != 206 || !from_start {
            return Err(SourceError::Status(answer.status));
        }
        answer.body.decoded(&Compression::None, false)
    }
}

/// A NAR request's answer, from either client.
struct NarAnswer {
    status: u16,
    headers: HeaderMap,
    remote: Option<SocketAddr>,
    body: NarBody,
}

enum NarBody {
    /// Read from the socket on the reader's task (`http::client`).
    Peer(client::Body),
    /// Read through reqwest (an upstream's NAR, or a small one of a peer's).
    Reqwest(reqwest::Response),
}

/// Read buffer under a decoder of a peer's compressed NAR (the decoder reads from it in place).
const PEER_DECODE_BUF: usize = 256 * 1024;

impl NarBody {
    /// The NAR's bytes, undoing `compression` (`peer_zstd`: a peer's on-the-fly `.nar.zst`, its
    /// window capped). The connection's errors are told apart from a decoder's (see
    /// [`is_transport_error`]).
    fn decoded(self, compression: &Compression, peer_zstd: bool) -> Result<NarReader, SourceError> {
        match self {
            NarBody::Peer(body) if *compression == Compression::None => Ok(Box::pin(Transport(body))),
            NarBody::Peer(body) => decoder(
                tokio::io::BufReader::with_capacity(PEER_DECODE_BUF, Transport(body)),
                compression,
                peer_zstd,
            ),
            NarBody::Reqwest(resp) => {
                let stream = resp.bytes_stream().map_err(|e| io::Error::new(TRANSPORT_ERROR, e));
                decoder(tokio_util::io::StreamReader::new(stream), compression, peer_zstd)
            }
        }
    }
}

/// `raw` decoded as `compression` says.
fn decoder<R: AsyncBufRead + Send + 'static>(
    raw: R,
    compression: &Compression,
    peer_zstd: bool,
) -> Result<NarReader, SourceError> {
    use async_compression::tokio::bufread::{BzDecoder, XzDecoder, ZstdDecoder};
    Ok(match compression {
        Compression::None => Box::pin(raw),
        Compression::Zstd if peer_zstd => Box::pin(peer_zstd_decoder(raw)),
        Compression::Xz => Box::pin(XzDecoder::new(raw)),
        Compression::Zstd => Box::pin(ZstdDecoder::new(raw)),
        Compression::Bzip2 => Box::pin(BzDecoder::new(raw)),
        Compression::Other(c) => return Err(SourceError::Compression(c.clone())),
    })
}

/// A peer's body whose every error is a transport error ([`TRANSPORT_ERROR`], the reason kept).
struct Transport(client::Body);

impl AsyncRead for Transport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => e,
            _ => io::Error::new(TRANSPORT_ERROR, e),
        })
    }
}
