use super::*;
use futures_util::StreamExt;

fn limits(mem_one: u64) -> SpoolLimits {
    SpoolLimits::new(mem_one, 4, 64, std::env::temp_dir().join("lnc-spool-test"))
}

fn hash(data: &[u8]) -> NarHash {
    NarHash::from_digest(Sha256::digest(data).into())
}

async fn collect(v: &Verified, start: u64, end: u64) -> Vec<u8> {
    use http_body_util::BodyExt;
    let (tx, rx) = std::sync::mpsc::channel();
    let body = v.body(start, end, move |n| {
        let _ = tx.send(n);
    });
    let out = body.collect().await.expect("body").to_bytes().to_vec();
    assert_eq!(
        rx.try_recv().ok(),
        Some(out.len() as u64),
        "done() reports the bytes sent"
    );
    out
}

#[tokio::test]
async fn memory_and_file_spools_verify_and_serve_ranges() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for mem_one in [1 << 20, 0] {
        let l = limits(mem_one);
        let mut s = Spool::new(&l, data.len() as u64).await.expect("spool");
        for c in data.chunks(7777) {
            s.write(Bytes::copy_from_slice(c), 0).await.expect("write");
        }
        let v = s.verify(&hash(&data)).await.unwrap_or_else(|_| panic!("verify"));
        assert_eq!(collect(&v, 0, data.len() as u64 - 1).await, data);
        assert_eq!(collect(&v, 1000, 200_000).await, &data[1000..=200_000]);
    }
}

#[tokio::test]
async fn wrong_bytes_or_size_do_not_verify() {
    let data = vec![5u8; 1000];
    let l = limits(1 << 20);
    let mut s = Spool::new(&l, 1000).await.expect("spool");
    s.write(Bytes::copy_from_slice(&data[..999]), 0).await.expect("write");
    s.write(Bytes::from_static(&[6]), 0).await.expect("write");
    let s = s.verify(&hash(&data)).await.err().expect("wrong byte must not verify");
    let mut s = s;
    s.reset().await.expect("reset");
    s.write(Bytes::copy_from_slice(&data[..500]), 0).await.expect("write");
    assert!(s.verify(&hash(&data)).await.is_err(), "short must not verify");
}

/// A file spool hashes and writes one block while the next fills: a reset waits for that
/// block, so neither its late write nor its hasher leaks into the next attempt.
#[tokio::test]
async fn a_file_spool_reset_mid_block_starts_clean() {
    let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 241) as u8).collect();
    let l = limits(0);
    let mut s = Spool::new(&l, data.len() as u64).await.expect("spool");
    let wrong = vec![9u8; data.len()];
    // Two blocks and a half of wrong bytes: one block is still being written.
    for c in wrong[..2_600_000].chunks(100_000) {
        s.write(Bytes::copy_from_slice(c), 0).await.expect("write");
    }
    s.reset().await.expect("reset");
    for c in data.chunks(300_000) {
        s.write(Bytes::copy_from_slice(c), 0).await.expect("write");
    }
    let v = s
        .verify(&hash(&data))
        .await
        .unwrap_or_else(|_| panic!("verify after reset"));
    assert!(collect(&v, 0, data.len() as u64 - 1).await == data);
}

/// Bytes a pass-through body took from the NAR's start are hashed but not written to a file
/// spool (issue #16): the NAR still verifies, is served from the first kept byte, refuses
/// the bytes before it, and passed bytes after a kept one are kept. A memory spool keeps all.
#[tokio::test]
async fn passed_bytes_at_the_start_of_a_file_spool_are_hashed_not_kept() {
    let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 239) as u8).collect();
    let chunk = 256 * 1024;
    // The body took the first 2_000_000 bytes (the last chunk of them partly).
    let took: usize = 2_000_000;
    for mem_one in [0, 8 << 20] {
        let l = limits(mem_one);
        let mut s = Spool::new(&l, data.len() as u64).await.expect("spool");
        for (i, c) in data.chunks(chunk).enumerate() {
            let passed = took.saturating_sub(i * chunk).min(c.len());
            s.write(Bytes::copy_from_slice(c), passed).await.expect("write");
        }
        let v = s.verify(&hash(&data)).await.unwrap_or_else(|_| panic!("verify"));
        let kept = if mem_one == 0 { took as u64 } else { 0 };
        assert_eq!(v.kept_from(), kept);
        assert!(collect(&v, kept, data.len() as u64 - 1).await == data[kept as usize..]);
        if kept > 0 {
            let mut st = v.stream(kept - 1, data.len() as u64 - 1);
            assert!(
                st.next().await.expect("one item").is_err(),
                "bytes not kept are an error"
            );
        }
    }
    // A kept chunk first: later passed bytes are kept too (the unkept part is one prefix).
    let l = limits(0);
    let mut s = Spool::new(&l, data.len() as u64).await.expect("spool");
    for (i, c) in data.chunks(chunk).enumerate() {
        s.write(Bytes::copy_from_slice(c), if i == 0 { 0 } else { c.len() })
            .await
            .expect("write");
    }
    let v = s.verify(&hash(&data)).await.unwrap_or_else(|_| panic!("verify"));
    assert_eq!(v.kept_from(), 0);
    assert!(collect(&v, 0, data.len() as u64 - 1).await == data);
}

