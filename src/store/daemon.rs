//! One connection to a nix-daemon, speaking its worker protocol.
//!
//! Works with the unmodified daemon of Nix 2.8 (protocol 1.34) and newer: we announce 1.38 and use
//! the minimum of both versions (Nix 2.26 speaks 1.38; from 1.38 on, both sides also exchange
//! feature sets, where we offer none). A connection does one operation at a time. Invariant: after any
//! error the connection is marked broken and must be dropped, because some daemon errors leave the
//! stream in an unknown state.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::Child;

use super::error::Error;
use super::nar::{NarFramer, Progress};

const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// Protocol 1.38, the newest we speak (1.36 added AddPermRoot, 1.37 BuildResult CPU times: ops we
/// do not use; 1.38 added the feature exchange). Checked against the real daemons of Nix 2.8 and 2.26.
pub const CLIENT_VERSION: u64 = (1 << 8) | 38;
/// First protocol with the feature exchange right after the version exchange.
const FEATURES_MINOR: u64 = 38;
/// Most feature names we read from a daemon (Nix 2.26 offers none; each name is a short string).
const MAX_FEATURES: u64 = 256;
/// Oldest daemon protocol we accept (Nix 2.3 speaks 1.21).
const MIN_DAEMON_MINOR: u64 = 21;

const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_READ: u64 = 0x6461_7461;
const STDERR_WRITE: u64 = 0x6461_7416;
const STDERR_LAST: u64 = 0x616c_7473;
const STDERR_ERROR: u64 = 0x6378_7470;
const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
const STDERR_RESULT: u64 = 0x5253_4c54;

const OP_IS_VALID_PATH: u64 = 1;
const OP_QUERY_ALL_VALID_PATHS: u64 = 23;
const OP_QUERY_PATH_INFO: u64 = 26;
const OP_QUERY_PATH_FROM_HASH_PART: u64 = 29;
const OP_NAR_FROM_PATH: u64 = 38;

/// Longest string we read from the daemon (paths, hashes, signatures, log lines, error texts).
const MAX_STRING: u64 = 1024 * 1024;
/// Most entries in a list we read (references, signatures, all valid paths of a big store).
const MAX_LIST: u64 = 4_000_000;
/// Read buffer; also the largest chunk of NAR handed on at once.
pub const READ_BUF: usize = 64 * 1024;

/// What the daemon says about a valid path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPathInfo {
    pub deriver: String,
    /// Bare base16 sha256, as the daemon sends it.
    pub nar_hash: String,
    pub references: Vec<String>,
    pub registration_time: u64,
    pub nar_size: u64,
    pub sigs: Vec<String>,
    pub ca: String,
}

type Reader = BufReader<Pin<Box<dyn AsyncRead + Send>>>;
type Writer = BufWriter<Pin<Box<dyn AsyncWrite + Send>>>;

pub struct DaemonConnection {
    r: Reader,
    w: Writer,
    /// Negotiated minor version: min(ours, daemon's).
    minor: u64,
    /// The daemon's own version string (protocol ≥ 1.33).
    pub daemon_version: Option<String>,
    /// Features the daemon offered (protocol ≥ 1.38); we use none of them.
    pub daemon_features: Vec<String>,
    /// Set after an error or an unfinished NAR: the stream position is unknown.
    broken: bool,
    /// For `nix-daemon --stdio` children: killed when the connection is dropped.
    _child: Option<Child>,
}

impl DaemonConnection {
    /// Runs the handshake over an already open byte stream.
    pub async fn handshake(
        read: Pin<Box<dyn AsyncRead + Send>>,
        write: Pin<Box<dyn AsyncWrite + Send>>,
        child: Option<Child>,
    ) -> Result<Self, Error> {
        let mut c = Self {
            r: BufReader::with_capacity(READ_BUF, read),
            w: BufWriter::new(write),
            minor: 0,
            daemon_version: None,
            daemon_features: Vec::new(),
            broken: false,
            _child: child,
        };
        c.write_u64(WORKER_MAGIC_1).await?;
        c.flush().await?;
        let magic = c.read_u64().await?;
        if magic != WORKER_MAGIC_2 {
            return Err(Error::Protocol(format!("daemon answered magic {magic:#x}")));
        }
        let daemon = c.read_u64().await?;
        if daemon >> 8 != 1 || (daemon & 0xff) < MIN_DAEMON_MINOR {
            return Err(Error::Protocol(format!(
                "unsupported daemon protocol {}.{}",
                daemon >> 8,
                daemon & 0xff
            )));
        }
        c.minor = (daemon & 0xff).min(CLIENT_VERSION & 0xff);
        c.write_u64(CLIENT_VERSION).await?;
        if c.minor >= FEATURES_MINOR {
            // Our features: none. The daemon's: read and dropped (the intersection is empty).
            c.write_u64(0).await?;
            c.flush().await?;
            c.daemon_features = c.read_strings_max(MAX_FEATURES).await?;
        }
        if c.minor >= 14 {
            c.write_u64(0).await?; // no CPU affinity
        }
        if c.minor >= 11 {
            c.write_u64(0).await?; // reserveSpace: false
        }
        c.flush().await?;
        if c.minor >= 33 {
            c.daemon_version = Some(c.read_string().await?);
        }
        if c.minor >= 35 {
            let _trusted = c.read_u64().await?;
        }
        c.process_stderr().await?;
        Ok(c)
    }

