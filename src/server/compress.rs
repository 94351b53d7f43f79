//! zstd on the fly for NARs sent to peers (`.nar.zst`), that stops compressing what does not
//! compress.
//!
//! A peer's proxy decodes exactly one zstd frame per NAR, and zstd (without its multi-threaded
//! mode) cannot change its level inside a frame. So the encoder compresses at
//! [`PEER_ZSTD_LEVEL`], flushing a block every [`PROBE_BYTES`] of input to learn what each stretch
//! saved; after [`RAW_AFTER_BYTES`] in a row that saved less than [`MIN_SAVING_PERCENT`] (random
//! bytes, media, archives that are compressed already), it ends its part of the frame at that
//! block boundary and writes the rest of the NAR into the same frame as raw blocks: a copy
//! instead of a match search. A stretch that compresses after that point travels uncompressed,
//! never slower than `peer-compression = "none"`.
//!
//! Measured (bench/proxy.sh, docs/benchmarks.md): level 1 ran at about 0.6-1 GB/s on random bytes
//! on this 2-core machine, which on a fast link capped the transfer and took a core the
//! receiving host needed for its own import; raw blocks run at memory speed.
//!
//! Invariant: the output is one zstd frame with no checksum, whose blocks decode to exactly the
//! bytes pushed, and it is closed (its last block written) only by [`PeerZstd::finish`], which
//! the sender calls only after the whole NAR went through: a transfer that broke off never ends
//! in a well-formed frame. Memory: the level-1 encoder (about 1.3 MiB), dropped when raw blocks
//! start, plus one output chunk.

use std::io;

use bytes::Bytes;
use tokio::sync::mpsc;
use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};

use crate::http::Pace;

/// zstd level for NARs sent to peers: level 1 measured best on a 1 Gbit/s link
/// (docs/benchmarks.md), with about 1.3 MiB of encoder state per stream.
pub const PEER_ZSTD_LEVEL: i32 = 1;
/// The encoder's window (2^19 = 512 KiB, level 1's own): set explicitly because raw blocks of up
/// to [`MAX_RAW_BLOCK`] must fit in it.
const WINDOW_LOG: u32 = 19;
/// Largest block zstd allows (and the largest raw block written).
pub const MAX_RAW_BLOCK: usize = 128 * 1024;
/// Input between two looks at what compression saved (each look ends a block).
pub const PROBE_BYTES: u64 = 1024 * 1024;
/// A stretch of [`PROBE_BYTES`] that saved less than this share is incompressible.
pub const MIN_SAVING_PERCENT: u64 = 3;
/// Incompressible input in a row after which the rest of the NAR is sent as raw blocks: long
/// enough that a compressed file or two inside a NAR of binaries does not end compression.
pub const RAW_AFTER_BYTES: u64 = 8 * PROBE_BYTES;

/// The encoder of one NAR.
pub struct PeerZstd {
    /// `None` once the rest goes as raw blocks.
    enc: Option<Encoder<'static>>,
    /// Input and output of the current probe stretch.
    probe_in: u64,
    probe_out: u64,
    /// Incompressible input in a row, in whole probe stretches.
    incompressible: u64,
    /// Input bytes in all, and those sent as raw blocks.
    total_in: u64,
    raw_in: u64,
    /// The frame is closed.
    finished: bool,
}

impl PeerZstd {
    pub fn new() -> io::Result<Self> {
        let mut enc = Encoder::new(PEER_ZSTD_LEVEL)?;
        // The frame must carry no checksum (the raw tail would not be in it) and a window that
        // raw blocks fit in.
        enc.set_parameter(CParameter::ChecksumFlag(false))?;
        enc.set_parameter(CParameter::WindowLog(WINDOW_LOG))?;
        Ok(Self {
            enc: Some(enc),
            probe_in: 0,
            probe_out: 0,
            incompressible: 0,
            total_in: 0,
            raw_in: 0,
            finished: false,
        })
    }

