//! Tests of the store server's routing and busy hints.

use super::*;
use crate::cache_url::RouteError;

/// Issue #24: a busy answer names the hosts (node ids of the beacon's table) streaming the
/// NAR from the addresses the refusal lists, IPv4-mapped or not; other refusals name none.
#[tokio::test]
async fn busy_hints_are_the_table_nodes_at_the_streaming_addresses() {
    use crate::beacon::wire::{encode, Beacon, Kind, NodeId, FLAG_NAR_NONE};
    let t = crate::beacon::PeerTable::new(NodeId([0; 16]));
    for n in [5u8, 6, 7] {
        let b = encode(&Beacon {
            kind: Kind::Announce,
            flags: FLAG_NAR_NONE,
            node: NodeId([n; 16]),
            port: 8380,
            interval_ms: 1000,
            seq: 1,
            hostname: None,
            summary: None,
            commitment: None,
            proof: None,
        });
        let from: SocketAddr = format!("10.0.0.{n}:8380").parse().expect("addr");
        t.handle(from, &b, tokio::time::Instant::now());
    }
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    let r = transfers::Refused::NarShared(vec![ip("10.0.0.5"), ip("::ffff:10.0.0.6"), ip("10.0.0.99")]);
    let mut got = hints_in(Some(&t), &r);
    got.sort_by_key(|n| n.0);
    assert_eq!(got, vec![NodeId([5; 16]), NodeId([6; 16])]);
    assert!(hints_in(Some(&t), &transfers::Refused::AddrQueueFull).is_empty());
    assert!(hints_in(None, &r).is_empty(), "no beacon, no hints");
}

#[test]
fn install_routes_before_cache_routes() {
    assert_eq!(route("/install"), Ok(Route::Install));
    assert_eq!(route("/install/local-nix-cache"), Ok(Route::InstallBinary));
    assert_eq!(route("/nix-cache-info"), Ok(Route::Cache(CacheRoute::CacheInfo)));
    assert_eq!(route("/install/x"), Err(RouteError::NotFound));
    assert_eq!(route("/peers"), Ok(Route::Peers));
    assert_eq!(route("/identity"), Ok(Route::Identity));
    assert_eq!(route("/install/../x"), Err(RouteError::BadRequest));
}
