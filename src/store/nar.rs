//! Finds where a NAR ends in a byte stream.
//!
//! The daemon's NarFromPath answers with the raw NAR and no length or framing, so the only way to
//! know where it stops is to follow the NAR grammar. [`NarFramer`] is a pure, push-style state
//! machine: feed it bytes in chunks of any size and it says how many of them belong to the NAR and
//! when the NAR is complete. File contents are counted, never buffered; only names and symlink
//! targets (bounded by [`MAX_SMALL_STRING`]) are held, so memory stays constant whatever the NAR
//! size. Invariant: `Done` is reported exactly at the byte after the NAR's last padding byte.

/// Longest non-contents string (file name, symlink target, keyword) we accept.
pub const MAX_SMALL_STRING: u64 = 4096;
/// Deepest directory nesting we accept (Nix's own limit is far lower in practice).
const MAX_DEPTH: u32 = 1024;
const MAGIC: &[u8] = b"nix-archive-1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NarError {
    #[error("not a NAR: expected {expected:?} at byte {offset}")]
    Unexpected { expected: &'static str, offset: u64 },
    #[error("NAR string of {len} bytes at byte {offset} is longer than allowed")]
    StringTooLong { len: u64, offset: u64 },
    #[error("NAR padding at byte {0} is not zero")]
    Padding(u64),
    #[error("NAR entry name at byte {0} is invalid")]
    Name(u64),
    #[error("NAR nesting deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// What the next string in the NAR must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Magic,
    Open,
    TypeKw,
    TypeVal,
    /// After `type regular`: `executable` or `contents`.
    RegularAttr,
    ExecEmpty,
    ContentsKw,
    /// The file contents: counted, not buffered.
    Contents,
    Close,
    TargetKw,
    Target,
    /// Inside a directory: `entry` or `)`.
    DirNext,
    EntryOpen,
    NameKw,
    Name,
    NodeKw,
    EntryClose,
    Done,
}

/// Where we are inside the current string.
#[derive(Clone, Copy, Debug)]
enum Tok {
    Len { have: usize, buf: [u8; 8] },
    Small { len: usize },
    Big { remaining: u64 },
    Pad { remaining: usize },
}

/// Result of [`NarFramer::feed`].
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// All input belongs to the NAR, which is not complete yet.
    NeedMore,
    /// The NAR ended after `consumed` bytes of this input.
    Done { consumed: usize },
}

#[derive(Debug)]
pub struct NarFramer {
    expect: Expect,
    tok: Tok,
    /// Bytes of the current small string.
    small: Vec<u8>,
    /// Length of the current string, for its padding.
    str_len: u64,
    /// Open nodes.
    depth: u32,
    /// Bytes consumed so far (the NAR size once done).
    offset: u64,
}

impl Default for NarFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl NarFramer {
    pub fn new() -> Self {
        Self {
            expect: Expect::Magic,
            tok: Tok::Len { have: 0, buf: [0; 8] },
            small: Vec::new(),
            str_len: 0,
            depth: 0,
            offset: 0,
        }
    }

    /// Total bytes of NAR seen so far.
    pub fn bytes_seen(&self) -> u64 {
        self.offset
    }

    pub fn is_done(&self) -> bool {
        self.expect == Expect::Done
    }

