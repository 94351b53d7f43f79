//! Notices of interface and address changes from the kernel (rtnetlink multicast groups), so the
//! beacon re-scans at once instead of at its next periodic re-scan. The notices are not parsed:
//! any one (or an overflow) means "look again"; the re-scan reads the truth with `getifaddrs`.

use std::os::fd::AsRawFd;

use nix::sys::socket::{self, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};
use tokio::net::UnixDatagram;

/// `RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR`.
const GROUPS: u32 = 0x1 | 0x10 | 0x100;
/// Read buffer; notices are drained and dropped, so one page is enough.
const BUF: usize = 4096;
/// Most datagrams read per wake-up, so a storm of notices cannot hold the beacon's loop.
const MAX_DRAIN: usize = 64;

/// A subscription to link and address notices.
///
/// The netlink socket is registered with Tokio through `UnixDatagram`, which only needs a
/// datagram file descriptor for readiness and `recv(2)` (safe, unlike `AsyncFd::register`).
pub struct Watcher {
    sock: UnixDatagram,
}

impl Watcher {
    /// Subscribes (works unprivileged, in any network namespace).
    pub fn new() -> nix::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, GROUPS))?;
        let std_sock = std::os::unix::net::UnixDatagram::from(fd);
        let sock = UnixDatagram::from_std(std_sock)
            .map_err(|e| e.raw_os_error().map_or(nix::Error::EIO, nix::Error::from_raw))?;
        Ok(Self { sock })
    }

    /// Waits for at least one notice and drains what is queued (an overflow, ENOBUFS, counts as
    /// a notice: something changed that we missed).
    pub async fn changed(&self) {
        let mut buf = [0u8; BUF];
        loop {
            if self.sock.readable().await.is_err() {
                return std::future::pending().await;
            }
            let mut got = false;
            for _ in 0..MAX_DRAIN {
                match self.sock.try_recv(&mut buf) {
                    Ok(_) => got = true,
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => got = true,
                    Err(_) => break,
                }
            }
            if got {
                return;
            }
        }
    }
}
