//! The conference one-liner: `GET /install` (the script, with this peer's address and what the
//! binary is filled in: version, size, sha256, static or not) and `GET /install/local-nix-cache`
//! (the binary, paced like every streamed body): this process's own, or `--install-binary`.
//! Only a binary that runs without a loader is handed out: one built by Nix's ordinary
//! `rustPlatform` needs this host's `/nix/store` glibc and would run nowhere else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use tokio::sync::mpsc;

use super::elf::{self, ElfError, Linkage, HEADER_BYTES};
use super::error::ServeError;
use super::source;
use super::streams::{Streams, NAR_CHANNEL_CHUNKS};
use crate::http::{self as h, Body, Pace, PaceError};

/// The conference one-liner's script; `@PEER@`, `@SHA256@`, `@VERSION@`, `@SIZE@` and
/// `@LINKAGE@` are filled in per request.
const INSTALL_SCRIPT: &str = include_str!("install.sh");

/// The binary the one-liner hands out, as the script describes it to the newcomer.
#[derive(Clone, Debug)]
pub struct InstallBinary {
    pub path: PathBuf,
    /// sha256, hex.
    pub sha256: String,
    pub size: u64,
    /// `local-nix-cache X.Y.Z` (this process's own version when it serves itself).
    pub version: String,
    pub linkage: Linkage,
}

/// Why the configured `--install-binary` cannot be handed to newcomers (an error at start).
#[derive(Debug, thiserror::Error)]
pub enum InstallBinaryError {
    #[error("install binary {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("install binary {path}: {source}")]
    Elf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("install binary {path} needs the loader {interpreter}: newcomers could not run it (give a static build)")]
    NotStatic { path: PathBuf, interpreter: String },
    #[error("install binary {path} is for ELF machine {machine}, not this host's {arch}")]
    OtherMachine {
        path: PathBuf,
        machine: u16,
        arch: &'static str,
    },
}

/// Reads the binary at `path`: its ELF header (it must run without a loader, on this
/// architecture), its sha256 and size. Blocking: run off the reactor.
fn examine(path: &Path, version: Option<&str>) -> Result<InstallBinary, InstallBinaryError> {
    use sha2::Digest;
    use std::io::Read;
    let read = |source| InstallBinaryError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read)?;
    let mut head = Vec::with_capacity(HEADER_BYTES);
    (&mut f)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(read)?;
    let facts = elf::inspect(&head).map_err(|source| InstallBinaryError::Elf {
        path: path.to_owned(),
        source,
    })?;
    if elf::this_machine().is_some_and(|m| m != facts.machine) {
        return Err(InstallBinaryError::OtherMachine {
            path: path.to_owned(),
            machine: facts.machine,
            arch: std::env::consts::ARCH,
        });
    }
    let mut h = sha2::Sha256::new();
    h.update(&head);
    let size = head.len() as u64 + std::io::copy(&mut f, &mut h).map_err(read)?;
    let version = match version {
        Some(v) => v.to_owned(),
        None => version_of(path),
    };
    Ok(InstallBinary {
        path: path.to_owned(),
        sha256: data_encoding::HEXLOWER.encode(&h.finalize()),
        size,
        version,
        linkage: facts.linkage,
    })
}

/// `PATH --version`, at most 5 s (the binary is the admin's own `--install-binary`).
fn version_of(path: &Path) -> String {
    let unknown = || "local-nix-cache (version unknown)".to_owned();
    let Ok(mut child) = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return unknown();
    };
    let deadline = std::time::Instant::now() + VERSION_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return unknown();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.by_ref().take(256).read_to_string(&mut out);
    }
    let line = out.lines().next().unwrap_or("").trim();
    let ok = line.starts_with("local-nix-cache ") && line.bytes().all(|c| c.is_ascii_graphic() || c == b' ');
    if ok {
        line.to_owned()
    } else {
        unknown()
    }
}

/// The longest `--install-binary --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks a configured `--install-binary` at start: readable, ELF for this architecture, static.
pub fn check_install_binary(path: &Path) -> Result<InstallBinary, InstallBinaryError> {
    let b = examine(path, None)?;
    match &b.linkage {
        Linkage::Static => Ok(b),
        Linkage::Dynamic { interpreter } => Err(InstallBinaryError::NotStatic {
            path: path.to_owned(),
            interpreter: interpreter.clone(),
        }),
    }
}

/// The one-liner's two answers, and the binary they hand out.
#[derive(Default)]
pub struct Installer {
    /// `--install-binary`, checked at start; none: this process's own binary.
    configured: Option<InstallBinary>,
    /// This process's own binary, examined on the first `/install` request (none: unreadable).
    own: tokio::sync::OnceCell<Option<InstallBinary>>,
}

impl Installer {
    /// Hands out `configured` (checked by [`check_install_binary`]) instead of this binary.
    pub fn with_binary(configured: Option<InstallBinary>) -> Self {
        Self {
            configured,
            own: Default::default(),
        }
    }

