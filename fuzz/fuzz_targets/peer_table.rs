//! The `peer_table` target: its invariants are `local_nix_cache::fuzzing`'s (`Target::PeerTable`), which CI
//! also runs, uninstrumented, over `fuzz/seeds/peer_table` and inputs mutated from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use local_nix_cache::fuzzing::{check, Target};

fuzz_target!(|data: &[u8]| check(Target::PeerTable, data));