    /// Consumes NAR bytes from `input`.
    pub fn feed(&mut self, input: &[u8]) -> Result<Progress, NarError> {
        let mut i = 0;
        while i < input.len() {
            if self.expect == Expect::Done {
                return Ok(Progress::Done { consumed: i });
            }
            let rest = &input[i..];
            let used = match &mut self.tok {
                Tok::Len { have, buf } => {
                    let n = (8 - *have).min(rest.len());
                    buf[*have..*have + n].copy_from_slice(&rest[..n]);
                    *have += n;
                    if *have == 8 {
                        let len = u64::from_le_bytes(*buf);
                        self.start_string(len)?;
                    }
                    n
                }
                Tok::Small { len } => {
                    let n = (*len - self.small.len()).min(rest.len());
                    self.small.extend_from_slice(&rest[..n]);
                    if self.small.len() == *len {
                        self.tok = pad_or_next(self.str_len);
                        if matches!(self.tok, Tok::Len { .. }) {
                            self.end_string()?;
                        }
                    }
                    n
                }
                Tok::Big { remaining } => {
                    let n = (*remaining).min(rest.len() as u64) as usize;
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.tok = pad_or_next(self.str_len);
                        if matches!(self.tok, Tok::Len { .. }) {
                            self.end_string()?;
                        }
                    }
                    n
                }
                Tok::Pad { remaining } => {
                    let n = (*remaining).min(rest.len());
                    if rest[..n].iter().any(|&b| b != 0) {
                        return Err(NarError::Padding(self.offset));
                    }
                    *remaining -= n;
                    if *remaining == 0 {
                        self.tok = Tok::Len { have: 0, buf: [0; 8] };
                        self.end_string()?;
                    }
                    n
                }
            };
            i += used;
            self.offset += used as u64;
        }
        Ok(if self.expect == Expect::Done {
            Progress::Done { consumed: i }
        } else {
            Progress::NeedMore
        })
    }

    fn start_string(&mut self, len: u64) -> Result<(), NarError> {
        self.str_len = len;
        self.small.clear();
        if self.expect == Expect::Contents {
            self.tok = if len == 0 {
                Tok::Len { have: 0, buf: [0; 8] }
            } else {
                Tok::Big { remaining: len }
            };
            if len == 0 {
                self.end_string()?;
            }
            return Ok(());
        }
        if len > MAX_SMALL_STRING {
            return Err(NarError::StringTooLong {
                len,
                offset: self.offset,
            });
        }
        if len == 0 {
            self.tok = Tok::Len { have: 0, buf: [0; 8] };
            return self.end_string();
        }
        self.tok = Tok::Small { len: len as usize };
        Ok(())
    }

    /// A whole string (and its padding) has been read: advance the grammar.
    fn end_string(&mut self) -> Result<(), NarError> {
        let s = std::mem::take(&mut self.small);
        let offset = self.offset;
        let want = |expected: &'static str, next: Expect| -> Result<Expect, NarError> {
            if s == expected.as_bytes() {
                Ok(next)
            } else {
                Err(NarError::Unexpected { expected, offset })
            }
        };
        self.expect = match self.expect {
            Expect::Magic => {
                if s != MAGIC {
                    return Err(NarError::Unexpected {
                        expected: "nix-archive-1",
                        offset,
                    });
                }
                Expect::Open
            }
            Expect::Open => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(NarError::TooDeep);
                }
                want("(", Expect::TypeKw)?
            }
            Expect::TypeKw => want("type", Expect::TypeVal)?,
            Expect::TypeVal => match s.as_slice() {
                b"regular" => Expect::RegularAttr,
                b"symlink" => Expect::TargetKw,
                b"directory" => Expect::DirNext,
                _ => {
                    return Err(NarError::Unexpected {
                        expected: "regular|symlink|directory",
                        offset,
                    })
                }
            },
            Expect::RegularAttr => match s.as_slice() {
                b"executable" => Expect::ExecEmpty,
                b"contents" => Expect::Contents,
                _ => {
                    return Err(NarError::Unexpected {
                        expected: "executable|contents",
                        offset,
                    })
                }
            },
            Expect::ExecEmpty => want("", Expect::ContentsKw)?,
            Expect::ContentsKw => want("contents", Expect::Contents)?,
            Expect::Contents => Expect::Close,
            Expect::TargetKw => want("target", Expect::Target)?,
            Expect::Target => {
                if s.is_empty() {
                    return Err(NarError::Unexpected {
                        expected: "symlink target",
                        offset,
                    });
                }
                Expect::Close
            }
            Expect::Close => {
                want(")", Expect::Close)?;
                self.close_node()
            }
            Expect::DirNext => match s.as_slice() {
                b"entry" => Expect::EntryOpen,
                b")" => self.close_node(),
                _ => {
                    return Err(NarError::Unexpected {
                        expected: "entry|)",
                        offset,
                    })
                }
            },
            Expect::EntryOpen => want("(", Expect::NameKw)?,
            Expect::NameKw => want("name", Expect::Name)?,
            Expect::Name => {
                if s.is_empty() || s == b"." || s == b".." || s.contains(&b'/') || s.contains(&0) {
                    return Err(NarError::Name(offset));
                }
                Expect::NodeKw
            }
            Expect::NodeKw => want("node", Expect::Open)?,
            Expect::EntryClose => want(")", Expect::DirNext)?,
            Expect::Done => Expect::Done,
        };
        Ok(())
    }

    fn close_node(&mut self) -> Expect {
        self.depth -= 1;
        if self.depth == 0 {
            Expect::Done
        } else {
            Expect::EntryClose
        }
    }
}

