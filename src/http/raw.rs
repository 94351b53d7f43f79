//! Raw connections: a handler may serve some requests itself, writing straight to the socket
//! (the store server sends plain NARs with `sendfile`, issue #27), before hyper gets the
//! connection.
//!
//! Per connection, request heads are read here ([`MAX_RAW_HEAD`] bytes at most, within the
//! header timeout) and parsed with `httparse`, the parser hyper uses. A request is served raw
//! only while it is one this module and the handler are sure about ([`plain_head`] and
//! [`super::Handler::sure`]): HTTP/1.1 `GET`/`HEAD`, no body, no `Expect`, no upgrade, a head
//! that fits. At the first other request (or an unparsable or over-long head) the connection
//! goes to hyper for the rest of its life, the bytes already read replayed first ([`Rewind`]):
//! anything doubtful is hyper's to answer, so this is never a second, laxer HTTP parser.
//!
//! Invariants: a raw response is written within its [`Pace`] (a client that takes no bytes
//! for the stall timeout, or too few per window, is cut off); its head carries a
//! `Content-Length` or it closes the connection after the body; at shutdown an idle raw
//! connection closes and a busy one closes after its response.

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::Body;
use super::pace::{Pace, PaceError};

/// Longest request head served raw; a longer one goes to hyper (which answers 431 past its own
/// cap). Memory: at most about twice this per connection while its head is read.
pub const MAX_RAW_HEAD: usize = 8 * 1024;
/// Most header lines of a request served raw; more go to hyper.
pub const MAX_RAW_HEADERS: usize = 32;
/// Largest single `sendfile` call: the pace counts bytes per call, and a call returns at once
/// anyway when the socket buffer is full.
const SENDFILE_MAX: usize = 1 << 20;

/// Requests taken by the raw path in this process (all servers; counted before the answer is
/// written): tests see the raw path used.
pub static RAW_RESPONSES: AtomicU64 = AtomicU64::new(0);

/// A response served raw ended early.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error(transparent)]
    Client(#[from] PaceError),
    #[error("writing to the client: {0}")]
    Write(#[source] io::Error),
    /// The body's source failed (its producer, a file that changed); the client sees a short body.
    #[error("the body's source failed: {0}")]
    Source(#[source] io::Error),
}

/// A request head whose marker extension tells the handler that the request is served raw.
#[derive(Clone, Copy, Debug)]
pub struct Raw;

pub(super) enum Head {
    Complete(Box<Request<()>>, usize),
    Unsure,
    Closed,
}

/// Reads until `buf` holds a complete request head; a head past [`MAX_RAW_HEAD`], unparsable or
/// not [`plain_head`] is [`Head::Unsure`].
pub(super) async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<Head> {
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Parsed::Complete(req, len) => return Ok(Head::Complete(Box::new(req), len)),
                Parsed::Unsure => return Ok(Head::Unsure),
                Parsed::Partial if buf.len() >= MAX_RAW_HEAD => return Ok(Head::Unsure),
                Parsed::Partial => {}
            }
        }
        buf.reserve(MAX_RAW_HEAD.min(4096));
        if stream.read_buf(buf).await? == 0 {
            return Ok(Head::Closed);
        }
    }
}

#[allow(clippy::large_enum_variant)] // one per request, moved on at once
enum Parsed {
    Complete(Request<()>, usize),
    Partial,
    Unsure,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RAW_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_RAW_HEAD => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        _ => return Parsed::Unsure,
    };
    let (Some(method), Some(path), Some(1)) = (r.method, r.path, r.version) else {
        return Parsed::Unsure;
    };
    let mut req = Request::new(());
    *req.version_mut() = Version::HTTP_11;
    match (Method::from_bytes(method.as_bytes()), path.parse::<http::Uri>()) {
        (Ok(m), Ok(u)) if u.scheme().is_none() && path.starts_with('/') => {
            *req.method_mut() = m;
            *req.uri_mut() = u;
        }
        _ => return Parsed::Unsure,
    }
    for h in r.headers.iter() {
        match (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            (Ok(n), Ok(v)) => {
                req.headers_mut().append(n, v);
            }
            _ => return Parsed::Unsure,
        }
    }
    if !plain_head(&req) {
        return Parsed::Unsure;
    }
    req.extensions_mut().insert(Raw);
    Parsed::Complete(req, len)
}

