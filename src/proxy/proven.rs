//! Which peers have earned pass-through: the proxy may stream their NAR bytes to Nix while
//! still hashing them (holding back the last [`super::passthrough::TAIL`] bytes until the hash
//! matched), instead of verifying the whole NAR first.
//!
//! A peer is *proven* at one address: it delivered [`PROVEN_AFTER`] NARs that verified, each in
//! an answer that named its node id, from that address, and neither its node id nor its
//! address ever sent a NAR that failed verification. One wrong NAR bans the node id *and* the
//! address for good: the ban is written to a small file in the state directory at once and read
//! back at start. A missing, unreadable or corrupt file means nobody is proven (trust is earned
//! again), and so does one that is not a regular file (a FIFO, a socket, a directory: logged and
//! ignored, never opened for a blocking read); a ban list that is full means nobody is proven
//! either (fail closed), so flooding the list with throw-away identities cannot push a real ban
//! out.
//!
//! Why (node id, address) and not the node id alone: the node id is only a claim in a beacon and
//! a header. Someone who announces a proven node's id from their own address is a different
//! (node, address) pair with no record: verify-first. Someone at a proven node's address with
//! another node id is the same. Only the node that earned the record, at the address where it
//! earned it, streams.
//!
//! Being proven is not enough while the host-wide breaker is tripped (`breaker`: after a lie by
//! a peer allowed to pass through, for an hour, only peers proven long before with many
//! verified NARs pass through, and after K such lies nobody): [`ProvenPeers::may_pass_through`].
//!
//! Bounds: [`MAX_PROVEN`] (node, address) records with their counts (LRU; forgetting one only
//! costs that peer its privilege), [`MAX_BANNED_NODES`] node ids and [`MAX_BANNED_ADDRS`]
//! addresses (never evicted), about 200 bytes each in memory; the file is at most
//! [`MAX_FILE_BYTES`]. It is rewritten only when a peer becomes proven or is banned.

use std::collections::HashSet;
use std::io::{self, Write};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lru::LruCache;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::breaker::{Breaker, Earned, Pass};
use crate::beacon::wire::NodeId;

/// Verified NARs a peer must deliver (at one address) before its bytes may pass through.
pub const PROVEN_AFTER: u32 = 3;
/// (node, address) pairs whose count of verified NARs is kept (least recently used forgotten).
pub const MAX_PROVEN: usize = 1024;
/// Banned node ids kept; when full, nobody is proven (fail closed).
pub const MAX_BANNED_NODES: usize = 4096;
/// Banned addresses kept; when full, nobody is proven (fail closed).
pub const MAX_BANNED_ADDRS: usize = 4096;
/// A state file larger than this is corrupt (the caps above fit in about 400 KB).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// The file's name in the state directory.
pub const FILE_NAME: &str = "proven-peers.json";
/// The file format's version; another version is read as corrupt.
const VERSION: u32 = 1;

/// What the file holds.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct FileState {
    version: u32,
    /// Proven (node, address) pairs, as `node id` and address text.
    proven: Vec<(String, IpAddr)>,
    banned_nodes: Vec<String>,
    banned_addrs: Vec<IpAddr>,
}

