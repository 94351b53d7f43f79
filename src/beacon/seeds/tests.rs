use super::*;
use std::net::Ipv4Addr;

fn check(input: &str, expected: Result<(SeedHost, u16), SeedParseError>) {
    let got = input.parse::<Seed>().map(|s| (s.host, s.port));
    assert_eq!(got, expected, "{input:?}");
}

#[test]
fn seeds_parse_as_host_and_port_and_errors_name_the_value() {
    let v4 = |a, b, c, d| SeedHost::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
    let name = |n: &str| SeedHost::Name(n.into());
    let v6: IpAddr = "fe80::1".parse().expect("v6");
    check("10.0.0.5", Ok((v4(10, 0, 0, 5), 8380)));
    check("10.0.0.5:9000", Ok((v4(10, 0, 0, 5), 9000)));
    check("cache.example", Ok((name("cache.example"), 8380)));
    check("Venue-Cache:8380", Ok((name("venue-cache"), 8380)));
    check("fe80::1", Ok((SeedHost::Ip(v6), 8380)));
    check("[fe80::1]", Ok((SeedHost::Ip(v6), 8380)));
    check("[fe80::1]:81", Ok((SeedHost::Ip(v6), 81)));
    check("", Err(SeedParseError::Empty));
    check("10.0.0.5:0", Err(SeedParseError::Port("0".into())));
    check("10.0.0.5:65536", Err(SeedParseError::Port("65536".into())));
    check("host:", Err(SeedParseError::Port("".into())));
    for bad in [
        "http://10.0.0.5:8380",
        "a b",
        "-x.example",
        "10.0.0.300",
        "[fe80::1",
        "[::1]x",
        "x..y",
    ] {
        match bad.parse::<Seed>() {
            Err(e @ SeedParseError::Host(_)) => assert!(e.to_string().contains(bad), "{e}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    // Display gives back a value that parses to the same seed.
    for s in ["10.0.0.5:9000", "[fe80::1]:81", "cache.example:8380"] {
        let seed: Seed = s.parse().expect("parses");
        assert_eq!(seed.to_string(), s);
    }
}

#[test]
fn retries_double_up_to_the_cap_and_refreshes_slow_down_in_a_large_hall() {
    assert_eq!(retry_after(1), SEED_RETRY_FIRST);
    assert_eq!(retry_after(2), SEED_RETRY_FIRST * 2);
    assert_eq!(retry_after(3), SEED_RETRY_FIRST * 4);
    assert_eq!(retry_after(1000), SEED_RETRY_MAX);
    assert_eq!(refresh_after(0), SEED_REFRESH);
    assert_eq!(refresh_after(SMALL_HALL), SEED_REFRESH_LARGE);
    assert!(SEED_REFRESH * 3 > SEED_RETRY_FIRST && SEED_ENTRY_INTERVAL * 3 > SEED_REFRESH_LARGE);
}

#[test]
fn listed_addresses_are_placed_anywhere_routable_but_never_loopback() {
    let from4: SocketAddr = "10.1.0.9:8380".parse().expect("addr");
    let from_ll: SocketAddr = "[fe80::9%3]:8380".parse().expect("addr");
    let routed: SocketAddr = "192.0.2.7:8380".parse().expect("addr");
    assert_eq!(place(routed, from4), Some(routed), "across a router");
    for bad in [
        "127.0.0.1:8380",
        "0.0.0.0:8380",
        "255.255.255.255:8380",
        "239.1.1.1:8380",
        "10.0.0.1:0",
        "[::1]:8380",
    ] {
        let a: SocketAddr = bad.parse().expect("addr");
        assert_eq!(place(a, from4), None, "{bad}");
    }
    let ll: SocketAddr = "[fe80::7]:8380".parse().expect("addr");
    assert_eq!(place(ll, from4), None, "link-local needs the seed's own scope");
    match place(ll, from_ll) {
        Some(SocketAddr::V6(a)) => assert_eq!(a.scope_id(), 3),
        other => panic!("{other:?}"),
    }
}

/// A one-connection-at-a-time HTTP server on loopback answering every request with `response`.
async fn fake_server(response: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut buf = [0u8; 2048];
            let _ = c.read(&mut buf).await;
            let _ = c.write_all(response.as_bytes()).await;
            let _ = c.shutdown().await;
        }
    });
    (addr, task)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PEX_TIMEOUT)
        .build()
        .expect("client")
}

