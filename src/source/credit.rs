//! The credit gate of a receiver-driven stream (a bulk connection whose `Hello` carried
//! `HELLO_CREDIT`): the destination decides how many `Pages` frames may be in flight, and the
//! source's streamer sends one only within the running total granted by the destination's
//! `Credit` frames. While it has none it waits on the socket (no CPU, no bulk byte queued in
//! front of anything); the grants are read as they come, so they never pile up in the socket.

use std::net::SocketAddr;
use std::time::Duration;

use super::conn::link_err;
use super::error::SourceError;
use crate::codec::{CodecError, Header, Kind};
use crate::link::{FramedStream, Liveness, Polled};

/// `Pages` frames granted and sent on one bulk connection.
#[derive(Debug, Default)]
pub(super) struct CreditGate {
    granted: u64,
    sent: u64,
}

/// Only grants (and heartbeats, which the link skips) come on a credit-driven bulk connection.
fn admit(h: &Header) -> Result<(), CodecError> {
    match h.kind {
        Kind::Credit => Ok(()),
        got => Err(CodecError::Unexpected {
            got,
            expected: "Credit (a receiver-driven stream)",
        }),
    }
}

impl CreditGate {
    /// Whether another `Pages` frame may go out.
    pub(super) fn has_credit(&self) -> bool {
        self.sent < self.granted
    }

    /// Counts a `Pages` frame sent.
    pub(super) fn spend(&mut self) {
        debug_assert!(self.has_credit(), "a Pages frame without credit");
        self.sent += 1;
    }

    /// Takes the grants that already arrived, without waiting.
    pub(super) fn take_arrived(
        &mut self,
        link: &mut FramedStream,
        peer: SocketAddr,
    ) -> Result<(), SourceError> {
        while link.frame_ready().map_err(link_err(peer))? {
            match link.read_frame_if(admit).map_err(link_err(peer))? {
                Some(h) => self.grant(&h),
                None => return Err(closed(peer)),
            }
        }
        Ok(())
    }

    /// Waits at most one heartbeat interval for a grant (sending our heartbeat when due); a
    /// destination silent for the link timeout is a dead link. The caller checks between waits
    /// whether the stream is still wanted.
    pub(super) fn wait(
        &mut self,
        link: &mut FramedStream,
        live: &Liveness,
        peer: SocketAddr,
    ) -> Result<(), SourceError> {
        let silence: Option<Duration> = Some(live.timeout);
        match link
            .poll_frame(live, silence, &mut admit)
            .map_err(link_err(peer))?
        {
            Polled::Frame(Some(h)) => self.grant(&h),
            Polled::Frame(None) => return Err(closed(peer)),
            Polled::Idle => {}
        }
        Ok(())
    }

    /// A `Credit` frame: the running total only grows (a late, smaller total changes nothing).
    fn grant(&mut self, h: &Header) {
        debug_assert_eq!(h.kind, Kind::Credit);
        self.granted = self.granted.max(h.page);
    }
}

fn closed(peer: SocketAddr) -> SourceError {
    SourceError::Io {
        context: format!("wait for stream credit from {peer}"),
        source: std::io::ErrorKind::UnexpectedEof.into(),
    }
}