/// Why the state file could not be written (reading never fails: a bad file is an empty one).
#[derive(Debug, thiserror::Error)]
pub enum ProvenError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("encoding the state: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What a (node, address) pair did.
#[derive(Clone, Copy, Debug)]
struct Record {
    /// Verified NARs delivered there.
    verified: u32,
    /// When it reached [`PROVEN_AFTER`].
    proven_at: Option<Instant>,
}

impl Record {
    fn earned(&self) -> Option<Earned> {
        let proven_at = self.proven_at.filter(|_| self.verified >= PROVEN_AFTER)?;
        Some(Earned {
            verified: self.verified,
            proven_at,
        })
    }
}

struct State {
    /// Verified NARs per (node, address), and since when it is proven.
    counts: LruCache<(NodeId, IpAddr), Record>,
    banned_nodes: HashSet<NodeId>,
    banned_addrs: HashSet<IpAddr>,
    /// Host-wide: trips when a peer allowed to pass through lies.
    breaker: Breaker,
}

impl State {
    fn full(&self) -> bool {
        self.banned_nodes.len() >= MAX_BANNED_NODES || self.banned_addrs.len() >= MAX_BANNED_ADDRS
    }

    /// What `node` at `ip` earned, if it is proven there (not banned, list not full).
    fn earned(&self, node: &NodeId, ip: IpAddr) -> Option<Earned> {
        if self.full() || self.banned_nodes.contains(node) || self.banned_addrs.contains(&ip) {
            return None;
        }
        self.counts.peek(&(*node, ip)).and_then(Record::earned)
    }

    fn snapshot(&self) -> FileState {
        FileState {
            version: VERSION,
            proven: self
                .counts
                .iter()
                .filter(|(_, r)| r.earned().is_some())
                .map(|((node, ip), _)| (node.to_string(), *ip))
                .collect(),
            banned_nodes: self.banned_nodes.iter().map(NodeId::to_string).collect(),
            banned_addrs: self.banned_addrs.iter().copied().collect(),
        }
    }
}

/// The proven peers and the banned ones, kept in `dir` (none: in memory only, for tests).
pub struct ProvenPeers {
    state: Mutex<State>,
    file: Option<PathBuf>,
    /// Serialises writes of the file (each writes the state as it is then).
    write: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProvenPeers {
    /// Reads the state from `dir` (a missing or bad file: nobody proven, nobody banned).
    pub fn load(dir: Option<&Path>) -> Self {
        let file = dir.map(|d| d.join(FILE_NAME));
        let mut state = State {
            counts: LruCache::new(NonZeroUsize::new(MAX_PROVEN).unwrap_or(NonZeroUsize::MIN)),
            banned_nodes: HashSet::new(),
            banned_addrs: HashSet::new(),
            breaker: Breaker::default(),
        };
        if let Some(f) = &file {
            match read_file(f) {
                Ok(Some(s)) => {
                    for n in s.banned_nodes.iter().filter_map(|n| n.parse().ok()) {
                        if state.banned_nodes.len() < MAX_BANNED_NODES {
                            state.banned_nodes.insert(n);
                        }
                    }
                    for a in s.banned_addrs.iter().take(MAX_BANNED_ADDRS) {
                        state.banned_addrs.insert(*a);
                    }
                    for (n, ip) in &s.proven {
                        if let Ok(n) = n.parse::<NodeId>() {
                            // Proven from now on: seasoned only after `breaker::SEASONED_AGE`.
                            let proven_at = Some(Instant::now());
                            state.counts.put(
                                (n, *ip),
                                Record {
                                    verified: PROVEN_AFTER,
                                    proven_at,
                                },
                            );
                        }
                    }
                    tracing::info!(file = %f.display(), proven = state.counts.len(), banned = state.banned_nodes.len(), "proven peers loaded");
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(file = %f.display(), %why, "proven-peers file unusable: nobody is proven");
                }
            }
        }
        Self {
            state: Mutex::new(state),
            file,
            write: Mutex::new(()),
        }
    }

    /// Whether `node` is proven at `ip` (see [`Self::may_pass_through`] for whether its bytes
    /// may pass through now).
    pub fn is_proven(&self, node: &NodeId, ip: IpAddr) -> bool {
        lock(&self.state).earned(node, ip).is_some()
    }

    /// Whether `node` at `ip` may pass the bytes of one NAR through now: proven, and the breaker
    /// allows it (an unseasoned peer gets a grant, to be held while it passes through).
    pub fn may_pass_through(&self, node: &NodeId, ip: IpAddr) -> Option<Pass> {
        let mut s = lock(&self.state);
        let e = s.earned(node, ip)?;
        s.breaker.pass((*node, ip), &e, Instant::now())
    }

    /// Lies by peers allowed to pass through within the breaker's window.
    pub fn recent_pass_through_lies(&self) -> usize {
        lock(&self.state).breaker.recent_lies(Instant::now())
    }

    /// `node` at `ip` delivered a NAR that verified. Returns true when this made it proven.
    pub fn delivered(&self, node: &NodeId, ip: IpAddr) -> bool {
        let became = {
            let mut s = lock(&self.state);
            if s.banned_nodes.contains(node) || s.banned_addrs.contains(&ip) {
                return false;
            }
            let r = s.counts.get_or_insert_mut((*node, ip), || Record {
                verified: 0,
                proven_at: None,
            });
            r.verified = r.verified.saturating_add(1);
            let became = r.verified == PROVEN_AFTER && r.proven_at.is_none();
            if became {
                r.proven_at = Some(Instant::now());
            }
            became
        };
        if became {
            tracing::info!(node = %node, %ip, "peer proven: its NARs may pass through");
            self.persist();
        }
        became
    }

    /// `node` (at `ip`, when known) sent a NAR that failed verification: banned for good. If
    /// it was allowed to pass through, the breaker trips.
    pub fn lied(&self, node: &NodeId, ip: Option<IpAddr>) {
        {
            let mut s = lock(&self.state);
            let now = Instant::now();
            let passing = ip
                .and_then(|ip| s.earned(node, ip).map(|e| (ip, e)))
                .is_some_and(|(ip, e)| s.breaker.was_passing((*node, ip), &e, now));
            if passing {
                s.breaker.tripped(now);
                tracing::warn!(node = %node, ?ip, recent = s.breaker.recent_lies(now), "a peer allowed to pass through lied: pass-through breaker tripped");
            }
            if s.banned_nodes.len() < MAX_BANNED_NODES {
                s.banned_nodes.insert(*node);
            }
            if let Some(ip) = ip {
                if s.banned_addrs.len() < MAX_BANNED_ADDRS {
                    s.banned_addrs.insert(ip);
                }
            }
            let gone: Vec<(NodeId, IpAddr)> = s
                .counts
                .iter()
                .map(|(k, _)| *k)
                .filter(|(n, a)| n == node || Some(*a) == ip)
                .collect();
            for k in gone {
                s.counts.pop(&k);
            }
        }
        self.persist();
    }

    /// Writes the state file (atomically: a temporary file renamed over it). Errors are logged;
    /// a ban not written is still in force until the process ends.
    ///
    /// Synchronous on purpose (a ban is on disk before the lying transfer is cut), and rare (a
    /// peer becoming proven, a ban); on a multi-threaded runtime it tells tokio to move other
    /// tasks off this thread meanwhile.
    pub fn persist(&self) {
        let Some(path) = &self.file else { return };
        let write = || {
            let _w = lock(&self.write);
            let snap = lock(&self.state).snapshot();
            if let Err(e) = write_file(path, &snap) {
                tracing::warn!(error = %e, "cannot save the proven peers");
            }
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(write),
            _ => write(),
        }
    }
}

/// Why the state file was not used (it then counts as empty).
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("reading: {0}")]
    Io(#[from] io::Error),
    /// A FIFO, a socket, a device or a directory: never read (a FIFO would block the start).
    #[error("not a regular file ({0})")]
    NotRegular(&'static str),
    #[error("larger than {MAX_FILE_BYTES} bytes")]
    TooLarge,
    #[error("does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("version {0} (expected {VERSION})")]
    Version(u32),
}

/// What kind of file `t` is, for the log.
fn kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Reads the state file, if it is a regular file: opened without blocking (`O_NONBLOCK`: a
/// FIFO opens at once instead of waiting for a writer), its type checked on the open file
/// (no race with a rename), and at most [`MAX_FILE_BYTES`] + 1 bytes read whatever its
/// length says.
fn read_file(path: &Path) -> Result<Option<FileState>, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular(kind(meta.file_type())));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    let mut text = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    let s: FileState = serde_json::from_slice(&text)?;
    if s.version != VERSION {
        return Err(ReadError::Version(s.version));
    }
    Ok(Some(s))
}

fn write_file(path: &Path, s: &FileState) -> Result<(), ProvenError> {
    let body = serde_json::to_vec(s)?;
    let err = |source| ProvenError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    tmp.write_all(&body).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn prove(p: &ProvenPeers, n: &NodeId, a: IpAddr) {
        for _ in 0..PROVEN_AFTER {
            p.delivered(n, a);
        }
    }

    /// Issue #25: a lie by a peer allowed to pass through trips the host-wide breaker: a
    /// seasoned honest peer keeps passing through, a freshly proven identity does not (nor does
    /// its lie count again), and after K such lies nobody does, for an hour.
    #[tokio::test(start_paused = true)]
    async fn a_pass_through_lie_leaves_only_seasoned_peers() {
        use crate::proxy::breaker::{BREAKER_FOR, MAX_PASS_THROUGH_LIES, SEASONED_AGE, SEASONED_NARS};
        let p = ProvenPeers::load(None);
        let (honest, hip) = (NodeId([1; 16]), ip("10.0.0.1"));
        for _ in 0..SEASONED_NARS {
            p.delivered(&honest, hip);
        }
        tokio::time::advance(SEASONED_AGE).await;
        let liar = |i: u8| (NodeId([100 + i; 16]), ip(&format!("10.0.1.{i}")));
        let (l0, a0) = liar(0);
        prove(&p, &l0, a0);
        let passing = p.may_pass_through(&l0, a0);
        assert!(passing.is_some(), "closed breaker: any proven peer");
        p.lied(&l0, Some(a0));
        drop(passing);
        assert_eq!(p.recent_pass_through_lies(), 1);
        assert!(
            p.may_pass_through(&honest, hip).is_some(),
            "the seasoned honest peer keeps pass-through"
        );
        let (l1, a1) = liar(1);
        prove(&p, &l1, a1);
        assert!(
            p.is_proven(&l1, a1) && p.may_pass_through(&l1, a1).is_none(),
            "a new identity: verify first"
        );
        p.lied(&l1, Some(a1));
        assert_eq!(
            p.recent_pass_through_lies(),
            1,
            "a lie that could not pass through costs nothing"
        );
        // Proven after the first lie: not seasoned for this window, however many NARs.
        let (l2, a2) = liar(2);
        prove(&p, &l2, a2);
        for _ in 0..SEASONED_NARS {
            p.delivered(&l2, a2);
        }
        assert!(p.may_pass_through(&l2, a2).is_none(), "proven after the first lie");
        // The seasoned peer lies too: the second lie of the window, nobody passes through.
        p.lied(&honest, Some(hip));
        assert_eq!(p.recent_pass_through_lies(), MAX_PASS_THROUGH_LIES);
        let (h2, hip2) = (NodeId([2; 16]), ip("10.0.0.2"));
        prove(&p, &h2, hip2);
        assert!(p.may_pass_through(&h2, hip2).is_none(), "K lies: nobody");
        tokio::time::advance(BREAKER_FOR).await;
        assert!(p.may_pass_through(&h2, hip2).is_some(), "an hour later, closed again");
    }

    #[test]
    fn trust_belongs_to_node_and_address_together() {
        let p = ProvenPeers::load(None);
        let (n, other) = (NodeId([1; 16]), NodeId([2; 16]));
        let a = ip("10.0.0.1");
        for _ in 1..PROVEN_AFTER {
            p.delivered(&n, a);
        }
        assert!(!p.is_proven(&n, a), "one NAR short");
        assert!(p.delivered(&n, a), "the step is reported once");
        assert!(!p.delivered(&n, a));
        assert!(p.is_proven(&n, a));
        assert!(
            !p.is_proven(&n, ip("10.0.0.2")),
            "its id from another address: no record"
        );
        assert!(!p.is_proven(&other, a), "another id at its address: no record");
    }

    #[test]
    fn a_lie_bans_the_node_and_the_address_across_restarts() {
        let dir = tempfile::tempdir().expect("dir");
        let (liar, neighbour, honest) = (NodeId([1; 16]), NodeId([3; 16]), NodeId([2; 16]));
        let (a, b) = (ip("10.0.0.1"), ip("fe80::2"));
        let p = ProvenPeers::load(Some(dir.path()));
        prove(&p, &liar, a);
        prove(&p, &honest, b);
        p.lied(&liar, Some(a));
        assert!(!p.is_proven(&liar, a));
        let p = ProvenPeers::load(Some(dir.path()));
        assert!(p.is_proven(&honest, b), "proven across a restart");
        prove(&p, &liar, a);
        prove(&p, &liar, ip("10.0.0.9"));
        prove(&p, &neighbour, a);
        assert!(!p.is_proven(&liar, a), "banned for good");
        assert!(!p.is_proven(&liar, ip("10.0.0.9")), "its node id, anywhere");
        assert!(!p.is_proven(&neighbour, a), "its address, under any id");
    }

    #[test]
    fn a_bad_file_means_nobody_is_proven() {
        let dir = tempfile::tempdir().expect("dir");
        let n = NodeId([1; 16]);
        let a = ip("10.0.0.1");
        let p = ProvenPeers::load(Some(dir.path()));
        prove(&p, &n, a);
        let file = dir.path().join(FILE_NAME);
        let good = std::fs::read(&file).expect("written when proven");
        let text = String::from_utf8(good.clone()).expect("utf8");
        assert!(text.contains("\"version\":1"), "{text}");
        let mut huge = good.clone();
        huge.resize(MAX_FILE_BYTES as usize + 1, b' ');
        for bad in [
            good[..good.len() - 1].to_vec(),
            text.replace("\"version\":1", "\"version\":2").into_bytes(),
            huge,
        ] {
            std::fs::write(&file, &bad).expect("write");
            assert!(!ProvenPeers::load(Some(dir.path())).is_proven(&n, a));
        }
        std::fs::write(&file, &good).expect("write");
        assert!(ProvenPeers::load(Some(dir.path())).is_proven(&n, a));
    }

    /// Issue #25: a FIFO as the state file hung the proxy's start (the size check passed a
    /// FIFO, length 0, and the read waited for a writer forever). Only a regular file is read;
    /// a FIFO, a directory or a socket is logged and ignored, at once, and nobody is proven.
    #[test]
    fn only_a_regular_state_file_is_read_and_never_blocks() {
        let n = NodeId([1; 16]);
        let a = ip("10.0.0.1");
        type Make = fn(&Path);
        let kinds: [(&str, Make); 3] = [
            ("fifo", |f| {
                nix::unistd::mkfifo(f, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo")
            }),
            ("directory", |f| std::fs::create_dir(f).expect("mkdir")),
            ("socket", |f| {
                std::mem::forget(std::os::unix::net::UnixListener::bind(f).expect("bind"));
            }),
        ];
        for (what, make) in kinds {
            let dir = tempfile::tempdir().expect("dir");
            make(&dir.path().join(FILE_NAME));
            let (tx, rx) = std::sync::mpsc::channel();
            let d = dir.path().to_owned();
            // On a thread: the old code never returned (bounded: the test fails after 20 s).
            std::thread::spawn(move || {
                let _ = tx.send(ProvenPeers::load(Some(&d)).is_proven(&n, a));
            });
            let proven = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("loading with a {what} as the state file blocked"));
            assert!(!proven, "{what}");
        }
        // A regular file is still read.
        let dir = tempfile::tempdir().expect("dir");
        prove(&ProvenPeers::load(Some(dir.path())), &n, a);
        assert!(ProvenPeers::load(Some(dir.path())).is_proven(&n, a));
    }

    #[test]
    fn a_full_ban_list_fails_closed() {
        let p = ProvenPeers::load(None);
        let n = NodeId([0xaa; 16]);
        let a = ip("10.9.9.9");
        prove(&p, &n, a);
        for i in 0..MAX_BANNED_NODES as u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            p.lied(&NodeId(id), None);
        }
        assert!(!p.is_proven(&n, a), "a full list: nobody is proven");
    }
}