fn pad_or_next(len: u64) -> Tok {
    let pad = ((8 - len % 8) % 8) as usize;
    if pad == 0 {
        Tok::Len { have: 0, buf: [0; 8] }
    } else {
        Tok::Pad { remaining: pad }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A NAR tree for tests, and a writer that serialises it as Nix does.
    #[derive(Debug, Clone)]
    pub(crate) enum Node {
        File { exec: bool, contents: Vec<u8> },
        Link(String),
        Dir(Vec<(String, Node)>),
    }

    fn put(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    }

    fn write_node(out: &mut Vec<u8>, n: &Node) {
        put(out, b"(");
        put(out, b"type");
        match n {
            Node::File { exec, contents } => {
                put(out, b"regular");
                if *exec {
                    put(out, b"executable");
                    put(out, b"");
                }
                put(out, b"contents");
                put(out, contents);
            }
            Node::Link(t) => {
                put(out, b"symlink");
                put(out, b"target");
                put(out, t.as_bytes());
            }
            Node::Dir(entries) => {
                put(out, b"directory");
                for (name, child) in entries {
                    put(out, b"entry");
                    put(out, b"(");
                    put(out, b"name");
                    put(out, name.as_bytes());
                    put(out, b"node");
                    write_node(out, child);
                    put(out, b")");
                }
            }
        }
        put(out, b")");
    }

    pub(crate) fn nar(n: &Node) -> Vec<u8> {
        let mut out = Vec::new();
        put(&mut out, MAGIC);
        write_node(&mut out, n);
        out
    }

    fn node() -> impl Strategy<Value = Node> {
        let leaf = prop_oneof![
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(exec, contents)| Node::File { exec, contents }),
            "[a-z/.]{1,40}".prop_map(Node::Link),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            proptest::collection::btree_map("[a-zA-Z0-9_-]{1,20}", inner, 0..6)
                .prop_map(|m| Node::Dir(m.into_iter().collect()))
        })
    }

    /// Feeds `data` in chunks of `chunk` bytes, returns the offset where the framer said Done.
    fn frame(data: &[u8], chunk: usize) -> Result<Option<u64>, NarError> {
        let mut f = NarFramer::new();
        let mut pos = 0;
        for c in data.chunks(chunk.max(1)) {
            match f.feed(c)? {
                Progress::NeedMore => pos += c.len(),
                Progress::Done { consumed } => return Ok(Some((pos + consumed) as u64)),
            }
        }
        Ok(None)
    }

    proptest! {
        #[test]
        fn finds_the_exact_end_whatever_the_chunking(n in node(), chunk in 1usize..200, trailer in proptest::collection::vec(any::<u8>(), 0..64)) {
            let bytes = nar(&n);
            let mut data = bytes.clone();
            data.extend_from_slice(&trailer);
            prop_assert_eq!(frame(&data, chunk), Ok(Some(bytes.len() as u64)));
        }

        #[test]
        fn a_truncated_nar_is_never_done(n in node(), cut in any::<prop::sample::Index>()) {
            let bytes = nar(&n);
            let cut = cut.index(bytes.len());
            prop_assert!(!matches!(frame(&bytes[..cut], 7), Ok(Some(_))));
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            let _ = frame(&data, chunk);
        }
    }

    #[test]
    fn rejects_what_is_not_a_nar() {
        // What the daemon writes instead of a NAR when NarFromPath fails: STDERR_ERROR.
        let mut err = 0x6378_7470u64.to_le_bytes().to_vec();
        err.extend_from_slice(&[0; 64]);
        assert!(matches!(frame(&err, 64), Err(NarError::StringTooLong { .. })));
        let mut wrong_magic = Vec::new();
        put(&mut wrong_magic, b"nix-archive-2");
        assert!(matches!(frame(&wrong_magic, 64), Err(NarError::Unexpected { .. })));
        let mut bad_pad = nar(&Node::File {
            exec: false,
            contents: b"abc".to_vec(),
        });
        let len = bad_pad.len();
        bad_pad[len - 18] = 1; // in the 5 padding bytes after "abc", before the final ")"
        assert_eq!(frame(&bad_pad, 256), Err(NarError::Padding(len as u64 - 21)));
        let dotdot = nar(&Node::Dir(vec![("..".into(), Node::Link("x".into()))]));
        assert!(matches!(frame(&dotdot, 64), Err(NarError::Name(_))));
    }

    #[test]
    fn large_contents_are_counted_not_buffered() {
        let big = Node::File {
            exec: true,
            contents: vec![7u8; 5_000_000],
        };
        let data = nar(&big);
        let mut f = NarFramer::new();
        for c in data.chunks(65536) {
            let _ = f.feed(c).expect("valid");
        }
        assert!(f.is_done());
        assert_eq!(f.bytes_seen(), data.len() as u64);
        assert!(f.small.capacity() <= MAX_SMALL_STRING as usize);
    }
}
