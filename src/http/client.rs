//! A small HTTP/1.1 client for one `GET` on a connection of its own: the proxy's NAR requests
//! to peers (our own store servers). The body is read straight from the socket into the
//! caller's buffers, on the caller's task: no connection task between the socket and the reader,
//! no copy out of a client's buffers, reads as large as the caller's room (issue #27: with
//! hyper's client in between, a pass-through cost about a quarter more CPU per GiB).
//!
//! What it speaks: one request, no body, no pipelining, no keep-alive (the connection is closed
//! when the body is dropped, from this side, so the closing side's `TIME_WAIT` stays here and
//! not on a busy peer); an answer framed by `Content-Length`, `chunked`, or the connection's end;
//! no 1xx. Anything else is an error, never a guess.
//!
//! Bounds: the answer's head at most [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] headers; a chunk-size
//! line at most [`MAX_LINE_BYTES`], trailers at most [`MAX_TRAILER_BYTES`] in all; the connect
//! within the caller's timeout per address. The caller bounds the time to the head and between
//! reads of the body.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf, Take};
use tokio::net::TcpStream;

/// Longest answer head read.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in an answer.
pub const MAX_HEADERS: usize = 32;
/// Longest chunk-size line (with its extensions) of a chunked body.
pub const MAX_LINE_BYTES: usize = 1024;
/// Most bytes of trailers after a chunked body's last chunk.
pub const MAX_TRAILER_BYTES: usize = 4096;

/// Why a request got no answer, or an answer that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("no address to connect to")]
    NoAddress,
    #[error("sending the request: {0}")]
    Send(#[source] io::Error),
    #[error("reading the answer's head: {0}")]
    Head(#[source] io::Error),
    #[error("the connection ended before the answer's head did")]
    Closed,
    #[error("the answer's head is over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("the answer's head does not parse: {0}")]
    BadHead(&'static str),
}

impl ClientError {
    /// The connection could not be made (refused, no route, timed out, no address).
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect { .. } | ClientError::NoAddress)
    }
}

/// A `GET` to send: the path (with its query) and the headers besides `Host`.
pub struct Request<'a> {
    pub path_and_query: &'a str,
    pub host: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
}

/// An answer's head, and its body to read.
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    /// The address that answered.
    pub remote: SocketAddr,
    pub body: Body,
}

/// Connects to the first of `addrs` that accepts within `connect` (each), sends `req` and reads
/// the answer's head. A request that cannot be sent as it is opens no connection.
pub async fn get(addrs: &[SocketAddr], connect: Duration, req: &Request<'_>) -> Result<Response, ClientError> {
    let head = request_head(req).map_err(ClientError::BadHead)?;
    let (mut sock, remote) = connect_any(addrs, connect).await?;
    sock.write_all(head.as_bytes()).await.map_err(ClientError::Send)?;
    let mut buf = BytesMut::with_capacity(MAX_HEAD_BYTES);
    loop {
        if sock.read_buf(&mut buf).await.map_err(ClientError::Head)? == 0 {
            return Err(ClientError::Closed);
        }
        if let Some((status, headers, len)) = parse_head(&buf)? {
            buf.advance(len);
            let framing = Framing::of(status, &headers)?;
            let body = Body {
                sock: sock.take(0),
                buf,
                framing,
            };
            return Ok(Response {
                status,
                headers,
                remote,
                body,
            });
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(ClientError::HeadTooLarge);
        }
    }
}

async fn connect_any(addrs: &[SocketAddr], connect: Duration) -> Result<(TcpStream, SocketAddr), ClientError> {
    let mut last = ClientError::NoAddress;
    for addr in addrs {
        match tokio::time::timeout(connect, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                // The request is one write; the answer's reads are ours to size.
                let _ = s.set_nodelay(true);
                return Ok((s, *addr));
            }
            Ok(Err(source)) => last = ClientError::Connect { addr: *addr, source },
            Err(_) => {
                last = ClientError::Connect {
                    addr: *addr,
                    source: io::ErrorKind::TimedOut.into(),
                }
            }
        }
    }
    Err(last)
}

