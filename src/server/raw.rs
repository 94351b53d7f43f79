//! The store server's raw path (issue #27): a plain NAR request on a connection that started
//! with one is answered on the socket itself (`http::raw`), and a NAR read from the physical
//! store directory is sent as its framing plus each file's contents with `sendfile(2)`, kernel to
//! socket, instead of two copies through user space and three task wake-ups per chunk.
//!
//! A `.nar.zst` GET is taken too: the NAR is compressed from the dump's stream while it
//! compresses, and once the encoder gives up on it (`compress::PeerZstd`: random bytes, media,
//! archives) the rest goes as raw blocks whose contents are sent with `sendfile`, so an
//! incompressible NAR costs its server about what the plain one does.
//!
//! Only the writing of the body differs from the hyper path: the response (route, index lookup,
//! validity check, transfer slot, busy answer, headers) is `StoreServer::answer`'s, the same for
//! both. Invariants: the transfer slot is held until the last byte is written; a NAR whose files
//! changed since the daemon vouched for it (a size that differs, a file that shrank) is cut
//! short, never completed with other bytes (a `.nar.zst` never gets its frame's last block nor
//! its body's last chunk); writing keeps the client's pace.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderValue, Method, Request, Response};

use super::compress::{PeerZstd, MAX_RAW_BLOCK};
use super::streams::{NarPart, Streams};
use super::transfers::Permit;
use crate::cache_url::{self, CacheRoute, NarEncoding};
use crate::http::raw::{write_response, RawError, RawOut};
use crate::http::{self as h, Body};
use crate::store::dump::{self, DumpError, Piece, Plan};
use crate::store::{PathInfo, Store};

/// A plain NAR (`cache_url`'s route), or a GET of its `.nar.zst`: the requests the raw path
/// exists for. Everything else goes to hyper.
pub(super) fn sure(req: &Request<()>) -> bool {
    match cache_url::parse(req.uri().path()) {
        Ok(CacheRoute::Nar { encoding, .. }) => encoding == NarEncoding::Plain || req.method() == Method::GET,
        _ => false,
    }
}

/// Writes `resp` to a raw connection: a [`DiskNar`] it carries with `sendfile`, any other body
/// as its frames come. Returns whether the connection may serve another request.
pub(super) async fn send(
    mut resp: Response<Body>,
    head: bool,
    out: &mut RawOut<'_>,
    store: &Store,
    streams: &Streams,
) -> Result<bool, RawError> {
    match resp.extensions_mut().remove::<DiskNar>() {
        None => write_response(out, resp, head).await,
        Some(disk) => disk.send(store, streams, resp, out).await,
    }
}

/// A NAR to send from the physical store directory, as `StoreServer::nar` decided for a request
/// served raw: it rides in the response's extensions (hence `Clone`; it is never cloned).
#[derive(Clone)]
pub(super) struct DiskNar {
    physical: PathBuf,
    info: PathInfo,
    part: NarPart,
    /// The transfer slot, held until the body is written.
    permit: Option<Arc<Permit>>,
    started: Instant,
}

/// Where the NAR of `info` is on disk, when `req` is served raw and is a GET of it (plain or
/// zstd): then the response carries a [`DiskNar`] for [`h::Handler::serve_raw`] instead of a body.
pub(super) fn on_disk<B>(req: &Request<B>, store: &crate::store::Store, info: &PathInfo) -> Option<PathBuf> {
    let raw = req.extensions().get::<h::raw::Raw>().is_some();
    (raw && req.method() == Method::GET).then(|| store.on_disk(info))?
}

/// `resp`, carrying `disk` (for `StoreServer::nar`).
pub(super) fn with_disk(mut resp: Response<Body>, disk: Option<DiskNar>) -> Response<Body> {
    if let Some(d) = disk {
        resp.extensions_mut().insert(d);
    }
    resp
}

impl DiskNar {
    pub(super) fn new(
        physical: PathBuf,
        info: PathInfo,
        part: NarPart,
        permit: Option<Arc<Permit>>,
        started: Instant,
    ) -> Self {
        Self {
            physical,
            info,
            part,
            permit,
            started,
        }
    }

