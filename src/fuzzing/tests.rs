//! Each target over its committed corpus, then mutated inputs for a bounded time:
//! `LNC_FUZZ_SECONDS` per target (default 1; `./run test`'s fuzz step gives 15),
//! `LNC_FUZZ_RUNS` at most (default 10,000,000), `LNC_FUZZ_SEED` (default: one per target).
//! A broken invariant prints the input in hex; add it to the corpus once fixed.

use std::path::PathBuf;
use std::time::Duration;

use super::{run, seeds, Budget, Rng, Target};

fn corpus_dir(t: Target) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(t.name())
}

fn corpus(t: Target) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(t))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
    assert!(!inputs.is_empty(), "no seed corpus in {}", corpus_dir(t).display());
    inputs
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn fuzz(t: Target) {
    let budget = Budget {
        time: Duration::from_secs(env_u64("LNC_FUZZ_SECONDS").unwrap_or(1)),
        max_runs: env_u64("LNC_FUZZ_RUNS").unwrap_or(10_000_000),
        seed: env_u64("LNC_FUZZ_SEED").unwrap_or(0x10c4_1ca0 + t as u64),
    };
    let r = run(t, &corpus(t), budget);
    eprintln!(
        "fuzz {}: {} corpus entries and {} mutated inputs (seed {}) kept every invariant",
        t.name(),
        r.corpus,
        r.mutated,
        budget.seed
    );
    assert!(r.mutated > 0 || budget.max_runs == 0 || budget.time.is_zero());
}

#[test]
fn beacon_decode() {
    fuzz(Target::BeaconDecode);
}

#[test]
fn nar_framer() {
    fuzz(Target::NarFramer);
}

#[test]
fn daemon() {
    fuzz(Target::Daemon);
}

#[test]
fn summary() {
    fuzz(Target::Summary);
}

#[test]
fn identity() {
    fuzz(Target::Identity);
}

#[test]
fn peer_table() {
    fuzz(Target::PeerTable);
}

#[test]
fn narinfo() {
    fuzz(Target::Narinfo);
}

#[test]
fn config() {
    fuzz(Target::Config);
}

/// The same seed makes the same inputs: a run can be replayed.
#[test]
fn the_mutator_replays_from_its_seed() {
    let base = b"nix-archive-1 and some more bytes".to_vec();
    let make = |seed| {
        let mut rng = Rng::new(seed);
        (0..100)
            .map(|_| super::mutate(&mut rng, &base, b"other", 64))
            .collect::<Vec<_>>()
    };
    assert_eq!(make(3), make(3));
    assert_ne!(make(3), make(4));
    assert!(make(5).iter().all(|m| m.len() <= 64));
}

/// Writes `seeds()` to `fuzz/seeds/TARGET/seed-N` (run by hand after changing the seeds:
/// `cargo test --lib fuzzing::tests::write_the_seed_corpus -- --ignored`).
#[test]
#[ignore]
fn write_the_seed_corpus() {
    for t in Target::ALL {
        let dir = corpus_dir(t);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        for (i, s) in seeds(t).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("seed file");
        }
    }
}
