//! Many small signed paths, for tests that look up more paths than the fixture's closure.

use std::sync::{Mutex, OnceLock};

use super::{fixture, nix as nix_cmd, run};

/// `n` small signed paths (`lnc-hall-0` ...), in the fixture's signed cache (which the test
/// upstream serves), each to be held by one host in the hall and venue tests. Built once per
/// test binary (more are built when a later caller wants more).
pub fn signed_paths(n: usize) -> Vec<String> {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(|| Mutex::new(Vec::new())).lock().expect("lock");
    if built.len() < n {
        let f = fixture();
        let home = f.root.join("home");
        let expr = f.root.join(format!("hall-{n}.nix"));
        std::fs::write(
            &expr,
            format!(
                r#"builtins.genList (i: builtins.derivation {{
                    name = "lnc-hall-${{toString i}}";
                    system = builtins.currentSystem;
                    builder = "/bin/sh";
                    args = [ "-c" "echo hall path ${{toString i}} > $out" ];
                }}) {n}"#
            ),
        )
        .expect("write hall.nix");
        let out = run(nix_cmd("nix-build", &home).arg(&expr).arg("--no-out-link"));
        let mut paths: Vec<(usize, String)> = out
            .lines()
            .map(|p| {
                let i = p
                    .rsplit("lnc-hall-")
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("index");
                (i, p.to_owned())
            })
            .collect();
        paths.sort();
        assert_eq!(paths.len(), n, "built {out}");
        let cache = f.cache_url.trim_start_matches("file://");
        let to = format!("file://{cache}?secret-key={}&compression=xz", f.sk_file.display());
        run(nix_cmd("nix", &home)
            .args(["copy", "--to", &to])
            .args(paths.iter().map(|(_, p)| p)));
        *built = paths.into_iter().map(|(_, p)| p).collect();
    }
    built[..n].to_vec()
}
