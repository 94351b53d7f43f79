//! The proxy with the real Nix client: a closure realised through it from a peer's store server,
//! with the upstream stopped.

mod common;

use common::fake::Rig;
use common::*;

#[test]
fn nix_store_realises_a_closure_through_the_proxy_from_a_peer_with_upstream_down() {
    if !require_nix() {
        return;
    }
    let f = fixture();
    // Host A has the closure (with test-hydra-1 signatures) and runs its store server.
    let host = Host::with_paths(&[&f.top]);
    let a = TestNode::start(serve_args(host.store_addr()));
    // The client's proxy knows A as a peer; its upstream is stopped (nothing listens there).
    let rig = Rig::new();
    // A real store server offers zstd, as its beacon would say: the NARs cross compressed.
    rig.announce(
        a.addr,
        a.node_id,
        local_nix_cache::beacon::wire::FLAG_NAR_NONE | local_nix_cache::beacon::wire::FLAG_NAR_ZSTD,
        None,
    );
    let dead_url = common::dead_url();
    let keys = local_nix_cache::narinfo::TrustedKeys::new(vec![
        local_nix_cache::narinfo::PublicKey::parse(&f.pk).expect("fixture key")
    ]);
    let (proxy, px) = rig.proxy_trusting(vec![dead_url], keys);
    let client = tempfile::tempdir().expect("tempdir");
    let (store, home) = (client.path().join("store"), client.path().join("home"));
    std::fs::create_dir_all(&home).expect("home");
    let subst = format!("http://{proxy}");
    run(nix("nix-store", &home)
        .arg("--store")
        .arg(&store)
        .args(["-r", &f.top, "--option", "substituters", &subst])
        .args(["--option", "trusted-public-keys", &f.pk]));
    run(nix("nix", &home)
        .args(["store", "verify", "--store"])
        .arg(&store)
        .args(["-r", &f.top, "--option", "trusted-public-keys", &f.pk]));
    let info = run(nix("nix", &home)
        .args(["path-info", "--json", "-r", "--store"])
        .arg(&store)
        .arg(&f.top));
    assert_eq!(
        info.matches("test-hydra-1:").count(),
        3,
        "upstream signatures kept: {info}"
    );
    let s = px.stats();
    assert_eq!(s.nars_from_peers, 3, "{s:?}");
    assert_eq!(s.nars_from_upstream, 0, "{s:?}");
    assert_eq!(s.nars_zstd_from_peers, 3, "NARs should cross zstd-compressed: {s:?}");
    // The installed files are the peer's (content check in the client's own store).
    let physical = store.join(f.top.trim_start_matches('/')).join("bin/hello");
    let script = std::fs::read_to_string(&physical).expect("installed file");
    assert!(script.contains(&f.closure.iter().find(|p| p.contains("mid")).cloned().expect("mid")));
}