    /// The binary the one-liner hands out (static or not: the script says which).
    async fn binary_facts(&self) -> Option<InstallBinary> {
        if let Some(b) = &self.configured {
            return Some(b.clone());
        }
        self.own
            .get_or_init(|| async {
                let r = tokio::task::spawn_blocking(|| -> Result<InstallBinary, InstallBinaryError> {
                    let exe = std::env::current_exe().map_err(|source| InstallBinaryError::Read {
                        path: "/proc/self/exe".into(),
                        source,
                    })?;
                    examine(&exe, Some(concat!("local-nix-cache ", env!("CARGO_PKG_VERSION"))))
                })
                .await;
                match r {
                    Ok(Ok(b)) => {
                        if let Linkage::Dynamic { interpreter } = &b.linkage {
                            tracing::warn!(
                                binary = %b.path.display(),
                                %interpreter,
                                "this binary needs a loader newcomers may not have: /install/local-nix-cache \
                                 answers 404 and the install script says why; give --install-binary a static build"
                            );
                        }
                        Some(b)
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot read our own binary for /install");
                        None
                    }
                    Err(_) => None,
                }
            })
            .await
            .clone()
    }

    /// The install script, for a newcomer who reached us as `host` (the `Host` header).
    pub async fn script(&self, host: Option<&HeaderValue>) -> Result<Response<Body>, ServeError> {
        let host = host.and_then(|h| h.to_str().ok()).unwrap_or("");
        // The host ends up inside the script: only characters of a host name or address.
        let ok = !host.is_empty()
            && host.len() <= 255
            && host.bytes().all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(&c));
        if !ok {
            return Err(ServeError::BadHost);
        }
        let b = self.binary_facts().await.ok_or(ServeError::NoBinary)?;
        let linkage = match &b.linkage {
            Linkage::Static => "static".to_owned(),
            // Only characters a shell single-quoted string may hold.
            Linkage::Dynamic { interpreter } => format!(
                "dynamic: needs {}",
                interpreter.replace(|c: char| !(c.is_ascii_graphic() && c != '\''), "?")
            ),
        };
        let script = INSTALL_SCRIPT
            .replace("@PEER@", &format!("http://{host}"))
            .replace("@SHA256@", &b.sha256)
            .replace("@VERSION@", &b.version)
            .replace("@SIZE@", &b.size.to_string())
            .replace("@LINKAGE@", &linkage)
            .replace("@SOURCE_NARHASH@", source::NAR_HASH)
            // In a URL's query: `+`, `/` and `=` of base64 percent-encoded, as Nix writes them.
            .replace(
                "@SOURCE_SRI@",
                &source::NAR_HASH_SRI
                    .replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D"),
            )
            .replace("@ARCH@", std::env::consts::ARCH);
        Ok(h::ok(Bytes::from(script), "text/x-shellscript; charset=utf-8"))
    }

    /// This process's binary, streamed (through a transfer slot) by a task of `streams`.
    pub async fn binary(&self, peer: SocketAddr, head: bool, streams: &Streams) -> Result<Response<Body>, ServeError> {
        let b = self.binary_facts().await.ok_or(ServeError::NoBinary)?;
        if let Linkage::Dynamic { interpreter } = b.linkage {
            return Err(ServeError::NotStatic { interpreter });
        }
        let (path, size) = (b.path, b.size);
        let body = if head {
            Body::empty()
        } else {
            let permit = streams
                .transfers
                .acquire(peer.ip())
                .await
                .map_err(|source| ServeError::NoInstallSlot { peer, source })?;
            let (tx, rx) = mpsc::channel(NAR_CHANNEL_CHUNKS);
            let pace = streams.pace();
            streams.tasks.spawn(async move {
                let _permit = permit;
                if let Err(e) = send_file(&path, size, &tx, pace).await {
                    tracing::info!(%peer, error = %e, "binary transfer aborted");
                    let _ = tx.try_send(Err(std::io::Error::other(e)));
                }
            });
            Body::Stream(rx)
        };
        let mut r = h::ok(body, "application/octet-stream");
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        Ok(r)
    }
}

/// Streams `size` bytes of the file at `path` to `tx`, paced. Fails if the file changed size.
async fn send_file(
    path: &std::path::Path,
    size: u64,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    mut pace: Pace,
) -> Result<(), FileSendError> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut left = size;
    while left > 0 {
        let mut buf = bytes::BytesMut::with_capacity((128 * 1024).min(left as usize));
        let n = f.read_buf(&mut buf).await?;
        if n == 0 {
            return Err(FileSendError::Changed);
        }
        left = left.saturating_sub(n as u64);
        pace.send(tx, Ok(buf.freeze())).await?;
    }
    Ok(())
}

/// Why sending the binary stopped early.
#[derive(Debug, thiserror::Error)]
enum FileSendError {
    #[error("reading the binary: {0}")]
    Io(#[from] std::io::Error),
    #[error("the binary changed while sent")]
    Changed,
    #[error(transparent)]
    Client(#[from] PaceError),
}