/// Whether a request is plain enough to be served raw: `GET` or `HEAD`, without a body (no
/// `Content-Length`, `Transfer-Encoding`), `Expect`, `Upgrade` or `TE`, and a `Connection` header,
/// if any, that only says `close` or `keep-alive`.
pub fn plain_head(req: &Request<()>) -> bool {
    let h = req.headers();
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::EXPECT,
            header::UPGRADE,
            header::TE,
        ]
        .iter()
        .all(|n| !h.contains_key(n))
        && h.get_all(header::CONNECTION).iter().all(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .map(str::trim)
                    .all(|t| t.eq_ignore_ascii_case("close") || t.eq_ignore_ascii_case("keep-alive"))
            })
        })
}

pub(super) fn wants_close(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    })
}

/// The head of `resp` as hyper would send it: status line, its headers, a `Date`, and
/// `Connection: close` when `close`. The caller made sure of `Content-Length` (or chunking).
pub fn head_bytes(resp: &http::response::Parts, close: bool) -> BytesMut {
    let mut b = BytesMut::with_capacity(512);
    let s = resp.status;
    b.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", s.as_str(), s.canonical_reason().unwrap_or("")).as_bytes());
    for (n, v) in &resp.headers {
        b.extend_from_slice(n.as_str().as_bytes());
        b.extend_from_slice(b": ");
        b.extend_from_slice(v.as_bytes());
        b.extend_from_slice(b"\r\n");
    }
    if close {
        b.extend_from_slice(b"connection: close\r\n");
    }
    b.extend_from_slice(
        format!(
            "date: {}\r\n\r\n",
            httpdate::fmt_http_date(std::time::SystemTime::now())
        )
        .as_bytes(),
    );
    b
}

/// Writes to a raw connection within a [`Pace`]: each wait for the socket to take more is bounded
/// by the stall timeout and the pace's window.
pub struct RawOut<'a> {
    stream: &'a TcpStream,
    pace: Pace,
    /// The client asked to close after this response (`Connection: close`).
    close: bool,
    /// Body bytes written (not the head).
    pub sent: u64,
}

impl<'a> RawOut<'a> {
    pub fn new(stream: &'a TcpStream, pace: Pace, req: &Request<()>) -> Self {
        Self {
            stream,
            pace,
            close: wants_close(req.headers()),
            sent: 0,
        }
    }

    /// Writes the head of `resp`, which must carry its `Content-Length`, corked (see
    /// [`Self::cork`]; the caller uncorks after the body). Returns whether the connection may
    /// serve another request.
    pub async fn write_head(&mut self, resp: &http::response::Parts) -> Result<bool, RawError> {
        let framed = resp.headers.contains_key(header::CONTENT_LENGTH) || is_chunked(&resp.headers);
        let close = self.close || wants_close(&resp.headers) || !framed;
        let head = head_bytes(resp, close && !resp.headers.contains_key(header::CONNECTION));
        self.cork(true);
        self.write_all(&head, false).await?;
        Ok(!close)
    }

    /// Holds partial segments back until [`Self::cork`]`(false)` (`TCP_CORK`): the head, the
    /// framing and the files' contents leave in full segments.
    pub fn cork(&self, on: bool) {
        let _ = socket2::SockRef::from(self.stream).set_tcp_cork(on);
    }

    /// Writes all of `b` (counted as body when `body`).
    pub async fn write_all(&mut self, b: &[u8], body: bool) -> Result<(), RawError> {
        self.write_parts([b], body.then_some(0)).await
    }

