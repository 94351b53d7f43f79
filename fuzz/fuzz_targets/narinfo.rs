//! The `narinfo` target: its invariants are `local_nix_cache::fuzzing`'s (`Target::Narinfo`), which CI
//! also runs, uninstrumented, over `fuzz/seeds/narinfo` and inputs mutated from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use local_nix_cache::fuzzing::{check, Target};

fuzz_target!(|data: &[u8]| check(Target::Narinfo, data));
