//! Wakes the server's accept loop at once: on stop, and when a session ends (so `--once`
//! returns as soon as its session is reported). The loop sleeps in `poll(2)` on the listener and
//! this pair, never in a timed sleep.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};

/// A self-pipe (a socket pair): [`wake`](Wake::wake) makes [`wait`](Wake::wait) return.
#[derive(Debug)]
pub(super) struct Wake {
    tx: UnixStream,
    rx: UnixStream,
}

impl Wake {
    pub(super) fn new() -> std::io::Result<Wake> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Wake { tx, rx })
    }

    /// Makes the current or the next [`wait`](Wake::wait) return (a full pipe already does).
    pub(super) fn wake(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    /// Waits until `listener` has a connection (true), a wake came, or `timeout` passed.
    pub(super) fn wait(&self, listener: &TcpListener, timeout: Duration) -> std::io::Result<bool> {
        let ms = timeout.as_millis().min(u128::from(u16::MAX)) as u16;
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.rx.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let readable = fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR));
        let mut sink = [0u8; 64];
        while matches!((&self.rx).read(&mut sink), Ok(n) if n > 0) {}
        Ok(readable)
    }
}
