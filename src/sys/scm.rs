//! Unix-socket descriptor passing (`SCM_RIGHTS`) and peer credentials (`SO_PEERCRED`): how a
//! VMM hands its userfaultfd to a page server.
#![allow(unsafe_code)]

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// What one `recvmsg` brought: bytes and descriptors.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the caller's buffer.
    pub len: usize,
    /// Descriptors passed with them (owned: closed on drop).
    pub fds: Vec<OwnedFd>,
    /// The kernel cut the control data short (more descriptors were sent than fit).
    pub truncated_fds: bool,
}

/// One `recvmsg(2)` on `sock` into `buf`, accepting up to 4 descriptors (`SCM_RIGHTS`,
/// received close-on-exec).
pub fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> Result<Received, Errno> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our table for this message; nothing
                // else owns it, so the OwnedFd is its only owner and closes it exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated_fds: msg.flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

/// The peer's process id (`SO_PEERCRED`, as of connect time).
pub fn peer_pid(sock: &UnixStream) -> Option<i32> {
    nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.pid())
}