    /// Writes `parts` one after the other, with as few `writev` calls as the socket allows;
    /// the bytes of part `body` (if any) count as body.
    async fn write_parts<const N: usize>(&mut self, parts: [&[u8]; N], body: Option<usize>) -> Result<(), RawError> {
        // Where each part starts in the whole.
        let mut starts = [0usize; N];
        for i in 1..N {
            starts[i] = starts[i - 1] + parts[i - 1].len();
        }
        let total = starts[N - 1] + parts[N - 1].len();
        let mut done = 0;
        while done < total {
            self.pace
                .within(self.stream.writable())
                .await?
                .map_err(RawError::Write)?;
            // What is left of each part (nothing of those written already).
            let left: [io::IoSlice<'_>; N] = std::array::from_fn(|i| {
                io::IoSlice::new(&parts[i][done.saturating_sub(starts[i]).min(parts[i].len())..])
            });
            match self.stream.try_write_vectored(&left) {
                Ok(n) => {
                    if let Some(i) = body {
                        let (b_start, b_end) = (starts[i], starts[i] + parts[i].len());
                        self.sent += (done + n).min(b_end).saturating_sub(done.max(b_start)) as u64;
                    }
                    done += n;
                    self.pace.took(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(RawError::Write(e)),
            }
        }
        Ok(())
    }

    /// Writes the head of one chunk of `len` body bytes (`Transfer-Encoding: chunked`); the
    /// caller writes exactly `len` bytes, then [`Self::end_chunk`].
    pub async fn chunk_head(&mut self, len: usize) -> Result<(), RawError> {
        self.write_all(format!("{len:x}\r\n").as_bytes(), false).await
    }

    /// Ends a chunk begun with [`Self::chunk_head`].
    pub async fn end_chunk(&mut self) -> Result<(), RawError> {
        self.write_all(b"\r\n", false).await
    }

    /// Writes `b` as one chunk (nothing for an empty `b`: an empty chunk ends the body): its
    /// size line, the bytes and the line end in one `writev` while the socket takes them all.
    pub async fn write_chunk(&mut self, b: &[u8]) -> Result<(), RawError> {
        if b.is_empty() {
            return Ok(());
        }
        let head = format!("{:x}\r\n", b.len());
        self.write_parts([head.as_bytes(), b, b"\r\n"], Some(1)).await
    }

    /// Ends a chunked body (the last, empty chunk; no trailers).
    pub async fn end_chunks(&mut self) -> Result<(), RawError> {
        self.write_all(b"0\r\n\r\n", false).await
    }

    /// Sends `len` bytes of `file` from `offset` with `sendfile(2)`, kernel to socket. A file
    /// that ends sooner is a [`RawError::Source`].
    pub async fn sendfile(&mut self, file: &std::fs::File, offset: u64, len: u64) -> Result<(), RawError> {
        let mut off = offset as i64;
        let end = offset + len;
        while (off as u64) < end {
            self.pace
                .within(self.stream.writable())
                .await?
                .map_err(RawError::Write)?;
            let count = (end - off as u64).min(SENDFILE_MAX as u64) as usize;
            let r = self.stream.try_io(tokio::io::Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile64(self.stream.as_fd(), file.as_fd(), Some(&mut off), count)
                    .map_err(io::Error::from)
            });
            match r {
                Ok(0) => return Err(RawError::Source(io::Error::from(io::ErrorKind::UnexpectedEof))),
                Ok(n) => {
                    self.pace.took(n as u64);
                    self.sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(RawError::Write(e)),
            }
        }
        Ok(())
    }
}

/// Writes `resp` (head, then its body unless `head_only`), any [`Body`]: its frames as they
/// come, chunked (`Transfer-Encoding: chunked`, as hyper sends it) when the body's length is not
/// known. Returns whether the connection may serve another request. A body that fails ends
/// without its last chunk: the client sees a broken transfer, never a short complete one.
pub async fn write_response(out: &mut RawOut<'_>, mut resp: Response<Body>, head_only: bool) -> Result<bool, RawError> {
    if !resp.headers().contains_key(header::CONTENT_LENGTH) {
        match http_body::Body::size_hint(resp.body()).exact() {
            Some(n) => {
                resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
            None => {
                resp.headers_mut()
                    .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
        }
    }
    let chunked = is_chunked(resp.headers());
    let (parts, mut body) = resp.into_parts();
    let keep = out.write_head(&parts).await?;
    if !head_only {
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_next_frame(cx)).await {
            let data = frame.map_err(RawError::Source)?;
            if chunked {
                out.write_chunk(&data).await?;
            } else {
                out.write_all(&data, true).await?;
            }
        }
        if chunked {
            out.end_chunks().await?;
        }
    }
    out.cork(false);
    Ok(keep)
}

/// Whether the response's body is sent chunked.
fn is_chunked(h: &HeaderMap) -> bool {
    h.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("chunked")))
    })
}

trait PollData {
    fn poll_next_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>>;
}

