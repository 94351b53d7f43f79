//! The proxy with the real Nix client: a closure realised through it from a peer's store server,
//! with the upstream stopped. With this machine's Nix 2.8, and with Nix 2.26 (client and the
//! peer's daemon) from the Debian 13 root that `./run nix-root` builds.

use crate::common::fake::Rig;
use crate::common::roots;
use crate::common::*;

#[test]
fn nix_store_realises_a_closure_through_the_proxy_from_a_peer_with_upstream_down() {
    require!(nix);
    check(false);
}

#[test]
fn nix_store_realises_a_closure_through_the_proxy_from_a_peer_with_upstream_down_nix226() {
    require!(nix);
    check(true);
}

fn check(nix226: bool) {
    let Some(nix_root) = roots::nix_under_test(nix226) else {
        return;
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
    let dead_url = crate::common::dead_url();
    let keys = local_nix_cache::narinfo::TrustedKeys::new(vec![
        local_nix_cache::narinfo::PublicKey::parse(&f.pk).expect("fixture key")
    ]);
    // The fixture's NARs are small, which `serve` fetches plain: zstd for every size here.
    rig.peer_zstd_min_bytes.store(0, std::sync::atomic::Ordering::Relaxed);
    let (proxy, px) = rig.proxy_trusting(vec![dead_url], keys);
    // The client's chroot store as its Nix sees it, and that Nix.
    let client = roots::ClientNix::new(nix_root.as_deref());
    let (client_store, client_nix) = (client.store.clone(), |p: &str| client.cmd(p));
    let store = client.physical_store();
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

/// Pass-through with the real Nix (issue #16), fast path: a real store server's peer becomes
/// proven after `PROVEN_AFTER` verified NARs (the three-path closure), and the next NAR (8 MiB
/// of random bytes) is passed through while it is hashed; Nix installs it and it verifies.
#[test]
fn nix_store_realises_a_path_passed_through_from_a_proven_peer() {
    use local_nix_cache::proxy::proven::PROVEN_AFTER;
    require!(nix);
    let f = fixture();
    assert_eq!(f.closure.len() as u32, PROVEN_AFTER, "the closure proves the peer");
    let host = Host::with_paths(&[&f.top, &f.rand]);
    let a = TestNode::start(serve_args(host.store_addr()));
    let rig = Rig::new();
    rig.announce(
        a.addr,
        a.node_id,
        local_nix_cache::beacon::wire::FLAG_NAR_NONE | local_nix_cache::beacon::wire::FLAG_NAR_ZSTD,
        None,
    );
    let keys = local_nix_cache::narinfo::TrustedKeys::new(vec![
        local_nix_cache::narinfo::PublicKey::parse(&f.pk).expect("fixture key")
    ]);
    let (proxy, px) = rig.proxy_trusting(vec![crate::common::dead_url()], keys);
    let client = tempfile::tempdir().expect("tempdir");
    let home = client.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let store = client.path().join("store").display().to_string();
    let subst = format!("http://{proxy}");
    let realise = |path: &str| {
        run(nix("nix-store", &home)
            .args(["--store", &store, "-r", path])
            .args(["--option", "substituters", &subst])
            .args(["--option", "trusted-public-keys", &f.pk]));
    };
    let node = a.node_id.to_string();
    let proven = || px.status().peers.iter().any(|p| p.node == node && p.proven);
    assert!(!proven());
    realise(&f.top);
    assert!(proven(), "proven after the closure: {:?}", px.status().peers);
    assert_eq!(px.stats().nars_passed_through, 0);
    realise(&f.rand);
    let s = px.stats();
    assert_eq!(s.nars_passed_through, 1, "{s:?}");
    assert_eq!((s.nars_from_peers, s.nars_cut), (4, 0), "{s:?}");
    let recent = px.status().recent;
    assert!(
        recent[0].path == f.rand && recent[0].verdict.as_str() == "passed through",
        "{recent:?}"
    );
    run(nix("nix", &home).args(["store", "verify", "--store", &store]).args([
        "-r",
        &f.rand,
        &f.top,
        "--option",
        "trusted-public-keys",
        &f.pk,
    ]));
}

/// Pass-through with the real Nix (issue #16), a proven peer that lies once: a fake peer serves
/// `PROVEN_AFTER` honest paths, then a wrong NAR of the right size. At most one `nix-store -r`
/// fails, and it installs nothing; the next one succeeds from another peer, the NAR verifies,
/// and the liar is not proven again, also after the proxy restarted.
#[test]
fn a_proven_peer_that_lies_costs_nix_at_most_one_failed_substitution() {
    require!(nix);
    lie_check(false);
}

#[test]
fn a_proven_peer_that_lies_costs_nix_at_most_one_failed_substitution_nix226() {
    require!(nix);
    lie_check(true);
}

fn lie_check(nix226: bool) {
    use crate::common::fake::test_key;
    use local_nix_cache::beacon::wire::NodeId;
    use local_nix_cache::proxy::proven::PROVEN_AFTER;
    let Some(nix_root) = roots::nix_under_test(nix226) else {
        return;
    };
    let rig = Rig::new();
    let (honest, lie) = rig.proven_liar("nix", 200_000, 3_000_000, 80, 1_000_000);
    let (proxy, px) = rig.proxy(vec![]);
    let client = roots::ClientNix::new(nix_root.as_deref());
    let (store, client_nix) = (client.store.clone(), |p: &str| client.cmd(p));
    let subst = format!("http://{proxy}");
    let pk = test_key().public().to_string();
    let realise = |paths: &[String]| {
        output(
            client_nix("nix-store")
                .args(["--store", &store, "-r"])
                .args(paths)
                .args(["--option", "substituters", &subst])
                .args(["--option", "trusted-public-keys", &pk]),
        )
    };
    let valid = |path: &str| {
        output(client_nix("nix-store").args(["--store", &store, "--check-validity", path]))
            .status
            .success()
    };
    let liar_node = NodeId([1; 16]).to_string();
    let proven = |px: &local_nix_cache::proxy::Proxy| px.status().peers.iter().any(|p| p.node == liar_node && p.proven);
    let paths: Vec<String> = honest.iter().map(|p| p.path.to_string()).collect();
    let out = realise(&paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(proven(&px), "proven after {PROVEN_AFTER} NARs");
    // The lie: this substitution fails (a short NAR), and nothing is installed.
    let lie_path = vec![lie.path.to_string()];
    let first = realise(&lie_path);
    eprintln!("the failed substitution: {}", String::from_utf8_lossy(&first.stderr));
    let s = px.stats();
    assert_eq!(s.nars_cut, 1, "the lie was passed through and cut: {s:?}");
    assert!(!first.status.success(), "a short NAR must fail the substitution");
    assert!(!valid(&lie_path[0]), "nothing installed from the lie");
    assert!(!proven(&px), "the liar lost the privilege");
    // The next attempt gets the NAR from the other peer, verified first.
    let second = realise(&lie_path);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(valid(&lie_path[0]));
    // What was installed is the honest NAR, byte for byte (dumped from the client's store).
    let installed = client.physical_store().join(lie_path[0].trim_start_matches('/'));
    let mut nar = Vec::new();
    local_nix_cache::store::dump::dump(&installed, |c| {
        nar.extend_from_slice(&c);
        true
    })
    .expect("dump the installed path");
    assert!(nar == lie.nar, "the installed path is the honest one");
    // A restarted proxy does not trust the liar again, whatever it delivers.
    let (proxy2, px2) = rig.proxy(vec![]);
    for p in &honest {
        assert_eq!(
            crate::common::get(proxy2, &format!("/{}.narinfo", p.hash())).status,
            200
        );
        let url = p.nar_url();
        assert!(crate::common::get(proxy2, &url).body == p.nar);
    }
    assert!(!proven(&px2), "the ban survives a restart");
}
