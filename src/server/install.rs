//! The conference one-liner: `GET /install` (the script, with this peer's address and the
//! binary's sha256 filled in) and `GET /install/local-nix-cache` (this process's own binary,
//! paced like every streamed body).

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use tokio::sync::mpsc;

use super::error::ServeError;
use super::source;
use super::streams::{Streams, NAR_CHANNEL_CHUNKS};
use crate::http::{self as h, Body, Pace, PaceError};

/// The conference one-liner's script; `@PEER@` and `@SHA256@` are filled in per request.
const INSTALL_SCRIPT: &str = include_str!("install.sh");

/// The one-liner's two answers, and the running binary's digest they need.
#[derive(Default)]
pub struct Installer {
    /// sha256 and size of this process's binary, computed on the first `/install` request.
    binary: tokio::sync::OnceCell<Option<(String, u64)>>,
}

impl Installer {
    /// sha256 (hex) and size of the running binary.
    async fn binary_digest(&self) -> Option<(String, u64)> {
        self.binary
            .get_or_init(|| async {
                let r = tokio::task::spawn_blocking(|| -> std::io::Result<(String, u64)> {
                    use sha2::Digest;
                    let mut f = std::fs::File::open(std::env::current_exe()?)?;
                    let mut h = sha2::Sha256::new();
                    let n = std::io::copy(&mut f, &mut h)?;
                    Ok((data_encoding::HEXLOWER.encode(&h.finalize()), n))
                })
                .await;
                match r {
                    Ok(Ok(d)) => Some(d),
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
        let (sha, _) = self.binary_digest().await.ok_or(ServeError::NoBinary)?;
        let script = INSTALL_SCRIPT
            .replace("@PEER@", &format!("http://{host}"))
            .replace("@SHA256@", &sha)
            .replace("@SOURCE_NARHASH@", source::NAR_HASH)
            .replace("@ARCH@", std::env::consts::ARCH);
        Ok(h::ok(Bytes::from(script), "text/x-shellscript; charset=utf-8"))
    }

    /// This process's binary, streamed (through a transfer slot) by a task of `streams`.
    pub async fn binary(&self, peer: SocketAddr, head: bool, streams: &Streams) -> Result<Response<Body>, ServeError> {
        let (_, size) = self.binary_digest().await.ok_or(ServeError::NoBinary)?;
        let path = std::env::current_exe().map_err(ServeError::OwnPath)?;
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
