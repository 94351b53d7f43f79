//! Benchmark (run by `bench/run`): should peers compress NARs on the fly? Measures none and zstd
//! levels on a NAR of real binaries (this machine's /usr/bin): ratio, single-core compress and
//! decompress speed, the encoder's memory (which counts against the store server's RSS budget),
//! and the resulting time to move the NAR over a 1 Gbit/s link with compression pipelined. Then
//! the store server's own encoder for peers (`server::compress::PeerZstd`: level 1 that turns to
//! raw blocks on incompressible stretches) against plain level 1, on the same NAR and on random
//! bytes.

use std::time::Instant;

use local_nix_cache::store::dump::dump;

const LINK_BYTES_PER_S: f64 = 125_000_000.0; // 1 Gbit/s
const MAX_NAR: usize = 192 * 1024 * 1024;

#[test]
#[ignore = "benchmark; bench/run runs it"]
fn bench_zstd_levels_on_real_binaries() {
    let mut nar = Vec::new();
    let r = dump(std::path::Path::new("/usr/bin"), |c| {
        nar.extend_from_slice(&c);
        nar.len() < MAX_NAR
    });
    assert!(r.is_ok() || nar.len() >= MAX_NAR, "{r:?}");
    let n = nar.len() as f64;
    println!("BENCH-COMPRESSION nar_bytes={}", nar.len());
    println!(
        "BENCH-COMPRESSION level=none ratio=1.00 compress_MBps=inf decompress_MBps=inf encoder_KiB=0 link_s={:.2}",
        n / LINK_BYTES_PER_S
    );
    for level in [1, 3, 9] {
        let (compressed, ct, mem) = zstd_level(&nar, level);
        let t0 = Instant::now();
        let back = zstd::stream::decode_all(&compressed[..]).expect("decompress");
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(back.len(), nar.len());
        // Pipelined: the slower of compressing and sending, plus the decompression of the tail.
        let link = (compressed.len() as f64 / LINK_BYTES_PER_S).max(ct);
        println!(
            "BENCH-COMPRESSION level={level} ratio={:.2} compress_MBps={:.0} decompress_MBps={:.0} encoder_KiB={} link_s={:.2}",
            n / compressed.len() as f64,
            n / ct / 1e6,
            n / dt / 1e6,
            mem / 1024,
            link
        );
    }
    // The peers' encoder against plain level 1, on real binaries and on incompressible bytes.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..nar.len())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for (what, input) in [("binaries", &nar), ("random", &random)] {
        let (plain, pt, _) = zstd_level(input, 1);
        let t0 = Instant::now();
        let mut enc = local_nix_cache::server::compress::PeerZstd::new().expect("encoder");
        let mut out = Vec::with_capacity(input.len() + (1 << 20));
        for c in input.chunks(128 * 1024) {
            enc.push(c, &mut out).expect("push");
        }
        enc.finish(&mut out).expect("finish");
        let at = t0.elapsed().as_secs_f64();
        assert_eq!(zstd::stream::decode_all(&out[..]).expect("decode").len(), input.len());
        let n = input.len() as f64;
        for (level, len, t) in [("1", plain.len(), pt), ("1-for-peers", out.len(), at)] {
            println!(
                "BENCH-COMPRESSION level={level}/{what} ratio={:.2} compress_MBps={:.0} decompress_MBps=- encoder_KiB=- link_s={:.2}",
                n / len as f64,
                n / t / 1e6,
                (len as f64 / LINK_BYTES_PER_S).max(t)
            );
        }
    }
}

/// Compresses `input` at `level` in one go: the output, the seconds it took, the encoder's bytes.
fn zstd_level(input: &[u8], level: i32) -> (Vec<u8>, f64, usize) {
    let mut cctx = zstd::zstd_safe::CCtx::create();
    let t0 = Instant::now();
    let compressed = {
        let mut raw = zstd::stream::raw::Encoder::with_context(&mut cctx);
        raw.set_parameter(zstd::stream::raw::CParameter::CompressionLevel(level))
            .expect("level");
        let mut w = zstd::stream::zio::Writer::new(Vec::new(), raw);
        std::io::Write::write_all(&mut w, input).expect("compress");
        w.finish().expect("finish");
        let (out, _) = w.into_inner();
        out
    };
    let ct = t0.elapsed().as_secs_f64();
    (compressed, ct, cctx.sizeof())
}