/// The request's head; a part that would break its framing (a line break, a control byte) is
/// refused rather than sent.
fn request_head(req: &Request<'_>) -> Result<String, &'static str> {
    let clean = |s: &str| s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if !req.path_and_query.starts_with('/') || req.path_and_query.contains(' ') || !clean(req.path_and_query) {
        return Err("request path");
    }
    if !clean(req.host) || req.host.contains(' ') {
        return Err("host");
    }
    let mut head = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", req.path_and_query, req.host);
    for (name, value) in req.headers {
        if !token(name) || !clean(value) {
            return Err("request header");
        }
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Ok(head)
}

/// The answer's status, headers and head length, once `buf` holds the whole head.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, HeaderMap, usize)>, ClientError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ClientError::HeadTooLarge),
        Err(_) => return Err(ClientError::BadHead("status line or header")),
    };
    let status = resp.code.ok_or(ClientError::BadHead("status"))?;
    if resp.version != Some(1) && resp.version != Some(0) {
        return Err(ClientError::BadHead("version"));
    }
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| ClientError::BadHead("header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| ClientError::BadHead("header value"))?;
        headers.append(name, value);
    }
    Ok(Some((status, headers, len)))
}

/// How the body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    /// A chunked body, at this point of its framing.
    Chunked(Chunked),
    /// Until the server closes the connection.
    UntilClose,
    /// The body ended.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of a chunk's data are left.
    Data(u64),
    /// The line break after a chunk's data is next.
    DataEnd,
    /// Trailer lines, and the empty line that ends the body; how many bytes of them were read.
    Trailers(usize),
}

impl Framing {
    fn of(status: u16, headers: &HeaderMap) -> Result<Framing, ClientError> {
        if (100..200).contains(&status) {
            return Err(ClientError::BadHead("1xx answer"));
        }
        if status == 204 || status == 304 {
            return Ok(Framing::Done);
        }
        let mut codings = headers.get_all(http::header::TRANSFER_ENCODING).iter().peekable();
        if codings.peek().is_some() {
            // Only `chunked`, alone: a coding we do not undo would hand its bytes on as the body.
            let all: Vec<&str> = codings
                .map(|v| v.to_str().unwrap_or("?"))
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .collect();
            if all.len() != 1 || !all[0].eq_ignore_ascii_case("chunked") {
                return Err(ClientError::BadHead("transfer coding"));
            }
            return Ok(Framing::Chunked(Chunked::Size));
        }
        let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
        match (lengths.next(), lengths.next()) {
            (None, _) => Ok(Framing::UntilClose),
            (Some(v), None) => {
                let s = v.to_str().map_err(|_| ClientError::BadHead("content-length"))?;
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ClientError::BadHead("content-length"));
                }
                let n = s.parse::<u64>().map_err(|_| ClientError::BadHead("content-length"))?;
                Ok(if n == 0 { Framing::Done } else { Framing::Length(n) })
            }
            (Some(_), Some(_)) => Err(ClientError::BadHead("several content-lengths")),
        }
    }
}

/// An answer's body: its bytes, as the framing says, and then the end. An error is the
/// connection's (reset, or closed early: `UnexpectedEof`) or the framing's (`InvalidData`).
pub struct Body {
    /// Limited per read to what the framing allows, so a read never takes bytes past the part
    /// being read.
    sock: Take<TcpStream>,
    /// Bytes read but not handed over yet (after the head, or with a chunk-size line).
    buf: BytesMut,
    framing: Framing,
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn early_end() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended inside the body")
}

impl Body {
    /// Whether the whole body was read.
    pub fn is_done(&self) -> bool {
        self.framing == Framing::Done
    }

