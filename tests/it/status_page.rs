//! The proxy's status page in a real browser: headless Chromium renders it (screenshot and DOM)
//! after some traffic. Needs Debian's chromium; skips locally without it, fails under CI.

use std::process::Command;
use std::sync::Arc;

use crate::common::fake::{FakeCache, FakePath, Rig};
use crate::common::get;

fn chromium() -> Option<&'static str> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    if found.is_none() {
        crate::common::prereq::missing("chromium", "the README's test command installs it");
    }
    found
}

/// Headless Chromium on loopback only, with no background traffic, in a fresh profile.
fn browser(bin: &str, profile: &std::path::Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,800",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

#[test]
fn status_page_renders_in_a_browser() {
    let Some(bin) = chromium() else { return };
    let p = FakePath::new("hello-page", 50_000, 11);
    let rig = Rig::new();
    let peer = Arc::new(FakeCache::default());
    peer.serve_path(&p);
    rig.peer(peer, 1);
    let (proxy, _) = rig.proxy(vec![]);
    assert_eq!(get(proxy, &format!("/{}.narinfo", p.hash())).status, 200);
    let nar = p.nar_url();
    assert_eq!(get(proxy, &nar).status, 200);
    let url = format!("http://{proxy}/");

    let dir = tempfile::tempdir().expect("tempdir");
    let dom = browser(bin, &dir.path().join("profile-dom"))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("<h1>local-nix-cache</h1>"), "{dom}");
    assert!(dom.contains("1 peer(s)"), "{dom}");
    assert!(dom.contains("hello-page"), "recent transfer not shown: {dom}");

    let png = dir.path().join("status.png");
    let st = browser(bin, &dir.path().join("profile-shot"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let (w, h) = (
        u32::from_be_bytes(bytes[16..20].try_into().expect("width")),
        u32::from_be_bytes(bytes[20..24].try_into().expect("height")),
    );
    assert_eq!((w, h), (1000, 800));
    assert!(
        bytes.len() > 10_000,
        "suspiciously small screenshot ({} bytes)",
        bytes.len()
    );
    if let Some(keep) = std::env::var_os("LNC_KEEP_SCREENSHOT") {
        std::fs::copy(&png, keep).expect("keep screenshot");
    }
}