    /// Writes `resp`'s head and bytes `start..=end` of the NAR. A path with too many files to
    /// plan (`dump::MAX_PLAN_BYTES`) is streamed by the dump, the hyper path's body.
    async fn send(
        self,
        store: &Store,
        streams: &Streams,
        mut resp: Response<Body>,
        out: &mut RawOut<'_>,
    ) -> Result<bool, RawError> {
        let physical = self.physical.clone();
        let path = self.part.path.clone();
        let plan = match tokio::task::spawn_blocking(move || dump::plan(&physical)).await {
            Ok(Ok(plan)) if plan.len() == self.part.size => plan,
            Ok(Err(DumpError::PlanTooLarge)) => {
                let stream = store.nar(&self.info).await.map_err(|e| {
                    tracing::warn!(%path, error = %e, "NAR transfer aborted");
                    RawError::Source(std::io::Error::other(e))
                })?;
                *resp.body_mut() = streams.nar_body(stream, self.part, self.permit, self.started);
                return write_response(out, resp, false).await;
            }
            r => {
                let e = match r {
                    Ok(Ok(plan)) => {
                        std::io::Error::other(format!("{} bytes on disk, {} vouched for", plan.len(), self.part.size))
                    }
                    Ok(Err(e)) => std::io::Error::other(e),
                    Err(e) => std::io::Error::other(e),
                };
                tracing::warn!(%path, error = %e, "NAR transfer aborted");
                return Err(RawError::Source(e));
            }
        };
        let (mut parts, _) = resp.into_parts();
        if self.part.zstd {
            parts
                .headers
                .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        let keep = out.write_head(&parts).await?;
        let r = if self.part.zstd {
            send_zstd(&plan, store, &self.info, out).await
        } else {
            send_plan(&plan, self.part.start, self.part.end, out).await
        };
        out.cork(false);
        let ms = self.started.elapsed().as_millis() as u64;
        match r {
            Ok(()) => tracing::info!(%path, bytes = out.sent, ms, raw = true, "NAR served"),
            Err(ref e) => tracing::warn!(%path, ms, error = %e, raw = true, "NAR transfer aborted"),
        }
        r.map(|()| keep)
    }
}

/// What the encoder task of [`send_zstd`] hands to the writer.
enum Encoded {
    /// Frame bytes to send as they are.
    Bytes(Vec<u8>),
    /// The encoder, which gave up on the NAR after its `total_in` bytes: the rest goes as raw
    /// blocks.
    RawFrom(PeerZstd),
    /// The whole NAR went through; the frame's end follows.
    Done(Vec<u8>),
}

/// Encoded pieces waiting for the writer (each at most one dump chunk's output, about 128 KiB).
const ENCODED_AHEAD: usize = 4;

/// Writes the NAR `plan` as one zstd frame ([`PeerZstd`]) in a chunked body: compressed from
/// the dump's stream while the encoder compresses (on a task of its own, owned here, so
/// compressing and sending overlap as on the hyper path), then the rest as raw blocks, each one
/// chunk whose contents go with `sendfile`. The frame's last block and the body's last chunk
/// follow only the whole NAR.
async fn send_zstd(plan: &Plan, store: &Store, info: &PathInfo, out: &mut RawOut<'_>) -> Result<(), RawError> {
    let size = plan.len();
    let stream = store
        .nar(info)
        .await
        .map_err(|e| RawError::Source(std::io::Error::other(e)))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(ENCODED_AHEAD);
    let mut encoder = tokio::task::JoinSet::new();
    encoder.spawn(encode(stream, size, tx));
    let mut enc = loop {
        match rx.recv().await {
            Some(Ok(Encoded::Bytes(b))) => out.write_chunk(&b).await?,
            Some(Ok(Encoded::RawFrom(enc))) => break enc,
            Some(Ok(Encoded::Done(b))) => {
                out.write_chunk(&b).await?;
                return out.end_chunks().await;
            }
            Some(Err(e)) => return Err(RawError::Source(e)),
            None => return Err(RawError::Source(std::io::Error::other("the encoder stopped"))),
        }
    };
    drop(encoder);
    while enc.total_in() < size {
        let pos = enc.total_in();
        let len = (size - pos).min(MAX_RAW_BLOCK as u64) as usize;
        let block = enc.raw_header(len).map_err(RawError::Source)?;
        out.chunk_head(block.len() + len).await?;
        out.write_all(&block, true).await?;
        send_plan(plan, pos, pos + len as u64 - 1, out).await?;
        out.end_chunk().await?;
    }
    let mut end = Vec::new();
    enc.finish(&mut end).map_err(RawError::Source)?;
    out.write_chunk(&end).await?;
    out.end_chunks().await
}

/// [`send_zstd`]'s encoder: the dump's stream through [`PeerZstd`] into `tx`, until the NAR's
/// `size` bytes went through or the encoder gives up on them (then it hands the encoder over).
async fn encode(
    mut stream: crate::store::NarStream,
    size: u64,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Encoded>>,
) {
    let r = async {
        let mut enc = PeerZstd::new()?;
        while enc.total_in() < size {
            let Some(chunk) = stream.next_chunk().await.map_err(std::io::Error::other)? else {
                let e = format!("the NAR ended after {} of {size} bytes", enc.total_in());
                return Err(std::io::Error::other(e));
            };
            let mut b = Vec::new();
            enc.push(&chunk, &mut b)?;
            if !b.is_empty() && tx.send(Ok(Encoded::Bytes(b))).await.is_err() {
                return Ok(None);
            }
            if !enc.compressing() && enc.total_in() < size {
                return Ok(Some(Encoded::RawFrom(enc)));
            }
        }
        let mut b = Vec::new();
        enc.finish(&mut b)?;
        Ok(Some(Encoded::Done(b)))
    }
    .await;
    match r {
        Ok(Some(last)) => {
            let _ = tx.send(Ok(last)).await;
        }
        Ok(None) => {}
        Err(e) => {
            let _ = tx.send(Err(e)).await;
        }
    }
}

/// Writes bytes `start..=end` of the NAR `plan`: framing from memory, contents with `sendfile`.
async fn send_plan(plan: &Plan, start: u64, end: u64, out: &mut RawOut<'_>) -> Result<(), RawError> {
    let mut pos = 0u64;
    for piece in &plan.pieces {
        let (p_start, p_end) = (pos, pos + piece.len());
        pos = p_end;
        if p_end <= start || piece.is_empty() {
            continue;
        }
        if p_start > end {
            break;
        }
        let from = start.saturating_sub(p_start);
        let to = (end + 1).min(p_end) - p_start;
        match piece {
            Piece::Bytes(b) => out.write_all(&b[from as usize..to as usize], true).await?,
            Piece::File { path, len } => {
                // Not through a symlink put in the file's place since the plan (the dump's walk
                // does not follow them either).
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(RawError::Source)?;
                let now = file.metadata().map_err(RawError::Source)?.len();
                if now < *len {
                    let e = DumpError::Changed(path.display().to_string());
                    return Err(RawError::Source(std::io::Error::other(e)));
                }
                out.sendfile(&file, from, to - from).await?;
            }
        }
    }
    Ok(())
}