    /// Reads at most `limit` bytes of data into `out`: from the buffered bytes first, else from
    /// the socket. Ok(0) only when the socket ended.
    fn poll_data(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>, limit: u64) -> Poll<io::Result<usize>> {
        let want = usize::try_from(limit).unwrap_or(usize::MAX).min(out.remaining());
        if !self.buf.is_empty() {
            let n = want.min(self.buf.len());
            out.put_slice(&self.buf[..n]);
            self.buf.advance(n);
            return Poll::Ready(Ok(n));
        }
        self.sock.set_limit(want as u64);
        let before = out.filled().len();
        ready!(Pin::new(&mut self.sock).poll_read(cx, out))?;
        Poll::Ready(Ok(out.filled().len() - before))
    }

    /// Reads more of the framing's lines into the buffer (at most `room` more bytes). Ok(false)
    /// when the socket ended.
    fn poll_fill(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<bool>> {
        self.buf.reserve(room);
        self.sock.set_limit(room as u64);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.sock),
            cx,
            &mut self.buf
        ))?;
        Poll::Ready(Ok(n > 0))
    }

    /// Takes one CRLF-ended line from the buffer (without its line break), reading for it as
    /// needed; at most `max` bytes.
    fn poll_line(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<BytesMut>> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                if at + 2 > max {
                    return Poll::Ready(Err(invalid("chunked framing line too long")));
                }
                let mut line = self.buf.split_to(at + 2);
                line.truncate(at);
                return Poll::Ready(Ok(line));
            }
            if self.buf.len() >= max {
                return Poll::Ready(Err(invalid("chunked framing line too long")));
            }
            let room = max + 1 - self.buf.len();
            if !ready!(self.poll_fill(cx, room))? {
                return Poll::Ready(Err(early_end()));
            }
        }
    }
}

/// A chunk-size line's size (hex digits, then optional extensions after `;`).
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(invalid("chunk size"));
    }
    let s = std::str::from_utf8(digits).map_err(|_| invalid("chunk size"))?;
    u64::from_str_radix(s, 16).map_err(|_| invalid("chunk size"))
}

impl AsyncRead for Body {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match this.framing {
                Framing::Done => return Poll::Ready(Ok(())),
                Framing::Length(left) => {
                    let n = ready!(this.poll_data(cx, out, left))?;
                    if n == 0 {
                        return Poll::Ready(Err(early_end()));
                    }
                    let left = left - n as u64;
                    this.framing = if left == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(left)
                    };
                    return Poll::Ready(Ok(()));
                }
                Framing::UntilClose => {
                    if ready!(this.poll_data(cx, out, u64::MAX))? == 0 {
                        this.framing = Framing::Done;
                    }
                    return Poll::Ready(Ok(()));
                }
                Framing::Chunked(Chunked::Data(left)) => {
                    let n = ready!(this.poll_data(cx, out, left))?;
                    if n == 0 {
                        return Poll::Ready(Err(early_end()));
                    }
                    let left = left - n as u64;
                    this.framing = Framing::Chunked(if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    });
                    return Poll::Ready(Ok(()));
                }
                Framing::Chunked(Chunked::Size) => {
                    let line = ready!(this.poll_line(cx, MAX_LINE_BYTES))?;
                    let size = chunk_size(&line)?;
                    this.framing = Framing::Chunked(if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    });
                }
                Framing::Chunked(Chunked::DataEnd) => {
                    if !ready!(this.poll_line(cx, 2))?.is_empty() {
                        return Poll::Ready(Err(invalid("no line break after a chunk")));
                    }
                    this.framing = Framing::Chunked(Chunked::Size);
                }
                Framing::Chunked(Chunked::Trailers(seen)) => {
                    let room = MAX_TRAILER_BYTES.saturating_sub(seen);
                    let line = ready!(this.poll_line(cx, room))?;
                    this.framing = if line.is_empty() {
                        Framing::Done
                    } else {
                        Framing::Chunked(Chunked::Trailers(seen + line.len() + 2))
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
