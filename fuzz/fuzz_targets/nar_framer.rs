//! Any byte stream, in two chunks: the NAR framer never panics and never reports an end beyond
//! its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use local_nix_cache::store::nar::{NarFramer, Progress};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut f = NarFramer::new();
    let mut seen = 0;
    for part in [&data[..split], &data[split..]] {
        match f.feed(part) {
            Ok(Progress::NeedMore) => seen += part.len(),
            Ok(Progress::Done { consumed }) => {
                assert!(consumed <= part.len());
                assert_eq!(f.bytes_seen() as usize, seen + consumed);
                return;
            }
            Err(_) => return,
        }
    }
});
