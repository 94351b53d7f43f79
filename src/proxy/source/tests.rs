//! Tests of `proxy::source`.

use super::*;

/// A peer's zstd frame that asks for a 128 MiB window is refused (as a decoding error, not a
/// transport one), while our store server's 512 KiB window decodes.
#[tokio::test]
async fn a_peer_zstd_frame_with_a_huge_window_is_refused() {
    use std::io::Write;
    use tokio::io::AsyncReadExt;
    let data = vec![42u8; 300_000];
    let frame = |window_log: u32| {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).expect("encoder");
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(window_log))
            .expect("window");
        enc.write_all(&data).expect("write");
        enc.finish().expect("finish")
    };
    let decode = |frame: Vec<u8>| async move {
        let mut out = Vec::new();
        peer_zstd_decoder(&frame[..]).read_to_end(&mut out).await.map(|_| out)
    };
    assert_eq!(decode(frame(19)).await.expect("ours decodes"), data);
    let huge = frame(27);
    let mut plain = Vec::new();
    async_compression::tokio::bufread::ZstdDecoder::new(&huge[..])
        .read_to_end(&mut plain)
        .await
        .expect("a valid frame for an uncapped decoder");
    let e = decode(huge).await.expect_err("refused");
    assert!(!is_transport_error(&e), "{e:?}");
}

/// Issue #22: a client that cannot be built with its policies was silently replaced by
/// `reqwest::Client::new()` (following redirects, without the peer resolver): fail-open. It
/// is an error now, which stops the node at start.
#[tokio::test]
async fn a_client_that_cannot_be_built_is_an_error_not_a_default_client() {
    let resolver = || {
        Arc::new(PeerResolver {
            table: None,
            loopback_peers: false,
            system: Arc::new(crate::dns::SystemResolver::default()),
        })
    };
    let e = build_clients(resolver(), "bad\nagent").expect_err("no client without its policies");
    assert_eq!(e.which, "peer");
    assert!(build_clients(resolver(), USER_AGENT).is_ok());
}

#[test]
fn peers_are_never_reached_on_this_hosts_own_or_special_addresses() {
    let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
    for (addr, loopback_ok, want) in [
        ("10.0.0.2:8380", false, true),
        ("[fe80::1%2]:8380", false, true),
        ("127.0.0.1:8380", false, false),
        ("[::1]:8380", false, false),
        ("[::ffff:127.0.0.1]:8380", false, false),
        ("127.0.0.1:8380", true, true),
        ("0.0.0.0:8380", true, false),
        ("239.255.83.80:8380", true, false),
        ("10.0.0.2:0", true, false),
    ] {
        assert_eq!(peer_addr_allowed(&a(addr), loopback_ok), want, "{addr} {loopback_ok}");
    }
}

/// Issue #24: a busy answer's `Retry-After` is a peer's word: taken within
/// [`BUSY_RETRY_BOUNDS`], one second when absent or unreadable.
#[test]
fn a_busy_answers_retry_after_is_bounded() {
    let resp = |v: Option<&str>| {
        let mut b = http::Response::builder().status(503);
        if let Some(v) = v {
            b = b.header(reqwest::header::RETRY_AFTER, v);
        }
        reqwest::Response::from(b.body("busy").expect("response"))
    };
    let (min, max) = BUSY_RETRY_BOUNDS;
    for (v, want) in [
        (None, Duration::from_secs(1)),
        (Some("2"), Duration::from_secs(2)),
        (Some("0"), min),
        (Some("86400"), max),
        (Some("Wed, 21 Oct 2015 07:28:00 GMT"), Duration::from_secs(1)),
    ] {
        assert_eq!(busy_retry_after(resp(v).headers()), want, "{v:?}");
    }
}

/// Issue #24: the hosts a busy answer names are read as node ids, at most `MAX_TRY_HINTS`,
/// what does not parse skipped.
#[test]
fn a_busy_answers_hints_are_node_ids_and_capped() {
    let id = |b: u8| NodeId([b; 16]);
    let resp = |v: &str| {
        let r = http::Response::builder()
            .status(503)
            .header(crate::cache_url::TRY_HEADER, v)
            .body("busy")
            .expect("response");
        reqwest::Response::from(r)
    };
    let all: Vec<String> = (1..=6u8).map(|b| id(b).to_string()).collect();
    assert_eq!(
        busy_hints(resp(&all.join(",")).headers()),
        (1..=4u8).map(id).collect::<Vec<_>>()
    );
    assert_eq!(busy_hints(resp(&format!("junk, {}", id(9))).headers()), vec![id(9)]);
    assert!(busy_hints(&HeaderMap::new()).is_empty());
}
