//! Any datagram: decoding never panics, and whatever decodes re-encodes to something that decodes
//! to the same beacon.
#![no_main]

use libfuzzer_sys::fuzz_target;
use local_nix_cache::beacon::wire::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = decode(data) {
        let again = decode(&encode(&b)).expect("canonical encoding decodes");
        assert_eq!(again, b);
    }
});