    /// Input bytes so far.
    pub fn total_in(&self) -> u64 {
        self.total_in
    }

    /// Input bytes sent as raw blocks.
    pub fn raw_in(&self) -> u64 {
        self.raw_in
    }

    /// Whether input is still compressed (else the rest of the NAR goes as raw blocks).
    pub fn compressing(&self) -> bool {
        self.enc.is_some()
    }

    /// Once no longer [`Self::compressing`]: the header of a raw block of the next `len` bytes
    /// (at most [`MAX_RAW_BLOCK`]), which the caller sends itself (the store server's raw path,
    /// with `sendfile`), counted as pushed.
    pub fn raw_header(&mut self, len: usize) -> io::Result<[u8; 3]> {
        if self.finished || self.enc.is_some() || len > MAX_RAW_BLOCK {
            return Err(io::Error::other("no raw block of that size may follow here"));
        }
        self.total_in += len as u64;
        self.raw_in += len as u64;
        Ok(raw_block_header(len, false))
    }

    /// Encodes `input`, appending to `out` (which may stay empty: zstd buffers up to a block).
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if self.finished {
            return Err(io::Error::other("zstd frame already finished"));
        }
        self.total_in += input.len() as u64;
        // Room for the worst case (zstd's bound, block headers, the frame header), so the
        // output chunk is no larger than the input plus a little.
        out.reserve(input.len() + input.len() / 128 + 1024);
        while !input.is_empty() {
            let Some(enc) = self.enc.as_mut() else {
                self.raw_in += input.len() as u64;
                for block in input.chunks(MAX_RAW_BLOCK) {
                    raw_block(block, false, out);
                }
                return Ok(());
            };
            let take = input.len().min((PROBE_BYTES - self.probe_in) as usize);
            let mut inb = InBuffer::around(&input[..take]);
            while inb.pos() < take {
                self.probe_out += run(out, |o| enc.run(&mut inb, o))?.0 as u64;
            }
            self.probe_in += take as u64;
            input = &input[take..];
            if self.probe_in == PROBE_BYTES {
                // End the block, so the stretch's output is all out.
                loop {
                    let (n, remaining) = run(out, |o| enc.flush(o))?;
                    self.probe_out += n as u64;
                    if remaining == 0 {
                        break;
                    }
                }
                let saved = self.probe_in.saturating_sub(self.probe_out);
                if saved * 100 < self.probe_in * MIN_SAVING_PERCENT {
                    self.incompressible += self.probe_in;
                } else {
                    self.incompressible = 0;
                }
                self.probe_in = 0;
                self.probe_out = 0;
                if self.incompressible >= RAW_AFTER_BYTES {
                    // At a block boundary, with the frame header out: the rest are raw blocks.
                    self.enc = None;
                }
            }
        }
        Ok(())
    }

    /// Ends the frame (call only once the whole NAR was pushed; then never push again).
    pub fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if std::mem::replace(&mut self.finished, true) {
            return Err(io::Error::other("zstd frame already finished"));
        }
        match self.enc.as_mut() {
            None => raw_block(&[], true, out),
            Some(enc) => loop {
                let (_, remaining) = run(out, |o| enc.finish(o, true))?;
                if remaining == 0 {
                    break;
                }
            },
        }
        Ok(())
    }
}

/// Runs one zstd step writing after `out`'s end (making room only if it has little: `push`
/// reserved the worst case). Returns the bytes written and the step's own result.
fn run(
    out: &mut Vec<u8>,
    step: impl FnOnce(&mut OutBuffer<'_, Vec<u8>>) -> io::Result<usize>,
) -> io::Result<(usize, usize)> {
    if out.capacity() - out.len() < 1024 {
        out.reserve(64 * 1024);
    }
    let before = out.len();
    let mut ob = OutBuffer::around_pos(out, before);
    let r = step(&mut ob)?;
    let after = ob.pos();
    Ok((after - before, r))
}

/// Appends a raw block: a 3-byte little-endian header (bit 0: last block, bits 1-2: type 0 =
/// raw, bits 3-23: size), then the bytes.
fn raw_block(data: &[u8], last: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&raw_block_header(data.len(), last));
    out.extend_from_slice(data);
}

