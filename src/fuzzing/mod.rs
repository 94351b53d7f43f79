//! The invariant checks of the fuzz targets, and a small seeded mutator that runs them in CI.
//!
//! Each [`Target`] is one decoder or state machine that reads what a peer, the daemon or a file
//! controls; [`check`] feeds it one input and panics when an invariant breaks (a round trip that
//! changes a value, a cap exceeded, a bound on what an input can cost), not only when the code
//! panics by itself. The libFuzzer targets in `fuzz/` (coverage-guided, instrumented: long local
//! runs) call [`check`]; CI calls the same function uninstrumented from the test build, over the
//! committed seed corpus (`fuzz/seeds/TARGET/`) and then over inputs [`mutate`]d from it for a
//! bounded time ([`run`]; seeded, so a run is reproducible, and a broken invariant prints the
//! input in hex). Not part of the program: nothing in the crate imports this module.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

mod codecs;
mod daemon;
mod identity;
mod seeds;
mod table;
mod target;
#[cfg(test)]
mod tests;

pub use seeds::seeds;
pub use target::Target;

/// Runs `target`'s invariant checks on one input; panics when one breaks.
pub fn check(target: Target, data: &[u8]) {
    match target {
        Target::BeaconDecode => codecs::beacon_decode(data),
        Target::NarFramer => codecs::nar_framer(data),
        Target::Daemon => daemon::check(data),
        Target::Summary => codecs::summary(data),
        Target::Identity => identity::check(data),
        Target::PeerTable => table::check(data),
        Target::Narinfo => codecs::narinfo(data),
        Target::Config => codecs::config(data),
    }
}

/// A small xorshift generator: the mutator's only source of randomness, so a seed replays a run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Values that sit on the edges of lengths, counts and versions.
const INTERESTING: [u64; 10] = [0, 1, 7, 8, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, u64::MAX];

/// One to four edits of `input` (bit flips, edge values as 1/2/4/8-byte integers in either byte
/// order, inserted, deleted or repeated runs, a splice from `other`), at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            2 => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let value = INTERESTING[rng.below(INTERESTING.len())];
                let (le, be) = (value.to_le_bytes(), value.to_be_bytes());
                let bytes = if rng.below(2) == 0 {
                    &le[..width]
                } else {
                    &be[8 - width..]
                };
                for (k, b) in bytes.iter().enumerate() {
                    if let Some(x) = v.get_mut(at + k) {
                        *x = *b;
                    }
                }
            }
            3 => {
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(at..at, fill);
            }
            4 if !v.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                v.drain(at.min(end)..end);
            }
            5 if !v.is_empty() => {
                let start = rng.below(v.len());
                let end = (start + 1 + rng.below(64)).min(v.len());
                let run = v[start..end].to_vec();
                v.splice(at..at, run);
            }
            6 if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(256)).min(other.len());
                let cut = at.min(v.len());
                v.truncate(cut);
                v.extend_from_slice(&other[start..end]);
            }
            _ => v.truncate(at),
        }
    }
    v.truncate(max_len);
    v
}

/// How long [`run`] goes on.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Stop mutating after this long (the corpus itself is always run whole).
    pub time: Duration,
    /// And after this many mutated inputs.
    pub max_runs: u64,
    pub seed: u64,
}

/// What a [`run`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub corpus: usize,
    pub mutated: u64,
}

/// Checks every corpus entry, then mutated ones until the budget is spent. A broken invariant
/// prints the target, seed, run number and the input in hex, then panics on.
pub fn run(target: Target, corpus: &[Vec<u8>], budget: Budget) -> Report {
    let one = |input: &[u8], what: &str| {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(target, input))) {
            eprintln!(
                "fuzz {}: invariant broken by {what} (seed {}); input ({} bytes, hex): {}",
                target.name(),
                budget.seed,
                input.len(),
                data_encoding::HEXLOWER.encode(input)
            );
            resume_unwind(panic);
        }
    };
    for (i, input) in corpus.iter().enumerate() {
        one(input, &format!("corpus entry {i}"));
    }
    let start = Instant::now();
    let mut rng = Rng::new(budget.seed);
    let mut mutated = 0;
    let empty = Vec::new();
    while mutated < budget.max_runs && start.elapsed() < budget.time {
        let base = corpus.get(rng.below(corpus.len())).unwrap_or(&empty);
        let other = corpus.get(rng.below(corpus.len())).unwrap_or(&empty);
        let input = mutate(&mut rng, base, other, target.max_len());
        one(&input, &format!("mutated input {mutated}"));
        mutated += 1;
    }
    Report {
        corpus: corpus.len(),
        mutated,
    }
}
