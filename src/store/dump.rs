//! Serialises a path on disk as a NAR, the way `nix-store --dump` does.
//!
//! Used for the fast path of the store server: once the daemon confirmed a path valid with the
//! expected NAR hash, its bytes are read straight from the physical store directory instead of
//! being copied through the daemon's socket. Blocking I/O: run it on a blocking thread. Output
//! comes in chunks of about [`CHUNK`] bytes, cut from at most [`SPARE_BUFS`] reused buffers
//! (plus any the consumer still holds when all of those are out).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::{Bytes, BytesMut};

/// Bytes per emitted chunk.
pub const CHUNK: usize = 128 * 1024;
/// A buffer's size: a chunk, and room for the last read or string that crosses [`CHUNK`].
const BUF: usize = CHUNK + 8 * 1024;
/// Buffers a dump keeps to cut chunks from again once the consumer dropped every chunk cut from
/// them: the store server's channel and hyper's write queue hold a few chunks, and a fresh
/// buffer per chunk cost cold memory (its zeroing was 17 % of the store server's CPU serving a
/// NAR from disk, issue #27). At most `SPARE_BUFS` x [`BUF`] (1 MiB) per dump.
pub const SPARE_BUFS: usize = 8;

/// Why a dump stopped.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither a regular file, a directory nor a symlink")]
    FileType(String),
    #[error("{0} changed size while being read")]
    Changed(String),
    /// The receiver went away; not a failure of the dump.
    #[error("consumer stopped")]
    Stopped,
    /// A [`plan`] would hold more than [`MAX_PLAN_BYTES`]: stream the dump instead.
    #[error("the NAR's plan would exceed {MAX_PLAN_BYTES} bytes")]
    PlanTooLarge,
}

/// Memory a [`plan`] may hold (its framing, and the path of each regular file): a NAR of a path
/// with more files than fit (about 5,000 with short names) is streamed by [`dump`] instead.
pub const MAX_PLAN_BYTES: usize = 1024 * 1024;

/// One piece of a NAR [`plan`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// NAR framing (strings, sizes, padding), coalesced between files.
    Bytes(Bytes),
    /// The first `len` bytes of the regular file at `path` (its size when planned).
    File { path: std::path::PathBuf, len: u64 },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The NAR of a path as framing and references to its files' contents, for a sender that copies
/// the contents from file to socket in the kernel (`sendfile`). A file that shrinks before it is
/// sent is the sender's error to report, as [`DumpError::Changed`] is the dump's.
#[derive(Debug, Default)]
pub struct Plan {
    pub pieces: Vec<Piece>,
}

impl Plan {
    /// The NAR's size.
    pub fn len(&self) -> u64 {
        self.pieces.iter().map(Piece::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }
}

/// The buffer being filled, and those whose chunks may still be held by the consumer.
struct Bufs {
    cur: BytesMut,
    /// Oldest first; one of them is filled again once every chunk cut from it was dropped.
    spent: VecDeque<BytesMut>,
    /// Buffers allocated so far (the reuse test counts them).
    allocated: usize,
}

impl Bufs {
    fn new() -> Self {
        Self {
            cur: BytesMut::with_capacity(BUF),
            spent: VecDeque::new(),
            allocated: 1,
        }
    }

    /// Cuts what was written as a chunk and makes room for the next: a spent buffer whose
    /// chunks are all gone, else a new one.
    fn cut(&mut self) -> Bytes {
        let chunk = self.cur.split().freeze();
        if self.spent.len() >= SPARE_BUFS {
            // Freed once its chunks are.
            self.spent.pop_front();
        }
        self.spent.push_back(std::mem::take(&mut self.cur));
        self.cur = match self.spent.iter_mut().position(|b| b.try_reclaim(BUF)) {
            Some(i) => self.spent.remove(i).unwrap_or_default(),
            None => {
                self.allocated += 1;
                BytesMut::with_capacity(BUF)
            }
        };
        chunk
    }
}

struct Writer<F: FnMut(Bytes) -> bool> {
    bufs: Bufs,
    emit: F,
    /// Planning ([`plan`]): framing and files are collected here instead of emitted and read,
    /// with the bytes held so far.
    plan: Option<(Plan, usize)>,
}

impl<F: FnMut(Bytes) -> bool> Writer<F> {
    fn new(emit: F) -> Self {
        Self {
            bufs: Bufs::new(),
            emit,
            plan: None,
        }
    }