/// A seed that is not a local-nix-cache store server (another HTTP server, one that names no
/// node id, nothing listening) is a typed failure; a store server's own entry enters the table
/// as answered, under the id it named; entries on loopback are not entered.
#[tokio::test]
async fn a_seed_is_entered_under_the_id_its_server_names_and_bad_seeds_fail_typed() {
    let table = PeerTable::new(NodeId([9; 16]));
    let dns = SystemResolver::default();
    let seed_at = |a: SocketAddr| Seed {
        host: SeedHost::Ip(a.ip()),
        port: a.port(),
    };
    let (not_found, t1) = fake_server("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
    let got = fetch(&client(), &dns, &seed_at(not_found), &table, "/peers").await;
    assert_eq!(got, Err(SeedFailure::Status(404)));
    let (anon, t2) = fake_server("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
    let got = fetch(&client(), &dns, &seed_at(anon), &table, "/peers").await;
    assert_eq!(got, Err(SeedFailure::NoNodeId));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let got = fetch(&client(), &dns, &seed_at(closed), &table, "/peers").await;
    assert!(matches!(got, Err(SeedFailure::Unreachable(_))), "{got:?}");
    assert!(table.is_empty());
    // A store server naming its id, listing one peer on loopback (never entered).
    let body = format!("{} 127.0.0.1:8380 1 5000 -\n", NodeId([2; 16]));
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\n{NODE_HEADER}: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            NodeId([1; 16]),
            body.len()
        )
        .into_boxed_str(),
    );
    let (store, t3) = fake_server(response).await;
    let got = fetch(&client(), &dns, &seed_at(store), &table, "/peers")
        .await
        .expect("a store server");
    assert_eq!(
        (got.node, got.addr, got.listed, got.reachable),
        (NodeId([1; 16]), store, 1, 0)
    );
    let peers = table.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!((peers[0].node, peers[0].addrs.clone()), (NodeId([1; 16]), vec![store]));
    assert!(peers[0].answered.is_some(), "the seed's server named its id: answered");
    for t in [t1, t2, t3] {
        t.abort();
    }
}

/// The summary version a seed's store server names (`SUMMARY_HEADER`) is kept with its entry,
/// and a later answer's newer version replaces it (issue #23: entries learnt over HTTP had no
/// version, so the proxy never fetched their summaries and asked only a sample of them).
#[tokio::test]
async fn a_seed_is_entered_with_the_summary_version_its_server_names() {
    let table = PeerTable::new(NodeId([9; 16]));
    let dns = SystemResolver::default();
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\n{NODE_HEADER}: {}\r\n{SUMMARY_HEADER}: 7\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            NodeId([1; 16]),
        )
        .into_boxed_str(),
    );
    let (store, task) = fake_server(response).await;
    let seed = Seed {
        host: SeedHost::Ip(store.ip()),
        port: store.port(),
    };
    fetch(&client(), &dns, &seed, &table, "/peers")
        .await
        .expect("a store server");
    assert_eq!(table.get(&NodeId([1; 16])).map(|p| p.summary), Some(Some(7)));
    note(
        &table,
        NodeId([1; 16]),
        store,
        SEED_FLAGS,
        SEED_ENTRY_INTERVAL,
        Some(8),
        Instant::now(),
    );
    assert_eq!(table.get(&NodeId([1; 16])).map(|p| p.summary), Some(Some(8)));
    task.abort();
}

/// One seed at a loopback port where nothing listens (the listener is bound, then dropped).
fn closed_seed() -> Seeds {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    Seeds::new(vec![Seed {
        host: SeedHost::Ip(closed.ip()),
        port: closed.port(),
    }])
}

/// The seed task asks a failing seed again with back-off (no busy loop) and reports it.
#[tokio::test(start_paused = true)]
async fn a_failing_seed_is_reported_and_retried_with_back_off() {
    let seeds = closed_seed();
    assert_eq!(seeds.snapshot()[0].state, SeedState::Pending);
    let table = Arc::new(PeerTable::new(NodeId([9; 16])));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(seeds.clone(), table, None, stop.clone()));
    let mut seen = Vec::new();
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = &seeds.snapshot()[0];
        if seen.last() != Some(&r.failures) {
            seen.push(r.failures);
        }
        if r.failures >= 4 {
            break;
        }
    }
    let r = &seeds.snapshot()[0];
    assert_eq!(r.state, SeedState::Failing, "{r:?}");
    assert!(r.error.as_deref().is_some_and(|e| e.contains("unreachable")), "{r:?}");
    assert!(r.line().contains("failing"), "{}", r.line());
    // 1 + 2 + 4 s of back-off between the first four tries: about 7 s of (paused) time, not a
    // busy loop of hundreds of tries.
    assert!(r.failures >= 4 && r.failures <= 5, "{seen:?}");
    stop.cancel();
    task.await.expect("the task ends when stopped");
}

/// A new link or a wake-up (a nudge) has every seed asked again at once, whatever its back-off:
/// a laptop that joins a network after a run of failures does not wait out a minute.
#[tokio::test(start_paused = true)]
async fn a_nudge_asks_a_backed_off_seed_again_at_once() {
    let seeds = closed_seed();
    let table = Arc::new(PeerTable::new(NodeId([9; 16])));
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(seeds.clone(), table, None, stop.clone()));
    let failures = || seeds.snapshot()[0].failures;
    // Back off to 16 s between tries (five failures: 1 + 2 + 4 + 8 s of waits so far).
    for _ in 0..400 {
        if failures() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(failures(), 5);
    let before = Instant::now();
    seeds.nudge();
    for _ in 0..100 {
        if failures() > 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(failures(), 6, "asked again after the nudge");
    assert!(
        before.elapsed() < retry_after(5),
        "the nudge did not wait out the back-off: {:?}",
        before.elapsed()
    );
    stop.cancel();
    task.await.expect("the task ends when stopped");
}
