//! How a connection shows it is alive, and when silence means it is dead.
//!
//! A break the kernel reports (EOF, `ECONNRESET`, `EPIPE`) is seen at the next read or write.
//! A *silent* link (packets dropped, a peer frozen) reports nothing; two rules bound it:
//!
//! - **Heartbeats** on idle connections: a side that expects its peer to listen and has sent
//!   nothing for [`Liveness::heartbeat`] sends a `Heartbeat` frame (every reader skips them).
//!   The source does so on every connection the destination reads (urgent, bulk, verify while
//!   it waits, precopy), the destination on its urgent connection and while it drains precopy.
//!   So a connection on which **nothing at all arrives for [`Liveness::timeout`]** is dead,
//!   and the reader replaces it (the destination reconnects, the source waits for it).
//! - **`TCP_USER_TIMEOUT`** on every socket: data (heartbeats included) left unacknowledged for
//!   the same timeout makes the kernel drop the connection (`ETIMEDOUT`), so a busy sender
//!   into a dead network learns it too.
//!
//! The detection bound is therefore [`Liveness::timeout`] (default [`DEFAULT_LINK_TIMEOUT`]:
//! 4 s, heartbeats every second).

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};

/// The default link timeout: no byte for this long and a connection is dead.
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(4);

/// Heartbeats per link timeout (the heartbeat interval is the timeout divided by this).
const HEARTBEATS_PER_TIMEOUT: u32 = 4;

/// The liveness rules of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Nothing arrived for this long: the connection is dead.
    pub timeout: Duration,
    /// Nothing sent for this long on a connection the peer reads: send a `Heartbeat`.
    pub heartbeat: Duration,
}

impl Liveness {
    /// Heartbeats at a quarter of `timeout` (a timeout of zero is taken as 1 ms).
    pub fn new(timeout: Duration) -> Liveness {
        let timeout = timeout.max(Duration::from_millis(1));
        Liveness {
            timeout,
            heartbeat: timeout / HEARTBEATS_PER_TIMEOUT,
        }
    }

    /// Sets `TCP_USER_TIMEOUT` on `socket` (best effort: a loopback relay under TLS has no
    /// network to time out on).
    pub fn apply(&self, socket: &TcpStream) {
        let _ = socket2::SockRef::from(socket).set_tcp_user_timeout(Some(self.timeout));
    }
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness::new(DEFAULT_LINK_TIMEOUT)
    }
}

/// Whether the peer of `socket` has closed or reset it (without waiting): for a side that only
/// writes now and then (a stream waiting for the switchover), which would otherwise learn it
/// only from its second write after the peer went away.
pub(crate) fn peer_hung_up(socket: &TcpStream) -> bool {
    if !matches!(wait_readable(socket, Duration::ZERO), Ok(true)) {
        return false;
    }
    // Readable: an end of stream, a reset, or bytes (which stay queued).
    let mut byte = [0u8; 1];
    !matches!(socket.peek(&mut byte), Ok(1..))
}

/// Waits until `socket` has something to read (or an error or hang-up to report): true; or
/// `within` passed: false.
pub(crate) fn wait_readable(socket: &TcpStream, within: Duration) -> std::io::Result<bool> {
    // Zero: a check without waiting; otherwise at least 1 ms (no spinning on a sub-ms rest).
    let ms = match within.as_millis() {
        _ if within.is_zero() => 0,
        ms => ms.clamp(1, u128::from(u16::MAX)) as u16,
    };
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
