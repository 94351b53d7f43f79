//! The `beacon_decode` target: its invariants are `local_nix_cache::fuzzing`'s (`Target::BeaconDecode`), which CI
//! also runs, uninstrumented, over `fuzz/seeds/beacon_decode` and inputs mutated from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use local_nix_cache::fuzzing::{check, Target};

fuzz_target!(|data: &[u8]| check(Target::BeaconDecode, data));