/// Issue #27: a block a pass-through body took whole is hashed on the fetch's task (nothing of it
/// is written, so no trip to a blocking thread); a block with bytes to keep still goes to one.
#[tokio::test]
async fn a_block_the_body_took_whole_is_hashed_in_place() {
    let data: Vec<u8> = (0..(3 * FILE_BLOCK) as u32).map(|i| (i % 233) as u8).collect();
    let l = limits(0);
    let mut s = Spool::new(&l, data.len() as u64).await.expect("spool");
    let in_place = |s: &Spool| match &s.store {
        Store::File { inflight, .. } => inflight.as_ref().map(|f| matches!(f, InFlight::Done(_))),
        Store::Mem(_) => None,
    };
    let blocks: Vec<&[u8]> = data.chunks(FILE_BLOCK).collect();
    s.write(Bytes::copy_from_slice(blocks[0]), FILE_BLOCK)
        .await
        .expect("write");
    assert_eq!(in_place(&s), Some(true), "taken whole: hashed in place");
    s.write(Bytes::copy_from_slice(blocks[1]), FILE_BLOCK / 2)
        .await
        .expect("write");
    assert_eq!(
        in_place(&s),
        Some(false),
        "half of it kept: written on a blocking thread"
    );
    s.write(Bytes::copy_from_slice(blocks[2]), 0).await.expect("write");
    let v = s.verify(&hash(&data)).await.unwrap_or_else(|_| panic!("verify"));
    let kept = FILE_BLOCK as u64 + FILE_BLOCK as u64 / 2;
    assert_eq!(v.kept_from(), kept);
    assert!(collect(&v, kept, data.len() as u64 - 1).await == data[kept as usize..]);
}

#[tokio::test]
async fn positional_spool_verifies_out_of_order_writes() {
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let l = limits(0);
    let p = PositionalSpool::new(&l, data.len() as u64).await.expect("spool");
    let mid = 1_234_567;
    p.write_at(mid as u64, vec![Bytes::copy_from_slice(&data[mid..])])
        .await
        .expect("second half");
    p.write_at(0, vec![Bytes::copy_from_slice(&data[..mid])])
        .await
        .expect("first half");
    let v = p.verify(&hash(&data)).await.expect("verifies");
    assert_eq!(collect(&v, 0, data.len() as u64 - 1).await, data);
    let bad = PositionalSpool::new(&l, data.len() as u64).await.expect("spool");
    bad.write_at(0, vec![Bytes::copy_from_slice(&data[..mid])])
        .await
        .expect("only half");
    assert!(bad.verify(&hash(&data)).await.is_none(), "a hole must not verify");
}

#[tokio::test]
async fn caps_are_enforced() {
    let l = SpoolLimits::new(1 << 20, 1, 2, std::env::temp_dir().join("lnc-spool-test"));
    let a = Spool::new(&l, 1 << 20).await.expect("first in memory");
    // Memory is used up: the next small one goes to disk.
    let b = Spool::new(&l, 1000).await.expect("second on disk");
    assert!(matches!(b.store, Store::File { .. }));
    // Larger than the whole disk budget: refused at once.
    assert!(matches!(Spool::new(&l, 10 << 20).await, Err(SpoolError::TooLarge(_))));
    drop((a, b));
}

#[test]
fn a_block_of_many_pieces_lands_in_order_at_its_offset() {
    // More pieces than one pwritev takes, of uneven sizes, some empty.
    let pieces: Vec<Bytes> = (0..1300u32)
        .map(|i| Bytes::from(vec![(i % 251) as u8; (i % 7 * 300) as usize]))
        .collect();
    let want: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
    let file = tempfile::tempfile().expect("temp file");
    write_all_vectored_at(&file, &pieces, 4096).expect("write");
    let mut got = vec![0u8; want.len()];
    file.read_exact_at(&mut got, 4096).expect("read back");
    assert!(got == want, "the pieces landed out of order or short");
    assert_eq!(file.metadata().expect("meta").len(), 4096 + want.len() as u64);
}