impl PollData for Body {
    fn poll_next_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        match http_body::Body::poll_frame(self, cx) {
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f.into_data().unwrap_or_default()))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A connection whose first bytes were already read: they are read again first, then the socket.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only plain GET/HEAD heads of HTTP/1.1 are taken; everything else, or anything odd, is
    /// hyper's (`Unsure`), and an incomplete head waits for more.
    #[test]
    fn only_plain_heads_are_served_raw() {
        let ok = |s: &str| matches!(parse(s.as_bytes()), Parsed::Complete(..));
        let unsure = |s: &str| matches!(parse(s.as_bytes()), Parsed::Unsure);
        assert!(ok("GET /nar/x.nar HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(ok(
            "HEAD /nar/x.nar HTTP/1.1\r\nConnection: keep-alive\r\nRange: bytes=1-\r\n\r\n"
        ));
        assert!(ok("GET /nar/x.nar HTTP/1.1\r\nConnection: close\r\n\r\n"));
        for s in [
            "POST /nar/x.nar HTTP/1.1\r\n\r\n",
            "GET /nar/x.nar HTTP/1.0\r\n\r\n",
            "GET /nar/x.nar HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET /nar/x.nar HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /nar/x.nar HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /nar/x.nar HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            "GET http://a/nar/x.nar HTTP/1.1\r\n\r\n",
            "GET /nar/x.nar HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(unsure(s), "{s:?}");
        }
        assert!(matches!(parse(b"GET /nar/x.nar HTTP/1.1\r\nHost"), Parsed::Partial));
        let many: String = (0..MAX_RAW_HEADERS + 1).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert!(unsure(&format!("GET /n HTTP/1.1\r\n{many}\r\n")));
    }

    /// A body whose length is not known goes chunked, as hyper sends it, and the connection
    /// stays open; a body that fails ends without its last chunk (a broken transfer, never a
    /// complete short one).
    #[tokio::test]
    async fn a_body_of_unknown_length_goes_chunked() {
        async fn answer(items: Vec<io::Result<Bytes>>) -> (Result<bool, RawError>, Vec<u8>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let client = TcpStream::connect(listener.local_addr().expect("addr"))
                .await
                .expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            let req = Request::new(());
            let mut out = RawOut::new(&server, Pace::new(std::time::Duration::from_secs(5)), &req);
            let body = Body::Pull(Box::pin(futures_util::stream::iter(items)));
            let r = write_response(&mut out, Response::new(body), false).await;
            drop(server);
            let mut got = Vec::new();
            let mut client = client;
            client.read_to_end(&mut got).await.expect("read");
            (r, got)
        }
        let (r, got) = answer(vec![
            Ok(Bytes::from_static(b"hello ")),
            Ok(Bytes::new()),
            Ok(Bytes::from_static(b"world")),
        ])
        .await;
        assert!(r.expect("written"), "a chunked answer keeps the connection");
        let got = String::from_utf8(got).expect("text");
        let (head, body) = got.split_once("\r\n\r\n").expect("head");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body, "6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n");
        let (r, got) = answer(vec![Ok(Bytes::from_static(b"half")), Err(io::Error::other("gone"))]).await;
        assert!(matches!(r, Err(RawError::Source(_))));
        let got = String::from_utf8(got).expect("text");
        assert!(got.ends_with("4\r\nhalf\r\n"), "{got:?}");
    }

    /// Chunks far larger than the socket takes at once: the size line, the bytes and the line
    /// end go out in pieces (`writev` taking part of a part), and the body still reads back
    /// whole and framed.
    #[tokio::test]
    async fn chunks_written_in_pieces_stay_framed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .expect("sndbuf");
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            got
        });
        let parts: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![b'a' + i; 1 << 20])).collect();
        let req = Request::new(());
        let mut out = RawOut::new(&server, Pace::new(std::time::Duration::from_secs(5)), &req);
        let body = Body::Pull(Box::pin(futures_util::stream::iter(parts.clone().into_iter().map(Ok))));
        assert!(write_response(&mut out, Response::new(body), false)
            .await
            .expect("written"));
        assert_eq!(out.sent, 3 << 20, "body bytes counted");
        drop(server);
        let got = reader.await.expect("reader");
        let start = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
        let mut want = Vec::new();
        for p in &parts {
            want.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
            want.extend_from_slice(p);
            want.extend_from_slice(b"\r\n");
        }
        want.extend_from_slice(b"0\r\n\r\n");
        assert!(got[start..] == want[..], "the chunked body differs");
    }
}
