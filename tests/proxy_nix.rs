//! The proxy with the real Nix client: a closure realised through it from a peer's store server,
//! with the upstream stopped. With this machine's Nix 2.8, and with Nix 2.26 (client and the
//! peer's daemon) from the Debian 13 root that `./run nix-root` builds.

mod common;

use std::process::Command;

use common::fake::Rig;
use common::roots::{self, HOST_MOUNT};
use common::*;

#[cfg_attr(
    lnc_no_nix,
    ignore = "needs Nix (apt-get install nix-bin); under CI=true it runs and fails instead"
)]
#[test]
fn nix_store_realises_a_closure_through_the_proxy_from_a_peer_with_upstream_down() {
    check(false);
}

#[cfg_attr(
    lnc_no_nix,
    ignore = "needs Nix (apt-get install nix-bin); under CI=true it runs and fails instead"
)]
#[test]
fn nix_store_realises_a_closure_through_the_proxy_from_a_peer_with_upstream_down_nix226() {
    check(true);
}

/// Makes a command of the client's Nix.
type NixCmd<'a> = Box<dyn Fn(&str) -> Command + 'a>;

fn check(nix226: bool) {
    if !require_nix() {
        return;
    }
    let nix_root = if nix226 {
        let Some(r) = roots::nix226_root() else { return };
        Some(r)
    } else {
        None
    };
    let f = fixture();
    // Host A has the closure (with test-hydra-1 signatures) and runs its store server.
    let host = Host::with_paths_on(&[&f.top], nix_root.as_deref());
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
    let home = client.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let store = client.path().join("store");
    // The client's chroot store as its Nix sees it, and that Nix.
    let (client_store, client_nix): (String, NixCmd) = match &nix_root {
        None => (store.display().to_string(), Box::new(|p: &str| nix(p, &home))),
        Some(r) => (
            format!("{HOST_MOUNT}/store"),
            Box::new(|p: &str| roots::in_nix_root(r, client.path(), p, &home)),
        ),
    };
    let version = run(client_nix("nix").arg("--version"));
    assert!(version.contains(if nix226 { "2.26" } else { "2.8" }), "{version}");
    let subst = format!("http://{proxy}");
    run(client_nix("nix-store")
        .args(["--store", &client_store])
        .args(["-r", &f.top, "--option", "substituters", &subst])
        .args(["--option", "trusted-public-keys", &f.pk]));
    run(client_nix("nix")
        .args(["store", "verify", "--store", &client_store])
        .args(["-r", &f.top, "--option", "trusted-public-keys", &f.pk]));
    let info = run(client_nix("nix")
        .args(["path-info", "--json", "-r", "--store", &client_store])
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