    fn flush(&mut self) -> Result<(), DumpError> {
        if self.bufs.cur.is_empty() {
            return Ok(());
        }
        if let Some((plan, held)) = &mut self.plan {
            // A copy: a plan holds many small pieces, each must not pin a whole buffer.
            let piece = Bytes::copy_from_slice(&self.bufs.cur);
            self.bufs.cur.clear();
            *held += piece.len();
            plan.pieces.push(Piece::Bytes(piece));
            return if *held > MAX_PLAN_BYTES {
                Err(DumpError::PlanTooLarge)
            } else {
                Ok(())
            };
        }
        let chunk = self.bufs.cut();
        if (self.emit)(chunk) {
            Ok(())
        } else {
            Err(DumpError::Stopped)
        }
    }

    fn put(&mut self, b: &[u8]) -> Result<(), DumpError> {
        self.bufs.cur.extend_from_slice(b);
        if self.bufs.cur.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn pad(&mut self, len: u64) -> Result<(), DumpError> {
        let pad = ((8 - len % 8) % 8) as usize;
        self.put(&[0u8; 8][..pad])
    }

    fn string(&mut self, s: &[u8]) -> Result<(), DumpError> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s)?;
        self.pad(s.len() as u64)
    }

    fn contents(&mut self, path: &Path, mut file: File, len: u64) -> Result<(), DumpError> {
        let io_err = |source| DumpError::Io {
            path: path.display().to_string(),
            source,
        };
        self.put(&len.to_le_bytes())?;
        let mut left = len;
        while left > 0 {
            if self.bufs.cur.len() >= CHUNK {
                self.flush()?;
            }
            let buf = &mut self.bufs.cur;
            let start = buf.len();
            let want = ((CHUNK - start).max(4096) as u64).min(left) as usize;
            // Zeroes warm memory: the buffer is one of the few reused ones.
            buf.resize(start + want, 0);
            let n = loop {
                match file.read(&mut buf[start..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r.map_err(io_err)?,
                }
            };
            buf.truncate(start + n);
            if n == 0 {
                return Err(DumpError::Changed(path.display().to_string()));
            }
            left -= n as u64;
        }
        self.pad(len)
    }

    /// Plans a regular file: its size, then its contents as a [`Piece::File`], then padding.
    fn plan_file(&mut self, path: &Path, len: u64) -> Result<(), DumpError> {
        self.put(&len.to_le_bytes())?;
        self.flush()?;
        if let Some((plan, held)) = &mut self.plan {
            *held += path.as_os_str().len() + std::mem::size_of::<Piece>();
            plan.pieces.push(Piece::File {
                path: path.to_path_buf(),
                len,
            });
        }
        self.pad(len)
    }

    fn node(&mut self, path: &Path) -> Result<(), DumpError> {
        let io_err = |source| DumpError::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
        self.string(b"(")?;
        self.string(b"type")?;
        let ft = meta.file_type();
        if ft.is_file() {
            self.string(b"regular")?;
            if meta.permissions().mode() & 0o100 != 0 {
                self.string(b"executable")?;
                self.string(b"")?;
            }
            self.string(b"contents")?;
            if self.plan.is_some() {
                self.plan_file(path, meta.len())?;
            } else {
                let file = File::open(path).map_err(io_err)?;
                self.contents(path, file, meta.len())?;
            }
        } else if ft.is_symlink() {
            self.string(b"symlink")?;
            self.string(b"target")?;
            let target = std::fs::read_link(path).map_err(io_err)?;
            self.string(target.as_os_str().as_bytes())?;
        } else if ft.is_dir() {
            self.string(b"directory")?;
            let mut names: Vec<_> = std::fs::read_dir(path)
                .map_err(io_err)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io_err)?;
            // Nix sorts entries bytewise.
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.string(b"entry")?;
                self.string(b"(")?;
                self.string(b"name")?;
                self.string(name.as_bytes())?;
                self.string(b"node")?;
                self.node(&path.join(&name))?;
                self.string(b")")?;
            }
        } else {
            return Err(DumpError::FileType(path.display().to_string()));
        }
        self.string(b")")
    }
}

