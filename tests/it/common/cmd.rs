//! Running programs from a test: Nix commands with a clean environment, and commands whose
//! failure fails the test.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// A Nix command with a clean environment: no internet substituters, a private HOME (Nix's narinfo
/// cache lives there and remembers misses for an hour).
pub fn nix(program: &str, home: &Path) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("NIX_CONFIG", "substituters =\nexperimental-features = nix-command")
        .env_remove("NIX_REMOTE");
    c
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    ok(&format!("{cmd:?}"), &out);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Fails the test, with the command's output, unless `out` (of `what`) succeeded.
pub fn ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}
