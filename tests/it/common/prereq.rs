//! The one place that decides what a missing prerequisite (Nix, network namespaces, a tool, a
//! root) means: locally the test skips and says so; under `CI` it FAILS, never skips (the project
//! rule: `.ci/run` installs everything, so a missing piece there is a broken set-up).
//!
//! A test states what it needs in its first line: `require!(nix);`, `require!(netns);` or
//! `require!(nix, netns);` (each name is a probe of this module, checked in that order).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Returns from the test (a skip) when a prerequisite is missing locally; under `CI` the probe
/// has already panicked.
macro_rules! require {
    ($($need:ident),+ $(,)?) => {
        if !($($crate::common::prereq::$need())&&+) {
            return;
        }
    };
}

/// `what` is missing: a panic (test failure) under `CI`, else a skip message. Always `false`, so
/// a probe can end with `missing(...)`.
pub fn missing(what: &str, fix: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {what} is missing: {fix}");
    }
    eprintln!("SKIPPED: {what} is missing ({fix}); this test fails instead under CI");
    false
}

/// As [`missing`], for what only narrows a test (it goes on without, doing `instead`).
pub fn partly_missing(what: &str, fix: &str, instead: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {what} is missing: {fix}");
    }
    eprintln!("PARTLY SKIPPED: {what} is missing ({fix}): {instead}");
}

/// True when Nix is usable.
pub fn nix() -> bool {
    let ok = Command::new("nix-store")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok || missing("Nix (nix-store)", "install nix-bin; the README's test command does")
}

/// True when network namespaces can be made (root, iproute2): one is made and deleted.
pub fn netns() -> bool {
    static PROBES: AtomicU32 = AtomicU32::new(0);
    let probe = format!(
        "lnc-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        return true;
    }
    missing("network namespaces", "they need root and iproute2")
}

/// True when nftables' `nft` runs (the venue tests simulate filtering bridges and host
/// firewalls with it).
pub fn nft() -> bool {
    let ok = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok || missing("nftables (nft)", "install nftables; the README's test command does")
}