fn raw_block_header(len: usize, last: bool) -> [u8; 3] {
    debug_assert!(len <= MAX_RAW_BLOCK);
    let h = ((len as u32) << 3) | u32::from(last);
    let [a, b, c, _] = h.to_le_bytes();
    [a, b, c]
}

/// Compresses the NAR chunks from `raw` into `tx` ([`PeerZstd`]). The frame is closed only if
/// exactly `nar_size` bytes came; an error on `raw`, or fewer bytes (the NAR's producer gave up),
/// aborts the response instead, so a broken NAR never ends in a well-formed frame. Holds the
/// transfer's slot until done.
pub async fn compress<P>(
    mut raw: mpsc::Receiver<Result<Bytes, io::Error>>,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    nar_size: u64,
    mut pace: Pace,
    _permit: P,
) {
    let mut enc = match PeerZstd::new() {
        Ok(e) => e,
        Err(e) => {
            let _ = pace.send(&tx, Err(e)).await;
            return;
        }
    };
    loop {
        let (item, end) = match raw.recv().await {
            Some(Ok(chunk)) => {
                let mut out = Vec::new();
                (enc.push(&chunk, &mut out).map(|()| out), false)
            }
            Some(Err(e)) => (Err(e), false),
            None if enc.total_in() == nar_size => {
                let (raw_in, total) = (enc.raw_in(), enc.total_in());
                let mut out = Vec::with_capacity(1024);
                let r = enc.finish(&mut out).map(|()| out);
                tracing::debug!(bytes = total, raw_bytes = raw_in, "NAR compressed");
                (r, true)
            }
            None => (
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("NAR ended after {} of {nar_size} bytes", enc.total_in()),
                )),
                true,
            ),
        };
        let item = match item {
            Ok(out) if out.is_empty() && !end => continue,
            Ok(out) => Ok(Bytes::from(out)),
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        match pace.send(&tx, item).await {
            Ok(()) if !failed && !end => {}
            Ok(()) => return,
            Err(e) => {
                tracing::info!(error = %e, "compressed NAR transfer aborted");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that do not compress (xorshift), and bytes that do (text-like).
    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }
    fn text(n: usize) -> Vec<u8> {
        b"lib/libfoo.so.1 ELF header, symbol table, .text .data .bss padding\n"
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect()
    }

    /// Encodes `input` in chunks of `chunk` bytes.
    fn encode(input: &[u8], chunk: usize) -> (Vec<u8>, u64) {
        let mut enc = PeerZstd::new().expect("encoder");
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            enc.push(c, &mut out).expect("push");
        }
        let raw = enc.raw_in();
        enc.finish(&mut out).expect("finish");
        (out, raw)
    }

    /// Decodes exactly one frame, as the proxy does (`ZstdDecoder` without multiple members).
    async fn decode_async(frame: &[u8]) -> io::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut d = async_compression::tokio::bufread::ZstdDecoder::new(frame);
        let mut v = Vec::new();
        d.read_to_end(&mut v).await.map(|_| v)
    }
    fn decode(frame: &[u8]) -> io::Result<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        rt.block_on(decode_async(frame))
    }

    #[test]
    fn incompressible_nars_go_raw_after_the_threshold_and_decode_exactly() {
        const MIB: usize = 1 << 20;
        let input = random(24 * MIB + 12345, 7);
        let (out, raw) = encode(&input, 128 * 1024);
        assert_eq!(decode(&out).expect("one valid frame"), input);
        // The first RAW_AFTER_BYTES are compressed (and found incompressible), the rest is raw.
        assert_eq!(raw, input.len() as u64 - RAW_AFTER_BYTES);
        // One frame: decoding it with the reference decoder gives the same bytes and nothing left.
        assert_eq!(zstd::stream::decode_all(&out[..]).expect("zstd"), input);
    }

    #[test]
    fn compressible_stretches_keep_compression_and_mixed_input_decodes() {
        const MIB: usize = 1 << 20;
        // Incompressible stretches shorter than the threshold between compressible ones: never raw.
        let mut input = Vec::new();
        for i in 0..6 {
            input.extend(random(5 * MIB, i));
            input.extend(text(3 * MIB + 17));
        }
        let (out, raw) = encode(&input, 64 * 1024 + 3);
        assert_eq!(raw, 0, "no run of {RAW_AFTER_BYTES} incompressible bytes");
        assert_eq!(decode(&out).expect("frame"), input);
        // Text after a long random stretch: raw from the threshold on, still one exact frame.
        let mut input = random(10 * MIB, 99);
        input.extend(text(4 * MIB));
        let (out, raw) = encode(&input, 100_000);
        assert!(raw > 0);
        assert_eq!(decode(&out).expect("frame"), input);
        // Text alone compresses as level 1 does.
        let input = text(16 * MIB);
        let (out, raw) = encode(&input, 128 * 1024);
        assert_eq!(raw, 0);
        assert!(out.len() < input.len() / 50, "{} bytes", out.len());
        assert_eq!(decode(&out).expect("frame"), input);
    }

    #[test]
    fn an_output_chunk_takes_no_more_memory_than_its_input_and_a_little() {
        let input = random(20 * 1024 * 1024, 3);
        let mut enc = PeerZstd::new().expect("encoder");
        for c in input.chunks(128 * 1024) {
            let mut out = Vec::new();
            enc.push(c, &mut out).expect("push");
            assert!(
                out.capacity() <= c.len() + c.len() / 128 + 2048,
                "{} bytes allocated for {} in",
                out.capacity(),
                c.len()
            );
        }
    }

    #[test]
    fn small_and_empty_nars() {
        for n in [0, 1, 1000, 128 * 1024, 1024 * 1024, 1024 * 1024 + 1] {
            let input = random(n, n as u64);
            assert_eq!(decode(&encode(&input, 4096).0).expect("frame"), input, "{n} bytes");
        }
    }

    #[tokio::test]
    async fn a_nar_that_ends_early_or_fails_never_ends_in_a_well_formed_frame() {
        let input = random(3 * 1024 * 1024, 5);
        for (short, fail) in [(false, false), (true, false), (false, true)] {
            let (raw_tx, raw_rx) = mpsc::channel(4);
            let (tx, mut rx) = mpsc::channel(4);
            let size = input.len() as u64;
            tokio::spawn(compress(
                raw_rx,
                tx,
                size,
                Pace::new(std::time::Duration::from_secs(5)),
                (),
            ));
            let feed = input.clone();
            tokio::spawn(async move {
                let n = if short { feed.len() - 1000 } else { feed.len() };
                for c in feed[..n].chunks(128 * 1024) {
                    if raw_tx.send(Ok(Bytes::copy_from_slice(c))).await.is_err() {
                        return;
                    }
                }
                if fail {
                    let _ = raw_tx.send(Err(io::Error::other("disk"))).await;
                }
            });
            let mut out = Vec::new();
            let mut errored = false;
            while let Some(item) = rx.recv().await {
                match item {
                    Ok(b) => out.extend_from_slice(&b),
                    Err(_) => errored = true,
                }
            }
            if short || fail {
                assert!(errored, "short={short} fail={fail}: the response must be aborted");
                assert!(
                    decode_async(&out).await.is_err(),
                    "short={short} fail={fail}: no complete frame"
                );
            } else {
                assert!(!errored);
                assert_eq!(decode_async(&out).await.expect("frame"), input);
            }
        }
    }
}
