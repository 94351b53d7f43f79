//! The release binary that `GET /install/local-nix-cache` hands to newcomers runs on any Linux:
//! statically linked (no `PT_INTERP`: NixOS has no `/lib64/ld-linux-x86-64.so.2`), stripped,
//! small, and working in an empty root that holds only the binary, `/proc` and `/dev`:
//! `--version`, `serve` against a daemon socket (narinfo and NAR match the host's store, and the
//! binary it serves is itself), `peers` seeing that `serve`. Everything that can beacon runs in
//! network namespaces this test made. Needs `./run build` (run by `./run test`), root and Nix.

use std::process::Stdio;
use std::time::Duration;

use crate::common::netns::Lan;
use crate::common::roots::{curl, elf_facts, release_bin, EmptyRoot, Reap};
use crate::common::{fixture, hash_of, output, wait_for, Host};

/// The size the issue asks for; today's binary is well below (see the report printed below).
const MAX_BINARY_BYTES: u64 = 15 * 1024 * 1024;

#[test]
fn release_binary_is_static_stripped_and_small() {
    require!(nix, netns);
    let Some(bin) = release_bin() else { return };
    let bytes = std::fs::read(&bin).expect("read the binary");
    let facts = elf_facts(&bytes);
    println!("release binary {}: {} bytes, {facts:?}", bin.display(), bytes.len());
    assert_eq!(facts.interpreter, None, "needs a dynamic loader");
    assert!(!facts.symtab, "not stripped (.symtab)");
    assert!(!facts.debug_info, "carries debug info");
    assert!(
        bytes.len() as u64 <= MAX_BINARY_BYTES,
        "{} bytes > {MAX_BINARY_BYTES}",
        bytes.len()
    );
}

#[test]
fn runs_in_an_empty_root_version_serve_and_peers() {
    require!(nix, netns);
    let Some(bin) = release_bin() else { return };
    let f = fixture();
    let host = Host::with_paths(&[&f.top]);
    let lan = Lan::new(2);
    let (a, b) = (&lan.hosts[0], &lan.hosts[1]);
    let root_a = EmptyRoot::new(&bin);
    let root_b = EmptyRoot::new(&bin);
    // Nothing a dynamic binary would need is there.
    for gone in ["lib64", "lib", "usr", "etc"] {
        assert!(!root_a.dir.path().join(gone).exists());
    }

    let out = output(&mut root_a.command(&a.ns, None, &["--version"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version in the empty root: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let sock_dir = host.socket.parent().expect("socket dir");
    let sock_name = host.socket.file_name().expect("socket name").to_string_lossy();
    let store = format!("unix:///sock/{sock_name}");
    let listen = format!("{}:8380", a.ip4);
    let log_path = host.dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let serve = root_a
        .command(
            &a.ns,
            Some(sock_dir),
            &[
                "serve",
                "--store",
                &store,
                "--real-store-dir",
                "none",
                "--listen",
                &listen,
                "--interface",
                "eth0",
                "--announce-interval",
                "1s",
                "--upstream",
                "none",
                "--spool-dir",
                "/tmp",
                "--trusted-public-key",
                &f.pk,
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    let _serve = Reap(serve);
    let base = format!("http://{listen}");
    let narinfo_url = format!("{base}/{}.narinfo", hash_of(&f.top));
    // The index fills from the daemon after start.
    let narinfo = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        curl(&b.ns, &narinfo_url)
    })
    .map(|n| String::from_utf8_lossy(&n).into_owned())
    .unwrap_or_else(|| {
        panic!(
            "serve in the empty root did not serve {narinfo_url}: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    assert!(narinfo.contains(&format!("StorePath: {}", f.top)), "{narinfo}");
    assert!(narinfo.contains("Sig: test-hydra-1:"), "{narinfo}");
    let nar_path = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).expect("URL line");
    let nar = curl(&b.ns, &format!("{base}/{nar_path}")).expect("NAR");
    assert!(nar == host.dump(&f.top), "the NAR differs from the store's");
    // The binary it hands to newcomers is this static one.
    let served = curl(&b.ns, &format!("{base}/install/local-nix-cache")).expect("binary");
    assert!(served == std::fs::read(&bin).expect("read"), "served another binary");

    // `peers` from the same kind of empty root on the other host sees that `serve`.
    let out = output(&mut root_b.command(
        &b.ns,
        None,
        &["peers", "--json", "--interface", "eth0", "--timeout", "4s"],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&a.ip4.to_string()),
        "peers in the empty root did not see {}: {stdout} {}",
        a.ip4,
        String::from_utf8_lossy(&out.stderr)
    );
}
