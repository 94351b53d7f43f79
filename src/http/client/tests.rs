use super::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A server that accepts one connection, reads the request head, sends `parts` one write each
/// (a short pause between them, so the client's reads see them apart), then closes. Returns its
/// address and a handle giving back the request head it read.
async fn server(parts: Vec<Vec<u8>>) -> (SocketAddr, tokio::task::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).await.expect("read");
            if n == 0 {
                break;
            }
            head.extend_from_slice(&b[..n]);
        }
        for p in parts {
            if s.write_all(&p).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        String::from_utf8_lossy(&head).into_owned()
    });
    (addr, h)
}

fn req<'a>(headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
    Request {
        path_and_query: "/nar/abc.nar?x=1",
        host: "node.peer:8380",
        headers,
    }
}

/// What a fetch came to: no answer, an answer whose body failed, or an answer and its body.
#[derive(Debug)]
enum Got {
    NoAnswer(ClientError),
    BodyFailed(io::Error),
    Whole {
        status: u16,
        headers: HeaderMap,
        body: Vec<u8>,
    },
}

/// Fetches from a [`server`] sending `parts`; also the request head it read.
async fn fetch(parts: Vec<Vec<u8>>) -> (Got, String) {
    let (addr, h) = server(parts).await;
    let got = match get(&[addr], Duration::from_secs(2), &req(&[("X-Busy-Ok", "1")])).await {
        Err(e) => Got::NoAnswer(e),
        Ok(mut resp) => {
            let mut body = Vec::new();
            match resp.body.read_to_end(&mut body).await {
                Err(e) => Got::BodyFailed(e),
                Ok(_) => {
                    assert!(resp.body.is_done(), "a body read to its end is done");
                    Got::Whole {
                        status: resp.status,
                        headers: resp.headers,
                        body,
                    }
                }
            }
        }
    };
    (got, h.await.expect("server"))
}

fn bytes(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// The request goes as one `GET` with its path, `Host` and headers; a `Content-Length` body is
/// read to its length, and bytes the server sends after it are never taken as body.
#[tokio::test]
async fn a_sized_body_is_read_to_its_length_and_no_further() {
    let (r, head) = fetch(vec![
        bytes("HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Node: n1\r\n\r\n0123"),
        bytes("456789GARBAGE"),
    ])
    .await;
    let Got::Whole { status, headers, body } = r else {
        panic!("{r:?}")
    };
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-node").map(|v| v.as_bytes()), Some(&b"n1"[..]));
    assert_eq!(body, b"0123456789");
    assert!(
        head.starts_with("GET /nar/abc.nar?x=1 HTTP/1.1\r\nHost: node.peer:8380\r\n"),
        "{head}"
    );
    assert!(head.contains("X-Busy-Ok: 1\r\n"), "{head}");
}

/// A chunked body comes out as its data alone, however the framing is cut between reads:
/// sizes in hex with extensions, the line breaks, the last chunk and trailers.
#[tokio::test]
async fn a_chunked_body_is_its_data_however_it_is_cut() {
    let wire = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n";
    // Whole, then one byte a write.
    for parts in [vec![bytes(wire)], wire.bytes().map(|b| vec![b]).collect()] {
        let (r, _) = fetch(parts).await;
        let Got::Whole { body, .. } = r else { panic!("{r:?}") };
        assert_eq!(body, b"hello0123456789abcdef!");
    }
}

/// A body that ends early is an `UnexpectedEof` (the connection's fault), sized or chunked; one
/// framed by the connection's end is whole when it ends.
#[tokio::test]
async fn a_body_cut_short_is_an_early_end() {
    for wire in [
        "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ] {
        let (r, _) = fetch(vec![bytes(wire)]).await;
        let Got::BodyFailed(e) = r else {
            panic!("{wire:?}: {r:?}")
        };
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{wire:?}: {e}");
    }
    let (r, _) = fetch(vec![bytes("HTTP/1.1 200 OK\r\n\r\nall of it")]).await;
    let Got::Whole { body, .. } = r else { panic!("{r:?}") };
    assert_eq!(body, b"all of it");
}

/// Framing that could be misread is an `InvalidData` error, never a guess: a size that is not
/// hex, a size line over the cap, data not followed by its line break, trailers over the cap.
#[tokio::test]
async fn bad_chunked_framing_is_invalid_data() {
    let long = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(MAX_LINE_BYTES));
    let trailers = format!("0\r\n{}\r\n\r\n", "X-T: y\r\n".repeat(MAX_TRAILER_BYTES / 8 + 1));
    for chunks in [
        "zz\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloXX0\r\n\r\n",
        "\r\n",
        &long,
        &trailers,
    ] {
        let wire = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}");
        let (r, _) = fetch(vec![bytes(&wire)]).await;
        let Got::BodyFailed(e) = r else {
            panic!("{chunks:?}: {r:?}")
        };
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{chunks:?}: {e}");
    }
}