/// Writes the NAR of `path`, handing each chunk to `emit`; `emit` returns false to stop early.
pub fn dump(path: &Path, emit: impl FnMut(Bytes) -> bool) -> Result<(), DumpError> {
    let mut w = Writer::new(emit);
    w.string(b"nix-archive-1")?;
    w.node(path)?;
    w.flush()
}

/// Plans the NAR of `path` (see [`Plan`]): the same bytes as [`dump`], the files' contents by
/// reference. Fails with [`DumpError::PlanTooLarge`] past [`MAX_PLAN_BYTES`].
pub fn plan(path: &Path) -> Result<Plan, DumpError> {
    let mut w = Writer::new(|_| true);
    w.plan = Some((Plan::default(), 0));
    w.string(b"nix-archive-1")?;
    w.node(path)?;
    w.flush()?;
    Ok(w.plan.take().map(|(p, _)| p).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::nar::{NarFramer, Progress};

    fn dump_all(p: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        dump(p, |b| {
            out.extend_from_slice(&b);
            true
        })
        .expect("dump");
        out
    }

    /// A store path's tree with every kind of entry: a directory, an executable, a file of
    /// several chunks, an empty file and a symlink.
    fn sample_tree(dir: &std::path::Path) -> std::path::PathBuf {
        let root = dir.join("out");
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        std::fs::write(root.join("bin/tool"), b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(root.join("bin/tool"), std::fs::Permissions::from_mode(0o555)).expect("chmod");
        std::fs::write(root.join("big"), vec![3u8; 3 * CHUNK + 5]).expect("write");
        std::fs::write(root.join("empty"), b"").expect("write");
        std::os::unix::fs::symlink("bin/tool", root.join("link")).expect("symlink");
        root
    }

    #[test]
    fn dump_of_a_tree_is_a_complete_nar() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = sample_tree(d.path());
        let nar = dump_all(&root);
        let mut f = NarFramer::new();
        assert_eq!(f.feed(&nar), Ok(Progress::Done { consumed: nar.len() }));
        // Entries appear in byte order.
        let text = String::from_utf8_lossy(&nar);
        let pos = |s: &str| text.find(s).expect(s);
        assert!(pos("big") < pos("empty") && pos("empty") < pos("link"));
        assert!(text.contains("executable"));
    }

    /// File contents arrive whole and in order across chunk boundaries, a file shorter than its
    /// size said (it changed while being read) is an error, not a short NAR, and of one that
    /// grew only that size is sent.
    #[test]
    fn contents_cross_chunks_whole_and_a_shrunk_file_is_an_error() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("f");
        let data: Vec<u8> = (0..(2 * CHUNK + 4099) as u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&f, &data).expect("write");
        let mut out = Vec::new();
        let mut w = Writer::new(|b: Bytes| {
            assert!(b.len() <= CHUNK + 4096, "a chunk of {} bytes", b.len());
            out.extend_from_slice(&b);
            true
        });
        w.put(b"odd").expect("put");
        let file = File::open(&f).expect("open");
        w.contents(&f, file, data.len() as u64).expect("contents");
        w.flush().expect("flush");
        drop(w);
        assert_eq!(&out[..3], b"odd");
        assert_eq!(out[3..11], (data.len() as u64).to_le_bytes());
        assert!(out[11..11 + data.len()] == data[..], "contents differ");
        let mut w = Writer::new(|_: Bytes| true);
        let file = File::open(&f).expect("open");
        let r = w.contents(&f, file, data.len() as u64 + 10);
        assert!(matches!(r, Err(DumpError::Changed(_))), "{r:?}");
        // A file that grew: only the size it had counts (the NAR's framing says so).
        let mut out = Vec::new();
        let mut w = Writer::new(|b: Bytes| {
            out.extend_from_slice(&b);
            true
        });
        let short = data.len() - 10;
        let file = File::open(&f).expect("open");
        w.contents(&f, file, short as u64).expect("contents");
        w.flush().expect("flush");
        drop(w);
        let pad = (8 - short % 8) % 8;
        assert_eq!(out.len(), 8 + short + pad, "bytes past the size it had");
        assert!(out[8..8 + short] == data[..short]);
    }

    /// Issue #27: chunks are cut from a few reused buffers, not a fresh (cold) one each: a dump
    /// whose consumer drops each chunk at once allocates one buffer, whatever the NAR's size;
    /// one that holds `k` chunks at a time allocates about `k` + 1; the NAR is right either way.
    #[test]
    fn chunks_come_from_reused_buffers() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("f");
        let data: Vec<u8> = (0..(40 * CHUNK + 333) as u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&f, &data).expect("write");
        let want = dump_all(&f);
        for held in [0usize, 3] {
            let mut out = Vec::new();
            let mut queue = VecDeque::new();
            let mut w = Writer::new(|b: Bytes| {
                out.extend_from_slice(&b);
                queue.push_back(b);
                while queue.len() > held {
                    queue.pop_front();
                }
                true
            });
            w.string(b"nix-archive-1").expect("header");
            w.node(&f).expect("node");
            w.flush().expect("flush");
            let allocated = w.bufs.allocated;
            drop(w);
            assert!(out == want, "held {held}: the NAR differs");
            assert!(
                allocated <= held + 2,
                "held {held}: {allocated} buffers for {} chunks",
                data.len() / CHUNK
            );
        }
    }

    /// A plan, its files read in, is the dump byte for byte (issue #27: the store server sends
    /// the files with `sendfile`); a path with more files than [`MAX_PLAN_BYTES`] allows is
    /// refused, to be streamed instead.
    #[test]
    fn a_plan_expands_to_the_dump_and_is_bounded() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = sample_tree(d.path());
        for p in [root.clone(), root.join("big"), root.join("link")] {
            let want = dump_all(&p);
            let plan = plan(&p).expect("plan");
            let mut got = Vec::new();
            for piece in &plan.pieces {
                match piece {
                    Piece::Bytes(b) => got.extend_from_slice(b),
                    Piece::File { path, len } => {
                        let data = std::fs::read(path).expect("read");
                        got.extend_from_slice(&data[..*len as usize]);
                    }
                }
            }
            assert_eq!(plan.len(), want.len() as u64, "{}", p.display());
            assert!(got == want, "{}: the plan differs from the dump", p.display());
        }
        let many = d.path().join("many");
        std::fs::create_dir(&many).expect("mkdir");
        for i in 0..MAX_PLAN_BYTES / 100 {
            std::fs::write(many.join(format!("f{i:05}")), b"x").expect("write");
        }
        assert!(matches!(plan(&many), Err(DumpError::PlanTooLarge)));
    }

    #[test]
    fn a_stopped_consumer_stops_the_dump() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("f");
        std::fs::write(&f, vec![1u8; 4 * CHUNK]).expect("write");
        let mut calls = 0;
        let r = dump(&f, |_| {
            calls += 1;
            false
        });
        assert!(matches!(r, Err(DumpError::Stopped)));
        assert_eq!(calls, 1);
    }
}