    pub fn minor(&self) -> u64 {
        self.minor
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// For callers that saw something wrong in what the connection delivered.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// The full path whose hash part is `hash`, if the store has one.
    pub async fn query_path_from_hash_part(&mut self, hash: String) -> Result<Option<String>, Error> {
        self.guard(async |c: &mut Self| {
            c.write_u64(OP_QUERY_PATH_FROM_HASH_PART).await?;
            c.write_string(&hash).await?;
            c.flush().await?;
            c.process_stderr().await?;
            let p = c.read_string().await?;
            Ok((!p.is_empty()).then_some(p))
        })
        .await
    }

    /// Path info of a valid path; `None` when the path is not valid.
    pub async fn query_path_info(&mut self, path: String) -> Result<Option<RawPathInfo>, Error> {
        self.guard(async |c: &mut Self| {
            c.write_u64(OP_QUERY_PATH_INFO).await?;
            c.write_string(&path).await?;
            c.flush().await?;
            c.process_stderr().await?;
            if c.minor >= 17 && c.read_u64().await? == 0 {
                return Ok(None);
            }
            let deriver = c.read_string().await?;
            let nar_hash = c.read_string().await?;
            let references = c.read_strings().await?;
            let registration_time = c.read_u64().await?;
            let nar_size = c.read_u64().await?;
            let (sigs, ca) = if c.minor >= 16 {
                let _ultimate = c.read_u64().await?;
                (c.read_strings().await?, c.read_string().await?)
            } else {
                (Vec::new(), String::new())
            };
            Ok(Some(RawPathInfo {
                deriver,
                nar_hash,
                references,
                registration_time,
                nar_size,
                sigs,
                ca,
            }))
        })
        .await
    }

    pub async fn is_valid_path(&mut self, path: String) -> Result<bool, Error> {
        self.guard(async |c: &mut Self| {
            c.write_u64(OP_IS_VALID_PATH).await?;
            c.write_string(&path).await?;
            c.flush().await?;
            c.process_stderr().await?;
            Ok(c.read_u64().await? != 0)
        })
        .await
    }

    pub async fn query_all_valid_paths(&mut self) -> Result<Vec<String>, Error> {
        self.guard(async |c: &mut Self| {
            c.write_u64(OP_QUERY_ALL_VALID_PATHS).await?;
            c.flush().await?;
            c.process_stderr().await?;
            c.read_strings().await
        })
        .await
    }

    /// Starts NarFromPath. The caller must check validity first (the daemon does not) and then
    /// drain the NAR with [`Self::read_nar_chunk`] until it returns `None`.
    pub async fn start_nar_from_path(&mut self, path: String) -> Result<(), Error> {
        self.guard(async |c: &mut Self| {
            c.write_u64(OP_NAR_FROM_PATH).await?;
            c.write_string(&path).await?;
            c.flush().await?;
            c.process_stderr().await
        })
        .await?;
        // Until the NAR is read to its end, the connection is mid-stream.
        self.broken = true;
        Ok(())
    }

    /// Next chunk of the NAR started by [`Self::start_nar_from_path`]; `None` at its end.
    /// `idle` bounds the wait for each read.
    pub async fn read_nar_chunk(&mut self, framer: &mut NarFramer, idle: Duration) -> Result<Option<Bytes>, Error> {
        if framer.is_done() {
            return Ok(None);
        }
        let buf = match tokio::time::timeout(idle, self.r.fill_buf()).await {
            Err(_) => return Err(Error::Timeout("reading NAR from the daemon")),
            Ok(r) => r?,
        };
        if buf.is_empty() {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "daemon closed mid-NAR",
            )));
        }
        let n = match framer.feed(buf)? {
            Progress::NeedMore => buf.len(),
            Progress::Done { consumed } => consumed,
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        self.r.consume(n);
        if framer.is_done() {
            self.broken = false;
        }
        Ok(Some(chunk))
    }

    /// Runs one operation; any error marks the connection broken.
    async fn guard<T>(&mut self, op: impl AsyncFnOnce(&mut Self) -> Result<T, Error>) -> Result<T, Error> {
        if self.broken {
            return Err(Error::Protocol("connection is broken".into()));
        }
        // Broken until the operation completes: a cancelled (timed out) operation leaves the
        // stream mid-message.
        self.broken = true;
        let r = op(self).await;
        self.broken = r.is_err();
        r
    }

    /// Reads log messages until STDERR_LAST; turns STDERR_ERROR into [`Error::Daemon`].
    async fn process_stderr(&mut self) -> Result<(), Error> {
        loop {
            match self.read_u64().await? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT => {
                    let msg = self.read_string().await?;
                    tracing::debug!(target: "local_nix_cache::daemon_log", "{}", strip_ansi(msg.trim_end()));
                }
                STDERR_ERROR => return Err(Error::Daemon(self.read_error().await?)),
                STDERR_START_ACTIVITY => {
                    let _id = self.read_u64().await?;
                    let _level = self.read_u64().await?;
                    let _type = self.read_u64().await?;
                    let _text = self.read_string().await?;
                    self.skip_fields().await?;
                    let _parent = self.read_u64().await?;
                }
                STDERR_STOP_ACTIVITY => {
                    let _id = self.read_u64().await?;
                }
                STDERR_RESULT => {
                    let _id = self.read_u64().await?;
                    let _type = self.read_u64().await?;
                    self.skip_fields().await?;
                }
                STDERR_READ | STDERR_WRITE => {
                    return Err(Error::Protocol(
                        "daemon asked for a data transfer we did not start".into(),
                    ));
                }
                other => return Err(Error::Protocol(format!("unknown daemon message {other:#x}"))),
            }
        }
    }

    async fn read_error(&mut self) -> Result<String, Error> {
        if self.minor >= 26 {
            let _type = self.read_string().await?;
            let _level = self.read_u64().await?;
            let _name = self.read_string().await?;
            let msg = self.read_string().await?;
            let _have_pos = self.read_u64().await?;
            let traces = self.read_u64().await?;
            for _ in 0..traces.min(MAX_LIST) {
                let _have_pos = self.read_u64().await?;
                let _hint = self.read_string().await?;
            }
            Ok(strip_ansi(&msg))
        } else {
            let msg = self.read_string().await?;
            let _status = self.read_u64().await?;
            Ok(strip_ansi(&msg))
        }
    }

    async fn skip_fields(&mut self) -> Result<(), Error> {
        let n = self.read_u64().await?;
        if n > 1024 {
            return Err(Error::Protocol(format!("{n} log fields")));
        }
        for _ in 0..n {
            match self.read_u64().await? {
                0 => {
                    self.read_u64().await?;
                }
                1 => {
                    self.read_string().await?;
                }
                t => return Err(Error::Protocol(format!("unknown log field type {t}"))),
            }
        }
        Ok(())
    }

    async fn read_u64(&mut self) -> Result<u64, Error> {
        Ok(self.r.read_u64_le().await?)
    }

    async fn read_string(&mut self) -> Result<String, Error> {
        let len = self.read_u64().await?;
        if len > MAX_STRING {
            return Err(Error::Protocol(format!("daemon string of {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.r.read_exact(&mut buf).await?;
        let pad = ((8 - len % 8) % 8) as usize;
        let mut padding = [0u8; 8];
        self.r.read_exact(&mut padding[..pad]).await?;
        String::from_utf8(buf).map_err(|_| Error::Protocol("daemon string is not UTF-8".into()))
    }

    async fn read_strings(&mut self) -> Result<Vec<String>, Error> {
        self.read_strings_max(MAX_LIST).await
    }

    async fn read_strings_max(&mut self, max: u64) -> Result<Vec<String>, Error> {
        let n = self.read_u64().await?;
        if n > max {
            return Err(Error::Protocol(format!("daemon list of {n} entries")));
        }
        let mut out = Vec::with_capacity(n.min(4096) as usize);
        for _ in 0..n {
            out.push(self.read_string().await?);
        }
        Ok(out)
    }

    async fn write_u64(&mut self, v: u64) -> Result<(), Error> {
        Ok(self.w.write_u64_le(v).await?)
    }

    async fn write_string(&mut self, s: &str) -> Result<(), Error> {
        self.write_u64(s.len() as u64).await?;
        self.w.write_all(s.as_bytes()).await?;
        let pad = (8 - s.len() % 8) % 8;
        self.w.write_all(&[0u8; 8][..pad]).await?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        Ok(self.w.flush().await?)
    }
}

/// Daemon error texts carry terminal colour codes; logs and clients get plain text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