/// Heads this client does not read are errors: too large, a coding it does not undo, two
/// lengths, a 1xx, not HTTP, or the connection closed before the head ended.
#[tokio::test]
async fn heads_it_cannot_read_are_errors() {
    let big = format!("HTTP/1.1 200 OK\r\nX-A: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
    let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "X-A: a\r\n".repeat(MAX_HEADERS + 1));
    type Want = fn(&ClientError) -> bool;
    let cases: [(&str, Want); 7] = [
        (&big, |e| matches!(e, ClientError::HeadTooLarge)),
        (&many, |e| matches!(e, ClientError::HeadTooLarge)),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", |e| {
            matches!(e, ClientError::BadHead(_))
        }),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            |e| matches!(e, ClientError::BadHead(_)),
        ),
        ("HTTP/1.1 100 Continue\r\n\r\n", |e| {
            matches!(e, ClientError::BadHead(_))
        }),
        ("SSH-2.0-OpenSSH\r\n\r\n", |e| matches!(e, ClientError::BadHead(_))),
        ("HTTP/1.1 200 OK\r\nContent-Le", |e| matches!(e, ClientError::Closed)),
    ];
    for (wire, want) in cases {
        let (r, _) = fetch(vec![bytes(wire)]).await;
        let Got::NoAnswer(e) = r else {
            panic!("{:?}: {r:?}", &wire[..wire.len().min(60)])
        };
        assert!(want(&e), "{:?}: {e}", &wire[..wire.len().min(60)]);
    }
}

/// Nothing that would break the request's framing is sent: a line break in the path, the host
/// or a header is refused before anything is sent.
#[test]
fn a_request_with_a_line_break_is_refused() {
    let ok = request_head(&req(&[("Range", "bytes=1-")])).expect("a plain request");
    assert!(ok.ends_with("Range: bytes=1-\r\n\r\n"));
    for bad in [
        Request {
            path_and_query: "/a\r\nX-Evil: 1",
            host: "h",
            headers: &[],
        },
        Request {
            path_and_query: "/a",
            host: "h\r\nX-Evil: 1",
            headers: &[],
        },
        Request {
            path_and_query: "/a",
            host: "h",
            headers: &[("Range", "bytes=1-\r\nX-Evil: 1")],
        },
        Request {
            path_and_query: "/a",
            host: "h",
            headers: &[("Bad Name", "v")],
        },
        Request {
            path_and_query: "a",
            host: "h",
            headers: &[],
        },
    ] {
        assert!(request_head(&bad).is_err(), "{:?}", bad.path_and_query);
    }
}

/// A refused connection is a `Connect` error naming the address; the next address is tried.
#[tokio::test]
async fn the_next_address_is_tried_when_one_refuses() {
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    match get(&[refused], Duration::from_secs(1), &req(&[])).await {
        Err(ClientError::Connect { addr, .. }) => assert_eq!(addr, refused),
        other => panic!("{:?}", other.map(|r| r.status)),
    }
    let (addr, h) = server(vec![bytes("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")]).await;
    let resp = get(&[refused, addr], Duration::from_secs(1), &req(&[]))
        .await
        .expect("the second address answers");
    assert_eq!((resp.status, resp.remote), (404, addr));
    assert!(resp.body.is_done(), "an empty body is done at once");
    h.await.expect("server");
}

/// A request that cannot be sent as it is opens no connection.
#[tokio::test]
async fn a_refused_request_opens_no_connection() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let bad = Request {
        path_and_query: "/a\r\nX-Evil: 1",
        host: "h",
        headers: &[],
    };
    assert!(matches!(
        get(&[addr], Duration::from_secs(1), &bad).await,
        Err(ClientError::BadHead(_))
    ));
    let accepted = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
    assert!(accepted.is_err(), "nobody connected");
}
