//! The response body type and the response pieces both servers use: plain-text statuses, 200s,
//! HEAD, and NAR responses with `Range`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

/// Response body: nothing, one buffer, or a stream of chunks fed by a producer task through a
/// bounded channel (so a slow client slows the producer: backpressure). An `Err` item aborts the
/// response, which the client sees as a truncated transfer.
pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, io::Error>>),
    Pull(futures_util::stream::BoxStream<'static, Result<Bytes, io::Error>>),
}

impl Body {
    pub fn empty() -> Self {
        Body::Full(None)
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::Full(Some(b))
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Body::Full(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut *self {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
            Body::Pull(s) => s.as_mut().poll_next(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) | Body::Pull(_) => SizeHint::default(),
        }
    }
}

/// A response with a status and a short plain-text body.
pub fn text(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// A 200 response with `body` of type `content_type`.
pub fn ok(body: impl Into<Body>, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(body.into());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `Some(true)` for HEAD, `Some(false)` for GET, `None` for any other method.
pub fn is_head(method: &http::Method) -> Option<bool> {
    match *method {
        http::Method::GET => Some(false),
        http::Method::HEAD => Some(true),
        _ => None,
    }
}

/// The 405 for methods other than GET and HEAD.
pub fn method_not_allowed() -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

/// HEAD answers like GET without the body: drops a full body, keeping its length.
pub fn strip_for_head(resp: &mut Response<Body>) {
    if let Body::Full(Some(b)) = resp.body() {
        let len = b.len();
        *resp.body_mut() = Body::empty();
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// The 416 for a range past the end of a body of `size` bytes.
pub fn range_not_satisfiable(size: u64) -> Response<Body> {
    let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
    r.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).unwrap_or(HeaderValue::from_static("bytes */0")),
    );
    r
}

/// A NAR response: `Accept-Ranges`, the length of `start..=end`, and for a range request 206 with
/// `Content-Range`. No `Content-Encoding`, so Nix resumes a broken transfer with `Range`.
pub fn nar_response(body: Body, size: u64, start: u64, end: u64, ranged: bool) -> Response<Body> {
    let mut r = Response::new(body);
    let hd = r.headers_mut();
    hd.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-nix-nar"));
    hd.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let len = if size == 0 { 0 } else { end + 1 - start };
    hd.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if ranged {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    r
}

/// A `Range` that starts past the end of the body (answer 416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A `bytes=` range resolved against a known size: first and last byte, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// Parses a `Range` header for a body of `size` bytes. `Ok(None)`: serve the whole body (no
/// header, or a form we do not honour, like multiple ranges, which RFC 9110 lets us ignore).
/// `Err`: unsatisfiable, answer 416.
pub fn parse_range(value: Option<&HeaderValue>, size: u64) -> Result<Option<ByteRange>, Unsatisfiable> {
    let Some(v) = value.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    let range = match (a.trim().is_empty(), b.trim().is_empty()) {
        (false, true) => num(a).map(|s| (s, size.saturating_sub(1))),
        (false, false) => match (num(a), num(b)) {
            (Some(s), Some(e)) if e >= s => Some((s, e.min(size.saturating_sub(1)))),
            _ => None,
        },
        (true, false) => num(b)
            .filter(|&n| n > 0)
            .map(|n| (size.saturating_sub(n), size.saturating_sub(1))),
        (true, true) => None,
    };
    match range {
        None => Ok(None),
        Some((start, _)) if start >= size => Err(Unsatisfiable),
        Some((start, end)) => Ok(Some(ByteRange { start, end })),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let check = |h: Option<&str>, size: u64, want: Result<Option<(u64, u64)>, Unsatisfiable>| {
            let hv = h.map(|s| HeaderValue::from_str(s).expect("header"));
            let got = parse_range(hv.as_ref(), size).map(|o| o.map(|r| (r.start, r.end)));
            assert_eq!(got, want, "{h:?} of {size}");
        };
        check(None, 100, Ok(None));
        check(Some("bytes=0-"), 100, Ok(Some((0, 99))));
        check(Some("bytes=10-"), 100, Ok(Some((10, 99))));
        check(Some("bytes=10-19"), 100, Ok(Some((10, 19))));
        check(Some("bytes=10-1000"), 100, Ok(Some((10, 99))));
        check(Some("bytes=-10"), 100, Ok(Some((90, 99))));
        check(Some("bytes=-1000"), 100, Ok(Some((0, 99))));
        check(Some("bytes=99-"), 100, Ok(Some((99, 99))));
        check(Some("bytes=100-"), 100, Err(Unsatisfiable));
        check(Some("bytes=200-300"), 100, Err(Unsatisfiable));
        check(Some("bytes=20-10"), 100, Ok(None));
        check(Some("bytes=0-1,5-6"), 100, Ok(None));
        check(Some("items=0-1"), 100, Ok(None));
        check(Some("bytes=x-"), 100, Ok(None));
        check(Some("bytes=-0"), 100, Ok(None));
        check(Some("bytes=18446744073709551615-"), 100, Err(Unsatisfiable));
    }
}
