//! Benchmark (run by `bench/run`): should peers compress NARs on the fly? Measures none and zstd
//! levels on a NAR of real binaries (this machine's /usr/bin): ratio, single-core compress and
//! decompress speed, the encoder's memory (which counts against the store server's RSS budget),
//! and the resulting time to move the NAR over a 1 Gbit/s link with compression pipelined.

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
        let mut cctx = zstd::zstd_safe::CCtx::create();
        let t0 = Instant::now();
        let compressed = {
            let raw = zstd::stream::raw::Encoder::with_context(&mut cctx);
            let mut raw = raw;
            raw.set_parameter(zstd::stream::raw::CParameter::CompressionLevel(level))
                .expect("level");
            let mut w = zstd::stream::zio::Writer::new(Vec::new(), raw);
            std::io::Write::write_all(&mut w, &nar).expect("compress");
            w.finish().expect("finish");
            let (out, _) = w.into_inner();
            out
        };
        let ct = t0.elapsed().as_secs_f64();
        let mem = cctx.sizeof();
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
}
